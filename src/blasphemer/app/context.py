"""The prepared pieces of a run that every worker of a study shares, built from settings.

:class:`RunContext` holds them (settings, console, model, layer map, prompt splits, batch size)
and builds what is made of them (scorers, the study fingerprint); the stages, ``evaluate`` and the
worker take it instead of long argument lists. :func:`blasphemer.app.stages.prepare` builds it,
so that ``run``, ``worker`` and ``evaluate`` build it the same way.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from blasphemer import prompts as prompt_sets
from blasphemer.app.config import Settings
from blasphemer.app.console import Console
from blasphemer.architectures import ModelMap
from blasphemer.errors import DatasetError
from blasphemer.evaluation import KLScorer, RefusalScorer, ScorerContext, load_scorers
from blasphemer.evaluation.base import Scorer
from blasphemer.evaluation.batching import BatchChoice
from blasphemer.evaluation.frozen import LayerCache
from blasphemer.evaluation.judged import JudgedRefusalScorer, judge_responses
from blasphemer.evaluation.judges import make_judge
from blasphemer.evaluation.judging import Judge
from blasphemer.evaluation.refusals import RefusalResult
from blasphemer.loading import LoadedModel
from blasphemer.optimization.fingerprint import build_fingerprint, model_digest
from blasphemer.optimization.search_space import SearchSpace

# Settings a worker may choose for itself: they change speed or display, never scores.
WORKER_LOCAL = ("storage", "study_name", "batch_size", "device_map", "quiet", "debug", "run_dir")


@dataclass(frozen=True)
class PromptSplits:
    """One prompt set's three parts, trimmed to the configured sizes, and rendered."""

    fit: list[str]
    select: list[str]
    report: list[str]
    report_prompts: list[str]  # the raw report requests, for sample answers and the judge
    select_prompts: list[str]  # the raw select requests, for a judge in the search
    fingerprint: str


@dataclass(frozen=True)
class Prompts:
    harmful: PromptSplits
    harmless: PromptSplits


def _trim(items: tuple[prompt_sets.Prompt, ...], limit: int, seed: int) -> list[prompt_sets.Prompt]:
    if len(items) <= limit:
        return list(items)
    return random.Random(seed).sample(list(items), limit)


def _load_splits(spec: str, column: str | None, kind: str, seed: int) -> prompt_sets.Splits:
    if spec == f"bundled:{kind}" and seed == 0:
        return prompt_sets.bundled_splits(kind)
    return prompt_sets.split_prompt_set(prompt_sets.load_prompt_set(spec, column=column), seed=seed)


PartPrompts = tuple[list[prompt_sets.Prompt], list[prompt_sets.Prompt], list[prompt_sets.Prompt]]


def select_prompts(settings: Settings) -> tuple[PartPrompts, PartPrompts]:
    """Read, split and trim both prompt sets (harmful, harmless), each as fit/select/report.

    Needs no model, so preflight calls it to check the prompt files before anything is loaded.
    Harmful prompts are removed from the harmless set. Raises :class:`DatasetError` for a
    missing, unreadable or malformed file, or a set too small for every split.
    """
    harmful = _load_splits(
        settings.harmful, settings.harmful_column, "harmful", settings.split_seed
    )
    harmless = _load_splits(
        settings.harmless, settings.harmless_column, "harmless", settings.split_seed
    )
    all_harmful = (*harmful.fit.prompts, *harmful.select.prompts, *harmful.report.prompts)
    reference = prompt_sets.PromptSet("harmful", all_harmful, settings.harmful)

    def trimmed(splits: prompt_sets.Splits, clean: bool) -> PartPrompts:
        parts = []
        for part, limit in (
            (splits.fit, settings.max_fit_prompts),
            (splits.select, settings.n_select_prompts),
            (splits.report, settings.n_report_prompts),
        ):
            if clean:
                part = prompt_sets.remove_overlap(part, reference)
            if len(part) == 0:
                raise DatasetError(
                    f"the {part.name} split of {part.source} is empty after removing overlaps; "
                    "use a larger prompt set"
                )
            parts.append(_trim(part.prompts, limit, settings.split_seed))
        return parts[0], parts[1], parts[2]

    return trimmed(harmful, clean=False), trimmed(harmless, clean=True)


def load_prompts(settings: Settings, tokenizer: Any) -> Prompts:
    """Load, split, trim and render both prompt sets. Harmful prompts are removed from harmless."""

    def build(parts: PartPrompts) -> PromptSplits:
        rendered = [
            prompt_sets.render(tokenizer, p, system_prompt=settings.system_prompt) for p in parts
        ]
        texts = [p.text for group in parts for p in group]
        digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()
        fit, select, report = rendered
        return PromptSplits(
            fit,
            select,
            report,
            report_prompts=[p.text for p in parts[2]],
            select_prompts=[p.text for p in parts[1]],
            fingerprint=digest,
        )

    harmful, harmless = select_prompts(settings)
    return Prompts(build(harmful), build(harmless))


@dataclass(eq=False)
class Scorers:
    refusals: RefusalScorer | JudgedRefusalScorer
    kl: KLScorer
    extra: list[Scorer]

    def _generating(self) -> RefusalScorer:
        """The scorer that generates the refusal answers (inside a judged one, if judged)."""
        refusals = self.refusals
        return refusals.scorer if isinstance(refusals, JudgedRefusalScorer) else refusals

    def record_layers(self) -> None:
        """Fill the refusal scorer's layer cache now (the KL scorer's is filled when built);
        for a process that scores no unedited pass before its trials (a worker)."""
        self._generating().record_layers()

    def layer_cache_note(self) -> str | None:
        """One line on the trials' layer caches (None when ``--layer-cache-mib 0``)."""
        layer_caches = (self.kl.layer_cache, self._generating().layer_cache)
        caches = [c for c in layer_caches if c is not None]
        if not caches:
            return None
        off = [c.why_off for c in caches if not c.enabled]
        if off:
            return f"layer cache off: {off[0]}; every trial runs every layer"
        mib = sum(c.bytes for c in caches) / 2**20
        stride = max(c.stride for c in caches)
        every = "" if stride == 1 else f" (kept every {stride} layers)"
        return (
            f"layer cache: {mib:.0f} MiB recorded{every}; trials skip the layers below "
            "their first edited layer"
        )


@dataclass(eq=False)
class RunContext:
    """A run's pieces, each built once from its settings; see the module docstring."""

    settings: Settings
    console: Console
    loaded: LoadedModel
    model_map: ModelMap
    prompts: Prompts
    batch: BatchChoice
    _semantic: Judge | None = field(default=None, repr=False)

    @property
    def batch_size(self) -> int:
        return self.batch.size

    def refusal_scorer(
        self,
        texts: list[str],
        decided_after: int | None = None,
        *,
        for_judge: bool = False,
        whole: bool = False,
        cached: bool = False,
    ) -> RefusalScorer:
        """Refusals of the context's model on ``texts`` as the settings say;
        ``decided_after=None`` judges full-length answers. A refusal marker ends its answer
        early (the marker verdict is the same, the work smaller), except in answers the
        semantic judge reads, which it needs whole: answers ``for_judge`` when ``--judge``
        asks for it, and every answer with ``whole`` (the search's, with ``--search-judge
        semantic``). A ``cached`` scorer, built while the model is unedited, keeps a layer
        cache that its first pass on the unedited model fills."""
        return RefusalScorer(
            self.loaded,
            texts,
            markers=self.settings.refusal_markers,
            max_new_tokens=self.settings.max_new_tokens,
            decided_after=decided_after,
            batch_size=self.batch_size,
            stop_at_marker=not (whole or (for_judge and self.settings.judge != "markers")),
            layer_cache=self._layer_cache() if cached else None,
            draft_tokens=self.settings.draft_tokens,
        )

    def semantic_judge(self) -> Judge | None:
        """The semantic judge when ``--judge`` or ``--search-judge`` asks for it (built once),
        else None."""
        if self.settings.judge == "markers" and self.settings.search_judge == "markers":
            return None
        if self._semantic is None:
            self._semantic = make_judge(
                "semantic", self.settings.refusal_markers, self.settings.judge_encoder
            )
        return self._semantic

    def semantic_refusals(
        self, scorer: RefusalScorer, result: RefusalResult, prompts: list[str]
    ) -> int | None:
        """How many of ``result``'s answers (to the raw ``prompts``) the semantic judge calls
        refusals; None when ``--judge`` does not ask for it."""
        if self.settings.judge == "markers":
            return None
        judge = self.semantic_judge()
        assert judge is not None  # --judge asks for it
        return sum(judge_responses(judge, prompts, result.responses, scorer.response_prefix))

    def search_refusals(self, decided_after: int | None) -> RefusalScorer | JudgedRefusalScorer:
        """The search's refusal count on the select split: markers on answers that stop once
        decided, or with ``--search-judge semantic`` the semantic judge on whole answers."""
        harmful = self.prompts.harmful
        if self.settings.search_judge == "markers":
            return self.refusal_scorer(harmful.select, decided_after, cached=True)
        judge = self.semantic_judge()
        assert judge is not None  # --search-judge asks for it
        whole = self.refusal_scorer(harmful.select, None, whole=True, cached=True)
        return JudgedRefusalScorer(whole, judge, harmful.select_prompts)

    def kl_scorer(self, texts: list[str], *, cached: bool = False) -> KLScorer:
        """KL from the run's model as it is now (unedited) on ``texts``, as the settings say;
        a ``cached`` scorer records its prefills for the layer cache (in the pass it makes
        anyway)."""
        return KLScorer(
            self.loaded,
            texts,
            batch_size=self.batch_size,
            positions=self.settings.kl_positions,
            layer_cache=self._layer_cache() if cached else None,
        )

    def _layer_cache(self) -> LayerCache | None:
        """A fresh layer cache for one prompt set (None when ``--layer-cache-mib 0``)."""
        budget = self.settings.layer_cache_mib << 20
        if budget == 0:
            return None
        layers = self.loaded.model.get_submodule(self.model_map.layers_path)
        embeddings = self.loaded.model.get_input_embeddings()
        if not isinstance(layers, nn.ModuleList) or not isinstance(embeddings, nn.Module):
            return None
        return LayerCache(layers, embeddings, budget_bytes=budget)

    def select_scorers(self) -> Scorers:
        """Scorers on the *select* split; call while the model is unedited (KL caches the
        original). The refusal scorer's layer cache fills in its first unedited pass (the
        original model's measurement) or :meth:`Scorers.record_layers`."""
        settings, prompts = self.settings, self.prompts
        decided_after = None if settings.exact_verdicts else settings.decided_after
        context = ScorerContext(
            loaded=self.loaded,
            harmful_texts=prompts.harmful.select,
            harmless_texts=prompts.harmless.select,
            batch_size=self.batch_size,
            max_new_tokens=settings.max_new_tokens,
            decided_after=decided_after,
            markers=settings.refusal_markers,
        )
        return Scorers(
            self.search_refusals(decided_after),
            self.kl_scorer(prompts.harmless.select, cached=True),
            load_scorers([str(p) for p in settings.scorers], context),
        )

    def search_space(self) -> SearchSpace:
        """The parameters trials draw, for this model's layers and the settings."""
        low, high = self.settings.max_weight_range
        return SearchSpace.build(
            self.model_map.n_layers,
            max_weight=(low, high),
            norm_preserving=self.settings.norm_preserving,
        )

    def fingerprint(self) -> dict[str, Any]:
        """What the study's scores depend on; a worker or run with a different one is refused."""
        loaded = self.loaded
        return build_fingerprint(
            model_id=loaded.model_id,
            revision=loaded.revision,
            dtype=str(loaded.dtype).removeprefix("torch."),
            settings=self.settings.model_dump(mode="json"),
            prompt_fingerprints={
                "harmful": self.prompts.harmful.fingerprint,
                "harmless": self.prompts.harmless.fingerprint,
            },
            model_digest=model_digest(loaded.model_id),
        )


def shared_settings(settings: Settings) -> dict[str, Any]:
    """Settings stored in the study for workers: everything but the worker-local ones."""
    data = settings.model_dump(mode="json")
    return {k: v for k, v in data.items() if k not in WORKER_LOCAL}
