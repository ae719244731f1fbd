"""Refusal directions: one unit vector per layer, fitted as a difference of means.

The direction at layer ``i`` is the normalised difference between the mean last-token residual
of harmful and of harmless prompts at the *output* of layer ``i``. Optionally ("projected
abliteration") the component along the harmless mean is removed first, so ablating the
direction does not also shrink the part of the stream every prompt shares.

A :class:`Directions` is a frozen value object: fitted once, then read by index. A float index
interpolates linearly between the two neighbouring layers' directions and renormalises, which
lets the optimiser search the direction index as a continuous parameter.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from blasphemer.residuals import Residuals


@dataclass(frozen=True)
class Directions:
    """Per-layer refusal directions.

    ``vectors`` is ``[n_layers, hidden]`` float32 with unit rows (a row is all zeros only where
    harmful and harmless means coincide); row ``i`` is measured at the output of layer ``i``.
    ``strength`` is ``[n_layers]`` float32: ``‖mean harmful − mean harmless‖`` per layer, before
    any projection. ``metadata`` is free-form text saved alongside (model, prompt fingerprints).
    """

    vectors: torch.Tensor
    strength: torch.Tensor
    metadata: Mapping[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2 or self.vectors.shape[0] < 1:
            raise ValueError(f"vectors must be [n_layers, hidden], got {list(self.vectors.shape)}")
        if self.strength.shape != self.vectors.shape[:1]:
            raise ValueError(
                f"strength must be [{self.vectors.shape[0]}], got {list(self.strength.shape)}"
            )

    @property
    def n_layers(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.vectors.shape[1])

    def at(self, index: float) -> torch.Tensor:
        """Unit direction ``[hidden]`` at a float layer index.

        Clamped to ``[0, n_layers - 1]``. An integer index returns that row exactly; otherwise
        the two neighbouring rows are mixed linearly and renormalised (if they cancel out, the
        nearer row is returned).
        """
        if not math.isfinite(index):
            raise ValueError(f"direction index must be finite, got {index}")
        index = min(max(float(index), 0.0), float(self.n_layers - 1))
        lower = math.floor(index)
        fraction = index - lower
        if fraction == 0.0:
            return self.vectors[lower].clone()
        mixed = (1.0 - fraction) * self.vectors[lower] + fraction * self.vectors[lower + 1]
        norm = torch.linalg.vector_norm(mixed)
        if norm <= torch.finfo(mixed.dtype).eps:
            return self.vectors[lower if fraction < 0.5 else lower + 1].clone()
        return mixed / norm

    def for_layers(self, direction_index: float | None) -> torch.Tensor:
        """Directions to remove at each layer, ``[n_layers, hidden]``.

        ``None``: every layer uses its own direction. A number: the single direction
        :meth:`at` that index, repeated for every layer.
        """
        if direction_index is None:
            return self.vectors.clone()
        return self.at(direction_index).unsqueeze(0).repeat(self.n_layers, 1)


def compute_directions(
    harmful: Residuals, harmless: Residuals, *, projected: bool = False
) -> Directions:
    """Difference-of-means directions at the output of every layer.

    ``vectors[i] = normalise(harmful.means[i + 1] − harmless.means[i + 1])``. With ``projected``,
    the component of that difference along the normalised harmless mean of the same layer is
    removed before normalising, so every row is orthogonal to the harmless mean. ``strength``
    is the norm of the raw difference either way. Computed in float64, returned as float32.
    """
    if harmful.means.shape != harmless.means.shape:
        raise ValueError(
            f"residual shapes differ: harmful {list(harmful.means.shape)}, "
            f"harmless {list(harmless.means.shape)}"
        )
    difference = (harmful.means[1:] - harmless.means[1:]).to(torch.float64)
    strength = torch.linalg.vector_norm(difference, dim=-1)
    if projected:
        baseline = torch.nn.functional.normalize(harmless.means[1:].to(torch.float64), dim=-1)
        along = (difference * baseline).sum(dim=-1, keepdim=True)
        difference = difference - along * baseline
    vectors = torch.nn.functional.normalize(difference, dim=-1)
    return Directions(
        vectors=vectors.to(torch.float32),
        strength=strength.to(torch.float32),
        metadata={"projected": str(projected).lower()},
    )
