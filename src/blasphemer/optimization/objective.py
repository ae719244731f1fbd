"""The objective ``study.optimize`` calls: sample an edit, apply it, score it, undo it.

Objectives, all minimised: the refusal rate on the *select* split of harmful prompts, the KL
divergence on harmless prompts, then one value per extra scorer. What a trial measured is also
kept in its user attributes, so a :class:`TrialResult` can be rebuilt from the storage alone.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import optuna
from optuna.trial import FrozenTrial, TrialState

from blasphemer.ablation import AblationParameters
from blasphemer.architectures.base import ModelMap
from blasphemer.editing import Ablation, DirectionSource
from blasphemer.evaluation.base import Scorer
from blasphemer.optimization.search_space import (
    SearchSpace,
    parameters_from_dict,
    parameters_to_dict,
)

# User attribute names (stable: results of earlier runs are read back with them). Everything a
# trial measured is one dict under ATTR_RESULT, keyed by the other names.
ATTR_RESULT = "result"
ATTR_ABLATION = "ablation"
ATTR_REFUSALS = "refusals"
ATTR_N_PROMPTS = "n_prompts"
ATTR_REFUSAL_RATE = "refusal_rate"
ATTR_KL = "kl"
ATTR_EXTRA = "extra_scores"
ATTR_SECONDS = "seconds"
ATTR_EDITED = "edited_writers"
ATTR_PARTIAL = "dominated_early"  # scoring stopped once the trial was provably dominated
ATTR_PHASES = "phases_s"  # seconds per phase: apply, kl, refusals, extra, restore


_PHASES = ("apply", "kl", "refusals", "extra", "restore")


class RefusalOutcome(Protocol):
    @property
    def rate(self) -> float: ...

    @property
    def refused(self) -> Sequence[bool]: ...

    @property
    def partial(self) -> bool: ...


class RefusalEvaluator(Protocol):
    """What the objective needs of :class:`blasphemer.evaluation.RefusalScorer`."""

    def evaluate(
        self, on_batch: Any = None, should_stop: Callable[[int, int], bool] | None = None
    ) -> RefusalOutcome: ...


def dominance_stop(
    kl: float, n_prompts: int, finished: Sequence[tuple[float, float]]
) -> Callable[[int, int], bool]:
    """``should_stop`` for the refusal evaluation: stop once the trial cannot reach the front.

    After ``refused`` refusals the final rate is at least ``refused / n_prompts`` whatever the
    remaining prompts do. If a finished trial has a rate and a KL no higher than that bound and
    this trial's (already measured) KL, this trial is dominated and further prompts cannot
    change that. Exact, not a heuristic: a trial stopped this way could never be on the front.
    """

    def stop(refused: int, _judged: int) -> bool:
        bound = refused / n_prompts
        return any(rate <= bound and other_kl <= kl for rate, other_kl in finished)

    return stop


class DivergenceScorer(Protocol):
    """What the objective needs of :class:`blasphemer.evaluation.KLScorer`."""

    def score(self) -> float: ...


@dataclass(frozen=True)
class TrialResult:
    """What one finished trial proposed and measured. ``values`` are its objective values."""

    number: int
    values: tuple[float, ...]
    parameters: AblationParameters | None
    refusals: int | None = None
    n_prompts: int | None = None
    seconds: float | None = None
    extra: Mapping[str, float] = field(default_factory=dict)
    dominated_early: bool = False  # refusal scoring stopped early: ``refusals`` is a lower bound
    # The search's own count when ``refusals`` was confirmed on whole answers afterwards
    # (:mod:`blasphemer.optimization.confirmation`); None while it is the search's count.
    early_refusals: int | None = None

    @property
    def refusal_rate(self) -> float:
        return self.values[0]

    @property
    def kl(self) -> float:
        return self.values[1]

    @classmethod
    def from_trial(cls, trial: FrozenTrial, search_space: SearchSpace | None = None) -> TrialResult:
        """Rebuild a result from a COMPLETE trial (its values and user attributes).

        The parameters come from the ``ablation`` user attribute, or, for trials recorded
        without it, from ``trial.params`` through ``search_space``.
        """
        if trial.state != TrialState.COMPLETE or trial.values is None:
            raise ValueError(f"trial {trial.number} is {trial.state.name}, not COMPLETE")
        attrs = dict(trial.user_attrs.get(ATTR_RESULT, trial.user_attrs))
        parameters: AblationParameters | None = None
        if ATTR_ABLATION in attrs:
            parameters = parameters_from_dict(attrs[ATTR_ABLATION])
        elif search_space is not None:
            parameters = search_space.from_params(trial.params)
        return cls(
            number=trial.number,
            values=tuple(float(v) for v in trial.values),
            parameters=parameters,
            refusals=_optional_int(attrs.get(ATTR_REFUSALS)),
            n_prompts=_optional_int(attrs.get(ATTR_N_PROMPTS)),
            seconds=_optional_float(attrs.get(ATTR_SECONDS)),
            extra={str(k): float(v) for k, v in dict(attrs.get(ATTR_EXTRA, {})).items()},
            dominated_early=bool(attrs.get(ATTR_PARTIAL, False)),
        )


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _finite_or_inf(value: float) -> float:
    return value if not math.isnan(value) else math.inf


def completed_results(
    study: optuna.Study, search_space: SearchSpace | None = None
) -> list[TrialResult]:
    """:class:`TrialResult` of every COMPLETE trial of ``study``, in trial-number order, with the
    whole-answer refusal counts recorded in the study applied (see
    :mod:`blasphemer.optimization.confirmation`)."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    results = [
        TrialResult.from_trial(t, search_space) for t in sorted(trials, key=lambda t: t.number)
    ]
    return with_confirmations(results, stored_confirmations(study))


# Whole-answer refusal counts confirmed after the search (see
# :mod:`blasphemer.optimization.confirmation`, which computes them); here because every reader
# of a study's results applies them.
ATTR_CONFIRMED = "confirmed_refusals"
"""Study user attribute: ``{str(trial number): [whole-answer refusals, prompts]}``."""


def stored_confirmations(study: optuna.Study) -> dict[int, tuple[int, int]]:
    """Whole-answer ``(refusals, prompts)`` per trial number recorded in ``study``."""
    raw: Any = study.user_attrs.get(ATTR_CONFIRMED, {})
    if not isinstance(raw, Mapping):
        return {}
    confirmed: dict[int, tuple[int, int]] = {}
    for key, value in raw.items():
        try:
            refusals, prompts = value
            confirmed[int(key)] = (int(refusals), int(prompts))
        except (TypeError, ValueError):
            continue  # a malformed entry is ignored: that trial is simply confirmed again
    return confirmed


def with_confirmations(
    results: Sequence[TrialResult], confirmed: Mapping[int, tuple[int, int]]
) -> list[TrialResult]:
    """``results`` with each confirmed trial's refusal rate and count replaced by its
    whole-answer ones (``early_refusals`` keeps the search's count). A count over another number
    of prompts than the trial's is ignored: the trial stays unconfirmed."""
    updated: list[TrialResult] = []
    for result in results:
        entry = confirmed.get(result.number)
        if entry is None or result.early_refusals is not None:
            updated.append(result)
            continue
        refusals, prompts = entry
        if prompts <= 0 or (result.n_prompts is not None and result.n_prompts != prompts):
            updated.append(result)
            continue
        updated.append(
            dataclasses.replace(
                result,
                values=(refusals / prompts, *result.values[1:]),
                refusals=refusals,
                n_prompts=prompts,
                early_refusals=result.refusals,
                dominated_early=False,
            )
        )
    return updated


class Objective:
    """Callable for ``study.optimize``: returns ``(refusal rate, KL, *extra scores)``.

    The edit is applied as an :class:`~blasphemer.editing.EditHandle` in a ``with`` block, so
    the model is restored bit-for-bit even when a scorer raises. ``on_trial_start`` gets the
    trial number and its parameters before scoring; ``on_trial_end`` gets the result after.
    """

    def __init__(
        self,
        *,
        model_map: ModelMap,
        directions: DirectionSource,
        search_space: SearchSpace,
        refusal_scorer: RefusalEvaluator,
        kl_scorer: DivergenceScorer,
        extra_scorers: Sequence[Scorer] = (),
        on_trial_start: Callable[[int, AblationParameters], None] | None = None,
        on_trial_end: Callable[[TrialResult], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
        prune_dominated: bool = True,
    ) -> None:
        names = [s.name for s in extra_scorers]
        if len(set(names)) != len(names) or {"refusals", "kl"} & set(names):
            raise ValueError(f"extra scorer names must be unique and not refusals/kl: {names}")
        self.model_map = model_map
        self.directions = directions
        self.search_space = search_space
        self.refusal_scorer = refusal_scorer
        self.kl_scorer = kl_scorer
        self.extra_scorers = tuple(extra_scorers)
        self.on_trial_start = on_trial_start
        self.on_trial_end = on_trial_end
        self.clock = clock
        # Extra objectives make dominance need all of them, so pruning is for two objectives.
        self.prune_dominated = prune_dominated and not self.extra_scorers

    @property
    def n_objectives(self) -> int:
        """How many values each trial returns (the study needs as many directions)."""
        return 2 + len(self.extra_scorers)

    def __call__(self, trial: optuna.Trial) -> tuple[float, ...]:
        parameters = self.search_space.sample(trial)
        if self.on_trial_start is not None:
            self.on_trial_start(trial.number, parameters)
        started = self.clock()
        marks = [started]
        with Ablation(self.directions, parameters).apply(self.model_map) as handle:
            marks.append(self.clock())
            kl = float(self.kl_scorer.score())  # first: one forward pass, and pruning needs it
            marks.append(self.clock())
            stop = self._stop_rule(trial, kl)
            outcome = self.refusal_scorer.evaluate(should_stop=stop)
            marks.append(self.clock())
            extra = {s.name: float(s.score()) for s in self.extra_scorers}
            edited = len(handle.edited)
            marks.append(self.clock())
        marks.append(self.clock())
        seconds = marks[-1] - started
        phases = dict(zip(_PHASES, (b - a for a, b in itertools.pairwise(marks)), strict=True))
        refused = list(outcome.refused)
        rate = float(outcome.rate)
        # Optuna rejects NaN objective values; a diverged edit is simply very bad (inf).
        kl = _finite_or_inf(kl)
        extra = {name: _finite_or_inf(value) for name, value in extra.items()}
        # One attribute, one storage round trip (each is a commit; a dozen per trial showed).
        trial.set_user_attr(
            ATTR_RESULT,
            {
                ATTR_ABLATION: parameters_to_dict(parameters),
                ATTR_REFUSALS: sum(refused),
                ATTR_N_PROMPTS: len(refused),
                ATTR_REFUSAL_RATE: rate,
                ATTR_KL: kl if math.isfinite(kl) else str(kl),
                ATTR_EXTRA: {k: v if math.isfinite(v) else str(v) for k, v in extra.items()},
                ATTR_SECONDS: seconds,
                ATTR_EDITED: edited,
                ATTR_PARTIAL: bool(outcome.partial),
                ATTR_PHASES: phases,
            },
        )
        values = (rate, kl, *extra.values())
        if self.on_trial_end is not None:
            self.on_trial_end(
                TrialResult(
                    number=trial.number,
                    values=values,
                    parameters=parameters,
                    refusals=sum(refused),
                    n_prompts=len(refused),
                    seconds=seconds,
                    extra=extra,
                )
            )
        return values

    def _stop_rule(self, trial: optuna.Trial, kl: float) -> Callable[[int, int], bool] | None:
        if not self.prune_dominated or not math.isfinite(kl):
            return None
        finished = [
            (t.values[0], t.values[1])
            for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.values is not None
        ]
        if not finished:
            return None
        n_prompts = getattr(self.refusal_scorer, "n_prompts", None)
        if n_prompts is None:
            return None
        return dominance_stop(kl, int(n_prompts), finished)
