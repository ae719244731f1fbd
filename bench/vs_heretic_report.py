"""The numbers of the Heretic comparison: one run's timings, medians over repeats, the scored
Pareto fronts, and the Markdown report. Pure functions of plain data, so they are easy to test.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from bench_common import ProcessRecord, fmt, markdown_table, median, pareto_front, ratio

TOOLS = {
    "heretic": "Heretic",
    "early": "Blasphemer (early stop)",
    "exact": "Blasphemer (exact)",
}
MEASURES = (  # (key, label, digits)
    ("directions_s", "directions (s)", 1),
    ("setup_s", "setup before the first trial, without directions (s)", 1),
    ("mean_trial_s", "mean time per trial (s)", 2),
    ("to_last_trial_s", "launch to last trial (s)", 1),
    ("total_s", "launch to a saved model (s)", 1),
    ("peak_rss_mib", "peak memory (MiB)", 0),
)


class TrialLike(Protocol):
    """What both tools' trial records offer (see heretic_driver and blasphemer_runner)."""

    @property
    def key(self) -> int | None: ...
    @property
    def complete(self) -> bool: ...
    @property
    def seconds(self) -> float | None: ...

    refusals: int | None
    n_prompts: int | None
    kl: float | None
    started: Any
    finished: Any


def trial_dicts(trials: Iterable[TrialLike]) -> list[dict[str, Any]]:
    """Complete, scored trials as plain data; times as epoch seconds."""
    return [
        {
            "key": t.key,
            "refusals": t.refusals,
            "n_prompts": t.n_prompts,
            "kl": t.kl,
            "seconds": t.seconds,
            "started": t.started.timestamp() if t.started else None,
            "finished": t.finished.timestamp() if t.finished else None,
        }
        for t in trials
        if t.complete and t.key is not None and t.refusals is not None and t.kl is not None
    ]


def run_summary(
    tool: str,
    repeat: int,
    process: ProcessRecord,
    phases: Mapping[str, str],
    trials: list[dict[str, Any]],
    batch_size: int | None,
) -> dict[str, Any]:
    """The timings and select-split front of one finished run.

    ``trials`` come from :func:`trial_dicts`; ``phases`` names the console lines that open the
    directions (``directions``), end them (``directions_end``) and report a saved model
    (``saved``). Directions time is the span between those lines; setup is launch to the first
    trial's start, less the directions.
    """
    start = process.first_time(phases["directions"])
    end = process.first_time(phases["directions_end"])
    directions = end - start if start is not None and end is not None else None
    starts = [t["started"] for t in trials if t["started"] is not None]
    ends = [t["finished"] for t in trials if t["finished"] is not None]
    first_trial = min(starts) - process.started_at if starts else None
    seconds = [t["seconds"] for t in trials if t["seconds"] is not None]
    points = {t["key"]: (float(t["refusals"]), float(t["kl"])) for t in trials}
    return {
        "tool": tool,
        "repeat": repeat,
        "log": str(process.log_path),
        "n_trials": len(trials),
        "batch_size": batch_size,
        "directions_s": directions,
        "setup_s": None if first_trial is None or directions is None else first_trial - directions,
        "mean_trial_s": sum(seconds) / len(seconds) if seconds else None,
        "median_trial_s": median(seconds),
        "to_last_trial_s": max(ends) - process.started_at if ends else None,
        "total_s": process.first_time(phases["saved"]),
        "process_s": process.seconds,
        "peak_rss_mib": process.peak_rss_mib,
        "trials": [
            {k: v for k, v in t.items() if k not in ("started", "finished")} for t in trials
        ],
        "front": pareto_front(points),
    }


def aggregate(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per tool: the median of every measure over its repeats, and whether the fronts agreed."""
    result: dict[str, dict[str, Any]] = {}
    for tool in TOOLS:
        mine = [r for r in runs if r["tool"] == tool]
        if not mine:
            continue
        fronts = set()
        for run in mine:
            # KL to 4 significant digits: padding differs with the batch size, the low bits too.
            points = [(t["refusals"], f"{t['kl']:.4g}") for t in run["trials"]]
            keys = [t["key"] for t in run["trials"]]
            fronts.add(
                tuple(sorted(p for k, p in zip(keys, points, strict=True) if k in run["front"]))
            )
        result[tool] = {
            **{key: median(r[key] for r in mine) for key, _, _ in MEASURES},
            "repeats": len(mine),
            "fronts_agree": len(fronts) == 1,
        }
    return result


def mean_phases(
    per_trial: Sequence[Mapping[str, float]], mean_trial_s: float | None
) -> dict[str, float]:
    """Mean seconds per phase of a trial, plus ``other``: the mean trial time not in any phase
    (sampling the parameters, storage, console). Empty when no trial recorded its phases."""
    if not per_trial:
        return {}
    names = list(dict.fromkeys(name for trial in per_trial for name in trial))
    means = {name: sum(t.get(name, 0.0) for t in per_trial) / len(per_trial) for name in names}
    if mean_trial_s is not None:
        means["other"] = mean_trial_s - sum(means.values())
    return means


def phases_table(runs: list[dict[str, Any]], labels: Mapping[str, str]) -> str:
    """Each tool's mean trial split into phases (first repeat), as Markdown lines."""
    lines = []
    for run in runs:
        phases = run.get("trial_phases_s") or {}
        if run["repeat"] != 1 or not phases:
            continue
        parts = ", ".join(f"{name} {seconds:.2f}" for name, seconds in phases.items())
        lines.append(f"- {labels[run['tool']]}: {parts} (seconds per trial)")
    if not lines:
        return ""
    return "\n".join(["Where a trial's time goes (repeat 1, mean seconds):", "", *lines])


def front_rows(run: dict[str, Any], scores: Mapping[str, Any], tool: str) -> list[dict[str, Any]]:
    """The scored front trials of one run, with select-split and report-split scores."""
    by_key = {t["key"]: t for t in run["trials"]}
    rows = []
    for key in run["front"]:
        score = scores.get(f"{tool}:{key}")
        if score is None:
            continue
        trial = by_key[key]
        rows.append(
            {
                "trial": key,
                "select_refusals": trial["refusals"],
                "select_n": trial.get("n_prompts"),
                "select_kl": trial["kl"],
                **{f"report_{k}": v for k, v in score.items()},
            }
        )
    return sorted(rows, key=lambda r: (r["report_refusal_rate"], r["report_kl"]))


def quality(rows: list[dict[str, Any]], threshold: float) -> dict[str, float | None]:
    """A scored front in two numbers: its lowest report refusals (with their KL), and its lowest
    report KL among models refusing at most ``threshold``."""
    if not rows:
        return {"lowest_refusal_rate": None, "kl_at_lowest_refusals": None, "lowest_kl_under": None}
    best = min(rows, key=lambda r: (r["report_refusal_rate"], r["report_kl"]))
    under = [r["report_kl"] for r in rows if r["report_refusal_rate"] <= threshold]
    return {
        "lowest_refusal_rate": best["report_refusal_rate"],
        "kl_at_lowest_refusals": best["report_kl"],
        "lowest_kl_under": min(under) if under else None,
    }


def comparison_table(
    values: Mapping[str, Mapping[str, float | None]],
    rows: Iterable[tuple[str, str, int]],
    labels: Mapping[str, str] = TOOLS,
    no_ratio: frozenset[str] = frozenset(),
) -> str:
    """Rows of measures, a column per tool, and a Blasphemer/Heretic ratio column per mode.

    ``values[tool][key]``; ``rows`` are (key, label, digits). Ratios need a ``heretic`` column;
    rows whose key is in ``no_ratio`` show none (their values are not comparable as a ratio).
    """
    tools = [tool for tool in labels if tool in values]
    modes = [tool for tool in tools if tool != "heretic"]
    headers = [
        "measure",
        *(labels[tool] for tool in tools),
        *(f"{labels[tool].removeprefix('Blasphemer ')} / Heretic" for tool in modes),
    ]
    body = []
    for key, label, digits in rows:
        cells = [label, *(fmt(values[tool].get(key), digits) for tool in tools)]
        if "heretic" in values and key not in no_ratio:
            cells += [fmt(ratio(values[t].get(key), values["heretic"].get(key)), 2) for t in modes]
        else:
            cells += ["–" for _ in modes]
        body.append(cells)
    return markdown_table(headers, body)


def _front_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no front model was scored)"
    body = []
    for r in rows:
        low, high = r["report_refusal_rate_95ci"]
        select = (
            f"{r['select_refusals']}/{r['select_n']}"
            if r["select_n"]
            else f"{r['select_refusals']}"
        )
        body.append(
            [
                str(r["trial"]),
                select,
                f"{r['select_kl']:.4f}",
                f"{r['report_refusal_rate']:.1%} [{low:.1%}–{high:.1%}]",
                f"{r['report_kl']:.4f}",
            ]
        )
    headers = [
        "trial",
        "refusals (select)",
        "KL (select)",
        "refusals (report, 95% CI)",
        "KL (report)",
    ]
    return markdown_table(headers, body)


def batch_sizes(runs: list[dict[str, Any]], labels: Mapping[str, str] = TOOLS) -> str:
    """One line: the batch size each tool used in each repeat (measured unless fixed)."""
    parts = []
    for tool, label in labels.items():
        sizes = [str(r["batch_size"] or "?") for r in sorted(runs, key=lambda r: r["repeat"])
                 if r["tool"] == tool]  # fmt: skip
        if sizes:
            parts.append(f"{label}: {', '.join(sizes)}")
    return "Batch sizes by repeat: " + "; ".join(parts) + "." if parts else ""


def markdown(result: dict[str, Any]) -> str:
    """The report: setup, cost table (medians), quality table, and each tool's scored front."""
    setup, summary, fronts = result["setup"], result["summary"], result["fronts"]
    labels = {**TOOLS, "heretic": f"Heretic {setup['heretic_version']}"}
    threshold = setup["refusal_threshold"]
    quality_values = {
        tool: {
            "lowest_refusal_pct": None
            if q["lowest_refusal_rate"] is None
            else 100 * q["lowest_refusal_rate"],
            "kl_at_lowest_refusals": q["kl_at_lowest_refusals"],
            "lowest_kl_under": q["lowest_kl_under"],
        }
        for tool, q in result["quality"].items()
    }
    quality_measures = (
        ("lowest_refusal_pct", "lowest report refusals on the front (%)", 1),
        ("kl_at_lowest_refusals", "report KL at those refusals", 4),
        ("lowest_kl_under", f"lowest report KL with refusals ≤ {threshold:.0%}", 4),
    )
    base = result["scores"]["base"]
    lines = [
        f"# Blasphemer vs Heretic — {setup['date']}",
        "",
        f"Model `{setup['model']}`; {setup['trials']} trials; {setup['n_eval']} harmful + "
        f"{setup['n_eval']} harmless evaluation prompts; {setup['n_fit']} + {setup['n_fit']} fit "
        f"prompts; responses of {setup['max_new_tokens']} tokens; {setup['threads']} thread(s); "
        f"{setup['startup_note']}; refusal markers: {setup['heretic_markers']}; system prompt "
        f"{setup['system_prompt']!r}; seed {setup['seed']}; Heretic in float32, Blasphemer in "
        f"{setup.get('blasphemer_dtype', 'float32')}. Medians of {setup['repeats']} "
        f"interleaved repeat(s) on {setup['machine']}; "
        f"{setup.get('schedule', 'one tool at a time')}.",
        "",
        "## Cost (medians; a ratio below 1 means Blasphemer is cheaper)",
        "",
        comparison_table(summary, MEASURES, labels),
        "",
        batch_sizes(result.get("runs", []), labels),
        "",
        phases_table(result.get("runs", []), labels),
        "",
        f"## Quality on the held-out report split ({base['n_prompts']} harmful, "
        f"{result['scores']['n_harmless']} harmless prompts; one evaluator for all models; the "
        f"original model refuses {base['refusal_rate']:.1%})",
        "",
        comparison_table(
            quality_values, quality_measures, labels, frozenset({"kl_at_lowest_refusals"})
        ),
        "",
        "The KL at the lowest refusals has no ratio: it belongs to refusal rates that can differ.",
    ]
    for tool in (t for t in labels if t in fronts):
        differed = "" if summary[tool]["fronts_agree"] else " (fronts differed between repeats)"
        lines += ["", f"### {labels[tool]}: Pareto front of repeat 1{differed}", ""]
        lines.append(_front_table(fronts[tool]))
    return "\n".join(lines) + "\n"
