"""Value objects describing where a model writes into its residual stream.

An :class:`ArchitectureSpec` is *data*: dotted paths relative to the model, no code. Resolving a
spec against a loaded model yields a :class:`ModelMap` that holds the actual modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import torch
from torch import nn


class Layout(StrEnum):
    """How a writer stores its weight. ``out`` is the residual (hidden) dimension."""

    OUT_IN = "out_in"  # nn.Linear: weight [out, in], bias [out]
    IN_OUT = "in_out"  # GPT-2 Conv1D: weight [in, out], bias [out]
    EXPERTS_OUT_IN = "experts_out_in"  # fused experts: [E, out, in], bias [E, out]
    EXPERTS_IN_OUT = "experts_in_out"  # GPT-OSS fused experts: [E, in, out], bias [E, out]


class ComponentKind(StrEnum):
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

    ``post_norm`` names an RMS norm that sits between this module's output and the residual add
    (Gemma 2/3 and OLMo 2 "sandwich" norms); it multiplies by ``post_norm_offset + weight``
    (Gemma: ``1 + weight``). See :meth:`Writer.output_direction` for why that matters.
    """

    kind: ComponentKind
    module: tuple[str, ...]
    layout: Layout = Layout.OUT_IN
    weight: str = "weight"
    bias: str = "bias"
    optional: bool = False
    post_norm: str | None = None
    post_norm_offset: float = 0.0


@dataclass(frozen=True)
class ArchitectureSpec:
    """Declarative description of one model family."""

    name: str
    model_types: tuple[str, ...]  # config.model_type values (also text_config.model_type)
    layers: tuple[str, ...]  # dotted paths to the decoder layer ModuleList, tried in order
    writers: tuple[WriterSpec, ...]
    embeddings: tuple[str, ...] = ("model.embed_tokens",)


@dataclass(eq=False)
class PostNorm:
    """An RMS norm applied to a writer's output before the residual add.

    It computes ``(offset + weight) ⊙ u / rms(u)``: an elementwise gain times a per-token scalar.
    """

    path: str
    weight: nn.Parameter
    offset: float = 0.0

    def gain(self) -> torch.Tensor:
        """The elementwise gain ``offset + weight`` as float32."""
        return self.weight.detach().to(torch.float32) + self.offset


@dataclass(eq=False)
class Writer:
    """A resolved writer: the live module and its parameters inside one layer."""

    kind: ComponentKind
    path: str  # dotted path from the model root, for messages and `inspect`
    module: nn.Module
    weight: nn.Parameter
    bias: nn.Parameter | None
    layout: Layout
    post_norm: PostNorm | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    def output_direction(self, direction: torch.Tensor) -> torch.Tensor:
        """The unit direction to remove from ``module``'s output so that ``direction`` is removed
        from what this writer adds to the residual stream. float32, on the weight's device.

        Without a post-norm that is ``direction`` itself. With one, the residual receives
        ``y = g ⊙ u / rms(u)``, so ``rᵀy = (g ⊙ r)ᵀu / rms(u)``: ``y`` has no component along ``r``
        exactly when ``u`` has none along ``g ⊙ r``. Removing the normalised ``g ⊙ r`` from ``u``
        is a plain linear edit of this module, so hooks and merged weights stay the same
        function, and at strength 1 the residual write along ``r`` is exactly zero. (At strength
        ``s < 1`` the residual component shrinks by ``(1 - s)`` up to the changed ``rms(u)``.)
        If the gain is zero along ``r`` the writer cannot reach ``r`` and a zero vector (no
        edit) is returned.
        """
        r = direction.to(device=self.weight.device, dtype=torch.float32)
        if self.post_norm is None:
            return r
        pulled_back = self.post_norm.gain().to(r.device) * r
        length = torch.linalg.vector_norm(pulled_back)
        return pulled_back / length.clamp_min(torch.finfo(torch.float32).tiny)


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
