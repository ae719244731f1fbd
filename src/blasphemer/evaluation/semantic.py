"""The semantic refusal judge: a small sentence encoder, fine-tuned with low-rank adapters to read a
(prompt, response) pair and say whether the response refuses the request.

The encoder is all-MiniLM-L6-v2 (a 22 M-parameter BERT, Apache-2.0), loaded with transformers from
a folder or the hub; it stays frozen. What the package ships (``data/judge/``) is small: rank-8
adapters on each layer's query, value and output projections, a linear head over the mean-pooled
pair encoding, the decision threshold, and a record of what it was trained on
(``bench/judge/train.py`` writes it; ``bench/judge/DATA_CARD.md`` describes the labelled answers).
Choosing this design was measured there: logistic regression on frozen sentence embeddings
reached about 0.85 accuracy on the test split, these adapters about 0.9.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from blasphemer.errors import ConfigError
from blasphemer.evaluation.judging import Answer, Judgement
from blasphemer.evaluation.markers import has_content, normalize

DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
FORMAT_VERSION = 2
MAX_TOKENS = 192  # prompt and response together, truncated longest first
_HEAD_NAME = "semantic-judge"
_ADAPTED = ("query", "value", "output")


def default_head() -> Path:
    """The trained judge shipped with the package (``.safetensors``; its ``.json`` beside it)."""
    return Path(str(resources.files("blasphemer") / "data" / "judge" / f"{_HEAD_NAME}.safetensors"))


class LowRank(torch.nn.Module):
    """``base(x) + B(A(x))``: a frozen linear layer plus a trainable rank-``r`` update."""

    def __init__(self, base: torch.nn.Linear, rank: int) -> None:
        super().__init__()
        self.base = base
        self.a = torch.nn.Parameter(torch.randn(rank, base.in_features) * 0.01)
        self.b = torch.nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.a.T) @ self.b.T


def _slots(model: Any) -> list[tuple[str, Any, str]]:
    """(name, parent module, attribute) of every adapted projection, in a fixed order."""
    slots = []
    for index, layer in enumerate(model.encoder.layer):
        attention = layer.attention.self
        slots.append((f"layer.{index}.query", attention, "query"))
        slots.append((f"layer.{index}.value", attention, "value"))
        slots.append((f"layer.{index}.output", layer.output, "dense"))
    return slots


class PairClassifier(torch.nn.Module):
    """The encoder with adapters and the head: ``forward`` returns one logit per pair."""

    def __init__(self, source: str | Path, rank: int) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        self.source = str(source)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.source)
            self.encoder = AutoModel.from_pretrained(self.source, dtype=torch.float32)
        except (OSError, ValueError) as error:
            raise ConfigError(
                f"cannot load the semantic judge's encoder {self.source!r} "
                f"({' '.join(str(error).split())[:160]}); pass --judge-encoder FOLDER with a "
                "copy of sentence-transformers/all-MiniLM-L6-v2"
            ) from None
        for parameter in self.encoder.parameters():
            parameter.requires_grad_(False)
        for _, parent, attribute in _slots(self.encoder):
            setattr(parent, attribute, LowRank(getattr(parent, attribute), rank))
        self.head = torch.nn.Linear(self.encoder.config.hidden_size, 1)

    def encode(self, answers: Sequence[Answer]) -> Any:
        return self.tokenizer(
            [a.prompt for a in answers],
            [a.response or " " for a in answers],
            truncation="longest_first",
            max_length=MAX_TOKENS,
            padding=True,
            return_tensors="pt",
        )

    def forward(self, batch: Any) -> torch.Tensor:
        hidden = self.encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return self.head(pooled).squeeze(-1)

    def trained_state(self) -> dict[str, torch.Tensor]:
        """The adapters and the head: everything training changed (the file the package ships)."""
        state = {"head.weight": self.head.weight.detach(), "head.bias": self.head.bias.detach()}
        for name, parent, attribute in _slots(self.encoder):
            adapter = getattr(parent, attribute)
            state[f"{name}.a"] = adapter.a.detach()
            state[f"{name}.b"] = adapter.b.detach()
        return {k: v.contiguous() for k, v in state.items()}

    def load_trained_state(self, state: dict[str, torch.Tensor], path: Path) -> None:
        wanted = set(self.trained_state())
        if set(state) != wanted:
            missing = sorted(wanted - set(state))[:3] or sorted(set(state) - wanted)[:3]
            raise ConfigError(
                f"semantic judge file {path} does not fit the encoder (keys {missing}); "
                "reinstall blasphemer or pass --judge markers"
            )
        with torch.no_grad():
            self.head.weight.copy_(state["head.weight"])
            self.head.bias.copy_(state["head.bias"])
            for name, parent, attribute in _slots(self.encoder):
                adapter = getattr(parent, attribute)
                adapter.a.copy_(state[f"{name}.a"])
                adapter.b.copy_(state[f"{name}.b"])


class SemanticJudge:
    """Refusal when the classifier's probability reaches the trained threshold; answers with no
    content are refusals whatever it says (the marker rule's own definition)."""

    name = "semantic"

    def __init__(
        self,
        encoder: str | Path = DEFAULT_ENCODER,
        head: Path | None = None,
        batch_size: int = 32,
    ) -> None:
        self.head_path = head or default_head()
        state, self.meta = load_head(self.head_path)
        self.model = PairClassifier(encoder, int(self.meta["rank"]))
        self.model.load_trained_state(state, self.head_path)
        self.model.eval()
        self.batch_size = batch_size

    @torch.inference_mode()
    def probabilities(self, answers: Sequence[Answer]) -> list[float]:
        out: list[float] = []
        for start in range(0, len(answers), self.batch_size):
            batch = self.model.encode(answers[start : start + self.batch_size])
            out += torch.sigmoid(self.model(batch)).tolist()
        return out

    def judge(self, answers: Sequence[Answer]) -> list[Judgement]:
        if not answers:
            return []
        threshold = float(self.meta["threshold"])
        verdicts = []
        for answer, p in zip(answers, self.probabilities(answers), strict=True):
            empty = not has_content(normalize(answer.response))
            verdicts.append(Judgement(empty or p >= threshold, 1.0 if empty else p))
        return verdicts


def load_head(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The judge's trained tensors and its metadata (the ``.json`` beside it); a missing,
    corrupt or mismatched file is a one-line ConfigError."""
    meta_path = path.with_suffix(".json")
    try:
        tensors = load_file(str(path))
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise ConfigError(
            f"semantic judge file {error.filename or path} not found; reinstall blasphemer or "
            "pass --judge markers"
        ) from None
    except (SafetensorError, OSError, ValueError) as error:
        raise ConfigError(
            f"semantic judge file {path} (or its .json) is corrupt "
            f"({' '.join(str(error).split())[:120]}); reinstall blasphemer or pass --judge markers"
        ) from None
    if not isinstance(meta, dict) or not {"threshold", "rank"} <= set(meta):
        raise ConfigError(
            f"semantic judge file {meta_path} lacks its threshold or rank; reinstall blasphemer "
            "or pass --judge markers"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise ConfigError(
            f"semantic judge file {path} has format {meta.get('format_version')}, this "
            f"blasphemer reads {FORMAT_VERSION}; retrain it with bench/judge/train.py or pass "
            "--judge markers"
        )
    return tensors, meta
