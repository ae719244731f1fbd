"""Greedy, batched generation that stops each prompt as soon as its refusal verdict is decided.

This is the hot path of a study: every trial generates an answer to every harmful prompt. The
loop is our own (not ``model.generate``) so that it can judge each answer while it is written:

* prompts are tokenised once, sorted by length (longest first) and left-padded per batch;
* the prompt is run once (prefill), then one token per forward call against a KV cache, and only
  the last position's logits are computed (``logits_to_keep=1``); with draft tokens (earlier
  answers to the same prompt, :mod:`blasphemer.evaluation.drafts`) a call feeds a row's next
  token and its drafts and keeps the drafts the model's arg-max confirms (see
  :mod:`blasphemer.evaluation.decoding`), which changes the number of calls, not the tokens;
* after every token each unfinished answer is decoded and judged; an answer is *decided* when a
  refusal marker appears (refused), when the model ends it (judged on what it wrote), or, with
  ``decided_after=N``, once ``N`` tokens have been written since it first showed content with no
  marker (compliant);
* decided rows leave the batch: input ids, attention mask, positions and every layer of the KV
  cache are re-indexed along the batch dimension, so later steps only pay for open answers;
* the batch ends when every row is decided or ``max_new_tokens`` is reached; while prompts of
  later batches are waiting, rows that leave are refilled from the next batch (prefilled as
  that batch, then merged into the running one's KV cache with masked columns that align
  them), so a pass does not wait with a few long answers where it could run a whole batch;
* with ``should_stop``, the refusals and answers decided so far are offered after every token
  that decides an answer, so a trial that can no longer reach the front stops mid-batch.

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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from blasphemer.evaluation.decoding import DecodingBatch, ForwardSpec
from blasphemer.evaluation.drafts import DraftBook
from blasphemer.evaluation.frozen import LayerCache
from blasphemer.evaluation.markers import (
    RefusalMarkers,
    has_content,
    normalize,
    strip_response_prefix,
)
from blasphemer.evaluation.prefix import PrefixState, split_prefix
from blasphemer.evaluation.scheduling import Row, StopReason, decode_batches
from blasphemer.loading import input_device

__all__ = [
    "ModelLike",
    "StopReason",
    "Verdict",
    "decode_answers",
    "encode_texts",
    "eos_token_ids",
    "generate_verdicts",
    "greedy_tokens",
    "length_sorted_batches",
    "pad_token_id",
    "shared_prefix",
]


class ModelLike(Protocol):
    """What evaluation needs of a loaded model: :class:`blasphemer.loading.LoadedModel` fits."""

    @property
    def model(self) -> nn.Module: ...

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase: ...


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
            batch = DecodingBatch(
                model, spec, [suffixes[i] for i in indices], pad_id, n_tokens, prefix
            )
            columns = [batch.prefill()]
            for _ in range(n_tokens - 1):
                columns.append(batch.step(columns[-1]))
            for index, row in zip(indices, torch.stack(columns, dim=1).tolist(), strict=True):
                results[index] = row
    return results


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
    drafts: DraftBook | None = None,
    draft_tokens: int = 0,
    refill: bool = True,
    priority: Sequence[float] | None = None,
) -> list[Verdict]:
    """Greedy answers to token-id ``prompts``, each judged and stopped as early as allowed.

    ``decided_after=None`` is full mode (see the module docstring for both equivalences);
    ``stop_at_marker`` stops refused answers early in full mode too. ``response_prefix`` is
    skipped before judging (see :func:`~blasphemer.evaluation.markers.common_response_prefix`).
    ``on_batch`` is called with the number of prompts of each finished batch.
    ``should_stop(refused, judged)`` is asked whenever answers have been decided, with the
    refusals and decided prompts so far (a decided answer's verdict is final); when it answers
    True generation stops there, mid-batch too: the undecided prompts get
    :attr:`StopReason.SKIPPED` verdicts (``refused=False``), so the refusal count is a lower bound.
    ``share_prefix`` runs the prompts' shared leading tokens once (see :func:`shared_prefix`).
    ``layer_cache`` records every batch's prefill the first time and replays it below the
    unchanged layers after (:mod:`blasphemer.evaluation.frozen`); pass the same prompts and
    ``batch_size`` every time. With ``drafts`` (one entry per prompt) and ``draft_tokens`` > 0,
    each forward pass feeds a row's next token with up to ``draft_tokens`` drafts and keeps those
    the model's own arg-max confirms. ``refill`` lets a batch take the next batch's prompts into
    the rows its decided answers left (both: :mod:`blasphemer.evaluation.scheduling`; where the
    KV cache cannot be merged exactly the batches simply run one after the other); rows waiting
    for a place take it in the order of ``priority`` (one number per prompt, lowest first), so
    that a scorer can start the likeliest refusals and longest answers first (what that gains
    depends on the edit: bench/results/2026-12-05-refill.md). Returns one :class:`Verdict` per
    prompt, in order.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if decided_after is not None and decided_after < 1:
        raise ValueError(f"decided_after must be at least 1 (or None), got {decided_after}")
    if drafts is not None and len(drafts) != len(prompts):
        raise ValueError(f"drafts are for {len(drafts)} prompts, not {len(prompts)}")
    if priority is not None and len(priority) != len(prompts):
        raise ValueError(f"priority has {len(priority)} entries for {len(prompts)} prompts")
    spec = ForwardSpec.of(model)
    eos = eos_token_ids(model, tokenizer)
    pad_id = pad_token_id(tokenizer)
    judge_each_step = decided_after is not None or stop_at_marker
    rows: list[Row] = [Row(index) for index in range(len(prompts))]

    def judged(text: str) -> str:
        return normalize(strip_response_prefix(text, response_prefix))

    def absorb(active: list[Row], new: list[list[int]]) -> None:
        """Take each row's new tokens in order, judging after each, until it is decided."""
        for slot in range(max(len(tokens) for tokens in new)):
            written = []
            for row, tokens in zip(active, new, strict=True):
                if row.stopped_by is not None or slot >= len(tokens):
                    continue
                if tokens[slot] in eos:
                    row.stopped_by = StopReason.EOS
                else:
                    row.tokens.append(tokens[slot])
                    written.append(row)
            if judge_each_step:
                decide(written)
            for row in written:
                if row.stopped_by is None and len(row.tokens) >= max_new_tokens:
                    row.stopped_by = StopReason.LENGTH

    counted = [0, 0]  # refusals and prompts decided so far

    def halt(active: list[Row]) -> bool:
        """Count the rows of ``active`` decided since the last call; ask ``should_stop``."""
        assert should_stop is not None
        new = [row for row in active if row.stopped_by is not None and row.refused is None]
        if not new:
            return False
        # A marker stop is a refusal by construction; other endings are judged on the text.
        unread = [row for row in new if row.stopped_by is not StopReason.MARKER]
        texts = decode_answers(tokenizer, [row.tokens for row in unread])
        for row, text in zip(unread, texts, strict=True):
            row.refused = markers.refuses(judged(text))
        for row in new:
            if row.stopped_by is StopReason.MARKER:
                row.refused = True
        counted[0] += sum(bool(row.refused) for row in new)
        counted[1] += len(new)
        return should_stop(counted[0], counted[1])

    def decide(open_rows: list[Row]) -> None:
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
        pending = iter(batches)

        def open_next() -> tuple[DecodingBatch, list[Row]] | None:
            indices = next(pending, None)
            if indices is None:
                return None
            batch = DecodingBatch(
                model,
                spec,
                [suffixes[i] for i in indices],
                pad_id,
                max_new_tokens,
                prefix,
                layer_cache,
                # The layout too: a prefix that cannot be shared for longer answers changes it.
                (tuple(indices), 0 if prefix is None else prefix.length, len(suffixes[indices[0]])),
            )
            return batch, [rows[i] for i in indices]

        reported: set[int] = set()

        def absorb_and_report(active: list[Row], new: list[list[int]]) -> None:
            absorb(active, new)
            if on_batch is None:
                return
            for number, indices in enumerate(batches):
                if number not in reported and all(rows[i].stopped_by is not None for i in indices):
                    reported.add(number)
                    on_batch(len(indices))

        decode_batches(
            open_next,
            absorb_and_report,
            max_new_tokens,
            batch_size,
            drafts,
            draft_tokens,
            None if should_stop is None else halt,
            refill,
            priority,
        )

    for row in rows:
        if row.stopped_by is None:  # skipped, perhaps halfway: no verdict, no partial answer
            row.tokens = []
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
