"""Report: PNGs, Markdown and self-contained HTML are written and say the right things."""

from __future__ import annotations

from pathlib import Path

from blasphemer.ablation import AblationParameters, KernelParameters
from blasphemer.app.report import front_rows, plot_kernels, write_report
from blasphemer.app.results import HeldOutScores
from blasphemer.architectures.base import ComponentKind
from blasphemer.optimization.objective import TrialResult
from blasphemer.optimization.selection import pareto_front, recommended

PNG = b"\x89PNG\r\n\x1a\n"
PARAMETERS = AblationParameters(
    4.5,
    {
        ComponentKind.ATTENTION: KernelParameters(1.1, 5.0, 0.3, 3.0),
        ComponentKind.MLP: KernelParameters(1.3, 6.0, 0.6, 2.0),
    },
)


def trials() -> list[TrialResult]:
    values = [(0.8, 0.01), (0.3, 0.04), (0.04, 0.2), (0.0, 0.9), (0.5, 0.5), (0.02, 0.3)]
    return [
        TrialResult(n, v, PARAMETERS, refusals=round(v[0] * 50), n_prompts=50)
        for n, v in enumerate(values)
    ]


def test_write_report(tmp_path: Path) -> None:
    results = trials()
    front = pareto_front(results)
    chosen = results[2]
    files = write_report(
        tmp_path / "report",
        trials=results,
        front=front,
        chosen=chosen,
        n_layers=8,
        direction_strength=[0.1, 0.2, 0.5, 1.0, 1.5, 1.2, 0.8, 0.4],
        held_out=HeldOutScores(refusals=2, n_prompts=100, kl=0.21, original_refusals=95),
        title="tiny report",
    )
    for png in (files.pareto_png, files.kernels_png, files.strength_png):
        assert png is not None and png.stat().st_size > 1000
        assert png.read_bytes().startswith(PNG)

    markdown = files.markdown.read_text()
    assert markdown.startswith("# tiny report")
    assert "![Pareto front](pareto.png)" in markdown
    assert "| 2 | 4.0% (2/50) |" in markdown  # front row with counts
    assert "95 % CI" in markdown and "2/100 = 2.0%" in markdown and "95/100" in markdown
    assert "| layer | attn | mlp | direction strength |" in markdown
    assert "| 5 | 1.100 | 0.950 | 1.200 |" in markdown  # the attention peak sits at layer 5
    assert "| 4 | 50.0%" not in markdown  # the dominated trial 4 is not in the front table

    page = files.html.read_text()
    assert page.count("data:image/png;base64,") == 3  # self-contained
    assert "<table>" in page and "tiny report" in page


def test_front_rows_mark_star_and_choice() -> None:
    results = trials()
    front = pareto_front(results)
    star = recommended(front)
    assert star is not None
    rows = {row[0]: row for row in front_rows(front, results[1])}
    assert rows[str(star.number)][-1].startswith("⭐")
    assert rows["1"][-1] == "chosen"
    low_high = rows["3"][2]
    assert low_high.startswith("0.0%–")  # Wilson interval of 0/50 starts at zero


def test_report_without_choice_or_strength(tmp_path: Path) -> None:
    results = [TrialResult(0, (0.5, 0.1), None)]
    files = write_report(tmp_path, trials=results, front=results, chosen=None, n_layers=4)
    assert files.kernels_png is None and files.strength_png is None
    assert "n/a" in files.markdown.read_text()  # no counts, no interval


def test_plot_kernels_per_layer_scope(tmp_path: Path) -> None:
    parameters = AblationParameters(None, PARAMETERS.kernels)
    path = plot_kernels(parameters, 8, tmp_path / "k.png")
    assert path.read_bytes().startswith(PNG)
