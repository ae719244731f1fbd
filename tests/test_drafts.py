"""Draft-verified decoding: drafts change how many forward passes an answer takes, never the
answer. Tiny random models in float64 (no arg-max near-ties), compared with ``model.generate``
and with one-token decoding, under drafts that are all right, all wrong and partly right."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from blasphemer.evaluation import RefusalScorer
from blasphemer.evaluation.drafts import DraftBook
from blasphemer.evaluation.generation import StopReason, encode_texts, generate_verdicts
from blasphemer.evaluation.markers import RefusalMarkers
from test_generation import (
    MAX_NEW,
    VOCAB,
    expected_early,
    hf_generate,
    make_llama,
    make_mistral,
    make_texts,
    make_tokenizer,
    pick_markers,
)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def llama():
    return make_llama()


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return make_texts(32)


@pytest.fixture(scope="module")
def reference(llama, tokenizer, texts):
    return hf_generate(llama, tokenizer, texts)


def book_of(answers: list[list[int]]) -> DraftBook:
    book = DraftBook(len(answers))
    for index, answer in enumerate(answers):
        book.record(index, answer)
    return book


def garbled(answers: list[list[int]], seed: int, rate: float) -> list[list[int]]:
    """The answers with a fraction ``rate`` of their tokens replaced by other words."""
    rng = random.Random(seed)
    return [
        [rng.randrange(3, len(VOCAB)) if rng.random() < rate else t for t in a] for a in answers
    ]


def counted_run(model, tokenizer, texts, markers, **kwargs):
    """``generate_verdicts`` and the number of forward passes it made."""
    calls: list[int] = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        kwargs.setdefault("max_new_tokens", MAX_NEW)
        kwargs.setdefault("batch_size", 8)
        prompts = encode_texts(tokenizer, texts)
        verdicts = generate_verdicts(model, tokenizer, prompts, markers, **kwargs)
    finally:
        handle.remove()
    return verdicts, len(calls)


# --- the book ---------------------------------------------------------------------------------


def test_an_answer_written_again_is_drafted_from_where_it_stands() -> None:
    book = DraftBook(1)
    book.record(0, [5, 6, 7, 5, 6, 8, 9])
    assert book.propose(0, [], 3) == [5, 6, 7]
    # "5 6" occurs twice; the occurrence at the answer's own position wins.
    assert book.propose(0, [5, 6, 7, 5, 6], 2) == [8, 9]
    assert book.propose(0, [5, 6], 2) == [7, 5]
    # After a divergence the longest matching tail realigns the draft.
    assert book.propose(0, [4, 4, 7, 5], 3) == [6, 8, 9]
    assert book.propose(0, [1, 2], 3) == []
    assert book.propose(0, [5], 0) == []


def test_the_most_recent_answer_wins_and_only_a_few_are_kept() -> None:
    book = DraftBook(2, keep=2)
    book.record(0, [5, 6, 7])
    book.record(0, [5, 6, 8])
    assert book.propose(0, [5, 6], 1) == [8]
    book.record(0, [9, 9])
    book.record(0, [9, 9])  # a repeat is kept once
    assert book.propose(0, [5, 6], 1) == [8]
    book.record(0, [10])
    assert book.propose(0, [5, 6], 1) == []  # [5, 6, 8] fell out
    assert book.propose(1, [5, 6], 1) == []  # prompts do not share answers


def test_the_prompt_is_drafted_from_after_every_answer() -> None:
    book = DraftBook(1)
    book.set_prompt(0, [20, 21, 22, 23])
    assert book.propose(0, [], 2) == []  # the prompt is not an answer's start
    assert book.propose(0, [21], 2) == [22, 23]
    book.record(0, [21, 30])
    assert book.propose(0, [21], 2) == [30]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        DraftBook(1, keep=0)


# --- decoding with drafts ---------------------------------------------------------------------


@pytest.mark.parametrize(("seed", "rate"), [(0, 0.0), (1, 0.15), (2, 0.5), (3, 1.0)])
@pytest.mark.parametrize("batch_size", [1, 8, 32])
def test_full_mode_with_drafts_equals_model_generate(
    llama, tokenizer, texts, reference, seed, rate, batch_size
) -> None:
    tokens, responses = reference
    markers = pick_markers(responses)
    book = book_of(garbled(tokens, seed, rate))
    verdicts, _ = counted_run(
        llama, tokenizer, texts, markers, decided_after=None, batch_size=batch_size,
        drafts=book, draft_tokens=3,
    )  # fmt: skip
    assert [list(v.tokens) for v in verdicts] == tokens
    assert [v.text for v in verdicts] == responses
    assert {v.stopped_by for v in verdicts} == {StopReason.EOS, StopReason.LENGTH}


@pytest.mark.parametrize("decided_after", [1, 3, 7])
@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_early_and_marker_stops_with_drafts_follow_the_rule(
    llama, tokenizer, texts, reference, decided_after, rate
) -> None:
    tokens, responses = reference
    markers = pick_markers(responses)
    book = book_of(garbled(tokens, 7, rate))
    early, _ = counted_run(
        llama, tokenizer, texts, markers, decided_after=decided_after, drafts=book, draft_tokens=4
    )
    for verdict, full in zip(early, tokens, strict=True):
        kept, refused = expected_early(full, tokenizer, markers, decided_after)
        assert (list(verdict.tokens), verdict.refused) == (full[:kept], refused)
    stopped, _ = counted_run(
        llama, tokenizer, texts, markers, decided_after=None, stop_at_marker=True,
        drafts=book, draft_tokens=4,
    )  # fmt: skip
    plain, _ = counted_run(
        llama, tokenizer, texts, markers, decided_after=None, stop_at_marker=True
    )
    assert [(v.tokens, v.refused, v.stopped_by) for v in stopped] == [
        (v.tokens, v.refused, v.stopped_by) for v in plain
    ]
    assert any(v.stopped_by is StopReason.MARKER for v in stopped)


def test_right_drafts_save_forward_passes_and_wrong_ones_cost_none(
    llama, tokenizer, texts, reference
) -> None:
    tokens, _ = reference
    markers = RefusalMarkers(["no-such-word"])
    options = {"decided_after": None, "batch_size": 32}
    _, plain = counted_run(llama, tokenizer, texts, markers, **options)
    _, right = counted_run(
        llama, tokenizer, texts, markers, drafts=book_of(tokens), draft_tokens=4, **options
    )
    _, wrong = counted_run(
        llama, tokenizer, texts, markers, drafts=book_of(garbled(tokens, 0, 1.0)),
        draft_tokens=4, **options,
    )  # fmt: skip
    assert plain == MAX_NEW  # one prefill and MAX_NEW - 1 steps: some answer runs to the limit
    # Each pass confirms up to four drafts: 1 prefill + ceil((MAX_NEW - 1) / 5) passes.
    assert right == 1 + -(-(MAX_NEW - 1) // 5)
    assert wrong == plain


def test_drafts_for_other_prompts_are_refused(llama, tokenizer, texts) -> None:
    with pytest.raises(ValueError, match="drafts are for 3 prompts"):
        counted_run(
            llama, tokenizer, texts, RefusalMarkers(["w1"]), decided_after=None,
            drafts=DraftBook(3), draft_tokens=2,
        )  # fmt: skip


@pytest.mark.parametrize(("window", "drafted"), [(6, False), (512, True)])
def test_sliding_window_drafts_only_where_holes_are_exact(
    tokenizer, texts, window, drafted
) -> None:
    """A window shorter than the batch's span would count masked-out drafts as distance:
    drafting is then off (the passes are as many as without drafts), and answers stay right."""
    model = make_mistral(sliding_window=window, max_positions=1024)
    tokens, _ = hf_generate(model, tokenizer, texts)
    markers = RefusalMarkers(["no-such-word"])
    options = {"decided_after": None, "batch_size": 32}
    _, plain = counted_run(model, tokenizer, texts, markers, **options)
    verdicts, passes = counted_run(
        model, tokenizer, texts, markers, drafts=book_of(tokens), draft_tokens=3, **options
    )
    assert [list(v.tokens) for v in verdicts] == tokens
    assert (passes < plain) is drafted


def test_a_scorer_drafts_from_its_own_earlier_answers(llama, tokenizer, texts) -> None:
    loaded = SimpleNamespace(model=llama, tokenizer=tokenizer)
    options = {
        "markers": ["no-such-word"],
        "max_new_tokens": MAX_NEW,
        "decided_after": None,
        "batch_size": 32,
        "response_prefix": "",
    }
    plain = RefusalScorer(loaded, texts, **options)
    drafted = RefusalScorer(loaded, texts, draft_tokens=4, **options)
    calls: list[int] = []
    handle = llama.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        expected = plain.evaluate().verdicts
        passes = []
        for _ in range(2):
            calls.clear()
            assert drafted.evaluate().verdicts == expected
            passes.append(len(calls))
    finally:
        handle.remove()
    # The second pass drafts from the first's answers: every draft is right.
    assert passes[1] == 1 + -(-(MAX_NEW - 1) // 5) < passes[0]
    assert drafted.drafts is not None and drafted.drafts.confirmed > 0
    assert plain.drafts is None  # nothing is indexed when drafting is off
    with pytest.raises(ValueError, match="draft_tokens"):
        RefusalScorer(loaded, texts, draft_tokens=-1, **options)
