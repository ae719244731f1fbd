"""Create, load and budget the Optuna study, stored in a real database.

The default storage is an SQLite file in the run directory; a ``postgresql://`` URL lets any
number of workers on any number of machines share one study. Every worker records a heartbeat
for its running trial; a trial whose heartbeat stops (a crashed or pre-empted worker) is marked
failed and re-queued with the same parameters by the next worker that asks for a trial.

A study remembers a *fingerprint* of what its scores depend on (model, revision, scoring
settings, prompt sets). Loading it with a different fingerprint is refused: mixing scores of two
setups in one Pareto front would be meaningless.
"""

from __future__ import annotations

import random
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import optuna
import sqlalchemy.exc
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from blasphemer.errors import StorageError
from blasphemer.optimization.fingerprint import fingerprint_differences, normalized

FINGERPRINT_ATTR = "fingerprint"
RESTART_HINT = "choose a new --study-name or pass --no-resume to discard it"
SQLITE_FILE = "study.db"
_ATTEMPTS = 8  # with _BACKOFF_S: gives up after about 8 s of failures
_BACKOFF_S = 0.03

Direction = Literal["minimize", "maximize"]


# --- URLs ---------------------------------------------------------------------------------------


def default_storage_url(run_dir: Path) -> str:
    """``sqlite:///<run_dir>/study.db`` with an absolute path."""
    return f"sqlite:///{(Path(run_dir).expanduser().resolve() / SQLITE_FILE).as_posix()}"


def normalize_url(url: str) -> str:
    """Pick the installed PostgreSQL driver (psycopg 3) for ``postgres://`` / ``postgresql://``."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme in ("postgres", "postgresql"):
        return f"postgresql+psycopg://{rest}"
    return url


def redact_url(url: str) -> str:
    """``url`` with any password (in the user info or a ``password=`` query) replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority, qmark, query = rest.partition("?")
    at = authority.rfind("@")
    if at != -1:
        user, colon, _password = authority[:at].partition(":")
        if colon:
            authority = f"{user}:***{authority[at:]}"
    query = re.sub(r"(?i)((?:^|&)password=)[^&]*", r"\1***", query)
    return f"{scheme}{sep}{authority}{qmark}{query}"


def _password(url: str) -> str | None:
    authority = url.partition("://")[2].partition("?")[0]
    at = authority.rfind("@")
    password = authority[:at].partition(":")[2] if at != -1 else ""
    return password or None


def error_line(error: BaseException, url: str) -> str:
    """The first line of ``error``'s message (at most 300 characters), the URL's password hidden."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    password = _password(url)
    if password:
        text = text.replace(password, "***")
    return text[:300]


# --- storage ------------------------------------------------------------------------------------


def _engine_kwargs(url: str) -> dict[str, Any]:
    if url.startswith("sqlite"):
        # Many processes share one file: wait for the lock instead of failing at once.
        return {"connect_args": {"timeout": 60}}
    return {"pool_pre_ping": True}  # long runs outlive idle server connections


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _tune_sqlite(engine: sqlalchemy.Engine) -> None:
    """Write-ahead logging with ``synchronous=NORMAL``: a commit no longer waits for fsync.

    A study makes a dozen small commits per trial; with the default rollback journal each one
    syncs the disk (measured here: ~20 ms each). WAL stays crash-safe for committed trials (a
    power loss may drop the last commits, never corrupt the file) and lets readers and one
    writer work at once. It needs a local file system, as SQLite locking does anyway.
    """
    sqlalchemy.event.listen(engine, "connect", _sqlite_pragmas)
    engine.dispose()  # connections opened while creating the schema lack the pragma
    with engine.connect() as connection:
        connection.exec_driver_sql("PRAGMA journal_mode=WAL")


def _prepare_sqlite_dir(url: str) -> None:
    if not url.startswith("sqlite"):
        return
    database = sqlalchemy.engine.make_url(url).database
    if database and database != ":memory:":
        try:
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StorageError(
                f"cannot create the folder of {url}: {error.strerror}; choose a writable --run-dir"
            ) from None


def open_storage(
    url: str, *, heartbeat_interval: int = 30, grace_period: int = 120, max_retry: int = 3
) -> RDBStorage:
    """Open (creating tables if needed) the RDB storage at ``url``.

    Several processes may call this at once on an empty database: schema creation races are
    retried. Unreachable databases, bad URLs and missing drivers raise a one-line
    :class:`StorageError` that never shows the password.
    """
    url = normalize_url(url)
    shown = redact_url(url)
    try:
        sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise StorageError(
            f"cannot parse storage URL {shown!r}; use sqlite:///path/study.db or "
            "postgresql://user@host/database"
        ) from None
    _prepare_sqlite_dir(url)
    last: Exception | None = None
    for attempt in range(_ATTEMPTS):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = RDBStorage(
                    url,
                    engine_kwargs=_engine_kwargs(url),
                    heartbeat_interval=heartbeat_interval,
                    grace_period=grace_period,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry),
                )
                if url.startswith("sqlite"):
                    _tune_sqlite(storage.engine)
                return storage
        except ImportError:
            raise StorageError(
                f"no database driver for {shown}; install it: pip install 'blasphemer[postgres]'"
            ) from None
        except sqlalchemy.exc.DBAPIError as error:
            # Another process is creating the schema (duplicate table, type or version row),
            # or the server is busy or unreachable: wait and try again.
            last = error
            time.sleep(_BACKOFF_S * 2**attempt * (1 + random.random()))
    assert last is not None
    raise StorageError(
        f"cannot open study storage {shown}: {error_line(last, url)}; check that the database "
        "is reachable and writable, or use another --storage"
    )


# --- create / load ------------------------------------------------------------------------------


@dataclass(eq=False)
class OpenedStudy:
    """A study ready for ``optimize``.

    ``existed`` is true when a study of that name was already in the storage and was kept;
    ``counts`` are its trials right after opening (stale ones already re-queued).
    """

    study: optuna.Study
    existed: bool
    counts: TrialCounts

    @property
    def needs_decision(self) -> bool:
        """With ``resume=None``: the kept study has finished trials, so ask continue/restart."""
        return self.existed and self.counts.complete > 0


def create_or_load_study(
    storage_url: str,
    study_name: str,
    *,
    seed: int | None,
    fingerprint: Mapping[str, Any],
    resume: bool | None,
    directions: Sequence[Direction] = ("minimize", "minimize"),
    n_startup_trials: int = 20,
    heartbeat_interval: int = 30,
    grace_period: int = 120,
    max_retry: int = 3,
) -> OpenedStudy:
    """Open study ``study_name`` in ``storage_url``, creating it if absent.

    ``resume=True`` continues an existing study, ``False`` deletes it and starts fresh, ``None``
    loads it and leaves the decision to the caller (:attr:`OpenedStudy.needs_decision`).
    Safe to call from several processes at once on an empty database. Raises
    :class:`StorageError` when the stored fingerprint or objectives differ. Workers sharing a
    study should pass distinct seeds (or ``None``) so their random start-up trials differ.
    """
    storage = open_storage(
        storage_url,
        heartbeat_interval=heartbeat_interval,
        grace_period=grace_period,
        max_retry=max_retry,
    )
    shown = redact_url(normalize_url(storage_url))
    wanted = normalized(fingerprint)
    existing = _find_study(storage, study_name, storage_url)
    if existing is not None and resume is False:
        _retry(lambda: optuna.delete_study(study_name=study_name, storage=storage), storage_url)
        existing = None
    n_before = 0 if existing is None else len(storage.get_all_trials(existing, deepcopy=False))
    sampler = _sampler(sampler_seed(seed, n_before), n_startup_trials)

    def create() -> optuna.Study:
        return optuna.create_study(
            storage=storage,
            sampler=sampler,
            study_name=study_name,
            directions=list(directions),
            load_if_exists=True,
        )

    study = _retry(create, storage_url)
    if [d.name.lower() for d in study.directions] != [d.lower() for d in directions]:
        raise StorageError(
            f"study {study_name!r} in {shown} has {len(study.directions)} objectives, this run "
            f"needs {len(directions)}; {RESTART_HINT}"
        )
    _check_fingerprint(study, wanted, shown)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # re-queue trials of workers that died now
    return OpenedStudy(study, existing is not None, count_trials(study))


def _find_study(storage: RDBStorage, name: str, url: str) -> int | None:
    def lookup() -> int | None:
        try:
            return storage.get_study_id_from_name(name)
        except KeyError:
            return None

    return _retry(lookup, url)


def sampler_seed(seed: int | None, n_before: int) -> int | None:
    """The sampler's seed for a process that opens a study already holding ``n_before`` trials.

    A resumed study must not reuse ``seed`` (it would replay the random start-up trials it already
    ran), and two processes opening one study must not end up with the same seed: with
    ``seed + n_before``, a run with seed 0 that arrives after one trial collided with a run with
    seed 1 that arrived first, and both drew the same start-up trials. A fresh study keeps
    ``seed`` itself, so a single run is reproducible from its settings.
    """
    if seed is None or n_before == 0:
        return seed
    return int(np.random.SeedSequence([seed, n_before]).generate_state(1)[0])


def _sampler(seed: int | None, n_startup_trials: int) -> optuna.samplers.TPESampler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # group=True: the direction index only exists for the "global" scope (conditional space).
        return optuna.samplers.TPESampler(
            multivariate=True, group=True, seed=seed, n_startup_trials=n_startup_trials
        )


def _check_fingerprint(study: optuna.Study, wanted: dict[str, Any], shown: str) -> None:
    stored = study.user_attrs.get(FINGERPRINT_ATTR)
    if stored is None:
        if study.get_trials(deepcopy=False):
            raise StorageError(
                f"study {study.study_name!r} in {shown} was not made by Blasphemer "
                f"(no fingerprint); {RESTART_HINT}"
            )
        study.set_user_attr(FINGERPRINT_ATTR, wanted)
        return
    differences = fingerprint_differences(stored, wanted)
    if differences:
        raise StorageError(
            f"study {study.study_name!r} in {shown} was made for another setup "
            f"({'; '.join(differences)}); {RESTART_HINT}"
        )


def _retry(action: Any, url: str) -> Any:
    last: Exception | None = None
    for attempt in range(_ATTEMPTS):
        try:
            return action()
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError) as error:
            last = error
            time.sleep(_BACKOFF_S * 2**attempt * (1 + random.random()))
    assert last is not None
    raise StorageError(
        f"study storage {redact_url(normalize_url(url))} keeps failing: {error_line(last, url)}; "
        "check that the database is reachable and not overloaded"
    )


# --- budget -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialCounts:
    """How many trials of a study are in each state."""

    complete: int
    running: int
    waiting: int
    failed: int
    pruned: int

    @property
    def used(self) -> int:
        """Trials that count against the budget: finished or being run by some worker."""
        return self.complete + self.running


def count_trials(study: optuna.Study) -> TrialCounts:
    """Count ``study``'s trials by state (one storage query)."""
    states = [t.state for t in study.get_trials(deepcopy=False)]
    return TrialCounts(
        complete=states.count(TrialState.COMPLETE),
        running=states.count(TrialState.RUNNING),
        waiting=states.count(TrialState.WAITING),
        failed=states.count(TrialState.FAIL),
        pruned=states.count(TrialState.PRUNED),
    )


def enqueue_once(study: optuna.Study, params: Mapping[str, Any]) -> None:
    """Queue a trial with exactly ``params`` unless the study already has one with them."""
    study.enqueue_trial(dict(params), skip_if_exists=True)


def default_study_name(model_id: str) -> str:
    """A readable study name derived from a model id or folder (``"blasphemer-Qwen3-4B"``)."""
    name = Path(model_id.rstrip("/")).name or "model"
    return "blasphemer-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", name)
