"""Refusal directions: planted directions recovered, projection, interpolation, save/load."""

from __future__ import annotations

import pytest
import torch

from blasphemer.directions import Directions, compute_directions
from blasphemer.residuals import Residuals

N_LAYERS = 5
HIDDEN = 64


def _unit(generator: torch.Generator, n: int = HIDDEN) -> torch.Tensor:
    v = torch.randn(n, generator=generator, dtype=torch.float64)
    return v / v.norm()


def _planted(
    seed: int = 0, n_prompts: int = 2000, noise: float = 1.0, shift: float = 3.0
) -> tuple[Residuals, Residuals, torch.Tensor]:
    """Synthetic residuals: harmful prompts are harmless ones shifted along a planted direction.

    Each layer has its own planted direction, a large shared offset (the part of the stream
    every prompt shares) and per-prompt noise; means are taken over ``n_prompts`` samples, as
    :func:`mean_residuals` would.
    """
    generator = torch.Generator().manual_seed(seed)
    planted = torch.stack([_unit(generator) for _ in range(N_LAYERS + 1)])
    offset = 5.0 * torch.randn(N_LAYERS + 1, HIDDEN, generator=generator, dtype=torch.float64)

    def sample(shifted: bool) -> Residuals:
        draws = offset + noise * torch.randn(
            n_prompts, N_LAYERS + 1, HIDDEN, generator=generator, dtype=torch.float64
        )
        if shifted:
            draws = draws + shift * planted
        return Residuals(means=draws.mean(dim=0), count=n_prompts)

    return sample(True), sample(False), planted[1:]


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def test_planted_direction_is_recovered_through_noise() -> None:
    harmful, harmless, planted = _planted()
    directions = compute_directions(harmful, harmless)
    assert directions.vectors.shape == (N_LAYERS, HIDDEN)
    assert directions.vectors.dtype == torch.float32
    assert torch.all(_cosine(directions.vectors, planted) > 0.99)
    torch.testing.assert_close(
        torch.linalg.vector_norm(directions.vectors, dim=-1), torch.ones(N_LAYERS)
    )


def test_row_i_is_measured_at_the_output_of_layer_i() -> None:
    # Residual row 0 is the stream entering layer 0; direction row i must use residual row i + 1.
    means = torch.zeros(N_LAYERS + 1, HIDDEN, dtype=torch.float64)
    harmful = means.clone()
    for row in range(N_LAYERS + 1):
        harmful[row, row] = 1.0
    directions = compute_directions(Residuals(harmful, 3), Residuals(means, 3))
    for layer in range(N_LAYERS):
        assert directions.vectors[layer].argmax().item() == layer + 1


def test_strength_is_the_norm_of_the_raw_difference() -> None:
    harmful, harmless, _ = _planted()
    expected = torch.linalg.vector_norm(harmful.means[1:] - harmless.means[1:], dim=-1).float()
    for projected in (False, True):
        directions = compute_directions(harmful, harmless, projected=projected)
        assert directions.strength.dtype == torch.float32
        torch.testing.assert_close(directions.strength, expected)


def test_projected_directions_are_orthogonal_to_the_harmless_mean() -> None:
    harmful, harmless, planted = _planted()
    plain = compute_directions(harmful, harmless)
    projected = compute_directions(harmful, harmless, projected=True)
    harmless_directions = torch.nn.functional.normalize(harmless.means[1:], dim=-1)
    assert torch.all(_cosine(projected.vectors, harmless_directions).abs() < 1e-6)
    # Without projection they are not orthogonal, so the check above is not vacuous.
    assert torch.all(_cosine(plain.vectors, harmless_directions).abs() > 1e-3)
    # The projected direction is the plain one minus its harmless-mean component, renormalised.
    raw = harmful.means[1:] - harmless.means[1:]
    along = (raw * harmless_directions).sum(-1, keepdim=True)
    expected = torch.nn.functional.normalize(raw - along * harmless_directions, dim=-1)
    torch.testing.assert_close(projected.vectors, expected.float())
    assert torch.all(_cosine(projected.vectors, planted) > 0.9)


def test_mismatched_residual_shapes_are_rejected() -> None:
    harmful, _, _ = _planted()
    other = Residuals(torch.zeros(N_LAYERS + 2, HIDDEN, dtype=torch.float64), 1)
    with pytest.raises(ValueError, match="shapes differ"):
        compute_directions(harmful, other)


def _directions(seed: int = 3) -> Directions:
    generator = torch.Generator().manual_seed(seed)
    vectors = torch.stack([_unit(generator) for _ in range(N_LAYERS)]).float()
    strength = torch.rand(N_LAYERS, generator=generator)
    return Directions(vectors, strength)


def test_integer_index_returns_the_row_exactly() -> None:
    directions = _directions()
    for layer in range(N_LAYERS):
        assert torch.equal(directions.at(layer), directions.vectors[layer])
        assert torch.equal(directions.at(float(layer)), directions.vectors[layer])


def test_midpoint_is_the_normalised_average() -> None:
    directions = _directions()
    mixed = directions.at(1.5)
    average = (directions.vectors[1] + directions.vectors[2]) / 2
    torch.testing.assert_close(mixed, average / average.norm())
    assert torch.linalg.vector_norm(mixed).item() == pytest.approx(1.0, abs=1e-6)


def test_interpolation_is_linear_before_renormalising() -> None:
    directions = _directions()
    mixed = directions.at(2.25)
    expected = 0.75 * directions.vectors[2] + 0.25 * directions.vectors[3]
    torch.testing.assert_close(mixed, expected / expected.norm())


def test_index_is_clamped_to_the_layer_range() -> None:
    directions = _directions()
    assert torch.equal(directions.at(-3.7), directions.vectors[0])
    assert torch.equal(directions.at(N_LAYERS + 10.5), directions.vectors[-1])
    with pytest.raises(ValueError):
        directions.at(float("nan"))


def test_opposite_neighbours_fall_back_to_the_nearer_row() -> None:
    row = torch.nn.functional.normalize(torch.arange(1.0, HIDDEN + 1), dim=0)
    directions = Directions(torch.stack([row, -row]), torch.ones(2))
    assert torch.equal(directions.at(0.5), -row)  # they cancel exactly: the upper row
    torch.testing.assert_close(directions.at(0.25), row)


def test_for_layers() -> None:
    directions = _directions()
    per_layer = directions.for_layers(None)
    assert torch.equal(per_layer, directions.vectors)
    per_layer.zero_()  # a copy: the fitted directions stay untouched
    assert directions.vectors.abs().sum() > 0
    global_ = directions.for_layers(2.5)
    assert global_.shape == (N_LAYERS, HIDDEN)
    for layer in range(N_LAYERS):
        assert torch.equal(global_[layer], directions.at(2.5))
