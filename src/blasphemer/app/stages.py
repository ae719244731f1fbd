"""The stage implementations that :mod:`blasphemer.app.pipeline` sequences.

Each function does one numbered stage of a run (or a worker's share of one) and returns a value
object for the next; none of them calls another stage.
"""

from __future__ import annotations

import re
from pathlib import Path

import optuna
import torch

from blasphemer import architectures, export, gguf_export, gguf_source, loading
from blasphemer.app import preflight, report
from blasphemer.app import results as result_files
from blasphemer.app.config import Settings
from blasphemer.app.console import Console, TrialMonitor
from blasphemer.app.context import (
    ATTR_BUDGET,
    Prompts,
    Scorers,
    select_prompts,
    store_metadata,
    study_fingerprint,
)
from blasphemer.directions import Directions, compute_directions
from blasphemer.editing import apply_ablation
from blasphemer.errors import ConfigError
from blasphemer.evaluation import KLScorer, RefusalScorer, wilson_interval
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
    recommended,
    redact_url,
    tier,
)
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
        budget = (
            preflight.estimate_gguf(gguf, settings.dtypes, settings.device_map, quantization)
            if gguf is not None
            else preflight.estimate(source, settings.dtypes, settings.device_map, quantization)
        )
        preflight.check_memory(budget, settings.dtypes)
        preflight.check_output_dir(output_dir, source, budget.weights_on_disk)
        console.info(budget.summary())


def load_model(settings: Settings) -> loading.LoadedModel:
    assert settings.model is not None
    return loading.load_model(
        settings.model,
        dtypes=settings.dtypes,
        device_map=settings.device_map,
        quantization=settings.quantization,
        trust_remote_code=settings.trust_remote_code,
        revision=settings.revision,
        gguf_file=settings.gguf_file,
    )


def map_model(
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


def compute_refusal_directions(
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


def open_study(
    settings: Settings,
    loaded: loading.LoadedModel,
    prompts: Prompts,
    directions: Directions,
    space: SearchSpace,
    console: Console,
) -> tuple[optuna.Study, int]:
    assert settings.model is not None
    url = settings.storage or default_storage_url(run_dir(settings, settings.model))
    name = settings.study_name or default_study_name(settings.model)
    fingerprint = study_fingerprint(settings, loaded, prompts)

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
    stored = study.user_attrs.get(ATTR_BUDGET)
    explicit = "n_trials" in settings.model_fields_set
    budget = settings.n_trials if explicit or stored is None else int(stored)
    store_metadata(study, settings, directions, budget)
    with BudgetGate(study).hold():  # serialised with every ask: two runs queue it only once
        fresh = count_trials(study)
        if fresh.complete == 0 and fresh.waiting == 0:
            enqueue_once(study, space.reference_params(reference_index(directions, space)))
    verb = "resuming" if counts.complete else "starting"
    console.info(
        f"{verb} study {name!r} in {redact_url(url)}: {counts.complete} of {budget} trials done"
    )
    return study, budget


def reference_index(directions: Directions, space: SearchSpace) -> float:
    """The layer with the strongest separation inside the searched direction range."""
    low, high = space.direction_index
    strength = directions.strength.clone()
    for layer in range(directions.n_layers):
        if not low <= layer <= high:
            strength[layer] = -1.0
    return float(torch.argmax(strength)) if strength.max() >= 0 else (low + high) / 2


def optimise(
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


def held_out(
    settings: Settings,
    loaded: loading.LoadedModel,
    model_map: architectures.ModelMap,
    directions: Directions,
    prompts: Prompts,
    front: list[TrialResult],
    batch: int,
    console: Console,
) -> dict[int, result_files.HeldOutScores]:
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
    scores: dict[int, result_files.HeldOutScores] = {}
    shown = held_out_order(front)[: settings.held_out_trials]
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
            scores[result.number] = result_files.HeldOutScores(
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
                tier(result.refusal_rate, result.kl).value,
                *report_cells,
            ]
        )
    console.table(
        f"Pareto front (original model refuses {original.rate:.1%} of held-out harmful prompts)",
        ["trial", "refusals (select)", "KL (select)", "tier", "refusals (report)", "KL (report)"],
        rows,
    )
    return scores


def gguf_record(loaded: loading.LoadedModel) -> dict[str, str] | None:
    """The GGUF a model was loaded from, with the sha256 of a local file (None otherwise)."""
    if loaded.gguf is None:
        return None
    path = loaded.gguf.local_path
    return {
        "file": loaded.gguf.describe(),
        "sha256": gguf_source.sha256_of(path) if path is not None else "unknown (hub file)",
    }


def write_gguf(
    folder: Path, kind: str, loaded: loading.LoadedModel, console: Console
) -> dict[str, object]:
    """Write ``folder`` (a saved model) as ``folder/<name>-<kind>.gguf``; its record for the card.

    A model loaded from a local GGUF is written from that file: metadata and unedited tensors
    copied byte for byte, edited tensors in their source type where possible, else ``kind``.
    """
    source = loaded.gguf.local_path if loaded.gguf is not None else None
    target = folder / f"{folder.name}-{kind}.gguf"
    result = gguf_export.export_gguf(folder, target, type=kind, source_gguf=source, force=True)
    record = gguf_export.describe(result)
    console.info(f"GGUF: {target} ({record['summary']})")
    for note in result.notes:
        console.warn(f"GGUF: {note}")
    return record


def held_out_order(front: list[TrialResult]) -> list[TrialResult]:
    """Front trials in the order they are scored on the report split: the recommended one
    (what ``--yes`` saves) first, then by refusals and KL on the select split."""
    star = recommended(front)
    ordered = sorted(front, key=lambda r: (r.refusal_rate, r.kl))
    if star is None:
        return ordered
    return [star, *(r for r in ordered if r.number != star.number)]


def choose(
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


def save(
    settings: Settings,
    loaded: loading.LoadedModel,
    model_map: architectures.ModelMap,
    directions: Directions,
    results: list[TrialResult],
    front: list[TrialResult],
    chosen: TrialResult,
    held_out: dict[int, result_files.HeldOutScores],
    output_dir: Path,
    console: Console,
    timings: dict[str, float] | None = None,
) -> None:
    assert chosen.parameters is not None
    if (
        not settings.yes
        and console.interactive
        and not console.confirm(f"save trial {chosen.number} to {output_dir}?", True)
    ):
        return
    held = held_out.get(chosen.number)
    source = gguf_record(loaded)
    folder = export.save_merged(
        loaded, model_map, directions, chosen.parameters, output_dir, overwrite=True
    )
    written = write_gguf(folder, settings.gguf, loaded, console) if settings.gguf else None
    card = result_files.model_card(
        base_model=loaded.model_id,
        parameters=chosen.parameters,
        trial_number=chosen.number,
        scores=held,
        hub_base_model=not preflight.is_local_model(loaded.model_id) and loaded.gguf is None,
        gguf_source=source,
        gguf_export=written,
    )
    export.write_text_atomic(folder / "README.md", card)
    result_files.write_results(
        folder / "results.json",
        settings=settings.model_dump(mode="json"),
        trials=results,
        front=front,
        chosen=chosen,
        held_out=held,
        extra={
            "model_id": loaded.model_id,
            "gguf_source": source,
            "gguf_export": written,
            "held_out_front": {k: v.to_dict() for k, v in held_out.items()},
            "timings_s": dict(timings or {}),
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
        url = result_files.upload_to_hub(
            folder, settings.upload_repo, private=settings.upload_private
        )
        console.info(f"uploaded to {url}")
