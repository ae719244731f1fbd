"""Child-process helpers of the benchmarks that need Blasphemer and torch (run in our venv).

    python bench/blasphemer_tools.py export-prompts --model M --out DIR [...]
    python bench/blasphemer_tools.py score --job JOB.json --out SCORES.json
    python bench/blasphemer_tools.py convert --gguf MODEL.gguf --out DIR

``export-prompts`` writes the exact fit and select prompts a ``blasphemer run`` uses (bundled
sets, seeded split and trim) as one-prompt-per-line ``.txt`` files that Heretic reads, and checks
that, rendered with the model's chat template, they equal what Blasphemer itself loads.

``score`` is the one evaluator both tools' models are judged by: Blasphemer's own
:class:`RefusalScorer` (full length, no early stop) and :class:`KLScorer` (first token) on the
held-out *report* split, against the base model. It first saves chosen trials of Blasphemer
studies as merged models (with Blasphemer's own exporter), so that every scored model is a folder
on disk, whichever tool made it.

``convert`` loads a GGUF as Blasphemer does (dequantised, float32) and saves it unchanged as a
safetensors folder with its tokenizer and chat template, so that a tool without GGUF input
(Heretic) reads exactly the weights Blasphemer reads. The folder appears whole or not at all.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _settings(args: argparse.Namespace) -> Any:
    from blasphemer.app.config import Settings

    return Settings(
        model=args.model,
        dtypes=["float32"],
        device_map="cpu",
        system_prompt=args.system_prompt or None,
        split_seed=args.split_seed,
        max_fit_prompts=args.n_fit,
        n_select_prompts=args.n_select,
        n_report_prompts=args.n_report,
        max_new_tokens=args.max_new_tokens,
    )


def _trim(items: list[Any], limit: int, seed: int) -> list[Any]:
    # The same seeded trim as blasphemer.app.context; the check below catches any drift.
    return items if len(items) <= limit else random.Random(seed).sample(items, limit)


def export_prompts(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from blasphemer import prompts as prompt_sets
    from blasphemer.app.context import load_prompts

    settings = _settings(args)
    tokenizer = AutoTokenizer.from_pretrained(args.model)

    def splits(kind: str) -> Any:
        if args.split_seed == 0:
            return prompt_sets.bundled_splits(kind)
        whole = prompt_sets.load_prompt_set(f"bundled:{kind}")
        return prompt_sets.split_prompt_set(whole, seed=args.split_seed)

    harmful, harmless = splits("harmful"), splits("harmless")
    reference = prompt_sets.PromptSet(
        "harmful",
        (*harmful.fit.prompts, *harmful.select.prompts, *harmful.report.prompts),
        "bundled:harmful",
    )
    chosen: dict[str, list[str]] = {}
    for name, part, limit, clean in (
        ("bad_fit", harmful.fit, args.n_fit, False),
        ("bad_eval", harmful.select, args.n_select, False),
        ("good_fit", harmless.fit, args.n_fit, True),
        ("good_eval", harmless.select, args.n_select, True),
    ):
        if clean:
            part = prompt_sets.remove_overlap(part, reference)
        chosen[name] = [p.text for p in _trim(list(part.prompts), limit, args.split_seed)]

    loaded = load_prompts(settings, tokenizer)
    expected = {
        "bad_fit": loaded.harmful.fit,
        "bad_eval": loaded.harmful.select,
        "good_fit": loaded.harmless.fit,
        "good_eval": loaded.harmless.select,
    }
    for name, texts in chosen.items():
        rendered = prompt_sets.render(tokenizer, texts, system_prompt=settings.system_prompt)
        if rendered != expected[name]:
            raise SystemExit(
                f"error: exported {name} prompts differ from what blasphemer loads; "
                "bench/blasphemer_tools.py must follow blasphemer.app.context.load_prompts"
            )
        if any("\n" in text or "\r" in text or text != text.strip() for text in texts):
            raise SystemExit(
                f"error: a {name} prompt has a line break or outer spaces; "
                "Heretic's .txt format cannot carry it"
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, texts in chosen.items():
        (out / f"{name}.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    manifest = {
        "counts": {name: len(texts) for name, texts in chosen.items()},
        "system_prompt": settings.system_prompt,
        "refusal_markers": list(settings.refusal_markers),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(manifest["counts"]))
    return 0


def _export_trials(loaded: Any, model_map: Any, export: dict[str, Any]) -> list[str]:
    """Save the listed trials of one Blasphemer run as merged models; returns the folders."""
    import optuna

    from blasphemer import export as exporting
    from blasphemer.editing import Ablation
    from blasphemer.optimization import parameters_from_dict
    from blasphemer.optimization.metadata import read_metadata

    url = f"sqlite:///{Path(export['study_db']).resolve()}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=None, storage=url)
    directions = read_metadata(study, url).directions
    results = json.loads(Path(export["results_json"]).read_text(encoding="utf-8"))
    by_number = {trial["number"]: trial for trial in results["trials"]}
    folders = []
    for number, folder in export["trials"].items():
        parameters = parameters_from_dict(by_number[int(number)]["parameters"])
        edit = Ablation(directions, parameters)
        exporting.save_merged(loaded, model_map, edit, Path(folder), overwrite=True)
        folders.append(folder)
    return folders


def score(args: argparse.Namespace) -> int:
    import torch

    from blasphemer import architectures, loading
    from blasphemer.app.config import Settings
    from blasphemer.app.context import load_prompts
    from blasphemer.evaluation import KLScorer, RefusalScorer, wilson_interval

    torch.set_grad_enabled(False)
    job = json.loads(Path(args.job).read_text(encoding="utf-8"))
    settings = Settings(
        model=job["base"],
        dtypes=["float32"],
        device_map="cpu",
        system_prompt=job.get("system_prompt") or None,
        split_seed=job.get("split_seed", 0),
        n_report_prompts=job["n_report_prompts"],
        max_new_tokens=job["max_new_tokens"],
    )
    started = time.monotonic()
    base = loading.load_model(job["base"], dtypes=["float32"], device_map="cpu")
    model_map = architectures.resolve(base.model)
    for export in job.get("exports", []):
        _export_trials(base, model_map, export)
    batch = job.get("batch_size") or 16
    prompts = load_prompts(settings, base.tokenizer)
    # Built on the base model: the prefix check and the KL baseline see the unedited model.
    refusals = RefusalScorer(
        base,
        prompts.harmful.report,
        markers=settings.refusal_markers,
        max_new_tokens=settings.max_new_tokens,
        decided_after=None,
        batch_size=batch,
    )
    kl = KLScorer(base, prompts.harmless.report, batch_size=batch)
    # A job that scores more models against a base already scored elsewhere may skip it.
    original = refusals.evaluate() if job.get("score_base", True) else None

    def summary(refused: list[bool], divergence: float, seconds: float) -> dict[str, Any]:
        count, n = sum(refused), len(refused)
        low, high = wilson_interval(count, n)
        return {
            "refusals": count,
            "n_prompts": n,
            "refusal_rate": count / n,
            "refusal_rate_95ci": [low, high],
            "kl": divergence,
            "seconds": seconds,
        }

    scores: dict[str, Any] = {"models": {}}
    if original is not None:
        scores["base"] = summary(original.refused, 0.0, time.monotonic() - started)
    for key, path in job["models"].items():
        began = time.monotonic()
        model = loading.load_model(path, dtypes=["float32"], device_map="cpu")
        if len(model.tokenizer) != len(base.tokenizer):
            raise SystemExit(f"error: {path} and the base model have different vocabularies")
        refusals.loaded = kl.loaded = model
        outcome = refusals.evaluate()
        divergence = kl.score()
        scores["models"][key] = summary(outcome.refused, divergence, time.monotonic() - began)
        del model
        count = sum(outcome.refused)
        print(f"scored {key}: {count}/{len(outcome.refused)} refused, KL {divergence:.4f}")
    scores["n_harmless"] = len(prompts.harmless.report)
    scores["markers"] = list(settings.refusal_markers)
    Path(args.out).write_text(json.dumps(scores, indent=2) + "\n", encoding="utf-8")
    return 0


def convert(args: argparse.Namespace) -> int:
    from blasphemer.gguf_source import sha256_of
    from blasphemer.loading import load_model

    target = Path(args.out).resolve()
    if target.exists():
        print(f"{target} exists; remove it to convert again", file=sys.stderr)
        return 1
    loaded = load_model(args.gguf, dtypes=["float32"], device_map="cpu")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        loaded.model.save_pretrained(staging)
        loaded.tokenizer.save_pretrained(staging)
        gguf = Path(args.gguf).resolve()
        source = {"gguf": str(gguf), "sha256": sha256_of(gguf)}
        (staging / "converted-from.json").write_text(json.dumps(source, indent=2) + "\n")
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(target)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prompts = commands.add_parser("export-prompts")
    prompts.add_argument("--model", required=True)
    prompts.add_argument("--out", required=True)
    prompts.add_argument("--n-fit", type=int, default=400)
    prompts.add_argument("--n-select", type=int, default=100)
    prompts.add_argument("--n-report", type=int, default=200)
    prompts.add_argument("--max-new-tokens", type=int, default=100)
    prompts.add_argument("--split-seed", type=int, default=0)
    prompts.add_argument("--system-prompt", default="")
    scoring = commands.add_parser("score")
    scoring.add_argument("--job", required=True)
    scoring.add_argument("--out", required=True)
    converting = commands.add_parser("convert")
    converting.add_argument("--gguf", required=True)
    converting.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    run = {"export-prompts": export_prompts, "score": score, "convert": convert}[args.command]
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
