"""Answers of an original model and its edited copy to prompts neither the tool nor the study saw.

    python bench/answers.py --edited qwen-blasphemer            # original: the fetched Qwen GGUF
    python bench/answers.py --original ORIG --edited DIR --harmful 100 --harmless 100

Reads the public benchmark sets in ``../shared/datasets/refusal_direction/`` (JailbreakBench,
HarmBench and StrongREJECT prompts in ``harmful_test.json``; Alpaca in ``harmless_test.json``),
which Blasphemer's bundled prompt sets do not contain. Both models answer greedily with the
chat template's own default system prompt; each answer is judged by Blasphemer's marker rule
and by its semantic judge (the fetched all-MiniLM-L6-v2 encoder), and the first-token KL
divergence of the edited model from the original is measured on the harmless prompts. Writes
one JSON line per prompt (prompt, both answers, their marker and semantic verdicts) to
``--out`` for reading and labelling by hand, and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import models as bench_models
from blasphemer import prompts
from blasphemer.evaluation import KLScorer, RefusalScorer
from blasphemer.evaluation.judged import judge_responses
from blasphemer.evaluation.judges import make_judge
from blasphemer.loading import LoadedModel, load_model

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "refusal_direction"


def _instructions(name: str, count: int) -> list[str]:
    rows = json.loads((DATASETS / name).read_text(encoding="utf-8"))
    return [row["instruction"] for row in rows[:count]]


def whole_answers(loaded: LoadedModel, texts: list[str], tokens: int, batch: int) -> RefusalScorer:
    """A scorer whose answers are greedy and whole: ``tokens`` long at most, never cut at a marker
    (what a reader judges)."""
    return RefusalScorer(loaded, texts, max_new_tokens=tokens, decided_after=None, batch_size=batch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--original", default=None, help="Original model (default: Qwen GGUF).")
    parser.add_argument("--edited", required=True, help="The edited model folder.")
    parser.add_argument("--harmful", type=int, default=100, help="Prompts from harmful_test.")
    parser.add_argument("--harmless", type=int, default=100, help="Prompts from harmless_test.")
    parser.add_argument("--tokens", type=int, default=64, help="Greedy tokens per answer.")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, required=True, help="JSON-lines file to write.")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    original_id = args.original or str(bench_models.fetch("qwen"))
    judge = make_judge("semantic", encoder=str(bench_models.fetch("minilm", log=False)))
    requests = {
        "harmful": _instructions("harmful_test.json", args.harmful),
        "harmless": _instructions("harmless_test.json", args.harmless),
    }
    rows: dict[str, list[dict[str, object]]] = {k: [] for k in requests}
    summary: dict[str, object] = {"original": original_id, "edited": args.edited}
    kl: KLScorer | None = None
    for role, model_id in (("original", original_id), ("edited", args.edited)):
        start = time.perf_counter()
        loaded = load_model(model_id, dtypes=["float32"], device_map="cpu")
        texts = {k: prompts.render(loaded.tokenizer, v) for k, v in requests.items()}
        if kl is None:
            kl = KLScorer(loaded, texts["harmless"], batch_size=args.batch_size)
        else:
            kl.loaded = loaded
            summary["kl_first_token"] = kl.score()
        for kind, kind_texts in texts.items():
            result = whole_answers(loaded, kind_texts, args.tokens, args.batch_size).evaluate()
            for index, (answer, refused) in enumerate(
                zip(result.responses, result.refused, strict=True)
            ):
                if role == "original":
                    rows[kind].append({"set": kind, "prompt": requests[kind][index]})
                rows[kind][index][role] = answer
                rows[kind][index][f"{role}_marker_refusal"] = refused
            semantic = judge_responses(judge, requests[kind], result.responses)
            for index, refused in enumerate(semantic):
                rows[kind][index][f"{role}_semantic_refusal"] = refused
            summary[f"{role}_{kind}_marker_refusals"] = f"{result.count}/{len(result.refused)}"
            summary[f"{role}_{kind}_semantic_refusals"] = f"{sum(semantic)}/{len(semantic)}"
        summary[f"{role}_seconds"] = round(time.perf_counter() - start, 1)
        del loaded
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as handle:
        for kind in requests:
            for row in rows[kind]:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    json.dump(summary, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
