"""Value objects describing where a model writes into its residual stream.

An :class:`ArchitectureSpec` is *data*: dotted paths relative to the model, no code. Resolving a
spec against a loaded model yields a :class:`ModelMap` that holds the actual modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import nn


class Layout(str, Enum):
    """How a writer stores its weight. ``out`` is the residual (hidden) dimension."""

    OUT_IN = "out_in"  # nn.Linear: weight [out, in], bias [out]
    IN_OUT = "in_out"  # GPT-2 Conv1D: weight [in, out], bias [out]
    EXPERTS_OUT_IN = "experts_out_in"  # fused experts: [E, out, in], bias [E, out]
    EXPERTS_IN_OUT = "experts_in_out"  # GPT-OSS fused experts: [E, in, out], bias [E, out]


class ComponentKind(str, Enum):
    """Groups of writers that share one weight kernel during optimisation."""

    ATTENTION = "attn"
    MLP = "mlp"  # dense MLP down projection, MoE experts and shared experts


@dataclass(frozen=True)
class WriterSpec:
    """One writer into the residual stream, relative to a decoder layer.

    ``module`` is a dotted path below the layer (``self_attn.o_proj``); alternatives are tried in
    order (hybrid models whose layers differ: ``("self_attn.o_proj", "linear_attn.out_proj")``).
    ``weight``/``bias`` name the parameters on that module. ``optional`` writers may be absent on
    some layers (e.g. dense layers before the first MoE layer in DeepSeek-V3).
    """

    kind: ComponentKind
    module: tuple[str, ...]
    layout: Layout = Layout.OUT_IN
    weight: str = "weight"
    bias: str = "bias"
    optional: bool = False


@dataclass(frozen=True)
class ArchitectureSpec:
    """Declarative description of one model family."""

    name: str
    model_types: tuple[str, ...]  # config.model_type values (also text_config.model_type)
    layers: tuple[str, ...]  # dotted paths to the decoder layer ModuleList, tried in order
    writers: tuple[WriterSpec, ...]
    embeddings: tuple[str, ...] = ("model.embed_tokens",)


@dataclass(eq=False)
class Writer:
    """A resolved writer: the live module and its parameters inside one layer."""

    kind: ComponentKind
    path: str  # dotted path from the model root, for messages and `inspect`
    module: nn.Module
    weight: nn.Parameter
    bias: nn.Parameter | None
    layout: Layout

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)


@dataclass(eq=False)
class ModelMap:
    """A model resolved against its spec: layers and every residual-stream writer per layer."""

    spec_name: str
    layers_path: str
    layers: list[nn.Module]
    writers: list[list[Writer]]  # writers[layer_index]
    hidden_size: int
    embeddings: nn.Module | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def device_of(self, layer_index: int) -> torch.device:
        return next(self.layers[layer_index].parameters()).device
