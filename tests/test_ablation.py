"""Invariants of the pure ablation math, for every weight layout (fused experts included)."""

from __future__ import annotations

import math

import pytest
import torch

from blasphemer.ablation import (
    AblationParameters,
    KernelParameters,
    as_out_in,
    column_scale,
    orthogonalize,
    orthogonalize_bias,
    orthogonalize_norm_preserving,
    project_out,
)
from blasphemer.architectures.base import ComponentKind, Layout

HIDDEN = 12  # residual ("out") dimension
INNER = 7  # writer input dimension
EXPERTS = 3

SHAPES = {
    Layout.OUT_IN: (HIDDEN, INNER),
    Layout.IN_OUT: (INNER, HIDDEN),
    Layout.EXPERTS_OUT_IN: (EXPERTS, HIDDEN, INNER),
    Layout.EXPERTS_IN_OUT: (EXPERTS, INNER, HIDDEN),
}


def _weight(layout: Layout, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPES[layout], generator=generator, dtype=torch.float64).to(dtype)


def _direction(seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    r = torch.randn(HIDDEN, generator=generator, dtype=torch.float64)
    return r / r.norm()


def _matrices(weight: torch.Tensor, layout: Layout) -> list[torch.Tensor]:
    """Every ``[out, in]`` matrix in ``weight`` (one per expert for fused layouts)."""
    view = as_out_in(weight, layout)
    return list(view) if view.ndim == 3 else [view]


def _along(weight: torch.Tensor, direction: torch.Tensor, layout: Layout) -> torch.Tensor:
    """``rᵀ W`` for every matrix: what each input neuron writes along ``r``."""
    return torch.einsum("o,...oi->...i", direction.to(weight.dtype), as_out_in(weight, layout))


ALL_LAYOUTS = pytest.mark.parametrize("layout", list(Layout))


@ALL_LAYOUTS
def test_as_out_in_puts_the_residual_dimension_second_to_last(layout: Layout) -> None:
    assert as_out_in(_weight(layout), layout).shape[-2:] == (HIDDEN, INNER)


@ALL_LAYOUTS
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_full_strength_removes_the_direction(layout: Layout, dtype: torch.dtype) -> None:
    weight = _weight(layout, dtype)
    r = _direction()
    edited = orthogonalize(weight, r, 1.0, layout)
    assert edited.shape == weight.shape and edited.dtype == dtype
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    assert _along(edited, r, layout).abs().max() < tolerance
    # Something was actually removed: the original writes along r were not zero.
    assert _along(weight, r, layout).abs().max() > 0.1


@ALL_LAYOUTS
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_zero_strength_is_the_identity(layout: Layout, dtype: torch.dtype) -> None:
    weight = _weight(layout, dtype)
    r = _direction()
    assert torch.equal(orthogonalize(weight, r, 0.0, layout), weight)
    assert torch.equal(orthogonalize_norm_preserving(weight, r, 0.0, layout), weight)


@ALL_LAYOUTS
def test_full_strength_is_idempotent(layout: Layout) -> None:
    weight = _weight(layout)
    r = _direction()
    once = orthogonalize(weight, r, 1.0, layout)
    twice = orthogonalize(once, r, 1.0, layout)
    torch.testing.assert_close(twice, once, rtol=0, atol=1e-12)
    once_np = orthogonalize_norm_preserving(weight, r, 1.0, layout)
    twice_np = orthogonalize_norm_preserving(once_np, r, 1.0, layout)
    torch.testing.assert_close(twice_np, once_np, rtol=0, atol=1e-12)


@ALL_LAYOUTS
@pytest.mark.parametrize("strength", [0.3, 1.0, 1.6])
def test_change_has_rank_at_most_one_per_matrix(layout: Layout, strength: float) -> None:
    weight = _weight(layout)
    r = _direction()
    edited = orthogonalize(weight, r, strength, layout)
    for before, after in zip(_matrices(weight, layout), _matrices(edited, layout), strict=True):
        change = after - before
        assert torch.linalg.matrix_rank(change).item() == 1
        # ... and it lies along r: the change is r (rᵀ change).
        torch.testing.assert_close(change, torch.outer(r, r @ change), rtol=0, atol=1e-12)


@ALL_LAYOUTS
@pytest.mark.parametrize("strength", [0.0, 0.4, 1.0])
def test_partial_strength_scales_the_component(layout: Layout, strength: float) -> None:
    weight = _weight(layout)
    r = _direction()
    edited = orthogonalize(weight, r, strength, layout)
    torch.testing.assert_close(
        _along(edited, r, layout), (1 - strength) * _along(weight, r, layout), rtol=0, atol=1e-12
    )


@ALL_LAYOUTS
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_norm_preserving_keeps_column_norms_and_removes_direction(
    layout: Layout, dtype: torch.dtype
) -> None:
    weight = _weight(layout, dtype)
    r = _direction()
    edited = orthogonalize_norm_preserving(weight, r, 1.0, layout)
    before = torch.linalg.vector_norm(as_out_in(weight, layout).double(), dim=-2)
    after = torch.linalg.vector_norm(as_out_in(edited, layout).double(), dim=-2)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=0)
    assert _along(edited, r, layout).abs().max() < (1e-12 if dtype == torch.float64 else 1e-5)
    # The plain edit does change the norms, so the test above is not vacuous.
    plain = torch.linalg.vector_norm(
        as_out_in(orthogonalize(weight, r, 1.0, layout), layout), dim=-2
    )
    assert (plain.double() - before).abs().max() > 1e-2


@ALL_LAYOUTS
@pytest.mark.parametrize("strength", [0.25, 1.0, 1.5])
def test_column_scale_matches_explicit_computation(layout: Layout, strength: float) -> None:
    weight = _weight(layout)
    r = _direction()
    edited = orthogonalize(weight, r, strength, layout)
    expected = torch.linalg.vector_norm(as_out_in(weight, layout), dim=-2) / (
        torch.linalg.vector_norm(as_out_in(edited, layout), dim=-2)
    )
    scale = column_scale(weight, r, strength, layout)
    assert scale.shape == expected.shape
    torch.testing.assert_close(scale, expected, rtol=1e-10, atol=0)


@ALL_LAYOUTS
def test_column_scale_keeps_factor_one_for_all_zero_columns(layout: Layout) -> None:
    r = _direction()
    weight = _weight(layout)
    as_out_in(weight, layout)[..., 1] = 0.0
    scale = column_scale(weight, r, 1.0, layout)
    assert torch.all(scale[..., 1] == 1.0)
    assert torch.isfinite(orthogonalize_norm_preserving(weight, r, 1.0, layout)).all()


@ALL_LAYOUTS
def test_column_scale_keeps_factor_one_for_columns_the_edit_zeroes(layout: Layout) -> None:
    factors = []
    for seed in range(6):
        r = _direction(seed=100 + seed)
        weight = _weight(layout, seed=seed)
        as_out_in(weight, layout)[..., 0] = 2.5 * r  # writes only along r: removed at strength 1
        factors.append(column_scale(weight, r, 1.0, layout)[..., 0])
    assert torch.all(torch.stack(factors) == 1.0)


@ALL_LAYOUTS
@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_edited_weight_computes_the_projected_output(layout: Layout, strength: float) -> None:
    # The hook path of editing.py relies on this: W' x == project_out(W x).
    weight = _weight(layout)
    r = _direction()
    x = torch.randn(INNER, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    original = as_out_in(weight, layout) @ x
    edited = as_out_in(orthogonalize(weight, r, strength, layout), layout) @ x
    torch.testing.assert_close(edited, project_out(original, r, strength), rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(HIDDEN,), (EXPERTS, HIDDEN)])
def test_bias_orthogonalisation(shape: tuple[int, ...]) -> None:
    bias = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    r = _direction()
    removed = orthogonalize_bias(bias, r, 1.0)
    assert (removed @ r).abs().max() < 1e-12
    assert torch.equal(orthogonalize_bias(bias, r, 0.0), bias)
    half = orthogonalize_bias(bias, r, 0.5)
    torch.testing.assert_close(half @ r, 0.5 * (bias @ r), rtol=0, atol=1e-12)
    torch.testing.assert_close(orthogonalize_bias(removed, r, 1.0), removed, rtol=0, atol=1e-12)


def test_bias_keeps_its_dtype() -> None:
    bias = torch.randn(HIDDEN).to(torch.bfloat16)
    assert orthogonalize_bias(bias, _direction(), 1.0).dtype == torch.bfloat16


# --- the layer weight kernel -------------------------------------------------------------------


def test_kernel_peaks_at_its_position() -> None:
    kernel = KernelParameters(
        max_weight=1.2, max_weight_position=4, min_weight=0.2, min_weight_distance=3
    )
    weights = kernel.weights(10)
    assert weights.shape == (10,) and weights.dtype == torch.float64
    assert weights[4].item() == pytest.approx(1.2)
    assert int(weights.argmax()) == 4


def test_kernel_falls_off_linearly_and_is_zero_beyond_distance() -> None:
    kernel = KernelParameters(
        max_weight=1.0, max_weight_position=5.5, min_weight=0.1, min_weight_distance=3.0
    )
    weights = kernel.weights(12)
    for layer in range(12):
        distance = abs(layer - 5.5)
        expected = 1.0 + (0.1 - 1.0) * distance / 3.0 if distance <= 3.0 else 0.0
        assert weights[layer].item() == pytest.approx(expected, abs=1e-12), layer
    assert weights[2].item() == 0.0 and weights[9].item() == 0.0  # distance 3.5
    assert weights[3].item() == pytest.approx(0.1 + 0.9 / 6)  # distance 2.5


def test_kernel_edge_is_min_weight_exactly_at_distance() -> None:
    kernel = KernelParameters(
        max_weight=0.8, max_weight_position=2, min_weight=0.3, min_weight_distance=2
    )
    weights = kernel.weights(6)
    assert weights[0].item() == pytest.approx(0.3) and weights[4].item() == pytest.approx(0.3)
    assert weights[5].item() == 0.0


def test_constant_kernel_is_flat_over_every_layer() -> None:
    for n_layers in (1, 2, 7, 32):
        weights = KernelParameters.constant(0.7, n_layers).weights(n_layers)
        assert torch.allclose(weights, torch.full((n_layers,), 0.7, dtype=torch.float64))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_weight_distance": 0.0},
        {"min_weight_distance": -1.0},
        {"max_weight": -0.1},
        {"min_weight": -0.1},
        {"max_weight": math.nan},
        {"max_weight_position": math.inf},
        {"min_weight_distance": math.inf},
    ],
)
def test_kernel_rejects_invalid_parameters(kwargs: dict[str, float]) -> None:
    values = {
        "max_weight": 1.0,
        "max_weight_position": 3.0,
        "min_weight": 0.5,
        "min_weight_distance": 2.0,
        **kwargs,
    }
    with pytest.raises(ValueError):
        KernelParameters(**values)


def test_ablation_parameters_give_weights_only_for_kinds_with_a_kernel() -> None:
    kernel = KernelParameters(1.0, 1.0, 0.5, 1.0)
    params = AblationParameters(direction_index=None, kernels={ComponentKind.MLP: kernel})
    weights = params.layer_weights(4)
    assert set(weights) == {ComponentKind.MLP}
    assert torch.equal(weights[ComponentKind.MLP], kernel.weights(4))
