"""Choosing judges by name: the marker rule (no torch needed) or the semantic judge (imported
only when asked for)."""

from __future__ import annotations

from collections.abc import Iterable

from blasphemer.errors import DatasetError
from blasphemer.evaluation.judging import Judge, MarkerJudge
from blasphemer.evaluation.markers import RefusalMarkers

JUDGES = ("markers", "semantic")


def make_judge(
    name: str,
    markers: RefusalMarkers | Iterable[str] | None = None,
    encoder: str | None = None,
) -> Judge:
    """The judge called ``name`` (one of :data:`JUDGES`). ``markers`` are the marker judge's;
    ``encoder`` is the semantic judge's sentence encoder (a folder or hub id; default
    all-MiniLM-L6-v2 from the hub)."""
    if name == "markers":
        return MarkerJudge(markers)
    if name == "semantic":
        from blasphemer.evaluation.semantic import DEFAULT_ENCODER, SemanticJudge

        return SemanticJudge(encoder or DEFAULT_ENCODER)
    raise DatasetError(f"unknown judge {name!r}; use one of: {', '.join(JUDGES)}")


def judge_names(setting: str) -> list[str]:
    """The judges a ``--judge`` setting runs: ``markers``, ``semantic``, or both for ``both``
    (the semantic one first: its count is the headline)."""
    return ["semantic", "markers"] if setting == "both" else [setting]
