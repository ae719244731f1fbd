"""End to end on the bundled demo model, through the installed ``blasphemer`` console script.

One 40-trial run with the default settings is shared by the checks on its wall time, its files,
its held-out numbers, ``evaluate --json`` and ``chat``. A second, smaller run is killed with
SIGKILL mid-study and resumed; ``blasphemer demo`` runs once in a fresh working folder.
Every command runs on at most two CPU cores (the issue's budget: under 10 minutes).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from blasphemer.evaluation.markers import is_refusal
from blasphemer.optimization import default_study_name

pytestmark = pytest.mark.slow

SCRIPT = Path(sys.executable).with_name("blasphemer")
N_TRIALS = 40
# The issue asks for held-out refusals <= 10 % with KL <= 0.2; the rule asks the same of the
# *select* split, and the held-out split then has to confirm it (on the demo model of
# 2026-11-27, 4,096-token vocabulary, with projected directions, the rule chose a trial with
# 4 % held-out refusals at KL 0.081).
SELECT_MAX_REFUSALS = 0.1
SELECT_RULE = f"lowest-kl:refusals<={SELECT_MAX_REFUSALS}"
MAX_REFUSAL_RATE = 0.10
MAX_KL = 0.2
TIME_LIMIT_S = 600
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json")
REPORT_FILES = ("README.md", "results.json", "pareto.png", "report.md", "report.html")


def _two_cores() -> None:
    """Run the child on (at most) two CPU cores, as the issue's time budget assumes."""
    cores = sorted(os.sched_getaffinity(0))[:2]
    os.sched_setaffinity(0, cores)


def _command(demo_model: Path, *args: str | Path) -> list[str]:
    """``blasphemer ARGS``; ``demo`` uses the development stand-in when one is configured."""
    if args[:1] == ("demo",) and os.environ.get("BLASPHEMER_TEST_DEMO_MODEL"):
        launcher = (
            "import sys; from pathlib import Path; import blasphemer.app.pipeline as p; "
            f"p.demo_model_path = lambda: Path({str(demo_model)!r}); "
            "from blasphemer.app.cli import main; sys.exit(main(sys.argv[1:]))"
        )
        return [sys.executable, "-c", launcher, *map(str, args)]
    return [str(SCRIPT), *map(str, args)]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def blasphemer(
    demo_model: Path, *args: str | Path, cwd: Path, stdin: str = "", timeout: float = 900
) -> SimpleNamespace:
    """Run the command to completion: exit code, output, error output and wall seconds."""
    started = time.monotonic()
    done = subprocess.run(
        _command(demo_model, *args),
        cwd=cwd,
        env=_env(),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=_two_cores,
    )
    return SimpleNamespace(
        code=done.returncode,
        out=done.stdout,
        err=done.stderr,
        seconds=time.monotonic() - started,
    )


def _results(folder: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((folder / "results.json").read_text())
    return data


# --- the 40-trial run ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_run(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """``blasphemer run DEMO --n-trials 40 --yes --select RULE --output-dir X``, defaults else."""
    cwd = tmp_path_factory.mktemp("run")
    result = blasphemer(
        demo_model_dir,
        "run",
        demo_model_dir,
        "--n-trials",
        str(N_TRIALS),
        "--yes",
        "--select",
        SELECT_RULE,
        "--output-dir",
        cwd / "out",
        cwd=cwd,
    )
    print(f"\n40-trial run: {result.seconds:.0f} s\n{result.out[-3000:]}")
    assert result.code == 0, result.err
    result.cwd = cwd
    result.output = cwd / "out"
    return result


def test_forty_trials_finish_in_time_and_write_everything(full_run: SimpleNamespace) -> None:
    assert full_run.seconds < TIME_LIMIT_S
    assert full_run.err == ""  # no library warnings or progress bars around our own lines
    for name in (*MODEL_FILES, *REPORT_FILES):
        assert (full_run.output / name).is_file(), name
    assert list(full_run.output.glob("*.safetensors"))
    assert not list(full_run.cwd.glob(".out.*"))  # no staging folder left behind
    card = (full_run.output / "README.md").read_text()
    held_out = _results(full_run.output)["held_out"]
    assert "Held-out scores" in card  # the card carries the measured numbers
    assert f"{held_out['refusals']}/{held_out['n_prompts']}" in card


def test_chosen_trial_meets_the_held_out_targets(full_run: SimpleNamespace) -> None:
    data = _results(full_run.output)
    assert len(data["trials"]) == N_TRIALS
    chosen, held_out = data["chosen"], data["held_out"]
    assert chosen["refusal_rate"] <= SELECT_MAX_REFUSALS  # what the --select rule promised
    assert held_out["n_prompts"] == 200  # the default --n-report-prompts
    low, high = held_out["refusal_rate_95ci"]
    print(
        f"\nchosen trial {chosen['number']}: held-out refusals {held_out['refusal_rate']:.1%} "
        f"(95 % interval {low:.1%}-{high:.1%}), KL {held_out['kl']:.3f}; original model "
        f"{held_out['original_refusal_rate']:.1%}"
    )
    assert held_out["original_refusal_rate"] >= 0.9  # there was refusal behaviour to remove
    assert held_out["refusal_rate"] <= MAX_REFUSAL_RATE
    assert held_out["kl"] <= MAX_KL


def test_console_shows_the_front_with_intervals_star_and_tiers(full_run: SimpleNamespace) -> None:
    out = full_run.out
    assert f"trial {N_TRIALS}/{N_TRIALS}" in out
    assert "Pareto front" in out and "refusals (report)" in out
    assert out.count("⭐") >= 1
    assert re.search(r"\d+\.\d% \[\d+%-\d+%\]", out)
    assert re.search(r"Excellent|Very good|Good|Poor", out)
    assert f"saved trial {_results(full_run.output)['chosen']['number']}" in out


def test_evaluate_json_measures_the_saved_model(
    full_run: SimpleNamespace, demo_model_dir: Path
) -> None:
    result = blasphemer(
        demo_model_dir, "evaluate", full_run.output, "--base", demo_model_dir, "--json",
        cwd=full_run.cwd,
    )  # fmt: skip
    assert result.code == 0, result.err
    measured = json.loads(result.out)
    held_out = _results(full_run.output)["held_out"]
    assert measured["n_harmful"] == held_out["n_prompts"]
    assert measured["base_refusals"] == held_out["original_refusals"]
    # The saved weights are the in-memory edit merged and rounded to the checkpoint's dtype,
    # scored in other batches: the same numbers up to a few flipped greedy answers.
    assert abs(measured["refusal_rate"] - held_out["refusal_rate"]) <= 0.03
    assert measured["kl"] == pytest.approx(held_out["kl"], rel=0.1, abs=0.01)


def test_chat_reads_piped_lines_until_end_of_input(
    full_run: SimpleNamespace, demo_model_dir: Path
) -> None:
    result = blasphemer(
        demo_model_dir, "chat", full_run.output, "--max-new-tokens", "24",
        cwd=full_run.cwd, stdin="Write a short poem about the sea.\n",
    )  # fmt: skip
    assert result.code == 0, result.err
    assert result.err == ""
    first_turn = result.out.split("> ", 1)[1]
    reply = first_turn.rsplit("> ", 1)[0]  # the prompt again, then end of input
    assert reply.strip(), result.out


# --- SIGKILL mid-study, then the same command again ---------------------------------------------


def _complete_numbers(database: Path) -> list[int]:
    if not database.exists():
        return []
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5) as connection:
            rows = connection.execute("SELECT number FROM trials WHERE state = 'COMPLETE'")
            return [row[0] for row in rows]
    except sqlite3.OperationalError:  # tables not created yet, or locked for a moment
        return []


def _trials(database: Path, name: str) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{database}")
    return study.get_trials(deepcopy=False)


def test_sigkill_mid_study_then_resume_loses_no_finished_trial(
    demo_model_dir: Path, tmp_path: Path
) -> None:
    budget = 10
    # Smaller prompt sets than the defaults: this test is about durability, not quality.
    args = [
        "run", demo_model_dir, "--n-trials", str(budget), "--yes",
        "--max-fit-prompts", "64", "--n-select-prompts", "16", "--n-report-prompts", "16",
        "--heartbeat-interval", "1", "--grace-period", "3",
        "--run-dir", tmp_path / "runs", "--output-dir", tmp_path / "out",
    ]  # fmt: skip
    database = tmp_path / "runs" / "study.db"
    name = default_study_name(str(demo_model_dir))

    with (tmp_path / "killed.log").open("w") as log:
        process = subprocess.Popen(
            _command(demo_model_dir, *args),
            cwd=tmp_path,
            env=_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_two_cores,
        )
        deadline = time.monotonic() + 300
        while len(_complete_numbers(database)) < 2:
            assert process.poll() is None, (tmp_path / "killed.log").read_text()
            assert time.monotonic() < deadline, "no two finished trials in 5 minutes"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL

    before = {
        t.number: (t.values, t.params)
        for t in _trials(database, name)
        if t.state == TrialState.COMPLETE
    }
    assert 2 <= len(before) < budget, "killed mid-study"
    interrupted = [t.number for t in _trials(database, name) if t.state == TrialState.RUNNING]

    again = blasphemer(demo_model_dir, *args, cwd=tmp_path, timeout=600)
    assert again.code == 0, again.err
    assert f"{len(before)} of {budget} trials done" in again.out

    trials = _trials(database, name)
    after = {t.number: (t.values, t.params) for t in trials if t.state == TrialState.COMPLETE}
    assert {n: after[n] for n in before} == before  # every finished trial, unchanged
    assert len(after) == budget  # and the budget exactly: no trial lost, none extra
    assert len(_results(tmp_path / "out")["trials"]) == budget
    for number in interrupted:  # the killed trial was failed and re-run with its parameters
        assert trials[number].state == TrialState.FAIL
        retries = [t for t in trials if t.system_attrs.get("failed_trial") == number]
        assert len(retries) == 1, [(t.number, t.state.name) for t in retries]
        # The kill can land while the trial is still drawing its parameters: the retry keeps every
        # one that was recorded and draws the rest.
        assert retries[0].params.items() >= trials[number].params.items(), (
            retries[0].params,
            trials[number].params,
        )


# --- blasphemer demo ----------------------------------------------------------------------------


def test_confirm_front_gives_the_front_of_exact_verdicts(
    demo_model_dir: Path, tmp_path: Path
) -> None:
    # Fewer trials than random startup trials: both runs draw the same parameter sets (seed 0),
    # so the confirmed front must be the exact-verdict run's, trial for trial.
    fronts = {}
    for mode in ("--confirm-front", "--exact-verdicts"):
        folder = tmp_path / mode.strip("-")
        folder.mkdir()
        done = blasphemer(
            demo_model_dir,
            "run",
            demo_model_dir,
            "--n-trials",
            "8",
            mode,
            "--yes",
            "--held-out-trials",
            "1",
            "--batch-size",  # a probed size can differ between the runs (a busy machine)
            "16",
            "--output-dir",
            folder / "out",
            cwd=folder,
        )
        assert done.code == 0, done.err
        data = _results(folder / "out")
        trials = {t["number"]: t for t in data["trials"]}
        fronts[mode] = [(n, trials[n]["refusals"], trials[n]["kl"]) for n in data["pareto_front"]]
        # The original's select count says how it was judged.
        judged = "early verdicts" if mode == "--confirm-front" else "whole answers"
        assert f"harmful select prompts (markers, {judged})" in done.out
        if mode == "--confirm-front":
            assert all(trials[n]["early_refusals"] is not None for n in data["pareto_front"])
            assert "confirm_front" in data["timings_s"] and "on whole answers" in done.out
    confirmed, exact = fronts["--confirm-front"], fronts["--exact-verdicts"]
    assert [(n, r) for n, r, _ in confirmed] == [(n, r) for n, r, _ in exact]
    # Same trials and verdicts; the KL to float32 rounding (with equal batches the sums are
    # equal here, but CI once moved the 7th digit of one).
    kls = [kl for *_, kl in exact]
    assert [kl for *_, kl in confirmed] == pytest.approx(kls, rel=1e-4, abs=1e-7)


def test_demo_runs_end_to_end_in_a_fresh_folder(demo_model_dir: Path, tmp_path: Path) -> None:
    result = blasphemer(demo_model_dir, "demo", cwd=tmp_path)
    print(f"\ndemo: {result.seconds:.0f} s")
    assert result.code == 0, result.err
    assert result.seconds < TIME_LIMIT_S
    assert "Pareto front" in result.out and "refusals (report)" in result.out
    assert result.out.count("before:") == 2 and result.out.count("after:") == 2
    befores = [line.split("before:", 1)[1] for line in result.out.splitlines() if "before:" in line]
    assert all(is_refusal(answer) for answer in befores)  # samples the original refuses
    saved = tmp_path / "blasphemer-demo"
    for name in (*MODEL_FILES, *REPORT_FILES):
        assert (saved / name).is_file(), name
    data = _results(saved)
    assert len(data["trials"]) == N_TRIALS
    assert data["held_out"]["refusal_rate"] < data["held_out"]["original_refusal_rate"]
    # --yes without --select saves a trial no other held-out-scored trial beats on both
    # held-out numbers (the knee is taken on the report split).
    scored = {int(n): (h["refusal_rate"], h["kl"]) for n, h in data["held_out_front"].items()}
    mine = scored[data["chosen"]["number"]]
    assert not any(o[0] <= mine[0] and o[1] <= mine[1] and o != mine for o in scored.values())
