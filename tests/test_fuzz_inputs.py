"""Fuzzing every reader of user input: each yields a result or one BlasphemerError, nothing else.

Prompt files (every format, random bytes, wrong encodings, wrong columns, huge lines), TOML
settings files, ``BLASPHEMER_*`` environment values, ``--select`` rules, architecture override
files and GGUF headers. Example counts stay small: the file runs in seconds.
"""

from __future__ import annotations

import json
import os
import string
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blasphemer.app.config import Settings, load_settings
from blasphemer.architectures import load_override
from blasphemer.errors import BlasphemerError
from blasphemer.gguf_source import check_loadable, read_header
from blasphemer.optimization import TrialResult, parse_rule
from blasphemer.prompts import load_prompt_set, split_prompt_set

FUZZ = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)
SUFFIXES = (".txt", ".json", ".jsonl", ".csv", ".parquet")
ENCODINGS = ("utf-8", "utf-16", "latin-1", "cp1252", "utf-8-sig")

texts = st.text(max_size=200)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(texts, inner, max_size=5),
    max_leaves=20,
)
columns = st.sampled_from(["text", "instruction", "prompt", "category", "question", ""]) | texts


@contextmanager
def _file(name: str, content: bytes) -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_bytes(content)
        yield path


def _result_or_blasphemer_error(action: Callable[[], Any]) -> Any:
    """Run ``action``: its result, or None after a BlasphemerError; any other exception fails."""
    try:
        return action()
    except BlasphemerError as error:
        assert "\n" not in str(error), str(error)
        return None


def _load_and_split(path: Path, column: str | None) -> None:
    prompt_set = load_prompt_set(str(path), column=column)
    assert len(prompt_set) > 0 and all(p.text.strip() for p in prompt_set.prompts)
    split_prompt_set(prompt_set)


# --- prompt files -------------------------------------------------------------------------------


@FUZZ
@given(
    content=st.binary(max_size=2000),
    suffix=st.sampled_from(SUFFIXES),
    column=st.none() | columns,
)
def test_prompt_files_of_random_bytes(content: bytes, suffix: str, column: str | None) -> None:
    with _file(f"prompts{suffix}", content) as path:
        _result_or_blasphemer_error(lambda: _load_and_split(path, column))


@FUZZ
@given(
    value=json_values,
    suffix=st.sampled_from((".json", ".jsonl", ".csv", ".txt")),
    encoding=st.sampled_from(ENCODINGS),
    column=st.none() | columns,
)
def test_prompt_files_of_random_structure_and_encoding(
    value: Any, suffix: str, encoding: str, column: str | None
) -> None:
    if suffix == ".jsonl" and isinstance(value, list):
        text = "\n".join(json.dumps(item, ensure_ascii=False) for item in value)
    elif suffix == ".csv" and isinstance(value, list):
        text = "\n".join(
            ",".join(map(str, row)) if isinstance(row, list) else str(row) for row in value
        )
    else:
        text = json.dumps(value, ensure_ascii=False)
    content = text.encode(encoding, errors="replace")
    with _file(f"prompts{suffix}", content) as path:
        _result_or_blasphemer_error(lambda: _load_and_split(path, column))


@FUZZ
@given(
    rows=st.lists(
        st.dictionaries(
            st.sampled_from(["text", "prompt", "category", "other"]),
            st.none() | st.integers() | texts | st.lists(st.integers(), max_size=3),
            max_size=3,
        ),
        max_size=12,
    ),
    column=st.none() | columns,
)
def test_parquet_files_of_random_columns(rows: list[dict[str, Any]], column: str | None) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "prompts.parquet"
        try:
            table = pa.Table.from_pylist(rows)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            return  # rows pyarrow itself cannot put in one table
        pq.write_table(table, path)
        _result_or_blasphemer_error(lambda: _load_and_split(path, column))


@settings(max_examples=8, deadline=None, database=None)
@given(
    length=st.integers(min_value=10_000, max_value=300_000),
    suffix=st.sampled_from((".txt", ".jsonl", ".csv")),
)
def test_huge_lines(length: int, suffix: str) -> None:
    line = "x" * length
    content = {
        ".txt": f"{line}\nshort\nthird\n",
        ".jsonl": json.dumps({"text": line}) + '\n{"text": "b"}\n{"text": "c"}\n',
        ".csv": f"text\n{line}\nb\nc\n",
    }[suffix]
    with _file(f"prompts{suffix}", content.encode()) as path:
        _result_or_blasphemer_error(lambda: _load_and_split(path, None))


# --- settings: TOML files and the environment ---------------------------------------------------

toml_keys = st.sampled_from(sorted(Settings.model_fields)) | st.text(string.ascii_lowercase + "_")
toml_scalars = (
    st.booleans()
    | st.integers(min_value=-(2**40), max_value=2**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts
)
toml_values = toml_scalars | st.lists(toml_scalars, max_size=4)


def _toml_line(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return f"{key} = {'true' if value else 'false'}"
    if isinstance(value, list):
        return f"{key} = [{', '.join(_toml_line('x', v)[4:] for v in value)}]"
    return f"{key} = {json.dumps(value)}"


@FUZZ
@given(content=st.binary(max_size=500) | texts.map(str.encode))
def test_toml_settings_of_random_bytes(content: bytes) -> None:
    with _file("settings.toml", content) as path:
        _result_or_blasphemer_error(lambda: load_settings({}, path))


@FUZZ
@given(entries=st.dictionaries(toml_keys, toml_values, max_size=6))
def test_toml_settings_of_random_values(entries: dict[str, Any]) -> None:
    text = "\n".join(_toml_line(json.dumps(k) if k else '""', v) for k, v in entries.items())
    with _file("settings.toml", text.encode()) as path:
        _result_or_blasphemer_error(lambda: load_settings({}, path))


@FUZZ
@given(name=st.sampled_from(sorted(Settings.model_fields)), value=texts)
def test_environment_values(name: str, value: str) -> None:
    variable = f"BLASPHEMER_{name.upper()}"
    value = value.replace("\x00", "")  # the environment cannot hold NUL
    saved = os.environ.get(variable)
    os.environ[variable] = value
    try:
        _result_or_blasphemer_error(lambda: load_settings({}))
    finally:
        if saved is None:
            del os.environ[variable]
        else:
            os.environ[variable] = saved


# --- --select rules -----------------------------------------------------------------------------

RESULTS = [
    TrialResult(number=n, values=(r, k), parameters=None)
    for n, (r, k) in enumerate([(0.0, 0.3), (0.02, 0.1), (0.5, 0.01)])
]
rule_texts = texts | st.builds(
    lambda head, op, number, unit: f"{head}:{op}{number}{unit}",
    st.sampled_from(["lowest-kl", "lowest-refusals", "knee", "best", ""]),
    st.sampled_from(["refusals<=", "kl<=", "refusals<", "kl>=", "", "refusals<=-"]),
    st.floats(allow_nan=True, allow_infinity=True).map(str) | st.integers().map(str),
    st.sampled_from(["", "%", " %", "e5"]),
)


@FUZZ
@given(text=rule_texts)
def test_select_rules(text: str) -> None:
    rule = _result_or_blasphemer_error(lambda: parse_rule(text))
    if rule is not None:
        chosen = _result_or_blasphemer_error(lambda: rule.select(RESULTS))
        assert chosen is None or chosen in RESULTS


# --- architecture override files and GGUF headers -----------------------------------------------

override_docs = st.dictionaries(
    st.sampled_from(["name", "layers", "embeddings", "writers", "extra"]),
    json_values
    | st.lists(
        st.dictionaries(
            st.sampled_from(
                [
                    "kind",
                    "module",
                    "layout",
                    "weight",
                    "bias",
                    "optional",
                    "post_norm",
                    "post_norm_offset",
                    "oops",
                ]
            ),
            json_values | st.sampled_from(["attention", "mlp", "out_in", "in_out", "o_proj"]),
            max_size=6,
        ),
        max_size=3,
    ),
    max_size=5,
)


@FUZZ
@given(document=override_docs, as_json=st.booleans())
def test_override_files_of_random_structure(document: dict[str, Any], as_json: bool) -> None:
    text = (
        json.dumps(document)
        if as_json
        else "\n".join(_toml_line(json.dumps(k), v) for k, v in document.items())
    )
    with _file("override.json" if as_json else "override.toml", text.encode()) as path:
        _result_or_blasphemer_error(lambda: load_override(path))


@FUZZ
@given(content=st.binary(max_size=1000), suffix=st.sampled_from((".toml", ".json")))
def test_override_files_of_random_bytes(content: bytes, suffix: str) -> None:
    with _file(f"override{suffix}", content) as path:
        _result_or_blasphemer_error(lambda: load_override(path))


@FUZZ
@given(
    content=st.binary(max_size=600)
    | st.binary(max_size=600).map(lambda tail: b"GGUF\x03\x00\x00\x00" + tail)
)
def test_gguf_headers_of_random_bytes(content: bytes) -> None:
    with _file("model.gguf", content) as path:
        _result_or_blasphemer_error(lambda: check_loadable(read_header(path)))
