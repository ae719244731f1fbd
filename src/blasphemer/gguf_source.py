"""GGUF files as model sources: where the file is, and whether transformers can load it.

A model given as ``model.gguf`` (or a folder / hub repository plus ``--gguf-file NAME``) is
loaded through transformers' GGUF support, which dequantises every tensor into plain float
layers. Before that costs a minute and gigabytes, :func:`read_header` reads only the header
(metadata and tensor table, not the tensor data) and :func:`check_loadable` turns everything
that would fail later into one :class:`~blasphemer.errors.ModelLoadError` line: not a GGUF at
all, truncated, split into several files, an architecture or tensor type transformers cannot
dequantise. The source file is only ever opened for reading.
"""

from __future__ import annotations

import hashlib
import mmap
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from blasphemer.errors import ModelLoadError

GGUF_SUFFIX = ".gguf"
_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32

# Architectures transformers 5.x dequantises into a decoder we can edit (its
# GGUF_SUPPORTED_ARCHITECTURES, less the encoder-decoder and state-space ones).
SUPPORTED_ARCHITECTURES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen2moe",
    "qwen3",
    "qwen3moe",
    "gemma2",
    "gemma3",
    "phi3",
    "falcon",
    "stablelm",
    "starcoder2",
    "nemotron",
    "gpt2",
    "bloom",
    "deci",
    "gpt-oss",
    "lfm2",
)

# ggml tensor type id -> (name, elements per block, bytes per block). Types gguf's numpy
# dequantiser handles; anything else (an unknown id from a newer llama.cpp) is refused early.
_TENSOR_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}

# GGUF metadata value types: id -> struct format of a scalar (8 = string, 9 = array).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?"}
_SCALARS.update({10: "<Q", 11: "<q", 12: "<d"})
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GgufSource:
    """A GGUF model file: the folder (or hub repository) and the file name within it."""

    location: str  # local folder or hub repository id, what from_pretrained takes
    filename: str

    @property
    def local_path(self) -> Path | None:
        """The file on disk, or None when it lives in a hub repository."""
        path = Path(self.location).expanduser() / self.filename
        return path if path.is_file() else None

    def describe(self) -> str:
        return str(Path(self.location) / self.filename)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    type_id: int
    offset: int  # from the start of the tensor data section

    @property
    def type_name(self) -> str:
        known = _TENSOR_TYPES.get(self.type_id)
        if known:
            return known[0]
        try:  # a type llama.cpp knows but the dequantiser does not (Q8_1, Q8_K, ...)
            from gguf import GGMLQuantizationType

            return GGMLQuantizationType(self.type_id).name
        except (ImportError, ValueError):
            return f"type {self.type_id}"

    @property
    def n_elements(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count

    @property
    def n_bytes(self) -> int | None:
        known = _TENSOR_TYPES.get(self.type_id)
        if known is None:
            return None
        _, block, size = known
        return self.n_elements // block * size


@dataclass(frozen=True)
class GgufHeader:
    """What the header of a GGUF file says: metadata scalars and strings, and its tensors."""

    path: Path
    version: int
    metadata: dict[str, object]  # arrays are summarised as their length
    tensors: tuple[TensorInfo, ...]
    data_start: int
    file_size: int

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "?"))

    @property
    def n_parameters(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def tensor_types(self) -> list[str]:
        return sorted({t.type_name for t in self.tensors})

    @property
    def has_chat_template(self) -> bool:
        return "tokenizer.chat_template" in self.metadata

    @property
    def split_count(self) -> int:
        return int(str(self.metadata.get("split.count", 1)))


def is_gguf_name(name: str) -> bool:
    return name.lower().endswith(GGUF_SUFFIX)


def resolve_source(model: str, gguf_file: str | None) -> GgufSource | None:
    """The GGUF source named by ``model`` (a ``.gguf`` path) or ``model`` + ``gguf_file``.

    None when neither names a GGUF. A ``.gguf`` path that does not exist, a ``--gguf-file``
    missing from a local folder, or ``--gguf-file`` next to a ``.gguf`` path raise one line.
    """
    path = Path(model).expanduser()
    if is_gguf_name(model) and not path.is_dir():
        if gguf_file is not None:
            raise ModelLoadError(
                f"{model} is already a GGUF file; drop --gguf-file or pass the folder instead"
            )
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {model} does not exist; check the path")
        return GgufSource(str(path.parent), path.name)
    if gguf_file is None:
        return None
    if Path(gguf_file).name != gguf_file:
        raise ModelLoadError(
            f"--gguf-file {gguf_file!r} must be a file name inside {model}, not a path"
        )
    if path.is_dir() and not (path / gguf_file).is_file():
        present = sorted(p.name for p in path.glob("*.gguf"))
        hint = f"files there: {', '.join(present)}" if present else "the folder holds no .gguf"
        raise ModelLoadError(f"--gguf-file {gguf_file} is not in {model} ({hint})")
    return GgufSource(model, gguf_file)


def read_header(path: Path) -> GgufHeader:
    """Parse the header of ``path`` without reading tensor data (memory-mapped, read-only).

    Raises :class:`ModelLoadError` naming the file when it is not a GGUF or the header is cut.
    """
    try:
        with path.open("rb") as handle:
            size = path.stat().st_size
            if size < 24:
                raise _not_gguf(path, "too short")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
                return _parse(path, view, size)
    except OSError as error:
        raise ModelLoadError(
            f"cannot read {path} ({error.strerror or error}); check the path and permissions"
        ) from None


def check_loadable(header: GgufHeader) -> None:
    """Raise one line if transformers could not load this GGUF as a model we can edit."""
    path = header.path
    if header.split_count > 1:
        raise ModelLoadError(
            f"{path} is part of a split GGUF ({header.split_count} files); merge it first with "
            "llama.cpp's llama-gguf-split --merge, then pass the merged file"
        )
    architecture = header.architecture
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: GGUF architecture {architecture!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    unknown = sorted({t.type_name for t in header.tensors if t.type_id not in _TENSOR_TYPES})
    if unknown:
        known = ", ".join(sorted(name for name, _, _ in _TENSOR_TYPES.values()))
        raise ModelLoadError(
            f"{path}: tensor types {', '.join(unknown)} cannot be dequantised; supported: {known}"
        )
    end = max((header.data_start + t.offset + (t.n_bytes or 0) for t in header.tensors), default=0)
    if end > header.file_size:
        raise ModelLoadError(
            f"{path} is truncated ({header.file_size:,} bytes, its tensors need {end:,}); "
            "download or copy it again"
        )


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _not_gguf(path: Path, why: str) -> ModelLoadError:
    return ModelLoadError(
        f"{path} is not a valid GGUF file ({why}); pass a .gguf written by llama.cpp or gguf-py"
    )


class _Cursor:
    """Little-endian reads from a memory map; running past the end means a cut header."""

    def __init__(self, path: Path, view: mmap.mmap, size: int) -> None:
        self.path, self.view, self.size, self.at = path, view, size, 0

    def take(self, count: int) -> bytes:
        if count < 0 or self.at + count > self.size:
            raise _not_gguf(self.path, f"header ends early at byte {self.at:,}")
        chunk = self.view[self.at : self.at + count]
        self.at += count
        return chunk

    def unpack(self, fmt: str) -> int | float | bool:
        value: int | float | bool = struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]
        return value

    def count(self) -> int:
        return int(self.unpack("<Q"))

    def string(self) -> str:
        raw = self.take(self.count())
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        self.take(self.count())


def _parse(path: Path, view: mmap.mmap, size: int) -> GgufHeader:
    cursor = _Cursor(path, view, size)
    if cursor.take(4) != _MAGIC:
        raise _not_gguf(path, "no GGUF magic bytes")
    version = int(cursor.unpack("<I"))
    if version not in _VERSIONS:
        raise _not_gguf(path, f"GGUF version {version}, readable: {_VERSIONS}")
    n_tensors, n_fields = cursor.count(), cursor.count()
    if n_tensors > size or n_fields > size:
        raise _not_gguf(path, "impossible tensor or field count")
    metadata = dict(_fields(cursor, n_fields))
    tensors = tuple(_tensor(cursor) for _ in range(n_tensors))
    alignment = int(str(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))) or 1
    data_start = -(-cursor.at // alignment) * alignment
    return GgufHeader(path, version, metadata, tensors, data_start, size)


def _fields(cursor: _Cursor, count: int) -> Iterator[tuple[str, object]]:
    for _ in range(count):
        key = cursor.string()
        kind = int(cursor.unpack("<I"))
        yield key, _value(cursor, kind)


def _value(cursor: _Cursor, kind: int) -> object:
    if kind == _STRING:
        return cursor.string()
    if kind in _SCALARS:
        return cursor.unpack(_SCALARS[kind])
    if kind == _ARRAY:
        inner, length = int(cursor.unpack("<I")), cursor.count()
        _skip_array(cursor, inner, length)
        return length
    raise _not_gguf(cursor.path, f"unknown metadata value type {kind}")


def _skip_array(cursor: _Cursor, inner: int, length: int) -> None:
    if inner in _SCALARS:
        cursor.take(struct.calcsize(_SCALARS[inner]) * length)
    elif inner == _STRING:
        for _ in range(length):
            cursor.skip_string()
    elif inner == _ARRAY:
        for _ in range(length):
            _value(cursor, _ARRAY)
    else:
        raise _not_gguf(cursor.path, f"unknown array element type {inner}")


def _tensor(cursor: _Cursor) -> TensorInfo:
    name = cursor.string()
    n_dims = int(cursor.unpack("<I"))
    if n_dims > 8:
        raise _not_gguf(cursor.path, f"tensor {name} has {n_dims} dimensions")
    shape = tuple(cursor.count() for _ in range(n_dims))
    type_id = int(cursor.unpack("<I"))
    return TensorInfo(name, shape, type_id, cursor.count())
