"""The search space: stable names, ranges, reference point and round trips."""

from __future__ import annotations

import optuna
import pytest
import torch
from optuna.trial import FixedTrial

from blasphemer.ablation import AblationParameters, KernelParameters
from blasphemer.architectures.base import ComponentKind
from blasphemer.optimization.search_space import (
    SearchSpace,
    parameters_from_dict,
    parameters_to_dict,
)

ATTN, MLP = ComponentKind.ATTENTION, ComponentKind.MLP


def test_build_converts_relative_ranges_to_layers() -> None:
    space = SearchSpace.build(21)
    assert space.direction_index == pytest.approx((8.0, 18.0))
    assert space.max_weight_position == pytest.approx((8.0, 20.0))
    assert space.min_weight_distance == pytest.approx((1.0, 12.6))
    assert space.max_weight == (0.8, 1.5)
    assert space.min_weight_fraction == (0.0, 1.0)


def test_tiny_models_get_a_valid_space() -> None:
    for n_layers in (1, 2, 3):
        space = SearchSpace.build(n_layers)
        low, high = space.min_weight_distance
        assert 1.0 <= low <= high


def test_invalid_spaces_are_rejected() -> None:
    with pytest.raises(ValueError):
        SearchSpace.build(0)
    with pytest.raises(ValueError):
        SearchSpace.build(8, direction_scopes=("sideways",))
    with pytest.raises(ValueError):
        SearchSpace.build(8, max_weight=(1.5, 0.8))


def _global_params(space: SearchSpace) -> dict[str, object]:
    return {
        "direction_scope": "global",
        "direction_index": 10.5,
        "attn.max_weight": 1.2,
        "attn.max_weight_position": 12.0,
        "attn.min_weight": 0.5,
        "attn.min_weight_distance": 4.0,
        "mlp.max_weight": 0.9,
        "mlp.max_weight_position": 15.0,
        "mlp.min_weight": 0.0,
        "mlp.min_weight_distance": 2.0,
    }


def test_sample_with_fixed_trial_uses_stable_names() -> None:
    space = SearchSpace.build(21)
    params = space.sample(FixedTrial(_global_params(space)))
    assert params.direction_index == 10.5
    assert params.kernels[ATTN] == KernelParameters(1.2, 12.0, 0.6, 4.0)  # min = fraction · max
    assert params.kernels[MLP] == KernelParameters(0.9, 15.0, 0.0, 2.0)
    assert params.norm_preserving is False


def test_per_layer_scope_has_no_direction_index() -> None:
    space = SearchSpace.build(21)
    values = _global_params(space)
    values["direction_scope"] = "per_layer"
    del values["direction_index"]
    assert space.sample(FixedTrial(values)).direction_index is None


def test_single_scope_and_searched_norm_preservation() -> None:
    space = SearchSpace.build(21, direction_scopes=("per_layer",), norm_preserving=None)
    values = _global_params(space)
    del values["direction_scope"], values["direction_index"]
    values["norm_preserving"] = True
    params = space.sample(FixedTrial(values))
    assert params.direction_index is None and params.norm_preserving is True


def test_to_params_round_trips_through_sample() -> None:
    space = SearchSpace.build(21, norm_preserving=None)
    original = AblationParameters(
        9.25,
        {ATTN: KernelParameters(1.1, 10.0, 0.55, 3.0), MLP: KernelParameters(1.4, 19.0, 0.7, 8.0)},
        True,
    )
    rebuilt = space.from_params(space.to_params(original))
    assert rebuilt.direction_index == original.direction_index
    assert rebuilt.norm_preserving
    for kind in (ATTN, MLP):
        for name in ("max_weight", "max_weight_position", "min_weight", "min_weight_distance"):
            assert getattr(rebuilt.kernels[kind], name) == pytest.approx(
                getattr(original.kernels[kind], name)
            )


def test_to_params_clamps_into_the_space() -> None:
    space = SearchSpace.build(21)
    wild = AblationParameters(0.0, {ATTN: KernelParameters(9.0, 0.0, 0.0, 100.0)})
    params = space.to_params(wild)
    assert params["direction_index"] == space.direction_index[0]
    assert params["attn.max_weight"] == space.max_weight[1]
    assert params["attn.max_weight_position"] == space.max_weight_position[0]
    assert params["attn.min_weight_distance"] == space.min_weight_distance[1]
    assert "mlp.max_weight" in params  # a searched kind missing from the input still gets values


@pytest.mark.parametrize("n_layers", [2, 5, 12, 21, 36, 80])
def test_reference_edits_every_layer_with_weight_one(n_layers: int) -> None:
    space = SearchSpace.build(n_layers)
    best_layer = 0.6 * (n_layers - 1)
    reference = space.from_params(space.reference_params(best_layer))
    assert reference.direction_index == pytest.approx(best_layer)
    for weights in reference.layer_weights(n_layers).values():
        assert torch.allclose(weights, torch.ones(n_layers, dtype=torch.float64))


def test_sampling_with_a_real_study_stays_in_range() -> None:
    space = SearchSpace.build(16, norm_preserving=None)
    study = optuna.create_study(
        directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=1)
    )
    study.enqueue_trial(space.reference_params(7.0))
    seen = []

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        params = space.sample(trial)
        seen.append(params)
        for kernel in params.kernels.values():
            assert 0.8 <= kernel.max_weight <= 1.5
            assert 0 <= kernel.min_weight <= kernel.max_weight
        return 0.0, 0.0

    study.optimize(objective, n_trials=20)
    assert seen[0].direction_index == 7.0
    assert {p.direction_index is None for p in seen} == {True, False}


def test_parameters_dict_round_trip_and_errors() -> None:
    params = AblationParameters(None, {MLP: KernelParameters(1.0, 3.0, 0.2, 2.0)}, True)
    assert parameters_from_dict(parameters_to_dict(params)) == params
    with pytest.raises(ValueError, match="malformed"):
        parameters_from_dict({"kernels": {}})
