"""Pure tensor math of directional ablation. No Hugging Face, no modules, no state.

A writer into the residual stream computes ``out = W x + b`` with ``W`` stored in one of the
:class:`~blasphemer.architectures.base.Layout` forms. Removing a unit direction ``r`` from
what it writes, with strength ``w``, is

    W' = W - w · r (rᵀ W)        b' = b - w · r (rᵀ b)

for the ``[out, in]`` layout; other layouts are transposed views of the same operation. With
``w = 1`` the writer can no longer write anything along ``r``; with ``w = 0`` nothing changes.

The *norm-preserving* variant then rescales every input neuron's write vector (a column of ``W``
in ``[out, in]`` layout) back to its original norm; the direction stays removed because the
rescaling never moves a column out of the subspace orthogonal to ``r``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from blasphemer.architectures.base import ComponentKind, Layout


def as_out_in(weight: torch.Tensor, layout: Layout) -> torch.Tensor:
    """View ``weight`` with the residual dimension second to last (``[..., out, in]``)."""
    if layout in (Layout.IN_OUT, Layout.EXPERTS_IN_OUT):
        return weight.transpose(-1, -2)
    return weight


def project_out(x: torch.Tensor, direction: torch.Tensor, strength: float) -> torch.Tensor:
    """``x - strength · r (rᵀ x)`` along the last dimension; ``direction`` must be unit length."""
    coefficient = (x.to(direction.dtype) @ direction).to(x.dtype)
    return x - strength * coefficient.unsqueeze(-1) * direction.to(x.dtype)


def orthogonalize(
    weight: torch.Tensor, direction: torch.Tensor, strength: float, layout: Layout
) -> torch.Tensor:
    """Return a new weight whose writes lose ``strength`` of their component along ``direction``.

    Computed in float32 (or the weight's dtype if wider) and cast back to the weight's dtype.
    """
    work_dtype = torch.promote_types(weight.dtype, torch.float32)
    r = direction.to(device=weight.device, dtype=work_dtype)
    w = as_out_in(weight.to(work_dtype), layout)  # [..., out, in]
    along = torch.einsum("o,...oi->...i", r, w)  # rᵀ W  -> [..., in]
    edited = w - strength * torch.einsum("o,...i->...oi", r, along)
    return _from_out_in(edited, layout).to(weight.dtype)


def orthogonalize_bias(
    bias: torch.Tensor, direction: torch.Tensor, strength: float
) -> torch.Tensor:
    """Return ``b - strength · r (rᵀ b)`` for a bias ``[..., out]``."""
    work_dtype = torch.promote_types(bias.dtype, torch.float32)
    r = direction.to(device=bias.device, dtype=work_dtype)
    return project_out(bias.to(work_dtype), r, strength).to(bias.dtype)


def column_scale(
    weight: torch.Tensor, direction: torch.Tensor, strength: float, layout: Layout
) -> torch.Tensor:
    """Per-input-neuron factors ``‖W_j‖ / ‖W'_j‖`` restoring column norms after the edit.

    Returns a float32 tensor ``[..., in]``. Columns that the edit zeroes completely keep factor 1.
    """
    work_dtype = torch.promote_types(weight.dtype, torch.float32)
    r = direction.to(device=weight.device, dtype=work_dtype)
    w = as_out_in(weight.to(work_dtype), layout)
    norms = torch.linalg.vector_norm(w, dim=-2)
    along = torch.einsum("o,...oi->...i", r, w)
    # Norm of the explicitly edited columns: the closed form ‖W_j‖² − (2s − s²)a_j² cancels
    # catastrophically for columns (nearly) parallel to r.
    edited = torch.linalg.vector_norm(
        w - strength * torch.einsum("o,...i->...oi", r, along), dim=-2
    )
    cutoff = math.sqrt(torch.finfo(work_dtype).eps) * norms
    safe = edited.clamp_min(torch.finfo(work_dtype).tiny)
    return torch.where(edited > cutoff, norms / safe, torch.ones_like(norms))


def orthogonalize_norm_preserving(
    weight: torch.Tensor, direction: torch.Tensor, strength: float, layout: Layout
) -> torch.Tensor:
    """Like :func:`orthogonalize`, then rescale each column (input neuron) to its original norm."""
    work_dtype = torch.promote_types(weight.dtype, torch.float32)
    edited = as_out_in(orthogonalize(weight.to(work_dtype), direction, strength, layout), layout)
    scale = column_scale(weight, direction, strength, layout).to(work_dtype)
    return _from_out_in(edited * scale.unsqueeze(-2), layout).to(weight.dtype)


def _from_out_in(weight: torch.Tensor, layout: Layout) -> torch.Tensor:
    if layout in (Layout.IN_OUT, Layout.EXPERTS_IN_OUT):
        return weight.transpose(-1, -2).contiguous()
    return weight


@dataclass(frozen=True)
class KernelParameters:
    """The per-layer ablation strength of one component, as a function of the layer index.

    Strength is ``max_weight`` at ``max_weight_position`` and falls linearly to ``min_weight`` at a
    distance of ``min_weight_distance`` layers; beyond that distance the layer is not edited.
    """

    max_weight: float
    max_weight_position: float
    min_weight: float
    min_weight_distance: float

    def __post_init__(self) -> None:
        for name in ("max_weight", "max_weight_position", "min_weight", "min_weight_distance"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value}")
        if self.min_weight_distance <= 0:
            raise ValueError(f"min_weight_distance must be > 0, got {self.min_weight_distance}")
        if self.max_weight < 0 or self.min_weight < 0:
            raise ValueError("max_weight and min_weight must be >= 0")

    def weights(self, n_layers: int) -> torch.Tensor:
        """Strength per layer, float64 tensor ``[n_layers]`` (zeros outside the kernel)."""
        index = torch.arange(n_layers, dtype=torch.float64)
        distance = (index - self.max_weight_position).abs()
        fraction = distance / self.min_weight_distance
        inside = self.max_weight + (self.min_weight - self.max_weight) * fraction
        return torch.where(distance <= self.min_weight_distance, inside, torch.zeros_like(inside))

    @classmethod
    def constant(cls, weight: float, n_layers: int) -> KernelParameters:
        """Every layer edited with the same ``weight``."""
        return cls(weight, (n_layers - 1) / 2, weight, max(n_layers / 2, 1.0))


@dataclass(frozen=True)
class AblationParameters:
    """Everything that defines one candidate edit.

    ``direction_index`` selects one global direction (float: interpolated between neighbouring
    layers); ``None`` means each layer uses its own direction. ``kernels`` gives the per-layer
    strength per component kind; a kind without a kernel is not edited.
    """

    direction_index: float | None
    kernels: Mapping[ComponentKind, KernelParameters] = field(default_factory=dict)
    norm_preserving: bool = False

    def layer_weights(self, n_layers: int) -> dict[ComponentKind, torch.Tensor]:
        """Strength per layer for every component kind with a kernel."""
        return {kind: kernel.weights(n_layers) for kind, kernel in self.kernels.items()}
