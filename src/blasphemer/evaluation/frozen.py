"""Layers below the first edited one compute the same in every trial: record them once, replay.

An edit hooks (or rewrites) writers from some layer ``L`` up; the embeddings and the layers below
``L`` compute exactly what they computed for the unedited model. A :class:`LayerCache` records,
once per batch of a fixed prompt set and with the model unedited, what the prefill of that batch
leaves behind under every layer: the hidden state the layer hands to the next, and the keys and
values it adds to the KV cache. A later prefill of the same batch runs layers ``L`` and up only:
for that one forward call the layers below are swapped for stand-ins that put the recorded keys
and values into the cache and hand layer ``L`` the recorded hidden state. Decoding steps after
the prefill run every layer (their tokens differ by trial). Layer ``L`` gets the same input and
the same cache as in a full pass, so the logits are the full pass's, bit for bit.

Which layers are unchanged is read from the model, not taken on trust: a layer counts as
unchanged while its parameters are the same tensors at the same version (an in-place write bumps
it) and its modules carry the same hooks as when it was recorded; the input embeddings likewise.
An edit this cannot see (a global module hook) must not be scored with a cache.

Memory: keys and values of every layer, and the hidden state after every ``stride``-th layer,
for every prompt of the set; ``stride`` is the smallest that fits ``budget_bytes`` (an edit
from layer ``L`` then replays ``stride · ⌊L / stride⌋`` layers). The cache stays off when no
stride fits, when the model's layers do not take a plain attention cache, or when a layer
returns more than its hidden state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn
from transformers.cache_utils import Cache

from blasphemer.evaluation.prefix import shareable

T = TypeVar("T")
Fingerprint = tuple[tuple[int, int], ...]

DEFAULT_BUDGET_BYTES = 1 << 30  # 1 GiB


@dataclass
class _Entry:
    keys: list[torch.Tensor]  # per layer [B, kv_heads, T, head_dim]: this call's columns
    values: list[torch.Tensor]
    hidden: dict[int, torch.Tensor]  # layer index → its output [B, T, hidden]


class LayerCache:
    """Recorded prefills of one prompt set's batches, replayed below the first edited layer.

    ``layers`` is the model's decoder-layer list (a ``ModuleList`` inside ``model``) and
    ``embeddings`` its input embeddings. Build it while the model is unedited: what it sees then
    is the original, and a batch is recorded only while the model is still exactly that (so a
    first pass on an edited model is simply not recorded). Call :meth:`plan` with the number of
    token columns the set's prefills will hold in all (rows × width, summed over batches) before
    the first record.
    """

    def __init__(
        self,
        layers: nn.ModuleList,
        embeddings: nn.Module,
        *,
        budget_bytes: int = DEFAULT_BUDGET_BYTES,
    ) -> None:
        self.layers = layers
        self.embeddings = embeddings
        self.budget_bytes = budget_bytes
        self.enabled = budget_bytes > 0 and len(layers) > 0
        self.stride = 1
        self.planned_tokens = 0
        self.bytes = 0
        self.why_off = "" if self.enabled else "no memory budget"
        self._entries: dict[Any, _Entry] = {}
        self._baseline = self._fingerprints()  # the unedited model
        self._stride_chosen = False
        self.replayed_layers: list[int] = []  # per replayed call, how many layers (for tests)

    # --- what is unchanged --------------------------------------------------------------------

    def _fingerprints(self) -> list[Fingerprint]:
        """Per module group (embeddings, then every layer): parameter identity and version,
        and the hooks on its modules."""
        return [_fingerprint(self.embeddings)] + [_fingerprint(layer) for layer in self.layers]

    def unchanged_layers(self) -> int:
        """How many leading layers compute what they computed when the cache was built (0 when
        the embeddings changed)."""
        for position, (now, then) in enumerate(
            zip(self._fingerprints(), self._baseline, strict=True)
        ):
            if now != then:
                return max(position - 1, 0)
        return len(self.layers)

    # --- recording and replay ------------------------------------------------------------------

    def plan(self, tokens: int) -> None:
        """The set's prefills hold ``tokens`` token columns in all (rows × width per batch)."""
        self.planned_tokens = tokens

    def run(self, key: Any, call: Callable[[], T]) -> T:
        """``call()`` (one prefill forward of the batch ``key``): recorded when ``key`` is new
        and the model is as it was when the cache was built, replayed below the unchanged
        layers when ``key`` was recorded, run plainly otherwise."""
        if not self.enabled:
            return call()
        entry = self._entries.get(key)
        if entry is None:
            return self._record(key, call)
        replayed = (self.unchanged_layers() // self.stride) * self.stride
        if replayed == 0:
            return call()
        self.replayed_layers.append(replayed)
        with self._stand_ins(entry, replayed):
            return call()

    def _record(self, key: Any, call: Callable[[], T]) -> T:
        if self.unchanged_layers() < len(self.layers):
            return call()  # the model is edited now: a record would not be the original's
        hidden: dict[int, torch.Tensor] = {}
        takes_cache: list[bool] = []
        returns: list[bool] = []
        handles = []
        for index, layer in enumerate(self.layers):
            handles.append(
                layer.register_forward_pre_hook(_sees_cache(takes_cache), with_kwargs=True)
            )
            handles.append(layer.register_forward_hook(_capture(index, hidden, returns)))
        try:
            output = call()
        finally:
            for handle in handles:
                handle.remove()
        cache = _output_cache(output)
        width = next(iter(hidden.values())).shape[1] if hidden else 0
        reason = self._unusable(cache, takes_cache, returns, width)
        if reason:
            self._switch_off(reason)
            return output
        if not self._stride_chosen:
            self._stride_chosen = True
            self._choose_stride(hidden, cache, width)
            if not self.enabled:
                return output
        keys = [layer.keys[:, :, -width:, :].clone() for layer in cache.layers]
        values = [layer.values[:, :, -width:, :].clone() for layer in cache.layers]
        kept = {
            index: tensor.clone()
            for index, tensor in hidden.items()
            if (index + 1) % self.stride == 0
        }
        entry = _Entry(keys, values, kept)
        self.bytes += _entry_bytes(entry)
        if self.bytes > self.budget_bytes:
            self._switch_off(f"the records outgrew {self.budget_bytes} bytes")
            return output
        self._entries[key] = entry
        return output

    def _unusable(
        self, cache: Any, takes_cache: list[bool], returns: list[bool], width: int
    ) -> str:
        if len(returns) != len(self.layers) or not all(takes_cache):
            return "a layer ran without a KV cache"
        if not all(returns):
            return "a layer returns more than its hidden state"
        # A sliding window must hold every column recorded, or the record would be cut.
        if cache is None or not shareable(cache, int(cache.get_seq_length())):
            return "the KV cache is not a plain attention cache"
        if len(cache.layers) != len(self.layers):
            return "the KV cache has another number of layers than the model"
        return ""

    def _choose_stride(self, hidden: dict[int, torch.Tensor], cache: Any, width: int) -> None:
        """The smallest stride whose records for :attr:`planned_tokens` fit the budget."""
        columns = max(next(iter(hidden.values())).shape[0] * width, 1)
        kv = sum(
            layer.keys.element_size() * layer.keys[0, :, 0, :].numel() * 2 for layer in cache.layers
        )
        state = next(iter(hidden.values()))
        per_layer = state.element_size() * state.shape[-1]
        tokens = max(self.planned_tokens, columns)
        room = self.budget_bytes / tokens - kv
        if room < per_layer:
            self._switch_off("keys and values alone would not fit the memory budget")
            return
        self.stride = max(1, math.ceil(len(self.layers) * per_layer / room))
        if self.stride > len(self.layers):
            self._switch_off("not one layer's hidden states would fit the memory budget")

    def _switch_off(self, reason: str) -> None:
        self.enabled = False
        self.why_off = reason
        self._entries.clear()
        self.bytes = 0

    @contextmanager
    def _stand_ins(self, entry: _Entry, replayed: int) -> Iterator[None]:
        originals = [self.layers[index] for index in range(replayed)]
        try:
            for index in range(replayed):
                last = index == replayed - 1
                self.layers[index] = _StandIn(
                    originals[index],
                    index,
                    entry.keys[index],
                    entry.values[index],
                    entry.hidden[index] if last else None,
                )
            yield
        finally:
            for index, original in enumerate(originals):
                self.layers[index] = original


class _StandIn(nn.Module):
    """In place of an unchanged layer for one prefill: writes its recorded keys and values and
    passes on its recorded output (the last one) or its input (any other: unused)."""

    def __init__(
        self,
        original: nn.Module,
        index: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        hidden: torch.Tensor | None,
    ) -> None:
        super().__init__()
        object.__setattr__(self, "original", original)  # not a submodule: no parameters here
        self.index = index
        self.recorded_keys = keys
        self.recorded_values = values
        self.hidden = hidden

    def __getattr__(self, name: str) -> Any:
        # A model's layer loop may read a layer's attributes (``attention_type`` ...).
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["original"], name)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        cache = _find_cache(args, kwargs)
        if cache is None:
            raise RuntimeError("a replayed layer got no KV cache to fill")
        cache.update(self.recorded_keys, self.recorded_values, self.index)
        return hidden_states if self.hidden is None else self.hidden.clone()


def _fingerprint(module: nn.Module) -> Fingerprint:
    parts: list[tuple[int, int]] = [
        (id(parameter), parameter._version) for parameter in module.parameters()
    ]
    for sub in module.modules():
        parts.append(
            (len(sub._forward_hooks) + len(sub._forward_pre_hooks), len(sub._backward_hooks))
        )
    return tuple(parts)


def _find_cache(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    for value in (*kwargs.values(), *args):
        if isinstance(value, Cache):
            return value
    return None


def _sees_cache(seen: list[bool]) -> Any:
    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.append(_find_cache(args, kwargs) is not None)

    return hook


def _capture(index: int, hidden: dict[int, torch.Tensor], returns: list[bool]) -> Any:
    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        plain = isinstance(output, torch.Tensor)
        returns.append(plain)
        if plain:
            hidden[index] = output

    return hook


def _output_cache(output: Any) -> Any:
    getter = getattr(output, "get", None)
    if getter is None:
        return None
    cache = getter("cache")
    return cache if cache is not None else getter("past_key_values")


def _entry_bytes(entry: _Entry) -> int:
    tensors = [*entry.keys, *entry.values, *entry.hidden.values()]
    return sum(tensor.element_size() * tensor.numel() for tensor in tensors)
