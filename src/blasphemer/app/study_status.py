"""``blasphemer status``: a study's trial counts, the workers seen and its current Pareto front."""

from __future__ import annotations

import optuna

from blasphemer.app import preflight
from blasphemer.app.config import Settings
from blasphemer.app.console import Console, front_cells
from blasphemer.errors import ConfigError, StorageError
from blasphemer.optimization import (
    completed_results,
    count_trials,
    open_storage,
    pareto_front,
    recommended,
    redact_url,
)
from blasphemer.optimization.metadata import stored_budget


def status(settings: Settings, console: Console) -> int:
    """Workers, trial counts and the current Pareto front of a study."""
    if settings.storage is None or settings.study_name is None:
        raise ConfigError("status needs --storage URL and --study-name NAME")
    shown = redact_url(settings.storage)
    preflight.check_storage(settings.storage)
    storage = open_storage(settings.storage)
    try:
        study = optuna.load_study(study_name=settings.study_name, storage=storage)
    except KeyError:
        raise StorageError(
            f"no study {settings.study_name!r} in {shown}; check --study-name"
        ) from None
    counts = count_trials(study)
    stored = stored_budget(study)
    budget = "?" if stored is None else stored
    workers = sorted(
        {str(t.user_attrs.get("worker", "?")) for t in study.get_trials(deepcopy=False)}
    )
    console.info(
        f"study {settings.study_name!r} in {shown}: {counts.complete}/{budget} complete, "
        f"{counts.running} running, {counts.waiting} waiting, {counts.failed} failed; "
        f"workers seen: {', '.join(workers) or 'none'}"
    )
    front = pareto_front(completed_results(study))
    star = recommended(front)
    rows = [front_cells(r, star) for r in sorted(front, key=lambda r: (r.refusal_rate, r.kl))]
    console.table("current Pareto front", ["trial", "refusals", "KL", "tier"], rows)
    return 0
