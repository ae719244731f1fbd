"""Which rows a decoding pass runs, and when: batches opened one by one, refilled from the
next as their answers are decided, and draft tokens checked.

:func:`decode_batches` drives :class:`~blasphemer.evaluation.decoding.DecodingBatch` objects for
:func:`~blasphemer.evaluation.generation.generate_verdicts`, which judges the tokens (``absorb``)
and decides when a pass may stop (``halt``); a :class:`Row` is one prompt's answer so far.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import torch

from blasphemer.evaluation.decoding import DecodingBatch
from blasphemer.evaluation.drafts import DraftBook


class StopReason(StrEnum):
    """Why an answer stopped."""

    MARKER = "marker"  # a refusal marker appeared
    EOS = "eos"  # the model ended its answer
    DECIDED = "decided"  # ``decided_after`` tokens with content and no marker: compliant
    LENGTH = "length"  # ``max_new_tokens`` reached
    SKIPPED = "skipped"  # never generated: ``should_stop`` ended the evaluation first


@dataclass
class Row:
    """One prompt's answer while it is written: its tokens, and once decided, why it stopped
    and (when counted) its verdict."""

    index: int
    tokens: list[int] = field(default_factory=list)
    clean: int = 0  # tokens written since the answer first showed content
    stopped_by: StopReason | None = None
    refused: bool | None = None  # the verdict, once the row is decided and counted


def decode_batches(
    open_next: Callable[[], tuple[DecodingBatch, list[Row]] | None],
    absorb: Callable[[list[Row], list[list[int]]], None],
    max_new_tokens: int,
    batch_size: int,
    drafts: DraftBook | None,
    draft_tokens: int,
    halt: Callable[[list[Row]], bool] | None = None,
    refill: bool = True,
    priority: Sequence[float] | None = None,
) -> bool:
    """Decode the batches ``open_next`` opens (None once there are none left) until every row
    is decided (``absorb`` takes new tokens), or until ``halt`` (asked after each absorb) says
    to stop: then return True.

    Without ``refill`` each batch is decoded to its end before the next is opened. With it, a
    batch whose decided rows left room takes rows of the next batch in their place (prefilled
    as that batch, then merged: :meth:`DecodingBatch.merge`), so a pass runs as many rows as
    ``batch_size`` allows for as long as rows are waiting, instead of ending each batch with a
    few long answers. Every row still gets exactly its own prompt's tokens, so the answers are
    the same either way (up to arg-max near-ties between batch shapes). At most two batches'
    KV caches are held at once: the running one and the one its rows come from. Waiting rows
    join in the order of ``priority`` (per prompt, lowest first; ties keep the batch's order).

    With drafts, a pass feeds each open row's last token and the drafts proposed for it (padded
    to the longest proposal), and keeps the drafts up to the first one that differs from the
    model's arg-max before it, plus that arg-max: the tokens one-token passes would give, so the
    verdicts and answers are the same (up to arg-max near-ties between shapes). Drafting is off
    where masked-out columns would not be exact (see :meth:`DecodingBatch.can_verify`).
    """
    batch: DecodingBatch | None = None
    active: list[Row] = []
    waiting: DecodingBatch | None = None
    queued: list[Row] = []
    book: DraftBook | None = None
    new: list[list[int]] = []
    while True:
        if active:
            absorb(active, new)
            if halt is not None and halt(active):
                return True
            keep = [position for position, row in enumerate(active) if row.stopped_by is None]
            if len(keep) < len(active):
                active = [active[position] for position in keep]
                if keep:
                    assert batch is not None
                    batch.keep(torch.tensor(keep, dtype=torch.long))
                else:
                    batch = None
        while batch is None or (refill and len(active) < batch_size and batch.can_merge()):
            if waiting is None:
                opened = open_next()
                if opened is None:
                    break
                waiting, queued = opened
                absorb(queued, [[token] for token in waiting.prefill().tolist()])
                if halt is not None and halt(queued):
                    return True
                kept = [position for position, row in enumerate(queued) if row.stopped_by is None]
                if not kept:
                    waiting, queued = None, []
                    continue
                if priority is not None:
                    kept.sort(key=lambda position: priority[queued[position].index])
                if kept != list(range(len(queued))):
                    waiting.keep(torch.tensor(kept, dtype=torch.long))
                    queued = [queued[position] for position in kept]
            if batch is None:
                batch, active, waiting, queued = waiting, queued, None, []
                can_verify = batch.can_verify(max_new_tokens, draft_tokens)
                book = drafts if draft_tokens > 0 and can_verify else None
                continue
            if not waiting.can_merge():
                break
            room = batch_size - len(active)
            batch.merge(waiting, torch.arange(min(room, len(queued))))
            active, queued = active + queued[:room], queued[room:]
            if queued:
                waiting.keep(torch.arange(room, room + len(queued)))
            else:
                waiting = None
        if batch is None:
            return False
        # Every open row's newest token is the one it feeds next (not yet in the KV cache).
        last = [row.tokens[-1] for row in active]
        proposals: list[list[int]] = [[] for _ in active]
        if book is not None:
            proposals = [
                book.propose(
                    row.index, row.tokens, min(draft_tokens, max_new_tokens - len(row.tokens) - 1)
                )
                for row in active
            ]
        width = max(len(proposal) for proposal in proposals)
        if width == 0:
            tokens = torch.tensor(last, dtype=torch.long, device=batch.device)
            new = [[token] for token in batch.step(tokens).tolist()]
            continue
        fed = [
            [token, *proposal, *[token] * (width - len(proposal))]
            for token, proposal in zip(last, proposals, strict=True)
        ]
        predicted = batch.verify(torch.tensor(fed, dtype=torch.long, device=batch.device)).tolist()
        accepted = [
            _confirmed(proposal, row) for proposal, row in zip(proposals, predicted, strict=True)
        ]
        batch.accept(torch.tensor(accepted, dtype=torch.long))
        if book is not None:
            book.tally(sum(len(proposal) for proposal in proposals), sum(accepted))
        new = [row[: count + 1] for row, count in zip(predicted, accepted, strict=True)]


def _confirmed(proposal: Sequence[int], predicted: Sequence[int]) -> int:
    """How many drafts of ``proposal`` the arg-max ``predicted`` before each confirms in a row."""
    count = 0
    while count < len(proposal) and proposal[count] == predicted[count]:
        count += 1
    return count
