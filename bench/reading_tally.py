"""Refusals by reading for the answers of ``bench/edit_strength.py`` runs (issue 11).

    python bench/reading_tally.py --labels LABELS.jsonl RESULT.json [RESULT.json ...] [--json]

``LABELS.jsonl`` holds answers labelled by hand under ``bench/judge/LABELLING.md``: one line
each with ``prompt``, ``response`` (as the reader saw it: a ``--prefill`` text and then the
model's continuation), ``refusal``, ``kind`` and optionally ``unclear``. Every harmful answer of
every edit in each result is looked up by its prompt and shown text; a missing label is an error
naming the edit and the prompt. Prints per edit: refusals by reading (unclear ones counted by
the reader's best label, and apart), how they split into kinds, and the run's marker and
semantic-judge counts beside them.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path
from typing import Any

from answers import _instructions


def load_labels(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """Labels keyed by (prompt, shown response); a repeated key must carry the same label."""
    labels: dict[tuple[str, str], dict[str, Any]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row.get("refusal"), bool):
            raise SystemExit(f"{path}:{number}: no boolean 'refusal'")
        key = (row["prompt"], row["response"])
        if key in labels and labels[key]["refusal"] != row["refusal"]:
            raise SystemExit(f"{path}:{number}: the same answer labelled both ways")
        labels[key] = row
    return labels


def harmful_prompts(result: dict[str, Any]) -> list[str]:
    """The harmful prompts a result's answers belong to, from its ``prompts`` window."""
    found = re.search(r"harmful_test\.json\[(\d+):(\d+)\]", result["prompts"])
    if found is None:
        raise SystemExit(f"cannot tell the prompts from {result['prompts']!r}")
    return _instructions("harmful_test.json", int(found[2]))[int(found[1]) :]


def tally(result: dict[str, Any], labels: dict[tuple[str, str], dict[str, Any]]) -> list[dict]:
    """One row per edit of ``result``: reading counts beside the run's own."""
    prompts, prefill = harmful_prompts(result), result.get("prefill", "")
    rows = []
    for edit, measured in result["edits"].items():
        kinds: collections.Counter[str] = collections.Counter()
        refused = unclear = unclear_refused = 0
        for prompt, answer in zip(prompts, measured["answers"], strict=True):
            label = labels.get((prompt, prefill + answer))
            if label is None:
                raise SystemExit(f"no label for {edit} (prefill {prefill!r}) on {prompt[:60]!r}")
            refused += label["refusal"]
            if label.get("unclear"):
                unclear += 1
                unclear_refused += label["refusal"]
            if label["refusal"]:
                kinds[label.get("kind") or "?"] += 1
        rows.append(
            {
                "prefill": prefill,
                "edit": edit,
                "n": len(prompts),
                "reading_refusals": refused,
                "of_which_unclear": unclear_refused,
                "unclear": unclear,
                "kinds": dict(kinds.most_common()),
                "marker_refusals": measured["marker_refusals"],
                "semantic_refusals": measured["semantic_refusals"],
                "kl_first_token": round(measured["kl_first_token"], 4),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--labels", type=Path, required=True)
    parser.add_argument("results", type=Path, nargs="+")
    parser.add_argument("--json", action="store_true", help="One JSON line per edit.")
    args = parser.parse_args(argv)
    labels = load_labels(args.labels)
    for path in args.results:
        for row in tally(json.loads(path.read_text(encoding="utf-8")), labels):
            if args.json:
                print(json.dumps(row))
                continue
            kinds = ", ".join(f"{k} {v}" for k, v in row["kinds"].items())
            print(
                f"{row['prefill'] or '(none)'!s:>12} | {row['edit']:<16} | reading "
                f"{row['reading_refusals']}/{row['n']} ({row['of_which_unclear']} of them unclear; "
                f"{row['unclear']} unclear in all) | markers {row['marker_refusals']}, "
                f"semantic {row['semantic_refusals']} | KL {row['kl_first_token']} | {kinds}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
