"""The trial runner's stale-trial rule, in process (the subprocess kill tests are in
test_distributed.py and test_run_e2e.py)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from blasphemer.optimization.runner import BudgetGate, run_trials
from blasphemer.optimization.storage import open_storage


def _study(tmp_path: Path) -> optuna.Study:
    storage = open_storage(
        f"sqlite:///{tmp_path / 'study.db'}", heartbeat_interval=1, grace_period=1
    )
    return optuna.create_study(storage=storage, directions=["minimize", "minimize"])


def _objective(trial: optuna.Trial, seconds: float = 0.0) -> tuple[float, float]:
    x = trial.suggest_float("x", 0.0, 1.0)
    time.sleep(seconds)
    return x, 1.0 - x


def _run_in_thread(study: optuna.Study, budget: int, seconds: float = 0.0) -> threading.Thread:
    thread = threading.Thread(
        target=run_trials,
        args=(study, lambda trial: _objective(trial, seconds)),
        kwargs={
            "budget": budget,
            "gate": BudgetGate(study),
            "heartbeat_interval": 1,
            "poll_seconds": 0.1,
        },
        daemon=True,
    )
    thread.start()
    return thread


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_trial_of_a_worker_killed_before_its_first_heartbeat_is_re_run(tmp_path: Path) -> None:
    # A worker killed between ``ask`` and its first heartbeat leaves a RUNNING trial with no
    # heartbeat row; Optuna alone never counts that as stale, and a resumed run waited forever.
    study = _study(tmp_path)
    orphan = study.ask({"x": optuna.distributions.FloatDistribution(0.0, 1.0)})
    thread = _run_in_thread(study, budget=3)
    thread.join(timeout=60)
    assert not thread.is_alive(), "the runner waits forever on the heartbeat-less trial"
    trials = study.get_trials()
    assert trials[orphan.number].state == TrialState.FAIL
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 3
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == orphan.number]
    assert len(retries) == 1 and retries[0].params == trials[orphan.number].params


def test_live_trials_longer_than_the_grace_period_are_never_failed(tmp_path: Path) -> None:
    # Two workers at one gate, each trial outlasting the grace period: only the heartbeats keep
    # them alive, and the orphan rule must not fail or double-run any of them.
    study = _study(tmp_path)
    threads = [_run_in_thread(study, budget=4, seconds=2.5) for _ in range(2)]
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive()
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.COMPLETE] * 4
