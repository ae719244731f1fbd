"""Draft-verified decoding on the real model: the refusal pass with and without draft tokens.

    OMP_NUM_THREADS=1 python bench/draft_tokens.py --out bench/results/DATE-draft-tokens.json
    python bench/draft_tokens.py --prompts 16 --edits 3      # a quick look

A trial answers the same harmful prompts as the trials before it, so earlier answers can serve
as drafts: one forward pass feeds a row's next token and ``k`` draft tokens and keeps the drafts
the model's own arg-max confirms (:mod:`blasphemer.evaluation.drafts`). That saves passes; each
pass costs more. Whether it pays depends on how the pass cost grows with the tokens fed, so this
measures both on the fetched Qwen2.5-Coder-0.5B-Instruct in bfloat16 (a run's CPU dtype):

1. the cost of one decoding pass against the rows in the batch and the tokens fed per row;
2. the refusal pass of ``--edits`` edits drawn from the search space (as a study's start-up
   trials are), one after the other as a study runs them, in each mode (exact: whole answers
   stopped at a marker; early: decided after 8 clean tokens) with ``k`` = 0 (plain) and each of
   ``--draft-tokens``; every lane has its own scorer, so its drafts are its own earlier answers
   (the first edit's drafts are the unedited model's answers). Lanes alternate per edit; the
   report gives each lane's seconds, its ratio to ``k`` = 0, how many drafts were confirmed, and
   how many verdicts and answers differ from ``k`` = 0 (bfloat16 arg-max near-ties between
   shapes can flip a token; in float64 the tests show none).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from blasphemer.editing import Ablation
from blasphemer.evaluation import RefusalScorer
from blasphemer.evaluation.decoding import DecodingBatch, ForwardSpec
from blasphemer.evaluation.markers import DEFAULT_DECIDED_AFTER
from trial_passes import _emit, _random_edits, _setup

MODES = {"exact": None, "early": DEFAULT_DECIDED_AFTER}


def pass_costs(loaded: Any, prompt: list[int], batch_sizes: list[int], fed: list[int]) -> list:
    """Median seconds of one decoding pass (KV cache ~60 columns) by rows and tokens fed."""
    model, spec = loaded.model, ForwardSpec.of(loaded.model)
    rows = []
    for size in batch_sizes:
        for width in fed:
            batch = DecodingBatch(model, spec, [prompt] * size, 0, 200)
            tokens = batch.prefill()
            times = []
            for _ in range(8):
                block = tokens.unsqueeze(1).repeat(1, width)
                started = time.perf_counter()
                if width == 1:
                    tokens = batch.step(tokens)
                else:
                    tokens = batch.verify(block)[:, -1]
                    batch.accept(torch.full((size,), width - 1))
                times.append(time.perf_counter() - started)
            rows.append({"rows": size, "fed": width, "seconds": statistics.median(times[2:])})
            print(f"pass: {size} rows x {width} tokens: {rows[-1]['seconds']:.3f} s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=50, help="Harmful prompts answered.")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=100, help="max_new_tokens")
    parser.add_argument("--edits", type=int, default=5)
    parser.add_argument("--draft-tokens", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    loaded, model_map, harmful, _, directions = _setup(args, "bfloat16")
    prompt = loaded.tokenizer(harmful[0], add_special_tokens=False)["input_ids"]
    costs = pass_costs(loaded, prompt, [1, 4, 8, 16, 32], [1, 2, 3, 5])

    lanes = {
        (mode, k): RefusalScorer(
            loaded,
            harmful,
            max_new_tokens=args.tokens,
            decided_after=window,
            batch_size=args.batch_size,
            stop_at_marker=True,
            draft_tokens=k,
        )
        for mode, window in MODES.items()
        for k in [0, *args.draft_tokens]
    }
    for scorer in lanes.values():  # the unedited model's answers: the first edit's drafts
        scorer.evaluate()
    rows = []
    for number, parameters in enumerate(_random_edits(model_map.n_layers, args.edits)):
        order = list(lanes) if number % 2 == 0 else list(reversed(lanes))
        results: dict[tuple[str, int], Any] = {}
        with Ablation(directions, parameters).apply(model_map):
            for lane in order:
                scorer = lanes[lane]
                book = scorer.drafts  # None in the plain lanes
                before = (book.confirmed, book.proposed) if book is not None else (0, 0)
                started = time.perf_counter()
                verdicts = scorer.evaluate()
                seconds = time.perf_counter() - started
                after = (book.confirmed, book.proposed) if book is not None else (0, 0)
                confirmed, proposed = after[0] - before[0], after[1] - before[1]
                results[lane] = (seconds, verdicts, confirmed, proposed)
        for mode in MODES:
            base_seconds, base, _, _ = results[(mode, 0)]
            for k in [0, *args.draft_tokens]:
                seconds, verdicts, confirmed, proposed = results[(mode, k)]
                row = {
                    "edit": number,
                    "mode": mode,
                    "draft_tokens": k,
                    "seconds": seconds,
                    "ratio": seconds / base_seconds,
                    "answer_tokens": sum(len(v.tokens) for v in verdicts.verdicts),
                    "refused": sum(verdicts.refused),
                    "drafts_proposed": proposed,
                    "drafts_confirmed": confirmed,
                    "verdicts_differing": sum(
                        a != b for a, b in zip(base.refused, verdicts.refused, strict=True)
                    ),
                    "answers_differing": sum(
                        a.tokens != b.tokens
                        for a, b in zip(base.verdicts, verdicts.verdicts, strict=True)
                    ),
                }
                rows.append(row)
                print(row, flush=True)
    summary = {}
    for mode in MODES:
        base = sum(r["seconds"] for r in rows if r["mode"] == mode and r["draft_tokens"] == 0)
        for k in args.draft_tokens:
            mine = [r for r in rows if r["mode"] == mode and r["draft_tokens"] == k]
            proposed = sum(r["drafts_proposed"] for r in mine)
            summary[f"{mode}, k={k}"] = {
                "ratio_all_edits": sum(r["seconds"] for r in mine) / base,
                "drafts_confirmed_share": sum(r["drafts_confirmed"] for r in mine)
                / max(proposed, 1),
                "verdicts_differing": sum(r["verdicts_differing"] for r in mine),
                "answers_differing": sum(r["answers_differing"] for r in mine),
            }
    report = {
        "model": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "dtype": "bfloat16",
        "prompts": args.prompts,
        "batch_size": args.batch_size,
        "max_new_tokens": args.tokens,
        "threads": args.threads,
        "edits": args.edits,
        "pass_costs": costs,
        "rows": rows,
        "summary": summary,
    }
    return _emit(report, args.out)


if __name__ == "__main__":
    sys.exit(main())
