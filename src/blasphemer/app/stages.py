"""The stage implementations that :mod:`blasphemer.app.pipeline` sequences, up to the search.

Each function does one numbered stage of a run (or a worker's share of one) and returns a value
object for the next; none of them calls another stage. Stages 9 and 10 (held-out numbers,
choosing, saving) are in :mod:`blasphemer.app.final_stages`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch

from blasphemer import architectures, export, loading
from blasphemer.app import preflight
from blasphemer.app.config import Settings
from blasphemer.app.console import Console, TrialMonitor
from blasphemer.app.context import (
    Prompts,
    RunContext,
    Scorers,
    load_prompts,
    select_prompts,
    shared_settings,
)
from blasphemer.directions import Directions, compute_directions
from blasphemer.errors import ConfigError
from blasphemer.evaluation.base import load_scorer_classes
from blasphemer.evaluation.batching import BatchChoice, choose_batch_size
from blasphemer.optimization import (
    Objective,
    OpenedStudy,
    SearchSpace,
    TrialResult,
    count_trials,
    create_or_load_study,
    default_storage_url,
    default_study_name,
    enqueue_once,
    parse_rule,
    redact_url,
)
from blasphemer.optimization.metadata import store_metadata, stored_budget
from blasphemer.optimization.runner import BudgetGate, run_trials
from blasphemer.residuals import mean_residuals


def slug(model_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(model_id.rstrip("/")).name or "model")


def run_dir(settings: Settings, model_id: str) -> Path:
    return settings.run_dir or Path("blasphemer-runs") / slug(model_id)


def output_dir(settings: Settings, model_id: str) -> Path:
    return settings.output_dir or Path(f"{slug(model_id)}-blasphemer")


def preflight_checks(settings: Settings, output_dir: Path, console: Console) -> None:
    """Stage 1: check every input that can be checked without the model, cheapest first.

    Options, files and folders that would otherwise fail only after the model is loaded (or
    after the study has run) fail here, in seconds, with one line each; nothing is created.
    """
    assert settings.model is not None
    if settings.select is not None:
        parse_rule(settings.select)
    if settings.architecture_override is not None:
        architectures.load_override(settings.architecture_override)
    for scorer_file in settings.scorers:
        load_scorer_classes(str(scorer_file))
    preflight.check_judge(settings.judge, settings.search_judge, settings.judge_encoder)
    gguf = preflight.check_gguf(settings.model, settings.gguf_file)
    source = gguf.path if gguf is not None else preflight.check_model_path(settings.model)
    if source is not None and gguf is None:
        preflight.check_weight_files(source)
    preflight.check_output_dir(output_dir, source, 0)
    if (
        output_dir.is_dir()
        and any(output_dir.iterdir())
        and not export.is_blasphemer_output(output_dir)
    ):
        raise ConfigError(
            f"--output-dir {output_dir} exists and holds files that Blasphemer did not write; "
            "choose an empty or new folder"
        )
    if settings.storage is None:
        preflight.check_writable_folder(run_dir(settings, settings.model), "--run-dir")
    preflight.check_storage(
        settings.storage or default_storage_url(run_dir(settings, settings.model))
    )
    select_prompts(settings)  # prompt files: readable, well formed, enough for every split
    if source is not None:
        quantization = settings.quantization
        memory = (
            preflight.estimate_gguf(gguf, settings.dtypes, settings.device_map, quantization)
            if gguf is not None
            else preflight.estimate(source, settings.dtypes, settings.device_map, quantization)
        )
        preflight.check_memory(memory, settings.dtypes)
        preflight.check_output_dir(output_dir, source, memory.weights_on_disk)
        console.info(memory.summary())


def load_model(
    settings: Settings, model: str | None = None, gguf_file: str | None = None
) -> loading.LoadedModel:
    """Load ``model`` (default: ``settings.model`` and its ``--gguf-file``) as settings say."""
    if model is None:
        assert settings.model is not None
        model, gguf_file = settings.model, settings.gguf_file
    return loading.load_model(
        model,
        dtypes=settings.dtypes,
        device_map=settings.device_map,
        quantization=settings.quantization,
        trust_remote_code=settings.trust_remote_code,
        revision=settings.revision,
        gguf_file=gguf_file,
    )


def resolve_map(settings: Settings, loaded: loading.LoadedModel) -> architectures.ModelMap:
    """The layer map of ``loaded``, with ``--architecture-override`` when given."""
    override = (
        architectures.load_override(settings.architecture_override)
        if settings.architecture_override
        else None
    )
    return architectures.resolve(loaded.model, override)


def map_model(
    settings: Settings, loaded: loading.LoadedModel, console: Console
) -> architectures.ModelMap:
    model_map = resolve_map(settings, loaded)
    writers = sum(len(w) for w in model_map.writers)
    console.info(
        f"{model_map.spec_name}: {model_map.n_layers} layers, hidden {model_map.hidden_size}, "
        f"{writers} writers, dtype {str(loaded.dtype).removeprefix('torch.')}"
    )
    hint = loading.slow_dtype_hint(loaded)
    if hint is not None:
        console.warn(hint)
    return model_map


def batch_size(
    settings: Settings, loaded: loading.LoadedModel, prompts: Prompts, console: Console
) -> BatchChoice:
    """The batch size: ``--batch-size`` if given, else measured under a memory ceiling."""
    if settings.batch_size is not None:
        return BatchChoice(settings.batch_size, "set by --batch-size", settings.batch_size)
    every_text = [
        *(text for part in (prompts.harmful, prompts.harmless) for text in part.fit),
        *(text for part in (prompts.harmful, prompts.harmless) for text in part.select),
        *(text for part in (prompts.harmful, prompts.harmless) for text in part.report),
    ]
    choice = choose_batch_size(
        loaded,
        prompts.harmful.select,
        settings.max_batch_size,
        response_tokens=settings.max_new_tokens,
        sizing_texts=every_text,
    )
    console.info(f"batch size {choice.size} (measured; --batch-size to override)")
    return choice


PREPARE_STEPS = {
    "load": "Loading {model}",
    "map": "Mapping layers and residual-stream writers",
    "prompts_and_batch_size": "Loading and splitting prompt sets",
}
"""The steps of :func:`prepare`: a key (for timings) and a title (for the stage line)."""


def prepare(
    settings: Settings,
    console: Console,
    on_step: Callable[[str, str], None] | None = None,
    *,
    model: str | None = None,
    gguf_file: str | None = None,
) -> RunContext:
    """Load the model, map its layers, load the prompt splits and choose the batch size: the
    run's pieces, built once. ``on_step(key, title)`` is called before each step (see
    :data:`PREPARE_STEPS`). ``model`` and ``gguf_file`` default to the settings' own."""
    shown = model or settings.model

    def step(key: str) -> None:
        if on_step is not None:
            on_step(key, PREPARE_STEPS[key].format(model=shown))

    step("load")
    loaded = load_model(settings, model, gguf_file)
    step("map")
    model_map = map_model(settings, loaded, console)
    step("prompts_and_batch_size")
    prompts = load_prompts(settings, loaded.tokenizer)
    choice = batch_size(settings, loaded, prompts, console)
    return RunContext(settings, console, loaded, model_map, prompts, choice)


def compute_refusal_directions(ctx: RunContext) -> Directions:
    """Refusal directions from the mean residuals of the fit split (harmful − harmless)."""
    prompts, console = ctx.prompts, ctx.console
    means = {}
    for name, texts in (("harmful", prompts.harmful.fit), ("harmless", prompts.harmless.fit)):
        with console.progress(f"residuals of {len(texts)} {name} prompts", len(texts)) as advance:
            means[name] = mean_residuals(
                ctx.loaded, ctx.model_map, texts, batch_size=ctx.batch_size, on_batch=advance
            )
    directions = compute_directions(
        means["harmful"], means["harmless"], projected=ctx.settings.projected_directions
    )
    best = int(torch.argmax(directions.strength))
    console.info(f"strongest separation at layer {best} of {directions.n_layers}")
    return directions


@dataclass(eq=False)
class StudyRun:
    """An open study and what its trials use: the trial budget, directions and search space."""

    study: optuna.Study
    budget: int
    directions: Directions
    space: SearchSpace


def open_study(ctx: RunContext, directions: Directions) -> StudyRun:
    """Create or resume the run's study, store what workers need, queue the reference trial."""
    settings, console = ctx.settings, ctx.console
    assert settings.model is not None
    space = ctx.search_space()
    url = settings.storage or default_storage_url(run_dir(settings, settings.model))
    name = settings.study_name or default_study_name(settings.model)
    fingerprint = ctx.fingerprint()

    def open_with(resume: bool | None) -> OpenedStudy:
        return create_or_load_study(
            url,
            name,
            resume=resume,
            seed=settings.seed,
            fingerprint=fingerprint,
            n_startup_trials=settings.n_startup_trials,
            heartbeat_interval=settings.heartbeat_interval,
            grace_period=settings.grace_period,
        )

    opened = open_with(settings.resume)
    if opened.needs_decision and not settings.yes:  # --yes asks nothing: continue (the default)
        choice = console.ask(
            f"study {name!r} already has {opened.counts.complete} finished trials: "
            "continue it or start over?",
            ["continue", "restart"],
            "continue",
        )
        if choice == "restart":
            opened = open_with(False)
    study = opened.study
    counts = count_trials(study)
    stored = stored_budget(study)
    explicit = "n_trials" in settings.model_fields_set
    budget = settings.n_trials if explicit or stored is None else stored
    store_metadata(study, shared_settings(settings), directions, budget)
    with BudgetGate(study).hold():  # serialised with every ask: two runs queue it only once
        fresh = count_trials(study)
        if fresh.complete == 0 and fresh.waiting == 0:
            enqueue_once(study, space.reference_params(reference_index(directions, space)))
    verb = "resuming" if counts.complete else "starting"
    console.info(
        f"{verb} study {name!r} in {redact_url(url)}: {counts.complete} of {budget} trials done"
    )
    return StudyRun(study, budget, directions, space)


def reference_index(directions: Directions, space: SearchSpace) -> float:
    """The layer with the strongest separation inside the searched direction range."""
    low, high = space.direction_index
    strength = directions.strength.clone()
    for layer in range(directions.n_layers):
        if not low <= layer <= high:
            strength[layer] = -1.0
    return float(torch.argmax(strength)) if strength.max() >= 0 else (low + high) / 2


def optimise(ctx: RunContext, run: StudyRun, scorers: Scorers) -> None:
    """Run trials until the study's budget is used (by this process and any workers)."""
    study, budget, settings, console = run.study, run.budget, ctx.settings, ctx.console
    counts = count_trials(study)
    monitor = TrialMonitor(total=budget, done_before=counts.complete)

    def finished(result: TrialResult) -> None:
        console.trial_finished(monitor, result.number, result.refusal_rate, result.kl)

    objective = Objective(
        model_map=ctx.model_map,
        directions=run.directions,
        search_space=run.space,
        refusal_scorer=scorers.refusals,
        kl_scorer=scorers.kl,
        extra_scorers=scorers.extra,
        on_trial_end=finished,
        prune_dominated=settings.prune_dominated,
    )
    gate = BudgetGate(study)
    run_trials(
        study,
        objective,
        budget=budget,
        gate=gate,
        heartbeat_interval=settings.heartbeat_interval,
        on_wait=lambda: console.info("waiting for other workers' last trials ..."),
    )
