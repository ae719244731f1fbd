"""Fail fast: every input a run is given is checked before the model loads, and each bad one
ends in one ``error:`` line and a non-zero exit (split from ``test_cli.py``, whose helpers and
tiny chat models these tests share)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import test_cli
from blasphemer import loading
from test_cli import FAST, _assert_one_line_error

# test_cli's fixtures, bound here so that pytest finds them (``_isolated`` is autouse).
blasphemer = test_cli.blasphemer
tiny_a = test_cli.tiny_a
_isolated = test_cli._isolated

# --- fail fast: every input checked before the model loads --------------------------------------

PASSWORD = "s3cret-pw"  # pragma: allowlist secret - a test value that must never be printed


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything tries to load a model."""

    def refuse(*args: object, **kwargs: object) -> None:
        pytest.fail("the model loader was called before preflight refused the input")

    monkeypatch.setattr(loading, "load_model", refuse)


def _write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def _prompt_lines(count: int) -> str:
    return "".join(f"Explain topic number {i} in detail.\n" for i in range(count))


def _copy_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def _edit_config(folder: Path, **changes: Any) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _weights(folder: Path) -> Path:
    return folder / "model.safetensors"


# Each case: (id, setup(tmp, model) -> extra args, needles). The args follow `run MODEL FAST`.
_Setup = Callable[[Path, Path], list[str | Path]]
_PREFLIGHT_CASES: list[tuple[str, _Setup, tuple[str, ...]]] = [
    (
        "postgres-closed-port",
        lambda t, m: ["--storage", f"postgresql://u:{PASSWORD}@127.0.0.1:{_closed_port()}/db"],
        ("cannot reach study storage", "127.0.0.1", "***"),
    ),
    (
        "postgres-password-in-query",
        lambda t, m: [
            "--storage",
            f"postgresql://u@127.0.0.1:{_closed_port()}/db?password={PASSWORD}",
        ],
        ("cannot reach study storage",),
    ),
    (
        "sqlite-unwritable-folder",
        lambda t, m: ["--storage", "sqlite:////proc/blasphemer-test/study.db"],
        ("/proc/blasphemer-test", "not writable"),
    ),
    ("sqlite-is-a-folder", lambda t, m: ["--storage", f"sqlite:///{t}"], ("names a folder",)),
    (
        "sqlite-not-a-database",
        lambda t, m: ["--storage", f"sqlite:///{_write(t / 'notes.db', 'my notes')}"],
        ("notes.db", "not an sqlite database"),
    ),
    (
        "run-dir-is-a-file",
        lambda t, m: ["--run-dir", _write(t / "runs", "x")],
        ("--run-dir", "is a file"),
    ),
    (
        "run-dir-unwritable",
        lambda t, m: ["--run-dir", "/proc/blasphemer-test"],
        ("--run-dir", "cannot write"),
    ),
    (
        "prompts-not-utf8",
        lambda t, m: [
            "--harmful",
            _write(t / "latin.txt", "caf\xe9 na\xefve\n".encode("latin-1") * 9),
        ],
        ("latin.txt", "utf-8"),
    ),
    (
        "prompts-json-wrong-column",
        lambda t, m: ["--harmful", _write(t / "p.json", json.dumps([{"question": "q"}] * 9))],
        ("p.json", "no column", "question"),
    ),
    (
        "prompts-json-strings-with-column",
        lambda t, m: [
            "--harmful",
            _write(t / "s.json", json.dumps(["a", "b", "c"])),
            "--harmful-column",
            "text",
        ],
        ("s.json", "plain strings"),
    ),
    (
        "prompts-jsonl-bad-line",
        lambda t, m: ["--harmless", _write(t / "p.jsonl", '{"text": "a"}\n{"text": \n')],
        ("p.jsonl", "line 2"),
    ),
    (
        "prompts-csv-without-text-column",
        lambda t, m: ["--harmful", _write(t / "p.csv", "id,label\n1,x\n2,y\n")],
        ("p.csv", "no column named"),
    ),
    (
        "prompts-parquet-garbage",
        lambda t, m: ["--harmful", _write(t / "p.parquet", b"PAR1 not really")],
        ("p.parquet", "parquet"),
    ),
    (
        "prompts-unsupported-type",
        lambda t, m: ["--harmful", _write(t / "prompts.docx", "x")],
        ("prompts.docx", "unsupported type"),
    ),
    (
        "prompts-too-few",
        lambda t, m: ["--harmful", _write(t / "two.txt", "one\ntwo\n")],
        ("two.txt", "2 distinct prompts", "at least 3"),
    ),
    (
        "harmless-all-overlap-harmful",
        lambda t, m: [
            "--harmful",
            _write(t / "same.txt", _prompt_lines(6)),
            "--harmless",
            t / "same.txt",
        ],
        ("empty after removing overlaps",),
    ),
    (
        "override-missing",
        lambda t, m: ["--architecture-override", t / "absent.toml"],
        ("architecture override", "absent.toml"),
    ),
    (
        "override-bad-toml",
        lambda t, m: ["--architecture-override", _write(t / "o.toml", "layers = [")],
        ("o.toml", "not valid toml"),
    ),
    (
        "override-unknown-key",
        lambda t, m: ["--architecture-override", _write(t / "o.toml", 'layerz = "model.layers"\n')],
        ("o.toml", "unknown key", "layerz"),
    ),
    (
        "scorer-file-missing",
        lambda t, m: ["--scorers", t / "mine.py"],
        ("scorer file", "mine.py", "not found"),
    ),
    ("select-bad-syntax", lambda t, m: ["--select", "lowest-kl:refusals=>0.1"], ("--select",)),
    (
        "judge-encoder-missing",
        lambda t, m: ["--judge", "both", "--judge-encoder", t / "no-encoder"],
        ("--judge-encoder", "no-encoder", "--judge markers"),
    ),
    (
        "search-judge-encoder-not-a-model",
        lambda t, m: [
            "--search-judge",
            "semantic",
            "--judge-encoder",
            _write(t / "encoder.txt", "x").parent,
        ],
        ("--judge-encoder", "no config.json"),
    ),
]


@pytest.mark.parametrize(
    ("setup", "needles"),
    [pytest.param(setup, needles, id=name) for name, setup, needles in _PREFLIGHT_CASES],
)
def test_preflight_refuses_bad_input_before_loading_the_model(
    blasphemer: Callable[..., SimpleNamespace],
    no_model_load: None,
    tiny_a: Path,
    tmp_path: Path,
    setup: _Setup,
    needles: Sequence[str],
) -> None:
    result = blasphemer("run", tiny_a, *FAST, "--yes", *setup(tmp_path, tiny_a))
    _assert_one_line_error(result, *needles)
    assert PASSWORD not in result.err + result.out
    assert "[2/10]" not in result.out
    assert not (tmp_path / "blasphemer-runs").exists()  # no study, no run folder


_MODEL_FILE_CASES: list[tuple[str, Callable[[Path], None], tuple[str, ...], bool]] = [
    # (id, damage the model folder, needles, refused by preflight before loading)
    (
        "random-weights",
        lambda d: _write(_weights(d), os.urandom(4096)),
        ("model.safetensors", "corrupt", "download"),
        True,
    ),
    (
        "truncated-weights",
        lambda d: _write(_weights(d), _weights(d).read_bytes()[:-64]),
        ("model.safetensors", "truncated"),
        True,
    ),
    ("empty-weights", lambda d: _write(_weights(d), b""), ("model.safetensors", "corrupt"), True),
    (
        "missing-layers",
        lambda d: _edit_config(d, num_hidden_layers=3),
        ("lack model.layers.2", "config.json"),
        False,
    ),
    (
        "other-shapes",
        lambda d: _edit_config(d, intermediate_size=64),
        ("other shapes", "config.json"),
        False,
    ),
    (
        "config-wrong-type",
        lambda d: _edit_config(d, hidden_size="big"),
        ("config.json", "hidden_size"),
        False,
    ),
    (
        "config-not-json",
        lambda d: _write(d / "config.json", os.urandom(64)),
        ("config.json", "json"),
        True,
    ),
    (
        "no-tokenizer",
        lambda d: [p.unlink() for p in d.iterdir() if p.name.startswith(("tokenizer", "special"))],
        ("tokenizer",),
        False,
    ),
]


@pytest.mark.parametrize(
    ("damage", "needles", "before_loading"),
    [pytest.param(d, n, b, id=name) for name, d, n, b in _MODEL_FILE_CASES],
)
def test_broken_model_files_are_one_line(
    blasphemer: Callable[..., SimpleNamespace],
    monkeypatch: pytest.MonkeyPatch,
    tiny_a: Path,
    tmp_path: Path,
    damage: Callable[[Path], None],
    needles: Sequence[str],
    before_loading: bool,
) -> None:
    model = _copy_model(tiny_a, tmp_path / "damaged")
    damage(model)
    if before_loading:
        monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    result = blasphemer("run", model, *FAST, "--yes")
    _assert_one_line_error(result, *needles)
    assert "[5/10]" not in result.out


@pytest.mark.parametrize("command", ["worker", "status"])
def test_worker_and_status_fail_fast_on_unreachable_storage(
    blasphemer: Callable[..., SimpleNamespace], no_model_load: None, command: str
) -> None:
    url = f"postgresql://u:{PASSWORD}@127.0.0.1:{_closed_port()}/db"
    started = time.monotonic()
    result = blasphemer(command, "--storage", url, "--study-name", "s")
    elapsed = time.monotonic() - started
    _assert_one_line_error(result, "cannot reach study storage")
    assert PASSWORD not in result.err + result.out
    assert elapsed < 5, elapsed  # one refused connect, not open_storage's 8 s of retries


def test_unreachable_storage_fails_in_seconds_before_the_model_loads(
    blasphemer: Callable[..., SimpleNamespace], no_model_load: None, tiny_a: Path, tmp_path: Path
) -> None:
    url = f"postgresql://u:{PASSWORD}@127.0.0.1:{_closed_port()}/db"
    started = time.monotonic()
    result = blasphemer("run", tiny_a, *FAST, "--yes", "--storage", url)
    elapsed = time.monotonic() - started
    _assert_one_line_error(result, "cannot reach study storage")
    assert elapsed < 5, elapsed
    assert "[1/10] Preflight" in result.out and "[2/10]" not in result.out


def test_a_study_is_not_created_when_preflight_fails(
    blasphemer: Callable[..., SimpleNamespace], no_model_load: None, tiny_a: Path, tmp_path: Path
) -> None:
    database = tmp_path / "study.db"
    result = blasphemer(
        "run", tiny_a, *FAST, "--storage", f"sqlite:///{database}", "--harmful", tmp_path / "x.txt"
    )
    _assert_one_line_error(result, "x.txt", "not found")
    assert not database.exists()


def test_bad_input_coverage_is_at_least_25_cases() -> None:
    assert len(_PREFLIGHT_CASES) + len(_MODEL_FILE_CASES) + 3 >= 25
