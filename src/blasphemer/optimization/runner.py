"""Run trials of a shared study until its budget is used up, from any number of workers.

The budget must be *exact* with many workers: no worker may start a trial once the study's
complete + running trials reach the budget, and none may stop while a trial of a
dead worker still needs re-running. Optuna has no such counter, so the decision "may I start a
trial?" is serialised by a :class:`BudgetGate` (a PostgreSQL advisory lock, or a file lock next
to an SQLite database) and the trial is created (``study.ask``) while the gate is held.

Trials of workers killed with SIGKILL stop sending heartbeats; once the grace period has passed,
the next worker at the gate fails them with ``fail_stale_trials`` and the storage's
``RetryHeartbeatStaleTrialCallback`` queues a WAITING copy with the same parameters, which the
next ``ask`` picks up. Finished trials are durable the moment ``tell`` returns. A worker killed
between ``ask`` and its first heartbeat leaves a RUNNING trial that Optuna never counts as stale
(it has no heartbeat at all); the next worker at the gate gives it one, so it goes stale too.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.storages._rdb import models as rdb_models  # heartbeat rows have no public reader
from optuna.trial import TrialState

from blasphemer.errors import BlasphemerError, StorageError
from blasphemer.optimization.study import count_trials

logger = logging.getLogger(__name__)

MAX_CONSECUTIVE_FAILURES = 3
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"


def rdb_storage(study: optuna.Study) -> optuna.storages.RDBStorage:
    """The RDB storage behind ``study`` (Optuna wraps it in a cache layer)."""
    storage = study._storage  # Optuna exposes no public accessor
    storage = getattr(storage, "_backend", storage)
    if not isinstance(storage, optuna.storages.RDBStorage):
        raise StorageError("shared trials need an RDB storage (an SQLite file or PostgreSQL)")
    return storage


class BudgetGate:
    """Mutual exclusion across processes and machines for starting trials of one study."""

    def __init__(self, study: optuna.Study) -> None:
        study_name = study.study_name
        self._engine: sqlalchemy.Engine = rdb_storage(study).engine
        self._key = zlib.crc32(study_name.encode()) & 0x7FFFFFFF
        self._thread_lock = threading.Lock()
        dialect = self._engine.dialect.name
        self._lock_file: Path | None = None
        if dialect == "sqlite":
            database = self._engine.url.database
            if database and database != ":memory:":
                self._lock_file = Path(database).with_suffix(Path(database).suffix + ".lock")
        elif dialect != "postgresql":
            logger.warning(
                "no cross-machine lock for %s; the trial budget may be overshot", dialect
            )
        self._dialect = dialect

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Hold the gate for the duration of the ``with`` block."""
        with self._thread_lock:
            if self._dialect == "postgresql":
                with self._engine.connect() as connection:
                    connection.execute(
                        sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": self._key}
                    )
                    try:
                        yield
                    finally:
                        connection.execute(
                            sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": self._key}
                        )
                        connection.commit()
            elif self._lock_file is not None:
                with self._lock_file.open("a") as handle:
                    fcntl.flock(handle, fcntl.LOCK_EX)
                    try:
                        yield
                    finally:
                        fcntl.flock(handle, fcntl.LOCK_UN)
            else:
                yield


class _Heartbeat:
    """Records a heartbeat for one running trial every ``interval`` seconds until stopped."""

    def __init__(self, storage: optuna.storages.RDBStorage, trial_id: int, interval: float) -> None:
        self._storage = storage
        self._trial_id = trial_id
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="blasphemer-heartbeat")

    def _beat(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._storage.record_heartbeat(self._trial_id)
            except sqlalchemy.exc.SQLAlchemyError as error:  # transient: the next beat retries
                logger.warning("heartbeat failed: %s", error)

    def __enter__(self) -> _Heartbeat:
        self._storage.record_heartbeat(self._trial_id)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


def _orphans(storage: optuna.storages.RDBStorage, study_id: int) -> list[int]:
    """Ids of the study's RUNNING trials that have no heartbeat row at all."""
    with storage.engine.connect() as connection:
        beating = sqlalchemy.select(rdb_models.TrialHeartbeatModel.trial_id)
        query = sqlalchemy.select(rdb_models.TrialModel.trial_id).where(
            rdb_models.TrialModel.study_id == study_id,
            rdb_models.TrialModel.state == TrialState.RUNNING,
            rdb_models.TrialModel.trial_id.not_in(beating),
        )
        return [row[0] for row in connection.execute(query)]


def _claim(study: optuna.Study, budget: int, gate: BudgetGate) -> tuple[optuna.Trial | None, bool]:
    """Start a trial if the budget allows. Returns (trial, more may come later)."""
    storage = rdb_storage(study)
    with gate.hold():
        # Every live worker records its trial's first heartbeat before it lets go of the gate,
        # so a heartbeat-less RUNNING trial seen here belongs to a dead one: start its clock.
        for trial_id in _orphans(storage, study._study_id):
            storage.record_heartbeat(trial_id)
        with _quiet_experimental():
            optuna.storages.fail_stale_trials(study)
        counts = count_trials(study)
        # Waiting trials (re-queued ones) are run first by ``ask``, but only while the budget
        # allows: one queued outside the gate (two ``run``s enqueueing the reference trial at
        # once) must not push the total past it.
        if counts.complete + counts.running < budget:
            with _quiet_experimental():
                trial = study.ask()
            storage.record_heartbeat(trial._trial_id)  # visible to the others at once
            trial.set_user_attr("worker", WORKER_ID)
            return trial, True
    return None, counts.complete < budget and counts.running > 0


def _tell(study: optuna.Study, trial: optuna.Trial, values: list[float]) -> bool:
    """Record a finished trial; False if another worker already failed it as stale.

    That happens when this worker stalled past the grace period (suspended machine, overloaded
    database): its trial was re-queued and the copy counts, so this result is dropped rather than
    counted twice.
    """
    try:
        study.tell(trial, values)
    except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
        state = study._storage.get_trial(trial._trial_id).state
        if state != TrialState.FAIL:
            raise
        logger.warning(
            "trial %d was retried by another worker; its result is dropped", trial.number
        )
        return False
    return True


@contextlib.contextmanager
def _quiet_experimental() -> Iterator[None]:
    """Silence Optuna's warnings about the heartbeat API we use on purpose (with ask/tell)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage", category=UserWarning)
        yield


def run_trials(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], Sequence[float]],
    *,
    budget: int,
    gate: BudgetGate,
    heartbeat_interval: float,
    poll_seconds: float = 2.0,
    on_wait: Callable[[], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> int:
    """Run trials until the whole study has ``budget`` complete ones; returns how many ran here.

    While other workers still run the last trials, this one waits (polling every
    ``poll_seconds``) in case one of them dies and its trial is re-queued. An objective that
    raises :class:`BlasphemerError` stops the worker (the trial is marked failed and re-run by
    someone else later); other exceptions fail the trial and, after
    :data:`MAX_CONSECUTIVE_FAILURES` in a row, stop the worker too.
    """
    storage = rdb_storage(study)
    ran = 0
    failures = 0
    while not should_stop():
        trial, more = _claim(study, budget, gate)
        if trial is None:
            if not more:
                return ran
            if on_wait is not None:
                on_wait()
            time.sleep(poll_seconds)
            continue
        values: Any = None
        with _Heartbeat(storage, trial._trial_id, heartbeat_interval):
            try:
                values = objective(trial)
            except (BlasphemerError, KeyboardInterrupt):
                study.tell(trial, state=TrialState.FAIL)
                raise
            except Exception:
                study.tell(trial, state=TrialState.FAIL)
                failures += 1
                logger.exception("trial %d failed", trial.number)
                if failures >= MAX_CONSECUTIVE_FAILURES:
                    raise
                continue
        if not _tell(study, trial, list(values)):
            continue
        failures = 0
        ran += 1
    return ran
