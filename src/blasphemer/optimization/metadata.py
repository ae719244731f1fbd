"""What a study stores beside its trials, so that any worker can join it and any command can read
it back: the shared settings, the refusal directions, the trial budget and the fingerprint of
what the scores depend on (checked by :mod:`blasphemer.optimization.study`).

Plain values in, plain values out: settings arrive as the JSON-able mapping the app made of them.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import optuna
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from blasphemer.directions import Directions
from blasphemer.errors import StorageError

ATTR_SETTINGS = "blasphemer:settings"
ATTR_DIRECTIONS = "blasphemer:directions"
ATTR_BUDGET = "blasphemer:budget"
FINGERPRINT_ATTR = "fingerprint"
STUDY_ATTRS = (ATTR_SETTINGS, ATTR_DIRECTIONS, ATTR_BUDGET)


@dataclass(frozen=True)
class StudyMetadata:
    """A study's stored settings (worker-local ones left out), directions and trial budget."""

    settings: dict[str, Any]
    directions: Directions
    budget: int


def encode_directions(directions: Directions) -> str:
    """``directions`` as ASCII text (base64 of a safetensors blob) for a study attribute."""
    tensors = {"vectors": directions.vectors.contiguous(), "strength": directions.strength}
    return base64.b64encode(save_tensors(tensors)).decode("ascii")


def decode_directions(text: str) -> Directions:
    """Inverse of :func:`encode_directions` (float32)."""
    tensors = load_tensors(base64.b64decode(text))
    return Directions(tensors["vectors"].to(torch.float32), tensors["strength"].to(torch.float32))


def store_metadata(
    study: optuna.Study, settings: Mapping[str, Any], directions: Directions, budget: int
) -> None:
    """Record what a worker needs to join: settings, directions and the trial budget."""
    study.set_user_attr(ATTR_SETTINGS, dict(settings))
    study.set_user_attr(ATTR_DIRECTIONS, encode_directions(directions))
    study.set_user_attr(ATTR_BUDGET, budget)


def has_metadata(study: optuna.Study) -> bool:
    """Whether ``blasphemer run`` has stored everything a worker needs (it does so last)."""
    attrs = study.user_attrs
    return all(key in attrs for key in STUDY_ATTRS)


def stored_budget(study: optuna.Study) -> int | None:
    """The study's trial budget, or None before a run has stored one."""
    value = study.user_attrs.get(ATTR_BUDGET)
    return None if value is None else int(value)


def read_metadata(study: optuna.Study, shown_url: str) -> StudyMetadata:
    """The stored metadata; a one-line StorageError naming ``shown_url`` for a study that
    ``blasphemer run`` did not start."""
    attrs = study.user_attrs
    if ATTR_SETTINGS not in attrs or ATTR_DIRECTIONS not in attrs:
        raise StorageError(
            f"study {study.study_name!r} in {shown_url} was not started by `blasphemer run`; "
            "start it with `blasphemer run MODEL --storage URL --study-name NAME`"
        )
    return StudyMetadata(
        dict(attrs[ATTR_SETTINGS]),
        decode_directions(attrs[ATTR_DIRECTIONS]),
        int(attrs.get(ATTR_BUDGET, 0)),
    )
