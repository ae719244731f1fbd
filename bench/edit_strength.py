"""Stronger edits, and directions fitted on refused prompts only, on public prompts (issue 11).

    python bench/edit_strength.py --run RUN_DIR --edits run:5x1.0,run:11x1.6,refused:11x1.0 \\
        --out bench/results/DATE-edit-strength.json

A finished ``blasphemer run`` keeps its settings, directions and every trial's parameters in its
study (``RUN_DIR/study.db``). Each edit ``DIRECTIONS:TRIALxSCALE`` is that trial's ablation
with every kernel's ``max_weight`` and ``min_weight`` multiplied by ``SCALE``, removing either
the run's own directions (``run``) or directions fitted again on the fit split with only the
harmful prompts the original model refuses (``refused``; early verdicts as in the search), or
directions fitted on the model's *answers* as the judge's readers labelled them (``answers``:
refusals of every kind against compliant answers; ``substitutes``: safe substitutes against
compliant answers; each layer's output averaged over the response tokens, the model reading
Qwen's labelled answers to harmful prompts in ``bench/judge/``, those to the probed prompts
left out). ``+`` joins two sources into one edit that removes both, e.g. ``run+substitutes``;
``+embed`` also removes the run's direction (at the trial's direction index; layer 0's for
per-layer directions) from the token embeddings, in full (``run+embed:5x1.0``; models with
untied embeddings only).
Each edit and the original answer public harmful prompts greedily in full (the run's
``max_new_tokens``), judged by the refusal markers and by the semantic judge, and KL is measured
on public harmless prompts. The prompts default to ``harmful_test.json[100:200]`` and
``harmless_test.json[100:200]``: the hand-labelled independent check (``bench/answers.py``)
uses the first 100, so probing here leaves it unseen. Writes every number and answer to
``--out`` and prints a line per edit.

``--prefill TEXT`` starts every harmful answer with ``TEXT`` (appended after the chat template's
assistant header), so the model continues an answer that has already begun to comply, e.g.
``--prefill "Sure, here"``. The recorded answers are the continuations, without ``TEXT``. It
measures how far the model can do the tasks at all once it has begun: a ceiling for what any
edit could reach by reading (issue 11).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import torch

import models as bench_models
from answers import _instructions
from blasphemer import prompts
from blasphemer.ablation import AblationParameters
from blasphemer.app import stages
from blasphemer.app.config import Settings
from blasphemer.app.console import Console
from blasphemer.directions import Directions, compute_directions
from blasphemer.editing import Ablation
from blasphemer.evaluation import KLScorer, RefusalScorer
from blasphemer.evaluation.judges import make_judge
from blasphemer.evaluation.judging import Answer, Judge
from blasphemer.optimization import parameters_from_dict
from blasphemer.optimization.metadata import read_metadata
from blasphemer.residuals import mean_residuals


def scaled(parameters: AblationParameters, factor: float) -> AblationParameters:
    """``parameters`` with every kernel's peak and floor multiplied by ``factor``."""
    kernels = {
        kind: dataclasses.replace(
            kernel, max_weight=kernel.max_weight * factor, min_weight=kernel.min_weight * factor
        )
        for kind, kernel in parameters.kernels.items()
    }
    return dataclasses.replace(parameters, kernels=kernels)


SOURCES = ("run", "refused", "answers", "substitutes", "embed")


def parse_edits(text: str) -> list[tuple[str, int, float]]:
    """``run:5x1.0,refused:11x1.3`` -> ``[("run", 5, 1.0), ("refused", 11, 1.3)]``."""
    edits = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        source, _, rest = item.partition(":")
        trial, _, factor = rest.partition("x")
        if not set(source.split("+")) <= set(SOURCES) or not trial.isdigit() or not factor:
            raise SystemExit(f"bad edit {item!r}: write DIRECTIONS:TRIALxSCALE, e.g. run:5x1.3")
        edits.append((source, int(trial), float(factor)))
    return edits


def refused_directions(ctx: Any) -> tuple[Directions, int, int]:
    """Directions fitted on the fit split's harmful prompts the original model refuses."""
    fit = ctx.prompts.harmful.fit
    verdicts = ctx.refusal_scorer(fit, ctx.settings.decided_after).evaluate()
    refused = [text for text, refusal in zip(fit, verdicts.refused, strict=True) if refusal]
    size = ctx.batch_size
    harmful = mean_residuals(ctx.loaded, ctx.model_map, refused, batch_size=size)
    harmless = mean_residuals(ctx.loaded, ctx.model_map, ctx.prompts.harmless.fit, batch_size=size)
    projected = ctx.settings.projected_directions
    return compute_directions(harmful, harmless, projected=projected), len(refused), len(fit)


def answer_directions(ctx: Any, left_out: set[str]) -> dict[str, Directions]:
    """``answers`` and ``substitutes`` directions (see the module's text) from the labelled
    answers of Qwen in ``bench/judge/`` to harmful prompts not in ``left_out``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "judge"))
    import train as judge_training

    folder = Path(__file__).resolve().parent / "judge"
    rows = [
        r
        for r in judge_training.load_labelled(folder / "answers", folder / "labels")
        if r["source"].startswith("qwen") and r["set"] == "harmful" and r["prompt"] not in left_out
    ]
    sums: dict[str, list[Any]] = {}
    tokenizer, model = ctx.loaded.tokenizer, ctx.loaded.model
    for row in rows:
        head = tokenizer(prompts.render(tokenizer, [row["prompt"]])[0], add_special_tokens=False)
        reply = tokenizer(row["response"] or " ", add_special_tokens=False).input_ids[:128]
        ids = torch.tensor([head.input_ids + reply])
        states = model.model(ids, output_hidden_states=True).hidden_states[1:]
        means = torch.stack([h[0, len(head.input_ids) :].mean(0) for h in states]).double()
        kind = "substitute" if row["kind"] == "substitute" else str(row["refusal"])
        total = sums.setdefault(kind, [0, 0])
        total[0], total[1] = total[0] + means, total[1] + 1
    print(f"answers read: { {k: v[1] for k, v in sums.items()} }", flush=True)
    compliant = sums["False"][0] / sums["False"][1]
    refusals = (sums["True"][0] + sums["substitute"][0]) / (sums["True"][1] + sums["substitute"][1])

    def fitted(difference: torch.Tensor) -> Directions:
        unit = torch.nn.functional.normalize(difference, dim=1)
        return Directions(unit.float(), difference.norm(dim=1).float())

    substitutes = sums["substitute"][0] / sums["substitute"][1]
    return {"answers": fitted(refusals - compliant), "substitutes": fitted(substitutes - compliant)}


class EmbeddingEdit:
    """The direction removed from every token embedding (``E <- E - (E r) r^T``); the weights
    are copied back on exit, bit for bit."""

    def __init__(self, model: Any, directions: Directions, parameters: AblationParameters) -> None:
        output = model.get_output_embeddings()
        self.weight = model.get_input_embeddings().weight
        if output is not None and output.weight is self.weight:
            raise SystemExit("+embed needs untied embeddings: this model's output head shares them")
        self.direction = directions.for_layers(parameters.direction_index)[0]

    @contextlib.contextmanager
    def apply(self, model_map: Any) -> Any:
        saved = self.weight.data.clone()
        r = self.direction.to(torch.float32)
        r = r / r.norm()
        try:
            table = self.weight.data.float()
            self.weight.data.copy_(table - (table @ r)[:, None] * r[None, :])
            yield
        finally:
            self.weight.data.copy_(saved)


class Joined:
    """Two or more edits applied together (each undone on exit)."""

    def __init__(self, edits: list[Any]) -> None:
        self.edits = edits

    def apply(self, model_map: Any) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        for edit in self.edits:
            stack.enter_context(edit.apply(model_map))
        return stack


@dataclasses.dataclass
class Probe:
    """A finished run opened for probing on public prompts: its settings as stored, the model
    prepared as the run had it, the run's directions and every finished trial's ablation, and
    scorers for the harmful answers (whole, judged by markers and the semantic judge) and the
    harmless KL."""

    stored: dict[str, Any]
    settings: Settings
    ctx: Any
    directions: Directions
    trials: dict[int, AblationParameters]
    harm: list[str]
    kl: KLScorer
    answers: RefusalScorer
    judge: Judge

    def measure(self, name: str, edit: Ablation | Joined | None) -> dict[str, Any]:
        """Answers and KL with ``edit`` applied (None: the original model), printed in a line."""
        started = time.perf_counter()
        if edit is None:
            result, divergence = self.answers.evaluate(), 0.0
        else:
            with edit.apply(self.ctx.model_map):
                result, divergence = self.answers.evaluate(), self.kl.score()
        pairs = enumerate(zip(self.harm, result.responses, strict=True))
        semantic = sum(
            v.refusal for v in self.judge.judge([Answer(q, a, i + 1) for i, (q, a) in pairs])
        )
        n = len(self.harm)
        print(
            f"{name}: markers {result.count}/{n}, semantic {semantic}/{n}, "
            f"KL {divergence:.3f} ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
        return {
            "marker_refusals": result.count,
            "semantic_refusals": semantic,
            "n_prompts": n,
            "kl_first_token": divergence,
            "answers": result.responses,
        }


def open_run(run: Path, window: slice, batch_size: int, prefill: str = "") -> Probe:
    """The run in ``run`` (its ``study.db``) prepared for probing on the public prompts in
    ``window``, each harmful answer starting with ``prefill``; one thread, no autograd."""
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{(run / 'study.db').resolve()}"
    study = optuna.load_study(study_name=None, storage=url)
    metadata = read_metadata(study, url)
    known = set(Settings.model_fields)
    stored = {k: v for k, v in metadata.settings.items() if k in known}
    settings = Settings(**{**stored, "batch_size": batch_size, "quiet": True})
    ctx = stages.prepare(settings, Console(quiet=True))
    trials = {
        t.number: parameters_from_dict(t.user_attrs["result"]["ablation"])
        for t in study.get_trials()
        if "result" in t.user_attrs
    }
    harm = _instructions("harmful_test.json", window.stop)[window]
    safe = _instructions("harmless_test.json", window.stop)[window]
    tokenizer = ctx.loaded.tokenizer
    answers = RefusalScorer(
        ctx.loaded,
        [text + prefill for text in prompts.render(tokenizer, harm)],
        markers=settings.refusal_markers,
        max_new_tokens=settings.max_new_tokens,
        decided_after=None,
        batch_size=batch_size,
        stop_at_marker=False,
    )
    return Probe(
        stored=stored,
        settings=settings,
        ctx=ctx,
        directions=metadata.directions,
        trials=trials,
        harm=harm,
        kl=KLScorer(ctx.loaded, prompts.render(tokenizer, safe), batch_size=batch_size),
        answers=answers,
        judge=make_judge("semantic", settings.refusal_markers, str(bench_models.fetch("minilm"))),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="The run folder (study.db).")
    parser.add_argument("--edits", required=True, help="DIRECTIONS:TRIALxSCALE, comma-separated.")
    parser.add_argument("--first", type=int, default=100, help="First public prompt used.")
    parser.add_argument("--count", type=int, default=100, help="Prompts of each kind.")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--prefill", default="", help="Text every harmful answer starts with.")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    edits = parse_edits(args.edits)
    window = slice(args.first, args.first + args.count)
    probe = open_run(args.run, window, args.batch_size, args.prefill)
    directions = {"run": probe.directions}
    report: dict[str, Any] = {"run": str(args.run), "settings": probe.stored, "edits": {}}
    report["prefill"] = args.prefill
    wanted = {part for source, _, _ in edits for part in source.split("+")}
    if "refused" in wanted:
        directions["refused"], kept, total = refused_directions(probe.ctx)
        report["refused_fit_prompts"] = f"{kept}/{total}"
        print(f"fit prompts the original refuses: {kept}/{total}", flush=True)
    if wanted & {"answers", "substitutes"}:
        directions.update(answer_directions(probe.ctx, set(probe.harm)))
        run = probe.directions.vectors.double()
        report["cosine_with_run_directions"] = {
            name: [round(float(c), 3) for c in (directions[name].vectors.double() * run).sum(1)]
            for name in ("answers", "substitutes")
        }
        print(f"cosines with the run's directions: {report['cosine_with_run_directions']}")
    report["prompts"] = f"harmful_test.json[{window.start}:{window.stop}] and harmless_test"
    report["edits"]["original"] = probe.measure("original", None)
    for source, number, factor in edits:
        parameters = scaled(probe.trials[number], factor)
        model = probe.ctx.loaded.model
        edit = Joined(
            [
                EmbeddingEdit(model, probe.directions, parameters)
                if part == "embed"
                else Ablation(directions[part], parameters)
                for part in source.split("+")
            ]
        )
        report["edits"][f"{source}:{number}x{factor}"] = probe.measure(
            f"{source}:{number}x{factor}", edit
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    json.dump(
        {k: {m: v[m] for m in v if m != "answers"} for k, v in report["edits"].items()}, sys.stdout
    )
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
