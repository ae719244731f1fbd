"""Contract tests over every registry entry, on tiny random models (no network).

Each registered family must map all its decoder layers and every module that writes into the
residual stream; an ablation at strength 1 must leave no trace of the direction in what any layer
adds to the residual stream; restore() must be bit-exact; merged weights must compute what the
hooks compute; and the mapping must survive a save/reload.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from blasphemer.architectures import (
    REGISTRY,
    ArchitectureSpec,
    ComponentKind,
    ModelMap,
    describe,
    dump_override,
    guess_spec,
    load_override,
    resolve,
    spec_for_model_types,
)
from blasphemer.architectures.base import Layout
from blasphemer.editing import apply_ablation, merge_ablation
from blasphemer.errors import ConfigError, UnsupportedArchitectureError
from tiny_models import TINY, VOCAB, auto_class, build_tiny, input_ids

NAMES = sorted(TINY)
KINDS = (ComponentKind.ATTENTION, ComponentKind.MLP)


# --- helpers ----------------------------------------------------------------------------------


def unit_directions(model_map: ModelMap, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(model_map.n_layers, model_map.hidden_size, generator=generator)
    return directions / directions.norm(dim=-1, keepdim=True)


def constant_strengths(model_map: ModelMap, value: float) -> dict[ComponentKind, torch.Tensor]:
    return {kind: torch.full((model_map.n_layers,), value) for kind in KINDS}


def random_strengths(model_map: ModelMap, rng: random.Random) -> dict[ComponentKind, torch.Tensor]:
    return {
        kind: torch.tensor([rng.choice([0.0, rng.uniform(0.0, 1.5)]) for _ in model_map.layers])
        for kind in KINDS
    }


@torch.no_grad()
def logits(model: nn.Module) -> torch.Tensor:
    return model(input_ids()).logits


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_parameters_equal(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, saved[name]), name


def contribution_module(model: nn.Module, writer: Any) -> nn.Module:
    """The module whose output is what ``writer`` adds to the residual stream."""
    return writer.module if writer.post_norm is None else model.get_submodule(writer.post_norm.path)


def assert_orthogonal(output: torch.Tensor, direction: torch.Tensor, where: str) -> None:
    rows = output.detach().reshape(-1, output.shape[-1]).to(torch.float32)
    along = (rows @ direction).abs()
    bound = 1e-5 * rows.norm(dim=-1) + 1e-7
    assert bool((along <= bound).all()), f"{where}: max |rᵀ·out| {along.max():.3g}"


@contextmanager
def layer_deltas(model_map: ModelMap) -> Iterator[dict[int, torch.Tensor]]:
    """Record, per decoder layer, ``output - input``: everything the layer adds to the residual."""
    inputs: dict[int, torch.Tensor] = {}
    deltas: dict[int, torch.Tensor] = {}

    def before(index: int) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            inputs[index] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

        return hook

    def after(index: int) -> Any:
        def hook(_m: nn.Module, _a: Any, _k: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            deltas[index] = hidden.detach() - inputs[index]

        return hook

    handles = []
    for index, layer in enumerate(model_map.layers):
        handles.append(layer.register_forward_pre_hook(before(index), with_kwargs=True))
        handles.append(layer.register_forward_hook(after(index), with_kwargs=True))
    try:
        yield deltas
    finally:
        for handle in handles:
            handle.remove()


def mapping(model_map: ModelMap) -> dict[str, Any]:
    summary = describe(model_map)
    summary.pop("notes")
    return summary


# --- registry and tiny models agree -----------------------------------------------------------


def test_every_registry_entry_has_a_tiny_model_and_vice_versa() -> None:
    assert {case.spec for case in TINY.values()} == {spec.name for spec in REGISTRY}


def test_registry_names_and_model_types_are_unique() -> None:
    names = [spec.name for spec in REGISTRY]
    types = [t for spec in REGISTRY for t in spec.model_types]
    assert len(names) == len(set(names))
    assert len(types) == len(set(types))


@pytest.mark.parametrize("name", NAMES)
def test_tiny_model_resolves_to_its_entry(name: str) -> None:
    model = build_tiny(name)
    model_map = resolve(model)
    spec = next(spec for spec in REGISTRY if spec.name == TINY[name].spec)
    assert model_map.spec_name == spec.name
    config = model.config.get_text_config()
    assert model_map.hidden_size == config.hidden_size
    assert model_map.n_layers == config.num_hidden_layers == 2
    assert model_map.embeddings is model.get_input_embeddings()
    # Only the text tower: the mapped layers are the ones under the text model.
    assert "vision" not in model_map.layers_path and "visual" not in model_map.layers_path
    for index, writers in enumerate(model_map.writers):
        assert {w.kind for w in writers} == set(KINDS), f"layer {index}"
        for writer in writers:
            assert writer.path.startswith(f"{model_map.layers_path}.{index}.")
            assert model.get_submodule(writer.path) is writer.module
            assert writer.weight.ndim == (3 if writer.layout.value.startswith("experts") else 2)
            residual_axis = -1 if writer.layout in (Layout.IN_OUT, Layout.EXPERTS_IN_OUT) else -2
            assert writer.weight.shape[residual_axis] == model_map.hidden_size
            if writer.bias is not None:
                assert writer.bias.shape[-1] == model_map.hidden_size
    json.dumps(describe(model_map))  # JSON-able


# --- the edit removes the direction from everything written into the residual stream -----------


@pytest.mark.parametrize("norm_preserving", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_full_strength_leaves_no_component_along_the_direction(
    name: str, norm_preserving: bool
) -> None:
    model = build_tiny(name)
    model_map = resolve(model)
    directions = unit_directions(model_map, seed=7)
    outputs: list[tuple[str, int, torch.Tensor]] = []

    def capture(path: str, index: int) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            outputs.append((path, index, output[0] if isinstance(output, tuple) else output))

        return hook

    strengths = constant_strengths(model_map, 1.0)
    with apply_ablation(model_map, directions, strengths, norm_preserving) as handle:
        # Registered after the edit's hooks, so these see the edited outputs.
        hooks = [
            contribution_module(model, w).register_forward_hook(capture(w.path, i))
            for i, writers in enumerate(model_map.writers)
            for w in writers
        ]
        with layer_deltas(model_map) as deltas:
            logits(model)
        for hook in hooks:
            hook.remove()
        assert len(handle.edited) == sum(len(w) for w in model_map.writers)
    assert {path for path, _, _ in outputs} == {w.path for ws in model_map.writers for w in ws}
    for path, index, output in outputs:
        assert_orthogonal(output, directions[index], path)
    # The whole layer adds nothing along r: no writer was missed and none is followed by an
    # unmapped transformation before the residual add.
    assert sorted(deltas) == list(range(model_map.n_layers))
    for index, delta in deltas.items():
        assert_orthogonal(delta, directions[index], f"layer {index}")


@pytest.mark.parametrize("name", NAMES)
def test_unedited_model_writes_along_the_direction(name: str) -> None:
    """The orthogonality above is the edit's doing, not a property of the random model."""
    model = build_tiny(name)
    model_map = resolve(model)
    directions = unit_directions(model_map, seed=7)
    with layer_deltas(model_map) as deltas:
        logits(model)
    for index, delta in deltas.items():
        along = (delta.reshape(-1, delta.shape[-1]) @ directions[index]).abs().max()
        assert along > 1e-3 * delta.norm(dim=-1).max()


@pytest.mark.parametrize("name", NAMES)
def test_zero_strength_changes_nothing(name: str) -> None:
    model = build_tiny(name)
    model_map = resolve(model)
    before_parameters = snapshot(model)
    before_logits = logits(model)
    for norm_preserving in (False, True):
        strengths = constant_strengths(model_map, 0.0)
        with apply_ablation(model_map, unit_directions(model_map, 1), strengths, norm_preserving):
            assert_parameters_equal(model, before_parameters)
            assert torch.equal(logits(model), before_logits)


@pytest.mark.parametrize("name", NAMES)
def test_restore_is_bit_exact_after_many_cycles(name: str) -> None:
    model = build_tiny(name)
    model_map = resolve(model)
    before_parameters = snapshot(model)
    before_logits = logits(model)
    rng = random.Random(name)
    for cycle in range(50):
        handle = apply_ablation(
            model_map,
            unit_directions(model_map, seed=cycle),
            random_strengths(model_map, rng),
            norm_preserving=rng.random() < 0.5,
        )
        if cycle % 10 == 0:
            logits(model)  # run the hooks now and then
        handle.restore()
        assert not handle.active
    assert_parameters_equal(model, before_parameters)
    assert torch.equal(logits(model), before_logits)


@pytest.mark.parametrize("norm_preserving", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_only_writers_are_touched(name: str, norm_preserving: bool) -> None:
    model = build_tiny(name)
    model_map = resolve(model)
    writers = [w for ws in model_map.writers for w in ws]
    writer_modules = {id(w.module) for w in writers}
    writer_parameters = {id(p) for w in writers for p in (w.weight, w.bias) if p is not None}
    saved = snapshot(model)
    strengths = constant_strengths(model_map, 0.8)
    with apply_ablation(model_map, unit_directions(model_map, 3), strengths, norm_preserving):
        for module_name, module in model.named_modules():
            if id(module) not in writer_modules:
                hooks = (module._forward_hooks, module._forward_pre_hooks)
                assert not any(hooks), f"{module_name} was hooked"
        for parameter_name, parameter in model.named_parameters():
            if id(parameter) not in writer_parameters:
                assert torch.equal(parameter, saved[parameter_name]), parameter_name


@pytest.mark.parametrize("norm_preserving", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_merged_weights_compute_what_the_hooks_compute(name: str, norm_preserving: bool) -> None:
    model = build_tiny(name)
    model_map = resolve(model)
    directions = unit_directions(model_map, seed=11)
    strengths = random_strengths(model_map, random.Random(f"{name}{norm_preserving}"))
    strengths[ComponentKind.MLP][-1] = 1.0  # at least one edit of each kind
    strengths[ComponentKind.ATTENTION][0] = 0.6
    with apply_ablation(model_map, directions, strengths, norm_preserving):
        hooked = logits(model)
    original = logits(model)
    edited = merge_ablation(model_map, directions, strengths, norm_preserving)
    assert edited == sum(
        1
        for index, writers in enumerate(model_map.writers)
        for writer in writers
        if float(strengths[writer.kind][index]) != 0.0
    )
    merged = logits(model)
    assert not torch.allclose(merged, original, atol=1e-4)
    torch.testing.assert_close(merged, hooked, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_mapping_survives_save_and_reload(name: str, tmp_path: Path) -> None:
    model = build_tiny(name)
    model.save_pretrained(tmp_path)
    reloaded = auto_class(name).from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert mapping(resolve(reloaded)) == mapping(resolve(model))
    torch.testing.assert_close(logits(reloaded), logits(model))


# --- structural guess -------------------------------------------------------------------------


def _writer_set(model_map: ModelMap) -> set[tuple[int, str, str, str]]:
    return {
        (index, w.kind.value, w.path, w.layout.value)
        for index, writers in enumerate(model_map.writers)
        for w in writers
    }


@pytest.mark.parametrize("name", NAMES)
def test_guess_finds_what_the_registry_declares(name: str) -> None:
    model = build_tiny(name)
    guessed = resolve(model, override=guess_spec(model))
    assert _writer_set(guessed) == _writer_set(resolve(model))


class MysteryConfig(LlamaConfig):
    model_type = "blasphemer_mystery"


class MysteryForCausalLM(LlamaForCausalLM):
    config_class = MysteryConfig


def test_unknown_model_type_gets_a_structural_guess() -> None:
    config = MysteryConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = MysteryForCausalLM(config).eval()
    assert spec_for_model_types(["blasphemer_mystery"]) is None
    model_map = resolve(model)
    assert model_map.spec_name == "guess:MysteryForCausalLM"
    assert any("guessed" in note for note in model_map.notes)
    assert model_map.layers_path == "model.layers" and model_map.n_layers == 3
    assert [[(w.kind, w.path.split(".", 3)[-1]) for w in ws] for ws in model_map.writers] == [
        [(ComponentKind.ATTENTION, "self_attn.o_proj"), (ComponentKind.MLP, "mlp.down_proj")]
    ] * 3


def test_multimodal_wrapper_falls_back_to_its_text_tower() -> None:
    model = build_tiny("llava")
    without_llava = tuple(spec for spec in REGISTRY if spec.name != "llava")
    spec = spec_for_model_types(["llava", "llama"], without_llava)
    assert spec is not None and spec.name == "llama"
    model_map = resolve(model, override=spec)
    assert model_map.layers_path == "model.language_model.layers"


class NoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.blocks = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])  # not decoder layers


@pytest.mark.parametrize("model", [nn.Sequential(nn.Linear(4, 4)), NoLayers()])
def test_guess_fails_with_a_one_line_error_naming_the_override(model: nn.Module) -> None:
    with pytest.raises(UnsupportedArchitectureError) as caught:
        resolve(model)
    message = str(caught.value)
    assert "\n" not in message
    assert type(model).__name__ in message
    assert "--architecture-override" in message


# --- user override ----------------------------------------------------------------------------


@pytest.mark.parametrize("spec", REGISTRY, ids=lambda spec: spec.name)
def test_override_round_trip_for_every_entry(spec: ArchitectureSpec, tmp_path: Path) -> None:
    path = tmp_path / f"{spec.name}.toml"
    path.write_text(dump_override(spec), encoding="utf-8")
    assert load_override(path) == replace(spec, model_types=())


@pytest.mark.parametrize("name", ["gemma3", "gpt_oss", "qwen3_next"])
def test_override_file_maps_like_the_registry(name: str, tmp_path: Path) -> None:
    model = build_tiny(name)
    spec = next(spec for spec in REGISTRY if spec.name == TINY[name].spec)
    path = tmp_path / "override.toml"
    path.write_text(dump_override(replace(spec, name="mine")), encoding="utf-8")
    overridden = resolve(model, override=load_override(path))
    assert overridden.spec_name == "mine"
    expected = mapping(resolve(model))
    expected["spec"] = "mine"
    assert mapping(overridden) == expected


def test_override_from_json(tmp_path: Path) -> None:
    path = tmp_path / "arch.json"
    document = {
        "layers": "model.layers",
        "writers": [
            {"kind": "attn", "module": "self_attn.o_proj"},
            {"kind": "mlp", "module": ["mlp.down_proj", "mlp.experts"], "layout": "out_in"},
        ],
    }
    path.write_text(json.dumps(document), encoding="utf-8")
    spec = load_override(path)
    assert spec.name == "arch" and spec.layers == ("model.layers",)
    assert spec.writers[1].module == ("mlp.down_proj", "mlp.experts")
    model_map = resolve(build_tiny("llama"), override=spec)
    assert _writer_set(model_map) == _writer_set(resolve(build_tiny("llama")))


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("layers = [", "not valid TOML"),
        ('layers = "model.layers"', "[[writers]]"),
        ('layers = "model.layers"\n[[writers]]\nkind = "mlpp"\nmodule = "x"', "kind must be"),
        ('layers = "model.layers"\n[[writers]]\nkind = "mlp"\nmodule = "x"\nlayot = "a"', "layot"),
        ('layers = "model.layers"\n[[writers]]\nkind = "mlp"\nmodule = 3', "module must be"),
        ('layers = 3\n[[writers]]\nkind = "mlp"\nmodule = "x"', "layers must be"),
        ('layers = "m"\n[[writers]]\nkind = "mlp"\nmodule = "x"\noptional = 1', "optional must"),
        ('layers = "m"\n[[writers]]\nkind = "mlp"\nmodule = "x"\nlayout = "io"', "layout must"),
    ],
)
def test_bad_override_files_give_one_line_config_errors(
    text: str, fragment: str, tmp_path: Path
) -> None:
    path = tmp_path / "override.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_override(path)
    assert fragment in str(caught.value)
    assert "\n" not in str(caught.value)


def test_missing_override_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="check the path"):
        load_override(tmp_path / "nope.toml")


def test_override_that_does_not_fit_the_model_names_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "override.toml"
    path.write_text('layers = "model.layers"\n[[writers]]\nkind = "mlp"\nmodule = "mlp.nope"\n')
    with pytest.raises(UnsupportedArchitectureError, match=r"mlp\.nope.*--architecture-override"):
        resolve(build_tiny("llama"), override=load_override(path))
    path.write_text(
        'layers = "model.blocks"\n[[writers]]\nkind = "mlp"\nmodule = "mlp.down_proj"\n'
    )
    with pytest.raises(UnsupportedArchitectureError, match=r"model\.blocks"):
        resolve(build_tiny("llama"), override=load_override(path))
