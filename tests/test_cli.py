"""The command line: help, settings precedence, the defaults file, and runs on tiny models.

Bad input is tested in ``test_cli_errors.py`` and the checks made before a model loads in
``test_cli_preflight.py``; both share this file's helpers and fixtures. Every bad input must end
in exactly one line on standard error that starts with ``error:`` and names the problem, and a
non-zero exit code; no traceback. Most cases call :func:`cli.main` in process (a subprocess
costs seconds of imports each). Runs that need a model use tiny random Llamas with an offline
chat tokenizer, so the whole file takes seconds.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import tomllib
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import optuna
import pytest
from transformers import PreTrainedTokenizerFast

from blasphemer.app import cli, pipeline
from blasphemer.app import console as console_module
from blasphemer.app.config import Settings, default_toml
from blasphemer.app.console import Console
from blasphemer.optimization import default_storage_url, default_study_name, tier
from blasphemer.prompts import bundled_splits
from test_judging import _encoder
from test_loading import _tokenizer as loading_tokenizer
from tiny_models import VOCAB, build_tiny, word_tokenizer

DEFAULTS_FILE = Path(cli.__file__).parents[1] / "config.default.toml"
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + "
    "'<|end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
SPECIALS = ["<|pad|>", "<s>", "<|end|>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
# Small enough that a tiny run takes about a second; the numbers themselves are not checked.
FAST = [
    "--max-fit-prompts",
    "4",
    "--n-select-prompts",
    "4",
    "--n-report-prompts",
    "4",
    "--max-new-tokens",
    "4",
    "--decided-after",
    "2",
    "--batch-size",
    "4",
    "--n-startup-trials",
    "1",
    "--dtypes",
    "float32",
    "--device-map",
    "cpu",
]


# --- helpers ----------------------------------------------------------------------------------


def _chat_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level chat tokenizer built offline: ids 0-6 special, then the commonest words of
    the bundled prompts, exactly filling the tiny models' vocabulary."""
    counts: Counter[str] = Counter()
    for kind in ("harmful", "harmless"):
        for prompt in bundled_splits(kind).fit.prompts:
            counts.update(prompt.text.lower().split())
    words = [w for w, _ in counts.most_common() if w not in SPECIALS][: VOCAB - len(SPECIALS)]
    tokenizer = word_tokenizer(
        [*SPECIALS, *words],
        unknown="<unk>",
        added_special=SPECIALS,
        bos_token="<s>",
        eos_token="<|end|>",
        unk_token="<unk>",
        pad_token="<|pad|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _save_chat_model(folder: Path, seed: int) -> Path:
    model = build_tiny("llama", seed=seed)
    model.generation_config.eos_token_id = 2
    model.save_pretrained(folder)
    _chat_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_a(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_chat_model(tmp_path_factory.mktemp("models") / "tiny-a", seed=11)


@pytest.fixture(scope="module")
def tiny_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_chat_model(tmp_path_factory.mktemp("models") / "tiny-b", seed=22)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each test in its own working folder, with no BLASPHEMER_* setting from the outside."""
    monkeypatch.chdir(tmp_path)
    for name in Settings.model_fields:
        monkeypatch.delenv(f"BLASPHEMER_{name.upper()}", raising=False)
    monkeypatch.setenv("COLUMNS", "1000")  # argparse: one help line per option


@pytest.fixture
def blasphemer(capsys: pytest.CaptureFixture[str]) -> Callable[..., SimpleNamespace]:
    """Run ``blasphemer ARGS`` in process: exit code, standard output and standard error."""

    def call(*args: str | Path) -> SimpleNamespace:
        capsys.readouterr()
        code = cli.main([str(a) for a in args])
        captured = capsys.readouterr()
        return SimpleNamespace(code=code, out=captured.out, err=captured.err)

    return call


def _assert_one_line_error(result: Any, *needles: str) -> str:
    """Non-zero exit; stderr is one ``error:`` line naming every needle (case-insensitive)."""
    assert result.code != 0, result.out
    assert "Traceback" not in result.err
    lines = result.err.rstrip("\n").split("\n")
    assert len(lines) == 1, result.err
    line = lines[0]
    assert line.startswith("error: "), line
    for needle in needles:
        assert needle.lower() in line.lower(), (needle, line)
    return line


@pytest.fixture
def captured_settings(monkeypatch: pytest.MonkeyPatch) -> list[Settings]:
    """Replace the pipeline: ``blasphemer run`` then only records the settings it was given."""
    seen: list[Settings] = []

    def record(settings: Settings, console: Console) -> int:
        seen.append(settings)
        return 0

    monkeypatch.setattr(pipeline, "run", record)
    return seen


def _trials(storage_url: str, study_name: str) -> dict[int, tuple[Any, ...]]:
    study = optuna.load_study(study_name=study_name, storage=storage_url)
    return {
        t.number: (tuple(t.values), tuple(sorted(t.params.items())))
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    }


# --- help and parsing ---------------------------------------------------------------------------


def test_run_help_lists_every_setting_with_its_description(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name, info in Settings.model_fields.items():
        if name == "model":
            continue
        assert f"--{name.replace('_', '-')}" in text, name
        assert " ".join((info.description or "").split()) in text, name
    assert "--resume, --no-resume" in text


@pytest.mark.parametrize("command", cli.SUBCOMMANDS)
def test_every_subcommand_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: blasphemer {command}" in capsys.readouterr().out


def test_version_and_bare_command(blasphemer: Callable[..., SimpleNamespace]) -> None:
    from blasphemer import __version__

    version = blasphemer("--version")
    assert version.code == 0 and version.out.strip() == f"blasphemer {__version__}"
    bare = blasphemer()
    assert bare.code == 2 and "usage: blasphemer" in bare.out


_HEAVY_LIBRARIES = ("torch", "transformers", "optuna", "huggingface_hub", "datasets")


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["run", "--help"],
        ["--version"],
        ["some/model", "--n-trials", "x"],
        ["nope", "--x"],
    ],
)
def test_help_and_argument_errors_import_no_heavy_library(argv: list[str]) -> None:
    # A fresh interpreter: this test process has long imported torch.
    script = (
        "import sys\n"
        "from blasphemer.app import cli\n"
        "try:\n"
        f"    code = cli.main({argv!r})\n"
        "except SystemExit as exit_:\n"
        "    code = exit_.code\n"
        f"heavy = sorted({{m.split('.')[0] for m in sys.modules}} & set({_HEAVY_LIBRARIES!r}))\n"
        "print('RESULT', code, ','.join(heavy) or '-', file=sys.stderr)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    _, code, heavy = result.stderr.strip().splitlines()[-1].split()
    assert code == ("2" if "x" in argv or "--x" in argv else "0")
    assert heavy == "-", f"{argv} imported {heavy}"


def test_a_model_alone_means_run(
    blasphemer: Callable[..., SimpleNamespace], captured_settings: list[Settings]
) -> None:
    assert blasphemer("some/model", "--n-trials", "3", "--no-resume").code == 0
    (settings,) = captured_settings
    assert settings.model == "some/model"
    assert settings.n_trials == 3 and settings.resume is False


def test_resume_flag_has_three_states(
    blasphemer: Callable[..., SimpleNamespace], captured_settings: list[Settings]
) -> None:
    for flag in ("--resume", "--no-resume", None):
        assert blasphemer("run", "m/x", *([flag] if flag else [])).code == 0
    assert [s.resume for s in captured_settings] == [True, False, None]


# --- configuration ------------------------------------------------------------------------------


def test_precedence_is_cli_then_env_then_toml_then_defaults(
    blasphemer: Callable[..., SimpleNamespace],
    captured_settings: list[Settings],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    config = tmp_path / "settings.toml"
    config.write_text(
        'model = "from/toml"\nn_trials = 5\nseed = 1\nbatch_size = 3\ndtypes = ["float16"]\n'
    )
    monkeypatch.setenv("BLASPHEMER_N_TRIALS", "7")
    monkeypatch.setenv("BLASPHEMER_SEED", "2")
    monkeypatch.setenv("BLASPHEMER_DTYPES", '["bfloat16", "float32"]')
    monkeypatch.setenv("BLASPHEMER_YES", "true")
    assert blasphemer("run", "--config", config, "--n-trials", "9").code == 0
    (settings,) = captured_settings
    assert settings.n_trials == 9  # command line beats environment and file
    assert settings.seed == 2  # environment beats file
    assert settings.dtypes == ["bfloat16", "float32"]  # lists from the environment are JSON
    assert settings.yes is True
    assert settings.batch_size == 3  # file beats defaults
    assert settings.model == "from/toml"  # the model can come from the file too
    assert settings.max_batch_size == Settings.model_fields["max_batch_size"].default


def test_a_preset_lies_beneath_the_config_file(
    blasphemer: Callable[..., SimpleNamespace],
    captured_settings: list[Settings],
    tmp_path: Path,
) -> None:
    preset = tomllib.loads(
        Path(cli.__file__).parents[1].joinpath("presets", "cpu-small.toml").read_text()
    )
    assert preset and set(preset) <= set(Settings.model_fields)
    config = tmp_path / "settings.toml"
    config.write_text("n_trials = 5\n")
    assert blasphemer("run", "m/x", "--preset", "cpu-small").code == 0
    assert blasphemer("run", "m/x", "--preset", "cpu-small", "--config", config).code == 0
    assert blasphemer("run", "m/x", "--preset", "cpu-small", "--n-select-prompts", "7").code == 0
    from_preset, with_file, with_option = captured_settings
    for name, value in preset.items():
        assert getattr(from_preset, name) == value, name
        assert getattr(from_preset, name) != Settings.model_fields[name].default, name
    assert with_file.n_trials == 5  # the file wins over the preset
    assert with_file.n_select_prompts == preset["n_select_prompts"]
    assert with_option.n_select_prompts == 7
    _assert_one_line_error(blasphemer("run", "m/x", "--preset", "gpu-huge"), "cpu-small")


def test_a_shorter_response_length_lowers_the_default_decision_length() -> None:
    # evaluate and chat have no --decided-after, so its default must follow --max-new-tokens.
    settings = Settings(max_new_tokens=4)
    assert settings.decided_after == 4
    assert "decided_after" not in settings.model_fields_set


def test_committed_defaults_file_is_the_generated_one() -> None:
    assert DEFAULTS_FILE.read_text() == default_toml(), (
        "config.default.toml is stale: write blasphemer.app.config.default_toml() into it"
    )


def test_defaults_file_documents_every_setting_and_loads_to_the_defaults(
    blasphemer: Callable[..., SimpleNamespace], captured_settings: list[Settings]
) -> None:
    text = DEFAULTS_FILE.read_text()
    for name, info in Settings.model_fields.items():
        assert re.search(rf"^(# )?{name} =", text, re.MULTILINE), name
        assert f"# {info.description}" in text, name
    assert set(tomllib.loads(text)) <= set(Settings.model_fields)
    assert blasphemer("run", "m/x", "--config", DEFAULTS_FILE).code == 0
    (settings,) = captured_settings
    assert settings.model_dump(exclude={"model"}) == Settings().model_dump(exclude={"model"})


# --- runs on a tiny model: budget, resume, selection, display -----------------------------------


def _results(folder: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((folder / "results.json").read_text())
    return data


def test_n_trials_is_the_total_budget_of_a_resumed_study(
    blasphemer: Callable[..., SimpleNamespace], tiny_a: Path, tmp_path: Path
) -> None:
    url = default_storage_url(tmp_path / "runs")
    name = default_study_name(str(tiny_a))
    common = ["run", tiny_a, *FAST, "--run-dir", tmp_path / "runs", "--yes"]

    assert blasphemer(*common, "--n-trials", "2", "--output-dir", "o1").code == 0
    first = _trials(url, name)
    assert sorted(first) == [0, 1]

    grown = blasphemer(*common, "--n-trials", "3", "--output-dir", "o2")
    assert grown.code == 0, grown.err
    assert "resuming" in grown.out and "2 of 3 trials done" in grown.out
    second = _trials(url, name)
    assert sorted(second) == [0, 1, 2]
    assert {n: second[n] for n in first} == first  # finished trials are kept as they were

    again = blasphemer(*common, "--output-dir", "o3")  # no --n-trials: the stored budget
    assert again.code == 0 and "3 of 3 trials done" in again.out
    assert _trials(url, name) == second
    assert len(_results(tmp_path / "o3")["trials"]) == 3

    fresh = blasphemer(*common, "--n-trials", "1", "--no-resume", "--output-dir", "o4")
    assert fresh.code == 0 and "starting" in fresh.out
    assert sorted(_trials(url, name)) == [0]


class _ScriptedConsole(Console):
    """An interactive console whose answers are scripted; records every question."""

    answers: ClassVar[list[str]] = []
    questions: ClassVar[list[str]] = []

    def __init__(self, quiet: bool = False, debug: bool = False, stream: Any = None) -> None:
        super().__init__(quiet=quiet, debug=debug, stream=stream)
        self.interactive = True

    def ask(self, question: str, choices: Sequence[str], default: str) -> str:
        self.questions.append(question)
        answer = self.answers.pop(0) if self.answers else default
        assert answer in choices
        return answer

    def confirm(self, question: str, default: bool) -> bool:
        self.questions.append(question)
        return True


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> type[_ScriptedConsole]:
    monkeypatch.setattr(_ScriptedConsole, "answers", [])
    monkeypatch.setattr(_ScriptedConsole, "questions", [])
    monkeypatch.setattr(cli, "Console", _ScriptedConsole)
    return _ScriptedConsole


def test_interactive_choice_can_save_nothing(
    blasphemer: Callable[..., SimpleNamespace], tiny_a: Path, scripted: type[_ScriptedConsole]
) -> None:
    scripted.answers.append("none")
    result = blasphemer("run", tiny_a, *FAST, "--n-trials", "2", "--output-dir", "out")
    assert result.code == 0, result.err
    assert scripted.questions == ["trial to save (or 'none')"]
    assert not Path("out").exists()


def test_interactive_choice_saves_the_starred_default_after_confirming(
    blasphemer: Callable[..., SimpleNamespace], tiny_a: Path, scripted: type[_ScriptedConsole]
) -> None:
    result = blasphemer("run", tiny_a, *FAST, "--n-trials", "2", "--output-dir", "out")
    assert result.code == 0, result.err
    assert scripted.questions[0] == "trial to save (or 'none')"
    assert scripted.questions[1].startswith("save trial")
    starred = re.search(r"⭐ (\d+)", result.out)
    assert starred is not None
    assert _results(Path("out"))["chosen"]["number"] == int(starred[1])


def test_yes_asks_nothing_even_on_a_terminal(
    blasphemer: Callable[..., SimpleNamespace], tiny_a: Path, scripted: type[_ScriptedConsole]
) -> None:
    args = ["run", tiny_a, *FAST, "--n-trials", "2", "--yes", "--output-dir", "out"]
    assert blasphemer(*args).code == 0
    assert blasphemer(*args).code == 0  # the study exists now: still no continue/restart question
    assert scripted.questions == []
    assert (Path("out") / "results.json").is_file()


def test_select_rules_choose_the_saved_trial(
    blasphemer: Callable[..., SimpleNamespace], tiny_a: Path, scripted: type[_ScriptedConsole]
) -> None:
    args = ["run", tiny_a, *FAST, "--n-trials", "3", "--yes"]
    assert blasphemer(*args, "--select", "1", "--output-dir", "by-number").code == 0
    assert _results(Path("by-number"))["chosen"]["number"] == 1
    result = blasphemer(*args, "--select", "lowest-kl:refusals<=100%", "--output-dir", "by-kl")
    assert result.code == 0
    data = _results(Path("by-kl"))
    assert data["chosen"]["kl"] == min(t["kl"] for t in data["trials"])
    assert scripted.questions == []


def test_unknown_trial_number_is_one_line(
    blasphemer: Callable[..., SimpleNamespace], tiny_a: Path
) -> None:
    result = blasphemer("run", tiny_a, *FAST, "--n-trials", "1", "--yes", "--select", "99")
    _assert_one_line_error(result, "99")


def test_run_prints_stages_trials_and_the_pareto_table(
    blasphemer: Callable[..., SimpleNamespace], tiny_a: Path
) -> None:
    result = blasphemer("run", tiny_a, *FAST, "--n-trials", "2", "--yes", "--quiet")
    assert result.code == 0 and result.err == ""
    for stage in range(1, 11):
        assert f"[{stage}/10]" in result.out
    assert "trial 2/2" in result.out and "ETA" in result.out
    assert "Pareto front" in result.out and "⭐" in result.out
    assert re.search(r"\d+\.\d% \[\d+%-\d+%\]", result.out)  # rates with 95 % intervals
    assert "\x1b[" not in result.out


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_quiet_mode_prints_plain_lines_even_on_a_terminal() -> None:
    def show(console: Console) -> None:
        with console.progress("scoring", 3) as advance:
            advance(3)
        console.table("front", ["trial", "tier"], [["⭐ 1", "Good"]])

    live, quiet = _Terminal(), _Terminal()
    show(Console(stream=live))
    show(Console(quiet=True, stream=quiet))
    assert quiet.getvalue().splitlines() == [
        quiet.getvalue().splitlines()[0],
        "front",
        "  trial | tier",
        "  ⭐ 1 | Good",
    ]
    assert quiet.getvalue().startswith("scoring: 3 done in ")
    assert "\x1b[" not in quiet.getvalue()
    assert "┃" in live.getvalue() or "│" in live.getvalue()  # a drawn table


def test_quiet_progress_logs_the_count_and_an_eta_while_a_slow_stage_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = iter([0.0, 10.0, 40.0, 100.0, 130.0, 131.0])
    monkeypatch.setattr(console_module.time, "monotonic", lambda: next(clock))
    out = io.StringIO()
    with Console(quiet=True, stream=out).progress("held-out", 4) as advance:
        advance(1)  # 10 s after the start: too soon for a line
        advance(1)  # 40 s: 2 of 4 in 40 s, so 40 s to go
        advance(1)  # 100 s: 60 s after the last line
        advance(1)  # the last one: only the closing line
    assert out.getvalue().splitlines() == [
        "held-out: 2/4, elapsed 0m40s, ETA 0m40s",
        "held-out: 3/4, elapsed 1m40s, ETA 0m33s",
        "held-out: 4 done in 2m11s",
    ]


@pytest.mark.parametrize(
    ("rate", "kl", "expected"),
    [
        (0.0, 0.1, "Excellent"),
        (0.02, 0.2, "Very good"),
        (0.05, 0.4, "Good"),
        (0.06, 0.0, "Poor"),
        (0.0, 0.5, "Poor"),
    ],
)
def test_tiers(rate: float, kl: float, expected: str) -> None:
    assert tier(rate, kl).value == expected


def test_inspect_json_on_a_tiny_saved_model(
    blasphemer: Callable[..., SimpleNamespace], tmp_path: Path
) -> None:
    folder = tmp_path / "tiny-llama"
    build_tiny("llama").save_pretrained(folder)
    loading_tokenizer().save_pretrained(folder)
    result = blasphemer("inspect", folder, "--json", "--dtypes", "float32")
    assert result.code == 0, result.err
    description = json.loads(result.out)
    assert description["spec"] == "llama" and description["n_layers"] == 2
    assert description["hidden_size"] == 32
    paths = [w["path"] for layer in description["layers"] for w in layer]
    assert paths == [
        "model.layers.0.self_attn.o_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.o_proj",
        "model.layers.1.mlp.down_proj",
    ]
    table = blasphemer("inspect", folder, "--dtypes", "float32")
    assert table.code == 0, table.err
    assert "model.layers.1.mlp.down_proj" in table.out


@pytest.mark.real
def test_run_with_both_judges_reports_both_counts(
    blasphemer: Callable[..., SimpleNamespace], tiny_a: Path, tmp_path: Path
) -> None:
    encoder = _encoder()
    out = tmp_path / "judged"
    args = ["--n-trials", "2", "--yes", "--quiet", "--output-dir", out]
    result = blasphemer("run", tiny_a, *FAST, *args, "--judge", "both", "--judge-encoder", encoder)
    assert result.code == 0, result.err
    assert "refusals (report, semantic)" in result.out
    data = json.loads((out / "results.json").read_text())
    held = data["held_out"]
    assert 0 <= held["semantic_refusals"] <= held["n_prompts"]
    low, high = held["semantic_refusal_rate_95ci"]
    assert low <= held["semantic_refusal_rate"] <= high
    assert held["original_semantic_refusals"] is not None
    card = (out / "README.md").read_text()
    assert "refusals (semantic judge)" in card and "refusals (markers)" in card


@pytest.mark.real
def test_evaluate_with_both_judges_reports_both_counts(
    blasphemer: Callable[..., SimpleNamespace], tiny_a: Path
) -> None:
    encoder = _encoder()
    small = ["--n-report-prompts", "4", "--max-new-tokens", "4", "--batch-size", "4"]
    args = ["--base", tiny_a, *small, "--judge", "both", "--judge-encoder", encoder, "--json"]
    result = blasphemer("evaluate", tiny_a, *args)
    assert result.code == 0, result.err
    data = json.loads(result.out)  # stdout is the JSON alone
    assert data["kl"] == pytest.approx(0.0, abs=1e-6)  # the model against itself
    assert data["semantic_refusals"] == data["base_semantic_refusals"]
    assert 0 <= data["semantic_refusals"] <= data["n_harmful"]
    low, high = data["semantic_refusal_rate_95ci"]
    assert low <= data["semantic_refusal_rate"] <= high


@pytest.mark.parametrize("judge", ["markers", "semantic", "both"])
def test_only_answers_the_semantic_judge_reads_are_generated_whole(
    tiny_a: Path, judge: str
) -> None:
    from blasphemer.app import stages

    settings = Settings(model=str(tiny_a), batch_size=4, dtypes=["float32"], judge=judge)
    ctx = stages.prepare(settings, Console(quiet=True))
    assert ctx.select_scorers().refusals.stop_at_marker  # the optimiser scores by markers alone
    held_out = ctx.refusal_scorer(ctx.prompts.harmful.report, for_judge=True)
    assert held_out.stop_at_marker == (judge == "markers")


def test_draft_tokens_reach_the_search_and_held_out_scorers(tiny_a: Path) -> None:
    from blasphemer.app import stages

    settings = Settings(model=str(tiny_a), batch_size=4, dtypes=["float32"], draft_tokens=3)
    ctx = stages.prepare(settings, Console(quiet=True))
    assert ctx.select_scorers().refusals.draft_tokens == 3
    assert ctx.refusal_scorer(ctx.prompts.harmful.report, for_judge=True).draft_tokens == 3
    assert Settings(model=str(tiny_a)).draft_tokens == 0
