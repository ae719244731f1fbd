"""Stages 9 and 10 of a run: the front confirmed on whole answers, held-out numbers for it,
choosing a trial, saving it.

Like :mod:`blasphemer.app.stages`, each function does one numbered stage (with its helpers) and
returns a value object for the next; :mod:`blasphemer.app.pipeline` sequences them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import optuna

from blasphemer import export, gguf_export, gguf_source, loading
from blasphemer.app import preflight, report
from blasphemer.app import results as result_files
from blasphemer.app.console import Console, front_cells, rate_cell
from blasphemer.app.context import RunContext
from blasphemer.directions import Directions
from blasphemer.editing import Ablation
from blasphemer.optimization import (
    TrialResult,
    pareto_front,
    parse_rule,
    recommended,
    recommended_held_out,
)
from blasphemer.optimization.confirmation import confirm_front, is_confirmed, record_confirmation


@dataclass(eq=False)
class Findings:
    """What the search found: every complete trial, the Pareto front, and the held-out numbers
    of the front trials scored on the report split (by trial number)."""

    results: list[TrialResult]
    front: list[TrialResult]
    held_out: dict[int, result_files.HeldOutScores]


def confirmed_front(
    ctx: RunContext, directions: Directions, study: optuna.Study, results: list[TrialResult]
) -> tuple[list[TrialResult], list[TrialResult]]:
    """Every trial and the Pareto front, with the front's refusals counted on whole answers
    (see :mod:`blasphemer.optimization.confirmation`); each count is stored in the study as
    soon as it is known. Only with ``--confirm-front``, and only when the search's verdicts
    were early ones."""
    settings, console = ctx.settings, ctx.console
    early = not settings.exact_verdicts and settings.decided_after < settings.max_new_tokens
    if not settings.confirm_front or not early or not results:
        return results, pareto_front(results)
    scorer = ctx.refusal_scorer(ctx.prompts.harmful.select)

    def score(result: TrialResult) -> tuple[int, int]:
        assert result.parameters is not None
        with Ablation(directions, result.parameters).apply(ctx.model_map):
            outcome = scorer.evaluate()
        return outcome.count, len(outcome.refused)

    def store(result: TrialResult, refusals: int, prompts: int) -> None:
        record_confirmation(study, result.number, refusals, prompts)
        early_count = "?" if result.refusals is None else result.refusals
        console.info(
            f"trial {result.number}: {refusals}/{prompts} refusals on whole answers "
            f"(search, early verdicts: {early_count})"
        )

    # ``results`` come from completed_results: counts stored by an earlier run are applied.
    pending = [r for r in pareto_front(results) if not is_confirmed(r)]
    if pending:
        console.info(
            f"judging the front again on whole answers ({settings.max_new_tokens} tokens), "
            f"starting with {len(pending)} trial(s)"
        )
    return confirm_front(results, score, on_confirmed=store)


def held_out(
    ctx: RunContext, directions: Directions, front: list[TrialResult]
) -> dict[int, result_files.HeldOutScores]:
    """Report-split refusals (full length) and KL for the front's trials, plus the original."""
    console, model_map = ctx.console, ctx.model_map
    requests = ctx.prompts.harmful.report_prompts
    # Layer caches: filled by the passes on the original model, replayed for every front trial.
    refusals = ctx.refusal_scorer(ctx.prompts.harmful.report, for_judge=True, cached=True)
    kl = ctx.kl_scorer(ctx.prompts.harmless.report, cached=True)
    shown = held_out_order(front)[: ctx.settings.held_out_trials]
    scores: dict[int, result_files.HeldOutScores] = {}
    described = f"held-out evaluation of the original and {len(shown)} front trials"
    with console.progress(described, len(shown) + 1) as advance:
        original = refusals.evaluate()
        original_semantic = ctx.semantic_refusals(refusals, original, requests)
        advance(1)
        for result in shown:
            assert result.parameters is not None
            with Ablation(directions, result.parameters).apply(model_map):
                outcome = refusals.evaluate()
                divergence = kl.score()
            scores[result.number] = result_files.HeldOutScores(
                refusals=sum(outcome.refused),
                n_prompts=len(outcome.refused),
                kl=divergence,
                original_refusals=sum(original.refused),
                semantic_refusals=ctx.semantic_refusals(refusals, outcome, requests),
                original_semantic_refusals=original_semantic,
            )
            advance(1)
    star = recommended_held_out(front, held_out_values(scores))
    semantic = original_semantic is not None
    rows = []
    for result in sorted(front, key=lambda r: (r.refusal_rate, r.kl)):
        held = scores.get(result.number)
        report_cells = ["-"] * (3 if semantic else 2)
        if held is not None:
            counts = [held.refusals, *([held.semantic_refusals or 0] if semantic else [])]
            n = held.n_prompts
            report_cells = [rate_cell(count / n, count, n) for count in counts]
            report_cells.append(f"{held.kl:.3f}")
        rows.append([*front_cells(result, star), *report_cells])
    header = ["trial", "refusals (select)", "KL (select)", "tier", "refusals (report)"]
    title = f"original model refuses {original.rate:.1%} of held-out harmful prompts"
    if semantic:
        header += ["refusals (report, semantic)"]
        title += f" ({original_semantic}/{len(requests)} by the semantic judge)"
    console.table(f"Pareto front ({title})", [*header, "KL (report)"], rows)
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


def held_out_values(
    scores: dict[int, result_files.HeldOutScores],
) -> dict[int, tuple[float, float]]:
    """Held-out (refusal rate, KL) per trial number, as the selection rules take them."""
    return {number: (s.headline_rate, s.kl) for number, s in scores.items()}


def choose(ctx: RunContext, findings: Findings) -> TrialResult | None:
    """The trial to save: ``--select``'s rule, else the ⭐ (``--yes`` or no terminal), else the
    user's pick from the front; None when nothing is to be saved. The ⭐ is the knee rule on the
    held-out numbers when two or more front trials have them (see
    :func:`~blasphemer.optimization.selection.recommended_held_out`)."""
    settings, console = ctx.settings, ctx.console
    results, front = findings.results, findings.front
    if not results:
        console.warn("no trial finished; nothing to save")
        return None
    if settings.select is not None:
        return parse_rule(settings.select).select(results)
    star = recommended_held_out(front, held_out_values(findings.held_out))
    assert star is not None
    if settings.yes or not console.interactive:
        return star
    numbers = [str(r.number) for r in front]
    answer = console.ask("trial to save (or 'none')", [*numbers, "none"], str(star.number))
    if answer == "none":
        return None
    return next(r for r in front if str(r.number) == answer)


def save(
    ctx: RunContext,
    directions: Directions,
    findings: Findings,
    chosen: TrialResult,
    output_dir: Path,
    timings: dict[str, float] | None = None,
) -> None:
    """Save ``chosen`` merged into the weights, with model card, results.json and report (and
    the GGUF and upload when asked); asks first when interactive without ``--yes``."""
    settings, console, loaded, model_map = ctx.settings, ctx.console, ctx.loaded, ctx.model_map
    results, front, held_out = findings.results, findings.front, findings.held_out
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
        loaded, model_map, Ablation(directions, chosen.parameters), output_dir, overwrite=True
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
