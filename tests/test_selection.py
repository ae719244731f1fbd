"""Pareto front, tiers, selection rules and TrialResult round trips."""

from __future__ import annotations

import optuna
import pytest

from blasphemer.ablation import AblationParameters, KernelParameters
from blasphemer.architectures.base import ComponentKind
from blasphemer.errors import ConfigError
from blasphemer.optimization.objective import TrialResult, completed_results
from blasphemer.optimization.search_space import SearchSpace, parameters_to_dict
from blasphemer.optimization.selection import (
    Knee,
    LowestKL,
    LowestRefusals,
    Tier,
    TrialNumber,
    pareto_front,
    parse_rule,
    recommended,
    recommended_held_out,
    tier,
)


def result(number: int, refusals: float, kl: float, *extra: float) -> TrialResult:
    return TrialResult(number=number, values=(refusals, kl, *extra), parameters=None)


TRIALS = [
    result(0, 0.90, 0.01),
    result(1, 0.20, 0.05),
    result(2, 0.04, 0.30),  # Good
    result(3, 0.02, 0.50),
    result(4, 0.00, 1.20),
    result(5, 0.30, 0.40),  # dominated by 1
    result(6, 0.04, 0.30),  # tie with 2: dropped
    result(7, 0.05, 0.35),  # dominated by 2
]


def numbers(results: list[TrialResult]) -> list[int]:
    return [r.number for r in results]


def test_pareto_front_drops_dominated_and_ties() -> None:
    assert numbers(pareto_front(TRIALS)) == [4, 3, 2, 1, 0]


def test_pareto_front_uses_every_objective() -> None:
    trials = [result(0, 0.1, 0.1, 5.0), result(1, 0.1, 0.2, 1.0), result(2, 0.1, 0.2, 2.0)]
    assert numbers(pareto_front(trials)) == [0, 1]


def test_pareto_front_of_nothing() -> None:
    assert pareto_front([]) == []
    assert recommended([]) is None


@pytest.mark.parametrize(
    ("refusals", "kl", "expected"),
    [
        (0.0, 0.1, Tier.EXCELLENT),
        (0.01, 0.1, Tier.VERY_GOOD),  # 1 % is not < 1 %
        (0.0, 0.15, Tier.VERY_GOOD),
        (0.025, 0.25, Tier.VERY_GOOD),
        (0.05, 0.40, Tier.GOOD),
        (0.051, 0.1, Tier.POOR),
        (0.0, 0.41, Tier.POOR),
    ],
)
def test_tiers(refusals: float, kl: float, expected: Tier) -> None:
    assert tier(refusals, kl) is expected


def test_recommended_prefers_best_tier_then_lowest_refusals() -> None:
    front = pareto_front([*TRIALS, result(8, 0.03, 0.30), result(9, 0.035, 0.2)])
    # Good tier holds 8 (3 %, 0.30) and 9 (3.5 %, 0.20); the lowest refusal rate wins.
    assert recommended(front) == result(8, 0.03, 0.30)


def test_recommended_poor_front_falls_back() -> None:
    poor = [result(0, 0.08, 0.6), result(1, 0.10, 0.5), result(2, 0.5, 0.01)]
    assert recommended(pareto_front(poor)).number == 1  # lowest KL with ≤ 10 % refusals
    worse = [result(0, 0.3, 0.6), result(1, 0.5, 0.01)]
    assert recommended(pareto_front(worse)).number == 0  # else the lowest refusal rate


def test_recommended_held_out_uses_report_numbers() -> None:
    # The Qwen cpu-small front (bench/results/2026-12-02-qwen-cpu-small.md): on the select split
    # trial 11 has the fewest refusals; on the report split trial 5 has fewer at a lower KL.
    front = pareto_front([result(11, 0.0, 0.051), result(7, 0.02, 0.043), result(5, 0.04, 0.037)])
    assert numbers(front) == [11, 7, 5]
    held = {11: (0.11, 0.045), 7: (0.12, 0.040), 5: (0.08, 0.036)}
    assert recommended(front).number == 11
    star = recommended_held_out(front, held)
    assert star is not None and star.number == 5
    assert star is front[2]  # the front's own result: its select-split values are kept


def test_recommended_held_out_falls_back_with_fewer_than_two_scored() -> None:
    front = pareto_front([result(1, 0.0, 0.2), result(2, 0.1, 0.05)])
    assert recommended_held_out(front, {}) == recommended(front)
    assert recommended_held_out(front, {2: (0.0, 0.01)}) == recommended(front)
    # Scored trials only: trial 3 has held-out numbers but is not on this front.
    assert recommended_held_out(front, {2: (0.0, 0.01), 3: (0.0, 0.0)}) == recommended(front)


def test_recommended_held_out_knee_among_scored() -> None:
    front = pareto_front([result(1, 0.0, 0.10), result(2, 0.02, 0.05), result(3, 0.06, 0.02)])
    assert recommended(front).number == 1  # select split: 1 is Excellent
    # Held out: 1 refuses 4 % at 0.11 (Good), 2 refuses 2 % at 0.06 (Very good): 2 wins.
    star = recommended_held_out(front, {1: (0.04, 0.11), 2: (0.02, 0.06), 3: (0.06, 0.02)})
    assert star is not None and star.number == 2


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("12", TrialNumber(12)),
        (" 3 ", TrialNumber(3)),
        (7, TrialNumber(7)),
        ("knee", Knee()),
        ("KNEE", Knee()),
        ("lowest-kl:refusals<=0.05", LowestKL(0.05)),
        ("lowest-kl: refusals <= 5%", LowestKL(0.05)),
        ("lowest-refusals:kl<=0.2", LowestRefusals(0.2)),
        ("lowest-refusals:kl<=.25", LowestRefusals(0.25)),
    ],
)
def test_parse_rule(text: str | int, rule: object) -> None:
    parsed = parse_rule(text)
    assert parsed == rule
    assert parse_rule(parsed.text) == parsed


@pytest.mark.parametrize(
    "text",
    ["", "best", "-1", "lowest-kl", "lowest-kl:refusals<=", "lowest-kl:refusals<=1.5",
     "lowest-kl:kl<=0.1", "lowest-refusals:kl<=20%", "knee please"],
)  # fmt: skip
def test_invalid_rules_are_one_line_config_errors(text: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_rule(text)
    message = str(error.value)
    assert "\n" not in message
    if "between" not in message and "percentage" not in message:
        assert "knee" in message and "lowest-kl" in message


def test_rules_select() -> None:
    assert parse_rule("5").select(TRIALS).number == 5  # any complete trial, front or not
    assert parse_rule("lowest-kl:refusals<=5%").select(TRIALS).number == 2  # tie 2/6 -> 2
    assert parse_rule("lowest-kl:refusals<=0.02").select(TRIALS).number == 3
    assert parse_rule("lowest-refusals:kl<=0.3").select(TRIALS).number == 2
    assert parse_rule("knee").select(TRIALS).number == 2


def test_unsatisfiable_rules_say_what_is_possible() -> None:
    with pytest.raises(ConfigError, match=r"trial 99 .* choose one of 0, 1"):
        parse_rule("99").select(TRIALS)
    with pytest.raises(ConfigError, match=r"at most 1.0% \(best: 4.0%, trial 2\)"):
        parse_rule("lowest-kl:refusals<=1%").select(TRIALS[:3])
    with pytest.raises(ConfigError, match=r"best: 0\.010, trial 0"):
        parse_rule("lowest-refusals:kl<=0.001").select(TRIALS)
    with pytest.raises(ConfigError, match="no complete trials"):
        parse_rule("knee").select([])


def test_trial_result_round_trip_through_a_study() -> None:
    space = SearchSpace.build(8)
    params = AblationParameters(3.5, {ComponentKind.MLP: KernelParameters(1.0, 4.0, 0.5, 2.0)})
    study = optuna.create_study(directions=["minimize", "minimize"])
    study.enqueue_trial(space.reference_params(3.0))

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        if trial.number == 1:
            trial.set_user_attr("ablation", parameters_to_dict(params))
            trial.set_user_attr("refusals", 3)
            trial.set_user_attr("n_prompts", 40)
            trial.set_user_attr("extra_scores", {"length": 2.0})
        space.sample(trial)
        return 0.075, 0.2

    study.optimize(objective, n_trials=2)
    results = completed_results(study, space)
    assert results[0].parameters == space.from_params(study.trials[0].params)
    assert results[1].parameters == params
    assert (results[1].refusals, results[1].n_prompts) == (3, 40)
    assert results[1].extra == {"length": 2.0}
    assert (results[1].refusal_rate, results[1].kl) == (0.075, 0.2)
    assert completed_results(study)[0].parameters is None  # no attr and no space


def test_trial_result_needs_a_complete_trial() -> None:
    study = optuna.create_study(directions=["minimize", "minimize"])
    trial = study.ask()
    with pytest.raises(ValueError, match="not COMPLETE"):
        TrialResult.from_trial(study.trials[trial.number])


def test_held_out_scoring_starts_with_the_recommended_trial() -> None:
    from blasphemer.app.final_stages import held_out_order

    front = pareto_front([result(0, 0.0, 0.30), result(1, 0.02, 0.05), result(2, 0.5, 0.01)])
    star = recommended(front)
    assert star is not None and star.number != 0  # the knee is not the fewest refusals here
    order = held_out_order(front)
    assert order[0].number == star.number
    assert sorted(r.number for r in order) == sorted(r.number for r in front)
    rest = order[1:]
    assert rest == sorted(rest, key=lambda r: (r.refusal_rate, r.kl))
