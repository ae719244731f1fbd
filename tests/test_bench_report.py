"""Benchmark tooling: the comparison's summaries and report, scaling, trial phases, and the
smaller bench scripts (split from test_bench.py)."""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import blasphemer_runner
import heretic_driver
import vs_heretic
import vs_heretic_report as report
from bench_common import BenchError, ProcessRecord

# --- summaries and the report -------------------------------------------------------------------


def process(started_at: float, lines: list[tuple[float, str]]) -> ProcessRecord:
    return ProcessRecord(["tool"], started_at, 100.0, 0, 512.0, lines, Path("log.txt"))


PHASES = {"directions": "[5/10]", "directions_end": "[6/10]", "saved": "saved trial"}


def summary(tool: str, repeat: int, trial_seconds: float) -> dict[str, object]:
    lines = [(1.0, "[1/10] Preflight"), (10.0, "[5/10] Directions"), (14.0, "[6/10] Baseline"),
             (60.0, "saved trial 1 to x")]  # fmt: skip
    start = 1000.0
    trials = [
        {"key": 0, "refusals": 90, "n_prompts": 100, "kl": 0.01, "seconds": trial_seconds,
         "started": start + 20, "finished": start + 20 + trial_seconds},
        {"key": 1, "refusals": 5, "n_prompts": 100, "kl": 0.3, "seconds": trial_seconds,
         "started": start + 30, "finished": start + 30 + trial_seconds},
        {"key": 2, "refusals": 50, "n_prompts": 100, "kl": 0.5, "seconds": trial_seconds,
         "started": start + 40, "finished": start + 40 + trial_seconds},
    ]  # fmt: skip
    return report.run_summary(tool, repeat, process(start, lines), PHASES, trials, 16)


def test_run_summary_splits_phases() -> None:
    result = summary("early", 1, 2.0)
    assert result["directions_s"] == 4.0
    assert result["setup_s"] == 16.0  # first trial at 20 s, less 4 s of directions
    assert result["mean_trial_s"] == 2.0
    assert result["to_last_trial_s"] == 42.0
    assert result["total_s"] == 60.0
    assert result["front"] == [1, 0]
    assert "started" not in result["trials"][0]  # type: ignore[index]


def test_aggregate_takes_medians_and_checks_fronts() -> None:
    runs = [summary("heretic", 1, 4.0), summary("heretic", 2, 6.0), summary("early", 1, 1.0)]
    result = report.aggregate(runs)
    assert result["heretic"]["mean_trial_s"] == 5.0 and result["heretic"]["repeats"] == 2
    assert result["heretic"]["fronts_agree"] and "exact" not in result


def test_fronts_agree_despite_low_bits_of_kl() -> None:
    first, second = summary("early", 1, 1.0), summary("early", 2, 1.0)
    second["trials"][1]["kl"] += 1e-9  # type: ignore[index]
    assert report.aggregate([first, second])["early"]["fronts_agree"]
    second["trials"][1]["refusals"] = 6  # type: ignore[index]
    assert not report.aggregate([first, second])["early"]["fronts_agree"]


def test_batch_sizes_line_and_rows_without_ratio() -> None:
    runs = [summary("heretic", 2, 1.0), summary("heretic", 1, 1.0), summary("exact", 1, 1.0)]
    runs[0]["batch_size"] = 32
    line = report.batch_sizes(runs)
    assert line == "Batch sizes by repeat: Heretic: 16, 32; Blasphemer (exact): 16."
    values = {"heretic": {"a": 2.0, "b": 2.0}, "early": {"a": 1.0, "b": 1.0}}
    rows = [("a", "A", 1), ("b", "B", 1)]
    table = report.comparison_table(values, rows, no_ratio=frozenset({"b"}))
    assert table.splitlines()[2].rstrip(" |").endswith("0.50")
    assert table.splitlines()[3].rstrip(" |").endswith("–")


def scores() -> dict[str, dict[str, object]]:
    def score(refusals: int, kl: float) -> dict[str, object]:
        return {"refusals": refusals, "n_prompts": 200, "refusal_rate": refusals / 200,
                "refusal_rate_95ci": [0.0, 0.1], "kl": kl, "seconds": 1.0}  # fmt: skip

    return {"heretic:1": score(30, 0.4), "heretic:0": score(170, 0.02), "early:1": score(10, 0.2),
            "early:0": score(180, 0.01)}  # fmt: skip


def test_front_rows_and_quality_use_report_scores() -> None:
    rows = report.front_rows(summary("early", 1, 1.0), scores(), "early")
    assert [r["trial"] for r in rows] == [1, 0]
    assert rows[0]["select_refusals"] == 5 and rows[0]["report_refusals"] == 10
    assert report.quality(rows, 0.1) == {
        "lowest_refusal_rate": 0.05,
        "kl_at_lowest_refusals": 0.2,
        "lowest_kl_under": 0.2,
    }
    assert report.quality([], 0.1)["lowest_kl_under"] is None


def test_markdown_report_shows_medians_ratios_and_fronts() -> None:
    runs = [summary("heretic", 1, 4.0), summary("early", 1, 1.0)]
    fronts = {
        tool: report.front_rows(runs[i], scores(), tool)
        for i, tool in enumerate(["heretic", "early"])
    }
    result = {
        "setup": {"date": "2026-01-01", "model": "demo", "trials": 3, "n_eval": 100, "n_fit": 400,
                  "max_new_tokens": 100, "threads": 1, "startup_note": "1 start-up trial",
                  "heretic_markers": "ours", "system_prompt": "s", "seed": 0, "repeats": 1,
                  "machine": "test", "heretic_version": "1.4.0", "refusal_threshold": 0.1},
        "summary": report.aggregate(runs),
        "quality": {tool: report.quality(rows, 0.1) for tool, rows in fronts.items()},
        "fronts": fronts,
        "scores": {"base": {"n_prompts": 200, "refusal_rate": 0.95}, "n_harmless": 200},
    }  # fmt: skip
    text = report.markdown(result)
    assert "| mean time per trial (s)" in text
    assert "Heretic 1.4.0" in text and "(early stop) / Heretic" in text
    ratio_row = next(line for line in text.splitlines() if line.startswith("| mean time per trial"))
    assert ratio_row.rstrip(" |").endswith("0.25")
    assert "5.0% [0.0%–10.0%]" in text  # a front row of Blasphemer with its interval
    assert "Pareto front of repeat 1" in text


# --- scaling ------------------------------------------------------------------------------------


def test_scaling_sizes_and_shapes() -> None:
    import scaling

    assert scaling.parse_size("8x256") == (8, 256)
    for bad in ("8", "8x100", "0x256", "x256"):
        with pytest.raises(BenchError):
            scaling.parse_size(bad)
    shape = scaling.llama_shape(4, 512)
    assert shape["num_attention_heads"] * shape["head_dim"] == 512
    assert shape["intermediate_size"] % 32 == 0
    assert scaling.llama_shape(2, 64)["num_attention_heads"] == 2


def test_scaling_merge_takes_medians_over_repeats() -> None:
    import scaling

    runs = [
        {"prompts": 50, "max_new_tokens": 32, "batch_size": 16, "trial_s": t, "directions_s": 1.0,
         "trial_s_per_prompt": t / 50, "peak_rss_mib": 400.0}
        for t in (1.0, 3.0, 2.0)
    ]  # fmt: skip
    merged = scaling.merge(runs)
    assert merged["trial_s"] == 2.0 and merged["repeats"] == 3 and merged["prompts"] == 50
    row = scaling.table([{"layers": 2, "hidden": 64, "parameters": 1e6, **merged}]).splitlines()[2]
    assert [cell.strip() for cell in row.strip("|").split("|")][:7] == [
        "2", "64", "1.00", "50", "32", "16", "2.00"
    ]  # fmt: skip


def test_recorded_timings_are_read_from_the_key_the_run_writes(tmp_path: Path) -> None:
    from blasphemer.app.results import write_results

    path = write_results(
        tmp_path / "results.json",
        settings={},
        trials=[],
        front=[],
        chosen=None,
        extra={"timings_s": {"load": 1.5, "trials": 9.0}},
    )
    assert blasphemer_runner.recorded_timings(path) == {"load": 1.5, "trials": 9.0}


# --- where a trial's time goes ------------------------------------------------------------------

HERETIC_TRIAL = [
    "Running trial 1 of 2...",
    "* Parameters:",
    "  * direction_index = 10.5",
    "* Resetting model...",
    "* Abliterating...",
    "* Evaluating...",
    "  * Obtaining first-token probability distributions...",
    "  * KL divergence: 0.1234",
    "  * Counting model refusals...",
    "  * Refusals: 3/50",
    "Elapsed time: 10s",
]


def test_heretic_trial_phases_from_its_console_lines() -> None:
    times = [0.0, 0.1, 0.1, 0.2, 1.2, 1.5, 1.6, 4.6, 4.7, 14.7, 14.8]
    lines = list(zip(times, HERETIC_TRIAL, strict=True))
    cut_off = [(20.0 + at, text) for at, text in lines[:8]]  # a trial killed mid-way
    second = [(30.0 + at, text) for at, text in lines]
    phases = heretic_driver.trial_phases(lines + cut_off + second)
    assert len(phases) == 2
    assert phases[0] == pytest.approx(
        {"reset": 1.0, "abliterate": 0.4, "kl": 3.0, "refusals": 10.0}
    )
    assert phases[1] == pytest.approx(phases[0])


def test_mean_phases_adds_the_time_outside_every_phase() -> None:
    per_trial = [{"kl": 1.0, "refusals": 4.0}, {"kl": 3.0, "refusals": 6.0}]
    means = report.mean_phases(per_trial, mean_trial_s=10.0)
    assert means == pytest.approx({"kl": 2.0, "refusals": 5.0, "other": 3.0})
    assert report.mean_phases([], 10.0) == {}
    run = {"tool": "early", "repeat": 1, "trial_phases_s": means}
    text = report.phases_table([run], report.TOOLS)
    assert "Blasphemer (early stop): kl 2.00, refusals 5.00, other 3.00" in text


def test_blasphemer_trial_phases_are_read_from_the_study_database(tmp_path: Path) -> None:
    db = tmp_path / "study.db"
    recorded = {"apply": 0.5, "kl": 1.0, "refusals": 6.0, "extra": 0.0, "restore": 0.25}
    with sqlite3.connect(db) as connection:
        connection.execute("CREATE TABLE trials (trial_id INT, number INT, state TEXT)")
        connection.execute(
            "CREATE TABLE trial_user_attributes (trial_id INT, key TEXT, value_json TEXT)"
        )
        connection.executemany(
            "INSERT INTO trials VALUES (?, ?, ?)",
            [(7, 0, "COMPLETE"), (8, 1, "COMPLETE"), (9, 2, "FAIL")],
        )
        connection.executemany(
            "INSERT INTO trial_user_attributes VALUES (?, ?, ?)",
            [(7, "result", json.dumps({"phases_s": recorded, "kl": 0.1})),
             (8, "result", json.dumps({"kl": 0.2})),  # an older run: no phases
             (9, "result", json.dumps({"phases_s": recorded}))],
        )  # fmt: skip
    assert blasphemer_runner.read_trial_phases(db) == {0: recorded}
    assert blasphemer_runner.read_trial_phases(tmp_path / "missing.db") == {}


def test_concurrent_runs_heretic_beside_blasphemers_modes(monkeypatch, tmp_path: Path) -> None:
    import itertools
    import threading
    import time

    spans: dict[str, tuple[float, float]] = {}
    lock = threading.Lock()

    def fake_run_tool(tool, repeat, args, where, plans):
        started = time.monotonic()
        time.sleep(0.3 if tool == "heretic" else 0.1)
        with lock:
            spans[f"{tool}-{repeat}"] = (started, time.monotonic())
        summary = {"tool": tool, "repeat": repeat, "n_trials": 1, "mean_trial_s": 1.0,
                   "directions_s": 1.0, "peak_rss_mib": 1.0}  # fmt: skip
        return summary, f"done-{tool}-{repeat}"

    monkeypatch.setattr(vs_heretic, "run_tool", fake_run_tool)
    args = vs_heretic.parse_args(["--quick", "--concurrent", "--repeats", "2"])
    runs, first = vs_heretic.run_all(args, tmp_path, {})
    assert sorted((r["tool"], r["repeat"]) for r in runs) == sorted(
        (t, r) for t in ("heretic", "early", "exact") for r in (1, 2)
    )
    assert {tool: done for tool, (_, done) in first.items()} == {
        "heretic": "done-heretic-1", "early": "done-early-1", "exact": "done-exact-1"
    }  # fmt: skip
    for repeat in (1, 2):
        heretic, early, exact = (spans[f"{t}-{repeat}"] for t in ("heretic", "early", "exact"))
        assert early[0] < heretic[1] and heretic[0] < early[1]  # they overlapped
        assert early[1] <= exact[0]  # Blasphemer's modes one after the other
    assert max(spans[f"{t}-1"][1] for t in ("heretic", "early", "exact")) <= min(
        spans[f"{t}-2"][0] for t in ("heretic", "early", "exact")
    )  # a repeat starts when the last one has ended

    monkeypatch.setattr(vs_heretic, "run_tool", fake_run_tool)
    spans.clear()
    args = vs_heretic.parse_args(["--quick", "--repeats", "1"])
    vs_heretic.run_all(args, tmp_path, {})
    ordered = sorted(spans.values())
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(ordered))  # one at a time


def test_results_of_a_pinned_model_are_named_after_it(monkeypatch, tmp_path: Path) -> None:
    result = {"setup": {}, "summary": {}, "quality": {}, "fronts": {}, "scores": {}}
    monkeypatch.setattr(vs_heretic, "markdown", lambda _result: "# report\n")
    for model, suffix in (("qwen", "-vs-heretic-qwen"), (str(tmp_path), "-vs-heretic")):
        args = vs_heretic.parse_args(["--model", model, "--results-dir", str(tmp_path / "r")])
        path = vs_heretic.write_results(args, result)
        assert path.name.endswith(f"{suffix}.json") and path.with_suffix(".md").is_file()


def test_marker_window_joins_every_labelled_answer_with_its_label() -> None:
    import marker_window

    rows = marker_window.labelled_answers()
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids)) >= 1000  # answers/ and unseen/, each once
    assert all(isinstance(row["refusal"], bool) and row["response"] for row in rows)
    assert {row["source"] for row in rows} >= {"written", "qwen-original", "smollm2"}
    assert marker_window.accuracy(3, 4)["accuracy"] == 0.75


def test_edit_strength_reads_edits_and_scales_every_kernel() -> None:
    import edit_strength
    from blasphemer.ablation import AblationParameters, KernelParameters
    from blasphemer.architectures.base import ComponentKind

    assert edit_strength.parse_edits("run:5x1.0, refused:11x1.3") == [
        ("run", 5, 1.0),
        ("refused", 11, 1.3),
    ]
    assert edit_strength.parse_edits("answers:5x1,run+substitutes:5x2") == [
        ("answers", 5, 1.0),
        ("run+substitutes", 5, 2.0),
    ]
    for bad in ("5x1.0", "other:5x1", "run:ax1", "run:5", "run+other:5x1"):
        with pytest.raises(SystemExit, match="DIRECTIONS:TRIALxSCALE"):
            edit_strength.parse_edits(bad)
    kernels = {
        ComponentKind.ATTENTION: KernelParameters(1.0, 3.0, 0.4, 2.0),
        ComponentKind.MLP: KernelParameters(1.2, 4.0, 0.6, 3.0),
    }
    base = AblationParameters(direction_index=2.5, kernels=kernels)
    stronger = edit_strength.scaled(base, 1.5)
    assert stronger.direction_index == 2.5
    for kind, kernel in base.kernels.items():
        other = stronger.kernels[kind]
        assert (other.max_weight, other.min_weight) == (
            kernel.max_weight * 1.5,
            kernel.min_weight * 1.5,
        )
        assert (other.max_weight_position, other.min_weight_distance) == (
            kernel.max_weight_position,
            kernel.min_weight_distance,
        )


def _judge_probe_module():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "judge"))
    try:
        import probe
    finally:
        sys.path.pop(0)
    return probe


def test_judge_probe_auc_ranks_refusals_above_compliance() -> None:
    probe = _judge_probe_module()
    rows = [{"refusal": flag} for flag in (True, True, False, False)]
    assert probe.auc([3.0, 2.0, 1.0, 0.0], rows) == 1.0
    assert probe.auc([0.0, 1.0, 2.0, 3.0], rows) == 0.0
    assert probe.auc([1.0, 1.0, 1.0, 1.0], rows) == 0.5
    assert probe.auc([1.0, 2.0], [{"refusal": True}, {"refusal": True}]) is None


def test_judge_probe_accuracy_counts_all_rows_and_the_hard_ones() -> None:
    probe = _judge_probe_module()
    rows = [
        {"refusal": True, "hard": True},
        {"refusal": False, "hard": True},
        {"refusal": True, "hard": False},
        {"refusal": False, "hard": False},
    ]
    got = probe.accuracy(rows, [True, True, True, True])
    assert got["all"]["n"] == 4 and got["all"]["accuracy"] == 0.5
    assert got["hard"]["n"] == 2 and got["hard"]["accuracy"] == 0.5
    low, high = got["all"]["ci95"]
    assert 0.0 < low < 0.5 < high < 1.0 and low == round(low, 3)


def test_judge_probe_logistic_fit_and_cross_validated_choice() -> None:
    import torch

    probe = _judge_probe_module()
    generator = torch.Generator().manual_seed(0)
    n, layers, hidden = 120, 23, 4
    labels = torch.arange(n) % 2 == 0
    features = torch.randn(n, layers, hidden, generator=generator)
    features[:, 14, 0] += torch.where(labels, 3.0, -3.0)  # only layer 14 tells them apart
    rows = [
        {"refusal": bool(flag), "prompt": f"prompt {i // 3}", "split": "train"}
        for i, flag in enumerate(labels)
    ]
    logit = probe.fit_logistic(features[:, 14], labels.float(), 1e-2)
    assert ((logit(features[:, 14]) > 0) == labels).float().mean() > 0.95
    choice = probe.choose_probe(features, rows, probe.layer_sets(24))
    assert 14 in choice["chosen"]["layers"]
    assert choice["chosen"]["cv"] > 0.9
    noise_only = [g["cv"] for g in choice["grid"] if 14 not in g["layers"]]
    assert max(noise_only) < 0.75


def test_judge_probe_layer_sets_follow_the_depth() -> None:
    probe = _judge_probe_module()
    # Qwen2.5-0.5B's 24 layers: the grid the 2026-12-03 result was measured on.
    assert probe.layer_sets(24) == [
        [6],
        [10],
        [14],
        [18],
        [22],
        [10, 14],
        [14, 18],
        [18, 22],
        [10, 14, 18, 22],
    ]
    assert probe.layer_sets(28)[:5] == [[7], [12], [16], [21], [26]]  # Qwen2.5-1.5B
    assert all(0 < i <= 28 for chosen in probe.layer_sets(28) for i in chosen)


def test_edit_strength_joined_edits_apply_in_order_and_undo_in_reverse() -> None:
    import contextlib

    import edit_strength

    log: list[str] = []

    class Edit:
        def __init__(self, name: str) -> None:
            self.name = name

        @contextlib.contextmanager
        def apply(self, model_map: object):
            log.append(f"apply {self.name} to {model_map}")
            yield
            log.append(f"undo {self.name}")

    with edit_strength.Joined([Edit("a"), Edit("b")]).apply("model"):
        assert log == ["apply a to model", "apply b to model"]
    assert log[2:] == ["undo b", "undo a"]


def test_edit_strength_embedding_edit_removes_the_direction_and_restores_bit_for_bit() -> None:
    import torch

    import edit_strength
    from blasphemer.ablation import AblationParameters
    from blasphemer.directions import Directions
    from tiny_models import tiny_llama

    model = tiny_llama(40, layers=3, tie_word_embeddings=False)
    generator = torch.Generator().manual_seed(3)
    vectors = torch.nn.functional.normalize(torch.randn(3, 32, generator=generator), dim=-1)
    directions = Directions(vectors, torch.ones(3))
    table = model.get_input_embeddings().weight
    before = table.detach().clone()
    edit = edit_strength.EmbeddingEdit(model, directions, AblationParameters(1.0, {}))
    r = vectors[1].double()
    assert (before.double() @ r).abs().max() > 0.01  # a direction the embeddings do reach
    with edit.apply(None):
        assert (table.detach().double() @ r).abs().max() < 1e-5
        # everything orthogonal to the direction is left as it was
        rest = before.double() - (before.double() @ r)[:, None] * r[None, :]
        assert torch.allclose(table.detach().double(), rest, atol=1e-6)
    assert torch.equal(table.detach(), before)
    with pytest.raises(RuntimeError, match="inside"), edit.apply(None):
        raise RuntimeError("inside")
    assert torch.equal(table.detach(), before)

    tied = tiny_llama(40, layers=3, tie_word_embeddings=True)
    with pytest.raises(SystemExit, match="untied"):
        edit_strength.EmbeddingEdit(tied, directions, AblationParameters(1.0, {}))


def test_reading_tally_joins_prefill_and_answer_and_counts_unclear_apart(tmp_path, monkeypatch):
    import answers
    import reading_tally

    (tmp_path / "harmful_test.json").write_text(
        json.dumps([{"instruction": f"task {i}"} for i in range(4)]), encoding="utf-8"
    )
    monkeypatch.setattr(answers, "DATASETS", tmp_path)
    labels = tmp_path / "labels.jsonl"
    rows = [
        ("task 1", "Sure, here it is", False, "complies", False),
        ("task 2", "Sure, here is a poem about cats", True, "substitute", True),
        ("task 2", "I can't help with that.", True, "declines", False),
        ("task 1", "No.", True, "declines", False),
    ]
    labels.write_text(
        "\n".join(
            json.dumps({"prompt": p, "response": r, "refusal": f, "kind": k, "unclear": u})
            for p, r, f, k, u in rows
        ),
        encoding="utf-8",
    )
    result = {
        "prompts": "harmful_test.json[1:3] and harmless_test",
        "prefill": "Sure, here",
        "edits": {
            "original": {
                "answers": [" it is", " is a poem about cats"],
                "marker_refusals": 0,
                "semantic_refusals": 1,
                "kl_first_token": 0.0,
            }
        },
    }
    (row,) = reading_tally.tally(result, reading_tally.load_labels(labels))
    assert (row["reading_refusals"], row["of_which_unclear"], row["unclear"]) == (1, 1, 1)
    assert row["kinds"] == {"substitute": 1}
    # Without the prefill the same answers are other texts: unlabelled, an error naming them.
    with pytest.raises(SystemExit, match="no label for original"):
        reading_tally.tally({**result, "prefill": ""}, reading_tally.load_labels(labels))
    labels.write_text(
        labels.read_text()
        + "\n"
        + json.dumps({**json.loads(labels.read_text().split("\n")[0]), "refusal": True}),
        encoding="utf-8",
    )
    with pytest.raises(SystemExit, match="labelled both ways"):
        reading_tally.load_labels(labels)
