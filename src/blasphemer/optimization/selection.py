"""Pick trials from a finished study: Pareto front, quality tiers and selection rules.

Selection rules (``--select``), parsed by :func:`parse_rule`:

* ``12`` — trial number 12 (any complete trial, on the front or not);
* ``lowest-kl:refusals<=0.05`` (or ``<=5%``) — the lowest KL among trials whose refusal rate is
  at most 5 %;
* ``lowest-refusals:kl<=0.2`` — the lowest refusal rate among trials whose KL is at most 0.2;
* ``knee`` — the default, :func:`recommended`: on the front, the trials of the best
  :class:`Tier` reached, and among them the lowest refusal rate (then lowest KL). When no front
  trial is better than *Poor*: the lowest KL among front trials refusing at most 10 %, else the
  lowest refusal rate.

A run without ``--select`` saves :func:`recommended_held_out`: the same knee rule applied to the
front trials' *held-out* numbers (report split, full-length answers, usually more prompts) when
two or more were scored there. The select split the optimiser saw saturates on a real model (a
whole front at 0/50 refusals there refused 8-12 % of 100 report prompts on Qwen2.5-Coder-0.5B),
so its knee cannot tell the trials apart. Choosing among a few trials by the report split makes
the chosen trial's report numbers slightly optimistic; the card says which rule chose it.

Ties are broken by the other objective, then by the lower trial number, so every rule is
deterministic.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from enum import Enum
from typing import TYPE_CHECKING

from blasphemer.errors import ConfigError

if TYPE_CHECKING:  # annotations only: the console imports tier() without torch or optuna
    from blasphemer.optimization.objective import TrialResult

RULE_FORMS = (
    "a trial number, 'lowest-kl:refusals<=0.05' (or '<=5%'), 'lowest-refusals:kl<=0.2' or 'knee'"
)
KNEE_FALLBACK_REFUSALS = 0.10


class Tier(Enum):
    """Quality tiers of (refusal rate, KL), best first."""

    EXCELLENT = "Excellent"
    VERY_GOOD = "Very good"
    GOOD = "Good"
    POOR = "Poor"

    @property
    def rank(self) -> int:
        return list(Tier).index(self)


def tier(refusal_rate: float, kl: float) -> Tier:
    """Excellent: < 1 % and < 0.15; Very good: ≤ 2.5 % and ≤ 0.25; Good: ≤ 5 % and ≤ 0.40."""
    if refusal_rate < 0.01 and kl < 0.15:
        return Tier.EXCELLENT
    if refusal_rate <= 0.025 and kl <= 0.25:
        return Tier.VERY_GOOD
    if refusal_rate <= 0.05 and kl <= 0.40:
        return Tier.GOOD
    return Tier.POOR


def _dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return all(x <= y for x, y in zip(a, b, strict=True)) and a != b


def pareto_front(results: Sequence[TrialResult]) -> list[TrialResult]:
    """Non-dominated results over all objectives (all minimised), sorted by their values.

    Of several results with identical values only the lowest trial number is kept.
    """
    unique: dict[tuple[float, ...], TrialResult] = {}
    for result in sorted(results, key=lambda r: r.number):
        unique.setdefault(result.values, result)
    candidates = list(unique.values())
    front = [r for r in candidates if not any(_dominates(o.values, r.values) for o in candidates)]
    return sorted(front, key=lambda r: (r.values, r.number))


def _by_refusals(r: TrialResult) -> tuple[float, float, int]:
    return (r.refusal_rate, r.kl, r.number)


def _by_kl(r: TrialResult) -> tuple[float, float, int]:
    return (r.kl, r.refusal_rate, r.number)


def recommended(front: Sequence[TrialResult]) -> TrialResult | None:
    """The ⭐ trial of a front (see the module docstring); ``None`` for an empty front."""
    if not front:
        return None
    best = min(tier(r.refusal_rate, r.kl).rank for r in front)
    if best < Tier.POOR.rank:
        in_tier = [r for r in front if tier(r.refusal_rate, r.kl).rank == best]
        return min(in_tier, key=_by_refusals)
    acceptable = [r for r in front if r.refusal_rate <= KNEE_FALLBACK_REFUSALS]
    if acceptable:
        return min(acceptable, key=_by_kl)
    return min(front, key=_by_refusals)


def recommended_held_out(
    front: Sequence[TrialResult], held_out: Mapping[int, tuple[float, float]]
) -> TrialResult | None:
    """The knee rule on the report split: ``held_out`` maps trial numbers to their held-out
    (refusal rate, KL). Falls back to :func:`recommended` when fewer than two front trials
    were scored there."""
    scored = [r for r in front if r.number in held_out]
    if len(scored) < 2:
        return recommended(front)
    proxies = [replace(r, values=tuple(held_out[r.number])) for r in scored]
    star = recommended(pareto_front(proxies))
    assert star is not None
    return next(r for r in scored if r.number == star.number)


class SelectionRule(ABC):
    """A way of choosing one trial. ``select`` raises :class:`ConfigError` if none qualifies."""

    @property
    @abstractmethod
    def text(self) -> str:
        """The rule written as ``--select`` accepts it."""

    @abstractmethod
    def select(self, results: Sequence[TrialResult]) -> TrialResult:
        """Choose from the complete trials ``results``."""


def _require(results: Sequence[TrialResult]) -> None:
    if not results:
        raise ConfigError("the study has no complete trials yet; run some trials first")


@dataclass(frozen=True)
class TrialNumber(SelectionRule):
    number: int

    @property
    def text(self) -> str:
        return str(self.number)

    def select(self, results: Sequence[TrialResult]) -> TrialResult:
        _require(results)
        for result in results:
            if result.number == self.number:
                return result
        numbers = sorted(r.number for r in results)
        shown = ", ".join(map(str, numbers[:20])) + (", ..." if len(numbers) > 20 else "")
        raise ConfigError(
            f"trial {self.number} is not a complete trial of this study; choose one of {shown}"
        )


@dataclass(frozen=True)
class LowestKL(SelectionRule):
    max_refusal_rate: float

    @property
    def text(self) -> str:
        return f"lowest-kl:refusals<={self.max_refusal_rate:g}"

    def select(self, results: Sequence[TrialResult]) -> TrialResult:
        _require(results)
        eligible = [r for r in results if r.refusal_rate <= self.max_refusal_rate]
        if not eligible:
            best = min(results, key=_by_refusals)
            raise ConfigError(
                f"no trial refuses at most {self.max_refusal_rate:.1%} (best: "
                f"{best.refusal_rate:.1%}, trial {best.number}); relax the --select rule or give a "
                "trial number"
            )
        return min(eligible, key=_by_kl)


@dataclass(frozen=True)
class LowestRefusals(SelectionRule):
    max_kl: float

    @property
    def text(self) -> str:
        return f"lowest-refusals:kl<={self.max_kl:g}"

    def select(self, results: Sequence[TrialResult]) -> TrialResult:
        _require(results)
        eligible = [r for r in results if r.kl <= self.max_kl]
        if not eligible:
            best = min(results, key=_by_kl)
            raise ConfigError(
                f"no trial has KL at most {self.max_kl:g} (best: {best.kl:.3f}, trial "
                f"{best.number}); relax the --select rule or give a trial number"
            )
        return min(eligible, key=_by_refusals)


@dataclass(frozen=True)
class Knee(SelectionRule):
    @property
    def text(self) -> str:
        return "knee"

    def select(self, results: Sequence[TrialResult]) -> TrialResult:
        _require(results)
        choice = recommended(pareto_front(results))
        assert choice is not None
        return choice


_NUMBER = r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(%?)\s*"
_LOWEST_KL = re.compile(rf"lowest-kl\s*:\s*refusals\s*<={_NUMBER}", re.IGNORECASE)
_LOWEST_REFUSALS = re.compile(rf"lowest-refusals\s*:\s*kl\s*<={_NUMBER}", re.IGNORECASE)


def parse_rule(text: str | int) -> SelectionRule:
    """Parse a ``--select`` value (see the module docstring); invalid ones raise ConfigError."""
    raw = str(text).strip()
    if re.fullmatch(r"[0-9]+", raw):
        return TrialNumber(int(raw))
    if raw.lower() == "knee":
        return Knee()
    if match := _LOWEST_KL.fullmatch(raw):
        rate = float(match[1]) / (100 if match[2] else 1)
        if not 0 <= rate <= 1:
            raise ConfigError(
                f"refusal rate in --select {raw!r} must be between 0 and 1 (or 0% and 100%)"
            )
        return LowestKL(rate)
    if match := _LOWEST_REFUSALS.fullmatch(raw):
        if match[2]:
            raise ConfigError(f"KL in --select {raw!r} is not a percentage; write e.g. kl<=0.2")
        return LowestRefusals(float(match[1]))
    raise ConfigError(f"invalid --select rule {raw!r}; use {RULE_FORMS}")
