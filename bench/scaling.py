"""How Blasphemer's cost grows: time per trial against model size and against prompt count.

    python bench/scaling.py                 # default grid (15–25 minutes on one CPU thread)
    python bench/scaling.py --quick         # smoke run
    python bench/scaling.py --sizes 4x256,8x256,8x512 --prompts 50,100,200 --trials 8
    python bench/scaling.py --real qwen     # the grid and the fetched real model as a point

Models are built here, not downloaded: random Llama models of the given ``LAYERSxHIDDEN`` that
share the tokenizer and chat template of ``--tokenizer-from`` (default: the bundled demo model).
Their end-of-sequence logit is pinned to zero so greedy answers never stop early, and trials
judge every answer on the full ``--max-new-tokens`` (``--exact-verdicts``): every trial
generates the same number of tokens, and only the model size or prompt count changes.

Each point is one ``blasphemer run`` with ``--trials`` trials; its time per trial is the median
trial duration in the study database. The sweep over model sizes uses ``--sweep-prompts``
prompts; the sweep over prompt counts uses the ``--sweep-model`` size. Writes
``bench/results/<date>-scaling.{json,md,png}`` and prints the table.

``--real KEY`` adds a point for a fetched real model (``bench/models.py``; e.g. ``qwen``) with
the model-size sweep's prompts and the same settings. Its end-of-sequence token is not touched
(its GGUF is read as it is) and exact verdicts still end a refused answer at its marker, so its
answers are shorter than the random models': the point is the time a real trial takes at these
settings, a little below the same shape's cost at full length.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import blasphemer_runner
from bench_common import BenchError, apply_presets, exit_code, fmt, markdown_table, median

BENCH = Path(__file__).resolve().parent
DEMO_MODEL = BENCH.parent / "src" / "blasphemer" / "data" / "demo-model"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
)
PRESETS = {  # option: (full run, --quick)
    "sizes": ("2x128,4x128,4x256,8x256,8x512,16x512", "2x64,4x128"),
    "prompts": ("25,50,100,200", "10,20"),
    "sweep_model": ("4x256", "2x64"),
    "sweep_prompts": (100, 20),
    "trials": (6, 3),
    "repeats": (2, 1),
    "max_new_tokens": (32, 16),
    "n_fit": (128, 32),
}


def log(message: str) -> None:
    print(f"[scaling {datetime.now():%H:%M:%S}] {message}", flush=True)


def parse_size(text: str) -> tuple[int, int]:
    """``"8x256"`` → (8 layers, hidden size 256)."""
    layers, _, hidden = text.strip().lower().partition("x")
    if not (layers.isdigit() and hidden.isdigit()) or int(layers) < 1 or int(hidden) < 32:
        raise BenchError(f"model size {text!r}: write LAYERSxHIDDEN, e.g. 8x256 (hidden ≥ 32)")
    if int(hidden) % 32:
        raise BenchError(f"model size {text!r}: the hidden size must be a multiple of 32")
    return int(layers), int(hidden)


def llama_shape(layers: int, hidden: int) -> dict[str, int]:
    """Config numbers of a Llama of this size: heads of width 32 (at most 64 wide), 8/3 MLP."""
    head_dim = 64 if hidden % 64 == 0 and hidden >= 256 else 32
    heads = hidden // head_dim
    return {
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "intermediate_size": 32 * round(hidden * 8 / 3 / 32),
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": head_dim,
    }


def build_model(source: Path, layers: int, hidden: int, folder: Path, seed: int = 0) -> int:
    """Save a random Llama of this size with ``source``'s tokenizer; returns its parameter count."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(source)
    eos = tokenizer.eos_token_id
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
        tie_word_embeddings=False,
        initializer_range=0.05,
        **llama_shape(layers, hidden),
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        if eos is not None:
            model.lm_head.weight[eos].zero_()  # a zero logit never wins greedy: no early stop
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, folder / name)
    return sum(p.numel() for p in model.parameters())


def point(
    exe: Path, model: Path, prompts: int, args: argparse.Namespace, workdir: Path
) -> dict[str, Any]:
    """One ``blasphemer run``: median time per trial, directions time, batch size, peak memory."""
    options = blasphemer_runner.BlasphemerOptions(
        model=str(model),
        n_trials=args.trials,
        n_select_prompts=prompts,
        n_fit_prompts=args.n_fit,
        n_report_prompts=8,  # the held-out stage is not what this measures
        max_new_tokens=args.max_new_tokens,
        system_prompt="",
        seed=0,
        exact_verdicts=True,
        batch_size=args.batch_size or None,
    )
    done = blasphemer_runner.run_blasphemer(
        exe, options, workdir, threads=args.threads, timeout=args.timeout
    )
    process = done.process
    start = process.first_time(blasphemer_runner.PHASE_LINES["directions"])
    end = process.first_time(blasphemer_runner.PHASE_LINES["baseline"])
    trial_seconds = median(t.seconds for t in done.trials)
    return {
        "prompts": prompts,
        "max_new_tokens": args.max_new_tokens,
        "trials": len(done.trials),
        "trial_s": trial_seconds,
        "trial_s_per_prompt": None if trial_seconds is None else trial_seconds / prompts,
        "directions_s": None if start is None or end is None else end - start,
        "batch_size": blasphemer_runner.batch_size_from(process.lines) or args.batch_size or None,
        "peak_rss_mib": process.peak_rss_mib,
        "log": str(process.log_path),
    }


def merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One point from its repeats: medians of the timings and memory, every run kept."""
    first = runs[0]
    merged = {key: first[key] for key in ("prompts", "max_new_tokens", "batch_size")}
    for key in ("trial_s", "trial_s_per_prompt", "directions_s", "peak_rss_mib"):
        merged[key] = median(r[key] for r in runs)
    return {**merged, "repeats": len(runs), "runs": runs}


def table(rows: list[dict[str, Any]]) -> str:
    headers = ["layers", "hidden", "parameters (M)", "prompts", "tokens", "batch",
               "s per trial", "ms per trial per prompt", "directions (s)", "peak MiB"]  # fmt: skip
    body = [
        [
            str(r["layers"]),
            str(r["hidden"]),
            fmt(r["parameters"] / 1e6, 2),
            str(r["prompts"]),
            str(r["max_new_tokens"]),
            str(r["batch_size"] or "–"),
            fmt(r["trial_s"], 2),
            fmt(None if r["trial_s_per_prompt"] is None else 1000 * r["trial_s_per_prompt"], 1),
            fmt(r["directions_s"], 2),
            fmt(r["peak_rss_mib"], 0),
        ]
        for r in rows
    ]
    return markdown_table(headers, body)


def real_model(key: str) -> tuple[Path, tuple[int, int], int]:
    """A fetched real model's GGUF, its (layers, hidden size) and parameter count, read from
    the GGUF's metadata and tensor shapes (nothing is loaded)."""
    import gguf

    import models

    path = models.fetch(key)
    reader = gguf.GGUFReader(path)
    fields = reader.fields
    arch = bytes(fields["general.architecture"].parts[-1]).decode()

    def number(name: str) -> int:
        return int(fields[f"{arch}.{name}"].parts[-1][0])

    parameters = sum(int(tensor.n_elements) for tensor in reader.tensors)
    return path, (number("block_count"), number("embedding_length")), parameters


def plot(
    by_size: list[dict[str, Any]],
    by_prompts: list[dict[str, Any]],
    path: Path,
    real: list[dict[str, Any]] | None = None,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    sizes = [r for r in by_size if r["trial_s"] is not None]
    left.plot([r["parameters"] / 1e6 for r in sizes], [r["trial_s"] for r in sizes], "o-")
    for r in sizes:
        left.annotate(f"{r['layers']}×{r['hidden']}", (r["parameters"] / 1e6, r["trial_s"]),
                      textcoords="offset points", xytext=(4, 4), fontsize=8)  # fmt: skip
    for r in real or []:
        if r["trial_s"] is not None:
            left.plot([r["parameters"] / 1e6], [r["trial_s"]], "r*", markersize=12)
            left.annotate(f"{r['model']} (real)", (r["parameters"] / 1e6, r["trial_s"]),
                          textcoords="offset points", xytext=(-60, 6), fontsize=8)  # fmt: skip
    if real:
        left.set_xscale("log")
    per_set = sizes[0]["prompts"] if sizes else "?"
    left.set(xlabel="parameters (millions)", ylabel="seconds per trial",
             title=f"model size ({per_set} prompts per set)")  # fmt: skip
    counts = [r for r in by_prompts if r["trial_s"] is not None]
    right.plot([r["prompts"] for r in counts], [r["trial_s"] for r in counts], "o-")
    shape = f"{counts[0]['layers']}×{counts[0]['hidden']}" if counts else "?"
    right.set(xlabel="evaluation prompts per set", ylabel="seconds per trial",
              title=f"prompt count (model {shape})")  # fmt: skip
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.set_ylim(bottom=0)
    tokens = (by_size or by_prompts)[0]["max_new_tokens"] if by_size or by_prompts else "?"
    figure.suptitle(f"Blasphemer time per trial ({tokens} generated tokens per answer, CPU)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--sizes", help="model sizes LAYERSxHIDDEN, comma-separated")
    add("--prompts", help="prompt counts of the second sweep, comma-separated")
    add("--sweep-model", help="model size of the prompt-count sweep")
    add("--sweep-prompts", type=int, help="prompts per set in the model-size sweep")
    add("--trials", type=int, help="trials per point")
    add("--repeats", type=int, help="runs per point, interleaved (default 2; --quick 1)")
    add("--max-new-tokens", type=int, help="generated tokens per answer (fixed)")
    add("--n-fit", type=int, help="fit prompts per set")
    add(
        "--batch-size",
        type=int,
        default=16,
        help="fixed batch size, so only size and prompt count change (0: Blasphemer measures it)",
    )
    add("--threads", type=int, default=1)
    add("--quick", action="store_true", help="smoke run: two small models, two prompt counts")
    add("--tokenizer-from", type=Path, default=DEMO_MODEL, help="model folder with the tokenizer")
    add("--real", help="also time this fetched real model (a bench/models.py key, e.g. qwen)")
    add("--timeout", type=float, default=3600)
    add("--workdir", type=Path)
    add("--results-dir", type=Path, default=BENCH / "results")
    args = parser.parse_args(argv)
    apply_presets(args, PRESETS)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return exit_code(lambda: run(args))


def run(args: argparse.Namespace) -> Path:
    source = args.tokenizer_from.resolve()
    if not (source / "tokenizer_config.json").exists():
        raise BenchError(f"{source} holds no tokenizer; pass --tokenizer-from MODEL_DIR")
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    sweep_model = parse_size(args.sweep_model)
    counts = [int(c) for c in args.prompts.split(",") if c.strip()]
    exe = blasphemer_runner.executable()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    workdir = (args.workdir or BENCH / "work" / f"scaling-{stamp}").resolve()
    built: dict[tuple[int, int], tuple[Path, int]] = {}
    for layers, hidden in {*sizes, sweep_model}:
        folder = workdir / "models" / f"{layers}x{hidden}"
        built[(layers, hidden)] = (folder, build_model(source, layers, hidden, folder))
        log(f"built {layers}x{hidden}: {built[(layers, hidden)][1] / 1e6:.2f} M parameters")

    # Every point in every repeat, interleaved, so that load changes on a shared machine hit
    # all points alike; each point reports the median over its repeats.
    plan = [("size", s, args.sweep_prompts) for s in sizes]
    plan += [("prompts", sweep_model, n) for n in counts]
    if args.real:
        path, shape, parameters = real_model(args.real)
        built[shape] = (path, parameters)
        plan.append(("real", shape, args.sweep_prompts))
        log(
            f"real model {args.real}: {shape[0]} layers, hidden {shape[1]}, "
            f"{parameters / 1e6:.0f} M parameters"
        )
    runs: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(plan))}
    for repeat in range(1, args.repeats + 1):
        for i, (sweep, size, prompts) in enumerate(plan):
            name = f"{sweep}-{size[0]}x{size[1]}-p{prompts}-r{repeat}"
            log(f"repeat {repeat}/{args.repeats}: {size[0]}x{size[1]}, {prompts} prompts ...")
            result = point(exe, built[size][0], prompts, args, workdir / name)
            log(f"  {fmt(result['trial_s'])} s per trial")
            runs[i].append(result)
    rows = [
        {"sweep": sweep, "layers": size[0], "hidden": size[1], "parameters": built[size][1],
         **merge(runs[i])}
        for i, (sweep, size, _) in enumerate(plan)
    ]  # fmt: skip
    by_size = [r for r in rows if r["sweep"] == "size"]
    by_prompts = [r for r in rows if r["sweep"] == "prompts"]
    real = [r | {"model": args.real} for r in rows if r["sweep"] == "real"]
    real_text = (
        [
            "",
            f"## Real model: {args.real} ({args.sweep_prompts} + {args.sweep_prompts} prompts)",
            "",
            "Its own end-of-sequence token and refusal markers end some answers early (see the "
            "module docstring), so this is a real trial's time at these settings.",
            "",
            table(real),
        ]
        if real
        else []
    )
    text = "\n".join(
        [
            f"# Blasphemer scaling — {datetime.now():%Y-%m-%d %H:%M}",
            "",
            f"Random Llama models with the tokenizer of `{source.name}`; {args.trials} trials per "
            f"run, {args.repeats} interleaved run(s) per point (medians); every answer "
            f"{args.max_new_tokens} tokens (exact verdicts, no early stop); batch size "
            f"{args.batch_size or 'measured'}; {args.threads} thread(s).",
            "",
            f"## Model size ({args.sweep_prompts} harmful + {args.sweep_prompts} harmless prompts)",
            "",
            table(by_size),
            "",
            f"## Prompt count (model {sweep_model[0]}x{sweep_model[1]})",
            "",
            table(by_prompts),
            *real_text,
        ]
    )
    args.results_dir.mkdir(parents=True, exist_ok=True)
    name = f"{datetime.now():%Y-%m-%d}-scaling{'-quick' if args.quick else ''}"
    if (args.results_dir / f"{name}.json").exists():
        name += f"-{datetime.now():%H%M%S}"
    path = args.results_dir / f"{name}.json"
    setup = {k: getattr(args, k) for k in PRESETS} | {
        "threads": args.threads,
        "source": str(source),
    }
    record = {"setup": setup, "by_size": by_size, "by_prompts": by_prompts, "real": real}
    path.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    path.with_suffix(".md").write_text(text + f"\n\n![time per trial]({name}.png)\n")
    plot(by_size, by_prompts, path.with_suffix(".png"), real)
    print()
    print(text)
    log(f"wrote {path} (.md, .png)")
    return path


if __name__ == "__main__":
    sys.exit(main())
