"""Checks before anything heavy is loaded: does the model exist, fit, and can we write?

A run that would die an hour in for lack of memory or disk, or that would write over its own
source, stops here with one line saying what to change.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psutil
import sqlalchemy
import torch
from safetensors import SafetensorError, safe_open
from sqlalchemy.pool import NullPool

from blasphemer import export, gguf_source
from blasphemer.errors import ConfigError, ExportError, ModelLoadError, StorageError
from blasphemer.optimization.storage import error_line, normalize_url, redact_url

_BYTES_PER_DTYPE = {"float32": 4, "float16": 2, "bfloat16": 2}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_HEADROOM = 1.15  # activations, KV cache and allocator slack on top of the weights
STORAGE_TIMEOUT_S = 3  # per connect attempt (libpq may retry once without SSL); a live
# database answers in well under a second
_SQLITE_MAGIC = b"SQLite format 3\x00"


@dataclass(frozen=True)
class MemoryEstimate:
    """What the run needs next to what the machine has, in bytes."""

    weights_on_disk: int
    weights_in_memory: int
    ram_available: int
    disk_available: int | None
    gpu_available: int = 0  # free memory of every GPU the device map may use

    @property
    def memory_available(self) -> int:
        """RAM plus GPU memory: weights that do not fit on the GPUs are offloaded to RAM."""
        return self.ram_available + self.gpu_available

    def summary(self) -> str:
        def gib(n: int) -> str:
            return f"{n / 2**30:.2f} GiB"

        needed, free = gib(self.weights_in_memory), gib(self.memory_available)
        if not self.gpu_available:
            return f"weights {needed} in memory; available {free} (RAM)"
        return (
            f"weights {needed} in memory; available {free} "
            f"(GPU {gib(self.gpu_available)} + RAM {gib(self.ram_available)})"
        )


def is_local_model(model: str) -> bool:
    """True when ``model`` names a local path rather than a hub id."""
    path = Path(model).expanduser()
    return path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1


def check_model_path(model: str) -> Path | None:
    """Local folder of ``model`` (None for a hub id); raises if a local path is unusable."""
    if not is_local_model(model):
        return None
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {model} does not exist; pass a model folder or a hub id")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ModelLoadError(
            f"{model} is not a model folder (no config.json); pass the folder save_pretrained wrote"
        )
    check_config_file(path / "config.json")
    return path.resolve()


def check_judge(judge: str, search_judge: str, encoder: str) -> None:
    """The semantic judge, when ``--judge`` or ``--search-judge`` asks for it: its shipped file
    loads, and a local ``--judge-encoder`` is a model folder. A run first reads them after its
    trials, so a bad path would otherwise fail only at the end."""
    if judge == "markers" and search_judge == "markers":
        return
    from blasphemer.evaluation.semantic import default_head, load_head

    load_head(default_head())
    if is_local_model(encoder) and not (Path(encoder).expanduser() / "config.json").is_file():
        raise ConfigError(
            f"--judge-encoder {encoder} is not a model folder (no config.json); pass a folder "
            "holding sentence-transformers/all-MiniLM-L6-v2, or --judge markers"
        )


def check_config_file(path: Path) -> None:
    """Refuse a ``config.json`` that is unreadable, not UTF-8 JSON, or not a JSON object."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        reason = " ".join(str(error).split())[:160]
        raise ModelLoadError(
            f"cannot read {path} as JSON ({reason}); restore the file or download the model again"
        ) from None
    if not isinstance(config, dict):
        raise ModelLoadError(
            f"{path} holds a JSON {type(config).__name__}, not a config object; restore the file "
            "or download the model again"
        )


def check_weight_files(folder: Path) -> None:
    """Refuse a model folder whose ``*.safetensors`` headers are corrupt or truncated.

    Reads only each file's header (and checks it covers the file), not the tensors.
    """
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as error:
            reason = " ".join(str(error).split())[:200]
            raise ModelLoadError(
                f"weight file {path} is corrupt or truncated ({reason}); download the model again"
            ) from None


def check_gguf(model: str, gguf_file: str | None) -> gguf_source.GgufHeader | None:
    """The checked header of a local GGUF source, None for other models (or a hub GGUF).

    Raises one line when the file is missing, not a GGUF, truncated, split, or of an
    architecture or tensor type that cannot be loaded.
    """
    source = gguf_source.resolve_source(model, gguf_file)
    path = None if source is None else source.local_path
    if path is None:
        return None
    header = gguf_source.read_header(path)
    gguf_source.check_loadable(header)
    return header


def estimate_gguf(
    header: gguf_source.GgufHeader, dtypes: list[str], device_map: str, quantization: str
) -> MemoryEstimate:
    """Memory for a GGUF dequantised into the first requested dtype ("auto" is float32)."""
    wanted = next((d for d in dtypes if d != "auto"), "float32") if dtypes[0] != "auto" else None
    in_memory = header.n_parameters * _BYTES_PER_DTYPE[wanted or "float32"]
    return MemoryEstimate(
        weights_on_disk=in_memory,  # the saved safetensors folder holds the dequantised weights
        weights_in_memory=int(in_memory * _HEADROOM),
        ram_available=int(psutil.virtual_memory().available),
        disk_available=None,
        gpu_available=gpu_memory_available(device_map),
    )


def weights_size(folder: Path) -> int:
    """Bytes of the weight files in a model folder."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES)


def checkpoint_dtype_bytes(folder: Path) -> int:
    """Bytes per parameter as stored in the checkpoint (from config.json; 2 if unknown)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return 2
    if not isinstance(config, dict):
        return 2
    dtype = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    return _BYTES_PER_DTYPE.get(str(dtype), 2)


def gpu_memory_available(device_map: str) -> int:
    """Free bytes on every CUDA device, or 0 when forced to CPU or without CUDA."""
    if device_map == "cpu" or not torch.cuda.is_available():
        return 0
    return sum(int(torch.cuda.mem_get_info(i)[0]) for i in range(torch.cuda.device_count()))


def estimate(folder: Path, dtypes: list[str], device_map: str, quantization: str) -> MemoryEstimate:
    """Estimate the memory the run needs for the first dtype it will try."""
    on_disk = weights_size(folder)
    stored = checkpoint_dtype_bytes(folder)
    wanted = next((d for d in dtypes if d != "auto"), None) if dtypes[0] != "auto" else None
    factor = _BYTES_PER_DTYPE[wanted] / stored if wanted else 1.0
    if quantization == "bnb_4bit":
        factor = 0.5 / stored * 1.1
    return MemoryEstimate(
        weights_on_disk=on_disk,
        weights_in_memory=int(on_disk * factor * _HEADROOM),
        ram_available=int(psutil.virtual_memory().available),
        disk_available=None,
        gpu_available=gpu_memory_available(device_map),
    )


def check_memory(memory: MemoryEstimate, dtypes: list[str]) -> None:
    """Raise with the option that would fit when the weights cannot fit in memory."""
    if memory.weights_in_memory <= memory.memory_available:
        return
    hint = (
        "use --quantization bnb_4bit on a CUDA machine"
        if torch.cuda.is_available()
        else "use a machine with more memory or --dtypes bfloat16"
    )
    if "float32" in dtypes[:1]:
        hint = "try --dtypes bfloat16 (half the memory of float32)"
    raise ModelLoadError(f"the model will not fit: {memory.summary()}; {hint}")


def _writable(folder: Path) -> bool:
    """Probe by creating (and removing) a file: permission bits lie for root and RO mounts."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".blasphemer-probe-"):
            return True
    except OSError:
        return False


def check_output_dir(output_dir: Path, source: Path | None, needed_bytes: int) -> None:
    """Refuse an output folder that overlaps the source (:func:`export.check_output_dir`'s
    rule), is unwritable, or is on a disk without room for the weights."""
    target = export.check_output_dir(output_dir, [source] if source is not None else [])
    existing = next((p for p in (target, *target.parents) if p.exists()), None)
    if existing is None or not _writable(existing):
        raise ExportError(
            f"cannot write to --output-dir {output_dir} (no permission); choose a writable folder"
        )
    free = shutil.disk_usage(existing).free
    if needed_bytes > free:
        raise ExportError(
            f"not enough disk for --output-dir {output_dir}: need {needed_bytes / 2**30:.2f} GiB, "
            f"{free / 2**30:.2f} GiB free; free space or choose another disk"
        )


def check_storage_url(url: str) -> None:
    """Refuse a ``--storage`` URL that no installed database dialect understands.

    Checked before the model is loaded, so a typo in the scheme fails in seconds; reachability
    and drivers are checked when the study is opened.
    """
    try:
        sqlalchemy.engine.make_url(normalize_url(url)).get_dialect()
    except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError):
        raise StorageError(
            f"cannot use storage URL {redact_url(url)!r}; use sqlite:///path/study.db or "
            "postgresql://user@host/database"
        ) from None


def nearest_existing(path: Path) -> Path | None:
    """``path`` itself or its closest ancestor that exists (None only for odd relative paths)."""
    return next((p for p in (path, *path.parents) if p.exists()), None)


def check_writable_folder(folder: Path, option: str) -> None:
    """Refuse a folder Blasphemer must create or write into: a file, or not writable.

    Nothing is created: the closest existing ancestor is probed instead of the folder itself.
    """
    target = folder.expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{option} {folder} is a file; choose a folder path")
    existing = nearest_existing(target)
    if existing is None or not existing.is_dir() or not _writable(existing):
        raise ConfigError(
            f"cannot write to {option} {folder} (no permission); choose a writable folder"
        )


def check_storage(url: str, timeout_s: float = STORAGE_TIMEOUT_S) -> None:
    """Refuse a ``--storage`` that cannot hold the study, in seconds and without creating it.

    The URL must name an installed dialect; an SQLite file must lie in a writable folder (and
    be an SQLite database if it exists); any other database must accept a connection within
    ``timeout_s`` seconds. Errors are one line and never show the password.
    """
    check_storage_url(url)
    parsed = sqlalchemy.engine.make_url(normalize_url(url))
    if parsed.get_backend_name() == "sqlite":
        _check_sqlite_file(url, parsed.database)
    else:
        _check_connect(url, timeout_s)


def _check_sqlite_file(url: str, database: str | None) -> None:
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database).expanduser()
    shown = redact_url(url)
    if path.is_dir():
        raise StorageError(f"storage {shown} names a folder; end the URL with a file name")
    if path.exists():
        try:
            with path.open("rb") as handle:
                head = handle.read(len(_SQLITE_MAGIC))
        except OSError as error:
            raise StorageError(
                f"cannot read storage file {path}: {error.strerror}; check its permissions"
            ) from None
        if head and head != _SQLITE_MAGIC:
            raise StorageError(
                f"storage file {path} is not an SQLite database; choose another --storage path"
            )
        if not os.access(path, os.W_OK):
            raise StorageError(f"storage file {path} is read-only; make it writable")
    existing = nearest_existing(path.absolute().parent)
    if existing is None or not existing.is_dir() or not _writable(existing):
        raise StorageError(
            f"cannot create storage {shown}: folder {path.parent} is not writable; "
            "choose a writable --run-dir or --storage path"
        )


def _check_connect(url: str, timeout_s: float) -> None:
    normalized = normalize_url(url)
    shown = redact_url(url)
    backend = sqlalchemy.engine.make_url(normalized).get_backend_name()
    connect_args = {"connect_timeout": max(1, round(timeout_s))} if backend == "postgresql" else {}
    try:
        engine = sqlalchemy.create_engine(normalized, connect_args=connect_args, poolclass=NullPool)
    except ImportError:
        raise StorageError(
            f"no database driver for {shown}; install it: pip install 'blasphemer[postgres]'"
        ) from None
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")
    except sqlalchemy.exc.DBAPIError as error:
        raise StorageError(
            f"cannot reach study storage {shown}: {error_line(error.orig or error, url)}; start "
            "the database, check host, port, user and password, or use another --storage"
        ) from None
    finally:
        engine.dispose()
