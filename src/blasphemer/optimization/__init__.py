"""Optimisation: the search space, the study (its storage, metadata and fingerprint), the
objective and trial selection."""

from __future__ import annotations

from typing import TYPE_CHECKING

from blasphemer._lazy import lazy_exports

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
        recommended_held_out,
        tier,
    )
    from blasphemer.optimization.storage import default_storage_url, open_storage, redact_url
    from blasphemer.optimization.study import (
        OpenedStudy,
        TrialCounts,
        count_trials,
        create_or_load_study,
        default_study_name,
        enqueue_once,
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
    "recommended_held_out",
    "redact_url",
    "tier",
]

# Imported on first use, so that tier() (selection) comes without torch or optuna.
__getattr__ = lazy_exports(
    __name__,
    {
        "blasphemer.optimization.fingerprint": ["build_fingerprint"],
        "blasphemer.optimization.objective": ["Objective", "TrialResult", "completed_results"],
        "blasphemer.optimization.search_space": [
            "SearchSpace",
            "parameters_from_dict",
            "parameters_to_dict",
        ],
        "blasphemer.optimization.selection": [
            "SelectionRule",
            "Tier",
            "pareto_front",
            "parse_rule",
            "recommended",
            "recommended_held_out",
            "tier",
        ],
        "blasphemer.optimization.storage": ["default_storage_url", "open_storage", "redact_url"],
        "blasphemer.optimization.study": [
            "OpenedStudy",
            "TrialCounts",
            "count_trials",
            "create_or_load_study",
            "default_study_name",
            "enqueue_once",
        ],
    },
)
