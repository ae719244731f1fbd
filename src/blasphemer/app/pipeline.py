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

from blasphemer.app import final_stages, stages
from blasphemer.app.config import Settings
from blasphemer.app.console import Console
from blasphemer.app.context import RunContext
from blasphemer.directions import Directions
from blasphemer.editing import Ablation
from blasphemer.evaluation.markers import is_refusal
from blasphemer.optimization import (
    TrialResult,
    completed_results,
)

STAGES = 10


def demo_model_path() -> Path:
    """Folder of the bundled demo model."""
    return Path(str(importlib.resources.files("blasphemer") / "data" / "demo-model"))


@dataclass(eq=False)
class RunResult:
    """What a finished run leaves in memory (``demo`` uses it for sample answers)."""

    ctx: RunContext
    directions: Directions
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

    finished = ["preflight"]  # the step whose time the next lap records

    def step(key: str, title: str) -> None:  # stages 2-4: load, map, prompts and batch size
        clock.lap(finished[0])
        finished[0] = key
        console.stage(2 + list(stages.PREPARE_STEPS).index(key), STAGES, title)

    ctx = stages.prepare(settings, console, step)

    clock.lap(finished[0])
    console.stage(5, STAGES, "Computing refusal directions (fit split)")
    directions = stages.compute_refusal_directions(ctx)

    clock.lap("directions")
    console.stage(6, STAGES, "Measuring the original model (select split)")
    scorers = ctx.select_scorers()
    baseline = scorers.refusals.evaluate()
    if settings.search_judge == "semantic":
        judged_by = "the semantic judge, whole answers"
    elif settings.exact_verdicts or settings.decided_after >= settings.max_new_tokens:
        judged_by = "markers, whole answers"
    else:
        judged_by = "markers, early verdicts"
    console.info(
        f"original model refuses {baseline.rate:.1%} of the harmful select prompts ({judged_by})"
    )
    note = scorers.layer_cache_note()
    if note is not None:
        console.info(note)

    clock.lap("baseline")
    console.stage(7, STAGES, "Opening the study")
    study_run = stages.open_study(ctx, directions)

    clock.lap("study")
    console.stage(8, STAGES, f"Optimising ({study_run.budget} trials in all)")
    stages.optimise(ctx, study_run, scorers)
    del scorers  # their layer caches: the held-out stage records its own

    clock.lap("trials")
    console.stage(9, STAGES, "Pareto front and held-out numbers (report split)")
    results = completed_results(study_run.study, study_run.space)
    results, front = final_stages.confirmed_front(ctx, directions, study_run.study, results)
    clock.lap("confirm_front")
    findings = final_stages.Findings(results, front, final_stages.held_out(ctx, directions, front))

    clock.lap("held_out")
    console.stage(10, STAGES, "Choosing and saving")
    chosen = final_stages.choose(ctx, findings)
    if chosen is None:
        return RunResult(ctx, directions, None, None)
    # results.json "timings_s": seconds per stage, the batch size and why it was chosen.
    timings: dict[str, Any] = {
        **clock.laps,
        "batch_size": ctx.batch_size,
        "batch_size_choice": ctx.batch.to_dict(),
    }
    final_stages.save(ctx, directions, findings, chosen, target, timings=timings)
    return RunResult(ctx, directions, chosen, target)


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
    finished = _run(demo_settings, console)
    if finished.chosen is not None and finished.chosen.parameters is not None:
        _samples(finished, console)
    return 0


def _samples(run: RunResult, console: Console, count: int = 2, pool: int = 8) -> None:
    """Answers before and after to ``count`` held-out harmful prompts the original refuses.

    The first ``pool`` report prompts are tried; refused ones are shown first, so that the
    samples show what the edit changed (falling back to the first prompts if few are refused).
    """
    parameters = run.chosen.parameters  # type: ignore[union-attr]
    assert parameters is not None
    ctx = run.ctx
    tokenizer = ctx.loaded.tokenizer
    texts = ctx.prompts.harmful.report[:pool]
    requests = ctx.prompts.harmful.report_prompts[:pool]

    def answers() -> list[str]:
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        batch = batch.to(ctx.loaded.input_device)
        with torch.inference_mode():
            generate = ctx.loaded.model.generate
            output = generate(**batch, max_new_tokens=40, do_sample=False)  # type: ignore[operator]
        new = output[:, batch["input_ids"].shape[1] :]
        return [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]

    before = answers()
    order = sorted(
        range(len(texts)), key=lambda i: not is_refusal(before[i], ctx.settings.refusal_markers)
    )[:count]
    texts, requests = [texts[i] for i in order], [requests[i] for i in order]
    before = [before[i] for i in order]
    with Ablation(run.directions, parameters).apply(ctx.model_map):
        after = answers()
    for request, old, new in zip(requests, before, after, strict=True):
        console.info(f"\nprompt: {request}\n  before: {old}\n  after:  {new}")
