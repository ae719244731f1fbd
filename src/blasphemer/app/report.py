"""Plots and a Markdown + self-contained HTML report of a study.

The report shows the Pareto front (refusal rate against KL, with 95 % Wilson intervals), the
chosen trial's weight kernel per layer, and the strength of the refusal direction per layer.
Figures are drawn on :class:`matplotlib.figure.Figure` objects (Agg canvas, no global pyplot
state), so reports can be written from any thread and on machines without a display.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from blasphemer.ablation import AblationParameters
from blasphemer.app.results import HeldOutScores, count_with_interval
from blasphemer.evaluation.markers import wilson_interval
from blasphemer.optimization.objective import TrialResult
from blasphemer.optimization.selection import recommended, tier


# A report is a list of blocks, rendered once as Markdown and once as HTML.
@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Image:
    alt: str
    path: Path


@dataclass(frozen=True)
class Table:
    header: Sequence[str]
    rows: Sequence[Sequence[str]]


Block = Heading | Paragraph | Image | Table


@dataclass(frozen=True)
class ReportFiles:
    """Paths of everything :func:`write_report` wrote."""

    markdown: Path
    html: Path
    pareto_png: Path
    kernels_png: Path | None
    strength_png: Path | None


# --- plots --------------------------------------------------------------------------------------


def plot_pareto(
    trials: Sequence[TrialResult],
    front: Sequence[TrialResult],
    chosen: TrialResult | None,
    path: Path,
) -> Path:
    """Scatter of refusal rate (x) against KL (y): all trials grey, the front, the chosen ★."""
    figure = Figure(figsize=(6.4, 4.4), dpi=120)
    axes = figure.add_subplot()
    axes.scatter(
        [t.refusal_rate for t in trials], [t.kl for t in trials], s=14, c="#b0b0b0", label="trials"
    )
    ordered = sorted(front, key=lambda t: (t.refusal_rate, t.kl))
    axes.plot(
        [t.refusal_rate for t in ordered],
        [t.kl for t in ordered],
        "o-",
        c="#1f77b4",
        ms=5,
        label="Pareto front",
    )
    if chosen is not None:
        axes.scatter(
            [chosen.refusal_rate],
            [chosen.kl],
            marker="*",
            s=260,
            c="#ff9f1c",
            edgecolors="black",
            zorder=5,
            label=f"chosen (trial {chosen.number})",
        )
    axes.set_xlabel("refusal rate (select split)")
    axes.set_ylabel("KL divergence")
    axes.xaxis.set_major_formatter(lambda x, _pos: f"{x:.0%}")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    return path


def plot_kernels(parameters: AblationParameters, n_layers: int, path: Path) -> Path:
    """Ablation strength per layer, one line per component kind."""
    figure = Figure(figsize=(6.4, 3.2), dpi=120)
    axes = figure.add_subplot()
    for kind, weights in parameters.layer_weights(n_layers).items():
        axes.plot(range(n_layers), weights.tolist(), "o-", ms=3, label=kind.value)
    if parameters.direction_index is not None:
        axes.axvline(parameters.direction_index, ls="--", c="grey", lw=1, label="direction")
    axes.set_xlabel("layer")
    axes.set_ylabel("ablation weight")
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    return path


def plot_direction_strength(strength: Sequence[float], path: Path) -> Path:
    """Bar chart of ‖mean harmful − mean harmless‖ per layer."""
    figure = Figure(figsize=(6.4, 3.0), dpi=120)
    axes = figure.add_subplot()
    axes.bar(range(len(strength)), list(strength), color="#6a4c93")
    axes.set_xlabel("layer")
    axes.set_ylabel("direction strength")
    axes.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    figure.savefig(path)
    return path


# --- content ------------------------------------------------------------------------------------


def _rate_with_interval(result: TrialResult) -> tuple[str, str]:
    rate = f"{result.refusal_rate:.1%}"
    if result.refusals is None or not result.n_prompts:
        return rate, "n/a"
    low, high = wilson_interval(result.refusals, result.n_prompts)
    return f"{rate} ({result.refusals}/{result.n_prompts})", f"{low:.1%}–{high:.1%}"


def front_rows(front: Sequence[TrialResult], chosen: TrialResult | None) -> list[list[str]]:
    """Rows of the front table: trial, refusal rate, 95 % CI, KL, tier, marks."""
    star = recommended(front)
    rows = []
    for result in sorted(front, key=lambda r: (r.refusal_rate, r.kl)):
        rate, interval = _rate_with_interval(result)
        marks = ("⭐ " if star is not None and result.number == star.number else "") + (
            "chosen" if chosen is not None and result.number == chosen.number else ""
        )
        label = tier(result.refusal_rate, result.kl).value
        rows.append([str(result.number), rate, interval, f"{result.kl:.4f}", label, marks.strip()])
    return rows


def _layer_rows(
    parameters: AblationParameters, n_layers: int, strength: Sequence[float] | None
) -> tuple[list[str], list[list[str]]]:
    weights = parameters.layer_weights(n_layers)
    header = ["layer", *(kind.value for kind in weights)]
    if strength is not None:
        header.append("direction strength")
    rows = []
    for layer in range(n_layers):
        row = [str(layer), *(f"{float(w[layer]):.3f}" for w in weights.values())]
        if strength is not None:
            row.append(f"{float(strength[layer]):.3f}")
        rows.append(row)
    return header, rows


def _parameter_blocks(parameters: AblationParameters) -> list[Block]:
    index = parameters.direction_index
    direction = "per layer" if index is None else f"global, layer index {index:.2f}"
    norm = "yes" if parameters.norm_preserving else "no"
    rows = [
        [
            kind.value,
            f"{k.max_weight:.3f}",
            f"{k.max_weight_position:.2f}",
            f"{k.min_weight:.3f}",
            f"{k.min_weight_distance:.2f}",
        ]
        for kind, k in parameters.kernels.items()
    ]
    header = ["component", "max weight", "at layer", "min weight", "distance (layers)"]
    return [Paragraph(f"Direction: {direction}. Norm preserving: {norm}."), Table(header, rows)]


def _held_out_blocks(held_out: HeldOutScores) -> list[Block]:
    n = held_out.n_prompts
    rows = [
        ["refusals", count_with_interval(held_out.refusals, n)],
        ["KL divergence", f"{held_out.kl:.4f}"],
    ]
    if held_out.original_refusals is not None:
        rows.insert(1, ["refusals of the original model", f"{held_out.original_refusals}/{n}"])
    if held_out.semantic_refusals is not None:
        semantic = count_with_interval(held_out.semantic_refusals, n)
        rows.insert(1, ["refusals (semantic judge)", semantic])
    rows += [[name, f"{value:.4g}"] for name, value in held_out.extra.items()]
    return [Heading(2, "Held-out scores (report split)"), Table(["metric", "value"], rows)]


def _blocks(
    *,
    title: str,
    trials: Sequence[TrialResult],
    front: Sequence[TrialResult],
    chosen: TrialResult | None,
    n_layers: int,
    direction_strength: Sequence[float] | None,
    held_out: HeldOutScores | None,
    images: dict[str, Path],
) -> list[Block]:
    summary = f"{len(trials)} complete trials, {len(front)} on the Pareto front."
    if chosen is not None:
        summary += f" Chosen: trial {chosen.number} ({tier(chosen.refusal_rate, chosen.kl).value})."
    blocks: list[Block] = [Heading(1, title), Paragraph(summary)]
    if held_out is not None:
        blocks += _held_out_blocks(held_out)
    front_header = ["trial", "refusal rate", "95 % CI", "KL", "tier", ""]
    blocks += [
        Heading(2, "Pareto front"),
        Image("Pareto front", images["pareto"]),
        Table(front_header, front_rows(front, chosen)),
        Paragraph(
            "Rates and KL are from the select split the optimiser saw; ⭐ marks the knee rule "
            "on them. Without --select a run saves the knee of the held-out numbers instead "
            "(when two or more front trials were scored there)."
        ),
    ]
    if chosen is not None and chosen.parameters is not None:
        blocks.append(Heading(2, f"Trial {chosen.number}: weight kernels"))
        blocks += _parameter_blocks(chosen.parameters)
        if "kernels" in images:
            blocks.append(Image("weight kernels", images["kernels"]))
        blocks.append(Table(*_layer_rows(chosen.parameters, n_layers, direction_strength)))
    if "strength" in images:
        blocks += [
            Heading(2, "Direction strength per layer"),
            Image("strength", images["strength"]),
        ]
    return blocks


# --- rendering ----------------------------------------------------------------------------------


def _markdown(blocks: Sequence[Block], folder: Path) -> str:
    out: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            out += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Paragraph):
            out += [block.text, ""]
        elif isinstance(block, Image):
            out += [f"![{block.alt}]({block.path.relative_to(folder).as_posix()})", ""]
        else:
            out += ["| " + " | ".join(block.header) + " |", "|" + "---|" * len(block.header)]
            out += ["| " + " | ".join(row) + " |" for row in block.rows]
            out.append("")
    return "\n".join(out)


def _html(blocks: Sequence[Block], title: str) -> str:
    esc = html.escape
    body: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            body.append(f"<h{block.level}>{esc(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            body.append(f"<p>{esc(block.text)}</p>")
        elif isinstance(block, Image):
            data = base64.b64encode(block.path.read_bytes()).decode("ascii")
            body.append(f'<img alt="{esc(block.alt)}" src="data:image/png;base64,{data}">')
        else:
            head = "".join(f"<th>{esc(h)}</th>" for h in block.header)
            cells = "".join(
                "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in block.rows
            )
            body.append(f"<table><tr>{head}</tr>{cells}</table>")
    style = (
        "body{font-family:sans-serif;max-width:900px;margin:2em auto}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 8px}"
        "img{max-width:100%}"
    )
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_report(
    folder: Path,
    *,
    trials: Sequence[TrialResult],
    front: Sequence[TrialResult],
    chosen: TrialResult | None,
    n_layers: int,
    direction_strength: Sequence[float] | None = None,
    held_out: HeldOutScores | None = None,
    title: str = "Blasphemer report",
) -> ReportFiles:
    """Write ``report.md``, ``report.html`` (images embedded) and the PNGs into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images = {"pareto": plot_pareto(trials, front, chosen, folder / "pareto.png")}
    if chosen is not None and chosen.parameters is not None:
        images["kernels"] = plot_kernels(chosen.parameters, n_layers, folder / "kernels.png")
    if direction_strength is not None:
        images["strength"] = plot_direction_strength(
            direction_strength, folder / "direction_strength.png"
        )
    blocks = _blocks(
        title=title,
        trials=trials,
        front=front,
        chosen=chosen,
        n_layers=n_layers,
        direction_strength=direction_strength,
        held_out=held_out,
        images=images,
    )
    markdown = folder / "report.md"
    markdown.write_text(_markdown(blocks, folder), encoding="utf-8")
    page = folder / "report.html"
    page.write_text(_html(blocks, title), encoding="utf-8")
    return ReportFiles(
        markdown=markdown,
        html=page,
        pareto_png=images["pareto"],
        kernels_png=images.get("kernels"),
        strength_png=images.get("strength"),
    )
