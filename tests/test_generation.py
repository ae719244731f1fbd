"""Early-stopping generation: equivalence with ``model.generate`` and with the documented rule.

Everything runs on tiny random models built from configs, with a word-level tokenizer, so that
decoded answers are space-separated words and "refusal markers" can be chosen among the words
the random model actually writes (some answers refused, some not, at various positions).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
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

from blasphemer.evaluation.decoding import DecodingBatch, ForwardSpec
from blasphemer.evaluation.generation import (
    StopReason,
    Verdict,
    encode_texts,
    generate_verdicts,
    greedy_tokens,
    length_sorted_batches,
    shared_prefix,
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


@contextmanager
def rows_per_forward(model: torch.nn.Module) -> Iterator[list[int]]:
    """The rows of every forward call of ``model`` while the block runs, in order."""
    rows: list[int] = []

    def count(_module, args, kwargs):
        rows.append(int(kwargs["input_ids"].shape[0]))

    handle = model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        yield rows
    finally:
        handle.remove()


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
    with rows_per_forward(llama) as rows_per_call:
        run(llama, tokenizer, texts, markers, decided_after=None, batch_size=32)
        full_work, full_calls = sum(rows_per_call), len(rows_per_call)
        rows_per_call.clear()
        run(llama, tokenizer, texts, markers, decided_after=3, batch_size=32)
        early_work, early_calls = sum(rows_per_call), len(rows_per_call)
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
    """Batches of 8 run one after the other: a stop asked for once the first batch is decided
    skips the other three."""
    calls, batches = _stop_once_eight_decided(
        llama, tokenizer, texts, decided_after=4, refill=False
    )
    assert calls[-1][1] == 8 and batches == [8]


def test_should_stop_with_refilled_batches(llama, tokenizer, texts) -> None:
    """Batches of 8 refilled from the next: the stop still comes as soon as it is asked for."""
    calls, batches = _stop_once_eight_decided(llama, tokenizer, texts, decided_after=4)
    assert 8 <= calls[-1][1] < len(texts) and len(batches) <= 1


@pytest.mark.parametrize(
    "options",
    [
        {"decided_after": None},
        {"decided_after": None, "stop_at_marker": True},
        {"decided_after": 3},
        {"decided_after": None, "share_prefix": False},
    ],
)
def test_refill_keeps_every_answer_and_saves_passes(llama, tokenizer, texts, options) -> None:
    """Rows of later batches take the places decided answers leave: the same answers (float64),
    never more rows per pass than the batch size, and fewer passes than batch after batch."""
    tokens, responses = hf_generate(llama, tokenizer, texts)
    markers = pick_markers(responses)
    runs = {}
    calls = {}
    for refill in (False, True):
        with rows_per_forward(llama) as calls[refill]:
            runs[refill] = run(
                llama, tokenizer, texts, markers, batch_size=5, refill=refill, **options
            )
    assert runs[True] == runs[False]
    if options["decided_after"] is None and not options.get("stop_at_marker"):
        assert [list(v.tokens) for v in runs[True]] == tokens
    assert max(calls[True]) <= 5
    assert len(calls[True]) < len(calls[False])
    # Between prefills (a batch's first pass has more than one token a row) the refilled pass
    # grows back: a pass with more rows than the one before it that is not a prefill.
    assert any(b > a for a, b in pairwise(calls[True]))


def test_refill_with_sliding_window_runs_batches_one_after_the_other(tokenizer, texts) -> None:
    """A window cache cannot take rows with padding in front (it would count it as distance):
    such batches are not merged, and the answers stay those of ``generate``."""
    model = make_mistral(sliding_window=6, eos_boost=2.0)
    tokens, responses = hf_generate(model, tokenizer, texts)
    markers = pick_markers(responses)
    verdicts = run(model, tokenizer, texts, markers, decided_after=None, batch_size=5)
    assert [list(v.tokens) for v in verdicts] == tokens


@pytest.mark.parametrize("share", [False, True])
def test_merge_aligns_batches_of_any_width(llama, tokenizer, share) -> None:
    """Rows of a wider batch merged into a narrower one (and the reverse) go on exactly as each
    prompt alone: the narrower cache gets the masked columns on the left."""
    short = encode_texts(tokenizer, ["w5 w6", "w7 w8 w9"])
    long = encode_texts(tokenizer, ["w10 w11 w12 w13 w14 w15 w16 w17 w18", "w19 w20 w21 w22 w23"])
    if share:  # a shared leading run, so that both batches start from one prefix cache
        short = [[1, 40, 41, 42, 43, *p] for p in short]
        long = [[1, 40, 41, 42, 43, *p] for p in long]
    steps = 6
    alone = [greedy_tokens(llama, [p], steps + 1, batch_size=1)[0] for p in short + long]
    spec = ForwardSpec.of(llama)
    with torch.inference_mode():
        suffixes, prefix = shared_prefix(llama, spec, short + long, share, steps + 1)
        assert (prefix is not None) == share
        for first, second in ((0, 2), (2, 0)):  # narrow takes wide, then wide takes narrow
            a = DecodingBatch(llama, spec, suffixes[first : first + 2], 0, steps + 1, prefix)
            b = DecodingBatch(llama, spec, suffixes[second : second + 2], 0, steps + 1, prefix)
            ta, tb = a.prefill(), b.prefill()
            assert a.can_merge() and b.can_merge()
            a.merge(b, torch.tensor([1, 0]))
            order = [first, first + 1, second + 1, second]
            columns = [torch.cat([ta, tb[[1, 0]]])]
            for _ in range(steps):
                columns.append(a.step(columns[-1]))
            got = torch.stack(columns, dim=1).tolist()
            assert got == [alone[i] for i in order]


def test_dominance_stop_is_exact() -> None:
    from blasphemer.optimization.objective import dominance_stop

    stop = dominance_stop(kl=0.2, n_prompts=10, finished=[(0.3, 0.1), (0.0, 0.5)])
    assert not stop(2, 4)  # bound 0.2 < 0.3: could still beat trial (0.3, 0.1)
    assert stop(3, 5)  # bound 0.3 >= 0.3 with KL 0.2 >= 0.1: dominated whatever comes next
    no_lower_kl = dominance_stop(kl=0.05, n_prompts=10, finished=[(0.0, 0.1)])
    assert not no_lower_kl(10, 10)  # every finished trial has a higher KL: never dominated


class _ScriptedBatch:
    """Stands in for a DecodingBatch: prompt ``i`` writes ``lengths[i]`` tokens, then EOS (2)."""

    def __init__(self, indices: list[int], lengths: dict[int, int], log: dict) -> None:
        self.prompts = list(indices)
        self.lengths = lengths
        self.log = log
        self.written = dict.fromkeys(indices, 0)
        self.device = torch.device("cpu")

    def _next(self) -> torch.Tensor:
        tokens = []
        for prompt in self.prompts:
            self.written[prompt] += 1
            tokens.append(2 if self.written[prompt] > self.lengths[prompt] else 5)
        return torch.tensor(tokens)

    def prefill(self) -> torch.Tensor:
        return self._next()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        assert len(tokens) == len(self.prompts)
        self.log["rows"].append(len(self.prompts))
        return self._next()

    def can_merge(self) -> bool:
        return True

    def can_verify(self, *_: int) -> bool:
        return False

    def keep(self, rows: torch.Tensor) -> None:
        self.prompts = [self.prompts[int(r)] for r in rows]

    def merge(self, other: _ScriptedBatch, rows: torch.Tensor) -> None:
        moved = [other.prompts[int(r)] for r in rows]
        self.log["joined"].extend(moved)
        self.prompts += moved
        self.written.update({p: other.written[p] for p in moved})


@pytest.mark.parametrize("refill", [False, True])
def test_refill_schedule_follows_priority_and_batch_size(refill) -> None:
    """The scheduler alone, on scripted answers: rows join in priority order, a pass never holds
    more than the batch size, and refilling takes fewer passes than batch after batch."""
    from blasphemer.evaluation.scheduling import Row, decode_batches

    lengths = {0: 12, 1: 2, 2: 3, 3: 12, 4: 1, 5: 1, 6: 12, 7: 4, 8: 12, 9: 2}
    batches = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    priority = [0.0, 0.0, 0.0, 0.0, 0.0, 3.0, -12.0, 1.0, -12.0, 2.0]  # 6 and 8 first
    rows = [Row(i) for i in range(10)]
    log: dict = {"rows": [], "joined": []}
    pending = iter(batches)

    def open_next():
        indices = next(pending, None)
        if indices is None:
            return None
        return _ScriptedBatch(indices, lengths, log), [rows[i] for i in indices]

    def absorb(active, new):
        for row, tokens in zip(active, new, strict=True):
            for token in tokens:
                if row.stopped_by is None:
                    if token == 2:
                        row.stopped_by = StopReason.EOS
                    else:
                        row.tokens.append(token)

    halted = decode_batches(open_next, absorb, 100, 5, None, 0, refill=refill, priority=priority)
    assert not halted
    assert [len(row.tokens) for row in rows] == [lengths[i] for i in range(10)]
    assert max(log["rows"]) <= 5
    if refill:
        assert log["joined"] == [6, 8, 7, 9, 5]  # the order of priority
        assert len(log["rows"]) < 2 * 12  # the long answers of both batches overlap
    else:
        assert log["joined"] == [] and len(log["rows"]) == 2 * 12
