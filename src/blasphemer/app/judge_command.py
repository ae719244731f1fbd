"""``blasphemer judge ANSWERS.jsonl``: refusal verdicts for answers a user already has."""

from __future__ import annotations

import json
from pathlib import Path

from blasphemer.app.config import Settings
from blasphemer.app.console import Console
from blasphemer.evaluation.judging import make_judge, read_answers
from blasphemer.evaluation.markers import wilson_interval


def judge(
    settings: Settings, answers_file: Path, judge_name: str, as_json: bool, console: Console
) -> int:
    """Judge every answer of ``answers_file``; with ``as_json`` one JSON line per answer, in
    order (``line``, ``refusal``, ``score``, ``judge``), else the count with its interval."""
    answers = read_answers(answers_file)
    judge = make_judge(judge_name, settings.refusal_markers)
    verdicts = judge.judge(answers)
    if as_json:
        for answer, verdict in zip(answers, verdicts, strict=True):
            record = {
                "line": answer.line,
                "refusal": verdict.refusal,
                "score": verdict.score,
                "judge": judge.name,
            }
            console.info(json.dumps(record))
        return 0
    refused = sum(v.refusal for v in verdicts)
    low, high = wilson_interval(refused, len(verdicts))
    console.info(
        f"{answers_file}: {refused}/{len(verdicts)} answers are refusals "
        f"({refused / len(verdicts):.1%}, 95 % interval {low:.1%}-{high:.1%}; judge: {judge.name})"
    )
    return 0
