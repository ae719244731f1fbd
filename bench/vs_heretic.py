"""Blasphemer against Heretic on one model, one machine, in one invocation.

    python bench/vs_heretic.py --trials 50           # the bundled demo model, 2 repeats
    python bench/vs_heretic.py --quick               # smoke run: 3 trials, few prompts
    python bench/vs_heretic.py --model DIR --repeats 3 --skip-install
    python bench/vs_heretic.py --model qwen --trials 20 --n-eval 50   # a pinned real model

Both tools get the same model, the same prompt files (our bundled fit and select splits,
exported as text files), the same trial budget, number of evaluation prompts, response length,
thread count, seed and system prompt, and by default the same number of random start-up trials
and the same refusal markers. Each tool runs ``--repeats`` times, interleaved (the order rotates
every repeat); medians are reported. Blasphemer runs in both modes: early stop (its default) and
``--exact-verdicts``. Then the Pareto-front models of every tool's first repeat are saved
(Heretic's through its own menu, Blasphemer's with its own exporter) and all of them are scored by
one evaluator, Blasphemer's, on the held-out *report* split. Writes
``bench/results/<date>-vs-heretic.json`` and ``.md`` and prints the Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import blasphemer_runner
import heretic_driver
import models as bench_models
from bench_common import (
    BenchError,
    apply_presets,
    child_env,
    exit_code,
    fmt,
    pareto_front,
    run_timed,
    spread,
)
from vs_heretic_report import (
    TOOLS,
    aggregate,
    front_rows,
    markdown,
    mean_phases,
    quality,
    run_summary,
    trial_dicts,
)

BENCH = Path(__file__).resolve().parent
DEMO_MODEL = BENCH.parent / "src" / "blasphemer" / "data" / "demo-model"
TOOLS_SCRIPT = BENCH / "blasphemer_tools.py"
PRESETS = {  # option: (full run, --quick)
    "trials": (50, 3),
    "repeats": (2, 1),
    "n_eval": (100, 20),
    "n_fit": (400, 64),
    "n_report": (200, 40),
    "max_new_tokens": (100, 32),
    "max_front": (8, 3),
}
CONCURRENT = (
    "Heretic on one core while Blasphemer's modes ran one after the other on another (--concurrent)"
)
STARTUP_FRACTION = 0.3  # Heretic's shipped ratio: 60 random trials of 200


def log(message: str) -> None:
    print(f"[vs-heretic {datetime.now():%H:%M:%S}] {message}", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add(
        "--model",
        default=str(DEMO_MODEL),
        help="model folder, or a pinned GGUF of bench/models.py (qwen, smollm2, gemma3), fetched "
        "and converted once to a float32 safetensors folder both tools load (default: the "
        "bundled demo model)",
    )
    add("--trials", type=int, help="trial budget of every run (default 50; --quick 3)")
    add("--repeats", type=int, help="runs per tool, interleaved (default 2; --quick 1)")
    add("--quick", action="store_true", help="smoke run: 3 trials, few prompts, one repeat")
    add("--skip-install", action="store_true", help="never pip-install Heretic; fail if missing")
    add("--threads", type=int, default=1, help="threads of every model process (default 1)")
    add("--n-eval", type=int, help="harmful and harmless prompts scored per trial (default 100)")
    add("--n-fit", type=int, help="prompts per set for the directions (default 400)")
    add("--n-report", type=int, help="report-split prompts per set for final scores (default 200)")
    add("--max-new-tokens", type=int, help="response length of both tools (default 100)")
    add(
        "--system-prompt",
        default="You are a helpful assistant.",
        help="system prompt of every prompt, for both tools (Heretic always sends one)",
    )
    add("--seed", type=int, default=0, help="optimiser seed of both tools")
    add(
        "--startup-trials",
        default="scaled",
        help="random trials before TPE for both tools: a number, 'scaled' (30%% of --trials, "
        "Heretic's ratio; the default) or 'tool-defaults' (Heretic 60, Blasphemer 20)",
    )
    add(
        "--heretic-markers",
        choices=("ours", "heretic"),
        default="ours",
        help="refusal markers Heretic optimises against (default: Blasphemer's, the evaluator's)",
    )
    add("--batch-size", type=int, help="one batch size for both tools (default: each measures)")
    add(
        "--concurrent",
        action="store_true",
        help="run Heretic beside Blasphemer's modes instead of one tool at a time: about half "
        "the wall time on a machine with a core per tool; both then share memory bandwidth",
    )
    add("--modes", default="early,exact", help="Blasphemer modes: early, exact or early,exact")
    add(
        "--blasphemer-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="Blasphemer's dtype (default float32, Heretic's always; bfloat16 pays on a CPU "
        "with AVX512-BF16 or AMX, and Heretic's generate-based passes are slower in it there)",
    )
    add("--max-front", type=int, help="front models scored per tool (default 8)")
    add(
        "--refusal-threshold",
        type=float,
        default=0.1,
        help="refusal rate under which the lowest report KL is compared (default 0.1)",
    )
    add("--timeout", type=float, default=4 * 3600, help="seconds one run may take")
    add("--workdir", type=Path, help="scratch folder (default bench/work/vs-heretic-<time>)")
    add("--results-dir", type=Path, default=BENCH / "results")
    add("--heretic-venv", type=Path, default=BENCH / ".venv-heretic")
    args = parser.parse_args(argv)
    apply_presets(args, PRESETS)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if unknown := set(args.modes) - {"early", "exact"}:
        parser.error(f"unknown --modes {sorted(unknown)}; use early, exact or early,exact")
    if min(args.trials, args.repeats, args.n_eval, args.n_fit, args.n_report) < 1:
        parser.error("--trials, --repeats and the prompt counts must be at least 1")
    return args


def startup_trials(spec: str, trials: int) -> tuple[int | None, str]:
    """Random start-up trials for both tools (None: each tool's default) and a note on them."""
    if spec == "tool-defaults":
        return None, "random start-up trials: each tool's default (Heretic 60, Blasphemer 20)"
    if spec == "scaled":
        count = max(1, round(STARTUP_FRACTION * trials))
        return count, f"{count} random start-up trials for both (30% of the budget, as Heretic)"
    if spec.isdigit():
        return int(spec), f"{spec} random start-up trials for both"
    raise BenchError(f"--startup-trials {spec!r}: use a number, 'scaled' or 'tool-defaults'")


def export_prompts(args: argparse.Namespace, model: Path, workdir: Path) -> tuple[Path, list[str]]:
    """Write the fit and select prompts Blasphemer uses as Heretic's .txt files; their markers."""
    folder = workdir / "prompts"
    command = [
        sys.executable, str(TOOLS_SCRIPT), "export-prompts", "--model", str(model),
        "--out", str(folder), "--n-fit", str(args.n_fit), "--n-select", str(args.n_eval),
        "--n-report", str(args.n_report), "--max-new-tokens", str(args.max_new_tokens),
        "--system-prompt", args.system_prompt,
    ]  # fmt: skip
    done = run_timed(
        command, cwd=workdir, env=child_env(args.threads), log_path=workdir / "export-prompts.log"
    )
    if done.returncode != 0:
        raise BenchError(f"exporting the prompt files failed:\n{done.tail()}")
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    return folder, manifest["refusal_markers"]


def resolve_model(name: str, threads: int) -> Path:
    """A model folder: ``name`` itself, or a pinned GGUF converted once (cached beside it)."""
    if name not in bench_models.MODELS or Path(name).exists():
        return Path(name).resolve()
    try:
        gguf = bench_models.fetch(name)
    except bench_models.FetchError as error:
        raise BenchError(f"fetching {name} failed: {error}") from None
    if not gguf.name.endswith(".gguf"):
        raise BenchError(f"--model {name}: not a GGUF model; pass a model folder")
    folder = gguf.with_name(f"{gguf.stem}-float32")
    if not (folder / "config.json").is_file():
        log(f"converting {gguf.name} to a safetensors folder (once) ...")
        command = [sys.executable, str(TOOLS_SCRIPT), "convert", "--gguf", str(gguf)]
        done = run_timed(
            [*command, "--out", str(folder)],
            cwd=folder.parent,
            env=child_env(threads),
            log_path=folder.with_name(f"{folder.name}.log"),
        )
        if done.returncode != 0:
            raise BenchError(f"converting {gguf} failed:\n{done.tail()}")
    return folder


def run_tool(
    tool: str, repeat: int, args: argparse.Namespace, where: Path, plans: dict[str, Any]
) -> tuple[dict[str, Any], Any]:
    """One run of one tool; returns its summary and the tool's own run record."""
    if tool != "heretic":
        done: Any = blasphemer_runner.run_blasphemer(
            plans["blasphemer_exe"], plans[tool], where, threads=args.threads, timeout=args.timeout
        )
        batch = blasphemer_runner.batch_size_from(done.process.lines) or args.batch_size
        phases = blasphemer_runner.SUMMARY_PHASES
        summary = run_summary(tool, repeat, done.process, phases, trial_dicts(done.trials), batch)
        summary["recorded_timings"] = blasphemer_runner.recorded_timings(done.results_json)
        recorded = blasphemer_runner.read_trial_phases(done.study_db)
        summary["trial_phases_s"] = mean_phases(list(recorded.values()), summary["mean_trial_s"])
        return summary, done

    saves = args.max_front if repeat == 1 else 1  # later repeats save one, for the total time

    def plan(trials: list[Any]) -> dict[int, Path]:
        points = {t["key"]: (t["refusals"], t["kl"]) for t in trial_dicts(trials)}
        return {i: where / "saved" / f"trial-{i}" for i in spread(pareto_front(points), saves)}

    done = heretic_driver.run_heretic(
        plans["heretic_exe"],
        plans["heretic"],
        where,
        plan_saves=plan,
        threads=args.threads,
        timeout=args.timeout,
    )
    batch = heretic_driver.batch_size_from(done.process.lines) or args.batch_size
    phases = heretic_driver.SUMMARY_PHASES
    summary = run_summary(tool, repeat, done.process, phases, trial_dicts(done.trials), batch)
    parsed = heretic_driver.trial_phases(done.process.lines)
    summary["trial_phases_s"] = mean_phases(parsed, summary["mean_trial_s"])
    summary["saved"] = {str(k): str(v) for k, v in done.saved.items()}
    summary["missing_from_menu"] = done.missing
    return summary, done


def score_fronts(
    args: argparse.Namespace,
    model: Path,
    workdir: Path,
    first: dict[str, Any],
    *,
    score_base: bool = True,
) -> dict[str, Any]:
    """Save Blasphemer's front trials, then score every saved front model on the report split."""
    job: dict[str, Any] = {
        "base": str(model),
        "system_prompt": args.system_prompt,
        "n_report_prompts": args.n_report,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "split_seed": 0,
        "score_base": score_base,
        "exports": [],
        "models": {},
    }
    for tool, (summary, done) in first.items():
        if tool == "heretic":
            job["models"].update({f"heretic:{i}": str(f) for i, f in done.saved.items()})
            continue
        chosen = spread(summary["front"], args.max_front)
        folders = {str(n): str(done.output_dir.parent / "front" / f"trial-{n}") for n in chosen}
        job["exports"].append(
            {
                "study_db": str(done.study_db),
                "results_json": str(done.results_json),
                "trials": folders,
            }
        )
        job["models"].update({f"{tool}:{n}": folder for n, folder in folders.items()})
    job_path, out = workdir / "score-job.json", workdir / "scores.json"
    job_path.write_text(json.dumps(job, indent=2) + "\n", encoding="utf-8")
    log(f"scoring {len(job['models'])} front models on the report split ...")
    done = run_timed(
        [sys.executable, str(TOOLS_SCRIPT), "score", "--job", str(job_path), "--out", str(out)],
        cwd=workdir,
        env=child_env(args.threads),
        log_path=workdir / "score.log",
        timeout=args.timeout,
    )
    if done.returncode != 0:
        raise BenchError(f"scoring failed; see {done.log_path}\n{done.tail()}")
    return json.loads(out.read_text(encoding="utf-8"))


def machine() -> str:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{platform.machine()}, {cpus} CPUs available, {platform.platform()}"


def benchmark(args: argparse.Namespace) -> Path:
    """Run everything; returns the path of the results JSON."""
    model = resolve_model(args.model, args.threads)
    if not (model / "config.json").is_file():
        raise BenchError(f"{model} is not a model folder (no config.json); pass --model DIR")
    startup, startup_note = startup_trials(args.startup_trials, args.trials)
    plans: dict[str, Any] = {
        "heretic_exe": heretic_driver.ensure_installed(
            args.heretic_venv, skip_install=args.skip_install, log=log
        ),
        "blasphemer_exe": blasphemer_runner.executable(),
    }
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    workdir = (args.workdir or BENCH / "work" / f"vs-heretic-{stamp}").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    log(f"working in {workdir}")
    prompts, markers = export_prompts(args, model, workdir)
    plans["heretic"] = heretic_driver.HereticConfig(
        model=str(model),
        good_fit=prompts / "good_fit.txt",
        bad_fit=prompts / "bad_fit.txt",
        good_eval=prompts / "good_eval.txt",
        bad_eval=prompts / "bad_eval.txt",
        n_trials=args.trials,
        seed=args.seed,
        max_response_length=args.max_new_tokens,
        system_prompt=args.system_prompt,
        n_startup_trials=startup,
        refusal_markers=tuple(markers) if args.heretic_markers == "ours" else None,
        batch_size=args.batch_size or 0,
    )
    for mode in args.modes:
        plans[mode] = blasphemer_runner.BlasphemerOptions(
            model=str(model),
            n_trials=args.trials,
            n_select_prompts=args.n_eval,
            n_fit_prompts=args.n_fit,
            n_report_prompts=args.n_report,
            max_new_tokens=args.max_new_tokens,
            system_prompt=args.system_prompt,
            seed=args.seed,
            exact_verdicts=mode == "exact",
            n_startup_trials=startup,
            batch_size=args.batch_size,
            dtype=args.blasphemer_dtype,
        )

    runs, first = run_all(args, workdir, plans)
    schedule = CONCURRENT if args.concurrent else "one tool at a time"
    return finish(args, model, workdir, (startup, startup_note), runs, first, schedule)


def run_all(
    args: argparse.Namespace, workdir: Path, plans: dict[str, Any]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every run of every tool: summaries in the order they ended, and each tool's first run.

    One at a time, the order rotating every repeat; or, with ``--concurrent``, Heretic in a
    thread of its own while Blasphemer's modes run one after the other beside it.
    """
    runs: list[dict[str, Any]] = []
    first: dict[str, Any] = {}

    def one(tool: str, repeat: int) -> None:
        log(f"repeat {repeat}/{args.repeats}: {TOOLS[tool]} ...")
        summary, done = run_tool(tool, repeat, args, workdir / f"{tool}-r{repeat}", plans)
        runs.append(summary)
        first.setdefault(tool, (summary, done))
        log(
            f"  {TOOLS[tool]}: {summary['n_trials']} trials, {fmt(summary['mean_trial_s'])} s "
            f"per trial, directions {fmt(summary['directions_s'])} s, "
            f"peak {fmt(summary['peak_rss_mib'], 0)} MiB"
        )

    order = ["heretic", *args.modes]
    for repeat in range(1, args.repeats + 1):
        if args.concurrent:
            with ThreadPoolExecutor(max_workers=1) as pool:
                heretic = pool.submit(one, "heretic", repeat)
                for mode in args.modes:
                    one(mode, repeat)
                heretic.result()
            continue
        shift = (repeat - 1) % len(order)
        for tool in order[shift:] + order[:shift]:
            one(tool, repeat)
    return runs, first


def finish(
    args: argparse.Namespace,
    model: Path,
    workdir: Path,
    startup: tuple[int | None, str],
    runs: list[dict[str, Any]],
    first: dict[str, Any],
    schedule: str = "one tool at a time",
    scores: dict[str, Any] | None = None,
) -> Path:
    """Score the first repeat's fronts (unless ``scores`` has them), then write and print the
    results; returns the JSON path."""
    if scores is None:
        scores = score_fronts(args, model, workdir, first)
    fronts = {
        tool: front_rows(summary, scores["models"], tool) for tool, (summary, _) in first.items()
    }
    result = {
        "setup": {
            "date": datetime.now().strftime("%Y-%m-%d %H:%M"),
            "model": str(model),
            **{key: getattr(args, key) for key in PRESETS},
            "threads": args.threads,
            "seed": args.seed,
            "system_prompt": args.system_prompt,
            "n_startup_trials": startup[0],
            "startup_note": startup[1],
            "schedule": schedule,
            "heretic_markers": {"ours": "Blasphemer's for both", "heretic": "each tool its own"}[
                args.heretic_markers
            ],
            "batch_size": args.batch_size,
            "modes": args.modes,
            "blasphemer_dtype": getattr(args, "blasphemer_dtype", "float32"),
            "refusal_threshold": args.refusal_threshold,
            "heretic_version": heretic_driver.HERETIC_VERSION,
            "machine": machine(),
            "quick": args.quick,
            "workdir": str(workdir),
        },
        "summary": aggregate(runs),
        "quality": {tool: quality(rows, args.refusal_threshold) for tool, rows in fronts.items()},
        "fronts": fronts,
        "scores": scores,
        "runs": runs,
    }
    return write_results(args, result)


def write_results(args: argparse.Namespace, result: dict[str, Any]) -> Path:
    """Write the JSON and the Markdown beside it (never over an earlier result) and print it."""
    args.results_dir.mkdir(parents=True, exist_ok=True)
    tag = f"-{args.model}" if args.model in bench_models.MODELS else ""
    name = f"{datetime.now():%Y-%m-%d}-vs-heretic{tag}{'-quick' if args.quick else ''}"
    if (args.results_dir / f"{name}.json").exists():
        name += f"-{datetime.now():%H%M%S}"
    text = markdown(result)
    path = args.results_dir / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    path.with_suffix(".md").write_text(text, encoding="utf-8")
    print()
    print(text)
    log(f"wrote {path} and {path.with_suffix('.md').name}")
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return exit_code(lambda: benchmark(args))


if __name__ == "__main__":
    sys.exit(main())
