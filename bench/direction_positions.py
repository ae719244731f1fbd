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
from pathlib import Path
from typing import Any

import torch

import edit_strength
from blasphemer import residuals
from blasphemer.directions import Directions, compute_directions
from blasphemer.editing import Ablation

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
    probe = edit_strength.open_run(args.run, slice(100, 200), args.batch_size)
    trial = probe.trials[args.trial]
    ctx, run_vectors = probe.ctx, probe.directions.vectors
    directions: dict[str, Directions] = {"run": probe.directions}
    report: dict[str, Any] = {"run": str(args.run), "trial": args.trial, "cosine": {}, "edits": {}}
    residuals._last_position = _at_position
    for position in positions:
        _POSITION[0] = position
        harmful, harmless = (
            residuals.mean_residuals(ctx.loaded, ctx.model_map, texts, batch_size=args.batch_size)
            for texts in (ctx.prompts.harmful.fit, ctx.prompts.harmless.fit)
        )
        found = compute_directions(harmful, harmless, projected=probe.settings.projected_directions)
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
    directions["mean"] = Directions(mean, probe.directions.strength, {})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name, found in directions.items():
        report["edits"][name] = probe.measure(name, Ablation(found, trial))
        args.out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
