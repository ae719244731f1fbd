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

import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from blasphemer.errors import StorageError
from blasphemer.optimization.fingerprint import fingerprint_differences, normalized
from blasphemer.optimization.metadata import FINGERPRINT_ATTR
from blasphemer.optimization.storage import normalize_url, open_storage, redact_url, retry

RESTART_HINT = "choose a new --study-name or pass --no-resume to discard it"

Direction = Literal["minimize", "maximize"]


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
        retry(lambda: optuna.delete_study(study_name=study_name, storage=storage), storage_url)
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

    study = retry(create, storage_url)
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

    return retry(lookup, url)


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
