"""Write a saved transformers model as one GGUF file for llama.cpp and friends.

Two modes, one entry point, :func:`export_gguf`:

* **From safetensors** (``source_gguf=None``): every tensor of the saved folder is converted
  to llama.cpp's names and layout and stored as ``f16``, ``bf16`` or ``q8_0`` (1-D tensors
  such as norms and biases stay F32; a matrix whose rows do not fit Q8_0's 32-value blocks
  falls back to F16). Architecture metadata comes from ``config.json``, the tokenizer from
  ``tokenizer.json``/``tokenizer_config.json`` and the chat template (see
  :mod:`blasphemer.gguf_metadata`).
* **From a source GGUF** (the model was loaded from that file and then edited): the source's
  metadata (tokenizer and chat template included) and tensors are copied. A tensor whose
  values equal the source's dequantized values stays byte-identical; an edited one is
  quantized again in its source type when the ``gguf`` package can produce that type (F32,
  F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), otherwise in the fallback type (``type`` when
  given, else ``q8_0``; F16 when the row length does not fit the fallback's block size).

Tensors are streamed: one safetensors tensor (and one dequantized source tensor) is in
memory at a time. The file is written beside the target under a temporary name, fsynced and
renamed into place, so a failed export leaves nothing behind. Library code: no printing;
every failure is an :class:`~blasphemer.errors.ExportError` with a one-line message.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import (
    GGMLQuantizationType,
    GGUFReader,
    GGUFValueType,
    GGUFWriter,
    LlamaFileType,
)

from blasphemer.errors import ExportError
from blasphemer.gguf_metadata import (
    ArchSpec,
    Field,
    arch_spec,
    general_metadata,
    llama3_rope_factors,
    model_metadata,
)
from blasphemer.gguf_tensors import (
    SavedWeights,
    block_order,
    gguf_names,
    n_bytes,
    quantize_rows,
    rewrite_type,
    source_tensor_unchanged,
    storage_type,
    to_gguf_layout,
)
from blasphemer.gguf_tokenizer import read_tokenizer, tokenizer_metadata

Q = GGMLQuantizationType
EXPORT_TYPES: dict[str, Q] = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}
FILE_TYPES = {"f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16}
FILE_TYPES["q8_0"] = LlamaFileType.MOSTLY_Q8_0


@dataclass(frozen=True)
class TensorNote:
    """One tensor of the written file: GGUF name, ggml type name, and how it got there.

    ``action`` is ``converted`` (from safetensors), ``copied`` (source bytes, unchanged) or
    ``rewritten`` (edited relative to the source, quantized again).
    """

    name: str
    type: str
    action: str


@dataclass(frozen=True)
class GgufExportResult:
    """What :func:`export_gguf` wrote. ``type`` is the requested type (the fallback type in
    source mode); ``notes`` lists caveats such as an unrecognised pre-tokenizer."""

    path: Path
    type: str
    sha256: str
    n_tensors: int
    tensors: tuple[TensorNote, ...]
    source: Path | None = None
    notes: tuple[str, ...] = ()

    @property
    def rewritten(self) -> tuple[TensorNote, ...]:
        """The tensors re-quantized because they differ from the source GGUF."""
        return tuple(t for t in self.tensors if t.action == "rewritten")


def _read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise ExportError(f"{model_dir} has no config.json; pass a folder saved by save_pretrained")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ExportError(f"{path} is not valid JSON ({exc}); save the model again") from exc
    if not isinstance(config, dict):
        raise ExportError(f"{path} is not a JSON object; save the model again")
    return config


# --- writing --------------------------------------------------------------------------------


def _add_fields(writer: GGUFWriter, fields: list[Field]) -> None:
    for field in fields:
        writer.add_key_value(field.key, field.value, field.type, field.sub_type)


def _write_safetensors(
    writer_path: Path, model_dir: Path, config: Mapping[str, Any], spec: ArchSpec, wanted: str
) -> tuple[list[TensorNote], list[str]]:
    tokenizer = read_tokenizer(model_dir, config)
    name = str(config.get("_name_or_path") or model_dir.name) or model_dir.name
    fields = general_metadata(Path(name).name or name, int(FILE_TYPES[wanted]))
    fields += model_metadata(config, spec) + tokenizer_metadata(tokenizer)
    with ExitStack() as stack:
        weights = SavedWeights(model_dir, stack)
        mapping = {k: v for k, v in gguf_names(weights.names(), spec, config).items() if v}
        order = sorted(mapping, key=lambda hf: block_order(mapping[hf]))
        plan: list[tuple[str | None, str, tuple[int, ...], Q]] = []
        for hf_name in order:
            shape = weights.shape(hf_name)
            plan.append(
                (hf_name, mapping[hf_name], shape, storage_type(shape, EXPORT_TYPES[wanted]))
            )
        factors = llama3_rope_factors(config)
        if factors is not None:
            plan.insert(0, (None, "rope_freqs.weight", factors.shape, Q.F32))
        writer = GGUFWriter(writer_path, spec.gguf_arch)
        try:
            _add_fields(writer, fields)
            for _, gguf_name, shape, qtype in plan:
                writer.add_tensor_info(
                    gguf_name, shape, np.dtype(np.float32), n_bytes(shape, qtype), qtype
                )
            _write_head(writer)
            for saved_name, gguf_name, _, qtype in plan:
                raw = factors if saved_name is None else weights.get(saved_name).float().numpy()
                values = to_gguf_layout(np.asarray(raw), gguf_name, spec, config)
                writer.write_tensor_data(quantize_rows(values, qtype))
        finally:
            writer.close()
    notes = [TensorNote(n, q.name, "converted") for _, n, _, q in plan]
    return notes, list(tokenizer.notes)


def _write_head(writer: GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()


def _copy_fields(writer: GGUFWriter, reader: GGUFReader) -> list[str]:
    """Copy every metadata field of the source except the file-level ones."""
    skipped: list[str] = []
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        kind = GGUFValueType(field.types[0])
        sub = GGUFValueType(field.types[-1]) if kind == GGUFValueType.ARRAY else None
        value = field.contents()
        if sub == GGUFValueType.ARRAY or (kind == GGUFValueType.ARRAY and not value):
            skipped.append(f"metadata {key} (nested or empty array) was not copied")
            continue
        writer.add_key_value(key, value, kind, sub)
    return skipped


def _write_from_source(
    writer_path: Path,
    model_dir: Path,
    source: Path,
    config: Mapping[str, Any],
    spec: ArchSpec,
    fallback: Q,
) -> tuple[list[TensorNote], list[str]]:
    try:
        reader = GGUFReader(source)
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot read source GGUF {source}: {exc}; check the file") from exc
    arch_field = reader.fields.get("general.architecture")
    source_arch = arch_field.contents() if arch_field is not None else None
    if source_arch != spec.gguf_arch:
        raise ExportError(
            f"source GGUF is {source_arch!r} but the saved model is {spec.gguf_arch!r}; "
            "pass the GGUF the model was loaded from"
        )
    with ExitStack() as stack:
        weights = SavedWeights(model_dir, stack)
        to_hf = {v: k for k, v in gguf_names(weights.names(), spec, config).items() if v}
        source_names = {t.name for t in reader.tensors}
        extra = sorted(set(to_hf) - source_names)
        if extra:
            raise ExportError(
                f"the saved model has {extra[0]!r}, which the source GGUF lacks; "
                "export without source_gguf"
            )
        if "output.weight" in source_names and "output.weight" not in to_hf:
            to_hf["output.weight"] = "model.embed_tokens.weight"  # untied source, tied save
        plan = []
        for tensor in reader.tensors:
            shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
            hf_name = to_hf.get(tensor.name)
            if hf_name is None or source_tensor_unchanged(
                tensor, shape, weights, hf_name, spec, config
            ):
                plan.append((tensor, hf_name, shape, tensor.tensor_type, "copied"))
            else:
                qtype = rewrite_type(tensor.tensor_type, shape, fallback)
                plan.append((tensor, hf_name, shape, qtype, "rewritten"))
        writer = GGUFWriter(writer_path, spec.gguf_arch)
        try:
            skipped = _copy_fields(writer, reader)
            for tensor, _, shape, qtype, action in plan:
                size = tensor.n_bytes if action == "copied" else n_bytes(shape, qtype)
                writer.add_tensor_info(tensor.name, shape, np.dtype(np.float32), size, qtype)
            _write_head(writer)
            for tensor, hf_name, _, qtype, action in plan:
                if action == "copied":
                    writer.write_tensor_data(tensor.data)
                    continue
                assert hf_name is not None  # only tensors with a saved counterpart are rewritten
                values = weights.get(hf_name).float().numpy()
                values = to_gguf_layout(values, tensor.name, spec, config)
                writer.write_tensor_data(quantize_rows(values, qtype))
        finally:
            writer.close()
    notes = [TensorNote(t.name, q.name, action) for t, _, _, q, action in plan]
    return notes, skipped


# --- entry point ------------------------------------------------------------------------------


def _check_output(output: Path, force: bool) -> None:
    if not output.parent.is_dir():
        raise ExportError(
            f"output folder {output.parent} does not exist; create it or choose another path"
        )
    if output.is_dir():
        raise ExportError(f"{output} is a folder; give a file name ending in .gguf")
    if output.exists() and not force:
        raise ExportError(f"{output} already exists; pass force=True (--force) to overwrite it")


def _sha256_and_sync(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def export_gguf(
    model_dir: Path,
    output: Path,
    *,
    type: str | None = None,
    force: bool = False,
    source_gguf: Path | None = None,
) -> GgufExportResult:
    """Write the model saved in ``model_dir`` as the GGUF file ``output``.

    ``model_dir`` is a folder from ``save_pretrained`` (config.json, model.safetensors or its
    shards, tokenizer.json, tokenizer_config.json, optional chat_template.jinja).

    ``type`` is ``f16`` (default), ``bf16`` or ``q8_0``. Without ``source_gguf`` it is the
    storage type of every matrix. With ``source_gguf`` (the GGUF the model was loaded from)
    metadata and unchanged tensors are copied byte for byte, edited tensors are re-quantized
    in their source type where possible, and ``type`` (default ``q8_0``) is only the fallback
    for edited tensors whose source type cannot be produced.

    Returns a :class:`GgufExportResult` describing every tensor written. Guarantees: the file
    appears complete or not at all (temporary file, fsync, atomic rename); peak memory is
    about one tensor beyond the process's own. Raises ExportError (one line, with the fix) for
    an unknown type, a missing output folder, an existing output without ``force``, an
    unsupported architecture, or an unreadable model or source.
    """
    wanted = (type or ("q8_0" if source_gguf is not None else "f16")).lower()
    if wanted not in EXPORT_TYPES:
        raise ExportError(f"unknown GGUF type {type!r}; choose one of {', '.join(EXPORT_TYPES)}")
    model_dir, output = Path(model_dir), Path(output)
    _check_output(output, force)
    if not model_dir.is_dir():
        raise ExportError(f"model folder {model_dir} does not exist; pass a saved model folder")
    config = _read_config(model_dir)
    spec = arch_spec(config)
    if source_gguf is not None:
        source_gguf = Path(source_gguf)
        if not source_gguf.is_file():
            raise ExportError(f"source GGUF {source_gguf} does not exist; pass the loaded file")
        if output.exists() and output.resolve() == source_gguf.resolve():
            raise ExportError(f"{output} is the source GGUF; choose another output path")
    fd, temp_name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    os.close(fd)
    temp = Path(temp_name)
    try:
        if source_gguf is None:
            tensors, notes = _write_safetensors(temp, model_dir, config, spec, wanted)
        else:
            fallback = EXPORT_TYPES[wanted]
            tensors, notes = _write_from_source(
                temp, model_dir, source_gguf, config, spec, fallback
            )
        digest = _sha256_and_sync(temp)
        if output.exists() and not force:
            raise ExportError(f"{output} appeared while exporting; pass force=True to overwrite it")
        os.replace(temp, output)
        _sync_folder(output.parent)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise ExportError(
            f"cannot write {output}: {exc.strerror or exc}; check space and permissions"
        ) from exc
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return GgufExportResult(
        path=output,
        type=wanted,
        sha256=digest,
        n_tensors=len(tensors),
        tensors=tuple(tensors),
        source=source_gguf,
        notes=tuple(notes),
    )


def describe(result: GgufExportResult) -> dict[str, object]:
    """JSON-ready record of an export for ``results.json`` and the model card."""
    counts: dict[str, int] = {}
    for note in result.tensors:
        key = f"{note.action} {note.type}"
        counts[key] = counts.get(key, 0) + 1
    summary = ", ".join(f"{n} {key}" for key, n in sorted(counts.items()))
    return {
        "file": result.path.name,
        "type": result.type,
        "sha256": result.sha256,
        "n_tensors": result.n_tensors,
        "source": None if result.source is None else str(result.source),
        "rewritten": [{"name": t.name, "type": t.type} for t in result.rewritten],
        "summary": f"{result.n_tensors} tensors: {summary}",
        "notes": list(result.notes),
    }
