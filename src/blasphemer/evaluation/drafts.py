"""Draft tokens for greedy decoding: earlier answers to the same prompts, looked up by n-gram.

A trial answers the same harmful prompts as every trial before it, and neighbouring edits write
much the same text. Feeding a row's next token together with a few *draft* tokens guessed from
those earlier answers lets one forward pass check several greedy tokens at once: the model's
arg-max after each fed token either equals the next draft (accepted, and the pass goes on) or
does not (the arg-max is the true next token, and the drafts after it are dropped). The tokens
that come out are the greedy tokens whatever the drafts were; a good draft only saves passes
(see :mod:`blasphemer.evaluation.generation`).

:class:`DraftBook` keeps, per prompt, the last few answers recorded for it (and the prompt's own
tokens, which answers often repeat) and proposes what followed the longest match, up to
:data:`NGRAM` tokens long, of the answer's last tokens. Among equally long matches the one at the
answer's own position wins (the same answer written again), then the most recent answer. An
empty answer is matched at the start of each earlier answer. Pure Python on token ids.
"""

from __future__ import annotations

from collections.abc import Sequence

NGRAM = 3  # the longest run of an answer's last tokens that is looked up
KEEP = 4  # earlier answers kept per prompt


class _Reference:
    """One earlier token sequence, indexed by every n-gram (n = 1..NGRAM) it contains."""

    def __init__(self, tokens: Sequence[int], is_answer: bool) -> None:
        self.tokens = tuple(tokens)
        self.is_answer = is_answer
        self.ends: dict[tuple[int, ...], list[int]] = {}
        for n in range(1, NGRAM + 1):
            for end in range(n - 1, len(self.tokens) - 1):  # something must follow the match
                self.ends.setdefault(self.tokens[end - n + 1 : end + 1], []).append(end)


class DraftBook:
    """Earlier answers to ``n_prompts`` prompts (and the prompts), proposing draft tokens."""

    def __init__(self, n_prompts: int, keep: int = KEEP) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.keep = keep
        self._answers: list[list[_Reference]] = [[] for _ in range(n_prompts)]
        self._prompts: list[_Reference | None] = [None] * n_prompts
        self.proposed = 0  # drafts fed so far (see :meth:`tally`)
        self.confirmed = 0  # of which the model's arg-max confirmed

    def tally(self, proposed: int, confirmed: int) -> None:
        """Count drafts fed and confirmed (decoding calls it after every verifying pass)."""
        self.proposed += proposed
        self.confirmed += confirmed

    def __len__(self) -> int:
        return len(self._answers)

    def set_prompt(self, index: int, tokens: Sequence[int]) -> None:
        """The prompt's own tokens, looked up after every recorded answer."""
        self._prompts[index] = _Reference(tokens, is_answer=False)

    def record(self, index: int, answer: Sequence[int]) -> None:
        """Keep ``answer`` as the most recent answer to prompt ``index`` (a repeat moves up)."""
        answers = [ref for ref in self._answers[index] if ref.tokens != tuple(answer)]
        if answer:
            answers.insert(0, _Reference(answer, is_answer=True))
        self._answers[index] = answers[: self.keep]

    def propose(self, index: int, answer: Sequence[int], count: int) -> list[int]:
        """Up to ``count`` tokens that may follow ``answer`` (the tokens written so far)."""
        if count < 1:
            return []
        references = list(self._answers[index])
        prompt = self._prompts[index]
        if prompt is not None:
            references.append(prompt)
        if not answer:
            for ref in references:
                if ref.is_answer:
                    return list(ref.tokens[:count])
            return []
        here = len(answer) - 1  # where the last token sits in an answer written again
        for n in range(min(NGRAM, len(answer)), 0, -1):
            tail = tuple(answer[-n:])
            best: tuple[int, int] | None = None  # (distance from here, end), first reference wins
            best_ref: _Reference | None = None
            for ref in references:
                for end in ref.ends.get(tail, ()):
                    distance = abs(end - here) if ref.is_answer else len(ref.tokens) + 1
                    if best is None or distance < best[0]:
                        best, best_ref = (distance, end), ref
                if best is not None and best[0] == 0:
                    break
            if best is not None and best_ref is not None:
                end = best[1]
                return list(best_ref.tokens[end + 1 : end + 1 + count])
        return []
