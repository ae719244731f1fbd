"""What a run leaves beside the saved weights: model card, ``results.json``, and the upload.

:class:`HeldOutScores` holds the chosen edit's numbers on the held-out *report* split;
:func:`model_card` describes the edit and those numbers in Markdown; :func:`write_results`
records a run machine-readably; :func:`upload_to_hub` pushes a saved folder to the Hugging Face
Hub with the token from ``HF_TOKEN`` (or a stored login).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blasphemer import __version__
from blasphemer.ablation import AblationParameters
from blasphemer.errors import ExportError
from blasphemer.evaluation.markers import wilson_interval
from blasphemer.export import OUTPUT_MARKER, write_text_atomic
from blasphemer.optimization.objective import TrialResult
from blasphemer.optimization.search_space import parameters_to_dict
from blasphemer.optimization.storage import redact_url

CARD_TAGS = ("abliterated", "uncensored", "blasphemer")


@dataclass(frozen=True)
class HeldOutScores:
    """The chosen edit measured on the held-out *report* split."""

    refusals: int
    n_prompts: int
    kl: float
    original_refusals: int | None = None  # the unedited model on the same prompts
    extra: Mapping[str, float] = field(default_factory=dict)
    # The semantic judge's counts on the same answers (--judge semantic or both), else None.
    semantic_refusals: int | None = None
    original_semantic_refusals: int | None = None

    @property
    def headline_rate(self) -> float:
        """The rate choices and tiers use: the semantic judge's when it ran, else the markers'."""
        count = self.refusals if self.semantic_refusals is None else self.semantic_refusals
        return count / self.n_prompts if self.n_prompts else math.nan

    @property
    def refusal_rate(self) -> float:
        return self.refusals / self.n_prompts if self.n_prompts else math.nan

    @property
    def original_refusal_rate(self) -> float | None:
        if self.original_refusals is None or not self.n_prompts:
            return None
        return self.original_refusals / self.n_prompts

    def to_dict(self) -> dict[str, Any]:
        low, high = wilson_interval(self.refusals, self.n_prompts)
        return {
            "refusals": self.refusals,
            "n_prompts": self.n_prompts,
            "refusal_rate": self.refusal_rate,
            "refusal_rate_95ci": [low, high],
            "original_refusals": self.original_refusals,
            "original_refusal_rate": self.original_refusal_rate,
            "kl": _json_number(self.kl),
            "extra": {k: _json_number(v) for k, v in self.extra.items()},
            **self._semantic_dict(),
        }

    def _semantic_dict(self) -> dict[str, Any]:
        if self.semantic_refusals is None:
            return {}
        low, high = wilson_interval(self.semantic_refusals, self.n_prompts)
        return {
            "semantic_refusals": self.semantic_refusals,
            "semantic_refusal_rate": self.semantic_refusals / self.n_prompts,
            "semantic_refusal_rate_95ci": [low, high],
            "original_semantic_refusals": self.original_semantic_refusals,
        }


def _json_number(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)  # JSON has no inf or nan


# --- model card ---------------------------------------------------------------------------------


def _percent(rate: float | None) -> str:
    return "n/a" if rate is None or math.isnan(rate) else f"{rate:.1%}"


def count_with_interval(count: int, n: int) -> str:
    """``count/n = rate (95 % CI low–high)``: how the card and the report write a refusal count."""
    low, high = wilson_interval(count, n)
    rate = count / n if n else math.nan
    return f"{count}/{n} = {_percent(rate)} (95 % CI {low:.1%}–{high:.1%})"


def parameters_table(parameters: AblationParameters) -> list[str]:
    """Markdown lines describing an edit (direction and one kernel row per component kind)."""
    index = parameters.direction_index
    lines = [
        f"- direction: {'per layer' if index is None else f'global, layer index {index:.2f}'}",
        f"- norm preserving: {'yes' if parameters.norm_preserving else 'no'}",
        "",
        "| component | max weight | at layer | min weight | distance (layers) |",
        "|---|---|---|---|---|",
    ]
    for kind, kernel in parameters.kernels.items():
        lines.append(
            f"| {kind.value} | {kernel.max_weight:.3f} | {kernel.max_weight_position:.2f} | "
            f"{kernel.min_weight:.3f} | {kernel.min_weight_distance:.2f} |"
        )
    return lines


def model_card(
    *,
    base_model: str,
    parameters: AblationParameters,
    trial_number: int,
    scores: HeldOutScores | None = None,
    hub_base_model: bool = True,
    gguf_source: Mapping[str, str] | None = None,
    gguf_export: Mapping[str, object] | None = None,
) -> str:
    """Markdown model card with YAML front matter, the edit and its held-out scores.

    ``hub_base_model=False`` (a local source folder) leaves ``base_model`` out of the front
    matter, which the Hub expects to be a repository id. ``gguf_source`` (``file`` and
    ``sha256``) names the GGUF the weights were dequantised from; ``gguf_export`` (``file``,
    ``type``, ``sha256``, ``summary``) the GGUF written beside the weights.
    """
    front = ["---"]
    if hub_base_model:
        front.append(f"base_model: {json.dumps(base_model)}")
    front += ["library_name: transformers", "tags:", *(f"- {t}" for t in CARD_TAGS), "---", ""]
    name = Path(base_model.rstrip("/")).name
    body = [
        f"# {name} (abliterated)",
        "",
        f"`{base_model}` with its refusal direction removed from the weights by directional "
        f"ablation, made with Blasphemer {__version__} (trial {trial_number} of its study).",
        "",
    ]
    if gguf_source is not None:
        body += [
            "## Source",
            "",
            f"Loaded from the GGUF file `{gguf_source['file']}` (sha256 `{gguf_source['sha256']}`),"
            " dequantised by transformers; the weights here are its float values with the edit "
            "merged in.",
            "",
        ]
    if gguf_export is not None:
        body += [
            "## GGUF",
            "",
            f"`{gguf_export['file']}` ({gguf_export['type']}, sha256 `{gguf_export['sha256']}`) "
            f"holds the same model for llama.cpp, Ollama and LM Studio: {gguf_export['summary']}.",
            "",
        ]
    body += [
        "## Edit",
        "",
        *parameters_table(parameters),
        "",
    ]
    if scores is not None:
        n = scores.n_prompts
        body += [
            "## Held-out scores",
            "",
            "Measured on prompts the optimiser never saw (report split).",
            "",
            "| metric | value |",
            "|---|---|",
            f"| refusals (markers) | {count_with_interval(scores.refusals, n)} |",
        ]
        if scores.semantic_refusals is not None:
            semantic = count_with_interval(scores.semantic_refusals, n)
            body.append(f"| refusals (semantic judge) | {semantic} |")
        if scores.original_refusals is not None:
            body.append(
                f"| refusals of the original model (markers) | "
                f"{scores.original_refusals}/{scores.n_prompts}"
                f" = {_percent(scores.original_refusal_rate)} |"
            )
        if scores.original_semantic_refusals is not None:
            body.append(
                f"| refusals of the original model (semantic judge) | "
                f"{scores.original_semantic_refusals}/{scores.n_prompts} |"
            )
        body.append(f"| KL divergence from the original (harmless prompts) | {scores.kl:.4f} |")
        body += [f"| {name} | {value:.4g} |" for name, value in scores.extra.items()]
        body.append("")
    body += [
        "## Caution",
        "",
        "This model no longer refuses requests its original did. You are responsible for how you "
        "use it.",
        "",
    ]
    return "\n".join(front + body)


# --- results.json -------------------------------------------------------------------------------


def _clean(value: Any) -> Any:
    """JSON-safe copy: URLs without passwords, non-finite floats as strings."""
    if isinstance(value, str) and "://" in value:
        return redact_url(value)
    if isinstance(value, float):
        return _json_number(value)
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def trial_to_dict(result: TrialResult) -> dict[str, Any]:
    """JSON form of a trial's parameters and scores."""
    return {
        "number": result.number,
        "values": [_json_number(v) for v in result.values],
        "refusal_rate": _json_number(result.refusal_rate),
        "kl": _json_number(result.kl),
        "refusals": result.refusals,
        "n_prompts": result.n_prompts,
        "seconds": result.seconds,
        # Scoring stopped once the trial was provably dominated: refusals are a lower bound.
        "dominated_early": result.dominated_early,
        # Set when ``refusals`` was confirmed on whole answers after the search: the search's
        # own (early-verdict) count, a lower bound.
        "early_refusals": result.early_refusals,
        "extra": {k: _json_number(v) for k, v in result.extra.items()},
        "parameters": None if result.parameters is None else parameters_to_dict(result.parameters),
    }


def write_results(
    path: Path,
    *,
    settings: Mapping[str, Any],
    trials: Sequence[TrialResult],
    front: Sequence[TrialResult],
    chosen: TrialResult | None,
    held_out: HeldOutScores | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``results.json`` atomically: settings, every trial, the front and the choice.

    URLs in ``settings`` lose their passwords; ``extra`` holds anything else worth keeping
    (model id, fingerprints, timings).
    """
    record = {
        "blasphemer_version": __version__,
        "settings": _clean(dict(settings)),
        "trials": [trial_to_dict(t) for t in trials],
        "pareto_front": [t.number for t in front],
        "chosen": None if chosen is None else trial_to_dict(chosen),
        "held_out": None if held_out is None else held_out.to_dict(),
        **_clean(dict(extra or {})),
    }
    text = json.dumps(record, indent=2, default=str, allow_nan=False)
    return write_text_atomic(Path(path), text + "\n")


# --- upload -------------------------------------------------------------------------------------


def upload_to_hub(folder: Path, repo_id: str, *, private: bool = True) -> str:
    """Upload a saved model folder to ``repo_id`` (created if missing). Returns the repo URL.

    The token comes from ``HF_TOKEN`` or a stored ``hf auth login``; it is never written or
    shown. Failures raise a one-line :class:`ExportError`.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError
    from huggingface_hub.utils import validate_repo_id

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ExportError(f"{folder} holds no saved model (no config.json); export it first")
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ExportError(
            f"invalid hub repo id {repo_id!r}; use the form owner/name (letters, digits, -_.)"
        ) from None
    if "/" not in repo_id:
        raise ExportError(f"hub repo id {repo_id!r} needs an owner; use the form owner/name")
    # The base error of whichever HTTP client this huggingface_hub uses (network failures).
    client_errors = [c for c in HfHubHTTPError.__mro__ if c.__name__ == "HTTPError"]
    caught: tuple[type[BaseException], ...] = (HfHubHTTPError, OSError, *client_errors)
    token = os.environ.get("HF_TOKEN") or None
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            commit_message=f"Upload abliterated model (Blasphemer {__version__})",
            ignore_patterns=[OUTPUT_MARKER],
        )
    except caught as error:
        message = (str(error).strip().splitlines() or [type(error).__name__])[0]
        if token:
            message = message.replace(token, "***")
        raise ExportError(
            f"upload to {repo_id} failed: {message[:200]}; check HF_TOKEN (write access) and "
            "the network"
        ) from None
    return str(url)
