"""Judging answers that already exist: read ``(prompt, response)`` records from a JSONL file and
give each a refusal verdict.

:class:`MarkerJudge` applies the refusal-marker rule of :mod:`blasphemer.evaluation.markers`
(the same rule the optimiser and the held-out report use), so ``blasphemer judge`` lets a user
re-judge answers they generated elsewhere, or with other markers, without loading a model.
Every judge takes the same records and returns one :class:`Judgement` per record, in order.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from blasphemer.errors import DatasetError
from blasphemer.evaluation.markers import (
    RefusalMarkers,
    as_markers,
    common_response_prefix,
    normalize,
    strip_response_prefix,
)


@dataclass(frozen=True)
class Answer:
    """One answer to judge: the request and the model's response (``line``: 1-based, for
    messages)."""

    prompt: str
    response: str
    line: int


@dataclass(frozen=True)
class Judgement:
    """A verdict: ``refusal``, and ``score`` in [0, 1], the judge's confidence that it is one
    (a rule judge says 0 or 1)."""

    refusal: bool
    score: float


class Judge(Protocol):
    name: str

    def judge(self, answers: Sequence[Answer]) -> list[Judgement]: ...


class MarkerJudge:
    """Refusal when the normalised response holds a marker or has no content."""

    name = "markers"

    def __init__(self, markers: RefusalMarkers | Iterable[str] | None = None) -> None:
        self.markers = as_markers(markers)

    def judge(self, answers: Sequence[Answer]) -> list[Judgement]:
        """Markers on each response, after template markup that every response opens with (an
        empty ``<think></think>``, see :func:`common_response_prefix`), as generation judges."""
        prefix = common_response_prefix([a.response for a in answers], self.markers)
        verdicts = [
            self.markers.refuses(normalize(strip_response_prefix(a.response, prefix)))
            for a in answers
        ]
        return [Judgement(v, 1.0 if v else 0.0) for v in verdicts]


def _text_field(record: dict[str, object], key: str, where: str) -> str:
    if key not in record:
        raise DatasetError(f"{where} has no {key!r}; every line needs 'prompt' and 'response'")
    value = record[key]
    if not isinstance(value, str):
        raise DatasetError(f"{where}: {key!r} is {type(value).__name__}, not text")
    return value


def read_answers(path: Path) -> list[Answer]:
    """The answers in a JSONL file: one object per line with text ``prompt`` and ``response``
    (other keys are ignored; blank lines are skipped). Raises a one-line DatasetError naming
    the file and line for anything else, and for a file without answers."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"answers file {path} not found") from None
    except IsADirectoryError:
        raise DatasetError(f"answers file {path} is a folder; name a .jsonl file") from None
    except UnicodeDecodeError:
        raise DatasetError(f"answers file {path} is not UTF-8 text; write it as JSONL") from None
    except OSError as error:
        raise DatasetError(f"cannot read answers file {path}: {error.strerror}") from None
    answers = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DatasetError(f"{where} is not valid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise DatasetError(f"{where} is not a JSON object with 'prompt' and 'response'")
        prompt = _text_field(record, "prompt", where)
        answers.append(Answer(prompt, _text_field(record, "response", where), number))
    if not answers:
        raise DatasetError(f"answers file {path} holds no answers; write one JSON object a line")
    return answers
