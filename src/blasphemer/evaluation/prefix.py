"""A prefix every prompt shares (the chat template's system turn) runs once per pass.

Chat-rendered prompts all start with the same tokens: the template's opening, its system prompt
and the user turn's header (24 of about 42 tokens for Qwen2.5's template and short requests).
Running that prefix once, with a batch of one, and starting every batch from a copy of its KV
cache spares the prefill those tokens in every prompt of every batch. The layout of a batch is
then ``[prefix][left padding][rest of the prompt]``: the attention mask has the padding hole
in the middle and positions continue after the prefix, so each row computes what it computes
without the shared cache (up to floating-point rounding, which differs in batch shape).

The cache depends on the weights: it is computed again for every pass (every trial), never
kept across edits. Only plain attention caches are shared: a recurrent layer (linear attention,
state-space) would run its state through the padding hole, and a sliding window shorter than a
batch's whole span would count that hole as distance, so with either the prompts run whole.

The split is exact: the prefix is the longest run of *token ids* that every prompt starts with,
so no tokenisation boundary moves; at least one token of each prompt stays after it.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

MIN_PREFIX = 4  # a shorter shared prefix does not pay for its own forward pass


@dataclass(frozen=True)
class SharedPrompts:
    """Prompts split into the token ids they all start with and what follows in each."""

    prefix: tuple[int, ...]
    suffixes: list[list[int]]


def split_prefix(prompts: Sequence[Sequence[int]], *, enabled: bool = True) -> SharedPrompts:
    """The longest shared leading token run of ``prompts`` (empty if under :data:`MIN_PREFIX`,
    for fewer than two prompts, or when not ``enabled``); every suffix keeps at least one token."""
    rows = [list(prompt) for prompt in prompts]
    if not enabled or len(rows) < 2:
        return SharedPrompts((), rows)
    shortest = min(len(row) for row in rows)
    first = rows[0]
    length = 0
    while length < shortest - 1 and all(row[length] == first[length] for row in rows):
        length += 1
    if length < MIN_PREFIX:
        return SharedPrompts((), rows)
    return SharedPrompts(tuple(first[:length]), [row[length:] for row in rows])


class PrefixState:
    """The KV cache of a shared prefix under the model's current weights."""

    def __init__(self, cache: Any, length: int) -> None:
        self._cache = cache
        self.length = length

    @classmethod
    def compute(
        cls,
        model: nn.Module,
        prefix: Sequence[int],
        cache_argument: str,
        device: torch.device,
        span: int,
    ) -> PrefixState | None:
        """Run ``prefix`` once (batch of one); None for an empty prefix or a cache that cannot
        be shared exactly over batches up to ``span`` columns (prefix, padding, prompt, answer)."""
        if not prefix:
            return None
        ids = torch.tensor([list(prefix)], dtype=torch.long, device=device)
        kwargs: dict[str, Any] = {"input_ids": ids, "use_cache": True, cache_argument: None}
        parameters = _forward_parameters(model)
        if "position_ids" in parameters:
            kwargs["position_ids"] = torch.arange(len(prefix), device=device).unsqueeze(0)
        if "logits_to_keep" in parameters:
            kwargs["logits_to_keep"] = 1
        output = model(**kwargs)
        cache = output.get("cache")
        cache = cache if cache is not None else output.get("past_key_values")
        return cls(cache, len(prefix)) if shareable(cache, span) else None

    def for_batch(self, rows: int) -> Any:
        """A fresh cache holding the prefix for ``rows`` rows (the batch extends it in place)."""
        cache = copy.deepcopy(self._cache)
        # Every cache layer type implements reorder_cache (moving the index to its device).
        cache.reorder_cache(torch.zeros(rows, dtype=torch.long))
        return cache


def shareable(cache: Any, span: int) -> bool:
    """Whether every layer of ``cache`` is a plain attention cache whose window (if any) covers
    ``span`` columns, so that a padding hole after the prefix changes nothing."""
    layers = getattr(cache, "layers", None)
    if not layers or not hasattr(cache, "reorder_cache"):
        return False
    for layer in layers:
        if type(layer) is DynamicSlidingWindowLayer:
            if layer.sliding_window <= span:
                return False
        elif type(layer) is not DynamicLayer:  # recurrent, indexed, quantised, static, ...
            return False
    return True


def with_prefix_columns(mask: torch.Tensor, state: PrefixState | None) -> torch.Tensor:
    """``mask`` with ones prepended for the prefix's columns (unchanged without a prefix)."""
    if state is None:
        return mask
    ones = torch.ones((mask.shape[0], state.length), dtype=mask.dtype, device=mask.device)
    return torch.cat([ones, mask], dim=1)


def _forward_parameters(model: nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters)
