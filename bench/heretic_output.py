"""What a Heretic run leaves behind, read back: its Optuna journal (every trial's refusals, KL
and times) and its console lines (where a trial's time goes, the batch size it chose).

Split from :mod:`heretic_driver`, which runs Heretic and re-exports these names.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from bench_common import BenchError

# Console lines inside one Heretic trial, in order, and the phase each one opens. A phase ends
# at the next line of this list (or, for the last one, at its closing line).
TRIAL_LINES = (
    ("Running trial ", None),
    ("* Resetting model...", "reset"),
    ("* Abliterating...", "abliterate"),
    ("* Obtaining first-token probability distributions...", "kl"),
    ("* KL divergence:", None),
    ("* Counting model refusals...", "refusals"),
    ("* Refusals:", None),
)

# Journal operations written by Optuna's JournalStorage (optuna/storages/journal/_storage.py).
_OP_CREATE_TRIAL = 4
_OP_SET_TRIAL_STATE_VALUES = 6
_OP_SET_TRIAL_USER_ATTR = 8
_STATE_COMPLETE = 1


# --- the journal --------------------------------------------------------------------------------


@dataclass(frozen=True)
class HereticTrial:
    """One trial from Heretic's journal. ``index`` is 1-based, as Heretic's menu shows it."""

    trial_id: int
    index: int | None
    complete: bool
    refusals: int | None
    n_prompts: int | None
    kl: float | None
    started: datetime | None
    finished: datetime | None

    @property
    def key(self) -> int | None:
        return self.index

    @property
    def seconds(self) -> float | None:
        if self.started is None or self.finished is None:
            return None
        return (self.finished - self.started).total_seconds()


def parse_journal(path: Path) -> list[HereticTrial]:
    """Every trial in an Optuna journal file written by Heretic, in creation order."""
    trials: dict[int, dict[str, Any]] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise BenchError(f"cannot read Heretic's journal {path}: {error.strerror}") from None
    for line in text.splitlines():
        if not line.strip():
            continue
        op = json.loads(line)
        code = op.get("op_code")
        if code == _OP_CREATE_TRIAL:
            trials[len(trials)] = {"started": op.get("datetime_start"), "attrs": {}}
        elif code == _OP_SET_TRIAL_USER_ATTR:
            trials[op["trial_id"]]["attrs"].update(op["user_attr"])
        elif code == _OP_SET_TRIAL_STATE_VALUES:
            trial = trials[op["trial_id"]]
            trial["state"] = op.get("state")
            if op.get("datetime_complete"):
                trial["finished"] = op["datetime_complete"]
    result = []
    for trial_id, trial in trials.items():
        attrs = trial["attrs"]
        result.append(
            HereticTrial(
                trial_id=trial_id,
                index=attrs.get("index"),
                complete=trial.get("state") == _STATE_COMPLETE,
                refusals=attrs.get("refusals"),
                n_prompts=attrs.get("n_bad_prompts"),
                kl=attrs.get("kl_divergence"),
                started=_datetime(trial.get("started")),
                finished=_datetime(trial.get("finished")),
            )
        )
    return result


def _datetime(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def trial_phases(lines: Sequence[tuple[float, str]]) -> list[dict[str, float]]:
    """Seconds each trial spent resetting, abliterating, on KL and on refusals, from its lines.

    A trial whose lines are not all there (cut off, or a format this does not know) is left out.
    """
    trials: list[dict[str, float]] = []
    marks: dict[str, float] = {}
    for at, text in lines:
        stripped = text.strip()
        for index, (marker, _) in enumerate(TRIAL_LINES):
            if stripped.startswith(marker):
                if index == 0:
                    marks = {}
                marks[marker] = at
                if index == len(TRIAL_LINES) - 1 and len(marks) == len(TRIAL_LINES):
                    trials.append(_phases_from(marks))
                break
    return trials


def _phases_from(marks: dict[str, float]) -> dict[str, float]:
    ordered = [marks[marker] for marker, _ in TRIAL_LINES]
    phases: dict[str, float] = {}
    for (_, phase), start, end in zip(TRIAL_LINES, ordered, ordered[1:], strict=False):
        if phase is not None:
            phases[phase] = end - start
    return phases


def batch_size_from(lines: Sequence[tuple[float, str]]) -> int | None:
    """The batch size Heretic chose (or was given), from its console line."""
    for _, text in lines:
        if "Chosen batch size:" in text:
            word = text.rsplit(":", 1)[1].strip()
            return int(word) if word.isdigit() else None
    return None


def find_journal(workdir: Path) -> Path:
    journals = sorted((workdir / "checkpoints").glob("*.jsonl"))
    if len(journals) != 1:
        raise BenchError(
            f"expected one Heretic journal in {workdir / 'checkpoints'}, found {len(journals)}"
        )
    return journals[0]
