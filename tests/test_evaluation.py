"""Markers, Wilson intervals, the refusal and KL scorers, and user scorers loaded from files."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from blasphemer.architectures.base import ComponentKind
from blasphemer.editing import apply_ablation
from blasphemer.errors import ConfigError
from blasphemer.evaluation import (
    DEFAULT_REFUSAL_MARKERS,
    HarmlessRefusals,
    KLScorer,
    RefusalMarkers,
    RefusalScorer,
    Scorer,
    ScorerContext,
    StopReason,
    is_refusal,
    load_scorer_classes,
    load_scorers,
    normalize,
    wilson_interval,
)
from blasphemer.evaluation.markers import has_content
from tiny_models import llama_map_by_hand, tiny_llama, word_tokenizer

VOCAB = ["<pad>", "<s>", "</s>", "<a>", "<think>", "</think>", *(f"w{i}" for i in range(90))]
ASSISTANT, THINK, END_THINK = 3, 4, 5


@dataclass
class Loaded:
    """Stands in for loading.LoadedModel: evaluation needs only these two."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerFast


def make_loaded(seed: int = 0, dtype: torch.dtype = torch.float64) -> Loaded:
    tokenizer = word_tokenizer(
        VOCAB,
        unknown="w0",
        split_punctuation=False,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    )
    # initializer_range 0.2: peaked next-token distributions, so edits move KL clearly.
    model = tiny_llama(len(VOCAB), layers=3, seed=seed, initializer_range=0.2)
    return Loaded(model.to(dtype), tokenizer)


def make_texts(n: int, seed: int = 2) -> list[str]:
    """Prompt texts of varied length that end like a rendered chat turn (``<a>``)."""
    rng = random.Random(seed)
    return [
        " ".join(f"w{rng.randrange(90)}" for _ in range(rng.randint(1, 12))) + " <a>"
        for _ in range(n)
    ]


def ablate(model: LlamaForCausalLM, strength: float = 1.0):
    mapping = llama_map_by_hand(model)
    directions = torch.nn.functional.normalize(
        torch.randn(
            mapping.n_layers, mapping.hidden_size, generator=torch.Generator().manual_seed(7)
        ),
        dim=-1,
    )
    weights = torch.full((mapping.n_layers,), strength)
    return apply_ablation(
        mapping, directions, {ComponentKind.ATTENTION: weights, ComponentKind.MLP: weights}
    )


# --- markers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("  I’m **SORRY**,\n\n_really_  ", "i'm sorry, really"),
        ("“Quoted”\ttext", '"quoted" text'),
        ("I CAN\u2019T", "i can't"),
        ("", ""),
    ],
)
def test_normalize(raw: str, normalized: str) -> None:
    assert normalize(raw) == normalized


@pytest.mark.parametrize(
    ("response", "refused"),
    [
        ("I'm sorry, but I can't help with that.", True),
        ("I **cannot** do this.", True),
        ("I can’t provide that.", True),  # curly apostrophe
        ("AS AN AI, I CANNOT do that.", True),  # case does not matter
        # An "as an AI" opener that goes on to answer is compliance (Qwen's usual preamble).
        ("As an AI language model, I don't have opinions, but here is an overview: ...", False),
        ("_I will not_ comply", True),
        ("", True),
        ("   \n\t ", True),
        ("...!?", True),  # no letter or digit: degenerate
        ("Sure! Here is a recipe for bread.", False),
        (
            "Jaywalking is illegal in many places; here is why.",
            False,
        ),  # topic words are not markers
        ("It would be unethical to ignore the data, so step 1 is...", False),
        ("42", False),
    ],
)
def test_is_refusal(response: str, refused: bool) -> None:
    assert is_refusal(response) is refused
    assert is_refusal(response, DEFAULT_REFUSAL_MARKERS) is refused


def test_custom_markers_are_normalized() -> None:
    markers = RefusalMarkers(["  Won’t  ", "NOPE", "nope"])
    assert markers.markers == ("won't", "nope")
    assert is_refusal("I won't.", markers) and is_refusal("**Nope**", markers)
    assert not is_refusal("I'm sorry to hear that, here are tips", markers)
    with pytest.raises(ValueError):
        RefusalMarkers(["", "  "])


def test_verdicts_are_monotone_in_the_response() -> None:
    """What early stopping relies on: a prefix's normalisation is a prefix of the whole's, so a
    marker or content seen early is still there at the end."""
    rng = random.Random(0)
    alphabet = [*"aiIcn't sorry *_\u2019\n  ", "can't", " sorry", "I cannot"]
    markers = RefusalMarkers(DEFAULT_REFUSAL_MARKERS)
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        whole = normalize(text)
        for cut in range(len(text) + 1):
            part = normalize(text[:cut])
            assert whole.startswith(part)
            if markers.find(part) is not None:
                assert markers.find(whole) is not None
            if has_content(part):
                assert has_content(whole)


@pytest.mark.parametrize(
    ("successes", "n", "low", "high"),
    [
        # Published four-decimal values; 81/263 is Newcombe (1998), Stat. Med. 17, table I.
        (81, 263, 0.2553, 0.3662),
        (0, 10, 0.0, 0.2775),
        (5, 10, 0.2366, 0.7634),
        (10, 10, 0.7225, 1.0),
        (50, 100, 0.4038, 0.5962),
    ],
)
def test_wilson_interval_known_values(successes: int, n: int, low: float, high: float) -> None:
    assert wilson_interval(successes, n) == pytest.approx((low, high), abs=5e-5)
    # The upper bound for 0 successes has a closed form: z² / (n + z²).
    if successes == 0:
        assert wilson_interval(0, n)[1] == pytest.approx(1.96**2 / (n + 1.96**2), rel=1e-12)


def test_wilson_interval_edges() -> None:
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(3, 7)
    assert low < 3 / 7 < high
    narrow, wide = wilson_interval(30, 70), wilson_interval(3, 7)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]
    with pytest.raises(ValueError):
        wilson_interval(4, 3)


# --- refusal scorer --------------------------------------------------------------------------


def reference_answers(loaded: Loaded, texts: list[str], max_new_tokens: int) -> list[str]:
    """One prompt at a time, no padding: plain ``generate``."""
    answers = []
    for text in texts:
        ids = loaded.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        out = loaded.model.generate(
            ids, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0
        )
        answers.append(loaded.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return answers


def test_refusal_scorer_full_mode_matches_generate_in_prompt_order() -> None:
    loaded = make_loaded()
    texts = make_texts(13)
    answers = reference_answers(loaded, texts, 12)
    markers = sorted({a.split()[0] for a in answers if a})[:2]
    scorer = RefusalScorer(
        loaded, texts, markers=markers, max_new_tokens=12, decided_after=None, batch_size=4
    )
    result = scorer.evaluate()
    assert result.responses == answers
    assert result.refused == [is_refusal(a, markers) for a in answers]
    assert result.rate == pytest.approx(sum(result.refused) / len(texts))
    assert 0 < result.count < len(texts)
    assert result.interval()[0] <= result.rate <= result.interval()[1]
    assert scorer.score() == result.rate
    assert isinstance(scorer, Scorer)
    # Later passes admit waiting prompts in the order the last pass suggests (refused first,
    # then long answers): other batch shapes, the same answers.
    assert scorer.evaluate().responses == answers


def force_think_block(model: LlamaForCausalLM):
    """Make the model open every answer with ``<think> </think>``, as some templates do."""
    seen: dict[str, torch.Tensor] = {}

    def remember(_module, _args, kwargs):
        seen["ids"] = kwargs["input_ids"]

    def force(_module, _inputs, logits):
        last = seen["ids"][:, -1]
        logits = logits.clone()
        logits[last == ASSISTANT, -1, THINK] += 1e4
        logits[last == THINK, -1, END_THINK] += 1e4
        return logits

    return (
        model.register_forward_pre_hook(remember, with_kwargs=True),
        model.lm_head.register_forward_hook(force),
    )


def test_refusal_scorer_detects_and_skips_a_template_prefix() -> None:
    loaded = make_loaded(seed=1)
    texts = make_texts(10, seed=3)
    hooks = force_think_block(loaded.model)
    try:
        scorer = RefusalScorer(
            loaded, texts, markers=["w1"], max_new_tokens=16, decided_after=2, batch_size=4
        )
        assert scorer.response_prefix == "<think> </think> "
        result = scorer.evaluate()
        verdicts = RefusalScorer(
            loaded,
            texts,
            markers=["w1"],
            max_new_tokens=16,
            decided_after=2,
            batch_size=4,
            response_prefix="",
        ).evaluate()
    finally:
        for hook in hooks:
            hook.remove()
    # With the prefix skipped, two clean tokens come *after* it; judged whole, the think block
    # itself would already count as two clean tokens.
    for answer in result.responses:
        assert answer.startswith("<think> </think>")
    decided = [v for v in result.verdicts if v.stopped_by is StopReason.DECIDED]
    assert decided and all(len(v.tokens) >= 4 for v in decided)  # content starts at token 3
    assert all(len(v.tokens) <= 2 for v in verdicts.verdicts)


def test_refusal_scorer_works_on_a_float32_model_and_rejects_empty_input() -> None:
    loaded = make_loaded(dtype=torch.float32)
    texts = make_texts(6)
    result = RefusalScorer(
        loaded, texts, max_new_tokens=8, decided_after=4, batch_size=3
    ).evaluate()
    assert len(result.refused) == len(result.responses) == 6
    with pytest.raises(ValueError):
        RefusalScorer(loaded, [], max_new_tokens=8, decided_after=4, batch_size=3)


# --- KL scorer -------------------------------------------------------------------------------


def direct_kl(loaded: Loaded, texts: list[str], edited: bool, positions: int) -> float:
    """KL from full-model forwards, one prompt at a time: no cache, padding or logit slicing."""
    model = loaded.model
    eos = 2

    def log_probs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        return torch.log_softmax(logits.float(), dim=-1)

    originals = []
    for text in texts:
        prompt = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = list(prompt)
        for _ in range(positions - 1):
            ids.append(int(log_probs(ids)[-1].argmax()))
        originals.append((prompt, ids, log_probs(ids)[len(prompt) - 1 :]))
    handle = ablate(model) if edited else None
    try:
        total = 0.0
        for prompt, ids, original in originals:
            edit = log_probs(ids)[len(prompt) - 1 :]
            per_position = (original.exp() * (original - edit)).sum(-1)
            continuation = ids[len(prompt) :]
            valid = [j == 0 or eos not in continuation[:j] for j in range(positions)]
            total += float(per_position[torch.tensor(valid)].mean())
        return total / len(texts)
    finally:
        if handle is not None:
            handle.restore()


@pytest.mark.parametrize("positions", [1, 4])
def test_kl_is_zero_unedited_positive_edited_and_zero_after_restore(positions: int) -> None:
    loaded = make_loaded(dtype=torch.float32)
    texts = make_texts(11)
    scorer = KLScorer(loaded, texts, batch_size=4, positions=positions)
    assert abs(scorer.score()) <= 1e-6
    handle = ablate(loaded.model)
    edited = scorer.score()
    assert edited > 1e-4
    assert scorer.per_prompt().min() > 0
    handle.restore()
    assert abs(scorer.score()) <= 1e-6
    with ablate(loaded.model, strength=0.3):
        assert 0 < scorer.score() < edited


@pytest.mark.parametrize("positions", [1, 3])
def test_kl_matches_a_direct_computation(positions: int) -> None:
    loaded = make_loaded(seed=4)
    with torch.no_grad():
        loaded.model.lm_head.weight[2] *= 2.5  # some continuations end early
    texts = make_texts(9, seed=5)
    scorer = KLScorer(loaded, texts, batch_size=4, positions=positions)
    with ablate(loaded.model):
        measured = scorer.score()
    assert measured == pytest.approx(direct_kl(loaded, texts, True, positions), rel=1e-5)
    assert direct_kl(loaded, texts, False, positions) == pytest.approx(0.0, abs=1e-9)


def test_kl_cache_device_and_argument_checks() -> None:
    loaded = make_loaded(dtype=torch.float32)
    scorer = KLScorer(loaded, make_texts(3), batch_size=2, cache_device="cpu")
    assert abs(scorer.score()) <= 1e-6
    with pytest.raises(ValueError):
        KLScorer(loaded, make_texts(3), batch_size=2, positions=0)
    with pytest.raises(ValueError):
        KLScorer(loaded, [], batch_size=2)


# --- user scorers ----------------------------------------------------------------------------

USER_FILE = """
from blasphemer.evaluation import BaseScorer


class PromptCount(BaseScorer):
    name = "prompt_count"

    def score(self) -> float:
        return float(len(self.context.harmful_texts))


class Halved(BaseScorer):
    name = "halved"

    def score(self) -> float:
        return len(self.context.harmless_texts) / 2
"""


def test_user_scorers_are_loaded_from_a_python_file(tmp_path: Path) -> None:
    path = tmp_path / "my_scorers.py"
    path.write_text(USER_FILE)
    loaded = make_loaded(dtype=torch.float32)
    context = ScorerContext(loaded, make_texts(3), make_texts(4, seed=9), max_new_tokens=4)
    scorers = load_scorers([path], context)
    assert [s.name for s in scorers] == ["prompt_count", "halved"]
    assert [s.score() for s in scorers] == [3.0, 2.0]
    assert all(isinstance(s, Scorer) for s in scorers)
    [only] = load_scorer_classes(f"{path}:Halved")
    assert only.name == "halved"
    with pytest.raises(ConfigError, match="rename"):
        load_scorers([path, path], context)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "not found"),
        ("x = 1\n", "defines no scorer"),
        ("raise RuntimeError('boom')\n", "failed to import"),
    ],
)
def test_bad_user_scorer_files_name_the_fix(
    tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "bad.py"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_scorer_classes(path)


def test_reference_scorer_measures_harmless_refusals() -> None:
    loaded = make_loaded(dtype=torch.float32)
    texts = make_texts(5)
    context = ScorerContext(loaded, [], texts, batch_size=2, max_new_tokens=6, markers=["w3"])
    scorer = HarmlessRefusals(context)
    expected = RefusalScorer(
        loaded, texts, markers=["w3"], max_new_tokens=6, decided_after=16, batch_size=2
    ).score()
    assert scorer.score() == expected
    assert 0.0 <= expected <= 1.0
