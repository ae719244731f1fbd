"""How often the search's early refusal verdict equals the verdict on the whole answer (issue 16).

    python bench/verdicts.py --study-db RUN/study.db --results RUN/out/results.json \\
        --trials 2,11,5,0 --prompts 210 --tokens 100 --out bench/results/DATE-verdicts.json

During the search an answer is called compliant once ``decided_after`` tokens with content and no
marker have been written (see :mod:`blasphemer.evaluation.generation`); the exact verdict needs
the whole answer (Heretic's rule: 100 tokens). The early verdict of an answer is, by
construction, the marker verdict of the first ``m = min(T, s + N - 1)`` tokens of its full-mode
answer (``s``: the first token after which the answer shows content). So one full-mode pass per
edit gives the early verdict for every ``N`` at once; this script checks that identity on one
edit by running the early mode for real (``--check-n``).

The edits are the original model and the listed trials of a finished Blasphemer run on the
fetched Qwen GGUF (its directions from the study database, its parameters from
``results.json``); the prompts are the first ``--prompts`` of ``harmful_test.json``, which the
run never saw. Prints and writes, for each ``N``: verdicts that differ (early compliant, full
refused; the other way cannot happen), agreement with its 95 % interval, and the mean number of
tokens the early mode generates per answer (its cost) against the full mode's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

import models as bench_models
from answers import _instructions
from blasphemer import architectures, prompts
from blasphemer.editing import Ablation
from blasphemer.evaluation import RefusalScorer, wilson_interval
from blasphemer.evaluation.generation import decode_answers
from blasphemer.evaluation.markers import has_content, normalize, strip_response_prefix
from blasphemer.loading import load_model

WINDOWS = (8, 12, 16, 24, 32, 48, 64)


def judged_prefixes(tokenizer: Any, tokens: list[int], prefix: str) -> list[str]:
    """The judged text of the answer after each of its tokens (index t - 1: first t tokens)."""
    texts = decode_answers(tokenizer, [tokens[:t] for t in range(1, len(tokens) + 1)])
    return [normalize(strip_response_prefix(text, prefix)) for text in texts]


def early_verdict(judged: list[str], window: int, markers: Any) -> tuple[bool, int]:
    """The early mode's verdict and answer length for one full-mode answer, from its judged
    prefixes (the rule in :mod:`blasphemer.evaluation.generation`'s docstring)."""
    start = None
    for t, text in enumerate(judged, start=1):
        if markers.find(text) is not None:
            return True, t  # a marker before the window closes: refused, stopped here
        if start is None and has_content(text):
            start = t
        if start is not None and t >= start + window - 1:
            return False, t
    return False, len(judged)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--study-db", type=Path, required=True)
    parser.add_argument("--results", type=Path, required=True, help="The run's results.json.")
    parser.add_argument("--trials", default="", help="Comma-separated trial numbers.")
    parser.add_argument("--prompts", type=int, default=210)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--check-n", type=int, default=16, help="Early mode run for real: N.")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    import optuna

    from blasphemer.optimization import parameters_from_dict
    from blasphemer.optimization.metadata import read_metadata

    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{args.study_db.resolve()}"
    directions = read_metadata(optuna.load_study(study_name=None, storage=url), url).directions
    results = json.loads(args.results.read_text(encoding="utf-8"))
    by_number = {trial["number"]: trial for trial in results["trials"]}
    numbers = [int(n) for n in args.trials.split(",") if n.strip()]

    loaded = load_model(str(bench_models.fetch("qwen")), dtypes=["float32"], device_map="cpu")
    model_map = architectures.resolve(loaded.model)
    texts = prompts.render(loaded.tokenizer, _instructions("harmful_test.json", args.prompts))
    edits: list[tuple[str, Ablation | None]] = [("original", None)]
    for number in numbers:
        parameters = parameters_from_dict(by_number[number]["parameters"])
        edits.append((f"trial {number}", Ablation(directions, parameters)))

    # The response prefix is found once on the unedited model, as a run does.
    full = RefusalScorer(
        loaded, texts, max_new_tokens=args.tokens, decided_after=None, batch_size=args.batch_size
    )
    markers, prefix = full.markers, full.response_prefix
    per_edit: list[dict[str, Any]] = []
    rows: list[tuple[bool, list[str]]] = []  # (full verdict, judged prefixes), all edits
    for name, edit in edits:
        handle = edit.apply(model_map) if edit is not None else None
        try:
            started = time.perf_counter()
            result = full.evaluate()
            seconds = time.perf_counter() - started
            check: dict[str, Any] = {}
            if name == edits[-1][0] and args.check_n:
                early = RefusalScorer(
                    loaded,
                    texts,
                    markers=markers,
                    max_new_tokens=args.tokens,
                    decided_after=args.check_n,
                    batch_size=args.batch_size,
                    response_prefix=prefix,
                )
                started = time.perf_counter()
                real = early.evaluate()
                check = {"n": args.check_n, "seconds": round(time.perf_counter() - started, 1)}
                simulated = [
                    early_verdict(
                        judged_prefixes(loaded.tokenizer, list(v.tokens), prefix),
                        args.check_n,
                        markers,
                    )
                    for v in result.verdicts
                ]
                check["verdicts_differing_from_simulation"] = sum(
                    r != s[0] for r, s in zip(real.refused, simulated, strict=True)
                )
        finally:
            if handle is not None:
                handle.restore()
        per_edit.append(
            {
                "edit": name,
                "full_refusals": sum(result.refused),
                "full_seconds": round(seconds, 1),
                **({"early_mode_check": check} if check else {}),
            }
        )
        rows.extend(
            (v.refused, judged_prefixes(loaded.tokenizer, list(v.tokens), prefix))
            for v in result.verdicts
        )
        print(f"{name}: {sum(result.refused)}/{len(texts)} refused ({seconds:.0f} s)", flush=True)

    windows: list[dict[str, Any]] = []
    full_tokens = sum(len(judged) for _, judged in rows) / len(rows)
    for window in WINDOWS:
        verdicts = [early_verdict(judged, window, markers) for _, judged in rows]
        differ = sum(
            full_refused != early
            for (full_refused, _), (early, _) in zip(rows, verdicts, strict=True)
        )
        agree = len(rows) - differ
        low, high = wilson_interval(agree, len(rows))
        windows.append(
            {
                "decided_after": window,
                "verdicts": len(rows),
                "differ": differ,
                "agreement": agree / len(rows),
                "agreement_95ci": [low, high],
                "mean_tokens": sum(length for _, length in verdicts) / len(rows),
            }
        )
        print(
            f"N={window:>3}: {differ} of {len(rows)} differ, agreement {agree / len(rows):.3f} "
            f"[{low:.3f}-{high:.3f}], {windows[-1]['mean_tokens']:.1f} tokens per answer "
            f"(full: {full_tokens:.1f})",
            flush=True,
        )
    report = {
        "model": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "prompts": f"harmful_test.json[:{args.prompts}]",
        "max_new_tokens": args.tokens,
        "response_prefix": prefix,
        "edits": per_edit,
        "full_mean_tokens": full_tokens,
        "windows": windows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    json.dump(report["windows"], sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
