"""Two probes together: the sum of their logits, a fixed rule with nothing fitted on top.

    python bench/judge/probe.py --model qwen-1.5b --read question --save-features q.pt --out q.json
    python bench/judge/probe.py --model qwen-1.5b --read reply --save-features r.pt --out r.json
    python bench/judge/combine_probes.py q.json q.pt r.json r.pt --out both.json

Each probe is refitted on the training split with the layers and penalty its own run chose by
cross-validation (read from its result file), exactly as ``probe.py`` fits it; the sum of the two
logits is then measured once on the test split and the unseen set, beside each probe alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import probe  # noqa: E402


def probe_logits(result: Path, saved: Path, rows: list[dict]) -> dict[str, list[float]]:
    """Per split (test, unseen), the logits of the probe that ``result`` chose."""
    chosen = json.loads(result.read_text(encoding="utf-8"))["probe_choice"]["chosen"]
    data = torch.load(saved)
    if data["ids"] != [r["id"] for r in rows]:
        raise SystemExit(f"{saved}: its answers are not the labelled set's; run probe.py again")
    features = data["features"]
    fitted = probe.fit_chosen(features, rows, chosen["layers"], chosen["penalty"])
    return {
        split: fitted(features[[i for i, r in enumerate(rows) if r["split"] == split]]).tolist()
        for split in ("test", "unseen")
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("first_result", type=Path)
    parser.add_argument("first_features", type=Path)
    parser.add_argument("second_result", type=Path)
    parser.add_argument("second_features", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    rows = probe.labelled_rows()
    first = probe_logits(args.first_result, args.first_features, rows)
    second = probe_logits(args.second_result, args.second_features, rows)
    report: dict[str, object] = {
        "first": str(args.first_result),
        "second": str(args.second_result),
    }
    for split in ("test", "unseen"):
        sub = [r for r in rows if r["split"] == split]
        both = [a + b for a, b in zip(first[split], second[split], strict=True)]
        report[split] = {
            name: {**probe.accuracy(sub, [z > 0 for z in z_list]), "auc": probe.auc(z_list, sub)}
            for name, z_list in (("first", first[split]), ("second", second[split]), ("sum", both))
        }
        print(split, json.dumps(report[split]), flush=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
