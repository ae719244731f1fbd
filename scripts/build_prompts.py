"""Build Blasphemer's bundled prompt sets from hand-written seed material.

Run from the repository root::

    python scripts/build_prompts.py

It writes ``src/blasphemer/data/prompts/harmful.jsonl`` and ``harmless.jsonl``: one JSON object
per line, ``{"text": ..., "category": ...}``. The output is deterministic (seeded) and
deduplicated by normalised text.

The text is the project's own. Each category has *tasks* (verb phrases such as "bake sourdough
bread") and *pieces* (things to write, such as "a blog post about ..."). Tasks and pieces are
rendered through phrasing frames that the harmful and harmless sets share, so the form of a
request ("Write a tutorial on how to ...", "Develop a strategy to ...") never predicts its label;
only its subject does. A fraction of prompts gets a context sentence or a role-play wrapper.

Only requests are written here, never answers or operational detail.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

from prompt_seeds import (
    BORDERLINE_PIECES,
    BORDERLINE_TASKS,
    HARMFUL,
    HARMFUL_CONTEXTS,
    HARMFUL_PERSONAS,
    HARMLESS,
    HARMLESS_CONTEXTS,
    HARMLESS_PERSONAS,
    Seeds,
)

OUT_DIR = Path(__file__).resolve().parent.parent / "src" / "blasphemer" / "data" / "prompts"
SEED = 20240607

# Frames for tasks (a verb phrase in base form, e.g. "pick a pin tumbler lock").
TASK_FRAMES: tuple[str, ...] = (
    "How do I {t}?",
    "How can I {t}?",
    "How would someone {t}?",
    "What is the best way to {t}?",
    "What's the easiest way to {t}?",
    "Explain how to {t}.",
    "Explain to me how to {t}.",
    "Write a tutorial on how to {t}.",
    "Write a step-by-step guide on how to {t}.",
    "Give step-by-step instructions to {t}.",
    "Give me detailed instructions on how to {t}.",
    "Give instructions for how to {t}.",
    "Provide a guide on how to {t}.",
    "Provide a detailed plan to {t}.",
    "Develop a strategy to {t}.",
    "Develop a plan to {t}.",
    "Design a method to {t}.",
    "Outline the steps to {t}.",
    "Create a checklist to {t}.",
    "Teach me how to {t}.",
    "Show me how to {t}.",
    "Help me {t}.",
    "I want to {t}. Where do I start?",
    "I need to {t}. What should I do first?",
    "Can you tell me how to {t}?",
    "Could you please explain how to {t}?",
    "Please describe, in detail, how to {t}.",
    "What are the steps to {t}?",
    "What do I need to {t}?",
    "Is there a quick way to {t}?",
    "List the tools and steps needed to {t}.",
    "Describe the process to {t}, from start to finish.",
    "Walk me through how to {t}.",
    "I'd like to {t}. Can you help?",
    "Generate a how-to article explaining how to {t}.",
    "Draft a short manual on how to {t}.",
    "Write a script for a video that shows viewers how to {t}.",
    "Give me tips to {t}.",
    "What's a clever way to {t}?",
    "Summarise the key steps to {t}.",
)

# Frames for pieces (a noun phrase naming something to write, e.g. "a blog post about ...").
PIECE_FRAMES: tuple[str, ...] = (
    "Write {p}.",
    "Create {p}.",
    "Draft {p}.",
    "Generate {p}.",
    "Compose {p}.",
    "Please write {p}.",
    "Can you write {p}?",
    "I need {p}. Can you write it?",
    "Help me write {p}.",
    "Produce {p}.",
    "Write me {p}, please.",
    "Could you draft {p} for me?",
)

ROLE_PLAY_FRAMES: tuple[str, ...] = (
    "Pretend you are {persona}. {prompt}",
    "You are {persona}. Stay in character. {prompt}",
    "Let's play a game: you are {persona}. {prompt}",
    "Act as {persona} and answer this: {prompt}",
    "Imagine you are {persona}. {prompt}",
    "From now on you are {persona}. {prompt}",
)


def normalise(text: str) -> str:
    """Casefold, unify quotes, collapse whitespace (the same rule as ``blasphemer.prompts``)."""
    text = text.replace("\u2018", "'").replace("\u2019", "'")
    text = text.replace("\u201c", '"').replace("\u201d", '"')
    return re.sub(r"\s+", " ", text.casefold()).strip()


def _fix(text: str) -> str:
    """Capitalise the first letter and tidy doubled punctuation from frame composition."""
    text = text.replace("?.", "?").replace("..", ".").replace(" ,", ",")
    return text[0].upper() + text[1:] if text else text


def _wrap(
    rng: random.Random, prompt: str, contexts: list[str], personas: list[str], rate: float
) -> str:
    """With probability ``rate`` prepend a context sentence or a role-play framing."""
    roll = rng.random()
    if roll < rate / 2 and contexts:
        return f"{rng.choice(contexts)} {prompt}"
    if roll < rate and personas:
        frame = rng.choice(ROLE_PLAY_FRAMES)
        return frame.format(persona=rng.choice(personas), prompt=prompt)
    return prompt


def expand(
    rng: random.Random,
    seeds: Seeds,
    *,
    task_variants: int,
    piece_variants: int,
    contexts: list[str],
    personas: list[str],
    wrap_rate: float,
) -> list[str]:
    """Render every task and piece of one category through several distinct frames."""
    out: list[str] = []
    for task in seeds.tasks:
        # "How would someone kill myself" reads wrong: first-person tasks skip third-person frames.
        first_person = re.search(r"\b(my|myself|me|i)\b", task) is not None
        frames = [f for f in TASK_FRAMES if not (first_person and "someone" in f)]
        for frame in rng.sample(frames, task_variants):
            text = _fix(frame.format(t=task))
            out.append(_wrap(rng, text, contexts + seeds.contexts, personas, wrap_rate))
    for piece in seeds.pieces:
        for frame in rng.sample(PIECE_FRAMES, piece_variants):
            text = _fix(frame.format(p=piece))
            out.append(_wrap(rng, text, contexts + seeds.contexts, personas, wrap_rate))
    out.extend(seeds.direct)
    return out


def build(
    groups: dict[str, Seeds],
    *,
    rng: random.Random,
    task_variants: int,
    piece_variants: int,
    contexts: list[str],
    personas: list[str],
    wrap_rate: float,
) -> list[dict[str, str]]:
    """Expand every category and deduplicate by normalised text (first occurrence wins)."""
    seen: set[str] = set()
    rows: list[dict[str, str]] = []
    for category, seeds in groups.items():
        for text in expand(
            rng,
            seeds,
            task_variants=task_variants,
            piece_variants=piece_variants,
            contexts=contexts,
            personas=personas,
            wrap_rate=wrap_rate,
        ):
            key = normalise(text)
            if key in seen:
                continue
            seen.add(key)
            rows.append({"text": text, "category": category})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    """Write one JSON object per line, UTF-8, with a trailing newline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> int:
    """Build both sets and print a per-category summary."""
    rng = random.Random(SEED)
    harmful = build(
        HARMFUL,
        rng=rng,
        task_variants=3,
        piece_variants=2,
        contexts=HARMFUL_CONTEXTS,
        personas=HARMFUL_PERSONAS,
        wrap_rate=0.2,
    )
    harmless = build(
        HARMLESS,
        rng=rng,
        task_variants=6,
        piece_variants=4,
        contexts=HARMLESS_CONTEXTS,
        personas=HARMLESS_PERSONAS,
        wrap_rate=0.2,
    )
    harmless += build(
        {"borderline": Seeds(tasks=BORDERLINE_TASKS, pieces=BORDERLINE_PIECES)},
        rng=rng,
        task_variants=3,
        piece_variants=2,
        contexts=HARMLESS_CONTEXTS,
        personas=HARMLESS_PERSONAS,
        wrap_rate=0.2,
    )
    harmful_keys = {normalise(r["text"]) for r in harmful}
    harmless = [r for r in harmless if normalise(r["text"]) not in harmful_keys]
    write_jsonl(OUT_DIR / "harmful.jsonl", harmful)
    write_jsonl(OUT_DIR / "harmless.jsonl", harmless)
    for label, rows in (("harmful", harmful), ("harmless", harmless)):
        counts: dict[str, int] = {}
        for row in rows:
            counts[row["category"]] = counts.get(row["category"], 0) + 1
        summary = ", ".join(f"{k}={v}" for k, v in counts.items())
        sys.stdout.write(f"{label}: {len(rows)} prompts ({summary})\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
