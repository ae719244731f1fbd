"""Resolve a loaded model into a :class:`ModelMap`: registry entry, structural guess, or override.

The order is fixed: a user override if given, else the registry entry for the model's
``model_type`` (or its text tower's), else a structural guess. Each step is data-driven; when
none applies the error names the override file that fixes it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn
from transformers.pytorch_utils import Conv1D

from blasphemer.architectures.base import (
    ArchitectureSpec,
    ComponentKind,
    Layout,
    ModelMap,
    PostNorm,
    Writer,
    WriterSpec,
)
from blasphemer.architectures.registry import spec_for_model_types
from blasphemer.errors import UnsupportedArchitectureError

OVERRIDE_HINT = (
    'pass --architecture-override FILE, a TOML file with layers = "<path to the decoder layer '
    'list>" and one [[writers]] table per residual writer (kind = "attn"|"mlp", module = '
    '"<path inside a layer>", layout = "out_in"|"in_out"|"experts_out_in"|"experts_in_out")'
)

# Leaf names of modules that, in the families we know, write into the residual stream.
GUESS_WRITER_NAMES = frozenset(
    {"o_proj", "out_proj", "dense", "c_proj", "down_proj", "dense_4h_to_h", "fc2", "fc_out",
     "wo", "w2", "experts"}
)  # fmt: skip
GUESS_ATTENTION_HINTS = ("attn", "attention")


def resolve(model: nn.Module, override: ArchitectureSpec | None = None) -> ModelMap:
    """Map ``model``'s decoder layers and their residual-stream writers.

    Uses ``override`` if given, else the registry entry matching ``config.model_type`` (or the
    text tower's ``model_type`` for multimodal models), else a structural guess. Only the text
    tower of a multimodal model is mapped. Raises :class:`UnsupportedArchitectureError` naming
    the override option when nothing fits.
    """
    if override is not None:
        model_map = _resolve_spec(model, override, strict=True)
        model_map.notes.append(f"architecture from override {override.name!r}")
        return model_map
    spec = spec_for_model_types(model_types(model))
    if spec is not None:
        return _resolve_spec(model, spec, strict=True)
    model_map = _resolve_spec(model, guess_spec(model), strict=False)
    model_map.notes.append(
        f"{type(model).__name__} is not in the registry; layers and writers were guessed from "
        "module names and shapes (post-writer norms cannot be detected); if the edit misbehaves, "
        + OVERRIDE_HINT
    )
    return model_map


def model_types(model: nn.Module) -> list[str]:
    """``config.model_type`` and, for multimodal models, the text tower's ``model_type``."""
    config = getattr(model, "config", None)
    found: list[str] = []
    for candidate in (config, _text_config(config)):
        model_type = getattr(candidate, "model_type", None)
        if isinstance(model_type, str) and model_type and model_type not in found:
            found.append(model_type)
    return found


def describe(model_map: ModelMap) -> dict[str, Any]:
    """A JSON-able summary of ``model_map`` (backs ``blasphemer inspect MODEL --json``)."""
    return {
        "spec": model_map.spec_name,
        "layers_path": model_map.layers_path,
        "n_layers": model_map.n_layers,
        "hidden_size": model_map.hidden_size,
        "notes": list(model_map.notes),
        "layers": [
            [
                {
                    "kind": writer.kind.value,
                    "path": writer.path,
                    "shape": list(writer.shape),
                    "layout": writer.layout.value,
                    "bias": writer.bias is not None,
                    "post_norm": None if writer.post_norm is None else writer.post_norm.path,
                }
                for writer in writers
            ]
            for writers in model_map.writers
        ],
    }


# --- resolving a spec -------------------------------------------------------------------------


def _resolve_spec(model: nn.Module, spec: ArchitectureSpec, *, strict: bool) -> ModelMap:
    """Resolve ``spec`` against ``model``. ``strict``: every layer needs a writer of every kind."""
    name = type(model).__name__
    found = [(path, _submodule(model, path)) for path in spec.layers]
    layers_path, layer_list = next(
        ((path, module) for path, module in found if isinstance(module, nn.ModuleList)),
        (None, None),
    )
    if layers_path is None or layer_list is None or len(layer_list) == 0:
        raise UnsupportedArchitectureError(
            f"{name} ({spec.name}): no decoder layer list at {' or '.join(spec.layers)}; "
            + OVERRIDE_HINT
        )
    embeddings = _embeddings(model, spec.embeddings)
    hidden = _hidden_size(model, embeddings)
    if hidden is None:
        raise UnsupportedArchitectureError(
            f"{name}: cannot tell the hidden size (no config.hidden_size, no input embeddings); "
            + OVERRIDE_HINT
        )
    writers = [
        _layer_writers(spec, layer, f"{layers_path}.{index}", hidden, name)
        for index, layer in enumerate(layer_list)
    ]
    kinds = {writer_spec.kind for writer_spec in spec.writers} if strict else set()
    for index, layer_writers in enumerate(writers):
        missing = sorted(kind.value for kind in kinds - {w.kind for w in layer_writers})
        if missing or not layer_writers:
            raise UnsupportedArchitectureError(
                f"{name} ({spec.name}): layer {layers_path}.{index} has no "
                f"{' or '.join(missing) or 'residual'} writer; " + OVERRIDE_HINT
            )
    return ModelMap(spec.name, layers_path, list(layer_list), writers, hidden, embeddings)


def _layer_writers(
    spec: ArchitectureSpec, layer: nn.Module, prefix: str, hidden: int, model_name: str
) -> list[Writer]:
    writers: list[Writer] = []
    for writer_spec in spec.writers:
        path, module = next(
            ((p, m) for p in writer_spec.module if (m := _submodule(layer, p)) is not None),
            (None, None),
        )
        if path is None or module is None:
            if writer_spec.optional:
                continue
            raise UnsupportedArchitectureError(
                f"{model_name} ({spec.name}): {prefix} has no module "
                f"{' or '.join(writer_spec.module)}; " + OVERRIDE_HINT
            )
        writers.append(_writer(writer_spec, layer, module, prefix, path, hidden, model_name))
    return writers


def _writer(
    writer_spec: WriterSpec,
    layer: nn.Module,
    module: nn.Module,
    prefix: str,
    relative: str,
    hidden: int,
    model_name: str,
) -> Writer:
    path = f"{prefix}.{relative}"
    parameters = dict(module.named_parameters(recurse=False))
    weight = parameters.get(writer_spec.weight)
    if weight is None:
        raise UnsupportedArchitectureError(
            f"{model_name}: {path} has no parameter {writer_spec.weight!r}; " + OVERRIDE_HINT
        )
    # Quantised weights (integer storage, packed shapes) cannot be checked against the hidden size.
    if weight.is_floating_point() and _residual_dim(weight.shape, writer_spec.layout) != hidden:
        raise UnsupportedArchitectureError(
            f"{model_name}: {path}.{writer_spec.weight} has shape {list(weight.shape)}, which does "
            f"not write {hidden} hidden features in layout {writer_spec.layout.value}; "
            + OVERRIDE_HINT
        )
    post_norm = None
    if writer_spec.post_norm is not None:
        post_norm = _post_norm(layer, writer_spec.post_norm, writer_spec.post_norm_offset, prefix)
        if tuple(post_norm.weight.shape) != (hidden,):
            raise UnsupportedArchitectureError(
                f"{model_name}: {post_norm.path} is not a norm with a [{hidden}] weight; "
                + OVERRIDE_HINT
            )
    return Writer(
        writer_spec.kind,
        path,
        module,
        weight,
        parameters.get(writer_spec.bias),
        writer_spec.layout,
        post_norm,
    )


def _post_norm(layer: nn.Module, relative: str, offset: float, prefix: str) -> PostNorm:
    norm = _submodule(layer, relative)
    weight = None if norm is None else dict(norm.named_parameters(recurse=False)).get("weight")
    if weight is None:
        raise UnsupportedArchitectureError(
            f"{prefix}.{relative} is not a norm with a weight; " + OVERRIDE_HINT
        )
    return PostNorm(f"{prefix}.{relative}", weight, offset)


def _residual_dim(shape: Iterable[int], layout: Layout) -> int:
    """The size of the residual (output) dimension of a weight of ``shape`` in ``layout``."""
    dims = tuple(shape)
    expected_ndim = 3 if layout in (Layout.EXPERTS_OUT_IN, Layout.EXPERTS_IN_OUT) else 2
    if len(dims) != expected_ndim:
        return -1
    return dims[-1] if layout in (Layout.IN_OUT, Layout.EXPERTS_IN_OUT) else dims[-2]


def _submodule(root: nn.Module, path: str) -> nn.Module | None:
    """The module at dotted ``path`` below ``root`` (``ModuleList`` indices included), or None."""
    module: nn.Module | None = root
    for part in path.split("."):
        if module is None:
            return None
        module = dict(module.named_children()).get(part)
    return module


def _embeddings(model: nn.Module, paths: tuple[str, ...]) -> nn.Module | None:
    for path in paths:
        module = _submodule(model, path)
        if module is not None:
            return module
    get_input_embeddings = getattr(model, "get_input_embeddings", None)
    module = get_input_embeddings() if callable(get_input_embeddings) else None
    return module if isinstance(module, nn.Module) else None


def _text_config(config: Any) -> Any:
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if callable(get_text_config) else config


def _hidden_size(model: nn.Module, embeddings: nn.Module | None) -> int | None:
    size = getattr(_text_config(getattr(model, "config", None)), "hidden_size", None)
    if isinstance(size, int) and size > 0:
        return size
    weight = getattr(embeddings, "weight", None)
    return int(weight.shape[-1]) if weight is not None and weight.ndim == 2 else None


# --- structural guess -------------------------------------------------------------------------


def guess_spec(model: nn.Module) -> ArchitectureSpec:
    """Guess an :class:`ArchitectureSpec` from module names and shapes alone.

    The decoder layers are the ``nn.ModuleList`` of same-class blocks, with the most parameters,
    in which every block has a writer: a module named like ``o_proj``/``out_proj``/``dense``/
    ``c_proj``/``down_proj``/``experts`` whose output width is the hidden size. Writers present in
    only some blocks (hybrid models) are optional. Raises :class:`UnsupportedArchitectureError`.
    """
    hidden = _hidden_size(model, _embeddings(model, ()))
    if hidden is None:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} is not in the registry and has no config.hidden_size or "
            "input embeddings to guess its layers from; " + OVERRIDE_HINT
        )
    best: tuple[int, str, list[list[tuple[str, WriterSpec]]]] | None = None
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len({type(b) for b in module}) != 1:
            continue
        per_block = [_guess_block(block, hidden) for block in module]
        if not all(per_block):
            continue
        size = sum(parameter.numel() for parameter in module.parameters())
        if best is None or size > best[0]:
            best = (size, path, per_block)
    if best is None:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} is not in the registry and has no recognisable list of "
            "decoder layers with residual writers; " + OVERRIDE_HINT
        )
    _, layers_path, per_block = best
    counts: dict[str, int] = {}
    specs: dict[str, WriterSpec] = {}
    for block in per_block:
        for relative, writer_spec in block:
            counts[relative] = counts.get(relative, 0) + 1
            specs.setdefault(relative, writer_spec)
    writers = tuple(
        WriterSpec(
            spec.kind,
            spec.module,
            spec.layout,
            spec.weight,
            spec.bias,
            optional=counts[relative] < len(per_block),
        )
        for relative, spec in specs.items()
    )
    return ArchitectureSpec(f"guess:{type(model).__name__}", (), (layers_path,), writers, ())


def _guess_block(block: nn.Module, hidden: int) -> list[tuple[str, WriterSpec]]:
    found: list[tuple[str, WriterSpec]] = []
    for path, module in block.named_modules():
        parts = path.split(".")
        if parts[-1] not in GUESS_WRITER_NAMES:
            continue
        kind = (
            ComponentKind.ATTENTION
            if any(hint in part for part in parts[:-1] for hint in GUESS_ATTENTION_HINTS)
            else ComponentKind.MLP
        )
        layout_and_names = _guess_layout(module, hidden)
        if layout_and_names is not None:
            layout, weight, bias = layout_and_names
            found.append((path, WriterSpec(kind, (path,), layout, weight, bias)))
    return found


def _guess_layout(module: nn.Module, hidden: int) -> tuple[Layout, str, str] | None:
    if isinstance(module, nn.Linear):
        return (Layout.OUT_IN, "weight", "bias") if module.out_features == hidden else None
    if isinstance(module, Conv1D):
        return (Layout.IN_OUT, "weight", "bias") if module.weight.shape[-1] == hidden else None
    down_proj = dict(module.named_parameters(recurse=False)).get("down_proj")
    if down_proj is None or down_proj.ndim != 3:
        return None
    # transformers' fused-experts classes declare their storage order in ``is_transposed``.
    transposed = bool(getattr(module, "is_transposed", False))
    if not transposed and down_proj.shape[-2] == hidden:
        return Layout.EXPERTS_OUT_IN, "down_proj", "down_proj_bias"
    if down_proj.shape[-1] == hidden:
        return Layout.EXPERTS_IN_OUT, "down_proj", "down_proj_bias"
    return None
