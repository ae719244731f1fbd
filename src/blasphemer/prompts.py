"""Prompt sets: load them, split them into fit / select / report, render them for a model.

A prompt set comes from the bundled data (``bundled:harmful``, ``bundled:harmless``), a local
file (``.txt``, ``.json``, ``.jsonl``, ``.csv``, ``.parquet``), a folder written by
``datasets.Dataset.save_to_disk`` or a Hugging Face dataset (``hf:owner/name[:split[:column]]``).
Every problem with the input raises :class:`~blasphemer.errors.DatasetError` with a one-line
message that names the file and the fix.

Prompts are compared by *normalised* text (casefolded, curly quotes unified, whitespace
collapsed): duplicates, overlap between splits and overlap between sets are all judged that way.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jinja2.exceptions import TemplateError

from blasphemer.errors import ConfigError, DatasetError
from blasphemer.prompt_files import read_bundled, read_hub, read_local

SPLIT_NAMES = ("fit", "select", "report")

# Plain format for tokenizers without a chat template (base models). Documented in the README.
FALLBACK_USER_FORMAT = "User: {text}\nAssistant:"
# Reasoning blocks a chat template may leave open at the end of the generation prompt.
REASONING_TAGS = (("<think>", "</think>"), ("<thinking>", "</thinking>"))

_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})
_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    """The comparison key of a prompt: casefolded, curly quotes unified, whitespace collapsed."""
    return _SPACE.sub(" ", text.translate(_QUOTES).casefold()).strip()


@dataclass(frozen=True)
class Prompt:
    """One request. ``category`` is optional; it stratifies the splits."""

    text: str
    category: str | None = None


@dataclass(frozen=True)
class PromptSet:
    """A named, ordered collection of prompts and where it came from."""

    name: str
    prompts: tuple[Prompt, ...]
    source: str

    def texts(self) -> list[str]:
        """The prompt texts, in order."""
        return [prompt.text for prompt in self.prompts]

    def fingerprint(self) -> str:
        """SHA-256 (hex) over the normalised texts in order; equal content gives equal prints."""
        payload = json.dumps([normalise(p.text) for p in self.prompts], ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass(frozen=True)
class Splits:
    """Three disjoint parts of one set: directions are fitted, trials selected, results reported."""

    fit: PromptSet
    select: PromptSet
    report: PromptSet


# ------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------


def load_prompt_set(spec: str, *, column: str | None = None, name: str | None = None) -> PromptSet:
    """Load a prompt set from ``spec``.

    ``spec`` is ``bundled:harmful`` / ``bundled:harmless``, a path to a ``.txt`` (one prompt per
    line, blank lines skipped), ``.json`` (a list of strings or of objects), ``.jsonl``, ``.csv``
    or ``.parquet`` file, a folder saved by ``datasets`` (optionally ``folder:split``; a
    ``DatasetDict`` defaults to ``train``), or ``hf:owner/name[:split[:column]]`` (downloads).
    ``column`` names the text field; without it ``text``, ``instruction`` and ``prompt`` are
    tried in turn. A ``category`` field, where present, is kept.

    Raises DatasetError (one line, naming the source and the fix) for a missing or unreadable
    source, a wrong column, an unsupported file type or a set without prompts.
    """
    if spec.startswith("bundled:"):
        default_name = spec.removeprefix("bundled:")
        records = read_bundled(default_name)
    elif spec.startswith("hf:"):
        records, default_name = read_hub(spec, column)
    else:
        records, default_name = read_local(spec, column)
    prompts = [Prompt(text, category) for text, category in records]
    if not prompts:
        raise DatasetError(f"{spec} holds no prompts; give a set with at least one non-empty text")
    return PromptSet(name=name or default_name, prompts=tuple(prompts), source=spec)


# ------------------------------------------------------------------------------------------
# Splitting and overlap
# ------------------------------------------------------------------------------------------


def deduplicate(ps: PromptSet) -> PromptSet:
    """The set without repeats by normalised text; the first occurrence is kept, order kept."""
    seen: set[str] = set()
    kept: list[Prompt] = []
    for prompt in ps.prompts:
        key = normalise(prompt.text)
        if key not in seen:
            seen.add(key)
            kept.append(prompt)
    return PromptSet(name=ps.name, prompts=tuple(kept), source=ps.source)


def remove_overlap(ps: PromptSet, *others: PromptSet) -> PromptSet:
    """``ps`` without any prompt whose normalised text appears in one of ``others``."""
    banned = {normalise(p.text) for other in others for p in other.prompts}
    kept = tuple(p for p in ps.prompts if normalise(p.text) not in banned)
    return PromptSet(name=ps.name, prompts=kept, source=ps.source)


def _split_sizes(total: int, fractions: Sequence[float]) -> list[int]:
    """Largest-remainder sizes for ``fractions`` of ``total``, each at least one."""
    exact = [total * f for f in fractions]
    sizes = [int(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: sizes[i] - exact[i])
    for i in by_remainder[: total - sum(sizes)]:
        sizes[i] += 1
    for i, size in enumerate(sizes):
        if size == 0:
            sizes[i] = 1
            sizes[max(range(len(sizes)), key=lambda j: sizes[j])] -= 1
    return sizes


def split_prompt_set(
    ps: PromptSet, *, seed: int = 0, fractions: Sequence[float] = (0.5, 0.25, 0.25)
) -> Splits:
    """Split ``ps`` into fit / select / report parts.

    Duplicates (by normalised text) are dropped first, so the parts never share a prompt. The
    split is stratified by category: each category is shuffled with its own seeded generator
    and spread evenly over the order from which the parts are cut, so every part holds about its
    fraction of every category. The same set, seed and fractions always give the same split.

    Raises ConfigError for fractions that are not three positive numbers summing to 1, and
    DatasetError when the set has too few distinct prompts to give every part at least one.
    """
    if len(fractions) != len(SPLIT_NAMES) or any(f <= 0 for f in fractions):
        raise ConfigError(
            f"split fractions {tuple(fractions)} are invalid; give three positive numbers"
        )
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ConfigError(
            f"split fractions {tuple(fractions)} sum to {sum(fractions):g}; make it 1"
        )
    unique = deduplicate(ps)
    total = len(unique)
    if total < len(SPLIT_NAMES):
        raise DatasetError(
            f"prompt set {ps.name} ({ps.source}) has {total} distinct prompts; splitting it into "
            f"{'/'.join(SPLIT_NAMES)} needs at least {len(SPLIT_NAMES)}, so add prompts"
        )
    groups: dict[str, list[Prompt]] = {}
    for prompt in unique.prompts:
        groups.setdefault(prompt.category or "", []).append(prompt)
    ranked: list[tuple[float, str, Prompt]] = []
    for category in sorted(groups):
        members = groups[category]
        random.Random(f"{seed}:{category}").shuffle(members)
        # Position j of n sits at (j + 0.5) / n: cutting the merged order at any fraction
        # takes about that fraction of every category.
        ranked.extend(((j + 0.5) / len(members), category, p) for j, p in enumerate(members))
    ranked.sort(key=lambda item: (item[0], item[1]))
    ordered = [prompt for _, _, prompt in ranked]
    parts: list[PromptSet] = []
    start = 0
    for part_name, size in zip(SPLIT_NAMES, _split_sizes(total, fractions), strict=True):
        chosen = tuple(ordered[start : start + size])
        parts.append(PromptSet(name=f"{ps.name}:{part_name}", prompts=chosen, source=ps.source))
        start += size
    return Splits(fit=parts[0], select=parts[1], report=parts[2])


@functools.cache
def bundled_splits(kind: str) -> Splits:
    """The fixed split (seed 0, fractions 0.5 / 0.25 / 0.25) of the bundled set ``kind``.

    The bundled demo model was trained on the ``fit`` part only; ``select`` and ``report`` are
    unseen by it.
    """
    return split_prompt_set(load_prompt_set(f"bundled:{kind}"), seed=0)


# ------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------


def _template_text(tokenizer: Any) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        return "\n".join(str(t) for t in template.values())
    return template if isinstance(template, str) and template else None


def _close_open_reasoning(text: str) -> str:
    """If ``text`` ends by opening a reasoning block, close it empty so the answer follows."""
    stripped = text.rstrip()
    for opening, closing in REASONING_TAGS:
        if stripped.endswith(opening):
            return f"{stripped}\n\n{closing}\n\n"
    return text


def render(
    tokenizer: Any, prompts: Sequence[Prompt | str], *, system_prompt: str | None = None
) -> list[str]:
    """Format each prompt as the model's generation prompt (text, not token ids).

    Uses ``tokenizer.apply_chat_template`` with ``add_generation_prompt=True``. The system
    prompt goes in as a system message; if the template rejects system messages it is put in
    front of the user message instead. For reasoning models the rendered text ends with an
    empty, closed reasoning block (``enable_thinking=False`` where the template knows it,
    otherwise an open ``<think>`` is closed), so generation starts with the answer.

    A tokenizer without a chat template (a base model) gets the plain format
    ``"User: {text}\\nAssistant:"``, preceded by the system prompt and a blank line if given.
    """
    texts = [p.text if isinstance(p, Prompt) else p for p in prompts]
    template = _template_text(tokenizer)
    if template is None:
        prefix = f"{system_prompt}\n\n" if system_prompt else ""
        return [prefix + FALLBACK_USER_FORMAT.format(text=text) for text in texts]
    extra: dict[str, Any] = {"enable_thinking": False} if "enable_thinking" in template else {}

    def apply(messages: list[dict[str, str]]) -> str:
        rendered = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **extra
        )
        return _close_open_reasoning(str(rendered))

    rendered: list[str] = []
    system_supported = True
    for text in texts:
        if system_prompt is None:
            rendered.append(apply([{"role": "user", "content": text}]))
            continue
        if system_supported:
            try:
                rendered.append(
                    apply(
                        [
                            {"role": "system", "content": system_prompt},
                            {"role": "user", "content": text},
                        ]
                    )
                )
                continue
            except TemplateError:
                # Templates such as Gemma's raise on a system role; fold it into the user turn.
                system_supported = False
        rendered.append(apply([{"role": "user", "content": f"{system_prompt}\n\n{text}"}]))
    return rendered
