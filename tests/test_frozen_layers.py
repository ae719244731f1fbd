"""The layer cache: layers below the first edited one are replayed, and nothing else changes.

Each check compares a scorer with a :class:`LayerCache` against the same scorer without one on
the same model, after an edit that leaves the lowest layers alone: the numbers must be equal bit
for bit (a replayed layer hands on exactly what it recorded), and the cache must actually have
replayed where the model's cache allows it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import test_cli
from blasphemer.architectures import resolve
from blasphemer.editing import apply_ablation
from blasphemer.evaluation import KLScorer, RefusalScorer
from blasphemer.evaluation.frozen import LayerCache
from blasphemer.evaluation.generation import generate_verdicts
from blasphemer.evaluation.markers import RefusalMarkers
from test_prefix import CASES, NOT_SHARED, Loaded, text_model, texts, tokenizer
from tiny_models import tiny_llama

DEEP = 6  # layers of the Llama used where the first edited layer matters


def layer_cache(model: nn.Module, budget_bytes: int = 1 << 30) -> LayerCache:
    layers = model.get_submodule(resolve(model).layers_path)
    assert isinstance(layers, nn.ModuleList)
    return LayerCache(layers, model.get_input_embeddings(), budget_bytes=budget_bytes)


def edit_from(model: nn.Module, first: int) -> None:
    """Change every weight matrix of the layers from ``first`` up, in place."""
    layers = model.get_submodule(resolve(model).layers_path)
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for layer in list(layers)[first:]:
            for parameter in layer.parameters():
                if parameter.ndim == 2:
                    noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
                    parameter.add_(0.05 * parameter.std() * noise)


def deep_llama() -> Loaded:
    model = tiny_llama(len(tokenizer()), layers=DEEP, seed=3).double()
    return Loaded(model, tokenizer())


def markers_for(model: nn.Module) -> RefusalMarkers:
    """Markers among the words the model writes, so that some answers are refused mid-way."""
    tok = tokenizer()
    prompts = [tok(text, add_special_tokens=False)["input_ids"] for text in texts()]
    answers = generate_verdicts(
        model,
        tok,
        prompts,
        RefusalMarkers(["w2"]),
        max_new_tokens=8,
        decided_after=None,
        batch_size=3,
    )
    words = sorted({v.tokens[2] for v in answers[::2] if len(v.tokens) > 2 and v.tokens[2] > 2})
    return RefusalMarkers([f"w{w}" for w in words])


@pytest.mark.parametrize("name", CASES)
def test_kl_with_replayed_layers_is_bit_exact(name: str) -> None:
    loaded = Loaded(text_model(name), tokenizer())
    cache = layer_cache(loaded.model)
    plain = KLScorer(loaded, texts(), batch_size=3)
    cached = KLScorer(loaded, texts(), batch_size=3, layer_cache=cache)
    edit_from(loaded.model, 1)
    expected, got = plain.per_prompt(), cached.per_prompt()
    assert float(expected.max()) > 1e-7  # the edit changed the distributions
    assert torch.equal(got, expected)
    if name in NOT_SHARED:  # a recurrent layer or a short sliding window: nothing recorded
        assert not cache.enabled and cache.why_off and cache.replayed_layers == []
    else:
        assert cache.enabled and cache.replayed_layers == [1] * len(cached._batches)


@pytest.mark.parametrize("name", CASES)
def test_verdicts_with_replayed_layers_are_the_same(name: str) -> None:
    model, tok = text_model(name), tokenizer()
    prompts = [tok(text, add_special_tokens=False)["input_ids"] for text in texts()]
    markers = markers_for(model)
    cache = layer_cache(model)
    kwargs = dict(max_new_tokens=8, decided_after=3, batch_size=3)
    generate_verdicts(model, tok, prompts, markers, layer_cache=cache, **kwargs)  # records
    edit_from(model, 1)
    expected = generate_verdicts(model, tok, prompts, markers, **kwargs)
    got = generate_verdicts(model, tok, prompts, markers, layer_cache=cache, **kwargs)
    assert got == expected
    assert any(v.refused for v in expected) and any(len(v.tokens) > 1 for v in expected)
    assert (cache.replayed_layers != []) == (name not in NOT_SHARED)


def test_the_first_edited_layer_bounds_the_replay_and_restore_frees_all() -> None:
    loaded = deep_llama()
    model_map = resolve(loaded.model)
    cache = layer_cache(loaded.model)
    plain = KLScorer(loaded, texts(), batch_size=4)
    cached = KLScorer(loaded, texts(), batch_size=4, layer_cache=cache)
    directions = torch.nn.functional.normalize(
        torch.randn(DEEP, model_map.hidden_size, dtype=torch.float64), dim=-1
    )
    strengths = {
        kind: torch.tensor([0, 0, 0, 1.0, 0.5, 0])
        for kind in {w.kind for w in model_map.writers[0]}
    }
    with apply_ablation(model_map, directions, strengths):  # hooks on layers 3 and 4
        assert cache.unchanged_layers() == 3
        expected, got = plain.per_prompt(), cached.per_prompt()
        assert torch.equal(got, expected) and float(expected.max()) > 1e-6
    assert cache.replayed_layers == [3, 3]
    assert cache.unchanged_layers() == DEEP  # the hooks are gone: every layer replays
    assert torch.equal(cached.per_prompt(), torch.zeros(len(texts())))
    assert cache.replayed_layers[-2:] == [DEEP, DEEP]
    assert list(loaded.model.model.layers) == model_map.layers  # the real layers are back


@pytest.mark.parametrize("what", ["layer 0", "embeddings"])
def test_an_edit_at_the_bottom_replays_nothing(what: str) -> None:
    loaded = deep_llama()
    cache = layer_cache(loaded.model)
    plain = KLScorer(loaded, texts(), batch_size=4)
    cached = KLScorer(loaded, texts(), batch_size=4, layer_cache=cache)
    if what == "layer 0":
        edit_from(loaded.model, 0)
    else:
        with torch.no_grad():
            loaded.model.get_input_embeddings().weight.mul_(1.01)
    assert cache.unchanged_layers() == 0
    assert torch.equal(cached.per_prompt(), plain.per_prompt())
    assert cache.replayed_layers == []


def test_a_small_budget_records_every_few_layers_and_a_tiny_one_none() -> None:
    loaded = deep_llama()
    full = layer_cache(loaded.model)
    KLScorer(loaded, texts(), batch_size=4, layer_cache=full)
    assert full.stride == 1
    kv_only = full.bytes - sum(
        t.numel() * 8 for e in full._entries.values() for t in e.hidden.values()
    )
    budget = kv_only + (full.bytes - kv_only) // 2  # room for half the hidden states
    halved = layer_cache(loaded.model, budget_bytes=budget)
    plain = KLScorer(loaded, texts(), batch_size=4)
    cached = KLScorer(loaded, texts(), batch_size=4, layer_cache=halved)
    assert halved.enabled and halved.stride == 2 and halved.bytes <= budget
    edit_from(loaded.model, 3)
    assert torch.equal(cached.per_prompt(), plain.per_prompt())
    assert halved.replayed_layers == [2, 2]  # layer 3's input is not kept: replay up to 2
    tiny = layer_cache(loaded.model, budget_bytes=kv_only // 2)
    KLScorer(loaded, texts(), batch_size=4, layer_cache=tiny)
    assert not tiny.enabled and "budget" in tiny.why_off and tiny.bytes == 0


def test_a_pass_on_an_edited_model_is_not_recorded_a_later_unedited_one_is() -> None:
    loaded = deep_llama()
    model_map = resolve(loaded.model)
    cache = layer_cache(loaded.model)  # built on the unedited model: that is the original
    kwargs = dict(markers=["w5"], max_new_tokens=4, batch_size=4)
    cached = RefusalScorer(loaded, texts(), layer_cache=cache, **kwargs)
    plain = RefusalScorer(loaded, texts(), **kwargs)
    directions = torch.nn.functional.normalize(
        torch.randn(DEEP, model_map.hidden_size, dtype=torch.float64), dim=-1
    )
    kinds = {w.kind for w in model_map.writers[0]}
    strengths = {kind: torch.tensor([0, 0, 1.0, 1.0, 0, 0]) for kind in kinds}
    with apply_ablation(model_map, directions, strengths):
        first = cached.evaluate()  # edited: runs plainly, records nothing
        assert cache._entries == {} and cache.replayed_layers == []
        assert first.verdicts == plain.evaluate().verdicts
    cached.evaluate()  # unedited: records every batch (and replays nothing yet)
    assert len(cache._entries) == 2 and cache.replayed_layers == []
    with apply_ablation(model_map, directions, strengths):
        assert cached.evaluate().verdicts == first.verdicts
    assert cache.replayed_layers == [2, 2]


def test_a_replay_that_raises_puts_the_real_layers_back() -> None:
    loaded = deep_llama()
    cache = layer_cache(loaded.model)
    KLScorer(loaded, texts(), batch_size=4, layer_cache=cache)
    layers = list(loaded.model.model.layers)

    def broken() -> None:
        assert loaded.model.model.layers[0] is not layers[0]  # a stand-in is in place
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        cache.run(0, broken)
    assert list(loaded.model.model.layers) == layers


# --- a run -------------------------------------------------------------------------------------

blasphemer = test_cli.blasphemer  # test_cli's fixtures, bound here so that pytest finds them
tiny_a = test_cli.tiny_a


def test_a_run_with_the_layer_cache_finds_the_same_trials(
    blasphemer: Callable[..., SimpleNamespace], tiny_a: Path, tmp_path: Path
) -> None:
    trials, outputs = {}, {}
    for mib in ("64", "0"):
        done = blasphemer(
            "run",
            tiny_a,
            *test_cli.FAST,
            "--n-trials",
            "4",
            "--layer-cache-mib",
            mib,
            "--run-dir",
            tmp_path / f"runs-{mib}",
            "--output-dir",
            tmp_path / f"out-{mib}",
            "--yes",
        )
        assert done.code == 0, done.err
        data = test_cli._results(tmp_path / f"out-{mib}")
        trials[mib] = [(t["number"], t["refusals"], t["kl"]) for t in data["trials"]]
        outputs[mib] = done.out
    assert trials["64"] == trials["0"] and len(trials["0"]) == 4
    assert "layer cache:" in outputs["64"] and "layer cache" not in outputs["0"]


def test_a_stand_in_answers_for_its_layers_attributes() -> None:
    loaded = deep_llama()
    cache = layer_cache(loaded.model)
    KLScorer(loaded, texts(), batch_size=4, layer_cache=cache)
    first = loaded.model.model.layers[0]
    first.attention_type = "full_attention"  # what some models' layer loops read

    def look() -> str:
        stand_in = loaded.model.model.layers[0]
        assert stand_in is not first and not list(stand_in.parameters())
        return str(stand_in.attention_type)

    assert cache.run(0, look) == "full_attention"
