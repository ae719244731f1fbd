"""Markers anywhere in an answer, or only in its opening: which agrees better with readers?

    python bench/marker_window.py --out bench/results/DATE-marker-window.json

The search's early verdict calls an answer compliant once ``N`` clean tokens are written (see
:mod:`blasphemer.evaluation.generation`): a refusal marker counts only in the answer's opening,
its first ``s + N - 1`` tokens (``s``: the first token with content). Heretic's rule, and
Blasphemer's ``--exact-verdicts``, count a marker anywhere in the first 100 tokens. Where the two
disagree on a real model, is the early verdict the wrong one? This script answers with the
project's labelled answers (``bench/judge``: real answers of Qwen2.5-Coder-0.5B-Instruct, its
edits and SmolLM2-135M-Instruct, and answers written to be hard; every one labelled by reading
it under ``bench/judge/LABELLING.md``). Each answer is tokenised with Qwen's tokenizer (from the
fetched GGUF), judged by the default markers anywhere and within each window ``N``, and both are
compared with the label: accuracy with a 95 % interval, and the answers where the rules differ.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import models as bench_models
from blasphemer.evaluation import wilson_interval
from blasphemer.evaluation.markers import DEFAULT_REFUSAL_MARKERS, RefusalMarkers
from verdicts import early_verdict, judged_prefixes

JUDGE = Path(__file__).resolve().parent / "judge"
WINDOWS = (8, 16, 24, 32, 48, 64)


def labelled_answers() -> list[dict[str, Any]]:
    """Every labelled answer (``answers/`` and ``unseen/answers/`` joined with their labels)."""
    labels: dict[str, dict[str, Any]] = {}
    for path in sorted([*JUDGE.glob("labels/*.jsonl"), *JUDGE.glob("unseen/labels/*.jsonl")]):
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            labels.setdefault(row["id"], row)
    rows = []
    for path in sorted([*JUDGE.glob("answers/*.jsonl"), *JUDGE.glob("unseen/answers/*.jsonl")]):
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if row["id"] in labels:
                rows.append({**row, "refusal": bool(labels[row["id"]]["refusal"])})
    return rows


def accuracy(correct: int, total: int) -> dict[str, Any]:
    low, high = wilson_interval(correct, total)
    return {"correct": correct, "n": total, "accuracy": correct / total, "95ci": [low, high]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    gguf = bench_models.fetch("qwen")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    markers = RefusalMarkers(list(DEFAULT_REFUSAL_MARKERS))
    rows = labelled_answers()
    judged = []
    for row in rows:
        tokens = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
        prefixes = judged_prefixes(tokenizer, list(tokens), "")
        anywhere = markers.find(prefixes[-1]) is not None if prefixes else False
        windows = {n: early_verdict(prefixes, n, markers)[0] for n in WINDOWS}
        judged.append((row, anywhere, windows))

    report: dict[str, Any] = {"answers": len(rows), "markers": "default list", "by_rule": {}}
    groups = {
        "all": lambda r: True,
        "real model answers": lambda r: r["source"] != "written",
        "written to be hard": lambda r: r["source"] == "written",
    }
    for name, keep in groups.items():
        subset = [j for j in judged if keep(j[0])]
        block: dict[str, Any] = {
            "anywhere": accuracy(sum(a == r["refusal"] for r, a, _ in subset), len(subset))
        }
        for n in WINDOWS:
            block[f"first {n} clean tokens"] = accuracy(
                sum(w[n] == r["refusal"] for r, _, w in subset), len(subset)
            )
        report["by_rule"][name] = block
    differ = [
        {
            "id": r["id"],
            "label_refusal": r["refusal"],
            "anywhere": a,
            "response": r["response"][:300],
        }
        for r, a, w in judged
        if a != w[16]
    ]
    report["differ_at_16"] = differ
    report["differ_at_16_early_right"] = sum(d["label_refusal"] != d["anywhere"] for d in differ)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for name, block in report["by_rule"].items():
        cells = ", ".join(f"{rule}: {v['accuracy']:.3f}" for rule, v in block.items())
        print(f"{name} ({block['anywhere']['n']}): {cells}")
    print(
        f"rules differ (N=16) on {len(differ)} answers; the early verdict is the reader's on "
        f"{report['differ_at_16_early_right']}"
    )
    json.dump({k: v for k, v in report.items() if k != "differ_at_16"}, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
