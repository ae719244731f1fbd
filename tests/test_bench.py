"""The benchmark harness's own logic, without Heretic or a model: Heretic's config file, journal
and menus, Blasphemer's runs, the child-process runner and Pareto fronts (the summaries, the
report and the smaller scripts: test_bench_report.py)."""

from __future__ import annotations

import json
import math
import sqlite3
import sys
import textwrap
import tomllib
from datetime import datetime
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_common
import blasphemer_runner
import heretic_driver
import vs_heretic
import vs_heretic_report as report
from bench_common import BenchError

# --- Heretic: config, journal, menus -------------------------------------------------------------


def config(**changes: object) -> heretic_driver.HereticConfig:
    values: dict[str, object] = {
        "model": "/models/demo",
        "good_fit": Path("/p/good_fit.txt"),
        "bad_fit": Path("/p/bad_fit.txt"),
        "good_eval": Path("/p/good_eval.txt"),
        "bad_eval": Path("/p/bad_eval.txt"),
        "n_trials": 50,
        "seed": 0,
        "max_response_length": 100,
        "system_prompt": 'Say "hi"\\ please',
    }
    values.update(changes)
    return heretic_driver.HereticConfig(**values)  # type: ignore[arg-type]


def test_config_toml_is_headless_cpu_float32_with_local_prompt_files() -> None:
    parsed = tomllib.loads(heretic_driver.config_toml(config()))
    assert parsed["model"] == "/models/demo"
    assert parsed["dtypes"] == ["float32"]
    assert parsed["device_map"] == "cpu"
    assert parsed["offload_outputs_to_cpu"] is False
    assert parsed["n_trials"] == 50 and parsed["seed"] == 0
    assert parsed["max_response_length"] == 100
    assert parsed["export_strategy"] == "merge"
    assert parsed["system_prompt"] == 'Say "hi"\\ please'
    assert parsed["good_prompts"] == {"dataset": "/p/good_fit.txt"}
    assert parsed["bad_evaluation_prompts"] == {"dataset": "/p/bad_eval.txt"}
    assert "n_startup_trials" not in parsed and "refusal_markers" not in parsed


def test_config_toml_passes_startup_trials_markers_and_extras() -> None:
    text = heretic_driver.config_toml(
        config(n_startup_trials=15, refusal_markers=("i can't", "sorry"), extra=(("x", 1.5),))
    )
    parsed = tomllib.loads(text)
    assert parsed["n_startup_trials"] == 15
    assert parsed["refusal_markers"] == ["i can't", "sorry"]
    assert parsed["x"] == 1.5


def journal_lines() -> list[dict[str, object]]:
    worker = {"worker_id": "w"}
    lines: list[dict[str, object]] = [
        {"op_code": 0, **worker, "study_name": "heretic", "directions": [1, 1]},
        {"op_code": 2, **worker, "study_id": 0, "user_attr": {"finished": False}},
    ]
    for trial_id, (refusals, kl) in enumerate([(80, 0.01), (10, 0.5), (10, 0.2)]):
        lines.append(
            {
                "op_code": 4,
                **worker,
                "study_id": 0,
                "datetime_start": f"2026-01-01T00:00:{10 * trial_id:02d}.000000",
            }
        )
        lines.append(
            {
                "op_code": 5,
                **worker,
                "trial_id": trial_id,
                "param_name": "x",
                "param_value_internal": 1.0,
                "distribution": "{}",
            }
        )
        for attr in (
            {"index": trial_id + 1},
            {"kl_divergence": kl},
            {"refusals": refusals},
            {"n_bad_prompts": 100},
        ):
            lines.append({"op_code": 8, **worker, "trial_id": trial_id, "user_attr": attr})
        end = f"2026-01-01T00:00:{10 * trial_id + 4:02d}.500000"
        values = [kl, refusals / 80]
        lines.append(
            {"op_code": 6, **worker, "trial_id": trial_id, "state": 1, "values": values,
             "datetime_complete": end}
        )  # fmt: skip
    lines.append({"op_code": 4, **worker, "study_id": 0, "datetime_start": "2026-01-01T00:01:00"})
    return lines


def test_parse_journal_reads_scores_times_and_states(tmp_path: Path) -> None:
    path = tmp_path / "checkpoints" / "model.jsonl"
    path.parent.mkdir()
    path.write_text("\n".join(json.dumps(line) for line in journal_lines()) + "\n")
    trials = heretic_driver.parse_journal(heretic_driver.find_journal(tmp_path))
    assert [t.index for t in trials] == [1, 2, 3, None]
    assert [t.complete for t in trials] == [True, True, True, False]
    assert trials[1].refusals == 10 and trials[1].kl == 0.5 and trials[1].n_prompts == 100
    assert trials[2].started == datetime(2026, 1, 1, 0, 0, 20)
    assert trials[0].seconds == pytest.approx(4.5)
    assert trials[3].seconds is None
    rows = report.trial_dicts(trials)
    assert [r["key"] for r in rows] == [1, 2, 3]
    points = {r["key"]: (r["refusals"], r["kl"]) for r in rows}
    assert bench_common.pareto_front(points) == [3, 1]


def test_find_journal_names_the_folder_when_missing(tmp_path: Path) -> None:
    with pytest.raises(BenchError, match="checkpoints"):
        heretic_driver.find_journal(tmp_path)


TRIAL_MENU = [
    "",
    "Which trial do you want to use?",
    "[1] [Trial   7] Refusals:  3/100, KL divergence: 0.3000",
    "[2] [Trial  12] Refusals: 40/100, KL divergence: 0.0100",
    "[3] Run additional trials",
    "[4] Exit program",
]
ACTION_MENU = [
    "",
    "What do you want to do with the decensored model?",
    "[1] Save the model to a local folder",
    "[2] Upload the model to Hugging Face",
    "[3] Chat with the model",
    "[4] Benchmark the model",
    "[5] Return to the trial selection menu",
]


def test_parse_menu_reads_question_and_numbered_choices() -> None:
    question, choices = heretic_driver.parse_menu(TRIAL_MENU)
    assert question == "Which trial do you want to use?"
    assert choices["Exit program"] == 4
    assert heretic_driver.trial_choices(choices) == {7: 1, 12: 2}


def test_menu_driver_saves_each_planned_trial_then_exits(tmp_path: Path) -> None:
    plans = []

    def plan() -> dict[int, Path]:
        plans.append(1)
        return {12: tmp_path / "a", 99: tmp_path / "b", 7: tmp_path / "c"}

    driver = heretic_driver.MenuDriver(plan)
    answers = [
        driver(TRIAL_MENU, "Enter number: "),  # trial 12
        driver(ACTION_MENU, "Enter number: "),  # save
        driver([*ACTION_MENU, "Enter number: 1", ""], "Path to the folder:: "),
        driver(ACTION_MENU, "Enter number: "),  # back to the trials
        driver(TRIAL_MENU, "Enter number: "),  # 99 is not offered: skipped; trial 7
        driver(ACTION_MENU, "Enter number: "),
        driver([""], "Path to the folder:: "),
        driver(ACTION_MENU, "Enter number: "),
        driver(TRIAL_MENU, "Enter number: "),  # nothing left: exit
    ]
    assert answers == ["2", "1", str(tmp_path / "a"), "5", "1", "1", str(tmp_path / "c"), "5", "4"]
    assert driver.saved == [12, 7] and driver.missing == [99] and len(plans) == 1


def test_menu_driver_ignores_unfinished_output_and_refuses_unknown_questions() -> None:
    driver = heretic_driver.MenuDriver(dict)
    assert driver([], "* Trying batch size 1... ") is None
    assert driver(TRIAL_MENU, "Enter num") is None
    with pytest.raises(BenchError, match="unexpected Heretic question"):
        driver(["Which benchmarks?", "[1] MMLU"], "Enter number: ")


def test_menu_driver_gives_up_on_a_question_it_cannot_answer() -> None:
    now = [0.0]
    driver = heretic_driver.MenuDriver(dict, stall_seconds=60, clock=lambda: now[0])
    question = "How many additional trials do you want to run?: "
    assert driver([], question) is None
    now[0] = 30.0
    assert driver([], question) is None
    assert driver([], "* Trying batch size 64... ") is None  # work in progress: never a stall
    now[0] = 100.0
    assert driver([], "* Trying batch size 64... ") is None
    assert driver([], question) is None  # the clock starts again for a new question
    now[0] = 200.0
    with pytest.raises(BenchError, match="additional trials"):
        driver([], question)


def test_heretic_batch_size_from_its_console_line() -> None:
    lines = [
        (1.0, "* Trying batch size 64... Ok (1249 tokens/s)"),
        (2.0, "* Chosen batch size: 32"),
    ]
    assert heretic_driver.batch_size_from(lines) == 32
    assert heretic_driver.batch_size_from([]) is None


def test_skip_install_without_heretic_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(BenchError, match="without --skip-install"):
        heretic_driver.ensure_installed(tmp_path / "venv", skip_install=True)


# --- Blasphemer runs ----------------------------------------------------------------------------


def options(**changes: object) -> blasphemer_runner.BlasphemerOptions:
    values: dict[str, object] = {
        "model": "/models/demo",
        "n_trials": 50,
        "n_select_prompts": 100,
        "n_fit_prompts": 400,
        "n_report_prompts": 200,
        "max_new_tokens": 100,
        "system_prompt": "Be helpful.",
        "seed": 0,
        "exact_verdicts": False,
    }
    values.update(changes)
    return blasphemer_runner.BlasphemerOptions(**values)  # type: ignore[arg-type]


def test_blasphemer_command_matches_the_comparison_settings(tmp_path: Path) -> None:
    command = blasphemer_runner.run_command(
        Path("blasphemer"), options(), tmp_path / "o", tmp_path / "r"
    )
    text = " ".join(command)
    expected = [
        "run /models/demo", "--n-trials 50", "--n-select-prompts 100", "--max-new-tokens 100",
        "--max-fit-prompts 400", "--dtypes float32", "--device-map cpu", "--no-exact-verdicts",
        "--yes", "--quiet", "--no-resume", "--system-prompt Be helpful.",
    ]  # fmt: skip
    for part in expected:
        assert part in text
    assert "--batch-size" not in text and "--n-startup-trials" not in text
    exact = blasphemer_runner.run_command(
        Path("b"),
        options(exact_verdicts=True, batch_size=8, n_startup_trials=15),
        tmp_path,
        tmp_path,
    )
    assert "--exact-verdicts" in exact
    assert exact[exact.index("--batch-size") + 1] == "8"
    assert exact[exact.index("--n-startup-trials") + 1] == "15"
    half = blasphemer_runner.run_command(Path("b"), options(dtype="bfloat16"), tmp_path, tmp_path)
    assert half[half.index("--dtypes") + 1] == "bfloat16"


def test_read_trials_takes_times_from_the_study_database(tmp_path: Path) -> None:
    db = tmp_path / "study.db"
    with sqlite3.connect(db) as connection:
        connection.execute(
            "CREATE TABLE trials "
            "(number INT, state TEXT, datetime_start TEXT, datetime_complete TEXT)"
        )
        connection.executemany(
            "INSERT INTO trials VALUES (?, ?, ?, ?)",
            [(0, "COMPLETE", "2026-01-01 00:00:00.000000", "2026-01-01 00:00:02.500000"),
             (1, "RUNNING", "2026-01-01 00:00:03", None)],
        )  # fmt: skip
    results = tmp_path / "results.json"
    trials = [
        {"number": 0, "refusals": 5, "n_prompts": 100, "kl": 0.25, "seconds": 9.0},
        {"number": 2, "refusals": 1, "n_prompts": 100, "kl": "inf", "seconds": 3.0},
    ]
    results.write_text(json.dumps({"trials": trials}))
    read = blasphemer_runner.read_trials(results, db)
    assert read[0].seconds == pytest.approx(2.5)  # the database wins over the recorded seconds
    assert read[1].seconds == 3.0 and read[1].kl is None  # fallback; a non-number KL is dropped
    assert [r["key"] for r in report.trial_dicts(read)] == [0]


def test_missing_results_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(BenchError, match=r"results\.json"):
        blasphemer_runner.read_trials(tmp_path / "results.json", tmp_path / "study.db")


# --- the child-process runner -------------------------------------------------------------------


def test_run_timed_timestamps_lines_answers_prompts_and_measures_memory(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        print("first")
        answer = input("Enter number: ")
        print("got", answer)
        """
    )
    seen: list[tuple[list[str], str]] = []

    def responder(lines: list[str], tail: str) -> str | None:
        seen.append((list(lines), tail))
        return "42" if tail == "Enter number: " else None

    record = bench_common.run_timed(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=bench_common.child_env(1),
        log_path=tmp_path / "log.txt",
        responder=responder,
        timeout=60,
    )
    assert record.returncode == 0
    assert [text for _, text in record.lines] == ["first", "Enter number: 42", "got 42"]
    assert record.first_time("got") is not None and record.first_time("absent") is None
    assert record.peak_rss_mib > 1
    assert "got 42" in (tmp_path / "log.txt").read_text()


def test_run_timed_stops_the_child_when_the_responder_gives_up(tmp_path: Path) -> None:
    def responder(lines: list[str], tail: str) -> str | None:
        raise BenchError(f"cannot answer {tail!r}")

    with pytest.raises(BenchError, match="cannot answer 'Question\\?: '"):
        bench_common.run_timed(
            [sys.executable, "-c", "input('Question?: '); import time; time.sleep(30)"],
            cwd=tmp_path,
            env=bench_common.child_env(1),
            log_path=tmp_path / "log.txt",
            responder=responder,
            timeout=60,
        )


def test_run_timed_stops_a_child_past_its_timeout(tmp_path: Path) -> None:
    with pytest.raises(BenchError, match="ran past"):
        bench_common.run_timed(
            [sys.executable, "-c", "import time; time.sleep(30)"],
            cwd=tmp_path,
            env=bench_common.child_env(1),
            log_path=tmp_path / "log.txt",
            timeout=0.5,
        )


def test_child_env_fixes_threads_and_goes_offline() -> None:
    env = bench_common.child_env(3, {"EXTRA": "1"})
    assert env["OMP_NUM_THREADS"] == "3" and env["MKL_NUM_THREADS"] == "3"
    assert env["HF_HUB_OFFLINE"] == "1" and env["PYTHONUNBUFFERED"] == "1" and env["EXTRA"] == "1"


# --- pure helpers -------------------------------------------------------------------------------


def test_pareto_front_keeps_non_dominated_points_once() -> None:
    points = {
        "a": (10.0, 0.5),
        "b": (5.0, 0.9),
        "c": (10.0, 0.6),  # dominated by a
        "d": (10.0, 0.5),  # same as a: the first key stays
        "e": (50.0, 0.01),
        "f": (math.nan, 0.0),
    }
    assert bench_common.pareto_front(points) == ["b", "a", "e"]
    assert bench_common.pareto_front({}) == []


def test_spread_keeps_ends_and_spacing() -> None:
    assert bench_common.spread([1, 2, 3], 5) == [1, 2, 3]
    assert bench_common.spread(list(range(10)), 4) == [0, 3, 6, 9]
    assert bench_common.spread(list(range(10)), 1) == [0]
    assert bench_common.spread(list(range(10)), 0) == []


def test_median_ratio_and_cells_handle_missing_values() -> None:
    assert bench_common.median([3.0, None, 1.0, 2.0]) == 2.0
    assert bench_common.median([None]) is None
    assert bench_common.ratio(1.0, 4.0) == 0.25
    assert bench_common.ratio(1.0, 0.0) is None and bench_common.ratio(None, 1.0) is None
    assert bench_common.fmt(None) == "–" and bench_common.fmt(1.234, 1, " s") == "1.2 s"


def test_markdown_table_is_aligned() -> None:
    table = bench_common.markdown_table(["a", "long header"], [["1", "2"], ["333", "4"]])
    lines = table.splitlines()
    assert lines[0] == "| a   | long header |"
    assert lines[1] == "|-----|-------------|"
    assert len({len(line) for line in lines}) == 1


def test_startup_trials_and_quick_presets() -> None:
    assert vs_heretic.startup_trials("scaled", 50)[0] == 15
    assert vs_heretic.startup_trials("tool-defaults", 50)[0] is None
    assert vs_heretic.startup_trials("7", 50)[0] == 7
    with pytest.raises(BenchError):
        vs_heretic.startup_trials("many", 50)
    quick = vs_heretic.parse_args(["--quick", "--trials", "5"])
    assert quick.trials == 5 and quick.repeats == 1 and quick.n_eval == 20
    full = vs_heretic.parse_args(["--modes", "exact"])
    assert (
        full.trials == 50 and full.repeats == 2 and full.n_eval == 100 and full.modes == ["exact"]
    )
    with pytest.raises(SystemExit):
        vs_heretic.parse_args(["--modes", "fast"])
