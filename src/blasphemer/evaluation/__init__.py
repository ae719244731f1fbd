"""Scorers of a (possibly edited) model: refusal rate and KL divergence, behind one protocol.

See :mod:`blasphemer.evaluation.generation` for the early-stopping generation and the exact
equivalences it keeps, and :mod:`blasphemer.evaluation.markers` for how markers were chosen.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from blasphemer._lazy import lazy_exports

if TYPE_CHECKING:
    from blasphemer.evaluation.base import (
        BaseScorer,
        HarmlessRefusals,
        Scorer,
        ScorerContext,
        load_scorer_classes,
        load_scorers,
    )
    from blasphemer.evaluation.generation import (
        ModelLike,
        StopReason,
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
    "RefusalMarkers",
    "RefusalResult",
    "RefusalScorer",
    "Scorer",
    "ScorerContext",
    "StopReason",
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
__getattr__ = lazy_exports(
    __name__,
    {
        "blasphemer.evaluation.base": [
            "BaseScorer",
            "HarmlessRefusals",
            "Scorer",
            "ScorerContext",
            "load_scorer_classes",
            "load_scorers",
        ],
        "blasphemer.evaluation.generation": [
            "ModelLike",
            "StopReason",
            "Verdict",
            "generate_verdicts",
            "greedy_tokens",
        ],
        "blasphemer.evaluation.markers": [
            "common_response_prefix",
            "DEFAULT_REFUSAL_MARKERS",
            "RefusalMarkers",
            "is_refusal",
            "normalize",
            "wilson_interval",
        ],
        "blasphemer.evaluation.kl": ["KLScorer", "kl_divergence"],
        "blasphemer.evaluation.refusals": ["RefusalResult", "RefusalScorer"],
    },
)
