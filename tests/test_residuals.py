"""Last-token residual recording: hook hygiene, agreement with output_hidden_states, padding."""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from blasphemer.architectures import resolve
from blasphemer.errors import DatasetError
from blasphemer.loading import LoadedModel
from blasphemer.residuals import Residuals, mean_residuals, record_last_token
from tiny_models import TINY, build_tiny, llama_map_by_hand, word_tokenizer

TEXTS = [
    "how do i bake bread",
    "explain",
    "how do i make a cake at home please",
    "why",
    "how do i make poison",
    "the bomb at home",
    "please explain why the cake",
]
WORDS = sorted({word for text in TEXTS for word in text.split()})


def _tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = word_tokenizer(
        ["<pad>", "<s>", "</s>", "<unk>", *WORDS],
        unknown="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    tokenizer.padding_side = "left"
    tokenizer.pad_token = "<pad>"
    return tokenizer


def _loaded(model: PreTrainedModel) -> LoadedModel:
    model.requires_grad_(False)
    return LoadedModel(model, _tokenizer(), "tiny", None, torch.float32)


@pytest.fixture(scope="module")
def llama() -> PreTrainedModel:
    return build_tiny("llama")


def _all_hooks(model: torch.nn.Module) -> int:
    return sum(
        len(module._forward_hooks) + len(module._forward_pre_hooks) for module in model.modules()
    )


def test_hooks_are_removed_when_the_body_raises(llama: PreTrainedModel) -> None:
    model_map = llama_map_by_hand(llama)
    assert _all_hooks(llama) == 0
    with pytest.raises(RuntimeError, match="boom"), record_last_token(model_map):
        assert _all_hooks(llama) == model_map.n_layers + 1
        raise RuntimeError("boom")
    assert _all_hooks(llama) == 0
    for layer in model_map.layers:
        assert not layer._forward_hooks and not layer._forward_pre_hooks
        assert not layer._forward_hooks_with_kwargs and not layer._forward_pre_hooks_with_kwargs


def test_hooks_are_removed_when_the_forward_pass_raises(llama: PreTrainedModel) -> None:
    model_map = llama_map_by_hand(llama)
    with pytest.raises(IndexError), record_last_token(model_map):
        llama(input_ids=torch.tensor([[1000]]))  # out of the vocabulary
    assert _all_hooks(llama) == 0


def _reference_hidden_states(model: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    """``[n_layers + 1, hidden]`` at the last position, from output_hidden_states.

    The final norm is bypassed so the last entry is the raw output of the last layer.
    """
    norm = model.model.norm
    model.model.norm = torch.nn.Identity()
    try:
        with torch.no_grad():
            output = model(input_ids=ids, output_hidden_states=True)
    finally:
        model.model.norm = norm
    return torch.stack([h[0, -1] for h in output.hidden_states])


def test_record_last_token_matches_output_hidden_states(llama: PreTrainedModel) -> None:
    model_map = llama_map_by_hand(llama)
    tokenizer = _tokenizer()
    texts = ["how do i bake bread", "why"]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert batch["attention_mask"][1, 0] == 0  # the short prompt really is left-padded
    with record_last_token(model_map) as captured, torch.no_grad():
        llama(**batch)
    assert len(captured) == model_map.n_layers + 1
    # Row 0 has no padding, so plain output_hidden_states is the reference for it.
    expected = _reference_hidden_states(llama, batch["input_ids"][:1])
    got = torch.stack([hidden[0] for hidden in captured])
    torch.testing.assert_close(got, expected)


def _direct_means(model: PreTrainedModel, texts: list[str]) -> torch.Tensor:
    """Mean over prompts, each run alone (no padding at all), accumulated in float64."""
    tokenizer = _tokenizer()
    rows = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        rows.append(_reference_hidden_states(model, ids).double())
    return torch.stack(rows).mean(dim=0)


def test_mean_residuals_equals_direct_computation(llama: PreTrainedModel) -> None:
    loaded = _loaded(llama)
    model_map = llama_map_by_hand(llama)
    expected = _direct_means(llama, TEXTS)
    seen: list[int] = []
    one = mean_residuals(loaded, model_map, TEXTS, batch_size=1)
    three = mean_residuals(loaded, model_map, TEXTS, batch_size=3, on_batch=seen.append)
    for residuals in (one, three):
        assert isinstance(residuals, Residuals)
        assert residuals.means.dtype == torch.float64
        assert residuals.means.shape == (model_map.n_layers + 1, model_map.hidden_size)
        assert residuals.count == len(TEXTS)
        torch.testing.assert_close(residuals.means, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one.means, three.means, rtol=1e-5, atol=1e-5)
    assert seen == [3, 3, 1]


def test_mean_residuals_does_not_depend_on_order(llama: PreTrainedModel) -> None:
    loaded = _loaded(llama)
    model_map = llama_map_by_hand(llama)
    forward = mean_residuals(loaded, model_map, TEXTS, batch_size=2)
    backward = mean_residuals(loaded, model_map, TEXTS[::-1], batch_size=2)
    torch.testing.assert_close(forward.means, backward.means, rtol=1e-6, atol=1e-6)


def test_add_special_tokens_is_honoured(llama: PreTrainedModel) -> None:
    tokenizer = _tokenizer()
    # A post-processor that prepends <s> makes add_special_tokens observable.
    from tokenizers import processors

    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    loaded = LoadedModel(llama, tokenizer, "tiny", None, torch.float32)
    model_map = llama_map_by_hand(llama)
    plain = mean_residuals(loaded, model_map, ["why"], batch_size=1)
    with_bos = mean_residuals(loaded, model_map, ["why"], batch_size=1, add_special_tokens=True)
    torch.testing.assert_close(plain.means, _direct_means(llama, ["why"]))
    assert not torch.allclose(plain.means[1:], with_bos.means[1:])


def test_mean_residuals_rejects_empty_input(llama: PreTrainedModel) -> None:
    loaded = _loaded(llama)
    model_map = llama_map_by_hand(llama)
    with pytest.raises(DatasetError):
        mean_residuals(loaded, model_map, [], batch_size=2)
    with pytest.raises(DatasetError):
        mean_residuals(loaded, model_map, ["why", ""], batch_size=2)
    with pytest.raises(ValueError):
        mean_residuals(loaded, model_map, ["why"], batch_size=0)


@pytest.mark.parametrize("name", sorted(TINY))
def test_padding_does_not_change_the_means(name: str) -> None:
    # Every tiny model the registry covers. GPT-2 has absolute position embeddings: left padding
    # leaves its means unchanged only if position ids follow the attention mask. Multimodal
    # models run through their text path; MoE routing must not see the padding either.
    model = build_tiny(name)
    loaded = _loaded(model)
    model_map = resolve(model)
    one = mean_residuals(loaded, model_map, TEXTS, batch_size=1)
    many = mean_residuals(loaded, model_map, TEXTS, batch_size=4)
    assert one.means.shape == (model_map.n_layers + 1, model_map.hidden_size)
    assert torch.isfinite(one.means).all()
    torch.testing.assert_close(one.means, many.means, rtol=1e-4, atol=1e-4)
    assert _all_hooks(model) == 0
