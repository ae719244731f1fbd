"""Run ``blasphemer run`` as a child process and read back what the benchmarks need.

Timings come from three places, each with a fallback:
- phase boundaries from the timestamped stage lines of ``--quiet`` output (``[5/10] ...``);
- each trial's start and end from the study database (Optuna's ``trials`` table), else the
  trial's ``seconds`` in ``results.json``;
- the trials' scores and parameters from ``results.json``.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from bench_common import BenchError, ProcessRecord, child_env, run_timed

# Console lines that open each phase of a run: pipeline stage titles (``[5/10] Computing ...``),
# matched without their numbers so that a new stage elsewhere does not shift them.
PHASE_LINES = {
    "directions": "] Computing refusal directions",
    "baseline": "] Measuring the original model",
    "trials": "] Optimising",
    "finished": "] Pareto front and held-out numbers",
    "saving": "] Choosing and saving",
    "saved": "saved trial ",
}
# The lines that bound the directions and mark a saved model, for the summary of a run.
SUMMARY_PHASES = {
    "directions": PHASE_LINES["directions"],
    "directions_end": PHASE_LINES["baseline"],
    "saved": PHASE_LINES["saved"],
}


def executable() -> Path:
    """The ``blasphemer`` console script of the interpreter running the benchmark."""
    script = Path(sys.executable).with_name("blasphemer")
    found = script if script.exists() else shutil.which("blasphemer")
    if not found:
        raise BenchError("no `blasphemer` command next to this Python; run `make install` first")
    return Path(found)


@dataclass(frozen=True)
class BlasphemerOptions:
    """The settings a benchmark run passes to ``blasphemer run``."""

    model: str
    n_trials: int
    n_select_prompts: int
    n_fit_prompts: int
    n_report_prompts: int
    max_new_tokens: int
    system_prompt: str
    seed: int
    exact_verdicts: bool
    n_startup_trials: int | None = None  # None: Blasphemer's default
    batch_size: int | None = None  # None: Blasphemer measures it
    extra_args: tuple[str, ...] = ()
    dtype: str = "float32"


def run_command(
    exe: Path, options: BlasphemerOptions, output_dir: Path, run_dir: Path
) -> list[str]:
    """The ``blasphemer run`` command line for one benchmark run (CPU, no questions)."""
    command = [
        str(exe),
        "run",
        options.model,
        "--n-trials", str(options.n_trials),
        "--n-select-prompts", str(options.n_select_prompts),
        "--max-fit-prompts", str(options.n_fit_prompts),
        "--n-report-prompts", str(options.n_report_prompts),
        "--max-new-tokens", str(options.max_new_tokens),
        "--seed", str(options.seed),
        "--dtypes", options.dtype,
        "--device-map", "cpu",
        "--exact-verdicts" if options.exact_verdicts else "--no-exact-verdicts",
        "--yes",
        "--quiet",
        "--no-resume",
        "--output-dir", str(output_dir),
        "--run-dir", str(run_dir),
    ]  # fmt: skip
    if options.system_prompt:
        command += ["--system-prompt", options.system_prompt]
    if options.n_startup_trials is not None:
        command += ["--n-startup-trials", str(options.n_startup_trials)]
    if options.batch_size is not None:
        command += ["--batch-size", str(options.batch_size)]
    return command + list(options.extra_args)


@dataclass(frozen=True)
class BlasphemerTrial:
    number: int
    refusals: int | None
    n_prompts: int | None
    kl: float | None
    seconds: float | None  # end minus start in the study database, else the recorded seconds
    started: datetime | None
    finished: datetime | None

    @property
    def key(self) -> int:
        return self.number

    @property
    def complete(self) -> bool:
        return True  # results.json lists complete trials only


def _query(study_db: Path, sql: str) -> list[Any]:
    """Rows of a read-only query on an Optuna SQLite database; none if missing or unreadable."""
    if not study_db.exists():
        return []
    connection = sqlite3.connect(f"file:{study_db}?mode=ro", uri=True)
    try:
        return connection.execute(sql).fetchall()
    except sqlite3.Error:
        return []
    finally:
        connection.close()


def read_trial_times(study_db: Path) -> dict[int, tuple[datetime | None, datetime | None]]:
    """Trial number → (start, end) of the complete trials in an Optuna SQLite database."""
    rows = _query(
        study_db,
        "SELECT number, datetime_start, datetime_complete FROM trials WHERE state = 'COMPLETE'",
    )
    return {number: (_datetime(start), _datetime(end)) for number, start, end in rows}


def read_trial_phases(study_db: Path) -> dict[int, dict[str, float]]:
    """Trial number → seconds per phase (apply, kl, refusals, extra, restore) that the run
    recorded in each complete trial's ``result`` attribute; trials without them are left out."""
    rows = _query(
        study_db,
        "SELECT t.number, a.value_json FROM trial_user_attributes a "
        "JOIN trials t ON a.trial_id = t.trial_id "
        "WHERE a.key = 'result' AND t.state = 'COMPLETE'",
    )
    phases = {}
    for number, value in rows:
        recorded = json.loads(value).get("phases_s")
        if isinstance(recorded, dict):
            phases[number] = {str(k): float(v) for k, v in recorded.items()}
    return phases


def _datetime(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def read_trials(results_json: Path, study_db: Path) -> list[BlasphemerTrial]:
    """Every complete trial of a finished run with its scores (select split) and duration."""
    try:
        record = json.loads(results_json.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise BenchError(f"cannot read {results_json}: {error}") from None
    times = read_trial_times(study_db)
    trials = []
    for item in record.get("trials", []):
        started, finished = times.get(item["number"], (None, None))
        seconds = (
            (finished - started).total_seconds() if started and finished else item.get("seconds")
        )
        kl = item.get("kl")
        trials.append(
            BlasphemerTrial(
                number=item["number"],
                refusals=item.get("refusals"),
                n_prompts=item.get("n_prompts"),
                kl=float(kl) if isinstance(kl, int | float) else None,
                seconds=seconds,
                started=started,
                finished=finished,
            )
        )
    return sorted(trials, key=lambda t: t.number)


def batch_size_from(lines: Sequence[tuple[float, str]]) -> int | None:
    """The batch size a run measured or was given, from its console line."""
    for _, text in lines:
        if text.startswith("batch size "):
            word = text.split()[2]
            return int(word) if word.isdigit() else None
    return None


def recorded_timings(results_json: Path) -> dict[str, Any]:
    """Stage timings the run recorded itself (``results.json`` key ``timings_s``), if any.

    The benchmarks time stages from console lines, the same way for both tools; these are kept
    beside them in the results as a cross-check once ``blasphemer run`` records them.
    """
    try:
        record = json.loads(results_json.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    timings = record.get("timings_s")
    return dict(timings) if isinstance(timings, dict) else {}


@dataclass
class BlasphemerRun:
    process: ProcessRecord
    trials: list[BlasphemerTrial]
    output_dir: Path
    run_dir: Path
    results_json: Path
    study_db: Path


def run_blasphemer(
    exe: Path, options: BlasphemerOptions, workdir: Path, *, threads: int, timeout: float | None
) -> BlasphemerRun:
    """One ``blasphemer run`` in ``workdir`` (cleared first) with fresh study and output."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    output_dir, run_dir = workdir / "model", workdir / "run"
    process = run_timed(
        run_command(exe, options, output_dir, run_dir),
        cwd=workdir,
        env=child_env(threads),
        log_path=workdir / "log.txt",
        timeout=timeout,
    )
    if process.returncode != 0:
        raise BenchError(
            f"blasphemer exited with code {process.returncode}; see {process.log_path}\n"
            f"{process.tail()}"
        )
    results_json, study_db = output_dir / "results.json", run_dir / "study.db"
    trials = read_trials(results_json, study_db)
    return BlasphemerRun(process, trials, output_dir, run_dir, results_json, study_db)


def describe(options: BlasphemerOptions) -> dict[str, Any]:
    return {
        "exact_verdicts": options.exact_verdicts,
        "n_startup_trials": options.n_startup_trials,
        "batch_size": options.batch_size,
        "extra_args": list(options.extra_args),
    }
