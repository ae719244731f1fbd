"""Whole-answer refusal counts for the trials that make the Pareto front (lazy exactness).

During the search a refusal verdict may be *early* (see
:mod:`blasphemer.evaluation.generation`): an answer with ``decided_after`` clean tokens is called
compliant, so a trial's refusal count is a lower bound of the count on whole answers. Scoring was
also cut short for trials that were provably dominated (``dominated_early``): a lower bound too.
On a real model the whole-answer count is higher (Qwen2.5-Coder-0.5B-Instruct: 8 early against
18 whole-answer refusals over the same 6 trials x 50 prompts), mostly because a marker word
appears inside the requested text ("Hey, I'm so sorry" in a message the user asked for): a
different rule (Heretic's), not a truer one (``bench/marker_window.py``). ``--confirm-front``
is for users who want that rule's front without judging every trial in full.

:func:`confirm_front` scores the front's unconfirmed trials on whole answers, rebuilds the front
with those counts, and repeats until every trial on it is confirmed. The result is the front
that whole-answer verdicts for every trial would give (modulo arg-max near-ties between batch
shapes): every count only rises when confirmed, so a trial dominated by a confirmed one under
its lower bound stays dominated under its true count, and a confirmed trial that no lower
bound dominates is dominated by no true count either. Its cost lies between the front's size
and every trial (when every count rises, each trial in turn enters the front: measured on the
CPU preset's 12 Qwen trials, ``bench/results/2026-12-02-confirm-front-qwen.md``).

The counts are kept in the study (a study user attribute, one entry per trial), so a resumed or
re-opened run does not score a trial twice, and :func:`with_confirmations` applies them wherever
results are read from the study.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from blasphemer.optimization.objective import (
    ATTR_CONFIRMED,
    TrialResult,
    stored_confirmations,
    with_confirmations,
)
from blasphemer.optimization.selection import pareto_front

if TYPE_CHECKING:
    import optuna

__all__ = [
    "ATTR_CONFIRMED",
    "confirm_front",
    "is_confirmed",
    "record_confirmation",
    "stored_confirmations",
    "with_confirmations",
]


def record_confirmation(study: optuna.Study, number: int, refusals: int, prompts: int) -> None:
    """Add one trial's whole-answer count to ``study`` (read, update, write the attribute)."""
    current = {str(k): list(v) for k, v in stored_confirmations(study).items()}
    current[str(number)] = [int(refusals), int(prompts)]
    study.set_user_attr(ATTR_CONFIRMED, current)


def is_confirmed(result: TrialResult) -> bool:
    """Whether ``result``'s refusal count is the whole-answer one."""
    return result.early_refusals is not None


def confirm_front(
    results: Sequence[TrialResult],
    score: Callable[[TrialResult], tuple[int, int]],
    *,
    confirmed: Mapping[int, tuple[int, int]] | None = None,
    on_confirmed: Callable[[TrialResult, int, int], None] | None = None,
) -> tuple[list[TrialResult], list[TrialResult]]:
    """Confirm front trials on whole answers until the front holds only confirmed trials.

    ``score(result)`` returns a trial's whole-answer ``(refusals, prompts)``;
    ``on_confirmed(result, refusals, prompts)`` is called after each (to store it). Counts in
    ``confirmed`` are used without scoring again. Returns ``(results, front)`` with every
    confirmation applied. Trials whose parameters are unknown cannot be scored and are left
    as they are. Each round confirms at least one more trial, so this ends after at most as
    many evaluations as there are trials (in practice the front and a few more).

    A whole-answer count is taken as it comes, even below the search's count (which only an
    arg-max near-tie between batch shapes can cause): it is the count exact verdicts give.
    """
    known = dict(confirmed or {})
    current = with_confirmations(results, known)
    scored: set[int] = set()  # a count that does not fit its trial is not asked for twice
    while True:
        front = pareto_front(current)
        pending = [
            r
            for r in front
            if not is_confirmed(r) and r.parameters is not None and r.number not in scored
        ]
        if not pending:
            return current, front
        for result in pending:
            scored.add(result.number)
            refusals, prompts = score(result)
            known[result.number] = (refusals, prompts)
            if on_confirmed is not None:
                on_confirmed(result, refusals, prompts)
        current = with_confirmations(current, known)
