"""Optimisation: the search space, the study in its storage, the objective and trial selection."""

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
    budget_callback,
    count_trials,
    create_or_load_study,
    default_storage_url,
    default_study_name,
    enqueue_once,
    open_storage,
    redact_url,
    remaining_trials,
)

__all__ = [
    "Objective",
    "OpenedStudy",
    "SearchSpace",
    "SelectionRule",
    "Tier",
    "TrialCounts",
    "TrialResult",
    "budget_callback",
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
    "remaining_trials",
    "tier",
]
