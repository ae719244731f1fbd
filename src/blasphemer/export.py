"""Save the chosen edit as a normal model folder, atomically.

:func:`save_merged` writes the ablation into the weights, saves the model (sharded safetensors)
with its tokenizer and a model card into a temporary folder beside the target, renames that
folder into place, and then puts the original weights back: the in-memory model stays usable
for further exports or evaluation. Only the edited writer tensors are copied (to CPU) for that.
:func:`write_text_atomic` writes any other file whole or not at all. The model card,
``results.json`` and the upload live in :mod:`blasphemer.app.results`.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import psutil
import torch

from blasphemer import __version__
from blasphemer.architectures.base import ModelMap
from blasphemer.editing import Ablation
from blasphemer.errors import ExportError


class LoadedLike(Protocol):
    """What export needs of :class:`blasphemer.loading.LoadedModel`."""

    model: Any
    tokenizer: Any
    model_id: str
    processor: Any | None


# --- output folder checks -----------------------------------------------------------------------


def _source_dirs(loaded: LoadedLike) -> list[Path]:
    # Model folders only: the folder that merely holds a source .gguf file is no model folder.
    names = [loaded.model_id, getattr(loaded.model, "name_or_path", None)]
    folders = [Path(n).expanduser() for n in names if n]
    return [f.resolve() for f in folders if (f / "config.json").is_file()]


def check_output_dir(output_dir: Path, source_dirs: Sequence[Path] = ()) -> Path:
    """Resolve ``output_dir`` and refuse places that would overwrite or nest in the source model.

    Raises :class:`ExportError` when the target is a source folder, lies inside one, contains
    one, or is an existing file. The one output-folder rule: preflight adds only the checks that
    need the disk (writable, free space).
    """
    target = Path(output_dir).expanduser().resolve()
    for source in source_dirs:
        source = source.resolve()
        if target == source or source in target.parents or target in source.parents:
            raise ExportError(
                f"--output-dir {output_dir} overlaps the source model folder {source} (is it, "
                "lies inside it or holds it); choose a folder outside it"
            )
    if target.exists() and not target.is_dir():
        raise ExportError(f"--output-dir {output_dir} is a file; choose a folder path")
    return target


OUTPUT_MARKER = ".blasphemer-output"  # in every saved folder: a later run may replace it
_LEFTOVER_KINDS = ("partial", "old")  # staging folders and replaced outputs beside a target


def is_blasphemer_output(folder: Path) -> bool:
    """True when ``folder`` was written by :func:`save_merged` (so a new save may replace it)."""
    return (folder / OUTPUT_MARKER).is_file() or (folder / "results.json").is_file()


def _leftover_prefix(target: Path, kind: str, pid: int | None = None) -> str:
    return f".{target.name}.{kind}-" + ("" if pid is None else f"{pid}-")


def clean_leftovers(target: Path) -> list[Path]:
    """Remove the staging and replaced folders that killed saves left beside ``target``.

    A save stages into ``.NAME.partial-PID-*`` (and moves a replaced output to
    ``.NAME.old-PID-*``); a process killed meanwhile leaves them behind. Folders of processes
    that are still running are kept (they may be saving right now). Returns what was removed.
    """
    removed: list[Path] = []
    if not target.parent.is_dir():
        return removed
    for kind in _LEFTOVER_KINDS:
        prefix = _leftover_prefix(target, kind)
        for path in target.parent.glob(f"{glob.escape(prefix)}*"):
            pid_text = path.name.removeprefix(prefix).partition("-")[0]
            alive = pid_text.isdigit() and psutil.pid_exists(int(pid_text))
            if path.is_dir() and not alive:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


@contextmanager
def _staging_dir(target: Path) -> Iterator[Path]:
    """A fresh temporary folder beside ``target`` (same filesystem, so the rename is atomic)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(target)
        prefix = _leftover_prefix(target, "partial", os.getpid())
        staging = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    except OSError as error:
        raise ExportError(
            f"cannot write to {target}: {error.strerror or error}; choose a writable --output-dir"
        ) from None
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_into_place(staging: Path, target: Path, overwrite: bool) -> None:
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise ExportError(
                f"output folder {target} is not empty; choose another --output-dir or remove it"
            )
        prefix = _leftover_prefix(target, "old", os.getpid())
        old = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
        os.replace(target, old / target.name)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
        return
    if target.is_dir():
        target.rmdir()
    os.replace(staging, target)


# --- merge and save -----------------------------------------------------------------------------


def save_merged(
    loaded: LoadedLike,
    model_map: ModelMap,
    edit: Ablation,
    output_dir: Path,
    *,
    card: str | None = None,
    max_shard_size: str = "5GB",
    overwrite: bool = False,
) -> Path:
    """Save ``loaded``'s model with ``edit`` merged into its weights. Returns the folder.

    The folder appears complete or not at all (staged beside it, then renamed). With
    ``overwrite`` a non-empty existing folder is replaced; without it that is an ExportError, so
    call this before writing ``results.json`` or a report into the same folder. Afterwards the
    in-memory model holds its original weights again, bit for bit.
    """
    if getattr(loaded.model, "hf_quantizer", None) is not None:
        raise ExportError(
            "cannot merge into quantised weights; export from a model loaded with "
            "--quantization none"
        )
    target = check_output_dir(output_dir, _source_dirs(loaded))
    if not overwrite and target.is_dir() and any(target.iterdir()):
        raise ExportError(
            f"output folder {target} is not empty; choose another --output-dir or remove it"
        )
    originals = [(t, t.detach().to("cpu", copy=True)) for t in edit.edited_tensors(model_map)]
    with _staging_dir(target) as staging:
        try:
            edit.merge(model_map)
            loaded.model.save_pretrained(staging, max_shard_size=max_shard_size)
            loaded.tokenizer.save_pretrained(staging)
            if loaded.processor is not None:
                loaded.processor.save_pretrained(staging)
            if card is not None:
                (staging / "README.md").write_text(card, encoding="utf-8")
            (staging / OUTPUT_MARKER).write_text(f"blasphemer {__version__}\n", encoding="utf-8")
            _move_into_place(staging, target, overwrite)
        except OSError as error:
            raise ExportError(
                f"writing {target} failed: {error.strerror or error}; check free disk space and "
                "permissions of --output-dir"
            ) from None
        finally:
            with torch.no_grad():
                for tensor, original in originals:
                    tensor.copy_(original)
    return target


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename: whole or not at all."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            "w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.", delete=False
        ) as handle:
            handle.write(text)
        os.replace(handle.name, path)
    except OSError as error:
        raise ExportError(
            f"cannot write {path}: {error.strerror or error}; choose a writable --output-dir"
        ) from None
    return path
