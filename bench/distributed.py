"""Benchmark: how one study scales over workers, and what coordinating them costs.

Two measurements, each on an SQLite file and on PostgreSQL (a throwaway local server like the
tests use; it runs with ``fsync=off``, so a production server's commits cost somewhat more):

1. **Throughput.** ``blasphemer worker`` processes (1, then 2, started at once) run the trials
   of a study of the demo model that one ``blasphemer run --n-trials 1`` started; each worker
   count gets its own copy of that study, and all its workers join before the first trial
   starts. Trials per hour over the window from the first trial start to the last completion,
   and the ratio 2 workers / 1 worker. Sampling stays random
   (``--n-startup-trials`` above the budget) so that both runs draw trials of the same kind.
2. **Coordination overhead.** The real trial loop (``run_trials``: budget gate, stale-trial
   check, ``ask``, heartbeat, parameters, user attributes, ``tell``) and the real objective on
   the demo model, with scorers that return at once, in 1 and 2 processes: milliseconds per
   trial outside scoring, the part of it spent holding the budget gate (serialised over all
   workers: the TPE sampler runs there), and SQL statements (storage round-trips) per trial,
   in all and inside the gate.

With T the scoring time of a trial, C the coordination overhead and G the gate time, N workers
on N machines run about ``min(N / (T + C), 1 / G)`` trials per second.

    python bench/distributed.py                   # both storages; writes bench/results/
    python bench/distributed.py --storages sqlite --trials 12 --no-write
    python bench/distributed.py --model /path/to/chat-model
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import multiprocessing
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.trial import TrialState

from blasphemer.app.pipeline import demo_model_path
from blasphemer.optimization.metadata import ATTR_BUDGET
from blasphemer.optimization.objective import TrialResult
from blasphemer.optimization.runner import BudgetGate, rdb_storage, run_trials
from blasphemer.optimization.study import create_or_load_study, normalize_url

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "bench" / "work"  # scratch (git ignores it); each run's folder is removed after
CLI = [sys.executable, "-m", "blasphemer.app.cli"]
# Scoring settings of a throughput trial: the defaults, with a held-out report kept small (it
# runs once, outside the measured window).
RUN_SETTINGS = ["--quiet", "--dtypes", "float32", "--n-report-prompts", "8", "--yes"]
JOINED = "Running trials until the study has"  # what a worker prints once it has joined


# --- storages -----------------------------------------------------------------------------------


@contextlib.contextmanager
def storages(names: list[str], folder: Path) -> Iterator[dict[str, Callable[[str], str]]]:
    """For each storage name, a function that gives the URL of a new, empty database."""
    makers: dict[str, Callable[[str], str]] = {}
    server = None
    if "sqlite" in names:
        makers["sqlite"] = lambda label: f"sqlite:///{folder / label}.db"
    if "postgresql" in names:
        sys.path.insert(0, str(ROOT / "tests"))
        from postgres_server import PostgresServer

        server = PostgresServer.start()
        makers["postgresql"] = lambda label: server.create_database(label).replace(
            "postgresql+psycopg://", "postgresql://"
        )
    try:
        yield makers
    finally:
        if server is not None:
            server.stop()


def environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


# --- 1. throughput ------------------------------------------------------------------------------


def throughput(
    model: str, url: str, folder: Path, counts: list[int], trials: int, batch_size: int
) -> dict[str, Any]:
    """Trials per hour of ``k`` worker processes for each ``k`` in ``counts``."""
    subprocess.run(
        [
            *CLI,
            "run",
            model,
            "--storage",
            url,
            "--study-name",
            "base",
            "--n-trials",
            "1",
            "--n-startup-trials",
            str(10 * trials),
            "--batch-size",
            str(batch_size),
            "--output-dir",
            str(folder / "out"),
            "--run-dir",
            str(folder / "run"),
            *RUN_SETTINGS,
        ],
        check=True,
        env=environment(),
        cwd=folder,
        stdout=subprocess.DEVNULL,
    )
    storage = optuna.storages.RDBStorage(normalize_url(url))
    rows: dict[str, Any] = {}
    for k in counts:
        name = f"workers{k}"
        optuna.copy_study(
            from_study_name="base", from_storage=storage, to_storage=storage, to_study_name=name
        )
        study = optuna.load_study(study_name=name, storage=storage)
        study.set_user_attr(ATTR_BUDGET, 1 + trials)
        logs = [folder / f"{name}-{index}.log" for index in range(k)]
        background = busy_cores(3.0)  # other work on the machine, measured just before
        with BudgetGate(study).hold():  # no trial starts before every worker has joined
            processes = [_start_worker(url, name, batch_size, log, folder) for log in logs]
            _wait_until_joined(processes, logs)
            at_start = [_schedstat(process.pid) for process in processes]
        at_end = _follow_schedstat(processes)
        for process, log in zip(processes, logs, strict=True):
            if process.wait() != 0:
                raise RuntimeError(f"a worker of {name} failed:\n{log.read_text()[-2000:]}")
        cpu_s, wait_s = (
            sum(end[i] - start[i] for start, end in zip(at_start, at_end, strict=True))
            for i in (0, 1)
        )
        done = [
            t
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.number > 0
        ]
        assert len(done) == trials, f"{name}: {len(done)} trials instead of {trials}"
        starts = [t.datetime_start for t in done if t.datetime_start is not None]
        ends = [t.datetime_complete for t in done if t.datetime_complete is not None]
        window = (max(ends) - min(starts)).total_seconds()
        scoring = [TrialResult.from_trial(t).seconds or 0.0 for t in done]
        rows[str(k)] = {
            "workers": k,
            "trials": len(done),
            "window_s": round(window, 2),
            "trials_per_hour": round(len(done) / window * 3600, 1),
            "mean_scoring_s": round(statistics.mean(scoring), 3),
            "background_cores": round(background, 2),
            "cpu_s_per_trial": round(cpu_s / len(done), 3),
            "cpu_wait_s_per_trial": round(wait_s / len(done), 3),
            "trials_per_worker": sorted(
                _count(str(t.user_attrs.get("worker")) for t in done).values()
            ),
        }
    storage.engine.dispose()
    first, last = rows[str(counts[0])], rows[str(counts[-1])]
    return {
        "by_workers": rows,
        "ratio": round(last["trials_per_hour"] / first["trials_per_hour"], 2),
        # What the ratio would be with a free core per worker: trials per CPU-second, times the
        # number of workers.
        "ratio_by_cpu_time": round(
            last["workers"] * first["cpu_s_per_trial"] / first["workers"] / last["cpu_s_per_trial"],
            2,
        ),
    }


def busy_cores(seconds: float) -> float:
    """How many CPU cores the whole machine kept busy over the next ``seconds`` (Linux)."""

    def busy() -> float:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    before = busy()
    time.sleep(seconds)
    return (busy() - before) / seconds


def _schedstat(pid: int) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for a CPU) of process ``pid`` (Linux)."""
    try:
        fields = Path(f"/proc/{pid}/schedstat").read_text().split()
    except OSError:
        return (0.0, 0.0)
    return (int(fields[0]) / 1e9, int(fields[1]) / 1e9)


def _follow_schedstat(processes: list[subprocess.Popen[bytes]]) -> list[tuple[float, float]]:
    """The last :func:`_schedstat` of each process before it exits (read every 0.1 s)."""
    last = [_schedstat(process.pid) for process in processes]
    while any(process.poll() is None for process in processes):
        for index, process in enumerate(processes):
            if process.poll() is None:
                now = _schedstat(process.pid)
                if now[0] >= last[index][0]:
                    last[index] = now
        time.sleep(0.1)
    return last


def _start_worker(
    url: str, name: str, batch_size: int, log: Path, folder: Path
) -> subprocess.Popen[bytes]:
    with log.open("wb") as output:
        return subprocess.Popen(
            [
                *CLI,
                "worker",
                "--storage",
                url,
                "--study-name",
                name,
                "--quiet",
                "--batch-size",
                str(batch_size),
            ],
            env=environment(),
            cwd=folder,
            stdout=output,
            stderr=subprocess.STDOUT,
        )


def _wait_until_joined(processes: list[subprocess.Popen[bytes]], logs: list[Path]) -> None:
    deadline = time.monotonic() + 600
    while not all(JOINED in log.read_text() for log in logs):
        for process, log in zip(processes, logs, strict=True):
            if process.poll() is not None:
                raise RuntimeError(f"a worker ended before joining:\n{log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError("workers did not join within 10 minutes")
        time.sleep(0.2)


def _count(items: Iterator[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts


# --- 2. coordination overhead -------------------------------------------------------------------


@dataclass
class _Outcome:
    rate: float
    refused: list[bool]
    partial: bool = False


class _InstantRefusals:
    """Stands in for the refusal scorer: a random verdict at once (no generation)."""

    n_prompts = 20

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def evaluate(self, on_batch: Any = None, should_stop: Any = None) -> _Outcome:
        refused = [self.rng.random() < 0.5 for _ in range(self.n_prompts)]
        return _Outcome(sum(refused) / len(refused), refused)


class _InstantKL:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def score(self) -> float:
        return self.rng.random()


class _TimedGate(BudgetGate):
    """The budget gate, recording how long each hold lasts and its SQL statements."""

    def __init__(self, study: optuna.Study, statements: list[int]) -> None:
        super().__init__(study)
        self.held_s = 0.0
        self.statements = statements  # the running count of the engine's statements
        self.held_statements = 0

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        with super().hold():
            start, counted = time.perf_counter(), self.statements[0]
            try:
                yield
            finally:
                self.held_s += time.perf_counter() - start
                self.held_statements += self.statements[0] - counted


def _coordinate(model: str, url: str, budget: int, barrier: Any, queue: Any) -> None:
    """One worker process of the overhead measurement; puts its per-trial rows on ``queue``."""
    import torch
    import transformers

    from blasphemer import architectures, loading
    from blasphemer.directions import Directions
    from blasphemer.optimization import Objective, SearchSpace

    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    loaded = loading.load_model(model, dtypes=["float32"], device_map="cpu")
    model_map = architectures.resolve(loaded.model, None)
    vectors = torch.nn.functional.normalize(
        torch.randn(model_map.n_layers, model_map.hidden_size), dim=1
    )
    directions = Directions(vectors, torch.ones(model_map.n_layers))
    opened = create_or_load_study(
        url, "overhead", seed=None, fingerprint={"bench": "overhead"}, resume=True
    )
    study = opened.study
    statements = [0]
    gate = _TimedGate(study, statements)
    sqlalchemy.event.listen(
        rdb_storage(study).engine,
        "before_cursor_execute",
        lambda *args: statements.__setitem__(0, statements[0] + 1),
    )
    rng = random.Random()
    scoring: list[float] = []
    objective = Objective(
        model_map=model_map,
        directions=directions,
        search_space=SearchSpace.build(model_map.n_layers, norm_preserving=False),
        refusal_scorer=_InstantRefusals(rng),
        kl_scorer=_InstantKL(rng),
        on_trial_end=lambda result: scoring.append(result.seconds or 0.0),
    )
    # time, statements, gate time, trials, statements in the gate
    marks: list[tuple[float, int, float, int, int]] = []

    def mark() -> bool:
        marks.append(
            (time.perf_counter(), statements[0], gate.held_s, len(scoring), gate.held_statements)
        )
        return False

    barrier.wait()
    run_trials(
        study,
        objective,
        budget=budget,
        gate=gate,
        heartbeat_interval=30,
        poll_seconds=0.2,
        should_stop=mark,
    )
    mark()
    rows = []
    for before, after in itertools.pairwise(marks):
        if after[3] == before[3] + 1:  # an iteration that ran a trial (not a wait)
            rows.append(
                {
                    "ms": (after[0] - before[0]) * 1000,
                    "scoring_ms": scoring[before[3]] * 1000,
                    "gate_ms": (after[2] - before[2]) * 1000,
                    "gate_statements": after[4] - before[4],
                    "statements": after[1] - before[1],
                    "index": before[3],
                }
            )
    queue.put(rows)


def coordination(model: str, url: str, processes: int, budget: int) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    barrier, queue = context.Barrier(processes), context.Queue()
    workers = [
        context.Process(target=_coordinate, args=(model, url, budget, barrier, queue))
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    rows = [row for _ in workers for row in queue.get(timeout=600)]
    for worker in workers:
        worker.join(timeout=60)
    overhead = [r["ms"] - r["scoring_ms"] for r in rows]
    first = [r["ms"] - r["scoring_ms"] for r in rows if r["index"] < len(rows) / processes / 2]
    late = [r["ms"] - r["scoring_ms"] for r in rows if r["index"] >= len(rows) / processes / 2]
    return {
        "processes": processes,
        "trials": len(rows),
        "overhead_ms_median": round(statistics.median(overhead), 1),
        "overhead_ms_mean": round(statistics.mean(overhead), 1),
        "overhead_ms_first_half": round(statistics.mean(first), 1),
        "overhead_ms_second_half": round(statistics.mean(late), 1),
        "gate_ms_median": round(statistics.median(r["gate_ms"] for r in rows), 1),
        "statements_per_trial": round(statistics.mean(r["statements"] for r in rows), 1),
        "gate_statements_per_trial": round(statistics.mean(r["gate_statements"] for r in rows), 1),
        "scoring_ms_median": round(statistics.median(r["scoring_ms"] for r in rows), 1),
    }


# --- report -------------------------------------------------------------------------------------


def markdown(record: dict[str, Any]) -> str:
    lines = [
        "# Distributed study: throughput and coordination overhead",
        "",
        f"Command: `{record['command']}`  ",
        f"Machine: {record['machine']['cpus']} CPUs, {record['machine']['platform']}, "
        f"load average {record['machine']['load_before']} before / "
        f"{record['machine']['load_after']} after; optuna {record['machine']['optuna']}.",
        "",
        "## Throughput (demo model, default scoring settings, one thread per worker)",
        "",
        "| storage | workers | trials | window (s) | trials/hour | ratio | scoring s/trial | "
        "CPU s/trial | waiting for a CPU s/trial | other load (cores) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, result in record["throughput"].items():
        for k, row in result["by_workers"].items():
            ratio = f"{result['ratio']:.2f}" if k != "1" else "1.00"
            lines.append(
                f"| {name} | {k} | {row['trials']} | {row['window_s']} | "
                f"{row['trials_per_hour']} | {ratio} | {row['mean_scoring_s']} | "
                f"{row['cpu_s_per_trial']} | {row['cpu_wait_s_per_trial']} | "
                f"{row['background_cores']} |"
            )
    for name, result in record["throughput"].items():
        lines.append(
            f"\n{name}: measured ratio {result['ratio']:.2f}; from CPU time per trial (a free "
            f"core per worker) {result['ratio_by_cpu_time']:.2f}."
        )
    lines += [
        "",
        "CPU s/trial and waiting for a CPU: the workers' own CPU time and run-queue wait "
        "(Linux schedstat) while they ran trials, per trial. Other load: cores kept busy by "
        "other programs in the 3 s before the workers started. With as many workers as cores, "
        "any other load makes the workers wait for a CPU, and the ratio falls below 2.",
        "",
        "## Coordination overhead per trial (real loop and objective, instant scorers)",
        "",
        "| storage | processes | trials | overhead ms (median) | first half / second half ms | "
        "gate ms (median) | SQL statements (in the gate) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, results in record["coordination"].items():
        for row in results:
            lines.append(
                f"| {name} | {row['processes']} | {row['trials']} | "
                f"{row['overhead_ms_median']} | {row['overhead_ms_first_half']} / "
                f"{row['overhead_ms_second_half']} | {row['gate_ms_median']} | "
                f"{row['statements_per_trial']} ({row['gate_statements_per_trial']}) |"
            )
    lines += ["", "## What it predicts", ""]
    for name, result in record["throughput"].items():
        single = result["by_workers"].get("1")
        gate = next((r for r in record["coordination"].get(name, []) if r["processes"] == 1), None)
        if single is None or gate is None or gate["gate_ms_median"] <= 0:
            continue
        per_trial_ms = single["window_s"] / single["trials"] * 1000
        lines.append(
            f"- {name}: a trial takes {per_trial_ms:.0f} ms end to end on one worker, of which "
            f"{gate['overhead_ms_median']} ms coordination and {gate['gate_ms_median']} ms in "
            f"the gate: up to about {per_trial_ms / gate['gate_ms_median']:.0f} workers before "
            "the gate limits throughput (more for larger models, whose trials take longer). "
            f"Over a network each trial adds about {gate['statements_per_trial']:.0f} round "
            f"trips, {gate['gate_statements_per_trial']:.0f} of them inside the gate."
        )
    lines += [
        "",
        "Overhead is each trial's wall time minus its scoring time: budget gate, stale-trial "
        "check, `ask` (the TPE sampler, after the random start-up trials), heartbeat, "
        "parameters, user attributes and `tell`. The gate is held by one worker at a time, so "
        "N workers on N machines run about min(N / (T + C), 1 / G) trials per second (T "
        "scoring, C overhead, G gate time per trial). PostgreSQL here is a local server with "
        "fsync off, on the same two cores as the workers (its own CPU time competes with "
        "theirs); over a network add one round-trip time per SQL statement.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="Chat model folder (default: the demo).")
    parser.add_argument("--storages", nargs="+", default=["sqlite", "postgresql"])
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--trials", type=int, default=60, help="Throughput trials per count.")
    parser.add_argument("--overhead-trials", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-write", action="store_true", help="Print only.")
    args = parser.parse_args()
    model = args.model or os.environ.get("BLASPHEMER_TEST_DEMO_MODEL") or str(demo_model_path())
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    record: dict[str, Any] = {
        "command": "python bench/distributed.py " + " ".join(sys.argv[1:]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "optuna": optuna.__version__,
            "load_before": os.getloadavg()[0],
        },
        "throughput": {},
        "coordination": {},
    }
    WORK.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(prefix="distributed-", dir=WORK) as folder,
        storages(args.storages, Path(folder)) as makers,
    ):
        for name, make_url in makers.items():
            work = Path(folder) / name
            work.mkdir()
            result = throughput(
                model, make_url("throughput"), work, args.workers, args.trials, args.batch_size
            )
            record["throughput"][name] = result
            print(f"{name} throughput: {json.dumps(result)}", flush=True)
            record["coordination"][name] = []
            for processes in args.workers:
                row = coordination(
                    model, make_url(f"overhead{processes}"), processes, args.overhead_trials
                )
                record["coordination"][name].append(row)
                print(f"{name} overhead: {json.dumps(row)}", flush=True)
    record["machine"]["load_after"] = os.getloadavg()[0]
    text = markdown(record)
    print(text)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "distributed.json").write_text(json.dumps(record, indent=2) + "\n")
        (RESULTS / "distributed.md").write_text(text)


if __name__ == "__main__":
    main()
