"""Train the semantic refusal judge on the labelled answers, and measure it.

    python bench/judge/train.py                 # writes src/blasphemer/data/judge/semantic-judge.*
    python bench/judge/train.py --check-only    # measure, write nothing

Reads the answers in ``bench/judge/answers/*.jsonl`` and their labels in
``bench/judge/labels/*.jsonl`` (joined by ``id``; the fields of ``bench/judge/LABELLING.md``),
splits them into train and test **by prompt** (all answers to one prompt land on one side: a
stable hash of the normalised prompt, one prompt in five to test), and fine-tunes rank-8 adapters
and a linear head on the pinned all-MiniLM-L6-v2 (``bench/models.py fetch minilm``; the encoder
itself stays frozen) to classify (prompt, response) pairs, with a fixed recipe: AdamW, learning
rate 2e-3, batch 16, 6 epochs, seed 0, threshold 0.5. Reports accuracy with 95 % Wilson intervals
on the test split, overall, on the hard subset and without the answers labelled unclear, beside
the marker rule's on the same answers, into ``bench/judge/metrics.json``. The shipped judge is
the one trained on the training split only, so that its test figures are honest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import models as bench_models  # noqa: E402
from blasphemer.evaluation.judging import Answer, MarkerJudge  # noqa: E402
from blasphemer.evaluation.markers import normalize, wilson_interval  # noqa: E402
from blasphemer.evaluation.semantic import (  # noqa: E402
    FORMAT_VERSION,
    MAX_TOKENS,
    PairClassifier,
    SemanticJudge,
    default_head,
)

RANK, EPOCHS, BATCH, LEARNING_RATE, THRESHOLD, SEED = 8, 6, 16, 2e-3, 0.5, 0


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def load_labelled(answers_dir: Path, labels_dir: Path) -> list[dict]:
    """Every answer joined with its label; ``hard`` is set for written answers and for real
    ones whose label differs from the marker rule's verdict."""
    answers = {r["id"]: r for path in sorted(answers_dir.glob("*.jsonl")) for r in _jsonl(path)}
    rows, seen = [], set()
    for path in sorted(labels_dir.glob("*.jsonl")):
        for label in _jsonl(path):
            if label["id"] in seen or label["id"] not in answers:
                raise SystemExit(f"{path}: label {label['id']} is repeated or has no answer")
            if not isinstance(label.get("refusal"), bool):
                raise SystemExit(f"{path}: label {label['id']} has no boolean 'refusal'")
            seen.add(label["id"])
            rows.append({**answers[label["id"]], **label})
    unlabelled = sorted(set(answers) - seen)
    if unlabelled:
        raise SystemExit(f"{len(unlabelled)} answers have no label, e.g. {unlabelled[:3]}")
    marker = MarkerJudge().judge([Answer(r["prompt"], r["response"], 1) for r in rows])
    for row, verdict in zip(rows, marker, strict=True):
        row["hard"] = row["source"] == "written" or verdict.refusal != row["refusal"]
        row["marker_refusal"] = verdict.refusal
    return rows


def prompt_fold(prompt: str, folds: int = 5) -> int:
    """A stable fold of a prompt: sha256 of its normalised text, modulo ``folds``."""
    return int(hashlib.sha256(normalize(prompt).encode()).hexdigest(), 16) % folds


def train(encoder: str, rows: list[dict]) -> PairClassifier:
    """The adapters and head fitted to ``rows`` with the fixed recipe."""
    torch.manual_seed(SEED)
    model = PairClassifier(encoder, RANK)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE, weight_decay=0.01)
    order = list(rows)
    shuffle = random.Random(SEED)
    for _ in range(EPOCHS):
        shuffle.shuffle(order)
        model.train()
        for start in range(0, len(order), BATCH):
            batch = order[start : start + BATCH]
            answers = [Answer(r["prompt"], r["response"], 1) for r in batch]
            target = torch.tensor([float(r["refusal"]) for r in batch])
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                model(model.encode(answers)), target
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def accuracy(rows: list[dict], verdicts: list[bool]) -> dict[str, object]:
    correct = [v == r["refusal"] for r, v in zip(rows, verdicts, strict=True)]
    n, k = len(correct), sum(correct)
    low, high = wilson_interval(k, n) if n else (0.0, 1.0)
    return {"n": n, "correct": k, "accuracy": k / n if n else None, "ci95": [low, high]}


def measure(rows: list[dict], semantic: list[bool]) -> dict[str, object]:
    """Accuracy of the semantic judge and the markers on ``rows``: all, hard, clear ones."""
    out: dict[str, object] = {}
    subsets = {
        "all": lambda r: True,
        "hard": lambda r: r["hard"],
        "clear": lambda r: not r.get("unclear"),
    }
    for name, keep in subsets.items():
        picked = [i for i, r in enumerate(rows) if keep(r)]
        sub = [rows[i] for i in picked]
        out[f"semantic_{name}"] = accuracy(sub, [semantic[i] for i in picked])
        out[f"markers_{name}"] = accuracy(sub, [rows[i]["marker_refusal"] for i in picked])
    return out


def labelled_sha256(rows: list[dict]) -> str:
    digest = hashlib.sha256()
    for row in sorted(rows, key=lambda r: r["id"]):
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode())
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--answers", type=Path, default=HERE / "answers")
    parser.add_argument("--labels", type=Path, default=HERE / "labels")
    parser.add_argument("--encoder", default=None, help="Encoder folder (default: fetched).")
    parser.add_argument("--check-only", action="store_true", help="Measure; write no judge.")
    parser.add_argument("--out", type=Path, default=default_head())
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = load_labelled(args.answers, args.labels)
    encoder = args.encoder or str(bench_models.fetch("minilm"))
    test = [r for r in rows if prompt_fold(r["prompt"]) == 0]
    training = [r for r in rows if prompt_fold(r["prompt"]) != 0]
    started = time.perf_counter()
    model = train(encoder, training)
    train_s = time.perf_counter() - started
    meta = {
        "format_version": FORMAT_VERSION,
        "threshold": THRESHOLD,
        "rank": RANK,
        "max_tokens": MAX_TOKENS,
        "encoder": "sentence-transformers/all-MiniLM-L6-v2",
        "encoder_weights_sha256": hashlib.sha256(
            (Path(encoder) / "model.safetensors").read_bytes()
        ).hexdigest(),
        "recipe": {"epochs": EPOCHS, "batch": BATCH, "learning_rate": LEARNING_RATE, "seed": SEED},
        "trained_on": {"answers": len(training), "labelled_sha256": labelled_sha256(rows)},
    }
    out = args.out if not args.check_only else Path("/tmp") / "semantic-judge-check.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(model.trained_state(), str(out))
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    judge = SemanticJudge(encoder, head=out)  # measured as shipped: loaded back from the file
    started = time.perf_counter()
    verdicts = [
        j.refusal for j in judge.judge([Answer(r["prompt"], r["response"], 1) for r in test])
    ]
    judge_s = time.perf_counter() - started
    report = {
        "n_answers": len(rows),
        "n_train": len(training),
        "n_test": len(test),
        "n_test_hard": sum(r["hard"] for r in test),
        "train_seconds": round(train_s, 1),
        "judge_seconds_per_100_answers": round(100 * judge_s / max(len(test), 1), 2),
        "test": measure(test, verdicts),
        "labelled_sha256": meta["trained_on"]["labelled_sha256"],
    }
    (HERE / "metrics.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
