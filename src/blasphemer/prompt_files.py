"""Read prompt records from the bundled data, local files, saved datasets and the hub.

Every reader returns ``(text, category)`` records (``category`` ``None`` where the source has
none) and raises :class:`~blasphemer.errors.DatasetError` with a one-line message naming the
source and the fix. :mod:`blasphemer.prompts` turns the records into prompt sets.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from blasphemer.errors import DatasetError

BUNDLED_KINDS = ("harmful", "harmless")
TEXT_COLUMNS = ("text", "instruction", "prompt")
CATEGORY_COLUMN = "category"
FILE_SUFFIXES = (".txt", ".json", ".jsonl", ".csv", ".parquet")

Record = tuple[str, str | None]  # (text, category)


def _one_line(value: object) -> str:
    """Squash any text (an exception message, say) onto one line."""
    return " ".join(str(value).split())


def _shown(name: object) -> str:
    """A column name as it can be shown on one line (quoted when it holds odd characters)."""
    text = str(name)
    return text if text.isprintable() else repr(text)


def read_bundled(kind: str) -> list[Record]:
    """The bundled set ``kind`` (``harmful`` or ``harmless``)."""
    if kind not in BUNDLED_KINDS:
        choices = ", ".join(f"bundled:{k}" for k in BUNDLED_KINDS)
        raise DatasetError(f"unknown bundled prompt set 'bundled:{kind}'; use one of: {choices}")
    resource = resources.files("blasphemer").joinpath("data", "prompts", f"{kind}.jsonl")
    return _parse_jsonl(resource.read_text(encoding="utf-8"), f"bundled:{kind}", None)


def read_hub(spec: str, column: str | None) -> tuple[list[Record], str]:
    """``hf:owner/name[:split[:column]]`` (downloads); returns the records and the dataset name."""
    parts = spec.removeprefix("hf:").split(":")
    if not parts[0] or len(parts) > 3:
        raise DatasetError(f"cannot read '{spec}'; write it as hf:owner/name[:split[:column]]")
    dataset_name = parts[0]
    split = parts[1] if len(parts) > 1 and parts[1] else "train"
    column = column or (parts[2] if len(parts) > 2 and parts[2] else None)
    import datasets  # deferred: importing datasets is slow and only needed here

    try:
        dataset = datasets.load_dataset(dataset_name, split=split)
    # datasets raises many unrelated types for network, hub and split errors; all mean the same
    # thing to the user, so they become one DatasetError (chained for --debug).
    except Exception as exc:
        raise DatasetError(
            f"cannot load Hugging Face dataset {dataset_name} (split {split}): {_one_line(exc)}; "
            "check the name, split and network, or download it and pass a local file"
        ) from exc
    return _from_records(dataset.column_names, dataset.to_list(), spec, column), dataset_name


def read_local(spec: str, column: str | None) -> tuple[list[Record], str]:
    """A file or a saved dataset folder (``folder:split``); returns the records and a name."""
    path = Path(spec).expanduser()
    split: str | None = None
    if not path.exists() and ":" in spec:
        # "folder:split" for a saved DatasetDict.
        head, _, tail = spec.rpartition(":")
        if Path(head).expanduser().is_dir():
            path, split = Path(head).expanduser(), tail
    if not path.exists():
        raise DatasetError(
            f"prompt file {path} not found; check the path, or use bundled:harmful / "
            "bundled:harmless or hf:owner/name"
        )
    if path.is_dir():
        return _load_saved_dataset(path, split, column), path.name
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise DatasetError(
            f"prompt file {path} has an unsupported type '{suffix or '(none)'}'; "
            f"use one of {', '.join(FILE_SUFFIXES)} or a folder saved by datasets"
        )
    try:
        if suffix == ".parquet":
            return _load_parquet(path, column), path.stem
        content = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(
            f"cannot read prompt file {path}: {_one_line(exc)}; check it is a readable UTF-8 file"
        ) from exc
    source = str(path)
    if suffix == ".txt":
        records: list[Record] = [
            (line.strip(), None) for line in content.splitlines() if line.strip()
        ]
    elif suffix == ".json":
        records = _parse_json(content, source, column)
    elif suffix == ".jsonl":
        records = _parse_jsonl(content, source, column)
    else:
        records = _parse_csv(content, source, column)
    return records, path.stem


def _parse_json(content: str, source: str, column: str | None) -> list[Record]:
    try:
        data = json.loads(content)
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"prompt file {source} is not valid JSON (line {exc.lineno}: {exc.msg}); fix the syntax"
        ) from exc
    if not isinstance(data, list):
        raise DatasetError(
            f"prompt file {source} must hold a JSON list of strings or objects, not "
            f"{type(data).__name__}; wrap the prompts in [...]"
        )
    return _from_items(data, source, column)


def _parse_jsonl(content: str, source: str, column: str | None) -> list[Record]:
    items: list[Any] = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DatasetError(
                f"prompt file {source} line {number} is not valid JSON ({exc.msg}); "
                "write one JSON object or string per line"
            ) from exc
    return _from_items(items, source, column)


def _from_items(items: list[Any], source: str, column: str | None) -> list[Record]:
    """Records from a list of strings, or of objects (rows)."""
    if all(isinstance(item, str) for item in items):
        if column is not None and items:
            raise DatasetError(
                f"prompt file {source} holds plain strings, so it has no column {column!r}; "
                "leave the column unset"
            )
        return [(item.strip(), None) for item in items if item.strip()]
    if not all(isinstance(item, dict) for item in items):
        raise DatasetError(
            f"prompt file {source} mixes objects with other values; make every entry an "
            "object with a text field, or every entry a string"
        )
    columns: dict[str, None] = {}
    for item in items:
        columns.update(dict.fromkeys(item))
    return _from_records(list(columns), items, source, column)


def _parse_csv(content: str, source: str, column: str | None) -> list[Record]:
    try:
        reader = csv.DictReader(content.splitlines())
        rows = list(reader)
        columns = list(reader.fieldnames or [])
    except csv.Error as exc:
        raise DatasetError(
            f"prompt file {source} is not valid CSV ({_one_line(exc)}); fix the quoting"
        ) from exc
    if not columns:
        raise DatasetError(f"prompt file {source} has no header row; add one naming the columns")
    return _from_records(columns, rows, source, column)


def _load_parquet(path: Path, column: str | None) -> list[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DatasetError(
            f"cannot read prompt file {path} as Parquet: {_one_line(exc)}; check the file"
        ) from exc
    return _from_records(table.column_names, table.to_pylist(), str(path), column)


def _load_saved_dataset(path: Path, split: str | None, column: str | None) -> list[Record]:
    import datasets  # deferred: importing datasets is slow and only needed here

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise DatasetError(
            f"folder {path} is not a dataset saved by datasets.save_to_disk ({_one_line(exc)}); "
            "point at a prompt file or a saved dataset folder"
        ) from exc
    if isinstance(loaded, datasets.DatasetDict):
        chosen = split or "train"
        if chosen not in loaded:
            raise DatasetError(
                f"dataset folder {path} has no split '{chosen}'; append one of "
                f"{', '.join(loaded)} as {path}:SPLIT"
            )
        dataset = loaded[chosen]
    else:
        if split is not None:
            raise DatasetError(
                f"dataset folder {path} has no splits, so ':{split}' does not apply; remove it"
            )
        dataset = loaded
    return _from_records(dataset.column_names, dataset.to_list(), str(path), column)


def _from_records(
    columns: Sequence[str], rows: Iterable[dict[str, Any]], source: str, column: str | None
) -> list[Record]:
    """Records from tabular rows: pick the text column, keep the category where present."""
    available = ", ".join(_shown(c) for c in columns) or "(none)"
    if column is None:
        column = next((c for c in TEXT_COLUMNS if c in columns), None)
        if column is None:
            raise DatasetError(
                f"{source} has no column named {', '.join(TEXT_COLUMNS)}; choose the text "
                f"column from: {available}"
            )
    elif column not in columns:
        raise DatasetError(
            f"{source} has no column {column!r}; choose the text column from: {available}"
        )
    records: list[Record] = []
    for number, row in enumerate(rows, start=1):
        value = row.get(column)
        if value is None:
            continue
        if not isinstance(value, str):
            raise DatasetError(
                f"{source} row {number}: column {column!r} holds {type(value).__name__}, "
                "not text; choose a text column"
            )
        category = row.get(CATEGORY_COLUMN)
        if value.strip():
            records.append((value.strip(), None if category is None else str(category)))
    return records
