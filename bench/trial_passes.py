"""A trial's two passes on the real model, with each lever on and off, timed in one run.

    python bench/trial_passes.py --out bench/results/DATE-trial-passes.json
    python bench/trial_passes.py --prompts 16 --repeats 1        # a quick look
    python bench/trial_passes.py --lever layers --edits 6 --out bench/results/DATE-layer-cache.json

A trial scores an edit twice: the KL pass (first-token log-probs on the harmless select prompts)
and the refusal pass (greedy answers to the harmful select prompts, stopped once decided). This
runs both on the fetched Qwen2.5-Coder-0.5B-Instruct under one fixed edit (directions from 32 +
32 other prompts, weight 1 at the middle layer falling to 0 a third of the layers away), with
the shared-prefix cache off and on, in alternating order over ``--repeats`` rounds, and prints
the median seconds of each and their ratio. It also checks that both settings give the same
verdicts and KL values within float32 rounding, so a faster setting that changed results shows.

``--lever dtype`` loads the model twice, in float32 and in bfloat16, fits directions in each,
and times both passes of ``--edits`` edits drawn as above on each (both with the shared prefix
and the layer cache, as a run has them). bfloat16 rounds: instead of equality it reports how
many verdicts (the unedited model's and each edit's) and answers differ, and how far the KL
values move. ``--lever attention`` does the same in bfloat16 with transformers' attention
kernels: ``sdpa`` (its default, what a run uses) and ``eager``. ``--lever window`` does it in
bfloat16 with an answer decided after 16 clean tokens and after 8. ``--lever batch`` does it in
bfloat16 with 32 prompts a batch and 64 (50 prompts: two batches against one). ``--lever
argmax`` does it in bfloat16 with the next token picked by ``argmax`` on the logits (as before)
and by ``max(...).indices`` (``decoding.top_tokens``, shipped). ``--lever refill`` does it in
bfloat16 with batches decoded one after the other and with a batch refilled from the next as
its answers are decided (shipped). Lanes that load
the model the same way (dtype and attention kernel) share one load and one set of directions.
``--exact`` answers in full, stopped only at a marker (the exact verdicts of a comparison's
``exact`` mode), instead of deciding an answer after ``--decided-after`` clean tokens.

``--lever layers`` compares the shared prefix alone with the shared prefix plus the layer cache
(:mod:`blasphemer.evaluation.frozen`, which replays the layers below an edit's first edited
layer). What that saves depends on where the edit starts, so it times ``--edits`` edits drawn
at random from the default search space (seed 0, as a study's start-up trials are), and checks
that verdicts and KL values are equal bit for bit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.samplers import RandomSampler

import models as bench_models
from answers import _instructions
from blasphemer import architectures, prompts
from blasphemer.ablation import AblationParameters, ComponentKind, KernelParameters
from blasphemer.directions import compute_directions
from blasphemer.editing import Ablation
from blasphemer.evaluation import KLScorer, RefusalScorer, decoding
from blasphemer.evaluation.frozen import LayerCache
from blasphemer.evaluation.markers import DEFAULT_DECIDED_AFTER
from blasphemer.evaluation.prefix import split_prefix
from blasphemer.loading import load_model
from blasphemer.optimization.search_space import SearchSpace
from blasphemer.residuals import mean_residuals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=50, help="Harmful and harmless each.")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64, help="max_new_tokens")
    parser.add_argument("--decided-after", type=int, default=DEFAULT_DECIDED_AFTER)
    parser.add_argument(
        "--exact", action="store_true", help="Whole answers, stopped only at a marker."
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lever", choices=("prefix", "layers", *LANES), default="prefix")
    parser.add_argument("--edits", type=int, default=6, help="With --lever layers.")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.lever == "layers":
        return layer_cache_bench(args)
    if args.lever in LANES:
        return lanes_bench(args, args.lever)
    loaded, model_map, harmful, harmless, directions = _setup(args)
    ids = loaded.tokenizer(harmful, add_special_tokens=False)["input_ids"]
    shared = split_prefix(ids)
    mean_length = sum(len(row) for row in ids) / len(ids)
    print(f"shared prefix {len(shared.prefix)} of {mean_length:.1f} tokens on average", flush=True)

    # One fixed edit.
    n_layers = model_map.n_layers
    kernel = KernelParameters(1.0, n_layers / 2, 0.0, n_layers / 3)
    parameters = AblationParameters(
        direction_index=n_layers / 2,
        kernels={ComponentKind.ATTENTION: kernel, ComponentKind.MLP: kernel},
    )

    scorers: dict[str, tuple[KLScorer, RefusalScorer]] = {}
    for name, share in (("whole prompts", False), ("shared prefix", True)):
        kl = KLScorer(loaded, harmless, batch_size=args.batch_size, share_prefix=share)
        refusals = RefusalScorer(
            loaded,
            harmful,
            max_new_tokens=args.tokens,
            decided_after=args.decided_after,
            batch_size=args.batch_size,
            share_prefix=share,
        )
        scorers[name] = (kl, refusals)

    times: dict[str, dict[str, list[float]]] = {n: {"kl": [], "refusals": []} for n in scorers}
    results: dict[str, Any] = {}
    handle = Ablation(directions, parameters).apply(model_map)
    try:
        for round_ in range(args.repeats):
            order = list(scorers) if round_ % 2 == 0 else list(reversed(scorers))
            for name in order:
                kl, refusals = scorers[name]
                started = time.perf_counter()
                divergence = kl.per_prompt()
                times[name]["kl"].append(time.perf_counter() - started)
                started = time.perf_counter()
                verdicts = refusals.evaluate()
                times[name]["refusals"].append(time.perf_counter() - started)
                results[name] = (divergence, verdicts.refused)
                print(
                    f"round {round_ + 1} {name}: KL pass {times[name]['kl'][-1]:.1f} s, "
                    f"refusal pass {times[name]['refusals'][-1]:.1f} s "
                    f"({sum(verdicts.refused)}/{len(verdicts.refused)} refused)",
                    flush=True,
                )
    finally:
        handle.restore()

    (kl_whole, refused_whole), (kl_shared, refused_shared) = results.values()
    medians = {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}
    base, lever = medians["whole prompts"], medians["shared prefix"]
    report = {
        "model": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        **_settings(args),
        "shared_prefix_tokens": len(shared.prefix),
        "mean_prompt_tokens": mean_length,
        "median_seconds": medians,
        "ratio_shared_over_whole": {k: lever[k] / base[k] for k in base},
        "ratio_trial": sum(lever.values()) / sum(base.values()),
        "verdicts_differing": sum(
            a != b for a, b in zip(refused_whole, refused_shared, strict=True)
        ),
        "kl_max_abs_difference": float((kl_whole - kl_shared).abs().max()),
        "kl_mean": [float(kl_whole.mean()), float(kl_shared.mean())],
    }
    return _emit(report, args.out)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """The pass settings every report records."""
    return {
        "prompts": args.prompts,
        "batch_size": args.batch_size,
        "max_new_tokens": args.tokens,
        "decided_after": None if args.exact else args.decided_after,
        "threads": args.threads,
        "repeats": args.repeats,
    }


def _emit(report: dict[str, Any], out: Path | None) -> int:
    """Print the report, and write it to ``out`` when given."""
    print(json.dumps(report, indent=2))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


def _setup(
    args: argparse.Namespace, dtype: str = "float32", attention: str | None = None
) -> tuple[Any, Any, list[str], list[str], Any]:
    """Threads, the fetched Qwen (with the ``attention`` kernel when given, else transformers'
    default), the harmful and harmless pass prompts, and directions from 32 + 32 other prompts
    the passes do not use."""
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    loaded = load_model(str(bench_models.fetch("qwen")), dtypes=[dtype], device_map="cpu")
    if attention is not None:
        loaded.model.set_attn_implementation(attention)
    model_map = architectures.resolve(loaded.model)
    harmful = prompts.render(loaded.tokenizer, _instructions("harmful_test.json", args.prompts))
    harmless = prompts.render(loaded.tokenizer, _instructions("harmless_test.json", args.prompts))
    fit = {
        kind: prompts.render(loaded.tokenizer, _instructions(f"{kind}_test.json", 300)[-32:])
        for kind in ("harmful", "harmless")
    }
    residuals = {
        kind: mean_residuals(loaded, model_map, texts, batch_size=args.batch_size)
        for kind, texts in fit.items()
    }
    directions = compute_directions(residuals["harmful"], residuals["harmless"], projected=True)
    return loaded, model_map, harmful, harmless, directions


def layer_cache_bench(args: argparse.Namespace) -> int:
    """``--lever layers``: the shared prefix with and without the layer cache, over edits drawn
    from the search space."""
    loaded, model_map, harmful, harmless, directions = _setup(args)
    edits = _random_edits(model_map.n_layers, args.edits)

    layers = loaded.model.get_submodule(model_map.layers_path)
    assert isinstance(layers, torch.nn.ModuleList)
    setup: dict[str, float] = {}
    scorers: dict[str, tuple[KLScorer, RefusalScorer, LayerCache | None]] = {}
    caches: list[LayerCache] = []
    for name, cached in (("shared prefix", False), ("shared prefix + layer cache", True)):
        pair = [LayerCache(layers, loaded.model.get_input_embeddings()) for _ in range(2)]
        kl_cache, refusal_cache = pair if cached else (None, None)
        started = time.perf_counter()
        kl = KLScorer(loaded, harmless, batch_size=args.batch_size, layer_cache=kl_cache)
        refusals = RefusalScorer(
            loaded,
            harmful,
            max_new_tokens=args.tokens,
            decided_after=args.decided_after,
            batch_size=args.batch_size,
            layer_cache=refusal_cache,
        )
        refusals.record_layers()
        setup[name] = time.perf_counter() - started
        scorers[name] = (kl, refusals, refusal_cache)
        caches += pair if cached else []
    mib = sum(c.bytes for c in caches) / 2**20
    print(f"layer caches: {mib:.0f} MiB, strides {[c.stride for c in caches]}", flush=True)

    rows = []
    for number, parameters in enumerate(edits):
        times: dict[str, dict[str, list[float]]] = {n: {"kl": [], "refusals": []} for n in scorers}
        results: dict[str, Any] = {}
        replayed: set[int] = set()
        with Ablation(directions, parameters).apply(model_map) as handle:
            first = min(int(path.split(".")[2]) for path, _ in handle.edited)
            for round_ in range(args.repeats):
                order = list(scorers) if (round_ + number) % 2 == 0 else list(reversed(scorers))
                for name in order:
                    kl, refusals, layer_cache = scorers[name]
                    seen = 0 if layer_cache is None else len(layer_cache.replayed_layers)
                    started = time.perf_counter()
                    divergence = kl.per_prompt()
                    times[name]["kl"].append(time.perf_counter() - started)
                    started = time.perf_counter()
                    verdicts = refusals.evaluate()
                    times[name]["refusals"].append(time.perf_counter() - started)
                    results[name] = (divergence, [v.tokens for v in verdicts.verdicts])
                    if layer_cache is not None:
                        replayed.update(layer_cache.replayed_layers[seen:])
        medians = {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}
        (kl_a, tokens_a), (kl_b, tokens_b) = results.values()
        base, lever = medians.values()
        row = {
            "edit": number,
            "first_edited_layer": first,
            "replayed_layers": sorted(replayed),  # by the refusal pass's prefills
            "median_seconds": medians,
            "ratio_trial": sum(lever.values()) / sum(base.values()),
            "answers_differing": sum(a != b for a, b in zip(tokens_a, tokens_b, strict=True)),
            "kl_bit_equal": bool(torch.equal(kl_a, kl_b)),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    totals = {
        name: sum(sum(row["median_seconds"][name].values()) for row in rows) for name in scorers
    }
    base_total, lever_total = totals.values()
    report = {
        "model": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "lever": "layer cache (with the shared prefix in both)",
        **_settings(args),
        "edits": len(rows),
        "layers": model_map.n_layers,
        "setup_seconds": setup,
        "cache_mib": mib,
        "cache_strides": [c.stride for c in caches],
        "rows": rows,
        "ratio_all_edits": lever_total / base_total,
    }
    return _emit(report, args.out)


def _random_edits(n_layers: int, count: int) -> list[AblationParameters]:
    """``count`` edits drawn from the default search space as a study's start-up trials are."""
    space = SearchSpace.build(n_layers)
    study = optuna.create_study(directions=["minimize"] * 2, sampler=RandomSampler(seed=0))
    return [space.sample(study.ask()) for _ in range(count)]


# The two-lane levers: (lane name, dtype, attention kernel or None for the default, clean
# tokens that decide an answer or None for --decided-after, prompts a batch or None for
# --batch-size, how the next token is picked: None for the shipped ``top_tokens`` or "argmax"
# for ``argmax`` on the logits as before, whether decided rows are refilled from the next
# batch), the baseline first, and what the report calls the lever.
Lane = tuple[str, str, str | None, int | None, int | None, str | None, bool]
LANES: dict[str, tuple[list[Lane], str]] = {
    "dtype": (
        [
            ("float32", "float32", None, None, None, None, True),
            ("bfloat16", "bfloat16", None, None, None, None, True),
        ],
        "bfloat16 against float32 (shared prefix and layer cache in both)",
    ),
    "attention": (
        [
            ("sdpa", "bfloat16", "sdpa", None, None, None, True),
            ("eager", "bfloat16", "eager", None, None, None, True),
        ],
        "eager attention against sdpa (transformers' default), both in bfloat16 with the "
        "shared prefix and layer cache",
    ),
    "window": (
        [
            ("16 clean tokens", "bfloat16", None, 16, None, None, True),
            ("8 clean tokens", "bfloat16", None, 8, None, None, True),
        ],
        "an answer decided after 8 clean tokens against 16, both in bfloat16 with the shared "
        "prefix and layer cache",
    ),
    "batch": (
        [
            ("32 a batch", "bfloat16", None, None, 32, None, True),
            ("64 a batch", "bfloat16", None, None, 64, None, True),
        ],
        "64 prompts a batch against 32, both in bfloat16 with the shared prefix and layer cache",
    ),
    "argmax": (
        [
            ("argmax", "bfloat16", None, None, None, "argmax", True),
            ("max indices", "bfloat16", None, None, None, None, True),
        ],
        "the next token as max(...).indices against argmax on the bfloat16 logits, both with "
        "the shared prefix and layer cache",
    ),
    "refill": (
        [
            ("batch after batch", "bfloat16", None, None, None, None, False),
            ("refilled", "bfloat16", None, None, None, None, True),
        ],
        "a batch refilled from the next as its answers are decided, against batch after batch, "
        "both in bfloat16 with the shared prefix and layer cache",
    ),
}


@contextlib.contextmanager
def _picking(picker: str | None) -> Iterator[None]:
    """Decode with ``argmax`` on the logits (as before ``top_tokens``) for "argmax"."""
    shipped = decoding.top_tokens
    if picker == "argmax":
        decoding.top_tokens = lambda logits: logits.argmax(dim=-1)
    try:
        yield
    finally:
        decoding.top_tokens = shipped


def lanes_bench(args: argparse.Namespace, lever: str) -> int:
    """``--lever dtype``, ``attention``, ``window``, ``batch`` or ``argmax``: both passes in
    each of the lever's two settings (the model loaded and its directions fitted once per dtype
    and attention kernel), over edits drawn from the search space; the agreement of verdicts,
    answers and KL values between the two."""
    specs, title = LANES[lever]
    lanes: dict[str, dict[str, Any]] = {}
    loads: dict[tuple[str, str | None], tuple[Any, ...]] = {}
    for name, dtype, attention, window, batch_size, picker, refill in specs:
        started = time.perf_counter()
        if (dtype, attention) not in loads:
            loads[dtype, attention] = _setup(args, dtype, attention)
        loaded, model_map, harmful, harmless, directions = loads[dtype, attention]
        size = batch_size or args.batch_size
        layers = loaded.model.get_submodule(model_map.layers_path)
        caches = [LayerCache(layers, loaded.model.get_input_embeddings()) for _ in range(2)]
        kl = KLScorer(loaded, harmless, batch_size=size, layer_cache=caches[0])
        refusals = RefusalScorer(
            loaded,
            harmful,
            max_new_tokens=args.tokens,
            decided_after=None if args.exact else window or args.decided_after,
            batch_size=size,
            stop_at_marker=args.exact,
            layer_cache=caches[1],
            refill=refill,
        )
        original = refusals.evaluate()  # records the refusal pass's layer cache
        lanes[name] = {
            "picker": picker,
            "model_map": model_map,
            "directions": directions,
            "scorers": (kl, refusals),
            "setup_seconds": time.perf_counter() - started,
            "original": list(original.refused),
        }
        print(f"{name}: set up in {lanes[name]['setup_seconds']:.0f} s", flush=True)
    base_name, lever_name = lanes
    n_layers = lanes[base_name]["model_map"].n_layers
    rows = []
    for number, parameters in enumerate(_random_edits(n_layers, args.edits)):
        results: dict[str, Any] = {}
        times: dict[str, dict[str, list[float]]] = {d: {"kl": [], "refusals": []} for d in lanes}
        for round_ in range(args.repeats):
            order = list(lanes) if (round_ + number) % 2 == 0 else list(reversed(lanes))
            for name in order:
                lane = lanes[name]
                kl, refusals = lane["scorers"]
                edit = Ablation(lane["directions"], parameters).apply(lane["model_map"])
                with edit, _picking(lane["picker"]):
                    started = time.perf_counter()
                    divergence = kl.per_prompt()
                    times[name]["kl"].append(time.perf_counter() - started)
                    started = time.perf_counter()
                    verdicts = refusals.evaluate()
                    times[name]["refusals"].append(time.perf_counter() - started)
                results[name] = (divergence, verdicts)
        # The baseline first, whatever order the round ran them in.
        (kl_a, verdicts_a), (kl_b, verdicts_b) = results[base_name], results[lever_name]
        medians = {d: {k: statistics.median(v) for k, v in t.items()} for d, t in times.items()}
        row = {
            "edit": number,
            "median_seconds": medians,
            "ratio_trial": sum(medians[lever_name].values()) / sum(medians[base_name].values()),
            "refused": [sum(verdicts_a.refused), sum(verdicts_b.refused)],
            "verdicts_differing": sum(
                a != b for a, b in zip(verdicts_a.refused, verdicts_b.refused, strict=True)
            ),
            "answers_differing": sum(
                a.tokens != b.tokens
                for a, b in zip(verdicts_a.verdicts, verdicts_b.verdicts, strict=True)
            ),
            "answer_tokens_mean": [
                statistics.mean(len(v.tokens) for v in verdicts.verdicts)
                for verdicts in (verdicts_a, verdicts_b)
            ],
            "kl_mean": [float(kl_a.mean()), float(kl_b.mean())],
            "kl_max_abs_difference": float((kl_a - kl_b).abs().max()),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    totals = {d: sum(sum(row["median_seconds"][d].values()) for row in rows) for d in lanes}
    originals = [lanes[d]["original"] for d in lanes]
    cosines = torch.nn.functional.cosine_similarity(
        lanes[base_name]["directions"].vectors, lanes[lever_name]["directions"].vectors, dim=-1
    )
    report = {
        "model": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "lever": title,
        **_settings(args),
        "edits": len(rows),
        "setup_seconds": {d: lanes[d]["setup_seconds"] for d in lanes},
        "lane_decided_after": {d: lanes[d]["scorers"][1].decided_after for d in lanes},
        "lane_batch_size": {d: lanes[d]["scorers"][1].batch_size for d in lanes},
        "original_refused": [sum(o) for o in originals],
        "original_verdicts_differing": sum(a != b for a, b in zip(*originals, strict=True)),
        "direction_cosine_min": float(cosines.min()),
        "rows": rows,
        "ratio_all_edits": totals[lever_name] / totals[base_name],
        "verdicts_differing_all_edits": sum(row["verdicts_differing"] for row in rows),
        "verdicts_all_edits": len(rows) * args.prompts,
    }
    return _emit(report, args.out)


if __name__ == "__main__":
    sys.exit(main())
