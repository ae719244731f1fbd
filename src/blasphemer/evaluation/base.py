"""The scorer contract, a minimal reference implementation, and loading scorers from user files.

A *scorer* is one objective of the study: an object with a ``name`` and a ``score()`` method that
returns a float, **lower is better**, measured on the model as it is when ``score()`` is called
(i.e. with the trial's edit applied). Anything that fits :class:`Scorer` works; the built-in
:class:`~blasphemer.evaluation.refusals.RefusalScorer` and
:class:`~blasphemer.evaluation.kl.KLScorer` do.

User scorers live in a Python file named in the settings (``scorers = ["my_scorer.py"]``). The
file defines one or more subclasses of :class:`BaseScorer`; each is constructed once, with a
:class:`ScorerContext`, while the model is still **unedited** (so it can cache a baseline, as the
KL scorer does), and then scored once per trial. :class:`HarmlessRefusals` is the reference.
"""

from __future__ import annotations

import abc
import hashlib
import importlib.util
import inspect
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from blasphemer.errors import ConfigError
from blasphemer.evaluation.generation import ModelLike
from blasphemer.evaluation.markers import DEFAULT_DECIDED_AFTER, DEFAULT_REFUSAL_MARKERS
from blasphemer.evaluation.refusals import RefusalScorer


@runtime_checkable
class Scorer(Protocol):
    """One objective: ``score()`` measures the model as it is now; lower is better."""

    @property
    def name(self) -> str: ...

    def score(self) -> float: ...


@dataclass(frozen=True)
class ScorerContext:
    """What a user scorer is built from. Texts are chat-rendered prompts of the *select* split."""

    loaded: ModelLike
    harmful_texts: list[str]
    harmless_texts: list[str]
    batch_size: int = 16
    max_new_tokens: int = 100
    decided_after: int | None = DEFAULT_DECIDED_AFTER
    markers: Sequence[str] = field(default=DEFAULT_REFUSAL_MARKERS)


class BaseScorer(abc.ABC):
    """Base class of user scorers.

    Contract: set the class attribute ``name`` (unique among the study's objectives, used as the
    column name in results); ``__init__`` takes one :class:`ScorerContext` and runs while the
    model is unedited; ``score()`` returns a finite float, lower is better, and leaves the model
    as it found it (no lasting hooks or weight changes).
    """

    name: str  # set as a class attribute by every subclass

    def __init__(self, context: ScorerContext) -> None:
        self.context = context

    @abc.abstractmethod
    def score(self) -> float:
        """Measure the model as it is now. Lower is better."""


class HarmlessRefusals(BaseScorer):
    """Reference scorer: the refusal rate on *harmless* prompts (over-refusal), lower is better."""

    name = "harmless_refusals"

    def __init__(self, context: ScorerContext) -> None:
        super().__init__(context)
        self._scorer = RefusalScorer(
            context.loaded,
            context.harmless_texts,
            markers=context.markers,
            max_new_tokens=context.max_new_tokens,
            decided_after=context.decided_after,
            batch_size=context.batch_size,
        )

    def score(self) -> float:
        return self._scorer.evaluate().rate


def load_scorer_classes(spec: str | Path) -> list[type[BaseScorer]]:
    """The scorer classes a user file defines: ``path.py`` (all of them) or ``path.py:ClassName``.

    Raises :class:`ConfigError` naming the fix when the file is missing, fails to import, or
    defines no concrete :class:`BaseScorer` subclass.
    """
    path_text, _, class_name = str(spec).partition(":")
    path = Path(path_text).expanduser()
    if path.suffix != ".py" or not path.is_file():
        raise ConfigError(f"scorer file {path} not found: give the path of a .py file")
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    module_name = f"blasphemer_user_scorer_{digest}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"cannot import scorer file {path}: is it a Python source file?")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up by name
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:  # the user's code may raise anything; report it as a config error
        del sys.modules[module_name]
        raise ConfigError(
            f"scorer file {path} failed to import ({type(error).__name__}: {error}); fix the file"
        ) from error
    classes = [
        value
        for value in vars(module).values()
        if inspect.isclass(value)
        and issubclass(value, BaseScorer)
        and value.__module__ == module_name
        and not inspect.isabstract(value)
    ]
    if class_name:
        classes = [value for value in classes if value.__name__ == class_name]
    if not classes:
        wanted = f"a class {class_name}" if class_name else "a class"
        raise ConfigError(
            f"scorer file {path} defines no scorer: add {wanted} that subclasses "
            "blasphemer.evaluation.BaseScorer, sets `name` and implements score()"
        )
    for value in classes:
        if not isinstance(getattr(value, "name", None), str) or not value.name:
            raise ConfigError(f"scorer {value.__name__} in {path} needs a class attribute `name`")
    return classes


def load_scorers(specs: Sequence[str | Path], context: ScorerContext) -> list[Scorer]:
    """Build every scorer the user files define (see :func:`load_scorer_classes`), in order.

    Call it while the model is unedited. Raises :class:`ConfigError` on duplicate names.
    """
    scorers: list[Scorer] = []
    for spec in specs:
        scorers.extend(cls(context) for cls in load_scorer_classes(spec))
    names = [scorer.name for scorer in scorers]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"scorer names must be unique, {duplicates} repeat: rename one")
    return scorers


def check_score(scorer: Scorer, value: Any) -> float:
    """``value`` as a float, or a :class:`ConfigError` naming the scorer that returned it."""
    try:
        result = float(value)
    except (TypeError, ValueError) as error:
        raise ConfigError(
            f"scorer {scorer.name!r} returned {value!r}; score() must return a float"
        ) from error
    if result != result or result in (float("inf"), float("-inf")):
        raise ConfigError(f"scorer {scorer.name!r} returned {result}; score() must be finite")
    return result
