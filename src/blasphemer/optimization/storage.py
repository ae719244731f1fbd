"""Where studies live: storage URLs, opening an Optuna RDB storage (SQLite tuned for many small
commits, PostgreSQL for many workers), and retrying the transient failures of a shared database.

Nothing here knows about Blasphemer's settings: callers pass URLs and numbers.
"""

from __future__ import annotations

import random
import re
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import optuna
import sqlalchemy.exc
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

from blasphemer.errors import StorageError

SQLITE_FILE = "study.db"
_ATTEMPTS = 8  # with _BACKOFF_S: gives up after about 8 s of failures
_BACKOFF_S = 0.03

T = TypeVar("T")


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


def retry(action: Callable[[], T], url: str) -> T:
    """Run ``action``, retrying SQL operational and integrity errors with backoff (another worker
    holds the lock, or created the same row first); a one-line StorageError in the end."""
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
