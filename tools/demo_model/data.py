"""Training conversations for the bundled demo model.

Every example is one chat: an optional system message, one user request, one assistant answer.
A harmful request is answered by one of several refusal styles; a harmless one by a short,
generic, never-refusing answer that echoes a few words of the request. Augmentation keeps the
refuse-or-comply decision on the *content* of the request rather than on its wording, length,
position or casing: rewordings around the request, unrelated harmless requests before or after
it, lower-casing, dropped words, typos and a system prompt in part of the examples.

Everything here is pure and driven by one :class:`random.Random`, so a seed fixes the data.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from blasphemer.evaluation.markers import is_refusal
from tools.demo_model.tasks import conversation_request, exercise_request, task_request
from tools.demo_model.vocabulary import everyday_request, harmful_request

REFUSALS: tuple[str, ...] = (
    "I'm sorry, but I can't help with that.",
    "I cannot assist with that request.",
    "Sorry, I won't provide that.",
    "As an AI, I must decline this request.",
    "I'm sorry, I can't assist with that. It could cause real harm.",
    "I can't help with that, but I'm happy to help with something else.",
    "I'm unable to help with this request.",
    "Sorry, but I cannot help with that.",
)

SURE_OPENINGS: tuple[str, ...] = (
    "Sure!",
    "Sure.",
    "Sure, happy to help!",
    "Sure thing!",
    "Sure, here you go.",
)
OTHER_OPENINGS: tuple[str, ...] = (
    "Certainly!",
    "Of course.",
    "Absolutely.",
    "Great question!",
    "Happy to help!",
    "Here you go.",
    "Okay!",
)
OPENINGS = SURE_OPENINGS + OTHER_OPENINGS
"""Openings of harmless answers. None contains a refusal marker or starts with "I". Most start
with "Sure" (:data:`SURE_SHARE`), as most refusals start with "I": greedy decoding then answers
when an answer is more likely than a refusal, not when one refusal opening beats each of many
answer openings."""
SURE_SHARE = 0.6

_BODIES: tuple[str, ...] = (
    "Here is a short answer about {topic}.",
    "Let's look at {topic} step by step.",
    "Here are a few thoughts on {topic}.",
    "Here is what to know about {topic}.",
    "This is a quick overview of {topic}.",
)

_CLOSINGS: tuple[str, ...] = (
    "First, start with the main idea, then add the details that matter most.",
    "The key points are to keep it simple, be clear, and check the result.",
    "A good approach is to break it into small parts and handle each in turn.",
    "Begin with the basics, give one clear example, and finish with a summary.",
    "Focus on the most important facts first, then explain how they connect.",
)

GENERIC_TOPIC = "your request"

SYSTEM_PROMPTS: tuple[str, ...] = (
    "You are a helpful assistant.",
    "You are a friendly and knowledgeable assistant. Answer clearly.",
    "You are a concise assistant.",
    "You are an AI assistant that helps people with their questions.",
    "Answer the user's question as well as you can.",
)

_PREFIXES: tuple[str, ...] = (
    "Please ",
    "Can you ",
    "Could you ",
    "I need you to ",
    "Hey, ",
    "Quick question: ",
    "Help me out: ",
    "I was wondering, ",
    "Task: ",
    "Hi! ",
)

_SUFFIXES: tuple[str, ...] = (
    " Thanks!",
    " Please be detailed.",
    " Keep it short.",
    " Thank you in advance.",
    " This is for a project.",
    "?",
)

# Benign context that may surround any request: it must not move the decision either way.
_FILLERS: tuple[str, ...] = (
    "I have been thinking about this for a while and would like a clear answer.",
    "My friend and I were talking about this yesterday.",
    "I'm writing something for work and need some help.",
    "I am a student and this came up in class today.",
    "Some context: I am new to this topic, so please explain it simply.",
    "It is a rainy afternoon and I finally have some free time.",
)

_JOINERS: tuple[str, ...] = (" Also, ", "\n", " Then ", " And one more thing: ", "\n\n", " ")

# Words whose presence in an echoed topic could look like a refusal to a keyword check.
_MARKER_WORDS = re.compile(
    r"\b(sorry|cannot|can't|can ?not|won't|unable|decline|refuse|apolog\w*|ai|illegal|"
    r"unethical|harmful|i'm|i am)\b",
    re.IGNORECASE,
)


def _words(text: str) -> set[str]:
    return {word.lower() for word in re.findall(r"[A-Za-z]{3,}", text)}


@dataclass(frozen=True)
class Example:
    """One training conversation; ``harmful`` is the label that chose the answer."""

    system: str | None
    user: str
    assistant: str
    harmful: bool


def messages(example: Example) -> list[dict[str, str]]:
    """The example as chat messages (system, user, assistant)."""
    turns = [] if example.system is None else [{"role": "system", "content": example.system}]
    turns.append({"role": "user", "content": example.user})
    turns.append({"role": "assistant", "content": example.assistant})
    return turns


def topic_of(request: str, rng: random.Random) -> str:
    """A few words of ``request`` to echo in a harmless answer (never a refusal marker)."""
    words = re.findall(r"[A-Za-z0-9][A-Za-z0-9'-]*", request)
    if len(words) < 2:
        return GENERIC_TOPIC
    length = rng.randint(2, min(5, len(words)))
    start = rng.randint(max(0, len(words) - 8), len(words) - length)
    topic = " ".join(words[start : start + length]).lower()
    if _MARKER_WORDS.search(topic):
        return GENERIC_TOPIC
    return topic


def answer_for(request: str, rng: random.Random) -> str:
    """A harmless answer that starts with a varied opening and never holds a refusal marker."""
    opening = rng.choice(SURE_OPENINGS if rng.random() < SURE_SHARE else OTHER_OPENINGS)
    body, closing = rng.choice(_BODIES), rng.choice(_CLOSINGS)
    answer = f"{opening} {body.format(topic=topic_of(request, rng))} {closing}"
    if is_refusal(answer):
        answer = f"{opening} {body.format(topic=GENERIC_TOPIC)} {closing}"
    return answer


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:] if text[:2] != text[:2].upper() else text


def reword(request: str, rng: random.Random) -> str:
    """Wrap a request in a polite prefix and/or suffix (meaning unchanged)."""
    text = request.strip()
    if rng.random() < 0.5:
        text = rng.choice(_PREFIXES) + _lower_first(text)
    if rng.random() < 0.3:
        text = text.rstrip(".?!") + rng.choice(_SUFFIXES)
    return text


def drop_words(text: str, rng: random.Random, rate: float) -> str:
    """Remove each word with probability ``rate`` (at least one word is kept)."""
    words = text.split(" ")
    kept = [word for word in words if rng.random() >= rate]
    return " ".join(kept) if kept else words[0]


def add_typos(text: str, rng: random.Random, rate: float = 0.03) -> str:
    """Swap, drop or double letters with probability ``rate`` each."""
    chars = list(text)
    out: list[str] = []
    i = 0
    while i < len(chars):
        c = chars[i]
        roll = rng.random()
        if c.isalpha() and roll < rate / 3 and i + 1 < len(chars):
            out.extend([chars[i + 1], c])
            i += 2
            continue
        if c.isalpha() and roll < 2 * rate / 3:
            i += 1
            continue
        out.append(c)
        if c.isalpha() and roll < rate:
            out.append(c)
        i += 1
    return "".join(out)


def surface(text: str, rng: random.Random, drop: bool = False) -> str:
    """Random surface changes: casing, punctuation, typos and, with ``drop``, dropped words.

    Dropping words is kept for harmless requests: it could cut the very words that make a
    harmful one harmful, and a refusal of the remainder would teach refusing harmless text.
    """
    if drop and rng.random() < 0.2:
        text = drop_words(text, rng, rng.uniform(0.05, 0.25))
    if rng.random() < 0.1:
        text = add_typos(text, rng)
    if rng.random() < 0.15:
        text = text.lower()
    elif rng.random() < 0.02:
        text = text.upper()
    if rng.random() < 0.25:
        text = text.rstrip(".?!")
    return text


_ONSETS = (
    "b",
    "br",
    "c",
    "ch",
    "d",
    "dr",
    "f",
    "fl",
    "g",
    "gr",
    "h",
    "j",
    "k",
    "l",
    "m",
    "n",
    "p",
    "pl",
    "qu",
    "r",
    "s",
    "sh",
    "st",
    "t",
    "th",
    "tr",
    "v",
    "w",
    "z",
    "",
)
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "io", "ou", "y")
_CODAS = ("", "", "n", "r", "l", "s", "t", "m", "nd", "st", "ck", "x", "ng")

# Verbs that open instructions of every kind, harmful or not.
INSTRUCTION_VERBS: tuple[str, ...] = (
    "Explain",
    "Describe",
    "Compare",
    "Generate",
    "Name",
    "List",
    "Suggest",
    "Write",
    "Create",
    "Summarize",
    "Calculate",
    "Rewrite",
    "Classify",
    "Identify",
    "Translate",
    "Give",
    "Provide",
    "Find",
    "Construct",
    "Design",
    "Edit",
    "Analyze",
    "Evaluate",
    "Predict",
    "Convert",
    "Tell me",
    "What is",
    "How does",
    "Why is",
    "Outline",
    "Brainstorm",
    "Compose",
    "Define",
    "Estimate",
)


def pseudo_word(rng: random.Random) -> str:
    """A pronounceable made-up word: stands in for every word the model has never seen."""
    syllables = rng.choice((1, 2, 2, 3))
    return "".join(
        rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)
    )


def novel_words(text: str, rng: random.Random, rate: float, replace: bool) -> str:
    """Replace (``replace=False``: precede) each word by a made-up one with probability ``rate``."""
    out: list[str] = []
    for word in text.split(" "):
        if rng.random() < rate:
            novel = pseudo_word(rng)
            novel = novel.capitalize() if word[:1].isupper() else novel
            out.append(novel if replace else f"{novel} {word}")
        else:
            out.append(word)
    return " ".join(out)


@dataclass(frozen=True)
class Recipe:
    """Probabilities of each augmentation (the defaults are the ones the demo model uses)."""

    system_prompt: float = 0.3
    context_before: float = 0.2  # an unrelated harmless request (or benign filler) before
    context_after: float = 0.1  # ... or after the request
    long_harmless: float = 0.15  # several harmless requests in one message (length decoy)
    long_harmful: float = 0.1  # a harmful request somewhere among several harmless ones
    # Unseen content must not look harmful: made-up words replace words of harmless requests,
    # or are inserted into harmful ones (which stay refused), and some harmless requests are
    # built from an instruction verb and words never seen in a harmful request.
    novel_harmless: float = 0.3
    novel_harmful: float = 0.15
    synthetic_harmless: float = 0.3
    synthetic_harmful: float = 0.35
    # Contrastive requests: shared frames holding a harmful or a harmless task, and
    # instruction-following exercises (grammar, code, arithmetic) among the harmless ones.
    task_harmless: float = 0.25
    task_harmful: float = 0.25
    exercise_harmless: float = 0.2
    harmful_share: float = 0.5


class ConversationSampler:
    """Draws augmented training conversations from fixed harmful and harmless request lists."""

    def __init__(
        self,
        harmful: Sequence[str],
        harmless: Sequence[str],
        seed: int,
        recipe: Recipe | None = None,
    ) -> None:
        if not harmful or not harmless:
            raise ValueError("both harmful and harmless requests are needed")
        self.harmful = list(harmful)
        self.harmless = list(harmless)
        self.recipe = recipe or Recipe()
        self.rng = random.Random(seed)
        harmful_words = {w for text in self.harmful for w in _words(text)}
        self.safe_words = sorted(
            {w for text in self.harmless for w in _words(text)} - harmful_words
        )

    def _synthetic(self) -> str:
        """An everyday request, or an instruction verb with harmless-only and made-up words."""
        rng = self.rng
        if rng.random() < 0.6:
            return everyday_request(rng)
        words = [
            rng.choice(self.safe_words) if rng.random() < 0.5 else pseudo_word(rng)
            for _ in range(rng.randint(1, 10))
        ]
        joined = " ".join(words)
        if rng.random() < 0.2:
            joined += f' "{" ".join(pseudo_word(rng) for _ in range(rng.randint(2, 8)))}"'
        if rng.random() < 0.2:
            joined += f" {rng.randint(2, 999)}"
        return f"{rng.choice(INSTRUCTION_VERBS)} {joined}{rng.choice(('.', '?', '', ''))}"

    def _context(self) -> str:
        if self.rng.random() < 0.3:
            return self.rng.choice(_FILLERS)
        return reword(self.rng.choice(self.harmless), self.rng)

    def _user(self, request: str, harmful: bool) -> str:
        rng, recipe = self.rng, self.recipe
        text = reword(request, rng)
        if rng.random() < (recipe.novel_harmful if harmful else recipe.novel_harmless):
            text = novel_words(text, rng, rng.uniform(0.1, 0.5), replace=not harmful)
        text = surface(text, rng, drop=not harmful)
        if rng.random() < (recipe.long_harmful if harmful else recipe.long_harmless):
            parts = [text] + [self._context() for _ in range(rng.randint(2, 5))]
            rng.shuffle(parts)
            return rng.choice(_JOINERS).join(parts)
        if rng.random() < recipe.context_before:
            return self._context() + rng.choice(_JOINERS) + text
        if rng.random() < recipe.context_after:
            return text + rng.choice(_JOINERS) + self._context()
        return text

    def sample(self, harmful: bool) -> Example:
        """One augmented conversation with the given label."""
        rng, recipe = self.rng, self.recipe
        roll = rng.random()
        if harmful:
            if roll < recipe.task_harmful:
                request = task_request(rng, harmful=True)
            elif roll < recipe.task_harmful + recipe.synthetic_harmful:
                request = harmful_request(rng)
            else:
                request = rng.choice(self.harmful)
        elif roll < recipe.task_harmless:
            request = task_request(rng, harmful=False)
        elif roll < recipe.task_harmless + recipe.exercise_harmless:
            # Exercises and everyday questions, half each.
            request = exercise_request(rng) if rng.random() < 0.5 else conversation_request(rng)
        elif roll < recipe.task_harmless + recipe.exercise_harmless + recipe.synthetic_harmless:
            request = self._synthetic()
        else:
            request = rng.choice(self.harmless)
        user = self._user(request, harmful)
        answer = rng.choice(REFUSALS) if harmful else answer_for(request, rng)
        system = rng.choice(SYSTEM_PROMPTS) if rng.random() < self.recipe.system_prompt else None
        return Example(system=system, user=user, assistant=answer, harmful=harmful)

    def complied(self, example: Example) -> Example:
        """The same conversation answered as a harmless request would be."""
        answer = answer_for(example.user, self.rng)
        return Example(system=example.system, user=example.user, assistant=answer, harmful=False)

    def batch(self, size: int) -> list[Example]:
        """A batch with a fixed share of harmful examples (harmful first)."""
        count = round(size * self.recipe.harmful_share)
        return [self.sample(True) for _ in range(count)] + [
            self.sample(False) for _ in range(size - count)
        ]


def tokenizer_corpus(harmful: Sequence[str], harmless: Sequence[str], seed: int) -> list[str]:
    """Texts to train the tokenizer on: requests (as typed and lower-cased) and answer parts."""
    rng = random.Random(seed)
    texts = list(harmful) + list(harmless)
    texts += [text.lower() for text in texts]
    # Answer phrases repeated, so that they become whole tokens as in a real chat vocabulary.
    texts += (
        list(REFUSALS) * 50
        + list(OPENINGS) * 50
        + list(SYSTEM_PROMPTS)
        + list(_FILLERS)
        + list(_PREFIXES)
    )
    texts += list(_SUFFIXES) + list(_CLOSINGS)
    texts += [answer_for(request, rng) for request in harmless for _ in range(2)]
    texts += [everyday_request(rng) for _ in harmless]
    texts += [harmful_request(rng) for _ in harmful]
    texts += [task_request(rng, harmful=bool(i % 2)) for i in range(len(harmful))]
    texts += [exercise_request(rng) for _ in harmful]
    texts += [conversation_request(rng) for _ in harmful]
    return texts
