"""Many workers, one study: real ``blasphemer run`` / ``worker`` / ``status`` processes.

Every scenario runs on a throwaway PostgreSQL server and on an SQLite file (one machine, many
processes). The study is then read back from the database and checked against what the issue
promises: exactly the budget of complete trials, no trial counted twice, the front that the data
gives, a SIGKILLed worker's trial retried, a mismatching worker refused, no password anywhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import optuna
import pytest
import sqlalchemy
from optuna.trial import FrozenTrial, TrialState

from blasphemer.errors import StorageError
from blasphemer.optimization import storage as storage_module
from blasphemer.optimization.runner import BudgetGate
from blasphemer.optimization.storage import normalize_url, open_storage
from postgres_server import PostgresServer

pytestmark = [pytest.mark.slow]

CLI = [sys.executable, "-m", "blasphemer.app.cli"]
# Small enough that a trial takes about half a second on one CPU core.
FAST = [
    "--quiet",
    "--dtypes",
    "float32",
    "--batch-size",
    "8",
    "--n-select-prompts",
    "8",
    "--n-report-prompts",
    "8",
    "--max-fit-prompts",
    "16",
    "--max-new-tokens",
    "12",
    "--decided-after",
    "8",
    "--n-startup-trials",
    "4",
    "--heartbeat-interval",
    "1",
    "--grace-period",
    "3",
]
TIMEOUT_S = 150
PASSWORD = "Tr0ub4dor-s3cret"  # a test password for a throwaway server


# --- processes ----------------------------------------------------------------------------------


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def worker_id(self) -> str:
        """The ``worker`` user attribute this process writes on its trials."""
        return f"{socket.gethostname()}:{self.popen.pid}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def finish(self, timeout: float = TIMEOUT_S) -> str:
        """Wait for a clean exit; returns the output (stdout and stderr)."""
        try:
            code = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            pytest.fail(f"{self.name} did not finish in {timeout} s:\n{self.output()[-3000:]}")
        assert code == 0, f"{self.name} exited with {code}:\n{self.output()[-3000:]}"
        return self.output()

    def fail(self, timeout: float = TIMEOUT_S) -> str:
        """Wait for an error exit; returns the output."""
        code = self.popen.wait(timeout=timeout)
        assert code != 0, f"{self.name} should have failed:\n{self.output()[-3000:]}"
        return self.output()


class Launcher:
    """Starts ``blasphemer`` processes in a folder; kills any still alive at the end."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.processes: list[Process] = []

    def start(self, name: str, args: Sequence[str], env: dict[str, str] | None = None) -> Process:
        log = self.folder / f"{name}.log"
        environment = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        with log.open("wb") as handle:
            popen = subprocess.Popen(
                [*CLI, *args],
                cwd=self.folder,
                env=environment,
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        process = Process(name, popen, log)
        self.processes.append(process)
        return process

    def close(self) -> None:
        for process in self.processes:
            if process.popen.poll() is None:
                process.popen.kill()
                process.popen.wait()


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    launcher = Launcher(tmp_path)
    yield launcher
    launcher.close()


@pytest.fixture(params=["sqlite", "postgres"])
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database: an SQLite file, or a fresh database on the throwaway server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared' / 'study.db'}"
    server: PostgresServer = request.getfixturevalue("postgres")
    url = server.create_database(f"d{uuid.uuid4().hex[:12]}")
    return url.replace("postgresql+psycopg://", "postgresql://")  # the form users type


def run_args(
    model: Path, url: str, study: str, budget: int, output: Path, *extra: str
) -> list[str]:
    return [
        "run",
        str(model),
        "--storage",
        url,
        "--study-name",
        study,
        "--n-trials",
        str(budget),
        "--yes",
        "--output-dir",
        str(output),
        "--run-dir",
        str(output.parent / f"{output.name}-run"),
        *FAST,
        *extra,
    ]


def worker_args(url: str | None, study: str) -> list[str]:
    storage = [] if url is None else ["--storage", url]
    return ["worker", *storage, "--study-name", study, "--quiet", "--batch-size", "8"]


# --- reading the study back ---------------------------------------------------------------------


def load_trials(url: str, study: str) -> list[FrozenTrial]:
    storage = optuna.storages.RDBStorage(normalize_url(url))
    try:
        study_id = storage.get_study_id_from_name(study)
        return storage.get_all_trials(study_id, deepcopy=False)
    finally:
        storage.engine.dispose()


def check_exact_budget(trials: list[FrozenTrial], budget: int) -> list[FrozenTrial]:
    """Exactly ``budget`` complete trials, none counted twice, nothing left running."""
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(len(trials))), f"trial numbers {sorted(numbers)}"
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == budget, [(t.number, t.state.name) for t in trials]
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    # A failed trial may come back once as a retry; any other repeat of parameters is a
    # trial run twice.
    retried = [t.system_attrs["failed_trial"] for t in complete if "failed_trial" in t.system_attrs]
    assert len(retried) == len(set(retried)), f"a failed trial was retried twice: {retried}"
    by_params: dict[str, list[FrozenTrial]] = {}
    for trial in complete:
        by_params.setdefault(json.dumps(trial.params, sort_keys=True), []).append(trial)
    for group in by_params.values():
        originals = [t for t in group if "failed_trial" not in t.system_attrs]
        assert len(originals) <= 1, f"trials {[t.number for t in group]} share parameters"
    return complete


def front_of(complete: list[FrozenTrial]) -> list[int]:
    """Non-dominated trial numbers (both objectives minimised; equal values: lowest number)."""
    unique: dict[tuple[float, ...], int] = {}
    for trial in sorted(complete, key=lambda t: t.number):
        assert trial.values is not None
        unique.setdefault(tuple(trial.values), trial.number)

    def dominated(a: tuple[float, ...]) -> bool:
        return any(
            all(x <= y for x, y in zip(b, a, strict=True)) and b != a for b in unique if b != a
        )

    return sorted(number for values, number in unique.items() if not dominated(values))


def workers_of(complete: list[FrozenTrial]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for trial in complete:
        worker = str(trial.user_attrs.get("worker"))
        counts[worker] = counts.get(worker, 0) + 1
    return counts


def saved_front(output: Path) -> list[int]:
    record = json.loads((output / "results.json").read_text())
    return sorted(record["pareto_front"])


# --- workers share one study --------------------------------------------------------------------


def check_shared_study(
    url: str, study: str, budget: int, outputs: list[Path]
) -> tuple[list[int], dict[str, int]]:
    """The study holds exactly the budget and every ``run`` saved the data's front.
    Returns that front and how many trials each process ran."""
    complete = check_exact_budget(load_trials(url, study), budget)
    assert optuna.get_all_study_names(normalize_url(url)) == [study]
    front = front_of(complete)
    for output in outputs:
        assert saved_front(output) == front
    return front, workers_of(complete)


def wait_for_line(process: Process, text: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while text not in process.output():
        assert process.popen.poll() is None, f"{process.name} ended:\n{process.output()}"
        assert time.monotonic() < deadline, f"{process.name} never said {text!r}"
        time.sleep(0.1)


@contextlib.contextmanager
def gate_held(url: str, study: str) -> Iterator[None]:
    """Hold the study's budget gate, as a worker does while it starts a trial: every process
    stops before its next trial until the block ends. It lets a slower process join in time.
    Creates the database tables (not the study), like any first process."""
    storage = open_storage(url)
    gate = BudgetGate(cast(optuna.Study, SimpleNamespace(study_name=study, _storage=storage)))
    try:
        with gate.hold():
            yield
    finally:
        storage.engine.dispose()


def copy_model(source: Path, target: Path) -> Path:
    target.mkdir()
    for file in source.iterdir():
        if file.is_file():
            (target / file.name).write_bytes(file.read_bytes())
    return target


def test_workers_started_before_run_wait_then_share_the_study(
    storage_url: str, demo_model_dir: Path, launcher: Launcher, tmp_path: Path
) -> None:
    """Two workers on an empty database wait for ``run`` to start the study, then all three
    processes share it: exactly the budget, no trial twice, the front the data gives, also in
    ``status``. Workers that come later with another model (through the environment) or another
    copy of it (other weights at the same path) are refused in one line, before they touch the
    study."""
    budget, study, output = 12, "shared", tmp_path / "out"
    model = copy_model(demo_model_dir, tmp_path / "model")
    with gate_held(storage_url, study):  # no trial starts before the workers have joined
        workers = [launcher.start(f"worker{i}", worker_args(storage_url, study)) for i in (1, 2)]
        for worker in workers:
            wait_for_line(worker, "waiting for `blasphemer run` to start study 'shared'")
        run = launcher.start("run", run_args(model, storage_url, study, budget, output))
        for worker in workers:
            wait_for_line(worker, "Running trials until the study has")
    run.finish()
    for worker in workers:
        assert "study budget reached: 12 trials complete" in worker.finish()
    front, shares = check_shared_study(storage_url, study, budget, [output])
    ids = [run.worker_id] + [worker.worker_id for worker in workers]
    assert sorted(shares) == sorted(ids), f"not every process ran trials: {shares}"
    n_trials = len(load_trials(storage_url, study))

    other = copy_model(model, tmp_path / "other-model")
    config = json.loads((model / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5  # other weights behave differently: the digest must change
    (model / "config.json").write_text(json.dumps(config))
    refused = {
        "model_id": launcher.start(
            "elsewhere", worker_args(storage_url, study), env={"BLASPHEMER_MODEL": str(other)}
        ),
        "model_digest": launcher.start("changed", worker_args(storage_url, study)),
    }
    shown = launcher.start(
        "status", ["status", "--storage", storage_url, "--study-name", study]
    ).finish()
    assert f"{budget}/{budget} complete, 0 running, 0 waiting, 0 failed" in shown
    assert all(worker_id in shown for worker_id in ids)
    rows = [line.split("|")[0].strip(" ⭐") for line in shown.splitlines() if "|" in line]
    assert sorted(int(row) for row in rows if row.isdigit()) == front

    for difference, process in refused.items():
        text = process.fail()
        errors = [line for line in text.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, text
        assert "another setup" in errors[0] and difference in errors[0], errors[0]
        assert "Traceback" not in text
    assert len(load_trials(storage_url, study)) == n_trials


def test_two_runs_and_a_worker_started_at_once_create_one_study(
    storage_url: str, demo_model_dir: Path, launcher: Launcher, tmp_path: Path
) -> None:
    """Three processes on an empty database at the same moment, two of them ``run``s racing to
    create the schema and the study: no crash, one study, exactly the budget.

    The two ``run``s get different seeds: with the same seed both would draw the same random
    start-up trials (a user adds machines with ``worker``, which draws its own).
    """
    budget, study = 12, "race"
    outputs = [tmp_path / "out0", tmp_path / "out1"]
    processes = [
        launcher.start(
            f"run{seed}",
            run_args(demo_model_dir, storage_url, study, budget, output, "--seed", str(seed)),
        )
        for seed, output in enumerate(outputs)
    ]
    processes.append(launcher.start("worker", worker_args(storage_url, study)))
    for process in processes:
        process.finish()
    check_shared_study(storage_url, study, budget, outputs)  # who ran how many is up to timing


# --- a worker killed mid-trial ------------------------------------------------------------------


def wait_for_study(url: str, study: str, timeout: float) -> None:
    """Wait until ``run`` has created ``study``, without creating anything ourselves."""
    engine = sqlalchemy.create_engine(normalize_url(url))
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if engine.url.database is None or Path(engine.url.database).parent.is_dir():
                try:
                    with engine.connect() as connection:
                        found = connection.execute(
                            sqlalchemy.text("SELECT 1 FROM studies WHERE study_name = :s"),
                            {"s": study},
                        ).first()
                    if found is not None:
                        return
                except sqlalchemy.exc.DBAPIError:
                    pass  # no tables yet, or busy
            time.sleep(0.1)
    finally:
        engine.dispose()
    pytest.fail(f"study {study!r} was not created in {timeout} s")


def kill_mid_trial(
    process: Process, url: str, study: str, settle: float = 0.05, timeout: float = 120
) -> int:
    """SIGKILL ``process`` while the database shows it running a trial; returns its number.

    The trial must have had parameters for ``settle`` seconds (all are drawn by then, before
    the slow scoring starts, so that the retry has something to repeat). The process is
    stopped first and the trial checked again, so that it cannot finish the trial between the
    check and the kill.
    """
    wait_for_study(url, study, timeout)
    storage = optuna.storages.RDBStorage(normalize_url(url))
    study_id = storage.get_study_id_from_name(study)

    def running() -> int | None:
        try:
            trials = storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
        except sqlalchemy.exc.OperationalError:
            return None  # SQLite is busy
        mine = [
            t.number for t in trials if t.user_attrs.get("worker") == process.worker_id and t.params
        ]
        return mine[0] if mine else None

    first_seen: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            assert process.popen.poll() is None, f"{process.name} ended:\n{process.output()}"
            number = running()
            if number is not None:
                since = first_seen.setdefault(number, time.monotonic())
                if time.monotonic() - since >= settle:
                    process.popen.send_signal(signal.SIGSTOP)
                    if running() == number:
                        process.popen.send_signal(signal.SIGKILL)
                        process.popen.wait()
                        return number
                    process.popen.send_signal(signal.SIGCONT)
            time.sleep(0.05)
    finally:
        storage.engine.dispose()
    pytest.fail(f"{process.name} never ran a trial for {settle} s:\n{process.output()}")


def test_sigkilled_worker_leaves_no_trial_stuck(
    storage_url: str, demo_model_dir: Path, launcher: Launcher, tmp_path: Path
) -> None:
    """A worker killed mid-trial: its trial is failed after the grace period and re-run once
    with the same parameters by ``run``; the study still ends with exactly the budget."""
    budget, study, output = 12, "killed", tmp_path / "out"
    # Longer trials than elsewhere: more time to catch one running.
    args = run_args(demo_model_dir, storage_url, study, budget, output, "--n-select-prompts", "24")
    with gate_held(storage_url, study):  # no trial starts before the victim has joined
        victim = launcher.start("victim", worker_args(storage_url, study))
        run = launcher.start("run", args)
        wait_for_line(victim, "Running trials until the study has")
    killed = kill_mid_trial(victim, storage_url, study)
    run.finish()

    trials = load_trials(storage_url, study)
    complete = check_exact_budget(trials, budget)
    original = next(t for t in trials if t.number == killed)
    assert original.state == TrialState.FAIL
    retries = [t for t in complete if t.system_attrs.get("failed_trial") == killed]
    assert len(retries) == 1, [(t.number, t.system_attrs) for t in complete]
    assert original.params and original.params.items() <= retries[0].params.items()
    assert retries[0].user_attrs["worker"] == run.worker_id
    assert front_of(complete) == saved_front(output)


# --- passwords ----------------------------------------------------------------------------------


@pytest.fixture
def password_url(postgres: PostgresServer) -> Iterator[str]:
    """A database owned by a role that must log in with :data:`PASSWORD` (scram)."""
    database = f"p{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(postgres.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        exists = connection.execute(sqlalchemy.text("SELECT 1 FROM pg_roles WHERE rolname='blas'"))
        if exists.scalar() is None:
            connection.execute(sqlalchemy.text(f"CREATE ROLE blas LOGIN PASSWORD '{PASSWORD}'"))
        connection.execute(sqlalchemy.text(f"CREATE DATABASE {database} OWNER blas"))
        hba = postgres.root / "data" / "pg_hba.conf"
        rule = "host all blas 127.0.0.1/32 scram-sha-256\n"
        if rule not in hba.read_text():
            hba.write_text(rule + hba.read_text())  # first match wins: only blas needs it
            connection.execute(sqlalchemy.text("SELECT pg_reload_conf()"))
    admin.dispose()
    yield f"postgresql://blas:{PASSWORD}@127.0.0.1:{postgres.port}/{database}"


def test_wrong_password_is_refused_in_one_line_without_it(
    password_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage_module, "_ATTEMPTS", 1)  # a wrong password is retried otherwise
    wrong = "n0pe-Wr0ng"
    with pytest.raises(StorageError) as error:
        open_storage(password_url.replace(PASSWORD, wrong))
    message = str(error.value)
    assert "password authentication failed" in message and "blas:***@" in message
    assert wrong not in message and PASSWORD not in message and "\n" not in message


def test_password_is_never_shown_or_written(
    password_url: str, demo_model_dir: Path, launcher: Launcher, tmp_path: Path
) -> None:
    """The password (checked by the server) works from the URL, from ``BLASPHEMER_STORAGE``
    and from ``PGPASSWORD``, and appears in no output, file or study attribute."""
    study, output = "secret", tmp_path / "out"
    bare = password_url.replace(f":{PASSWORD}@", "@")
    worker = launcher.start(
        "worker", worker_args(None, study), env={"BLASPHEMER_STORAGE": password_url}
    )
    run = launcher.start("run", run_args(demo_model_dir, password_url, study, 4, output))
    texts = [run.finish(), worker.finish()]
    texts.append(
        launcher.start(
            "status",
            ["status", "--storage", bare, "--study-name", study],
            env={"PGPASSWORD": PASSWORD},
        ).finish()
    )
    assert "4/4 complete" in texts[-1]
    assert "blas:***@" in texts[0]
    for text in texts:
        assert PASSWORD not in text
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert output / "results.json" in written and output / "report.md" in written
    for path in written:
        assert PASSWORD.encode() not in path.read_bytes(), path

    storage = open_storage(password_url)
    attrs: dict[str, Any] = storage.get_study_user_attrs(storage.get_study_id_from_name(study))
    assert PASSWORD not in json.dumps(attrs)
    check_exact_budget(load_trials(password_url, study), 4)
