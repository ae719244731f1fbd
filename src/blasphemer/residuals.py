"""Measure the residual stream at the last prompt token, layer by layer.

Prompts are left-padded, so position ``-1`` of every row is the last token of that prompt: the
position from which the model's first answer token is predicted, and where the decision to
refuse shows. :func:`mean_residuals` streams batches through the model and keeps only running
float64 sums, so memory does not grow with the number of prompts.

Index 0 of every measurement is the residual stream *entering* the first decoder layer (the
token embeddings plus whatever the model adds before its layers: scaling, absolute position
embeddings). It is read with a pre-hook on layer 0 rather than on the embedding module so it is
the true stream for every architecture. Index ``i + 1`` is the output of layer ``i``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from blasphemer.architectures.base import ModelMap
from blasphemer.errors import DatasetError
from blasphemer.evaluation.decoding import ForwardSpec
from blasphemer.evaluation.generation import shared_prefix
from blasphemer.evaluation.prefix import with_prefix_columns
from blasphemer.loading import LoadedModel


@dataclass(frozen=True)
class Residuals:
    """Mean last-token residual per measurement point.

    ``means`` is ``[n_layers + 1, hidden]`` float64 on the CPU: row 0 is the stream entering the
    first layer, row ``i + 1`` the output of layer ``i``. ``count`` is the number of prompts.
    """

    means: torch.Tensor
    count: int

    def __post_init__(self) -> None:
        if self.means.ndim != 2 or self.means.shape[0] < 2:
            raise ValueError(f"means must be [n_layers + 1, hidden], got {list(self.means.shape)}")


@contextmanager
def record_last_token(model_map: ModelMap) -> Iterator[list[torch.Tensor]]:
    """Hook ``model_map``'s layers; yield a list refreshed by every forward pass.

    After a forward pass, element 0 of the yielded list holds the ``[batch, hidden]`` stream
    entering layer 0 at the last position, element ``i + 1`` the output of layer ``i`` there
    (detached, on the layer's device, in the model's dtype). Every hook is removed on exit,
    also when the body raises.
    """
    captured: list[torch.Tensor] = [torch.empty(0)] * (model_map.n_layers + 1)
    handles: list[RemovableHandle] = []
    try:
        handles.append(
            model_map.layers[0].register_forward_pre_hook(
                _capture_input(captured), with_kwargs=True
            )
        )
        for index, layer in enumerate(model_map.layers):
            handles.append(layer.register_forward_hook(_capture_output(captured, index + 1)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _last_position(hidden: Any) -> torch.Tensor:
    if isinstance(hidden, tuple | list):  # layers that return (hidden_states, attention, ...)
        hidden = hidden[0]
    if not isinstance(hidden, torch.Tensor) or hidden.ndim != 3:
        raise TypeError(
            f"expected a [batch, seq, hidden] tensor from a decoder layer, got {hidden!r}"
        )
    return hidden[:, -1, :].detach()


def _capture_input(captured: list[torch.Tensor]) -> Any:
    def hook(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured[0] = _last_position(args[0] if args else kwargs["hidden_states"])

    return hook


def _capture_output(captured: list[torch.Tensor], slot: int) -> Any:
    def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
        captured[slot] = _last_position(output)

    return hook


def mean_residuals(
    loaded: LoadedModel,
    model_map: ModelMap,
    texts: Sequence[str],
    *,
    batch_size: int,
    add_special_tokens: bool = False,
    on_batch: Callable[[int], None] | None = None,
    share_prefix: bool = True,
) -> Residuals:
    """Mean last-token residual of ``texts`` at every measurement point of ``model_map``.

    ``texts`` are already rendered (chat template applied), hence ``add_special_tokens=False`` by
    default. Prompts are grouped by token length to keep padding small; the means do not depend
    on ``batch_size`` beyond floating-point noise because padding is masked and position ids
    follow the attention mask, as in generation. ``on_batch(n)`` is called after each batch with
    the number of prompts it held. ``share_prefix`` runs the prompts' shared template prefix
    once (:mod:`blasphemer.evaluation.prefix`); the last token is never part of it.
    """
    if not texts:
        raise DatasetError("no prompts to measure residuals on; check the prompt set is not empty")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tokenizer = loaded.tokenizer
    token_ids: list[list[int]] = tokenizer(list(texts), add_special_tokens=add_special_tokens)[
        "input_ids"
    ]
    if any(len(ids) == 0 for ids in token_ids):
        raise DatasetError("a prompt tokenises to nothing; remove empty prompts from the set")
    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))

    backbone = loaded.model.base_model  # the decoder stack without the language-model head
    takes_position_ids = "position_ids" in inspect.signature(backbone.forward).parameters
    device = loaded.input_device
    sums = torch.zeros(model_map.n_layers + 1, model_map.hidden_size, dtype=torch.float64)
    spec = ForwardSpec.of(backbone)

    with torch.inference_mode():  # the shared template prefix, run once (not measured)
        suffixes, prefix = shared_prefix(backbone, spec, token_ids, share_prefix, 0)
    with record_last_token(model_map) as captured, torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = [suffixes[i] for i in order[start : start + batch_size]]
            batch = tokenizer.pad({"input_ids": rows}, padding=True, return_tensors="pt")
            input_ids = batch["input_ids"].to(device)
            attention_mask = with_prefix_columns(batch["attention_mask"], prefix).to(device)
            inputs: dict[str, Any] = {
                "input_ids": input_ids,
                "attention_mask": attention_mask,
                "use_cache": prefix is not None,
            }
            if takes_position_ids:
                inputs["position_ids"] = _position_ids(attention_mask)[:, -input_ids.shape[1] :]
            if prefix is not None:
                inputs[spec.cache_argument] = prefix.for_batch(len(rows))
            backbone(**inputs)
            for slot, hidden in enumerate(captured):
                sums[slot] += hidden.to(device="cpu", dtype=torch.float64).sum(dim=0)
            if on_batch is not None:
                on_batch(len(rows))
    return Residuals(means=sums / len(token_ids), count=len(token_ids))


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token (left padding gets position 0)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)
