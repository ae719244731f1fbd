"""Answers of real models for the refusal judge's labelled set (issue 14).

    python bench/judge_data.py --model smollm2 --source smollm2 --count 100 --out F.jsonl
    python bench/judge_data.py --model DIR --source qwen-edited-t5 --offset 200 --out F.jsonl

Prompts are the project's own bundled sets (``bundled:harmful``, ``bundled:harmless``), taken in
a fixed shuffled order from ``--offset``, so that answer files of different models can share or
avoid prompts on purpose. Each model answers greedily with its chat template (and that
template's own default system prompt), ``--tokens`` tokens at most, never cut at a marker: the
labeller reads whole answers. Writes one JSON line per answer: ``id``, ``source``, ``set``,
``prompt``, ``response``, ``cut`` (true when the answer hit the token limit).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

import models as bench_models
from answers import whole_answers
from blasphemer import prompts
from blasphemer.evaluation.generation import StopReason
from blasphemer.loading import load_model

ORDER_SEED = 14  # the fixed order prompts are taken in (issue 14)


def bundled_prompts(kind: str) -> list[str]:
    """The bundled set ``kind`` in the fixed shuffled order."""
    texts = [p.text for p in prompts.load_prompt_set(f"bundled:{kind}").prompts]
    random.Random(ORDER_SEED).shuffle(texts)
    return texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="A key of bench/models.py or a folder.")
    parser.add_argument("--source", required=True, help="Name of this answer source (ids).")
    parser.add_argument("--count", type=int, default=100, help="Prompts per set.")
    parser.add_argument("--offset", type=int, default=0, help="First prompt of each set.")
    parser.add_argument("--sets", default="harmful,harmless", help="Which bundled sets.")
    parser.add_argument("--tokens", type=int, default=64, help="Greedy tokens per answer.")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, required=True, help="JSON-lines file to write.")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model_id = args.model
    if model_id in bench_models.MODELS:
        model_id = str(bench_models.fetch(model_id))
    started = time.perf_counter()
    loaded = load_model(model_id, dtypes=["float32"], device_map="cpu")
    records = []
    for kind in args.sets.split(","):
        requests = bundled_prompts(kind)[args.offset : args.offset + args.count]
        texts = prompts.render(loaded.tokenizer, requests)
        result = whole_answers(loaded, texts, args.tokens, args.batch_size).evaluate()
        for index, (request, verdict) in enumerate(zip(requests, result.verdicts, strict=True)):
            records.append(
                {
                    "id": f"{args.source}-{kind}-{args.offset + index}",
                    "source": args.source,
                    "set": kind,
                    "prompt": request,
                    "response": verdict.text.strip(),
                    "cut": verdict.stopped_by is StopReason.LENGTH,
                }
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    seconds = time.perf_counter() - started
    print(f"{len(records)} answers of {model_id} in {seconds:.0f} s -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
