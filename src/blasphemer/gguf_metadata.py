"""Architecture metadata for GGUF export: which models can be written, and their keys.

Pure functions for :mod:`blasphemer.gguf_export`. :data:`ARCHITECTURES` lists the transformers
architectures that can be written as GGUF, :func:`model_metadata` turns a ``config.json``
mapping into llama.cpp's architecture keys. Metadata is handed around as a list of
:class:`Field` (the tokenizer's keys come from :mod:`blasphemer.gguf_tokenizer`); nothing here
writes a file, and every problem is an :class:`~blasphemer.errors.ExportError` with a one-line
message.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGUFValueType

from blasphemer.errors import ExportError


@dataclass(frozen=True)
class ArchSpec:
    """How one transformers ``model_type`` is written as GGUF.

    ``permute_qk``: llama.cpp stores Q/K projections of this family with the rotary halves
    interleaved (transformers' GGUF reader undoes this on load). ``norm_offset``: RMSNorm scales
    are stored as ``1 + w`` because the model multiplies by ``1 + w`` (Gemma).
    """

    model_type: str
    gguf_arch: str
    permute_qk: bool = False
    norm_offset: bool = False


ARCHITECTURES: dict[str, ArchSpec] = {
    spec.model_type: spec
    for spec in (
        ArchSpec("llama", "llama", permute_qk=True),
        ArchSpec("mistral", "llama", permute_qk=True),
        ArchSpec("qwen2", "qwen2"),
        ArchSpec("qwen3", "qwen3"),
        ArchSpec("phi3", "phi3"),
        ArchSpec("gemma2", "gemma2", norm_offset=True),
        ArchSpec("gemma3_text", "gemma3", norm_offset=True),
    )
}


@dataclass(frozen=True)
class Field:
    """One GGUF key/value pair; ``sub_type`` is the element type of an array."""

    key: str
    value: Any
    type: GGUFValueType
    sub_type: GGUFValueType | None = None


def arch_spec(config: Mapping[str, Any]) -> ArchSpec:
    """The :class:`ArchSpec` for a ``config.json`` mapping; ExportError when unsupported."""
    model_type = str(config.get("model_type", ""))
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        supported = ", ".join(sorted(ARCHITECTURES))
        hint = " (export the text model alone)" if model_type == "gemma3" else ""
        raise ExportError(
            f"GGUF export does not support architecture {model_type or '(none)'!r}{hint}; "
            f"supported: {supported}"
        )
    return spec


def head_dim(config: Mapping[str, Any]) -> int:
    """Per-head dimension: ``head_dim`` when given, else hidden size over heads."""
    value = config.get("head_dim")
    if value:
        return int(value)
    return int(config["hidden_size"]) // int(config["num_attention_heads"])


def rope_parameters(config: Mapping[str, Any]) -> dict[str, Any]:
    """The (full-attention) rope settings, from ``rope_parameters`` or the older flat keys."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if isinstance(params.get("full_attention"), Mapping):
        params = params["full_attention"]
    merged = dict(params)
    if "rope_theta" not in merged and config.get("rope_theta") is not None:
        merged["rope_theta"] = config["rope_theta"]
    merged.setdefault("rope_type", merged.get("type", "default"))
    return merged


def u32_field(key: str, value: Any) -> Field:
    return Field(key, int(value), GGUFValueType.UINT32)


def f32_field(key: str, value: Any) -> Field:
    return Field(key, float(value), GGUFValueType.FLOAT32)


def model_metadata(config: Mapping[str, Any], spec: ArchSpec) -> list[Field]:
    """llama.cpp's ``{arch}.*`` keys for a ``config.json`` mapping.

    Covers context and embedding length, block count, feed-forward length, head counts, head
    dimension, rope base/dimension/scaling, RMSNorm epsilon, vocabulary size and the Gemma
    extras (sliding window, logit soft-capping). Raises ExportError for rope scaling schemes
    that cannot be expressed as metadata.
    """
    arch = spec.gguf_arch
    try:
        heads = int(config["num_attention_heads"])
        dim = head_dim(config)
        fields = [
            u32_field(f"{arch}.context_length", config.get("max_position_embeddings", 2048)),
            u32_field(f"{arch}.embedding_length", config["hidden_size"]),
            u32_field(f"{arch}.block_count", config["num_hidden_layers"]),
            u32_field(f"{arch}.feed_forward_length", config["intermediate_size"]),
            u32_field(f"{arch}.attention.head_count", heads),
            u32_field(
                f"{arch}.attention.head_count_kv", config.get("num_key_value_heads") or heads
            ),
            f32_field(f"{arch}.attention.layer_norm_rms_epsilon", config.get("rms_norm_eps", 1e-6)),
            u32_field(f"{arch}.vocab_size", config["vocab_size"]),
        ]
    except KeyError as exc:
        raise ExportError(
            f"config.json lacks {exc.args[0]!r}; save the model with transformers' save_pretrained"
        ) from exc
    if dim * heads != int(config["hidden_size"]) or spec.norm_offset:
        fields += [u32_field(f"{arch}.attention.key_length", dim)]
        fields += [u32_field(f"{arch}.attention.value_length", dim)]
    rope = rope_parameters(config)
    rotary = int(dim * float(config.get("partial_rotary_factor", 1.0)))
    fields += [u32_field(f"{arch}.rope.dimension_count", rotary)]
    if rope.get("rope_theta") is not None:
        fields += [f32_field(f"{arch}.rope.freq_base", rope["rope_theta"])]
    fields += _rope_scaling_fields(arch, rope)
    if spec.norm_offset:
        if config.get("sliding_window"):
            fields += [u32_field(f"{arch}.attention.sliding_window", config["sliding_window"])]
        for name in ("attn_logit_softcapping", "final_logit_softcapping"):
            if config.get(name):
                fields += [f32_field(f"{arch}.{name}", config[name])]
    return fields


def _rope_scaling_fields(arch: str, rope: Mapping[str, Any]) -> list[Field]:
    """Rope scaling keys; ``llama3`` scaling travels as a tensor instead (see rope_freqs)."""
    kind = rope.get("rope_type", "default")
    if kind in ("default", "llama3"):
        return []
    if kind in ("linear", "yarn"):
        fields = [
            Field(f"{arch}.rope.scaling.type", kind, GGUFValueType.STRING),
            f32_field(f"{arch}.rope.scaling.factor", rope.get("factor", 1.0)),
        ]
        original = rope.get("original_max_position_embeddings")
        if original:
            fields += [u32_field(f"{arch}.rope.scaling.original_context_length", original)]
        return fields
    raise ExportError(
        f"GGUF export cannot express rope scaling {kind!r}; "
        "use a model with default, linear, yarn or llama3 rope scaling"
    )


def llama3_rope_factors(config: Mapping[str, Any]) -> np.ndarray | None:
    """Per-frequency divisors llama.cpp reads from ``rope_freqs.weight`` for llama3 rope.

    Returns None unless the config uses llama3 rope scaling. Long wavelengths are stretched by
    ``factor``, short ones kept, and the band between blended linearly in wavelength ratio.
    """
    rope = rope_parameters(config)
    if rope.get("rope_type") != "llama3":
        return None
    base = float(rope["rope_theta"])
    rotary = int(head_dim(config) * float(config.get("partial_rotary_factor", 1.0)))
    factor = float(rope["factor"])
    low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    original = float(rope["original_max_position_embeddings"])
    out = np.empty(rotary // 2, dtype=np.float32)
    for i in range(rotary // 2):
        wavelength = 2 * math.pi * base ** (2 * i / rotary)
        ratio = original / wavelength
        if ratio > high:
            out[i] = 1.0
        elif ratio < low:
            out[i] = factor
        else:
            blend = (ratio - low) / (high - low)
            out[i] = 1.0 / ((1.0 - blend) / factor + blend)
    return out


def general_metadata(name: str, file_type: int) -> list[Field]:
    """``general.*`` keys: model name, file type and quantization version."""
    return [
        Field("general.type", "model", GGUFValueType.STRING),
        Field("general.name", name, GGUFValueType.STRING),
        u32_field("general.file_type", file_type),
        u32_field("general.quantization_version", 2),
    ]
