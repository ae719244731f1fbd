"""The fingerprint of a study: what its trial scores depend on.

Model, revision, dtype, the scoring settings and the prompt sets. A study stores it; a run or a
worker whose fingerprint differs is refused with the keys that differ, since mixing scores of two
setups in one Pareto front would be meaningless.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SCORE_SETTINGS: tuple[str, ...] = (
    "quantization",
    "system_prompt",
    "split_seed",
    "max_fit_prompts",
    "n_select_prompts",
    "projected_directions",
    "norm_preserving",
    "refusal_markers",
    "max_new_tokens",
    "decided_after",
    "exact_verdicts",
    "kl_positions",
    "scorers",
)
"""Settings whose change makes earlier trial scores incomparable."""


def build_fingerprint(
    *,
    model_id: str,
    revision: str | None,
    dtype: str,
    settings: Mapping[str, Any],
    prompt_fingerprints: Mapping[str, str],
    model_digest: str | None = None,
) -> dict[str, Any]:
    """What a study's scores depend on, as a JSON-normalised dict.

    ``settings`` is e.g. ``Settings.model_dump()``; only the keys in :data:`SCORE_SETTINGS` are
    kept. ``prompt_fingerprints`` maps a set name (``"harmful"``) to its content hash;
    ``model_digest`` identifies the weights of a local model folder.
    """
    fingerprint = {
        "model_id": model_id,
        "model_digest": model_digest,
        "revision": revision,
        "dtype": dtype,
        **{key: settings[key] for key in SCORE_SETTINGS if key in settings},
        "prompts": dict(prompt_fingerprints),
    }
    return normalized(fingerprint)


def normalized(value: Mapping[str, Any]) -> dict[str, Any]:
    """``value`` as it reads back from JSON (keys sorted, non-JSON values as strings)."""
    result: dict[str, Any] = json.loads(json.dumps(value, default=str, sort_keys=True))
    return result


def fingerprint_differences(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """Keys whose values differ, as ``"key: old → new"`` (values shortened), sorted by key."""
    differences = []
    for key in sorted(set(stored) | set(wanted)):
        old, new = stored.get(key), wanted.get(key)
        if old != new:
            differences.append(f"{key}: {_short(old)} → {_short(new)}")
    return differences


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def model_digest(model_id: str) -> str:
    """Cheap identity of a local model: a folder's config and the names and sizes of its files,
    or a single file's (a GGUF) name and size; ``"hub"`` for hub ids."""
    folder = Path(model_id).expanduser()
    if folder.is_file():
        return hashlib.sha256(f"{folder.name}:{folder.stat().st_size}".encode()).hexdigest()[:16]
    if not folder.is_dir():
        return "hub"
    hasher = hashlib.sha256((folder / "config.json").read_bytes())
    for path in sorted(folder.iterdir()):
        if path.is_file():
            hasher.update(f"{path.name}:{path.stat().st_size}".encode())
    return hasher.hexdigest()[:16]
