"""The main job as a table of contents: ten numbered stages from a model name to a saved model.

``run`` starts (or resumes, or joins) a study and ends with a chosen, saved model; ``work`` joins
a study that ``run`` started elsewhere and only runs trials; ``demo`` is ``run`` on the bundled
demo model with sample answers before and after.
"""

from __future__ import annotations

import importlib.resources
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from blasphemer import architectures, loading
from blasphemer.app import final_stages, stages
from blasphemer.app.config import Settings
from blasphemer.app.console import Console
from blasphemer.app.context import (
    Prompts,
    build_scorers,
    load_prompts,
)
from blasphemer.directions import Directions
from blasphemer.editing import Ablation
from blasphemer.evaluation.markers import is_refusal
from blasphemer.optimization import (
    SearchSpace,
    TrialResult,
    completed_results,
    pareto_front,
)

STAGES = 10


def demo_model_path() -> Path:
    """Folder of the bundled demo model."""
    return Path(str(importlib.resources.files("blasphemer") / "data" / "demo-model"))


@dataclass(eq=False)
class RunResult:
    """What a finished run leaves in memory (``demo`` uses it for sample answers)."""

    loaded: loading.LoadedModel
    model_map: architectures.ModelMap
    directions: Directions
    prompts: Prompts
    chosen: TrialResult | None
    output_dir: Path | None


def run(settings: Settings, console: Console) -> int:
    """``blasphemer run MODEL``: optimise, choose and save. Returns the exit code."""
    _run(settings, console)
    return 0


class _Stopwatch:
    """Seconds spent per stage, for ``results.json`` (benchmarks read them)."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self._last, 3)
        self._last = now


def _run(settings: Settings, console: Console) -> RunResult:
    assert settings.model is not None
    clock = _Stopwatch()
    console.stage(1, STAGES, "Preflight")
    target = stages.output_dir(settings, settings.model)
    stages.preflight_checks(settings, target, console)

    clock.lap("preflight")
    console.stage(2, STAGES, f"Loading {settings.model}")
    loaded = stages.load_model(settings)

    clock.lap("load")
    console.stage(3, STAGES, "Mapping layers and residual-stream writers")
    model_map = stages.map_model(settings, loaded, console)

    clock.lap("map")
    console.stage(4, STAGES, "Loading and splitting prompt sets")
    prompts = load_prompts(settings, loaded.tokenizer)
    batch_choice = stages.batch_size(settings, loaded, prompts, console)
    batch = batch_choice.size

    clock.lap("prompts_and_batch_size")
    console.stage(5, STAGES, "Computing refusal directions (fit split)")
    directions = stages.compute_refusal_directions(
        settings, loaded, model_map, prompts, batch, console
    )

    clock.lap("directions")
    console.stage(6, STAGES, "Measuring the original model (select split)")
    scorers = build_scorers(settings, loaded, prompts, batch)
    baseline = scorers.refusals.evaluate()
    console.info(f"original model refuses {baseline.rate:.1%} of the harmful select prompts")

    clock.lap("baseline")
    console.stage(7, STAGES, "Opening the study")
    space = SearchSpace.build(model_map.n_layers, norm_preserving=settings.norm_preserving)
    study, budget = stages.open_study(settings, loaded, prompts, directions, space, console)

    clock.lap("study")
    console.stage(8, STAGES, f"Optimising ({budget} trials in all)")
    stages.optimise(settings, study, budget, model_map, directions, space, scorers, console)

    clock.lap("trials")
    console.stage(9, STAGES, "Pareto front and held-out numbers (report split)")
    results = completed_results(study, space)
    front = pareto_front(results)
    held_out = final_stages.held_out(
        settings, loaded, model_map, directions, prompts, front, batch, console
    )

    clock.lap("held_out")
    console.stage(10, STAGES, "Choosing and saving")
    chosen = final_stages.choose(settings, results, front, console, held_out)
    if chosen is None:
        return RunResult(loaded, model_map, directions, prompts, None, None)
    # results.json "timings_s": seconds per stage, the batch size and why it was chosen.
    timings: dict[str, Any] = {
        **clock.laps,
        "batch_size": batch,
        "batch_size_choice": batch_choice.to_dict(),
    }
    final_stages.save(
        settings,
        loaded,
        model_map,
        directions,
        results,
        front,
        chosen,
        held_out,
        target,
        console,
        timings=timings,
    )
    return RunResult(loaded, model_map, directions, prompts, chosen, target)


def demo(settings: Settings, console: Console) -> int:
    """``blasphemer demo``: the main job on the bundled demo model, then answers before/after."""
    updates: dict[str, object] = {
        "model": str(demo_model_path()),
        "yes": True,
        "output_dir": settings.output_dir or Path("blasphemer-demo"),
        "dtypes": ["float32"],
        "resume": settings.resume if settings.resume is not None else False,
    }
    if "n_trials" not in settings.model_fields_set:
        updates["n_trials"] = 40
    demo_settings = settings.model_copy(update=updates)
    outcome = _run(demo_settings, console)
    if outcome.chosen is not None and outcome.chosen.parameters is not None:
        _samples(outcome, console)
    return 0


def _samples(outcome: RunResult, console: Console, count: int = 2, pool: int = 8) -> None:
    """Answers before and after to ``count`` held-out harmful prompts the original refuses.

    The first ``pool`` report prompts are tried; refused ones are shown first, so that the
    samples show what the edit changed (falling back to the first prompts if few are refused).
    """
    parameters = outcome.chosen.parameters  # type: ignore[union-attr]
    assert parameters is not None
    tokenizer = outcome.loaded.tokenizer
    texts = outcome.prompts.harmful.report[:pool]
    requests = outcome.prompts.harmful.report_prompts[:pool]

    def answers() -> list[str]:
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        batch = batch.to(outcome.loaded.input_device)
        with torch.inference_mode():
            generate = outcome.loaded.model.generate
            output = generate(**batch, max_new_tokens=40, do_sample=False)  # type: ignore[operator]
        new = output[:, batch["input_ids"].shape[1] :]
        return [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]

    before = answers()
    order = sorted(range(len(texts)), key=lambda i: not is_refusal(before[i]))[:count]
    texts, requests = [texts[i] for i in order], [requests[i] for i in order]
    before = [before[i] for i in order]
    with Ablation(outcome.directions, parameters).apply(outcome.model_map):
        after = answers()
    for request, old, new in zip(requests, before, after, strict=True):
        console.info(f"\nprompt: {request}\n  before: {old}\n  after:  {new}")
