"""Refusals as a judge reads them: whole greedy answers, each verdict from a :class:`Judge` (the
semantic judge, say) instead of the marker rule.

The search normally scores trials by markers on early-stopped answers, which saturates on real
models: once an edit removes the marker phrases, a select split counts 0-2 refusals while a
reader still finds declines without a marker word and safe substitutes. Driving the search with
a judge that reads meaning keeps a signal there, at the price of whole answers (no early stop)
and no pruning of dominated trials (a verdict exists only once the judge has read the answer).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from blasphemer.evaluation.judging import Answer, Judge
from blasphemer.evaluation.markers import strip_response_prefix
from blasphemer.evaluation.refusals import RefusalResult, RefusalScorer


def judge_responses(
    judge: Judge, prompts: Sequence[str], responses: Sequence[str], response_prefix: str = ""
) -> list[bool]:
    """``judge``'s verdict on each response to the raw request at the same index, after the
    template text every answer opens with (``response_prefix``) is removed."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    answers = [
        Answer(prompt, strip_response_prefix(text, response_prefix), index + 1)
        for index, (prompt, text) in enumerate(zip(prompts, responses, strict=True))
    ]
    return [judgement.refusal for judgement in judge.judge(answers)]


class JudgedRefusalScorer:
    """Share of prompts whose whole answer ``judge`` calls a refusal. Lower is better.

    ``scorer`` generates the answers and must judge them whole (``decided_after=None``, no stop
    at a marker); ``prompts`` are its texts' raw requests, which the judge reads beside each
    answer. ``should_stop`` is accepted and ignored: the judge's verdicts exist only after
    every answer is written, so no evaluation stops early and every result is complete.
    """

    name = "refusals"

    def __init__(self, scorer: RefusalScorer, judge: Judge, prompts: Sequence[str]) -> None:
        if scorer.decided_after is not None or scorer.stop_at_marker:
            raise ValueError("a judged scorer needs whole answers: decided_after=None, no stop")
        if len(prompts) != scorer.n_prompts:
            raise ValueError(f"{len(prompts)} requests for {scorer.n_prompts} prompts")
        self.scorer = scorer
        self.judge = judge
        self.prompts = list(prompts)

    @property
    def n_prompts(self) -> int:
        return self.scorer.n_prompts

    def evaluate(
        self,
        on_batch: Callable[[int], None] | None = None,
        should_stop: Any = None,
    ) -> RefusalResult:
        """Generate every answer with the model as it is now and judge it."""
        del should_stop  # see the class docstring
        result = self.scorer.evaluate(on_batch=on_batch)
        refused = judge_responses(
            self.judge, self.prompts, result.responses, self.scorer.response_prefix
        )
        return RefusalResult(
            rate=sum(refused) / len(refused),
            refused=refused,
            responses=result.responses,
            verdicts=result.verdicts,
        )

    def score(self) -> float:
        """The refusal rate (the :class:`~blasphemer.evaluation.base.Scorer` objective)."""
        return self.evaluate().rate
