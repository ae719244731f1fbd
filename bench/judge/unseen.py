"""Measure the shipped semantic judge on answers it never saw, labelled after it was trained.

    python bench/judge/unseen.py

Reads ``bench/judge/unseen/answers/*.jsonl`` and ``bench/judge/unseen/labels/*.jsonl`` (same
format as the training set; none of these answers or their prompts' answers were used in
training) and adds ``unseen`` to ``bench/judge/metrics.json``: the judge's and the marker rule's
accuracy, overall, on the hard subset and on the answers not labelled unclear.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import train  # noqa: E402

import models as bench_models  # noqa: E402
from blasphemer.evaluation.judging import Answer  # noqa: E402
from blasphemer.evaluation.semantic import SemanticJudge  # noqa: E402


def main() -> int:
    torch.set_num_threads(1)
    rows = train.load_labelled(HERE / "unseen" / "answers", HERE / "unseen" / "labels")
    judge = SemanticJudge(str(bench_models.fetch("minilm")))
    verdicts = [
        j.refusal for j in judge.judge([Answer(r["prompt"], r["response"], 1) for r in rows])
    ]
    metrics_path = HERE / "metrics.json"
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    metrics["unseen"] = {"n": len(rows), **train.measure(rows, verdicts)}
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(metrics["unseen"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
