"""The shared-prefix cache: same tokens, verdicts and KL as running every prompt whole.

Every tiny architecture is checked in float64 (no arg-max near-ties), with prompts that share a
template-like prefix and differ in length after it (so the batch has a padding hole between the
prefix and the prompt), under an edit made after the scorer was built.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn
from transformers import PreTrainedTokenizerFast

from blasphemer.architectures import resolve
from blasphemer.evaluation import KLScorer
from blasphemer.evaluation.decoding import ForwardSpec, top_tokens
from blasphemer.evaluation.generation import (
    generate_verdicts,
    greedy_tokens,
    shared_prefix,
)
from blasphemer.evaluation.markers import RefusalMarkers
from blasphemer.evaluation.prefix import MIN_PREFIX, split_prefix
from blasphemer.loading import LoadedModel
from blasphemer.residuals import mean_residuals
from tiny_models import TINY, VOCAB, auto_class, build_tiny, word_tokenizer

WORDS = ["<pad>", "<s>", "</s>", *(f"w{i}" for i in range(3, VOCAB))]
PREFIX = "<s> w10 w11 w12 w13 w14 w15"  # 7 shared tokens, like a template's system turn
# Architectures whose cache cannot be shared, so prompts run whole: a recurrent layer, or a
# sliding window (8 in the tiny configs) shorter than a batch's span. "@wide" widens the window.
NOT_SHARED = {"qwen3_next", "gemma2", "gemma3_text", "gpt_oss"}
WIDE = "@wide"


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: PreTrainedTokenizerFast


def tokenizer() -> PreTrainedTokenizerFast:
    return word_tokenizer(WORDS, unknown="w3", pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def texts(n: int = 7, seed: int = 0) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for length in torch.randint(1, 9, (n,), generator=generator).tolist():
        words = torch.randint(20, VOCAB, (length,), generator=generator).tolist()
        rows.append(PREFIX + " " + " ".join(f"w{w}" for w in words))
    return rows


def text_model(name: str) -> nn.Module:
    if name.endswith(WIDE):
        base = name.removesuffix(WIDE)
        config = TINY[base].config()
        config.sliding_window = 64
        torch.manual_seed(0)
        model = auto_class(base).from_config(config, dtype=torch.float32).eval()
    else:
        model = build_tiny(name)
    if getattr(model, "_can_set_experts_implementation", lambda: False)():
        model.set_experts_implementation("eager")  # grouped_mm has no float64 kernel
    if name.startswith("gemma2"):
        # Gemma 2's eager attention turns left-padded rows into NaN in float64 (with or
        # without a shared prefix); in float32 batched rows equal unbatched ones.
        return model
    return model.double()


def edit(model: nn.Module) -> None:
    """A change of every weight matrix (what an ablation does to some of them)."""
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 2:
                noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
                parameter.add_(0.05 * parameter.std() * noise)


CASES = sorted(name for name, case in TINY.items() if not case.multimodal)
CASES += ["gemma2" + WIDE, "gemma3_text" + WIDE, "gpt_oss" + WIDE]


def test_split_prefix_is_exact_and_leaves_every_prompt_a_token() -> None:
    shared = split_prefix([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 7, 8], [1, 2, 3, 4, 5, 6, 9]])
    assert shared.prefix == (1, 2, 3, 4, 5)
    assert shared.suffixes == [[6], [7, 8], [6, 9]]
    # A prompt that *is* the shared run keeps its last token.
    shared = split_prefix([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6, 7]])
    assert shared.prefix == (1, 2, 3, 4, 5) and shared.suffixes == [[6], [6, 7]]
    # Too short, disabled, or a single prompt: nothing is split off.
    short = [[1, 2, 3, 9], [1, 2, 3, 8]]
    assert MIN_PREFIX > 3 and split_prefix(short).prefix == ()
    assert split_prefix([[1, 2, 3, 4, 5, 6]] * 2, enabled=False).prefix == ()
    assert split_prefix([[1, 2, 3, 4, 5, 6]]).prefix == ()


@pytest.mark.parametrize("name", CASES)
def test_prefix_is_shared_for_attention_caches_only(name: str) -> None:
    model = text_model(name)
    prompts = [tokenizer()(text, add_special_tokens=False)["input_ids"] for text in texts()]
    with torch.inference_mode():
        suffixes, state = shared_prefix(model, ForwardSpec.of(model), prompts, True, 8)
    if name in NOT_SHARED:
        assert state is None and suffixes == prompts
    else:
        assert state is not None and state.length == 7
        assert all(p[7:] == s for p, s in zip(prompts, suffixes, strict=True))


@pytest.mark.parametrize("name", CASES)
def test_greedy_tokens_and_verdicts_equal_whole_prompts(name: str) -> None:
    model, tok = text_model(name), tokenizer()
    edit(model)
    prompts = [tok(text, add_special_tokens=False)["input_ids"] for text in texts()]
    # The reference: every prompt alone, nothing padded, nothing shared.
    alone = [greedy_tokens(model, [p], 8, batch_size=1, share_prefix=False)[0] for p in prompts]
    whole = greedy_tokens(model, prompts, 8, batch_size=3, pad_id=0, share_prefix=False)
    shared = greedy_tokens(model, prompts, 8, batch_size=3, pad_id=0, share_prefix=True)
    assert whole == alone
    assert shared == alone
    # Markers among the words the model writes, so that some answers are refused mid-way.
    words = sorted({row[2] for row in alone[::2] if row[2] > 2})
    markers = RefusalMarkers([f"w{w}" for w in words])
    kwargs = dict(max_new_tokens=8, decided_after=3, batch_size=3)
    # Batches refilled from the next (where the cache can be merged) and batch after batch.
    runs = [
        generate_verdicts(model, tok, prompts, markers, share_prefix=share, refill=refill, **kwargs)
        for share in (False, True)
        for refill in (False, True)
    ]
    assert all(other == runs[0] for other in runs[1:])
    assert any(v.refused for v in runs[0])
    full = generate_verdicts(
        model, tok, prompts, markers, max_new_tokens=8, decided_after=None, batch_size=3
    )
    assert [list(v.tokens) for v in full] == [_until(row, 2) for row in alone]


@pytest.mark.parametrize("positions", [1, 3])
@pytest.mark.parametrize("name", CASES)
def test_kl_equals_whole_prompts_after_an_edit(name: str, positions: int) -> None:
    loaded = Loaded(text_model(name), tokenizer())
    scorers = [
        KLScorer(loaded, texts(), batch_size=3, positions=positions, share_prefix=share)
        for share in (False, True)
    ]
    for scorer in scorers:
        assert abs(scorer.score()) < 1e-9  # the prefix path's original log-probs are its own
    edit(loaded.model)
    whole, shared = (scorer.per_prompt() for scorer in scorers)
    assert float(whole.max()) > 1e-6  # the edit changed the answers' distributions
    double = next(loaded.model.parameters()).dtype == torch.float64
    tolerance = dict(rtol=1e-7, atol=1e-12) if double else dict(rtol=5e-3, atol=1e-6)
    torch.testing.assert_close(shared, whole, **tolerance)


@pytest.mark.parametrize("name", CASES)
def test_residual_means_equal_whole_prompts(name: str) -> None:
    model = text_model(name)
    tok = tokenizer()
    tok.padding_side = "left"
    dtype = next(model.parameters()).dtype
    loaded = LoadedModel(model, tok, "tiny", None, dtype)
    model_map = resolve(model)
    alone = mean_residuals(loaded, model_map, texts(), batch_size=1, share_prefix=False)
    shared = mean_residuals(loaded, model_map, texts(), batch_size=3, share_prefix=True)
    double = dtype == torch.float64
    tolerance = dict(rtol=1e-9, atol=1e-10) if double else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(shared.means, alone.means, **tolerance)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_top_tokens_equal_argmax_with_ties_and_nan(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    # Values rounded to a few levels, so most rows hold the largest value several times.
    logits = (torch.randn(7, 3, 1000, generator=generator) * 2).round().to(dtype)
    logits[0, 0, 10] = logits[0, 0, 900] = 1e4  # a tie far apart: the first one wins
    logits[1, 2, 500] = logits[1, 2, 20] = float("nan")  # NaN counts as largest, first NaN
    got = top_tokens(logits)
    assert torch.equal(got, logits.argmax(dim=-1))
    assert got[0, 0] == 10 and got[1, 2] == 20
    assert got.dtype == torch.int64 and got.shape == (7, 3)


def _until(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos)] if eos in tokens else tokens
