"""Directions fitted at other token positions of the chat template, on public prompts (issue 11).

    python bench/direction_positions.py --run RUN_DIR --trial 5 \\
        --out bench/results/DATE-direction-positions.json

Blasphemer fits its directions at the last prompt token (position -1: for Qwen's template the
newline after ``<|im_start|>assistant``). Refusal work elsewhere also reads earlier
post-instruction tokens; this measures whether directions fitted there remove what the
last-token ones leave (on Qwen mostly *safe substitutes*). For each position in ``--positions``
the run's fit prompts are measured again with the residual recorded at that position instead
of the last one (an experiment: it swaps ``blasphemer.residuals._last_position``), and the
trial's ablation is applied with those directions; ``mean`` removes the normalised mean of the
run's and every position's directions. Each edit answers ``harmful_test.json[100:200]``
greedily in full and is scored by the markers and the semantic judge; KL is measured on
``harmless_test.json[100:200]``. Writes the numbers and answers to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import torch

import edit_strength
import models as bench_models
from blasphemer import prompts, residuals
from blasphemer.app import stages
from blasphemer.app.config import Settings
from blasphemer.app.console import Console
from blasphemer.directions import Directions, compute_directions
from blasphemer.editing import Ablation
from blasphemer.evaluation import KLScorer, RefusalScorer
from blasphemer.evaluation.judges import make_judge
from blasphemer.evaluation.judging import Answer
from blasphemer.optimization import parameters_from_dict
from blasphemer.optimization.metadata import read_metadata

_POSITION = [-1]


def _at_position(hidden: Any) -> torch.Tensor:
    if isinstance(hidden, tuple | list):
        hidden = hidden[0]
    return hidden[:, _POSITION[0], :].detach()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="The run folder (study.db).")
    parser.add_argument("--trial", type=int, required=True, help="Whose ablation to apply.")
    parser.add_argument("--positions", default="-2,-3,-5", help="Token positions, e.g. -2,-5.")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    positions = [int(p) for p in args.positions.split(",")]
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    residuals._last_position = _at_position
    url = f"sqlite:///{(args.run / 'study.db').resolve()}"
    study = optuna.load_study(study_name=None, storage=url)
    metadata = read_metadata(study, url)
    stored = {k: v for k, v in metadata.settings.items() if k in set(Settings.model_fields)}
    settings = Settings(**{**stored, "batch_size": args.batch_size, "quiet": True})
    ctx = stages.prepare(settings, Console(quiet=True))
    trial = next(
        parameters_from_dict(t.user_attrs["result"]["ablation"])
        for t in study.get_trials()
        if t.number == args.trial and "result" in t.user_attrs
    )
    run_vectors = metadata.directions.vectors
    directions: dict[str, Directions] = {"run": metadata.directions}
    report: dict[str, Any] = {"run": str(args.run), "trial": args.trial, "cosine": {}, "edits": {}}
    for position in positions:
        _POSITION[0] = position
        fit = ctx.prompts
        harmful = residuals.mean_residuals(
            ctx.loaded, ctx.model_map, fit.harmful.fit, batch_size=args.batch_size
        )
        harmless = residuals.mean_residuals(
            ctx.loaded, ctx.model_map, fit.harmless.fit, batch_size=args.batch_size
        )
        found = compute_directions(harmful, harmless, projected=settings.projected_directions)
        directions[f"pos{position}"] = found
        cosine = torch.nn.functional.cosine_similarity(found.vectors, run_vectors, dim=-1)
        report["cosine"][str(position)] = [round(c, 3) for c in cosine.tolist()]
        print(
            f"position {position}: cosine with the last token's, by layer:",
            report["cosine"][str(position)],
            flush=True,
        )
    _POSITION[0] = -1
    mean = torch.nn.functional.normalize(
        torch.stack([d.vectors for d in directions.values()]).sum(0), dim=-1
    )
    directions["mean"] = Directions(mean, metadata.directions.strength, {})

    datasets = edit_strength.DATASETS
    harm = [r["instruction"] for r in json.loads((datasets / "harmful_test.json").read_text())]
    safe = [r["instruction"] for r in json.loads((datasets / "harmless_test.json").read_text())]
    harm, safe = harm[100:200], safe[100:200]
    tokenizer = ctx.loaded.tokenizer
    kl = KLScorer(ctx.loaded, prompts.render(tokenizer, safe), batch_size=args.batch_size)
    answers = RefusalScorer(
        ctx.loaded,
        prompts.render(tokenizer, harm),
        markers=settings.refusal_markers,
        max_new_tokens=settings.max_new_tokens,
        decided_after=None,
        batch_size=args.batch_size,
        stop_at_marker=False,
    )
    judge = make_judge("semantic", settings.refusal_markers, str(bench_models.fetch("minilm")))
    for name, found in directions.items():
        started = time.perf_counter()
        with Ablation(found, trial).apply(ctx.model_map):
            result, divergence = answers.evaluate(), kl.score()
        requests = [
            Answer(q, a, i + 1) for i, (q, a) in enumerate(zip(harm, result.responses, strict=True))
        ]
        semantic = sum(v.refusal for v in judge.judge(requests))
        report["edits"][name] = {
            "marker_refusals": result.count,
            "semantic_refusals": semantic,
            "kl_first_token": divergence,
            "answers": result.responses,
        }
        print(
            f"{name}: markers {result.count}/100, semantic {semantic}/100, KL {divergence:.3f} "
            f"({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
