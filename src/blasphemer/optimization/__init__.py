"""Optimisation: the search space, the study in its storage, the objective and trial selection."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from blasphemer.optimization.fingerprint import build_fingerprint
    from blasphemer.optimization.objective import Objective, TrialResult, completed_results
    from blasphemer.optimization.search_space import (
        SearchSpace,
        parameters_from_dict,
        parameters_to_dict,
    )
    from blasphemer.optimization.selection import (
        SelectionRule,
        Tier,
        pareto_front,
        parse_rule,
        recommended,
        tier,
    )
    from blasphemer.optimization.study import (
        OpenedStudy,
        TrialCounts,
        count_trials,
        create_or_load_study,
        default_storage_url,
        default_study_name,
        enqueue_once,
        open_storage,
        redact_url,
    )

__all__ = [
    "Objective",
    "OpenedStudy",
    "SearchSpace",
    "SelectionRule",
    "Tier",
    "TrialCounts",
    "TrialResult",
    "build_fingerprint",
    "completed_results",
    "count_trials",
    "create_or_load_study",
    "default_storage_url",
    "default_study_name",
    "enqueue_once",
    "open_storage",
    "parameters_from_dict",
    "parameters_to_dict",
    "pareto_front",
    "parse_rule",
    "recommended",
    "redact_url",
    "tier",
]

# Imported on first use, so that tier() (selection) comes without torch or optuna.
_HOMES = {
    "build_fingerprint": "blasphemer.optimization.fingerprint",
    "Objective": "blasphemer.optimization.objective",
    "TrialResult": "blasphemer.optimization.objective",
    "completed_results": "blasphemer.optimization.objective",
    "SearchSpace": "blasphemer.optimization.search_space",
    "parameters_from_dict": "blasphemer.optimization.search_space",
    "parameters_to_dict": "blasphemer.optimization.search_space",
    "SelectionRule": "blasphemer.optimization.selection",
    "Tier": "blasphemer.optimization.selection",
    "pareto_front": "blasphemer.optimization.selection",
    "parse_rule": "blasphemer.optimization.selection",
    "recommended": "blasphemer.optimization.selection",
    "tier": "blasphemer.optimization.selection",
    "OpenedStudy": "blasphemer.optimization.study",
    "TrialCounts": "blasphemer.optimization.study",
    "count_trials": "blasphemer.optimization.study",
    "create_or_load_study": "blasphemer.optimization.study",
    "default_storage_url": "blasphemer.optimization.study",
    "default_study_name": "blasphemer.optimization.study",
    "enqueue_once": "blasphemer.optimization.study",
    "open_storage": "blasphemer.optimization.study",
    "redact_url": "blasphemer.optimization.study",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
