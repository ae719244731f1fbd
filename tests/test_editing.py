"""Unit tests of editing.py on hand-built writers of every layout (no transformers models).

The hooks must compute exactly what the orthogonalised weights of ablation.py compute, the
handle must undo everything, and a post-norm writer must be edited in its own output space.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from blasphemer import ablation
from blasphemer.ablation import AblationParameters, KernelParameters
from blasphemer.architectures.base import ComponentKind, Layout, ModelMap, PostNorm, Writer
from blasphemer.editing import Ablation, apply_ablation, merge_ablation

HIDDEN, INNER, EXPERTS, TOKENS = 8, 5, 3, 7
ATTN, MLP = ComponentKind.ATTENTION, ComponentKind.MLP


class FusedExperts(nn.Module):
    """Routing-weighted sum of experts, ``down_proj`` [E, out, in] (or [E, in, out])."""

    def __init__(self, transposed: bool) -> None:
        super().__init__()
        shape = (EXPERTS, INNER, HIDDEN) if transposed else (EXPERTS, HIDDEN, INNER)
        self.transposed = transposed
        self.down_proj = nn.Parameter(torch.randn(shape))
        self.down_proj_bias = nn.Parameter(torch.randn(EXPERTS, HIDDEN))

    def forward(self, x: torch.Tensor, routing: torch.Tensor) -> torch.Tensor:
        weight = self.down_proj.transpose(-1, -2) if self.transposed else self.down_proj
        per_expert = torch.einsum("eoi,ti->teo", weight, x) + self.down_proj_bias
        return (routing.unsqueeze(-1) * per_expert).sum(1)


class TupleLinear(nn.Linear):
    """A writer that returns ``(output, extra)`` like attention modules do."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, str]:  # type: ignore[override]
        return super().forward(x), "extra"


def make_writer(layout: Layout, kind: ComponentKind = MLP, index: int = 0) -> Writer:
    module: nn.Module
    weight: Any
    bias: Any
    if layout is Layout.OUT_IN:
        module = nn.Linear(INNER, HIDDEN)
        weight, bias = module.weight, module.bias
    elif layout is Layout.IN_OUT:
        module = Conv1D(HIDDEN, INNER)  # Conv1D(nf=out, nx=in): weight [in, out]
        nn.init.normal_(module.bias)
        weight, bias = module.weight, module.bias
    else:
        module = FusedExperts(transposed=layout is Layout.EXPERTS_IN_OUT)
        weight, bias = module.down_proj, module.down_proj_bias
    return Writer(kind, f"layers.{index}.{layout.value}", module, weight, bias, layout)


def call(writer: Writer, x: torch.Tensor, routing: torch.Tensor) -> torch.Tensor:
    if isinstance(writer.module, FusedExperts):
        return writer.module(x, routing)
    output = writer.module(x)
    return output[0] if isinstance(output, tuple) else output


def reference(
    writer: Writer, x: torch.Tensor, routing: torch.Tensor, r: torch.Tensor, s: float, np: bool
) -> torch.Tensor:
    """The writer's output computed from explicitly orthogonalised weights (ablation.py)."""
    edit = ablation.orthogonalize_norm_preserving if np else ablation.orthogonalize
    weight = edit(writer.weight.detach(), r, s, writer.layout)
    bias = ablation.orthogonalize_bias(writer.bias.detach(), r, s)  # type: ignore[union-attr]
    w = ablation.as_out_in(weight, writer.layout)
    if writer.layout in (Layout.EXPERTS_OUT_IN, Layout.EXPERTS_IN_OUT):
        per_expert = torch.einsum("eoi,ti->teo", w, x) + bias
        return (routing.unsqueeze(-1) * per_expert).sum(1)
    return x @ w.T + bias


def model_map(writers: list[list[Writer]]) -> ModelMap:
    layers = [nn.ModuleList([w.module for w in ws]) for ws in writers]
    return ModelMap("toy", "layers", list(layers), writers, HIDDEN)


def unit(seed: int, rows: int = 1) -> torch.Tensor:
    vectors = torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(seed))
    return vectors / vectors.norm(dim=-1, keepdim=True)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(TOKENS, INNER), torch.softmax(torch.randn(TOKENS, EXPERTS), dim=-1)


@pytest.mark.parametrize("norm_preserving", [False, True])
@pytest.mark.parametrize("strength", [0.3, 1.0, 1.4])
@pytest.mark.parametrize("layout", list(Layout))
def test_hooks_compute_the_orthogonalised_weights(
    layout: Layout, strength: float, norm_preserving: bool
) -> None:
    writer = make_writer(layout)
    x, routing = inputs()
    r = unit(1)
    expected = reference(writer, x, routing, r[0], strength, norm_preserving)
    with apply_ablation(model_map([[writer]]), r, {MLP: torch.tensor([strength])}, norm_preserving):
        edited = call(writer, x, routing)
    torch.testing.assert_close(edited, expected, atol=1e-5, rtol=1e-5)
    if strength == 1.0:
        assert (edited @ r[0]).abs().max() < 1e-5 * edited.norm(dim=-1).max()


@pytest.mark.parametrize("norm_preserving", [False, True])
@pytest.mark.parametrize("layout", list(Layout))
def test_merge_matches_hooks(layout: Layout, norm_preserving: bool) -> None:
    writer = make_writer(layout)
    x, routing = inputs()
    r, strengths = unit(2), {MLP: torch.tensor([0.7])}
    with apply_ablation(model_map([[writer]]), r, strengths, norm_preserving):
        hooked = call(writer, x, routing)
    assert merge_ablation(model_map([[writer]]), r, strengths, norm_preserving) == 1
    torch.testing.assert_close(call(writer, x, routing), hooked, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", list(Layout))
def test_restore_returns_every_bit_and_the_handle_is_reusable(layout: Layout) -> None:
    writer = make_writer(layout)
    x, routing = inputs()
    before = call(writer, x, routing).detach().clone()
    saved = [p.detach().clone() for p in writer.module.parameters()]
    handle = apply_ablation(model_map([[writer]]), unit(3), {MLP: torch.tensor([0.9])}, True)
    assert handle.active and handle.edited == [(writer.path, pytest.approx(0.9))]
    assert not torch.equal(call(writer, x, routing), before)
    handle.restore()
    handle.restore()  # twice is harmless
    assert not handle.active
    for parameter, original in zip(writer.module.parameters(), saved, strict=True):
        assert torch.equal(parameter, original)
    assert torch.equal(call(writer, x, routing), before)
    assert not writer.module._forward_hooks and not writer.module._forward_pre_hooks


def test_kinds_without_strength_and_zero_strength_layers_are_untouched() -> None:
    attention = [make_writer(Layout.OUT_IN, ATTN, i) for i in range(2)]
    mlp = [make_writer(Layout.OUT_IN, MLP, i) for i in range(2)]
    writers = [[attention[0], mlp[0]], [attention[1], mlp[1]]]
    handle = apply_ablation(model_map(writers), unit(4, rows=2), {MLP: torch.tensor([0.0, 1.0])})
    assert [path for path, _ in handle.edited] == [mlp[1].path]
    for writer in (*attention, mlp[0]):
        assert not writer.module._forward_hooks
    handle.restore()


def test_tuple_outputs_are_projected_in_their_first_element() -> None:
    module = TupleLinear(INNER, HIDDEN)
    weight: Any = module.weight
    writer = Writer(ATTN, "layers.0.o_proj", module, weight, module.bias, Layout.OUT_IN)
    x, _ = inputs()
    r = unit(5)
    with apply_ablation(model_map([[writer]]), r, {ATTN: torch.tensor([1.0])}):
        output, extra = module(x)
    assert extra == "extra"
    assert (output @ r[0]).abs().max() < 1e-5


def test_wrong_direction_shape_is_rejected() -> None:
    writer = make_writer(Layout.OUT_IN)
    with pytest.raises(ValueError, match=r"directions must be \[1, 8\]"):
        apply_ablation(model_map([[writer]]), unit(6, rows=2), {MLP: torch.ones(1)})


def test_a_failure_halfway_undoes_what_was_applied() -> None:
    writers = [[make_writer(Layout.EXPERTS_OUT_IN, MLP, i)] for i in range(2)]
    saved = writers[0][0].weight.detach().clone()
    with pytest.raises(IndexError):  # strengths for one layer only: layer 1 fails
        apply_ablation(model_map(writers), unit(7, rows=2), {MLP: torch.ones(1)}, True)
    assert torch.equal(writers[0][0].weight, saved)
    assert not writers[0][0].module._forward_hooks


# --- writers followed by an RMS norm (Gemma 2/3, OLMo 2) ---------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, offset: float) -> None:
        super().__init__()
        self.offset = offset
        self.weight = nn.Parameter(torch.randn(HIDDEN))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return normed * (self.offset + self.weight)


def post_norm_writer(offset: float) -> tuple[Writer, RMSNorm]:
    writer = make_writer(Layout.OUT_IN)
    norm = RMSNorm(offset)
    writer.post_norm = PostNorm("layers.0.post_norm", norm.weight, offset)
    return writer, norm


@pytest.mark.parametrize("norm_preserving", [False, True])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_post_norm_writer_removes_the_direction_after_the_norm(
    offset: float, norm_preserving: bool
) -> None:
    writer, norm = post_norm_writer(offset)
    x, _ = inputs()
    r = unit(8)
    before = norm(writer.module(x))
    assert (before @ r[0]).abs().max() > 1e-2
    strengths = {MLP: torch.tensor([1.0])}
    with apply_ablation(model_map([[writer]]), r, strengths, norm_preserving):
        hooked = norm(writer.module(x))
    assert (hooked @ r[0]).abs().max() < 1e-5 * hooked.norm(dim=-1).max()
    merge_ablation(model_map([[writer]]), r, strengths, norm_preserving)
    torch.testing.assert_close(norm(writer.module(x)), hooked, atol=1e-5, rtol=1e-5)


def test_output_direction() -> None:
    writer, norm = post_norm_writer(1.0)
    r = unit(9)[0]
    gain = 1.0 + norm.weight.detach()
    expected = gain * r / (gain * r).norm()
    torch.testing.assert_close(writer.output_direction(r), expected)
    assert torch.equal(make_writer(Layout.OUT_IN).output_direction(r), r)
    with torch.no_grad():
        norm.weight.fill_(-1.0)  # the norm zeroes everything: nothing to remove, no edit
    assert torch.equal(writer.output_direction(r), torch.zeros(HIDDEN))


def test_bfloat16_writer_keeps_its_dtype() -> None:
    writer = make_writer(Layout.OUT_IN)
    writer.module.to(torch.bfloat16)
    writer.weight, writer.bias = writer.module.weight, writer.module.bias  # type: ignore[assignment]
    x, _ = inputs()
    with apply_ablation(model_map([[writer]]), unit(10), {MLP: torch.tensor([1.0])}, True):
        output = writer.module(x.to(torch.bfloat16))
    assert output.dtype == torch.bfloat16
    assert (output.float() @ unit(10)[0]).abs().max() < 2e-2 * output.float().norm(dim=-1).max()


class FixedDirections:
    """A direction source: layer-own rows for ``None``, else row ``int(index)`` everywhere."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows

    def for_layers(self, direction_index: float | None) -> torch.Tensor:
        if direction_index is None:
            return self.rows
        return self.rows[int(direction_index)].expand_as(self.rows)


@pytest.mark.parametrize("norm_preserving", [False, True])
def test_ablation_value_applies_merges_and_names_what_it_edits(norm_preserving: bool) -> None:
    attention = [make_writer(Layout.OUT_IN, ATTN, i) for i in range(3)]
    mlp = [make_writer(Layout.IN_OUT, MLP, i) for i in range(3)]
    writers = [[a, m] for a, m in zip(attention, mlp, strict=True)]
    source = FixedDirections(unit(5, rows=3))
    kernels = {MLP: KernelParameters(1.0, 2.0, 0.5, 1.0)}  # layers 1 (0.5) and 2 (1.0)
    edit = Ablation(source, AblationParameters(1.0, kernels, norm_preserving))
    x, routing = inputs()
    before = [call(w, x, routing).detach().clone() for w in mlp]

    # apply == the tensor-level call with the directions and weights the parameters stand for
    with apply_ablation(
        model_map(writers),
        source.rows[1].expand(3, HIDDEN),
        {MLP: torch.tensor([0, 0.5, 1.0])},
        norm_preserving,
    ):
        expected = [call(w, x, routing).detach().clone() for w in mlp]
    with edit.apply(model_map(writers)) as handle:
        assert [path for path, _ in handle.edited] == [mlp[1].path, mlp[2].path]
        for writer, want in zip(mlp, expected, strict=True):
            torch.testing.assert_close(call(writer, x, routing), want)
    for writer, original in zip(mlp, before, strict=True):
        assert torch.equal(call(writer, x, routing), original)  # undone bit for bit

    edited = edit.edited_tensors(model_map(writers))
    assert {id(t) for t in edited} == {id(mlp[i].weight) for i in (1, 2)} | {
        id(mlp[i].bias) for i in (1, 2)
    }
    assert edit.merge(model_map(writers)) == 2
    for writer, want in zip(mlp, expected, strict=True):
        torch.testing.assert_close(call(writer, x, routing), want, atol=1e-5, rtol=1e-5)
