"""The main job as a table of contents: ten numbered stages from a model name to a saved model.

``run`` starts (or resumes, or joins) a study and ends with a chosen, saved model; ``work`` joins
a study that ``run`` started elsewhere and only runs trials; ``demo`` is ``run`` on the bundled
demo model with sample answers before and after.
"""

from __future__ import annotations

import importlib.resources
import re
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch

from blasphemer import architectures, export, loading, preflight, report
from blasphemer.config import Settings
from blasphemer.console import Console, TrialMonitor, tier
from blasphemer.directions import Directions, compute_directions
from blasphemer.editing import apply_ablation
from blasphemer.errors import ConfigError, StorageError
from blasphemer.evaluation import KLScorer, RefusalScorer, wilson_interval
from blasphemer.evaluation.batching import choose_batch_size
from blasphemer.optimization import (
    Objective,
    OpenedStudy,
    SearchSpace,
    TrialResult,
    completed_results,
    count_trials,
    create_or_load_study,
    default_storage_url,
    default_study_name,
    enqueue_once,
    open_storage,
    pareto_front,
    parse_rule,
    recommended,
    redact_url,
)
from blasphemer.optimization.runner import BudgetGate, run_trials
from blasphemer.optimization.study import FINGERPRINT_ATTR
from blasphemer.residuals import mean_residuals
from blasphemer.workspace import (
    ATTR_BUDGET,
    ATTR_DIRECTIONS,
    ATTR_SETTINGS,
    Prompts,
    Scorers,
    build_scorers,
    load_prompts,
    read_metadata,
    store_metadata,
    study_fingerprint,
)

STAGES = 10
MAX_HELD_OUT_TRIALS = 8
WORKER_WAIT_S = 3600  # how long a worker waits for `run` to start its study
WORKER_POLL_S = 2.0


def demo_model_path() -> Path:
    """Folder of the bundled demo model."""
    return Path(str(importlib.resources.files("blasphemer") / "data" / "demo-model"))


def _slug(model_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(model_id.rstrip("/")).name or "model")


def _run_dir(settings: Settings, model_id: str) -> Path:
    return settings.run_dir or Path("blasphemer-runs") / _slug(model_id)


def _output_dir(settings: Settings, model_id: str) -> Path:
    return settings.output_dir or Path(f"{_slug(model_id)}-blasphemer")


@dataclass(eq=False)
class Outcome:
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


def _run(settings: Settings, console: Console) -> Outcome:
    assert settings.model is not None
    console.stage(1, STAGES, "Preflight")
    source = preflight.check_model_path(settings.model)
    output_dir = _output_dir(settings, settings.model)
    _preflight(settings, source, output_dir, console)

    console.stage(2, STAGES, f"Loading {settings.model}")
    loaded = _load(settings)

    console.stage(3, STAGES, "Mapping layers and residual-stream writers")
    model_map = _map(settings, loaded, console)

    console.stage(4, STAGES, "Loading and splitting prompt sets")
    prompts = load_prompts(settings, loaded.tokenizer)
    batch = _batch_size(settings, loaded, prompts, console)

    console.stage(5, STAGES, "Computing refusal directions (fit split)")
    directions = _directions(settings, loaded, model_map, prompts, batch, console)

    console.stage(6, STAGES, "Measuring the original model (select split)")
    scorers = build_scorers(settings, loaded, prompts, batch)
    baseline = scorers.refusals.evaluate()
    console.info(f"original model refuses {baseline.rate:.1%} of the harmful select prompts")

    console.stage(7, STAGES, "Opening the study")
    space = SearchSpace.build(model_map.n_layers, norm_preserving=settings.norm_preserving)
    study, budget = _open_study(settings, loaded, prompts, directions, space, console)

    console.stage(8, STAGES, f"Optimising ({budget} trials in all)")
    _optimise(settings, study, budget, model_map, directions, space, scorers, console)

    console.stage(9, STAGES, "Pareto front and held-out numbers (report split)")
    results = completed_results(study, space)
    front = pareto_front(results)
    held_out = _held_out(settings, loaded, model_map, directions, prompts, front, batch, console)

    console.stage(10, STAGES, "Choosing and saving")
    chosen = _choose(settings, results, front, console)
    if chosen is None:
        return Outcome(loaded, model_map, directions, prompts, None, None)
    _save(
        settings,
        loaded,
        model_map,
        directions,
        results,
        front,
        chosen,
        held_out,
        output_dir,
        console,
    )
    return Outcome(loaded, model_map, directions, prompts, chosen, output_dir)


# --- stages -------------------------------------------------------------------------------------


def _preflight(settings: Settings, source: Path | None, output_dir: Path, console: Console) -> None:
    # Options that would otherwise fail only after the model is loaded or the study has run.
    if settings.select is not None:
        parse_rule(settings.select)
    if settings.storage is not None:
        preflight.check_storage_url(settings.storage)
    needed = 0
    if source is not None:
        budget = preflight.estimate(
            source, settings.dtypes, settings.device_map, settings.quantization
        )
        preflight.check_memory(budget, settings.dtypes)
        needed = budget.weights_on_disk
        console.info(budget.summary())
    preflight.check_output_dir(output_dir, source, needed)
    if (
        output_dir.exists()
        and any(output_dir.iterdir())
        and not (output_dir / "results.json").exists()
    ):
        raise ConfigError(
            f"--output-dir {output_dir} exists and holds files that Blasphemer did not write; "
            "choose an empty or new folder"
        )


def _load(settings: Settings) -> loading.LoadedModel:
    assert settings.model is not None
    return loading.load_model(
        settings.model,
        dtypes=settings.dtypes,
        device_map=settings.device_map,
        quantization=settings.quantization,
        trust_remote_code=settings.trust_remote_code,
        revision=settings.revision,
    )


def _map(
    settings: Settings, loaded: loading.LoadedModel, console: Console
) -> architectures.ModelMap:
    override = (
        architectures.load_override(settings.architecture_override)
        if settings.architecture_override
        else None
    )
    model_map = architectures.resolve(loaded.model, override)
    writers = sum(len(w) for w in model_map.writers)
    console.info(
        f"{model_map.spec_name}: {model_map.n_layers} layers, hidden {model_map.hidden_size}, "
        f"{writers} writers, dtype {str(loaded.dtype).removeprefix('torch.')}"
    )
    return model_map


def _batch_size(
    settings: Settings, loaded: loading.LoadedModel, prompts: Prompts, console: Console
) -> int:
    if settings.batch_size is not None:
        return settings.batch_size
    size = choose_batch_size(loaded, prompts.harmful.select, settings.max_batch_size)
    console.info(f"batch size {size} (measured; --batch-size to override)")
    return size


def _directions(
    settings: Settings,
    loaded: loading.LoadedModel,
    model_map: architectures.ModelMap,
    prompts: Prompts,
    batch: int,
    console: Console,
) -> Directions:
    means = {}
    for name, texts in (("harmful", prompts.harmful.fit), ("harmless", prompts.harmless.fit)):
        with console.progress(f"residuals of {len(texts)} {name} prompts", len(texts)) as advance:
            means[name] = mean_residuals(
                loaded, model_map, texts, batch_size=batch, on_batch=advance
            )
    directions = compute_directions(
        means["harmful"], means["harmless"], projected=settings.projected_directions
    )
    best = int(torch.argmax(directions.strength))
    console.info(f"strongest separation at layer {best} of {directions.n_layers}")
    return directions


def _open_study(
    settings: Settings,
    loaded: loading.LoadedModel,
    prompts: Prompts,
    directions: Directions,
    space: SearchSpace,
    console: Console,
) -> tuple[optuna.Study, int]:
    assert settings.model is not None
    run_dir = _run_dir(settings, settings.model)
    url = settings.storage or default_storage_url(run_dir)
    name = settings.study_name or default_study_name(settings.model)
    fingerprint = study_fingerprint(settings, loaded, prompts)

    def open_study(resume: bool | None) -> OpenedStudy:
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

    opened = open_study(settings.resume)
    if opened.needs_decision and not settings.yes:  # --yes asks nothing: continue (the default)
        choice = console.ask(
            f"study {name!r} already has {opened.counts.complete} finished trials: "
            "continue it or start over?",
            ["continue", "restart"],
            "continue",
        )
        if choice == "restart":
            opened = open_study(False)
    study = opened.study
    counts = count_trials(study)
    stored = study.user_attrs.get(ATTR_BUDGET)
    explicit = "n_trials" in settings.model_fields_set
    budget = settings.n_trials if explicit or stored is None else int(stored)
    store_metadata(study, settings, directions, budget)
    with BudgetGate(study).hold():  # serialised with every ask: two runs queue it only once
        fresh = count_trials(study)
        if fresh.complete == 0 and fresh.waiting == 0:
            enqueue_once(study, space.reference_params(_reference_index(directions, space)))
    verb = "resuming" if counts.complete else "starting"
    console.info(
        f"{verb} study {name!r} in {redact_url(url)}: {counts.complete} of {budget} trials done"
    )
    return study, budget


def _reference_index(directions: Directions, space: SearchSpace) -> float:
    """The layer with the strongest separation inside the searched direction range."""
    low, high = space.direction_index
    strength = directions.strength.clone()
    for layer in range(directions.n_layers):
        if not low <= layer <= high:
            strength[layer] = -1.0
    return float(torch.argmax(strength)) if strength.max() >= 0 else (low + high) / 2


def _optimise(
    settings: Settings,
    study: optuna.Study,
    budget: int,
    model_map: architectures.ModelMap,
    directions: Directions,
    space: SearchSpace,
    scorers: Scorers,
    console: Console,
) -> None:
    counts = count_trials(study)
    monitor = TrialMonitor(total=budget, done_before=counts.complete)

    def finished(result: TrialResult) -> None:
        console.trial_finished(monitor, result.number, result.refusal_rate, result.kl)

    objective = Objective(
        model_map=model_map,
        directions=directions,
        search_space=space,
        refusal_scorer=scorers.refusals,
        kl_scorer=scorers.kl,
        extra_scorers=scorers.extra,
        on_trial_end=finished,
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


def _held_out(
    settings: Settings,
    loaded: loading.LoadedModel,
    model_map: architectures.ModelMap,
    directions: Directions,
    prompts: Prompts,
    front: list[TrialResult],
    batch: int,
    console: Console,
) -> dict[int, export.HeldOutScores]:
    """Report-split refusals (full length) and KL for the front's trials, plus the original."""
    refusals = RefusalScorer(
        loaded,
        prompts.harmful.report,
        markers=settings.refusal_markers,
        max_new_tokens=settings.max_new_tokens,
        decided_after=None,
        stop_at_marker=True,  # same verdicts as full length; refusals just stop sooner
        batch_size=batch,
    )
    kl = KLScorer(
        loaded, prompts.harmless.report, batch_size=batch, positions=settings.kl_positions
    )
    original = refusals.evaluate()
    scores: dict[int, export.HeldOutScores] = {}
    shown = sorted(front, key=lambda r: (r.refusal_rate, r.kl))[:MAX_HELD_OUT_TRIALS]
    with console.progress("held-out evaluation of front trials", len(shown)) as advance:
        for result in shown:
            parameters = result.parameters
            assert parameters is not None
            with apply_ablation(
                model_map,
                directions.for_layers(parameters.direction_index),
                parameters.layer_weights(model_map.n_layers),
                parameters.norm_preserving,
            ):
                outcome = refusals.evaluate()
                divergence = kl.score()
            scores[result.number] = export.HeldOutScores(
                refusals=sum(outcome.refused),
                n_prompts=len(outcome.refused),
                kl=divergence,
                original_refusals=sum(original.refused),
            )
            advance(1)
    star = recommended(front)
    rows = []
    for result in sorted(front, key=lambda r: (r.refusal_rate, r.kl)):
        low, high = wilson_interval(result.refusals or 0, result.n_prompts or 1)
        held = scores.get(result.number)
        report_cells = ["-", "-"]
        if held is not None:
            h_low, h_high = wilson_interval(held.refusals, held.n_prompts)
            report_cells = [
                f"{held.refusal_rate:.1%} [{h_low:.0%}-{h_high:.0%}]",
                f"{held.kl:.3f}",
            ]
        rows.append(
            [
                ("⭐ " if star is not None and star.number == result.number else "")
                + str(result.number),
                f"{result.refusal_rate:.1%} [{low:.0%}-{high:.0%}]",
                f"{result.kl:.3f}",
                tier(result.refusal_rate, result.kl),
                *report_cells,
            ]
        )
    console.table(
        f"Pareto front (original model refuses {original.rate:.1%} of held-out harmful prompts)",
        ["trial", "refusals (select)", "KL (select)", "tier", "refusals (report)", "KL (report)"],
        rows,
    )
    return scores


def _choose(
    settings: Settings, results: list[TrialResult], front: list[TrialResult], console: Console
) -> TrialResult | None:
    if not results:
        console.warn("no trial finished; nothing to save")
        return None
    if settings.select is not None:
        return parse_rule(settings.select).select(results)
    star = recommended(front)
    assert star is not None
    if settings.yes or not console.interactive:
        return parse_rule("knee").select(results)
    numbers = [str(r.number) for r in front]
    answer = console.ask("trial to save (or 'none')", [*numbers, "none"], str(star.number))
    if answer == "none":
        return None
    return next(r for r in front if str(r.number) == answer)


def _save(
    settings: Settings,
    loaded: loading.LoadedModel,
    model_map: architectures.ModelMap,
    directions: Directions,
    results: list[TrialResult],
    front: list[TrialResult],
    chosen: TrialResult,
    held_out: dict[int, export.HeldOutScores],
    output_dir: Path,
    console: Console,
) -> None:
    assert chosen.parameters is not None
    if (
        not settings.yes
        and console.interactive
        and not console.confirm(f"save trial {chosen.number} to {output_dir}?", True)
    ):
        return
    held = held_out.get(chosen.number)
    card = export.model_card(
        base_model=loaded.model_id,
        parameters=chosen.parameters,
        trial_number=chosen.number,
        scores=held,
        hub_base_model=preflight.check_model_path(loaded.model_id) is None,
    )
    folder = export.save_merged(
        loaded, model_map, directions, chosen.parameters, output_dir, card=card, overwrite=True
    )
    export.write_results(
        folder / "results.json",
        settings=settings.model_dump(mode="json"),
        trials=results,
        front=front,
        chosen=chosen,
        held_out=held,
        extra={
            "model_id": loaded.model_id,
            "held_out_front": {k: v.to_dict() for k, v in held_out.items()},
        },
    )
    files = report.write_report(
        folder,
        trials=results,
        front=front,
        chosen=chosen,
        n_layers=model_map.n_layers,
        direction_strength=directions.strength.tolist(),
        held_out=held,
    )
    console.info(f"saved trial {chosen.number} to {folder} (report: {files.markdown})")
    if settings.upload_repo:
        url = export.upload_to_hub(folder, settings.upload_repo, private=settings.upload_private)
        console.info(f"uploaded to {url}")


# --- other entry points ------------------------------------------------------------------------


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
    if settings.select is None:
        updates["select"] = "lowest-kl:refusals<=0.1"
    demo_settings = settings.model_copy(update=updates)
    outcome = _run(demo_settings, console)
    if outcome.chosen is not None and outcome.chosen.parameters is not None:
        _samples(outcome, console)
    return 0


def _samples(outcome: Outcome, console: Console, count: int = 2) -> None:
    parameters = outcome.chosen.parameters  # type: ignore[union-attr]
    assert parameters is not None
    tokenizer = outcome.loaded.tokenizer
    texts = outcome.prompts.harmful.report[:count]
    requests = outcome.prompts.harmful.report_prompts[:count]

    def answers() -> list[str]:
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        batch = batch.to(outcome.loaded.input_device)
        with torch.inference_mode():
            generate = outcome.loaded.model.generate
            output = generate(**batch, max_new_tokens=40, do_sample=False)  # type: ignore[operator]
        new = output[:, batch["input_ids"].shape[1] :]
        return [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]

    before = answers()
    with apply_ablation(
        outcome.model_map,
        outcome.directions.for_layers(parameters.direction_index),
        parameters.layer_weights(outcome.model_map.n_layers),
        parameters.norm_preserving,
    ):
        after = answers()
    for request, old, new in zip(requests, before, after, strict=True):
        console.info(f"\nprompt: {request}\n  before: {old}\n  after:  {new}")


def work(settings: Settings, console: Console) -> int:
    """``blasphemer worker``: join a study started by ``run`` and run trials until its budget."""
    if settings.storage is None or settings.study_name is None:
        raise ConfigError("a worker needs --storage URL and --study-name NAME of a running study")
    shown = redact_url(settings.storage)
    preflight.check_storage_url(settings.storage)
    study = _await_study(open_storage(settings.storage), settings.study_name, shown, console)
    stored, directions, budget = read_metadata(study, shown)
    local = {k: v for k, v in settings.model_dump().items() if k in settings.model_fields_set}
    joined = Settings(**{**stored, **local, "resume": True})
    assert joined.model is not None
    console.stage(1, 4, f"Loading {joined.model}")
    loaded = _load(joined)
    model_map = _map(joined, loaded, console)
    console.stage(2, 4, "Loading prompt sets and measuring the original model")
    prompts = load_prompts(joined, loaded.tokenizer)
    batch = _batch_size(joined, loaded, prompts, console)
    scorers = build_scorers(joined, loaded, prompts, batch)
    console.stage(3, 4, f"Joining study {settings.study_name!r} in {shown}")
    space = SearchSpace.build(model_map.n_layers, norm_preserving=joined.norm_preserving)
    opened = create_or_load_study(
        settings.storage,
        settings.study_name,
        seed=None,
        fingerprint=study_fingerprint(joined, loaded, prompts),
        resume=True,
        n_startup_trials=joined.n_startup_trials,
        heartbeat_interval=joined.heartbeat_interval,
        grace_period=joined.grace_period,
    )
    console.stage(4, 4, f"Running trials until the study has {budget}")
    _optimise(joined, opened.study, budget, model_map, directions, space, scorers, console)
    counts = count_trials(opened.study)
    console.info(f"study budget reached: {counts.complete} trials complete")
    return 0


def _await_study(
    storage: optuna.storages.BaseStorage, name: str, shown: str, console: Console
) -> optuna.Study:
    """Study ``name`` once ``run`` has stored what workers need (settings, directions, budget).

    A worker may start before ``run`` (all machines launched at once, or ``run`` still loading a
    large model): it waits up to :data:`WORKER_WAIT_S`, saying once what it waits for. A study
    of that name that Blasphemer did not make is refused at once.
    """
    deadline = time.monotonic() + WORKER_WAIT_S
    said = False
    while True:
        try:
            study: optuna.Study | None = optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            study = None
        if study is not None:
            attrs = study.user_attrs
            if all(key in attrs for key in (ATTR_SETTINGS, ATTR_DIRECTIONS, ATTR_BUDGET)):
                return study
            if FINGERPRINT_ATTR not in attrs and study.get_trials(deepcopy=False):
                return study  # not ours: read_metadata says so in one line
        if time.monotonic() >= deadline:
            raise StorageError(
                f"study {name!r} in {shown} was not started within {WORKER_WAIT_S // 60} "
                "minutes; start it with `blasphemer run MODEL --storage URL --study-name NAME` "
                "or check --study-name"
            )
        if not said:
            others = [n for n in optuna.get_all_study_names(storage) if n != name]
            there = f" (studies there now: {', '.join(others)})" if others else ""
            console.info(
                f"waiting for `blasphemer run` to start study {name!r} in {shown}{there}; "
                f"up to {WORKER_WAIT_S // 60} minutes, Ctrl-C to stop"
            )
            said = True
        time.sleep(WORKER_POLL_S)
