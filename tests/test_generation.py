"""Early-stopping generation: equivalence with ``model.generate`` and with the documented rule.

Everything runs on tiny random models built from configs, with a word-level tokenizer, so that
decoded answers are space-separated words and "refusal markers" can be chosen among the words
the random model actually writes (some answers refused, some not, at various positions).
"""

from __future__ import annotations

from collections import Counter
from itertools import pairwise

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
)

from blasphemer.evaluation.generation import (
    StopReason,
    Verdict,
    encode_texts,
    generate_verdicts,
    greedy_tokens,
    length_sorted_batches,
)
from blasphemer.evaluation.markers import (
    RefusalMarkers,
    common_response_prefix,
    has_content,
    normalize,
    strip_response_prefix,
)
from tiny_models import tiny_llama, word_tokenizer

VOCAB = ["<pad>", "<s>", "</s>", *(f"w{i}" for i in range(100))]
MAX_NEW = 20


def make_tokenizer() -> PreTrainedTokenizerFast:
    return word_tokenizer(
        VOCAB,
        unknown="w0",
        split_punctuation=False,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    )


def make_llama(seed: int = 0, eos_boost: float = 2.0) -> LlamaForCausalLM:
    """Tiny random Llama in float64 (no arg-max near-ties); EOS made likely for some prompts."""
    model = tiny_llama(len(VOCAB), seed=seed).double()
    with torch.no_grad():
        model.lm_head.weight[2] *= eos_boost
    return model


def make_mistral(
    sliding_window: int, max_positions: int = 256, eos_boost: float = 1.0
) -> MistralForCausalLM:
    """Tiny random Mistral in float64 with a sliding-window attention cache of that width."""
    config = MistralConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=sliding_window,
        max_position_embeddings=max_positions,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(3)
    model = MistralForCausalLM(config).eval().double()
    with torch.no_grad():
        model.lm_head.weight[2] *= eos_boost
    return model


def make_texts(n: int, seed: int = 1) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 14, (n,), generator=generator).tolist()
    return [
        " ".join(f"w{int(i)}" for i in torch.randint(3, 100, (length,), generator=generator))
        for length in lengths
    ]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    return make_llama()


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return make_texts(32)


def hf_generate(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, texts: list[str]):
    """Reference: plain ``model.generate`` greedy on all prompts in one left-padded batch."""
    batch = tokenizer(
        texts, padding=True, padding_side="left", return_tensors="pt", add_special_tokens=False
    )
    output = model.generate(**batch, do_sample=False, max_new_tokens=MAX_NEW, pad_token_id=0)
    tokens = []
    for row in output[:, batch["input_ids"].shape[1] :].tolist():
        tokens.append(row[: row.index(2)] if 2 in row else row)
    texts_out = tokenizer.batch_decode(tokens, skip_special_tokens=True)
    return tokens, texts_out


def pick_markers(responses: list[str]) -> RefusalMarkers:
    """Words that some answers contain and others do not, so both verdicts occur."""
    counts = Counter(word for text in responses for word in set(text.split()))
    n = len(responses)
    chosen = [word for word, count in counts.most_common() if 0.15 * n <= count <= 0.5 * n][:3]
    assert chosen, "the random model wrote no usable marker words"
    return RefusalMarkers(chosen)


def expected_early(
    full: list[int],
    tokenizer: PreTrainedTokenizerFast,
    markers: RefusalMarkers,
    decided_after: int,
    prefix: str = "",
) -> tuple[int, bool]:
    """The documented rule, computed from the full-length answer: (tokens kept, refused)."""
    start = None
    for k in range(1, len(full) + 1):
        judged = normalize(strip_response_prefix(tokenizer.decode(full[:k]), prefix))
        if markers.find(judged) is not None:
            return k, True
        if start is None and has_content(judged):
            start = k
        if start is not None and k == start + decided_after - 1:
            return k, False
    judged = normalize(strip_response_prefix(tokenizer.decode(full), prefix))
    return len(full), markers.refuses(judged)


def run(model, tokenizer, texts, markers, **kwargs) -> list[Verdict]:
    kwargs.setdefault("max_new_tokens", MAX_NEW)
    kwargs.setdefault("batch_size", 8)
    return generate_verdicts(model, tokenizer, encode_texts(tokenizer, texts), markers, **kwargs)


def test_length_sorted_batches_cover_every_index_once() -> None:
    lengths = [3, 9, 1, 9, 5, 2, 7]
    batches = length_sorted_batches(lengths, 3)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    flat = [lengths[i] for batch in batches for i in batch]
    assert flat == sorted(lengths, reverse=True)
    assert [len(batch) for batch in batches] == [3, 3, 1]


@pytest.mark.parametrize("batch_size", [1, 3, 8, 64])
def test_full_mode_equals_model_generate(llama, tokenizer, texts, batch_size) -> None:
    tokens, responses = hf_generate(llama, tokenizer, texts)
    markers = pick_markers(responses)
    verdicts = run(llama, tokenizer, texts, markers, decided_after=None, batch_size=batch_size)
    assert [list(v.tokens) for v in verdicts] == tokens
    assert [v.text for v in verdicts] == responses
    assert [v.refused for v in verdicts] == [markers.refuses(normalize(r)) for r in responses]
    assert all(v.stopped_by in (StopReason.EOS, StopReason.LENGTH) for v in verdicts)
    # The fixture must exercise both verdicts and both endings, or this test proves little.
    assert 0 < sum(v.refused for v in verdicts) < len(verdicts)
    assert {v.stopped_by for v in verdicts} == {StopReason.EOS, StopReason.LENGTH}


def test_stop_at_marker_keeps_full_mode_verdicts(llama, tokenizer, texts) -> None:
    _, responses = hf_generate(llama, tokenizer, texts)
    markers = pick_markers(responses)
    full = run(llama, tokenizer, texts, markers, decided_after=None)
    stopped = run(llama, tokenizer, texts, markers, decided_after=None, stop_at_marker=True)
    assert [v.refused for v in stopped] == [v.refused for v in full]
    for short, whole in zip(stopped, full, strict=True):
        assert list(short.tokens) == list(whole.tokens)[: len(short.tokens)]
    assert any(v.stopped_by is StopReason.MARKER for v in stopped)
    assert sum(len(v.tokens) for v in stopped) < sum(len(v.tokens) for v in full)


@pytest.mark.parametrize("decided_after", [1, 3, 7])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_early_verdicts_follow_the_documented_rule(
    llama, tokenizer, texts, decided_after, batch_size
) -> None:
    tokens, responses = hf_generate(llama, tokenizer, texts)
    markers = pick_markers(responses)
    early = run(
        llama, tokenizer, texts, markers, decided_after=decided_after, batch_size=batch_size
    )
    for verdict, full, response in zip(early, tokens, responses, strict=True):
        kept, refused = expected_early(full, tokenizer, markers, decided_after)
        assert list(verdict.tokens) == full[:kept]
        assert verdict.refused == refused
        full_refused = markers.refuses(normalize(response))
        # One-sided: an early refusal is always a full-length refusal ...
        if verdict.refused:
            assert full_refused
        # ... and they agree whenever the full answer's marker (if any) came within the window.
        if not full_refused or verdict.stopped_by is not StopReason.DECIDED:
            assert verdict.refused == full_refused
    outcomes = {v.stopped_by for v in early}
    assert StopReason.MARKER in outcomes and StopReason.DECIDED in outcomes


def test_early_stop_with_a_response_prefix(llama, tokenizer, texts) -> None:
    tokens, responses = hf_generate(llama, tokenizer, texts)
    markers = pick_markers(responses)
    # Pretend the first two words of the longest answer are template text: answers that start
    # with them are judged after them, the rest are judged whole.
    longest = max(tokens, key=len)
    prefix = tokenizer.decode(longest[:2]) + " "
    early = run(llama, tokenizer, texts, markers, decided_after=3, response_prefix=prefix)
    for verdict, full in zip(early, tokens, strict=True):
        kept, refused = expected_early(full, tokenizer, markers, 3, prefix)
        assert (len(verdict.tokens), verdict.refused) == (kept, refused)


def test_decided_rows_leave_the_batch(llama, tokenizer, texts) -> None:
    """Early stopping must really shrink the batch, not just mask finished rows."""
    _, responses = hf_generate(llama, tokenizer, texts)
    markers = pick_markers(responses)
    rows_per_call: list[int] = []

    def count(_module, args, kwargs):
        rows_per_call.append(int(kwargs["input_ids"].shape[0]))

    handle = llama.register_forward_pre_hook(count, with_kwargs=True)
    try:
        run(llama, tokenizer, texts, markers, decided_after=None, batch_size=32)
        full_work, full_calls = sum(rows_per_call), len(rows_per_call)
        rows_per_call.clear()
        run(llama, tokenizer, texts, markers, decided_after=3, batch_size=32)
        early_work, early_calls = sum(rows_per_call), len(rows_per_call)
    finally:
        handle.remove()
    assert all(a >= b for a, b in pairwise(rows_per_call))  # one batch: it only shrinks
    assert early_calls <= full_calls
    assert early_work < full_work / 2
    assert rows_per_call[0] == 32 and rows_per_call[-1] < 32


def test_sliding_window_cache_is_reindexed_correctly(tokenizer, texts) -> None:
    """Rows leaving a batch must also leave sliding-window cache layers."""
    model = make_mistral(sliding_window=6, eos_boost=2.0)
    tokens, responses = hf_generate(model, tokenizer, texts)
    markers = pick_markers(responses)
    for batch_size in (3, 32):
        verdicts = run(model, tokenizer, texts, markers, decided_after=None, batch_size=batch_size)
        assert [list(v.tokens) for v in verdicts] == tokens
        early = run(model, tokenizer, texts, markers, decided_after=4, batch_size=batch_size)
        for verdict, full in zip(early, tokens, strict=True):
            kept, refused = expected_early(full, tokenizer, markers, 4)
            assert (list(verdict.tokens), verdict.refused) == (full[:kept], refused)


def test_absolute_position_embeddings_follow_left_padding(tokenizer, texts) -> None:
    """GPT-2 adds learned absolute positions: wrong position ids change its answers (RoPE models
    are blind to a constant shift, so the Llama tests cannot see this)."""
    config = GPT2Config(
        vocab_size=len(VOCAB),
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.2,
    )
    torch.manual_seed(4)
    model = GPT2LMHeadModel(config).eval().double()
    tokens, responses = hf_generate(model, tokenizer, texts)
    markers = pick_markers(responses)
    for batch_size in (1, 8):
        verdicts = run(model, tokenizer, texts, markers, decided_after=None, batch_size=batch_size)
        assert [list(v.tokens) for v in verdicts] == tokens
        early = run(model, tokenizer, texts, markers, decided_after=2, batch_size=batch_size)
        for verdict, full in zip(early, tokens, strict=True):
            kept, refused = expected_early(full, tokenizer, markers, 2)
            assert (list(verdict.tokens), verdict.refused) == (full[:kept], refused)


def test_float32_batched_equals_unbatched(tokenizer, texts) -> None:
    model = make_llama(seed=5).float()
    markers = RefusalMarkers(["w1"])
    reference = run(model, tokenizer, texts, markers, decided_after=None, batch_size=1)
    for batch_size in (3, 8):
        verdicts = run(model, tokenizer, texts, markers, decided_after=None, batch_size=batch_size)
        assert [v.tokens for v in verdicts] == [v.tokens for v in reference]


def test_greedy_tokens_continue_through_eos(llama, tokenizer, texts) -> None:
    prompts = encode_texts(tokenizer, texts)
    continuations = greedy_tokens(llama, prompts, MAX_NEW, batch_size=5)
    tokens, _ = hf_generate(llama, tokenizer, texts)
    for continuation, answer in zip(continuations, tokens, strict=True):
        assert len(continuation) == MAX_NEW
        assert continuation[: len(answer)] == answer


def test_common_response_prefix() -> None:
    markers = RefusalMarkers(["sorry", "i can't"])
    think = "<think>\n\n</think>\n\n"
    assert common_response_prefix([think + "Sure, here", think + "I can't"], markers) == think
    assert common_response_prefix(["<think></think>Hi", "<think></think>Ho"], markers) == (
        "<think></think>"
    )
    # A shared refusal opening is never template text.
    assert common_response_prefix(["I'm sorry, no.", "I'm sorry, never."], markers) == ""
    assert common_response_prefix(["<b>Sorry</b> no", "<b>Sorry</b> never"], markers) == ""
    assert common_response_prefix(["Sure", "Surely"], markers) == ""
    assert common_response_prefix([think + "x"], markers) == ""  # one answer proves nothing
    assert strip_response_prefix("<think>\n", think) == ""
    assert strip_response_prefix(think + "Sure", think) == "Sure"
    assert strip_response_prefix("Sure", think) == "Sure"


def test_invalid_arguments(llama, tokenizer) -> None:
    markers = RefusalMarkers(["w1"])
    with pytest.raises(ValueError):
        run(llama, tokenizer, ["w3"], markers, decided_after=0)
    with pytest.raises(ValueError):
        run(llama, tokenizer, ["w3"], markers, decided_after=None, max_new_tokens=0)
    with pytest.raises(ValueError):
        run(llama, tokenizer, [""], markers, decided_after=None)


def _stop_once_eight_decided(llama, tokenizer, texts, **options) -> tuple[list, list]:
    """Run with a stop asked for once 8 answers are decided, against the same run without it.

    Checks that decided prompts keep the complete run's verdicts, that the rest are SKIPPED with
    no answer, and that every call saw the refusals and decided prompts so far (a lower bound of
    the count). Returns the calls' ``(refused, decided)`` and the finished batches' sizes.
    """
    full = run(llama, tokenizer, texts, RefusalMarkers(["zzz"]), decided_after=None)
    markers = pick_markers([v.text for v in full])
    complete = run(llama, tokenizer, texts, markers, **options)
    calls: list[tuple[int, int]] = []
    batches: list[int] = []

    def stop_at_eight(refused: int, judged: int) -> bool:
        calls.append((refused, judged))
        return judged >= 8

    partial = run(
        llama,
        tokenizer,
        texts,
        markers,
        should_stop=stop_at_eight,
        on_batch=batches.append,
        **options,
    )
    skipped = [v for v in partial if v.stopped_by is StopReason.SKIPPED]
    decided = [
        (p, c)
        for p, c in zip(partial, complete, strict=True)
        if p.stopped_by is not StopReason.SKIPPED
    ]
    assert skipped and all(not v.refused and not v.tokens and not v.text for v in skipped)
    assert all(p == c for p, c in decided)
    assert calls[-1] == (sum(p.refused for p, _ in decided), len(decided))
    assert calls[-1][0] <= sum(c.refused for c in complete)
    assert [judged for _, judged in calls] == sorted({judged for _, judged in calls})
    assert len(decided) + len(skipped) == len(texts)
    return calls, batches


@pytest.mark.parametrize("mode", ["early", "stop at marker", "full"])
def test_should_stop_ends_a_batch_midway(llama, tokenizer, texts, mode) -> None:
    """One batch of every prompt: stopping once 8 answers are decided leaves the batch's open
    answers undecided (SKIPPED) instead of finishing them."""
    options = {
        "early": {"decided_after": 4},
        "stop at marker": {"decided_after": None, "stop_at_marker": True},
        "full": {"decided_after": None},
    }[mode]
    calls, batches = _stop_once_eight_decided(
        llama, tokenizer, texts, batch_size=len(texts), **options
    )
    assert 8 <= calls[-1][1] < len(texts) and batches == []  # the one batch did not finish


def test_should_stop_between_batches(llama, tokenizer, texts) -> None:
    """Batches of 8: a stop asked for once the first batch is decided skips the other three."""
    calls, batches = _stop_once_eight_decided(llama, tokenizer, texts, decided_after=4)
    assert calls[-1][1] == 8 and batches == [8]


def test_dominance_stop_is_exact() -> None:
    from blasphemer.optimization.objective import dominance_stop

    stop = dominance_stop(kl=0.2, n_prompts=10, finished=[(0.3, 0.1), (0.0, 0.5)])
    assert not stop(2, 4)  # bound 0.2 < 0.3: could still beat trial (0.3, 0.1)
    assert stop(3, 5)  # bound 0.3 >= 0.3 with KL 0.2 >= 0.1: dominated whatever comes next
    no_lower_kl = dominance_stop(kl=0.05, n_prompts=10, finished=[(0.0, 0.1)])
    assert not no_lower_kl(10, 10)  # every finished trial has a higher KL: never dominated
