"""``blasphemer worker``: join a study that ``blasphemer run`` started and run its trials."""

from __future__ import annotations

import time

import optuna

from blasphemer.app import preflight, stages
from blasphemer.app.config import Settings
from blasphemer.app.console import Console
from blasphemer.errors import ConfigError, StorageError
from blasphemer.optimization import (
    count_trials,
    create_or_load_study,
    open_storage,
    redact_url,
)
from blasphemer.optimization.metadata import FINGERPRINT_ATTR, has_metadata, read_metadata

WORKER_WAIT_S = 3600  # how long a worker waits for `run` to start its study
WORKER_POLL_S = 2.0


def work(settings: Settings, console: Console) -> int:
    """``blasphemer worker``: join a study started by ``run`` and run trials until its budget."""
    if settings.storage is None or settings.study_name is None:
        raise ConfigError("a worker needs --storage URL and --study-name NAME of a running study")
    shown = redact_url(settings.storage)
    preflight.check_storage(settings.storage)
    study = _await_study(open_storage(settings.storage), settings.study_name, shown, console)
    metadata = read_metadata(study, shown)
    directions, budget = metadata.directions, metadata.budget
    local = {k: v for k, v in settings.model_dump().items() if k in settings.model_fields_set}
    joined = Settings(**{**metadata.settings, **local, "resume": True})
    assert joined.model is not None
    numbers = {"load": 1, "prompts_and_batch_size": 2}  # mapping the layers is part of stage 1

    def step(key: str, title: str) -> None:
        if key in numbers:
            console.stage(numbers[key], 4, title)

    ctx = stages.prepare(joined, console, step)
    scorers = ctx.select_scorers()
    scorers.record_layers()  # no unedited pass here would fill the layer cache
    console.stage(3, 4, f"Joining study {settings.study_name!r} in {shown}")
    space = ctx.search_space()
    opened = create_or_load_study(
        settings.storage,
        settings.study_name,
        seed=None,
        fingerprint=ctx.fingerprint(),
        resume=True,
        n_startup_trials=joined.n_startup_trials,
        heartbeat_interval=joined.heartbeat_interval,
        grace_period=joined.grace_period,
    )
    console.stage(4, 4, f"Running trials until the study has {budget}")
    stages.optimise(ctx, stages.StudyRun(opened.study, budget, directions, space), scorers)
    counts = count_trials(opened.study)
    console.info(f"study budget reached: {counts.complete} trials complete")
    return 0


def _await_study(
    storage: optuna.storages.BaseStorage, name: str, shown: str, console: Console
) -> optuna.Study:
    """Study ``name`` once ``run`` has stored what workers need (settings, directions, budget).

    A worker may start before ``run`` (all machines launched at once, or ``run`` still loading a
    large model): it waits up to :data:`WORKER_WAIT_S`, saying once what it waits for. A study
    of that name that Blasphemer did not make is refused at once.
    """
    deadline = time.monotonic() + WORKER_WAIT_S
    said = False
    while True:
        try:
            study: optuna.Study | None = optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            study = None
        if study is not None:
            if has_metadata(study):
                return study
            if FINGERPRINT_ATTR not in study.user_attrs and study.get_trials(deepcopy=False):
                return study  # not ours: read_metadata says so in one line
        if time.monotonic() >= deadline:
            raise StorageError(
                f"study {name!r} in {shown} was not started within {WORKER_WAIT_S // 60} "
                "minutes; start it with `blasphemer run MODEL --storage URL --study-name NAME` "
                "or check --study-name"
            )
        if not said:
            others = [n for n in optuna.get_all_study_names(storage) if n != name]
            there = f" (studies there now: {', '.join(others)})" if others else ""
            console.info(
                f"waiting for `blasphemer run` to start study {name!r} in {shown}{there}; "
                f"up to {WORKER_WAIT_S // 60} minutes, Ctrl-C to stop"
            )
            said = True
        time.sleep(WORKER_POLL_S)
