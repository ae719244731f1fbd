"""The optimiser's search space: which edits a trial may propose, under stable parameter names.

A trial chooses

* a **direction scope**: ``"global"`` (one direction for every layer, picked by a float
  ``direction_index`` that interpolates between neighbouring layers) or ``"per_layer"`` (each
  layer removes its own direction);
* per component kind (attention out-projection, MLP down-projection), a **weight kernel**:
  strength ``max_weight`` at layer ``max_weight_position``, falling linearly to
  ``min_weight`` at ``min_weight_distance`` layers away, zero beyond.

Default ranges, with ``L`` layers (last index ``L − 1``):

===========================  ==========================  ==================================
parameter                    range                       why
===========================  ==========================  ==================================
``direction_index``          ``[0.4, 0.9] · (L − 1)``    refusal is read out middle-to-late
``<kind>.max_weight``        ``[0.8, 1.5]``              below 0.8 rarely removes refusals;
                                                         above 1 overshoots, sometimes needed
``<kind>.max_weight_position``  ``[0.4, 1.0] · (L − 1)``  the peak sits where the edit acts
``<kind>.min_weight``        ``[0, 1]`` × ``max_weight``  stored as a fraction of the peak
``<kind>.min_weight_distance``  ``[1, 0.6 · L]`` layers   narrow spike to most of the model
===========================  ==========================  ==================================

``min_weight`` is searched as a *fraction* of ``max_weight`` so that every sampled kernel falls
(or stays flat) away from its peak, and the space has no infeasible corner.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from blasphemer.ablation import AblationParameters, KernelParameters
from blasphemer.architectures.base import ComponentKind

GLOBAL = "global"
PER_LAYER = "per_layer"
SCOPES = (GLOBAL, PER_LAYER)

SCOPE_PARAM = "direction_scope"
INDEX_PARAM = "direction_index"
NORM_PARAM = "norm_preserving"


class TrialLike(Protocol):
    """The part of :class:`optuna.trial.Trial` (and ``FixedTrial``) that sampling uses."""

    def suggest_float(self, name: str, low: float, high: float) -> float: ...

    def suggest_categorical(self, name: str, choices: Any) -> Any: ...


def kernel_param(kind: ComponentKind, field: str) -> str:
    """Stable Optuna parameter name of one kernel field, e.g. ``"attn.max_weight"``."""
    return f"{kind.value}.{field}"


Range = tuple[float, float]


@dataclass(frozen=True)
class SearchSpace:
    """Absolute ranges for one model. Build it with :meth:`build`; sample with :meth:`sample`.

    ``norm_preserving`` is fixed when a bool and searched when ``None``.
    """

    n_layers: int
    direction_scopes: tuple[str, ...]
    direction_index: Range
    max_weight: Range
    max_weight_position: Range
    min_weight_fraction: Range
    min_weight_distance: Range
    kinds: tuple[ComponentKind, ...] = (ComponentKind.ATTENTION, ComponentKind.MLP)
    norm_preserving: bool | None = False

    def __post_init__(self) -> None:
        if self.n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {self.n_layers}")
        if not self.direction_scopes or set(self.direction_scopes) - set(SCOPES):
            raise ValueError(f"direction_scopes must be a non-empty subset of {SCOPES}")
        if not self.kinds:
            raise ValueError("kinds must name at least one component kind")
        for name in (
            "direction_index",
            "max_weight",
            "max_weight_position",
            "min_weight_fraction",
            "min_weight_distance",
        ):
            low, high = getattr(self, name)
            if not low <= high:
                raise ValueError(f"{name} range must have low <= high, got ({low}, {high})")
        if self.max_weight[0] < 0 or self.min_weight_fraction[0] < 0:
            raise ValueError("weights must be >= 0")
        if self.min_weight_distance[0] <= 0:
            raise ValueError("min_weight_distance must be > 0")

    @classmethod
    def build(
        cls,
        n_layers: int,
        *,
        direction_scopes: tuple[str, ...] = SCOPES,
        direction_index: Range = (0.4, 0.9),
        max_weight: Range = (0.8, 1.5),
        max_weight_position: Range = (0.4, 1.0),
        min_weight_fraction: Range = (0.0, 1.0),
        min_weight_distance: Range = (0.0, 0.6),
        kinds: tuple[ComponentKind, ...] = (ComponentKind.ATTENTION, ComponentKind.MLP),
        norm_preserving: bool | None = False,
    ) -> SearchSpace:
        """Turn relative ranges into absolute ones for a model with ``n_layers`` layers.

        ``direction_index`` and ``max_weight_position`` are fractions of the last layer index
        ``n_layers − 1``; ``min_weight_distance`` is a fraction of ``n_layers`` with a floor of
        one layer. ``max_weight`` and ``min_weight_fraction`` are used as given.
        """
        last = float(n_layers - 1)
        distance_low = max(1.0, min_weight_distance[0] * n_layers)
        distance_high = max(distance_low, min_weight_distance[1] * n_layers)
        return cls(
            n_layers=n_layers,
            direction_scopes=tuple(direction_scopes),
            direction_index=(direction_index[0] * last, direction_index[1] * last),
            max_weight=max_weight,
            max_weight_position=(max_weight_position[0] * last, max_weight_position[1] * last),
            min_weight_fraction=min_weight_fraction,
            min_weight_distance=(distance_low, distance_high),
            kinds=tuple(kinds),
            norm_preserving=norm_preserving,
        )

    # --- sampling ----------------------------------------------------------------------------

    def sample(self, trial: TrialLike) -> AblationParameters:
        """Draw one candidate edit from ``trial`` (an Optuna ``Trial`` or ``FixedTrial``)."""
        scope = (
            trial.suggest_categorical(SCOPE_PARAM, list(self.direction_scopes))
            if len(self.direction_scopes) > 1
            else self.direction_scopes[0]
        )
        direction_index = (
            trial.suggest_float(INDEX_PARAM, *self.direction_index) if scope == GLOBAL else None
        )
        kernels: dict[ComponentKind, KernelParameters] = {}
        for kind in self.kinds:
            peak = trial.suggest_float(kernel_param(kind, "max_weight"), *self.max_weight)
            position = trial.suggest_float(
                kernel_param(kind, "max_weight_position"), *self.max_weight_position
            )
            fraction = trial.suggest_float(
                kernel_param(kind, "min_weight"), *self.min_weight_fraction
            )
            distance = trial.suggest_float(
                kernel_param(kind, "min_weight_distance"), *self.min_weight_distance
            )
            kernels[kind] = KernelParameters(peak, position, peak * fraction, distance)
        norm_preserving = (
            bool(trial.suggest_categorical(NORM_PARAM, [False, True]))
            if self.norm_preserving is None
            else self.norm_preserving
        )
        return AblationParameters(direction_index, kernels, norm_preserving)

    def from_params(self, params: Mapping[str, Any]) -> AblationParameters:
        """Rebuild the edit a trial proposed from its ``trial.params``."""
        # Local import: optuna is only needed here and in the study, not to define the space.
        from optuna.trial import FixedTrial

        return self.sample(FixedTrial(dict(params)))

    def to_params(self, parameters: AblationParameters) -> dict[str, Any]:
        """Optuna parameter dict for ``study.enqueue_trial`` that reproduces ``parameters``.

        Values outside the space are clamped into it (Optuna would otherwise resample them).
        Kinds the space searches but ``parameters`` lacks get a zero-strength kernel.
        """
        params: dict[str, Any] = {}
        scope = GLOBAL if parameters.direction_index is not None else PER_LAYER
        if scope not in self.direction_scopes:
            scope = self.direction_scopes[0]
        if len(self.direction_scopes) > 1:
            params[SCOPE_PARAM] = scope
        if scope == GLOBAL:
            index = parameters.direction_index
            middle = sum(self.direction_index) / 2
            params[INDEX_PARAM] = _clamp(middle if index is None else index, self.direction_index)
        for kind in self.kinds:
            kernel = parameters.kernels.get(kind)
            if kernel is None:
                kernel = KernelParameters(0.0, self.max_weight_position[0], 0.0, 1.0)
            fraction = kernel.min_weight / kernel.max_weight if kernel.max_weight > 0 else 1.0
            params[kernel_param(kind, "max_weight")] = _clamp(kernel.max_weight, self.max_weight)
            params[kernel_param(kind, "max_weight_position")] = _clamp(
                kernel.max_weight_position, self.max_weight_position
            )
            params[kernel_param(kind, "min_weight")] = _clamp(fraction, self.min_weight_fraction)
            params[kernel_param(kind, "min_weight_distance")] = _clamp(
                kernel.min_weight_distance, self.min_weight_distance
            )
        if self.norm_preserving is None:
            params[NORM_PARAM] = parameters.norm_preserving
        return params

    def reference(self, direction_index: float | None) -> AblationParameters:
        """The classic full ablation, used to seed the study as its first trial.

        Global direction at ``direction_index`` (e.g. the layer whose direction is strongest;
        ``None`` for per-layer directions), strength 1 on every layer: the peak sits at the low
        end of its range and the distance reaches as far as the space allows, which with the
        default ranges covers every layer.
        """
        position = self.max_weight_position[0]
        distance = self.min_weight_distance[1]
        kernel = KernelParameters(1.0, position, 1.0, distance)
        norm = bool(self.norm_preserving)
        return AblationParameters(direction_index, dict.fromkeys(self.kinds, kernel), norm)

    def reference_params(self, direction_index: float | None) -> dict[str, Any]:
        """:meth:`reference` as an ``enqueue_trial`` dict (clamped into the space)."""
        return self.to_params(self.reference(direction_index))


def _clamp(value: float, bounds: Range) -> float:
    return float(min(max(value, bounds[0]), bounds[1]))


# --- JSON form of AblationParameters (trial user attrs, results.json, model card) ---------------


def parameters_to_dict(parameters: AblationParameters) -> dict[str, Any]:
    """JSON-able form of ``parameters``; :func:`parameters_from_dict` inverts it exactly."""
    return {
        "direction_index": parameters.direction_index,
        "norm_preserving": parameters.norm_preserving,
        "kernels": {
            kind.value: {
                "max_weight": kernel.max_weight,
                "max_weight_position": kernel.max_weight_position,
                "min_weight": kernel.min_weight,
                "min_weight_distance": kernel.min_weight_distance,
            }
            for kind, kernel in parameters.kernels.items()
        },
    }


def parameters_from_dict(data: Mapping[str, Any]) -> AblationParameters:
    """Inverse of :func:`parameters_to_dict`. Raises ``ValueError`` on malformed data."""
    try:
        kernels = {
            ComponentKind(kind): KernelParameters(
                float(values["max_weight"]),
                float(values["max_weight_position"]),
                float(values["min_weight"]),
                float(values["min_weight_distance"]),
            )
            for kind, values in data["kernels"].items()
        }
        index = data["direction_index"]
        return AblationParameters(
            None if index is None else float(index), kernels, bool(data["norm_preserving"])
        )
    except (KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"malformed ablation parameters: {error!r}") from None
