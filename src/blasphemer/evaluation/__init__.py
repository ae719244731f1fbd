"""Scorers of a (possibly edited) model: refusal rate and KL divergence, behind one protocol.

See :mod:`blasphemer.evaluation.generation` for the early-stopping generation and the exact
equivalences it keeps, and :mod:`blasphemer.evaluation.markers` for how markers were chosen.
"""

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
    common_response_prefix,
    generate_verdicts,
    greedy_tokens,
)
from blasphemer.evaluation.kl import KLScorer, kl_divergence
from blasphemer.evaluation.markers import (
    DEFAULT_REFUSAL_MARKERS,
    RefusalMarkers,
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
