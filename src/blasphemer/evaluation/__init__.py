"""Scorers of a (possibly edited) model: refusal rate and KL divergence, behind one protocol.

See :mod:`blasphemer.evaluation.generation` for the early-stopping generation and the exact
equivalences it keeps, and :mod:`blasphemer.evaluation.markers` for how markers were chosen.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from blasphemer.evaluation.base import (
        BaseScorer,
        HarmlessRefusals,
        ModelLike,
        Scorer,
        ScorerContext,
        load_scorer_classes,
        load_scorers,
    )
    from blasphemer.evaluation.generation import (
        Outcome,
        Verdict,
        generate_verdicts,
        greedy_tokens,
    )
    from blasphemer.evaluation.kl import KLScorer, kl_divergence
    from blasphemer.evaluation.markers import (
        DEFAULT_REFUSAL_MARKERS,
        RefusalMarkers,
        common_response_prefix,
        is_refusal,
        normalize,
        wilson_interval,
    )
    from blasphemer.evaluation.refusals import RefusalResult, RefusalScorer

__all__ = [
    "DEFAULT_REFUSAL_MARKERS",
    "BaseScorer",
    "HarmlessRefusals",
    "KLScorer",
    "ModelLike",
    "Outcome",
    "RefusalMarkers",
    "RefusalResult",
    "RefusalScorer",
    "Scorer",
    "ScorerContext",
    "Verdict",
    "common_response_prefix",
    "generate_verdicts",
    "greedy_tokens",
    "is_refusal",
    "kl_divergence",
    "load_scorer_classes",
    "load_scorers",
    "normalize",
    "wilson_interval",
]

# Imported on first use: the markers (needed to parse settings) must not pull in torch.
_HOMES = {
    "BaseScorer": "blasphemer.evaluation.base",
    "HarmlessRefusals": "blasphemer.evaluation.base",
    "ModelLike": "blasphemer.evaluation.base",
    "Scorer": "blasphemer.evaluation.base",
    "ScorerContext": "blasphemer.evaluation.base",
    "load_scorer_classes": "blasphemer.evaluation.base",
    "load_scorers": "blasphemer.evaluation.base",
    "Outcome": "blasphemer.evaluation.generation",
    "Verdict": "blasphemer.evaluation.generation",
    "common_response_prefix": "blasphemer.evaluation.markers",
    "generate_verdicts": "blasphemer.evaluation.generation",
    "greedy_tokens": "blasphemer.evaluation.generation",
    "KLScorer": "blasphemer.evaluation.kl",
    "kl_divergence": "blasphemer.evaluation.kl",
    "DEFAULT_REFUSAL_MARKERS": "blasphemer.evaluation.markers",
    "RefusalMarkers": "blasphemer.evaluation.markers",
    "is_refusal": "blasphemer.evaluation.markers",
    "normalize": "blasphemer.evaluation.markers",
    "wilson_interval": "blasphemer.evaluation.markers",
    "RefusalResult": "blasphemer.evaluation.refusals",
    "RefusalScorer": "blasphemer.evaluation.refusals",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
