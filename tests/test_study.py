"""Study storage: creation races, fingerprints, resume semantics, budget, stale trials, URLs."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState

from blasphemer.errors import StorageError
from blasphemer.optimization import storage as storage_module
from blasphemer.optimization import study as study_module
from blasphemer.optimization.fingerprint import build_fingerprint
from blasphemer.optimization.metadata import FINGERPRINT_ATTR
from blasphemer.optimization.storage import (
    default_storage_url,
    normalize_url,
    open_storage,
    redact_url,
)
from blasphemer.optimization.study import (
    count_trials,
    create_or_load_study,
    default_study_name,
    enqueue_once,
)
from postgres_server import PostgresServer, find_bin_dir

FINGERPRINT = {"model_id": "tiny", "revision": None, "prompts": {"harmful": "abc"}}


def _open(url: str, resume: bool | None = True, **kwargs: Any) -> study_module.OpenedStudy:
    options: dict[str, Any] = {"seed": 0, "fingerprint": FINGERPRINT, "resume": resume}
    options.update(kwargs)
    return create_or_load_study(url, "s", **options)


def _run(study: optuna.Study, n: int) -> None:
    study.optimize(lambda t: (t.suggest_float("x", 0, 1), 0.5), n_trials=n)


@pytest.fixture
def url(tmp_path: Path) -> str:
    return default_storage_url(tmp_path / "run")


# --- URLs ---------------------------------------------------------------------------------------


def test_default_storage_url_is_absolute_sqlite(tmp_path: Path) -> None:
    assert default_storage_url(tmp_path) == f"sqlite:///{tmp_path.resolve()}/study.db"


def test_normalize_url_picks_psycopg() -> None:
    assert normalize_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("sqlite:///x.db") == "sqlite:///x.db"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://bob:s3cret@db:5432/opt", "postgresql://bob:***@db:5432/opt"),
        ("postgresql://bob:p@ss/w@db/opt", "postgresql://bob:***@db/opt"),
        ("postgresql://bob@db/opt?password=s3cret&x=1", "postgresql://bob@db/opt?password=***&x=1"),
        ("postgresql://bob@db/opt", "postgresql://bob@db/opt"),
        ("sqlite:////tmp/study.db", "sqlite:////tmp/study.db"),
        ("not a url", "not a url"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_unreachable_postgres_is_a_storage_error_without_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(storage_module, "_ATTEMPTS", 2)
    with pytest.raises(StorageError) as error:
        open_storage("postgresql://bob:s3cret@127.0.0.1:1/opt")
    message = str(error.value)
    assert "s3cret" not in message and "***" in message
    assert "\n" not in message


def test_unparsable_url_is_a_storage_error() -> None:
    with pytest.raises(StorageError, match="cannot parse"):
        open_storage("::nonsense::")


def test_sqlite_folder_under_a_file_is_a_storage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match="run-dir"):
        open_storage(default_storage_url(blocker / "run"))


# --- create, load, resume -----------------------------------------------------------------------


def test_new_study_stores_fingerprint(url: str) -> None:
    opened = _open(url, resume=None)
    assert not opened.existed and opened.counts.complete == 0 and not opened.needs_decision
    assert opened.study.user_attrs[FINGERPRINT_ATTR] == FINGERPRINT
    assert Path(url.removeprefix("sqlite:///")).is_file()


def test_resume_keeps_trials_and_none_asks(url: str) -> None:
    _run(_open(url).study, 3)
    resumed = _open(url, resume=True)
    assert resumed.existed and resumed.counts.complete == 3
    asked = _open(url, resume=None)
    assert asked.needs_decision and len(asked.study.trials) == 3


def test_resume_false_starts_fresh(url: str) -> None:
    _run(_open(url).study, 3)
    fresh = _open(url, resume=False, fingerprint={**FINGERPRINT, "model_id": "other"})
    assert not fresh.existed and fresh.study.trials == []
    assert fresh.study.user_attrs[FINGERPRINT_ATTR]["model_id"] == "other"


def test_fingerprint_mismatch_names_difference_and_fix(url: str) -> None:
    _run(_open(url).study, 1)
    changed = {**FINGERPRINT, "model_id": "another", "kl_positions": 3}
    with pytest.raises(StorageError) as error:
        _open(url, resume=True, fingerprint=changed)
    message = str(error.value)
    assert "model_id" in message and "kl_positions" in message
    assert "--study-name" in message and "\n" not in message


def test_objective_count_mismatch_is_refused(url: str) -> None:
    _open(url)
    with pytest.raises(StorageError, match="objectives"):
        _open(url, directions=("minimize", "minimize", "minimize"))


def _create_in_process(url: str, barrier: Any, results: Any) -> None:
    barrier.wait()
    try:
        opened = create_or_load_study(url, "race", seed=None, fingerprint=FINGERPRINT, resume=True)
        results.put(("ok", opened.study._study_id))
    except Exception as error:  # report any failure to the parent, which asserts on it
        results.put(("error", repr(error)))


@pytest.mark.parametrize("n_processes", [2, 4])
def test_concurrent_creation_on_an_empty_database(tmp_path: Path, n_processes: int) -> None:
    url = default_storage_url(tmp_path / f"race{n_processes}")
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(n_processes)
    results = context.Queue()
    processes = [
        context.Process(target=_create_in_process, args=(url, barrier, results))
        for _ in range(n_processes)
    ]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    assert all(kind == "ok" for kind, _ in outcomes), outcomes
    assert len({study_id for _, study_id in outcomes}) == 1
    assert len(optuna.get_all_study_names(url)) == 1


# --- budget and stale trials --------------------------------------------------------------------


ASK_WITH_HEARTBEAT = pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")


@ASK_WITH_HEARTBEAT
def test_counts(url: str) -> None:
    study = _open(url).study
    _run(study, 3)
    study.ask()  # one running trial (another worker's, say)
    counts = count_trials(study)
    assert (counts.complete, counts.running, counts.used) == (3, 1, 4)


def _first_random_x(study: optuna.Study) -> float:
    return study.ask().suggest_float("x", 0, 1)


def test_runs_with_neighbouring_seeds_draw_different_start_up_trials(url: str) -> None:
    """Seed 1 opening an empty study and seed 0 opening it one trial later are two runs racing
    (the CI failure "trials [1, 2] share parameters"): their random start-up draws must differ."""
    first = _open(url, seed=1).study
    first.add_trial(
        optuna.trial.create_trial(
            params={"x": 0.5},
            distributions={"x": optuna.distributions.FloatDistribution(0, 1)},
            values=[0.5, 0.5],
        )
    )
    second = _open(url, seed=0).study
    assert _first_random_x(first) != _first_random_x(second)


def test_a_fresh_study_uses_the_seed_as_given(url: str) -> None:
    other = default_storage_url(Path(url.removeprefix("sqlite:///")).parent / "other")
    assert _first_random_x(_open(url, seed=3).study) == _first_random_x(_open(other, seed=3).study)


@pytest.mark.parametrize("n_before", [1, 2, 5])
def test_resumed_seed_differs_from_every_small_fresh_seed(n_before: int) -> None:
    seeds = {study_module.sampler_seed(seed, n_before) for seed in range(100)}
    assert len(seeds) == 100 and not seeds & set(range(1000))


def test_enqueue_once_skips_duplicates(url: str) -> None:
    study = _open(url).study
    enqueue_once(study, {"x": 0.25})
    enqueue_once(study, {"x": 0.25})
    assert count_trials(study).waiting == 1


@ASK_WITH_HEARTBEAT
def test_stale_trial_is_failed_and_requeued(url: str) -> None:
    opened = _open(url, heartbeat_interval=1, grace_period=1)
    storage = opened.study._storage
    trial = opened.study.ask()
    trial.suggest_float("x", 0, 1)
    storage.record_heartbeat(trial._trial_id)  # the worker then "dies"
    time.sleep(2.5)
    reopened = _open(url, heartbeat_interval=1, grace_period=1)
    states = [t.state for t in reopened.study.trials]
    assert states == [TrialState.FAIL, TrialState.WAITING]
    assert reopened.study.trials[1].params == reopened.study.trials[0].params


# --- helpers ------------------------------------------------------------------------------------


def test_build_fingerprint_keeps_score_settings_only() -> None:
    settings = {"kl_positions": 2, "refusal_markers": ("a", "b"), "seed": 7, "n_trials": 100}
    fingerprint = build_fingerprint(
        model_id="m",
        revision="main",
        dtype="bfloat16",
        settings=settings,
        prompt_fingerprints={"harmful": "h", "harmless": "k"},
    )
    assert fingerprint["refusal_markers"] == ["a", "b"]
    assert fingerprint["kl_positions"] == 2
    assert "seed" not in fingerprint and "n_trials" not in fingerprint
    assert fingerprint["prompts"] == {"harmful": "h", "harmless": "k"}


def test_default_study_name() -> None:
    assert default_study_name("Qwen/Qwen3-4B") == "blasphemer-Qwen3-4B"
    assert default_study_name("/models/my model/") == "blasphemer-my-model"


# --- PostgreSQL (a throwaway server; opt-in marker) ---------------------------------------------


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    if find_bin_dir() is None:
        pytest.skip("PostgreSQL server binaries not installed")
    server = PostgresServer.start()
    yield server
    server.stop()


# Stops every worker once the whole study has used 12 trials (running ones count).
SHARED_BUDGET = MaxTrialsCallback(12, states=(TrialState.COMPLETE, TrialState.RUNNING))


def _optimize_in_process(url: str, barrier: Any, results: Any) -> None:
    barrier.wait()
    try:
        opened = create_or_load_study(
            url, "shared", seed=None, fingerprint=FINGERPRINT, resume=True
        )
        opened.study.optimize(
            lambda t: (t.suggest_float("x", 0, 1), 0.0), callbacks=[SHARED_BUDGET]
        )
        results.put(("ok", opened.study._study_id))
    except Exception as error:  # report any failure to the parent, which asserts on it
        results.put(("error", repr(error)))


@pytest.mark.postgres
def test_postgres_workers_share_one_study_and_budget(postgres: PostgresServer) -> None:
    url = postgres.create_database("workers").replace("postgresql+psycopg://", "postgresql://")
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(3), context.Queue()
    processes = [
        context.Process(target=_optimize_in_process, args=(url, barrier, results)) for _ in range(3)
    ]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=180) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    assert all(kind == "ok" for kind, _ in outcomes), outcomes
    assert len({study_id for _, study_id in outcomes}) == 1
    study = create_or_load_study(url, "shared", seed=0, fingerprint=FINGERPRINT, resume=True).study
    # Each worker stops once the study holds the budget; simultaneous checks may add one each.
    assert 12 <= count_trials(study).complete <= 12 + 2


@pytest.mark.postgres
def test_postgres_fingerprint_mismatch(postgres: PostgresServer) -> None:
    url = postgres.create_database("mismatch")
    _run(_open(url).study, 1)
    with pytest.raises(StorageError, match="model_id"):
        _open(url, fingerprint={**FINGERPRINT, "model_id": "other"})
    assert (
        _open(url, resume=False, fingerprint={**FINGERPRINT, "model_id": "other"}).counts.used == 0
    )


def test_metadata_round_trips_and_a_foreign_study_is_named(tmp_path: Path) -> None:
    from blasphemer.directions import Directions
    from blasphemer.errors import StorageError
    from blasphemer.optimization.metadata import (
        has_metadata,
        read_metadata,
        store_metadata,
        stored_budget,
    )

    study = optuna.create_study(
        storage=open_storage(f"sqlite:///{tmp_path / 'm.db'}"), study_name="m"
    )
    assert not has_metadata(study) and stored_budget(study) is None
    with pytest.raises(StorageError, match=r"study 'm' in shown-url was not started by"):
        read_metadata(study, "shown-url")
    vectors = torch.nn.functional.normalize(torch.randn(3, 5, dtype=torch.float64), dim=-1)
    directions = Directions(vectors.float(), torch.tensor([0.5, 1.5, 2.5]))
    store_metadata(study, {"model": "m", "n_trials": 7}, directions, 7)
    again = optuna.load_study(study_name="m", storage=f"sqlite:///{tmp_path / 'm.db'}")
    assert has_metadata(again) and stored_budget(again) == 7
    metadata = read_metadata(again, "shown-url")
    assert metadata.settings == {"model": "m", "n_trials": 7} and metadata.budget == 7
    assert torch.equal(metadata.directions.vectors, directions.vectors)
    assert torch.equal(metadata.directions.strength, directions.strength)
