"""Refusal rate of the model as it is now, on a fixed list of chat-rendered prompts."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from blasphemer.evaluation.drafts import DraftBook
from blasphemer.evaluation.frozen import LayerCache
from blasphemer.evaluation.generation import (
    ModelLike,
    StopReason,
    Verdict,
    decode_answers,
    encode_texts,
    eos_token_ids,
    generate_verdicts,
    greedy_tokens,
    pad_token_id,
)
from blasphemer.evaluation.markers import (
    DEFAULT_DECIDED_AFTER,
    RefusalMarkers,
    as_markers,
    common_response_prefix,
    wilson_interval,
)

PREFIX_PROBE_PROMPTS = 4
PREFIX_PROBE_TOKENS = 32


@dataclass(frozen=True)
class RefusalResult:
    """Verdicts on every prompt, in the order the prompts were given."""

    rate: float
    refused: list[bool]
    responses: list[str]
    verdicts: list[Verdict]

    @property
    def count(self) -> int:
        return sum(self.refused)

    @property
    def judged(self) -> int:
        """Prompts actually answered (all of them unless the evaluation stopped early)."""
        return sum(v.stopped_by is not StopReason.SKIPPED for v in self.verdicts)

    @property
    def partial(self) -> bool:
        """True when some prompts were skipped: ``rate`` is then a lower bound."""
        return self.judged < len(self.verdicts)

    def interval(self, z: float = 1.96) -> tuple[float, float]:
        """Wilson interval of :attr:`rate` (95 % by default)."""
        return wilson_interval(self.count, len(self.refused), z)


_REFUSED_FIRST = 1_000_000.0  # more than any answer's length in tokens


class RefusalScorer:
    """Share of ``texts`` the model refuses, judged by markers on greedy answers. Lower is better.

    ``texts`` are chat-rendered prompts (tokenised once here, without added special tokens).
    ``decided_after=None`` judges every answer on the full ``max_new_tokens``; an integer lets
    answers stop once decided (see :mod:`blasphemer.evaluation.generation` for what that
    preserves). ``response_prefix=None`` detects template text shared by every answer with the
    model as it is at construction (unedited); pass ``""`` to judge answers whole.
    ``share_prefix`` runs the prompts' shared chat-template prefix once per pass
    (:mod:`blasphemer.evaluation.prefix`). A ``layer_cache`` (built on the unedited model)
    records each batch's prefill in the first pass on the unedited model, :meth:`evaluate` or
    :meth:`record_layers`, and later passes replay the layers an edit left unchanged
    (:mod:`blasphemer.evaluation.frozen`). With ``draft_tokens`` > 0 each forward pass also
    checks that many draft tokens per answer, taken from this scorer's earlier answers to the
    same prompt (:mod:`blasphemer.evaluation.drafts`): fewer passes, the same answers.
    ``refill`` lets a batch take the next batch's prompts into the rows its decided answers
    left (:func:`~blasphemer.evaluation.generation.generate_verdicts`): the same answers; the
    waiting prompts that the last pass refused join first, then those it answered at length.
    """

    name = "refusals"

    def __init__(
        self,
        loaded: ModelLike,
        texts: Sequence[str],
        *,
        markers: RefusalMarkers | Iterable[str] | None = None,
        max_new_tokens: int = 100,
        decided_after: int | None = DEFAULT_DECIDED_AFTER,
        batch_size: int = 16,
        response_prefix: str | None = None,
        stop_at_marker: bool = False,
        share_prefix: bool = True,
        layer_cache: LayerCache | None = None,
        draft_tokens: int = 0,
        refill: bool = True,
    ) -> None:
        if not texts:
            raise ValueError("RefusalScorer needs at least one prompt")
        self.refill = refill
        self._priority = [0.0] * len(texts)  # see evaluate
        self.layer_cache = layer_cache
        self.loaded = loaded
        self.markers = as_markers(markers)
        self.max_new_tokens = max_new_tokens
        self.decided_after = decided_after
        self.batch_size = batch_size
        self.stop_at_marker = stop_at_marker
        self.share_prefix = share_prefix
        self.prompts = encode_texts(loaded.tokenizer, texts)
        if draft_tokens < 0:
            raise ValueError(f"draft_tokens must be at least 0, got {draft_tokens}")
        self.draft_tokens = draft_tokens
        # Earlier answers are indexed only when they are used as drafts.
        self.drafts: DraftBook | None = None
        if draft_tokens:
            self.drafts = DraftBook(len(self.prompts))
            for index, prompt in enumerate(self.prompts):
                self.drafts.set_prompt(index, prompt)
        if response_prefix is None:
            response_prefix = self._detect_prefix()
        self.response_prefix = response_prefix

    def _detect_prefix(self) -> str:
        """Common template prefix of the greedy answers to the first few prompts."""
        probe = self.prompts[:PREFIX_PROBE_PROMPTS]
        tokens = greedy_tokens(
            self.loaded.model,
            probe,
            min(PREFIX_PROBE_TOKENS, self.max_new_tokens),
            batch_size=self.batch_size,
            pad_id=pad_token_id(self.loaded.tokenizer),
            share_prefix=self.share_prefix,
        )
        eos = eos_token_ids(self.loaded.model, self.loaded.tokenizer)
        answers = [_until_eos(row, eos) for row in tokens]
        # Decoded without special tokens, exactly as answers are when they are judged.
        responses = decode_answers(self.loaded.tokenizer, answers)
        return common_response_prefix(responses, self.markers)

    @property
    def n_prompts(self) -> int:
        return len(self.prompts)

    def evaluate(
        self,
        on_batch: Callable[[int], None] | None = None,
        should_stop: Callable[[int, int], bool] | None = None,
    ) -> RefusalResult:
        """Generate and judge an answer to every prompt with the model as it is now.

        ``should_stop(refused, judged)`` may end the evaluation once any answer is decided (see
        :func:`~blasphemer.evaluation.generation.generate_verdicts`); the result is then
        :attr:`RefusalResult.partial` and its ``rate`` a lower bound over all prompts.
        """
        verdicts = self._generate(self.max_new_tokens, on_batch, should_stop)
        for index, verdict in enumerate(verdicts):
            if verdict.stopped_by is StopReason.SKIPPED:
                continue  # no verdict: what an earlier pass found stays
            # Waiting prompts join a batch in this order next time: refused last time first
            # (decided in a few tokens, and what lets a dominated trial stop), then the
            # longest answers (started early, they do not hold a batch open at the end).
            refused_first = _REFUSED_FIRST if verdict.refused else 0.0
            self._priority[index] = -len(verdict.tokens) - refused_first
            if self.drafts is not None:
                self.drafts.record(index, verdict.tokens)
        refused = [verdict.refused for verdict in verdicts]
        return RefusalResult(
            rate=sum(refused) / len(refused),
            refused=refused,
            responses=[verdict.text for verdict in verdicts],
            verdicts=verdicts,
        )

    def record_layers(self) -> None:
        """Fill the layer cache without a whole evaluation: one token per prompt (the prefills
        are what is recorded). Call it on the unedited model; without a cache it does nothing."""
        if self.layer_cache is not None:
            self._generate(max_new_tokens=1)

    def _generate(
        self,
        max_new_tokens: int,
        on_batch: Callable[[int], None] | None = None,
        should_stop: Callable[[int, int], bool] | None = None,
    ) -> list[Verdict]:
        return generate_verdicts(
            self.loaded.model,
            self.loaded.tokenizer,
            self.prompts,
            self.markers,
            max_new_tokens=max_new_tokens,
            decided_after=self.decided_after,
            batch_size=self.batch_size,
            response_prefix=self.response_prefix,
            stop_at_marker=self.stop_at_marker,
            share_prefix=self.share_prefix,
            on_batch=on_batch,
            should_stop=should_stop,
            layer_cache=self.layer_cache,
            drafts=self.drafts,
            draft_tokens=self.draft_tokens,
            refill=self.refill,
            priority=self._priority,
        )

    def score(self) -> float:
        """The refusal rate (the :class:`~blasphemer.evaluation.base.Scorer` objective)."""
        return self.evaluate().rate


def _until_eos(tokens: list[int], eos: frozenset[int]) -> list[int]:
    for position, token in enumerate(tokens):
        if token in eos:
            return tokens[:position]
    return tokens
