"""The front confirmed on whole answers: equal to the front exact verdicts give, few evaluations,
counts kept in the study."""

from __future__ import annotations

import random

import optuna
import pytest

from blasphemer.ablation import AblationParameters, KernelParameters
from blasphemer.architectures.base import ComponentKind
from blasphemer.optimization.confirmation import (
    ATTR_CONFIRMED,
    confirm_front,
    record_confirmation,
    stored_confirmations,
    with_confirmations,
)
from blasphemer.optimization.objective import ATTR_RESULT, TrialResult, completed_results
from blasphemer.optimization.search_space import parameters_to_dict
from blasphemer.optimization.selection import pareto_front

PROMPTS = 50
PARAMETERS = AblationParameters(
    direction_index=3.0,
    kernels={ComponentKind.ATTENTION: KernelParameters(1.0, 2.0, 0.5, 2.0)},
)


def trial(number: int, refusals: int, kl: float, *, partial: bool = False) -> TrialResult:
    return TrialResult(
        number=number,
        values=(refusals / PROMPTS, kl),
        parameters=PARAMETERS,
        refusals=refusals,
        n_prompts=PROMPTS,
        dominated_early=partial,
    )


def random_study(rng: random.Random, size: int) -> tuple[list[TrialResult], dict[int, int]]:
    """Trials with early counts (lower bounds) and the whole-answer counts behind them."""
    early, exact = [], {}
    for number in range(size):
        true = rng.randrange(PROMPTS + 1)
        # Late refusals missed by the early rule, or a trial whose scoring stopped early.
        seen = max(0, true - rng.choice([0, 0, 0, 1, 2, 5, 12]))
        early.append(trial(number, seen, round(rng.uniform(0, 1), 2), partial=rng.random() < 0.2))
        exact[number] = true
    return early, exact


@pytest.mark.parametrize("seed", range(200))
def test_confirmed_front_equals_the_front_of_exact_counts(seed: int) -> None:
    rng = random.Random(seed)
    early, exact = random_study(rng, rng.randrange(1, 30))
    scored: list[int] = []

    def score(result: TrialResult) -> tuple[int, int]:
        scored.append(result.number)
        return exact[result.number], PROMPTS

    results, front = confirm_front(early, score)
    truth = pareto_front([trial(r.number, exact[r.number], r.kl) for r in early])
    assert [(r.number, r.values) for r in front] == [(r.number, r.values) for r in truth]
    assert len(scored) == len(set(scored))  # no trial scored twice
    assert all(r.early_refusals is not None for r in front)  # every count shown is whole-answer
    unscored = [r for r in results if r.number not in scored]
    assert all(r.early_refusals is None for r in unscored)  # the rest keep the search's count


def test_only_the_front_and_what_it_uncovers_is_scored() -> None:
    # 0 and 1 are on the early front; 1's late refusals drop it behind 2, which was dominated
    # by 1's lower bound; 3 stays dominated by 0 whatever its true count.
    early = [trial(0, 0, 0.50), trial(1, 1, 0.10), trial(2, 3, 0.20), trial(3, 5, 0.60)]
    exact = {0: 0, 1: 9, 2: 4, 3: 5}
    scored: list[int] = []

    def score(result: TrialResult) -> tuple[int, int]:
        scored.append(result.number)
        return exact[result.number], PROMPTS

    results, front = confirm_front(early, score)
    assert sorted(scored) == [0, 1, 2]
    assert [r.number for r in front] == [0, 2, 1]
    by_number = {r.number: r for r in results}
    assert (by_number[1].refusals, by_number[1].early_refusals) == (9, 1)
    assert by_number[3].early_refusals is None


def test_stored_counts_are_not_scored_again_and_each_new_one_is_reported() -> None:
    early = [trial(0, 0, 0.5), trial(1, 2, 0.1)]
    reported: list[tuple[int, int, int]] = []

    def score(result: TrialResult) -> tuple[int, int]:
        assert result.number == 1, "trial 0 was confirmed already"
        return 2, PROMPTS

    confirm_front(
        early,
        score,
        confirmed={0: (1, PROMPTS)},
        on_confirmed=lambda r, refusals, n: reported.append((r.number, refusals, n)),
    )
    assert reported == [(1, 2, PROMPTS)]


def test_a_count_over_other_prompts_is_not_applied_and_not_asked_for_forever() -> None:
    calls = []

    def score(result: TrialResult) -> tuple[int, int]:
        calls.append(result.number)
        return 3, PROMPTS + 1  # e.g. the select split changed under the study

    results, _front = confirm_front([trial(0, 1, 0.2)], score)
    assert calls == [0]
    assert results[0].early_refusals is None and results[0].refusals == 1


def test_with_confirmations_replaces_the_rate_and_keeps_the_search_count() -> None:
    partial = trial(4, 2, 0.3, partial=True)
    (confirmed,) = with_confirmations([partial], {4: (7, PROMPTS)})
    assert confirmed.values == (7 / PROMPTS, 0.3)
    assert (confirmed.refusals, confirmed.early_refusals) == (7, 2)
    assert not confirmed.dominated_early  # the count is whole now, not a lower bound
    assert with_confirmations([confirmed], {4: (9, PROMPTS)}) == [confirmed]  # applied once


def test_counts_live_in_the_study_and_completed_results_apply_them() -> None:
    study = optuna.create_study(directions=["minimize", "minimize"])
    for refusals, kl in ((1, 0.2), (4, 0.1)):
        attrs = {
            ATTR_RESULT: {
                "ablation": parameters_to_dict(PARAMETERS),
                "refusals": refusals,
                "n_prompts": PROMPTS,
            }
        }
        study.add_trial(
            optuna.trial.create_trial(values=[refusals / PROMPTS, kl], user_attrs=attrs)
        )
    record_confirmation(study, 0, 6, PROMPTS)
    record_confirmation(study, 1, 4, PROMPTS)
    assert stored_confirmations(study) == {0: (6, PROMPTS), 1: (4, PROMPTS)}
    first, second = completed_results(study)
    assert (first.refusals, first.early_refusals, first.refusal_rate) == (6, 1, 6 / PROMPTS)
    assert (second.refusals, second.early_refusals) == (4, 4)
    # A damaged attribute loses only the entries it damaged.
    study.set_user_attr(ATTR_CONFIRMED, {"0": "x", "1": [5, PROMPTS]})
    assert stored_confirmations(study) == {1: (5, PROMPTS)}
