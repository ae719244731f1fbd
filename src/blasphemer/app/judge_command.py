"""``blasphemer judge ANSWERS.jsonl``: refusal verdicts for answers a user already has."""

from __future__ import annotations

import json
from pathlib import Path

from blasphemer.app.config import Settings
from blasphemer.app.console import Console
from blasphemer.evaluation.judges import judge_names, make_judge
from blasphemer.evaluation.judging import read_answers
from blasphemer.evaluation.markers import wilson_interval


def judge(settings: Settings, answers_file: Path, as_json: bool, console: Console) -> int:
    """Judge every answer of ``answers_file`` with ``--judge``'s judges. With ``as_json`` one
    JSON line per answer, in order: ``line``, ``refusal`` and ``score`` of the first judge,
    ``judge`` (its name) and, for ``both``, ``marker_refusal``; else each judge's count with its
    interval."""
    answers = read_answers(answers_file)
    names = judge_names(settings.judge)
    verdicts = {
        name: make_judge(name, settings.refusal_markers, settings.judge_encoder).judge(answers)
        for name in names
    }
    first = names[0]
    if as_json:
        for index, answer in enumerate(answers):
            verdict = verdicts[first][index]
            record: dict[str, object] = {
                "line": answer.line,
                "refusal": verdict.refusal,
                "score": round(verdict.score, 4),
                "judge": first,
            }
            if "markers" in verdicts and first != "markers":
                record["marker_refusal"] = verdicts["markers"][index].refusal
            console.info(json.dumps(record))
        return 0
    for name in names:
        refused = sum(v.refusal for v in verdicts[name])
        low, high = wilson_interval(refused, len(answers))
        console.info(
            f"{answers_file}: {refused}/{len(answers)} answers are refusals "
            f"({refused / len(answers):.1%}, 95 % interval {low:.1%}-{high:.1%}; judge: {name})"
        )
    return 0
