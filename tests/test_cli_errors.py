"""Bad input on the command line: every case ends in one ``error:`` line that names the problem
and a non-zero exit, with no traceback (split from ``test_cli.py``, whose helpers and tiny chat
models these tests share; the checks made before a model loads are in
``test_cli_preflight.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace

import pytest

import test_cli
from blasphemer.app import preflight
from test_cli import FAST, _assert_one_line_error, _trials

# test_cli's fixtures, bound here so that pytest finds them (``_isolated`` is autouse).
blasphemer = test_cli.blasphemer
tiny_a = test_cli.tiny_a
tiny_b = test_cli.tiny_b
_isolated = test_cli._isolated

# --- bad input: every case is one line and a non-zero exit ------------------------------------


def test_missing_model_path(blasphemer: Callable[..., SimpleNamespace], tmp_path: Path) -> None:
    _assert_one_line_error(blasphemer("run", tmp_path / "nowhere"), "nowhere", "does not exist")


def test_folder_that_is_not_a_model(
    blasphemer: Callable[..., SimpleNamespace], tmp_path: Path
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"\xff\xd8")
    _assert_one_line_error(blasphemer("run", folder), "photos", "not a model folder")
    _assert_one_line_error(blasphemer("run", folder / "cat.jpg"), "cat.jpg", "not a model folder")


def test_model_with_an_unreadable_config(
    blasphemer: Callable[..., SimpleNamespace], tiny_a: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in tiny_a.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    (broken / "config.json").write_text('{"model_type": "llama",')
    _assert_one_line_error(blasphemer("run", broken, *FAST), "config", "broken")


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        ("n_trials = [", ("cannot read config file",)),
        (None, ("does not exist", "--config")),
        ("", ("cannot read config file", "directory")),  # a folder given as the file
        ("n_trails = 5\n", ("unknown keys", "n_trails")),
        ('n_trials = "many"\n', ("--n-trials", "integer")),
    ],
    ids=["syntax", "missing", "folder", "unknown-key", "wrong-type"],
)
def test_bad_config_file(
    blasphemer: Callable[..., SimpleNamespace],
    tmp_path: Path,
    content: str | None,
    needles: Sequence[str],
) -> None:
    config = tmp_path / "settings.toml"
    if "directory" in needles:
        config.mkdir()
    elif content is not None:
        config.write_text(content)
    _assert_one_line_error(blasphemer("run", "m/x", "--config", config), *needles)


@pytest.mark.parametrize(
    "args",
    [["run", "m/x", "--bogus"], ["inspect", "m/x", "--bogus"], ["demo", "--bogus"]],
    ids=["run", "inspect", "demo"],
)
def test_unknown_option(blasphemer: Callable[..., SimpleNamespace], args: list[str]) -> None:
    _assert_one_line_error(blasphemer(*args), "unrecognized arguments", "--help")


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--n-trials", "0"], ("--n-trials", "greater than or equal to 1")),
        (["--n-trials", "-3"], ("--n-trials",)),
        (["--n-trials", "many"], ("--n-trials", "invalid int")),
        (["--max-fit-prompts", "1"], ("--max-fit-prompts", "2")),
        (["--kl-positions", "0"], ("--kl-positions",)),
        (["--grace-period", "5", "--heartbeat-interval", "10"], ("grace_period",)),
        (["--max-new-tokens", "8", "--decided-after", "9"], ("decided_after",)),
        (["--dtypes", "float64"], ("--dtypes", "float64")),
        (["--quantization", "int3"], ("--quantization", "invalid choice")),
        (["--select", "best"], ("--select", "best")),
        (["--select", "lowest-kl:refusals<=150%"], ("--select", "between 0 and 1")),
        (["--storage", "mysq1://db"], ("storage url", "mysq1")),
    ],
    ids=lambda value: "_".join(value) if isinstance(value, list) else None,
)
def test_invalid_values_are_refused_before_the_model_loads(
    blasphemer: Callable[..., SimpleNamespace],
    tiny_a: Path,
    tmp_path: Path,
    args: list[str],
    needles: Sequence[str],
) -> None:
    result = blasphemer("run", tiny_a, *FAST, *args)
    _assert_one_line_error(result, *needles)
    assert "[2/10]" not in result.out  # stopped before loading
    assert not (tmp_path / "blasphemer-runs").exists()


@pytest.mark.parametrize(
    ("variable", "value", "needles"),
    [
        ("BLASPHEMER_N_TRIALS", "many", ("--n-trials", "integer")),
        ("BLASPHEMER_YES", "perhaps", ("--yes", "boolean")),
        ("BLASPHEMER_DTYPES", "float32", ("BLASPHEMER_DTYPES", "JSON")),
    ],
)
def test_invalid_environment_values(
    blasphemer: Callable[..., SimpleNamespace],
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    value: str,
    needles: Sequence[str],
) -> None:
    monkeypatch.setenv(variable, value)
    _assert_one_line_error(blasphemer("run", "m/x"), *needles)


@pytest.mark.parametrize("side", ["harmful", "harmless"])
@pytest.mark.parametrize("content", ["", "\n  \n\n"], ids=["empty", "blank-lines"])
def test_empty_prompt_set(
    blasphemer: Callable[..., SimpleNamespace],
    tiny_a: Path,
    tmp_path: Path,
    side: str,
    content: str,
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(content)
    result = blasphemer("run", tiny_a, *FAST, f"--{side}", prompts, "--yes")
    _assert_one_line_error(result, "prompts.txt", "no prompts")


def test_missing_prompt_file(
    blasphemer: Callable[..., SimpleNamespace], tiny_a: Path, tmp_path: Path
) -> None:
    result = blasphemer("run", tiny_a, *FAST, "--harmful", tmp_path / "absent.txt")
    _assert_one_line_error(result, "absent.txt", "not found")


def test_study_of_another_model_in_the_same_storage(
    blasphemer: Callable[..., SimpleNamespace], tiny_a: Path, tiny_b: Path, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    shared = ["--storage", url, "--study-name", "shared", "--n-trials", "1", "--yes"]
    first = blasphemer("run", tiny_a, *FAST, *shared, "--output-dir", tmp_path / "out-a")
    assert first.code == 0, first.err
    before = _trials(url, "shared")
    result = blasphemer("run", tiny_b, *FAST, *shared, "--output-dir", tmp_path / "out-b")
    _assert_one_line_error(result, "study 'shared'", "another setup", "model_id", "--no-resume")
    assert _trials(url, "shared") == before  # the other model's study is untouched
    assert not (tmp_path / "out-b").exists()


def test_output_dir_without_write_permission(
    blasphemer: Callable[..., SimpleNamespace], tiny_a: Path
) -> None:
    # Tests run as root, for whom permission bits do not stop writes; /proc refuses everyone.
    result = blasphemer("run", tiny_a, *FAST, "--output-dir", "/proc/blasphemer-test/out")
    _assert_one_line_error(result, "/proc/blasphemer-test/out", "cannot write")


@pytest.mark.parametrize("inside", ["", "merged", ".."], ids=["same", "inside", "holds"])
def test_output_dir_is_the_source_model(
    blasphemer: Callable[..., SimpleNamespace], tiny_a: Path, inside: str
) -> None:
    files = sorted(p.name for p in tiny_a.iterdir())
    result = blasphemer("run", tiny_a, *FAST, "--output-dir", tiny_a / inside)
    _assert_one_line_error(result, "--output-dir", "source model")
    assert sorted(p.name for p in tiny_a.iterdir()) == files


def test_output_dir_that_is_a_file_or_holds_foreign_files(
    blasphemer: Callable[..., SimpleNamespace], tiny_a: Path, tmp_path: Path
) -> None:
    (tmp_path / "file").write_text("x")
    result = blasphemer("run", tiny_a, *FAST, "--output-dir", tmp_path / "file")
    _assert_one_line_error(result, "is a file")
    (tmp_path / "thesis").mkdir()
    (tmp_path / "thesis" / "chapter1.tex").write_text("x")
    result = blasphemer("run", tiny_a, *FAST, "--output-dir", tmp_path / "thesis")
    _assert_one_line_error(result, "thesis", "did not write")
    assert (tmp_path / "thesis" / "chapter1.tex").read_text() == "x"


def test_not_enough_memory(
    blasphemer: Callable[..., SimpleNamespace], tiny_a: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(preflight.psutil, "virtual_memory", lambda: SimpleNamespace(available=1024))
    result = blasphemer("run", tiny_a, *FAST[:-4], "--device-map", "cpu")
    line = _assert_one_line_error(result, "will not fit", "available 0.00 GiB", "--dtypes")
    assert "in memory" in line
    assert "[2/10]" not in result.out


def test_not_enough_disk(
    blasphemer: Callable[..., SimpleNamespace], tiny_a: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        preflight.shutil, "disk_usage", lambda _path: SimpleNamespace(total=1, used=1, free=0)
    )
    result = blasphemer("run", tiny_a, *FAST)
    _assert_one_line_error(result, "not enough disk", "--output-dir")


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["evaluate", "m/x"], ("--base",)),
        (["evaluate", "{tmp}/nowhere", "--base", "{tmp}/nowhere"], ("nowhere", "does not exist")),
        (["chat", "{tmp}/nowhere"], ("nowhere", "does not exist")),
        (["inspect", "{tmp}", "--json"], ("not a model",)),
        (["worker"], ("--storage", "--study-name")),
        (["status", "--storage", "sqlite:///{tmp}/s.db", "--study-name", "x"], ("no study 'x'",)),
        (["status", "--storage", "nosuchdb://x", "--study-name", "x"], ("storage url",)),
    ],
    ids=["evaluate-no-base", "evaluate-missing", "chat", "inspect", "worker", "status", "url"],
)
def test_other_commands_refuse_bad_input(
    blasphemer: Callable[..., SimpleNamespace],
    tmp_path: Path,
    args: list[str],
    needles: Sequence[str],
) -> None:
    result = blasphemer(*(a.replace("{tmp}", str(tmp_path)) for a in args))
    _assert_one_line_error(result, *needles)


def test_unreachable_hub_is_one_line_too(blasphemer: Callable[..., SimpleNamespace]) -> None:
    import logging

    blasphemer("--version")
    # The hub client logs every HTTP retry as a warning; the CLI keeps only its own error line.
    assert logging.getLogger("huggingface_hub").getEffectiveLevel() >= logging.ERROR


@pytest.mark.parametrize(
    "args",
    [["run", "/nonexistent/model-folder"], ["run", "no-such-owner/no-such-model", "--yes"]],
    ids=["path", "hub-id-offline"],
)
def test_console_script_prints_one_line(args: list[str], tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("blasphemer")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [str(script), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    result = SimpleNamespace(code=done.returncode, out=done.stdout, err=done.stderr)
    _assert_one_line_error(result, args[1])
