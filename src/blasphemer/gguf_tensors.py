"""Tensor names, layouts and types for GGUF export (used by :mod:`blasphemer.gguf_export`).

Pure functions turn a transformers tensor into llama.cpp's layout and back (the Q/K rotary
interleave of the llama family, Gemma's ``1 + w`` norm scales), choose storage types, decide
whether a saved tensor still equals its source, and map names with the ``gguf`` package's
tables. :class:`SavedWeights` reads a saved (possibly sharded) safetensors checkpoint one tensor
at a time.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, MODEL_ARCH_NAMES, GGMLQuantizationType, get_tensor_name_map
from gguf.quants import dequantize, quantize
from safetensors import safe_open

from blasphemer.errors import ExportError
from blasphemer.gguf_metadata import ArchSpec

Q = GGMLQuantizationType
CHUNK_ELEMENTS = 1 << 22  # elements quantized or compared at a time
REQUANTIZABLE = frozenset({Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0})


# --- tensor layout (pure) -------------------------------------------------------------------


def interleave_rotary(weight: np.ndarray, n_head: int) -> np.ndarray:
    """transformers -> llama.cpp row order of a Q/K projection (rotary halves interleaved)."""
    shape = weight.shape
    return (
        weight.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
    )


def deinterleave_rotary(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`interleave_rotary` (what transformers' GGUF reader applies)."""
    shape = weight.shape
    return (
        weight.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
    )


def qk_heads(gguf_name: str, spec: ArchSpec, config: Mapping[str, Any]) -> int | None:
    if not spec.permute_qk:
        return None
    heads = int(config["num_attention_heads"])
    if ".attn_q." in gguf_name:
        return heads
    if ".attn_k." in gguf_name:
        return int(config.get("num_key_value_heads") or heads)
    return None


def has_offset(gguf_name: str, spec: ArchSpec) -> bool:
    return spec.norm_offset and "norm.weight" in gguf_name


def to_gguf_layout(
    values: np.ndarray, gguf_name: str, spec: ArchSpec, config: Mapping[str, Any]
) -> np.ndarray:
    """A float32 transformers tensor in llama.cpp's layout (Q/K interleave, Gemma norm +1)."""
    heads = qk_heads(gguf_name, spec, config)
    if heads is not None:
        values = interleave_rotary(values, heads)
    if has_offset(gguf_name, spec):
        values = values + np.float32(1.0)
    return np.ascontiguousarray(values, dtype=np.float32)


def from_gguf_layout(
    values: np.ndarray, gguf_name: str, spec: ArchSpec, config: Mapping[str, Any]
) -> np.ndarray:
    """Inverse of :func:`to_gguf_layout`, computed as transformers' GGUF reader does."""
    heads = qk_heads(gguf_name, spec, config)
    if heads is not None:
        values = deinterleave_rotary(values, heads)
    if has_offset(gguf_name, spec):
        values = values - 1
    return values


def storage_type(shape: tuple[int, ...], wanted: Q) -> Q:
    """The ggml type a tensor is stored as: F32 for 1-D, else ``wanted`` if its block fits
    the row length, else F16."""
    if len(shape) < 2:
        return Q.F32
    block = GGML_QUANT_SIZES[wanted][0]
    return wanted if shape[-1] % block == 0 else Q.F16


def rewrite_type(source: Q, shape: tuple[int, ...], fallback: Q) -> Q:
    """Type for an edited tensor in source mode: its source type if re-quantizable, else
    ``fallback`` (F16 when the fallback's block does not fit the row length)."""
    if source in REQUANTIZABLE and shape[-1] % GGML_QUANT_SIZES[source][0] == 0:
        return source
    return storage_type(shape, fallback) if len(shape) > 1 else Q.F32


def quantize_rows(values: np.ndarray, qtype: Q) -> np.ndarray:
    """``values`` (float32) encoded as ``qtype``, a block of rows at a time to bound memory."""
    if values.ndim < 2 or values.size <= CHUNK_ELEMENTS:
        return np.asarray(quantize(values, qtype))
    step = max(1, CHUNK_ELEMENTS // int(np.prod(values.shape[1:])))
    parts = [quantize(values[i : i + step], qtype) for i in range(0, values.shape[0], step)]
    return np.concatenate(parts)


def n_bytes(shape: tuple[int, ...], qtype: Q) -> int:
    """Bytes a tensor of numpy ``shape`` takes as ``qtype``."""
    block, size = GGML_QUANT_SIZES[qtype]
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    return rows * shape[-1] // block * size


def unchanged(saved: torch.Tensor, expected: np.ndarray, offset: bool) -> bool:
    """Whether a saved tensor still holds the source's values.

    ``expected`` is the source's dequantized tensor in transformers' layout; it is rounded to
    the saved dtype, and elements may differ by two units in the last place of that dtype
    (relative to ``|value| + 1`` for offset-stored Gemma norms) plus 1e-7 of the tensor's
    largest magnitude.
    """
    writable = np.require(expected, dtype=np.float32, requirements=["C", "W"])
    reference = torch.from_numpy(writable).to(saved.dtype).float()
    if reference.shape != saved.shape:
        return False
    eps = torch.finfo(saved.dtype).eps if saved.dtype.is_floating_point else 0.0
    scale = reference.abs() + (1.0 if offset else 0.0)
    floor = 1e-7 * float(reference.abs().max()) if reference.numel() else 0.0
    return bool(torch.all((saved.float() - reference).abs() <= 2 * eps * scale + floor))


# --- reading the saved folder -----------------------------------------------------------------


class SavedWeights:
    """Streaming access to a saved model's (possibly sharded) safetensors, one tensor at a time."""

    def __init__(self, model_dir: Path, stack: ExitStack) -> None:
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = {name: model_dir / file for name, file in weight_map.items()}
        elif (model_dir / "model.safetensors").is_file():
            files = {}
            with safe_open(str(model_dir / "model.safetensors"), framework="pt") as handle:
                files = {name: model_dir / "model.safetensors" for name in handle.keys()}  # noqa: SIM118
        else:
            raise ExportError(
                f"{model_dir} has no model.safetensors; save the model with save_pretrained"
            )
        self._files = files
        self._stack = stack
        self._open: dict[Path, Any] = {}

    def names(self) -> list[str]:
        """All tensor names of the checkpoint."""
        return list(self._files)

    def _handle(self, name: str) -> Any:
        path = self._files[name]
        if path not in self._open:
            self._open[path] = self._stack.enter_context(safe_open(str(path), framework="pt"))
        return self._open[path]

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of one tensor, without reading it."""
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read now."""
        return self._handle(name).get_tensor(name)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of one tensor, reading only those."""
        return self._handle(name).get_slice(name)[start:stop]


def gguf_names(
    hf_names: list[str], spec: ArchSpec, config: Mapping[str, Any]
) -> dict[str, str | None]:
    """Map transformers tensor names to GGUF names with the gguf package's tables.

    ``lm_head.weight`` of a model with tied embeddings maps to None (GGUF omits it). Raises
    ExportError for a tensor the tables do not know.
    """
    arch = next(key for key, value in MODEL_ARCH_NAMES.items() if value == spec.gguf_arch)
    table = get_tensor_name_map(arch, int(config["num_hidden_layers"]))
    tied = bool(config.get("tie_word_embeddings", False))
    mapping: dict[str, str | None] = {}
    for hf_name in hf_names:
        if tied and hf_name == "lm_head.weight":
            mapping[hf_name] = None
            continue
        base, dot, suffix = hf_name.rpartition(".")
        if suffix not in ("weight", "bias"):
            base, dot, suffix = hf_name, "", ""
        name = table.get_name(base)
        if name is None:
            raise ExportError(
                f"tensor {hf_name!r} has no GGUF name for {spec.gguf_arch}; "
                "export a checkpoint without extra modules"
            )
        mapping[hf_name] = name + dot + suffix
    return mapping


def block_order(name: str) -> tuple[int, str]:
    match = re.match(r"blk\.(\d+)\.", name)
    if match:
        return int(match.group(1)), name
    return (-1 if name.startswith(("token_embd", "rope_freqs")) else 1 << 30), name


def source_tensor_unchanged(
    tensor: Any,
    shape: tuple[int, ...],
    weights: SavedWeights,
    hf_name: str,
    spec: ArchSpec,
    config: Mapping[str, Any],
) -> bool:
    """True when the saved tensor ``hf_name`` still equals the source GGUF's ``tensor``.

    Compares in transformers' layout, in blocks of :data:`CHUNK_ELEMENTS` for large 2-D tensors
    (bounded memory); a shape that differs from the source raises :class:`ExportError`.
    """
    saved_shape = weights.shape(hf_name)
    if saved_shape != shape:
        raise ExportError(
            f"{hf_name} has shape {saved_shape} but the source GGUF's {tensor.name} has "
            f"{shape}; pass the GGUF the model was loaded from"
        )
    offset = has_offset(tensor.name, spec)
    if len(shape) != 2 or qk_heads(tensor.name, spec, config) is not None:
        values = dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        expected = from_gguf_layout(values, tensor.name, spec, config)
        return unchanged(weights.get(hf_name), expected, offset)
    step = max(1, CHUNK_ELEMENTS // shape[1])  # bounded memory for large embeddings
    for start in range(0, shape[0], step):
        stop = min(shape[0], start + step)
        values = dequantize(tensor.data[start:stop], tensor.tensor_type)
        expected = from_gguf_layout(
            values.reshape(stop - start, shape[1]), tensor.name, spec, config
        )
        if not unchanged(weights.rows(hf_name, start, stop), expected, offset):
            return False
    return True
