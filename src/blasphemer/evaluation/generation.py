"""Greedy, batched generation that stops each prompt as soon as its refusal verdict is decided.

This is the hot path of a study: every trial generates an answer to every harmful prompt. The
loop is our own (not ``model.generate``) so that it can judge each answer while it is written:

* prompts are tokenised once, sorted by length (longest first) and left-padded per batch;
* the prompt is run once (prefill), then one token per forward call against a KV cache, and only
  the last position's logits are computed (``logits_to_keep=1``);
* after every token each unfinished answer is decoded and judged; an answer is *decided* when a
  refusal marker appears (refused), when the model ends it (judged on what it wrote), or, with
  ``decided_after=N``, once ``N`` tokens have been written since it first showed content with no
  marker (compliant);
* decided rows leave the batch: input ids, attention mask, positions and every layer of the KV
  cache are re-indexed along the batch dimension, so later steps only pay for open answers;
* the batch ends when every row is decided or ``max_new_tokens`` is reached.

Equivalences (all up to floating-point near-ties of the arg-max, which differ in batch shape)
--------------------------------------------------------------------------------------------
*Full mode* (``decided_after=None``): every answer runs to end-of-sequence or
``max_new_tokens``; the tokens, texts and verdicts are those of
``model.generate(do_sample=False, max_new_tokens=N)`` followed by :func:`is_refusal`, for models
whose generation config adds no logits processors (repetition penalty, suppressed tokens, ...).
``stop_at_marker=True`` stops a refused answer at its marker: same verdicts, shorter texts.

*Early mode* (``decided_after=N``): let ``s`` be the first token after which the answer shows
content (a letter or digit once the response prefix is skipped) and ``m = min(T, s + N - 1)``
with ``T`` the full-mode length (every token from ``s`` on counts, special tokens too). The
verdict is exactly ``is_refusal`` of the first ``m`` tokens of the full-mode answer, and the
answer returned is those ``m`` tokens, or fewer when a marker appears sooner. Verdicts are
monotone (a marker, once written, stays; decoding is done without space clean-up so that a
partial answer's text is a prefix of the whole's), so: an early *refusal* is always a
full-length refusal, and an early *compliance* differs from the full-length verdict only when
the full answer's first marker comes after token ``m`` (the rule "a marker within the window").
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from blasphemer.evaluation.frozen import LayerCache
from blasphemer.evaluation.markers import (
    RefusalMarkers,
    has_content,
    normalize,
    strip_response_prefix,
)
from blasphemer.evaluation.prefix import PrefixState, split_prefix, with_prefix_columns
from blasphemer.loading import input_device


class ModelLike(Protocol):
    """What evaluation needs of a loaded model: :class:`blasphemer.loading.LoadedModel` fits."""

    @property
    def model(self) -> nn.Module: ...

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase: ...


class StopReason(StrEnum):
    """Why an answer stopped."""

    MARKER = "marker"  # a refusal marker appeared
    EOS = "eos"  # the model ended its answer
    DECIDED = "decided"  # ``decided_after`` tokens with content and no marker: compliant
    LENGTH = "length"  # ``max_new_tokens`` reached
    SKIPPED = "skipped"  # never generated: ``should_stop`` ended the evaluation first


@dataclass(frozen=True)
class Verdict:
    """One judged answer. ``tokens`` excludes the end-of-sequence token; ``text`` is decoded
    without special tokens and still includes any response prefix."""

    tokens: tuple[int, ...]
    text: str
    refused: bool
    stopped_by: StopReason


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of already chat-rendered texts (no special tokens added: the template has them)."""
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [list(ids) for ids in encoded]


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id used for left padding: masked out, so any id works; the pad token if there is one."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(candidate, int):
            return candidate
    return 0


def eos_token_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Ids that end an answer: the generation config's (as in ``generate``) and the tokenizer's."""
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    for value in (getattr(config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)


def decode_answers(tokenizer: PreTrainedTokenizerBase, answers: Sequence[list[int]]) -> list[str]:
    """Answers as text, without special tokens and without clean-up of spaces (which could make
    a partial answer's text differ from the start of the whole answer's text)."""
    # Empty rows are decoded here: tokenizer versions disagree on batch_decode([]) and [[]].
    filled = [position for position, answer in enumerate(answers) if answer]
    decoded = (
        tokenizer.batch_decode(
            [answers[position] for position in filled],
            skip_special_tokens=True,
            clean_up_tokenization_spaces=False,
        )
        if filled
        else []
    )
    texts = [""] * len(answers)
    for position, text in zip(filled, decoded, strict=True):
        texts[position] = text
    return texts


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices in batches of similar length, longest first (so memory errors come early)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda index: (-lengths[index], index))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, extra_columns: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ``(input_ids, attention_mask, position_ids)`` on the CPU.

    Positions are ``cumsum(mask) - 1`` (0 on padding), as ``generate`` computes them. The mask has
    ``extra_columns`` more columns of ones, for tokens still to come.
    """
    if not prompts or min(len(prompt) for prompt in prompts) == 0:
        raise ValueError("cannot run an empty prompt")
    width = max(len(prompt) for prompt in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width + extra_columns), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    positions = (mask[:, :width].cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


@dataclass(frozen=True)
class ForwardSpec:
    """What the model's forward accepts, read once from its signature (as ``generate`` does)."""

    cache_argument: str
    position_ids: bool
    logits_to_keep: bool

    @classmethod
    def of(cls, model: nn.Module) -> ForwardSpec:
        parameters = inspect.signature(model.forward).parameters
        # transformers 5 renamed ``past_key_values`` to ``cache``; remote code may use either.
        cache_argument = "cache" if "cache" in parameters else "past_key_values"
        return cls(cache_argument, "position_ids" in parameters, "logits_to_keep" in parameters)


class _Batch:
    """Left-padded prompts decoded greedily together, sharing one KV cache.

    Positions follow ``generate``: ``cumsum(mask) - 1`` over the prompt (0 on padding), then one
    more per new token; the attention mask is dropped altogether when nothing is padded. With a
    shared ``prefix`` (see :mod:`blasphemer.evaluation.prefix`) ``prompts`` are what follows it:
    the cache starts with the prefix, the mask has its columns first, positions start after it.
    With a ``layer_cache`` the prefill is recorded or replayed under ``key`` (see
    :mod:`blasphemer.evaluation.frozen`).
    """

    def __init__(
        self,
        model: nn.Module,
        spec: ForwardSpec,
        prompts: Sequence[Sequence[int]],
        pad_id: int,
        max_new_tokens: int,
        prefix: PrefixState | None = None,
        layer_cache: LayerCache | None = None,
        key: Any = None,
    ) -> None:
        self.model = model
        self.layer_cache = layer_cache
        self.key = key
        self.spec = spec
        self.device = input_device(model)
        # The mask has room for every new token: a step uses a view of its first `length` columns.
        ids, mask, positions = left_pad(prompts, pad_id, extra_columns=max_new_tokens)
        padded = bool((mask[:, :1] == 0).any())
        self.prompt_ids = ids.to(self.device)
        self.positions = positions.to(self.device)
        self.length = ids.shape[1]
        self.cache: Any = None
        if prefix is not None:
            self.positions = self.positions + prefix.length
            self.length += prefix.length
            self.cache = prefix.for_batch(len(prompts))
            mask = with_prefix_columns(mask, prefix)
        self.mask = mask.to(self.device) if padded else None

    def _forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, prefill: bool = False
    ) -> torch.Tensor:
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "use_cache": True,
            self.spec.cache_argument: self.cache,
        }
        if self.mask is not None:
            kwargs["attention_mask"] = self.mask[:, : self.length]
        if self.spec.position_ids:
            kwargs["position_ids"] = positions
        if self.spec.logits_to_keep:
            kwargs["logits_to_keep"] = 1
        if prefill and self.layer_cache is not None:
            output = self.layer_cache.run(self.key, lambda: self.model(**kwargs))
        else:
            output = self.model(**kwargs)
        cache = output.get("cache")
        self.cache = cache if cache is not None else output.get("past_key_values")
        # Logits may come out on another device than the embeddings (device_map="auto").
        return output.logits[:, -1, :].argmax(dim=-1).to(self.device)

    def prefill(self) -> torch.Tensor:
        """Run the prompts; return the first new token of every row (on the model's device)."""
        next_tokens = self._forward(self.prompt_ids, self.positions, prefill=True)
        self.positions = self.positions[:, -1:]
        return next_tokens

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row; return the next one."""
        self.length += 1
        self.positions = self.positions + 1
        return self._forward(tokens.unsqueeze(-1), self.positions)

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (indices into the current batch), in the KV cache too."""
        rows = rows.to(self.device)
        self.positions = self.positions.index_select(0, rows)
        if self.mask is not None:
            self.mask = self.mask.index_select(0, rows)
        # reorder_cache is implemented by every cache layer type (attention, sliding window,
        # linear attention, quantised), unlike batch_select_indices; index_select keeps a subset.
        self.cache.reorder_cache(rows)


def shared_prefix(
    model: nn.Module,
    spec: ForwardSpec,
    prompts: Sequence[Sequence[int]],
    enabled: bool,
    new_tokens: int,
) -> tuple[list[list[int]], PrefixState | None]:
    """What follows the prompts' shared prefix in each, and that prefix run under the model's
    current weights (None when there is none worth running once, when the model's cache cannot
    be shared exactly, or not ``enabled``: then the suffixes are the whole prompts)."""
    shared = split_prefix(prompts, enabled=enabled)
    if not shared.prefix:
        return shared.suffixes, None
    # A batch holds the prefix, the padded rest (no wider than the longest prompt's) and answers.
    span = max(len(prompt) for prompt in prompts) + new_tokens
    device = input_device(model)
    state = PrefixState.compute(model, shared.prefix, spec.cache_argument, device, span)
    if state is None:
        return [list(prompt) for prompt in prompts], None
    return shared.suffixes, state


def greedy_tokens(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    n_tokens: int,
    *,
    batch_size: int,
    pad_id: int = 0,
    share_prefix: bool = True,
) -> list[list[int]]:
    """The first ``n_tokens`` greedy tokens after each prompt, through end-of-sequence tokens.

    ``share_prefix`` runs the prompts' shared leading tokens once (see :func:`shared_prefix`).
    """
    spec = ForwardSpec.of(model)
    results: list[list[int]] = [[] for _ in prompts]
    if n_tokens < 1:
        return results
    with torch.inference_mode():
        suffixes, prefix = shared_prefix(model, spec, prompts, share_prefix, n_tokens)
        for indices in length_sorted_batches([len(p) for p in suffixes], batch_size):
            batch = _Batch(model, spec, [suffixes[i] for i in indices], pad_id, n_tokens, prefix)
            columns = [batch.prefill()]
            for _ in range(n_tokens - 1):
                columns.append(batch.step(columns[-1]))
            for index, row in zip(indices, torch.stack(columns, dim=1).tolist(), strict=True):
                results[index] = row
    return results


@dataclass
class _Row:
    index: int
    tokens: list[int] = field(default_factory=list)
    clean: int = 0  # tokens written since the answer first showed content
    stopped_by: StopReason | None = None


def generate_verdicts(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    markers: RefusalMarkers,
    *,
    max_new_tokens: int,
    decided_after: int | None,
    batch_size: int,
    response_prefix: str = "",
    stop_at_marker: bool = False,
    on_batch: Callable[[int], None] | None = None,
    should_stop: Callable[[int, int], bool] | None = None,
    share_prefix: bool = True,
    layer_cache: LayerCache | None = None,
) -> list[Verdict]:
    """Greedy answers to token-id ``prompts``, each judged and stopped as early as allowed.

    ``decided_after=None`` is full mode (see the module docstring for both equivalences);
    ``stop_at_marker`` stops refused answers early in full mode too. ``response_prefix`` is
    skipped before judging (see :func:`~blasphemer.evaluation.markers.common_response_prefix`).
    ``on_batch`` is called with the number of prompts of each finished batch.
    ``should_stop(refused, judged)`` is asked after each batch with the refusals and judged
    prompts so far; when it answers True the remaining prompts are not generated and get
    :attr:`StopReason.SKIPPED` verdicts (``refused=False``), so the refusal count is a lower bound.
    ``share_prefix`` runs the prompts' shared leading tokens once (see :func:`shared_prefix`).
    ``layer_cache`` records every batch's prefill the first time and replays it below the
    unchanged layers after (:mod:`blasphemer.evaluation.frozen`); pass the same prompts and
    ``batch_size`` every time. Returns one :class:`Verdict` per prompt, in order.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if decided_after is not None and decided_after < 1:
        raise ValueError(f"decided_after must be at least 1 (or None), got {decided_after}")
    spec = ForwardSpec.of(model)
    eos = eos_token_ids(model, tokenizer)
    pad_id = pad_token_id(tokenizer)
    judge_each_step = decided_after is not None or stop_at_marker
    rows: list[_Row] = [_Row(index) for index in range(len(prompts))]

    def judged(text: str) -> str:
        return normalize(strip_response_prefix(text, response_prefix))

    def decide(open_rows: list[_Row]) -> None:
        texts = decode_answers(tokenizer, [row.tokens for row in open_rows])
        for row, text in zip(open_rows, texts, strict=True):
            answer = judged(text)
            if markers.find(answer) is not None:
                row.stopped_by = StopReason.MARKER
            elif decided_after is not None and (row.clean or has_content(answer)):
                row.clean += 1
                if row.clean >= decided_after:
                    row.stopped_by = StopReason.DECIDED

    with torch.inference_mode():
        suffixes, prefix = shared_prefix(model, spec, prompts, share_prefix, max_new_tokens)
        batches = length_sorted_batches([len(p) for p in suffixes], batch_size)
        if layer_cache is not None:
            layer_cache.plan(sum(len(b) * max(len(suffixes[i]) for i in b) for b in batches))
        for indices in batches:
            batch_prompts = [suffixes[i] for i in indices]
            batch = _Batch(
                model,
                spec,
                batch_prompts,
                pad_id,
                max_new_tokens,
                prefix,
                layer_cache,
                # The layout too: a prefix that cannot be shared for longer answers changes it.
                (tuple(indices), 0 if prefix is None else prefix.length, len(suffixes[indices[0]])),
            )
            active = [rows[i] for i in indices]
            next_tokens = batch.prefill()
            for step in range(max_new_tokens):
                for row, token in zip(active, next_tokens.tolist(), strict=True):
                    if token in eos:
                        row.stopped_by = StopReason.EOS
                    else:
                        row.tokens.append(token)
                if judge_each_step:
                    decide([row for row in active if row.stopped_by is None])
                keep = [position for position, row in enumerate(active) if row.stopped_by is None]
                if not keep or step == max_new_tokens - 1:
                    break
                if len(keep) < len(active):
                    kept = torch.tensor(keep, dtype=torch.long, device=next_tokens.device)
                    batch.keep(kept)
                    next_tokens = next_tokens.index_select(0, kept)
                    active = [active[position] for position in keep]
                next_tokens = batch.step(next_tokens)
            for row in active:
                if row.stopped_by is None:
                    row.stopped_by = StopReason.LENGTH
            del batch  # free the KV cache before the next batch allocates its own
            if on_batch is not None:
                on_batch(len(indices))
            if should_stop is not None:
                done = [row for row in rows if row.stopped_by is not None]
                texts = decode_answers(tokenizer, [row.tokens for row in done])
                refused = sum(markers.refuses(judged(text)) for text in texts)
                if should_stop(refused, len(done)):
                    break

    texts = decode_answers(tokenizer, [row.tokens for row in rows])
    return [
        Verdict(
            tokens=tuple(row.tokens),
            text=text,
            refused=row.stopped_by is not None and markers.refuses(judged(text)),
            stopped_by=row.stopped_by or StopReason.SKIPPED,
        )
        for row, text in zip(rows, texts, strict=True)
    ]
