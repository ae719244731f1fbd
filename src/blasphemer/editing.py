"""Apply an ablation to a live model and undo it exactly.

Edits are a side path, not a weight rewrite: each edited writer gets a forward hook that removes
``w · r (rᵀ out)`` from its output, which is exactly what the orthogonalised weight and bias of
:mod:`blasphemer.ablation` would compute (the map is linear, so it also holds for the weighted
sum a fused-experts module returns). The norm-preserving variant adds a forward *pre*-hook that
rescales the writer's input by the column factors, since ``W'' x = P W (d ⊙ x)``. Weights are never
written, so :meth:`EditHandle.restore` is bit-exact, trial after trial never drifts, and the only
memory used is one direction and one factor vector per edited writer.

Fused expert tensors have no per-expert input to rescale, so the norm-preserving variant edits
them in place and keeps a copy of just those tensors until :meth:`EditHandle.restore`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.utils.hooks import RemovableHandle

from blasphemer import ablation
from blasphemer.ablation import AblationParameters
from blasphemer.architectures.base import ComponentKind, Layout, ModelMap, Writer

_FUSED = (Layout.EXPERTS_OUT_IN, Layout.EXPERTS_IN_OUT)


class EditHandle:
    """Undo handle of one applied ablation. ``restore()`` returns every weight bit-for-bit.

    Usable as a context manager; restoring twice is harmless.
    """

    def __init__(self) -> None:
        self._hooks: list[RemovableHandle] = []
        self._saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        self.edited: list[tuple[str, float]] = []  # (writer path, strength) for reports

    @property
    def active(self) -> bool:
        return bool(self._hooks or self._saved)

    def restore(self) -> None:
        """Remove every hook and put back every tensor edited in place."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        with torch.no_grad():
            for parameter, original in self._saved:
                parameter.copy_(original)
        self._saved.clear()

    def __enter__(self) -> EditHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.restore()


def apply_ablation(
    model_map: ModelMap,
    directions: torch.Tensor,
    strengths: Mapping[ComponentKind, torch.Tensor],
    norm_preserving: bool = False,
) -> EditHandle:
    """Edit ``model_map``'s writers in place (as hooks) and return the handle that undoes it.

    ``directions`` is ``[n_layers, hidden]`` (unit rows): the direction removed at each layer.
    ``strengths[kind]`` is ``[n_layers]``: the strength per layer for writers of that kind; layers
    with strength 0 and kinds without an entry are left untouched.
    """
    if directions.shape != (model_map.n_layers, model_map.hidden_size):
        raise ValueError(
            f"directions must be [{model_map.n_layers}, {model_map.hidden_size}], "
            f"got {list(directions.shape)}"
        )
    handle = EditHandle()
    try:
        for layer_index, writers in enumerate(model_map.writers):
            for writer in writers:
                weights = strengths.get(writer.kind)
                if weights is None:
                    continue
                strength = float(weights[layer_index])
                if strength == 0.0:
                    continue
                _edit_writer(handle, writer, directions[layer_index], strength, norm_preserving)
                handle.edited.append((writer.path, strength))
    except BaseException:
        handle.restore()
        raise
    return handle


def _edit_writer(
    handle: EditHandle,
    writer: Writer,
    direction: torch.Tensor,
    strength: float,
    norm_preserving: bool,
) -> None:
    r = writer.output_direction(direction)  # = direction unless a post-norm follows the writer
    if norm_preserving and writer.layout in _FUSED:
        _edit_in_place(handle, writer, r, strength)
        return
    if norm_preserving:
        scale = ablation.column_scale(writer.weight.detach(), r, strength, writer.layout)
        handle._hooks.append(writer.module.register_forward_pre_hook(_scale_input(scale)))
    handle._hooks.append(writer.module.register_forward_hook(_project_output(r, strength)))


def _edit_in_place(handle: EditHandle, writer: Writer, r: torch.Tensor, strength: float) -> None:
    with torch.no_grad():
        weight = writer.weight
        handle._saved.append((weight, weight.detach().clone()))
        weight.copy_(
            ablation.orthogonalize_norm_preserving(weight.detach(), r, strength, writer.layout)
        )
        if writer.bias is not None:
            handle._saved.append((writer.bias, writer.bias.detach().clone()))
            writer.bias.copy_(ablation.orthogonalize_bias(writer.bias.detach(), r, strength))


def _project_output(r: torch.Tensor, strength: float) -> Any:
    def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (ablation.project_out(output[0], r, strength), *output[1:])
        return ablation.project_out(output, r, strength)

    return hook


def _scale_input(scale: torch.Tensor) -> Any:
    def hook(_module: torch.nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
        x = inputs[0]
        return (x * scale.to(x.dtype), *inputs[1:])

    return hook


def merge_ablation(
    model_map: ModelMap,
    directions: torch.Tensor,
    strengths: Mapping[ComponentKind, torch.Tensor],
    norm_preserving: bool = False,
) -> int:
    """Write the ablation permanently into the weights (for export). Returns the writers edited.

    Produces the same function as :func:`apply_ablation`, but changes parameters for good: call
    it only on a model that is about to be saved, never on the one the study keeps using.
    """
    edited = 0
    with torch.no_grad():
        for layer_index, writers in enumerate(model_map.writers):
            for writer in writers:
                weights = strengths.get(writer.kind)
                strength = 0.0 if weights is None else float(weights[layer_index])
                if strength == 0.0:
                    continue
                r = writer.output_direction(directions[layer_index])
                math = (
                    ablation.orthogonalize_norm_preserving
                    if norm_preserving
                    else ablation.orthogonalize
                )
                writer.weight.copy_(math(writer.weight.detach(), r, strength, writer.layout))
                if writer.bias is not None:
                    writer.bias.copy_(
                        ablation.orthogonalize_bias(writer.bias.detach(), r, strength)
                    )
                edited += 1
    return edited


class DirectionSource(Protocol):
    """What an edit needs of :class:`blasphemer.directions.Directions`."""

    def for_layers(self, direction_index: float | None) -> torch.Tensor: ...


@dataclass(frozen=True)
class Ablation:
    """One edit as a value: the refusal directions and the parameters that say which direction
    is removed from which writer, and how strongly.

    ``apply`` edits a live model reversibly (hooks; the handle restores it bit for bit),
    ``merge`` writes the same function into the weights for good (for export only).
    """

    directions: DirectionSource
    parameters: AblationParameters

    def resolve(self, n_layers: int) -> tuple[torch.Tensor, dict[ComponentKind, torch.Tensor]]:
        """The direction removed at each layer ``[n_layers, hidden]`` and the strength per layer
        for each component kind, as :func:`apply_ablation` takes them."""
        directions = self.directions.for_layers(self.parameters.direction_index)
        return directions, self.parameters.layer_weights(n_layers)

    def apply(self, model_map: ModelMap) -> EditHandle:
        """Edit ``model_map``'s writers in place (as hooks); the returned handle undoes it."""
        directions, strengths = self.resolve(model_map.n_layers)
        return apply_ablation(model_map, directions, strengths, self.parameters.norm_preserving)

    def merge(self, model_map: ModelMap) -> int:
        """Write the edit into the weights (see :func:`merge_ablation`); the writers edited."""
        directions, strengths = self.resolve(model_map.n_layers)
        return merge_ablation(model_map, directions, strengths, self.parameters.norm_preserving)

    def edited_tensors(self, model_map: ModelMap) -> list[torch.Tensor]:
        """The weight and bias tensors :meth:`merge` changes (each once; shared ones once)."""
        strengths = self.parameters.layer_weights(model_map.n_layers)
        tensors: dict[int, torch.Tensor] = {}
        for layer_index, writers in enumerate(model_map.writers):
            for writer in writers:
                weights = strengths.get(writer.kind)
                if weights is None or float(weights[layer_index]) == 0.0:
                    continue
                for tensor in (writer.weight, writer.bias):
                    if tensor is not None:
                        tensors[id(tensor)] = tensor
        return list(tensors.values())
