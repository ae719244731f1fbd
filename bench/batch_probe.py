"""The batch-size probe on the real model: how long it takes and how good its pick is (issue 16).

    python bench/batch_probe.py --out bench/results/DATE-batch-probe.json

Runs :func:`blasphemer.evaluation.batching.choose_batch_size` as ``blasphemer run`` does with the
CPU preset (50 harmful select prompts from ``harmful_test.json``, the ceiling sized for 64 answer
tokens), timing the probe itself. Then measures the same candidate sizes again with
``--reference-rounds`` more rounds (the throughput the probe tries to find) and reports the
pick's rate as a share of the best size's: the issue's target is a probe of at most 2 minutes
on a 2-core CPU and a pick within 10 % of the best measured throughput.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import models as bench_models
from answers import _instructions
from blasphemer import prompts
from blasphemer.evaluation.batching import choose_batch_size, measure_rates
from blasphemer.evaluation.generation import encode_texts, greedy_tokens, pad_token_id
from blasphemer.loading import load_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--max-batch-size", type=int, default=128)
    parser.add_argument("--reference-rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    loaded = load_model(str(bench_models.fetch("qwen")), dtypes=["float32"], device_map="cpu")
    texts = prompts.render(loaded.tokenizer, _instructions("harmful_test.json", args.prompts))

    started = time.perf_counter()
    choice = choose_batch_size(loaded, texts, args.max_batch_size, response_tokens=64)
    probe_seconds = time.perf_counter() - started
    print(f"probe: {probe_seconds:.0f} s, picked {choice.size}: {choice.reason}", flush=True)

    ids = encode_texts(loaded.tokenizer, texts)
    pad = pad_token_id(loaded.tokenizer)

    def run(size: int) -> None:
        sample = [ids[i % len(ids)] for i in range(size)]
        greedy_tokens(loaded.model, sample, 4, batch_size=size, pad_id=pad)

    started = time.perf_counter()
    reference = measure_rates(
        run, sorted(choice.rates), repeats=args.reference_rounds, clock=time.perf_counter
    )
    reference_seconds = time.perf_counter() - started
    best = max(reference, key=lambda size: reference[size])
    share = reference[choice.size] / reference[best]
    print(
        f"reference ({args.reference_rounds} rounds, {reference_seconds:.0f} s): "
        + ", ".join(f"{s}: {r:.2f}/s" for s, r in sorted(reference.items()))
        + f"; the pick's rate is {share:.1%} of the best ({best})",
        flush=True,
    )
    report = {
        "model": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "threads": args.threads,
        "probe_seconds": probe_seconds,
        "choice": choice.to_dict(),
        "reference_rounds": args.reference_rounds,
        "reference_prompts_per_s": {str(s): r for s, r in sorted(reference.items())},
        "best_size": best,
        "pick_share_of_best": share,
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
