"""A batch of left-padded prompts decoded greedily against one KV cache, one or several tokens
per forward pass.

:class:`DecodingBatch` runs the prompts once (prefill) and then either feeds one token per row
(:meth:`~DecodingBatch.step`) or a row's next token followed by draft tokens
(:meth:`~DecodingBatch.verify`, see :mod:`blasphemer.evaluation.drafts`), returning the arg-max
after every fed token. After a verification :meth:`~DecodingBatch.accept` keeps, per row, the
columns whose drafts were right: the KV entries of rejected drafts stay in the cache but their
attention-mask columns become 0, like left padding, and positions go on from the last accepted
token, so every later token attends to exactly the tokens a one-token-per-pass decode would
have fed (a hole in the mask is exact only for plain attention caches: see
:func:`blasphemer.evaluation.prefix.shareable`, which :meth:`~DecodingBatch.can_verify` asks).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer

from blasphemer.evaluation.frozen import LayerCache
from blasphemer.evaluation.prefix import PrefixState, shareable, with_prefix_columns
from blasphemer.loading import input_device


def top_tokens(logits: torch.Tensor) -> torch.Tensor:
    """The arg-max over the last dimension: the first index of the largest value, as
    ``argmax`` gives it (NaN counts as largest in both). ``max(...).indices`` is used because
    on a CPU ``argmax`` over bfloat16 logits is about 7x slower: with Qwen's 151,936-token
    vocabulary it took 29 ms of a ~0.4 s decoding step at 32 rows, ``max`` 4 ms (measured
    alone; a whole trial: bench/results/2026-12-05-argmax.md)."""
    return logits.max(dim=-1).indices


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


class DecodingBatch:
    """Left-padded prompts decoded greedily together, sharing one KV cache.

    Positions follow ``generate``: ``cumsum(mask) - 1`` over the prompt (0 on padding), then one
    more per fed token; the attention mask is left out while it is all ones. With a shared
    ``prefix`` (see :mod:`blasphemer.evaluation.prefix`) ``prompts`` are what follows it: the
    cache starts with the prefix, the mask has its columns first, positions start after it.
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
        # The mask has room for every new token of a one-token decode; verification grows it.
        ids, mask, positions = left_pad(prompts, pad_id, extra_columns=max_new_tokens)
        padded = bool((mask[:, :1] == 0).any())
        self.prompt_ids = ids.to(self.device)
        self.positions = positions.to(self.device)
        self.length = ids.shape[1]  # columns in the KV cache after the next forward's input
        self.cache: Any = None
        if prefix is not None:
            self.positions = self.positions + prefix.length
            self.length += prefix.length
            self.cache = prefix.for_batch(len(prompts))
            mask = with_prefix_columns(mask, prefix)
        self.mask: torch.Tensor | None = mask.to(self.device) if padded else None
        self._fed = 0  # tokens fed per row by the last verify, until accept

    @property
    def rows(self) -> int:
        return int(self.positions.shape[0])

    def _mask_columns(self) -> torch.Tensor | None:
        """The mask's first ``length`` columns, grown with ones when verification outran it."""
        if self.mask is None:
            return None
        missing = self.length - self.mask.shape[1]
        if missing > 0:
            ones = torch.ones(
                (self.rows, max(missing, 64)), dtype=self.mask.dtype, device=self.device
            )
            self.mask = torch.cat([self.mask, ones], dim=1)
        return self.mask[:, : self.length]

    def _forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, keep: int = 1, prefill: bool = False
    ) -> torch.Tensor:
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "use_cache": True,
            self.spec.cache_argument: self.cache,
        }
        mask = self._mask_columns()
        if mask is not None:
            kwargs["attention_mask"] = mask
        if self.spec.position_ids:
            kwargs["position_ids"] = positions
        if self.spec.logits_to_keep:
            kwargs["logits_to_keep"] = keep
        if prefill and self.layer_cache is not None:
            output = self.layer_cache.run(self.key, lambda: self.model(**kwargs))
        else:
            output = self.model(**kwargs)
        cache = output.get("cache")
        self.cache = cache if cache is not None else output.get("past_key_values")
        # Logits may come out on another device than the embeddings (device_map="auto").
        return top_tokens(output.logits[:, -keep:, :]).to(self.device)

    def prefill(self) -> torch.Tensor:
        """Run the prompts; return the first new token of every row (on the model's device)."""
        next_tokens = self._forward(self.prompt_ids, self.positions, prefill=True)[:, -1]
        self.positions = self.positions[:, -1:]
        return next_tokens

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row; return the next one."""
        self.length += 1
        self.positions = self.positions + 1
        return self._forward(tokens.unsqueeze(-1), self.positions)[:, -1]

    def can_verify(self, new_tokens: int, draft_tokens: int) -> bool:
        """Whether holes in the mask are exact for this batch's cache, over the columns that
        ``new_tokens`` more tokens with up to ``draft_tokens`` drafts each could take."""
        return self.cache is not None and shareable(
            self.cache, self.length + new_tokens * (draft_tokens + 1)
        )

    def verify(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens`` (rows × k: each row's next token, then its drafts); return the
        arg-max after each. Call :meth:`accept` before the next forward pass."""
        fed = tokens.shape[1]
        offsets = torch.arange(1, fed + 1, device=self.device).unsqueeze(0)
        self.length += fed
        self._fed = fed
        return self._forward(tokens, self.positions + offsets, keep=fed)

    def accept(self, accepted: torch.Tensor) -> None:
        """Keep, per row, the next token and its first ``accepted`` drafts of the last
        :meth:`verify`; the other fed columns are masked out."""
        fed, self._fed = self._fed, 0
        accepted = accepted.to(self.device)
        kept = torch.arange(fed, device=self.device).unsqueeze(0) <= accepted.unsqueeze(1)
        if not bool(kept.all()):
            if self.mask is None:
                self.mask = torch.ones(
                    (self.rows, self.length), dtype=torch.long, device=self.device
                )
            mask = self._mask_columns()
            assert mask is not None
            mask[:, self.length - fed :] = kept.to(mask.dtype)
        self.positions = self.positions + 1 + accepted.unsqueeze(1)

    def can_merge(self) -> bool:
        """Whether rows of another batch can join this one (:meth:`merge`): explicit positions
        and a plain attention cache on every layer, with no window, so that padding columns
        inserted before a row's tokens change nothing it attends to."""
        layers = getattr(self.cache, "layers", None) or []
        return (
            self.spec.position_ids
            and self._fed == 0
            and bool(layers)
            and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)
        )

    def merge(self, other: DecodingBatch, rows: torch.Tensor) -> None:
        """Append ``rows`` of ``other`` (indices into it) to this batch, after both fed their
        last tokens (each row's newest arg-max not fed yet, as after :meth:`prefill`).

        The KV caches are aligned on the right: the one with fewer columns gets masked-out
        columns on the left, so every row keeps its own positions and attends to exactly its
        own tokens (both batches must :meth:`can_merge`). ``other`` is left as it was; call its
        :meth:`keep` for the rows that stay there.
        """
        if not (self.can_merge() and other.can_merge()):
            raise ValueError("these batches cannot be merged (see DecodingBatch.can_merge)")
        layers = list(zip(self.cache.layers, other.cache.layers, strict=True))
        if any(
            layer.keys.shape[-2] != self.length or source.keys.shape[-2] != other.length
            for layer, source in layers
        ):
            raise ValueError("a batch's KV cache does not hold the columns it fed")
        rows = rows.to(other.device)
        mine, theirs = self._mask_columns(), other._mask_columns()
        if mine is None:
            mine = torch.ones((self.rows, self.length), dtype=torch.long, device=self.device)
        if theirs is None:
            theirs = torch.ones((other.rows, other.length), dtype=torch.long, device=other.device)
        self.mask = _right_aligned(mine, theirs.index_select(0, rows), dim=-1)
        for layer, source in layers:
            picked = rows.to(source.keys.device)  # layers may sit on several devices
            layer.keys = _right_aligned(layer.keys, source.keys.index_select(0, picked), dim=-2)
            layer.values = _right_aligned(
                layer.values, source.values.index_select(0, picked), dim=-2
            )
        self.positions = torch.cat([self.positions, other.positions.index_select(0, rows)])
        self.length = max(self.length, other.length)

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (indices into the current batch), in the KV cache too."""
        rows = rows.to(self.device)
        self.positions = self.positions.index_select(0, rows)
        if self.mask is not None:
            self.mask = self.mask.index_select(0, rows)
        # reorder_cache is implemented by every cache layer type (attention, sliding window,
        # linear attention, quantised), unlike batch_select_indices; index_select keeps a subset.
        self.cache.reorder_cache(rows)


def _right_aligned(first: torch.Tensor, second: torch.Tensor, dim: int) -> torch.Tensor:
    """``first`` then ``second`` along the batch dimension, the one with fewer columns along
    ``dim`` given zero columns on the left (on ``first``'s device)."""
    width = max(first.shape[dim], second.shape[dim])
    parts = []
    for part in (first, second.to(first.device)):
        shape = list(part.shape)
        shape[dim] = width - part.shape[dim]
        parts.append(torch.cat([part.new_zeros(shape), part], dim=dim))
    return torch.cat(parts)
