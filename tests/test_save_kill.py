"""A run killed (SIGKILL) while it saves leaves no half-written folder under the final name, and
the next run saves normally, cleaning up what the killed one left beside it.

The killed run is a real ``blasphemer run`` in a subprocess on a tiny model; a patch holds it at
the moment to kill (weights written into the staging folder, or the folder renamed into place
but results.json not yet written) and tells the test through a file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blasphemer import export
from blasphemer.app import cli
from test_cli import FAST, _save_chat_model

_CHILD = """
import sys, time
from pathlib import Path
import transformers
from blasphemer.app import cli, results

ready, where = Path(sys.argv[1]), sys.argv[2]

def hold() -> None:
    ready.write_text("ready")
    time.sleep(600)

if where == "weights":
    original = transformers.PreTrainedModel.save_pretrained
    def save_pretrained(self, *args, **kwargs):
        original(self, *args, **kwargs)
        hold()
    transformers.PreTrainedModel.save_pretrained = save_pretrained
else:
    results.write_results = lambda *args, **kwargs: hold()
sys.exit(cli.main(sys.argv[3:]))
"""


def _run_args(model: Path, tmp_path: Path) -> list[str]:
    return [
        "run", str(model), *FAST, "--n-trials", "1", "--yes", "--quiet",
        "--run-dir", str(tmp_path / "runs"), "--output-dir", str(tmp_path / "out"),
    ]  # fmt: skip


def _kill_while_saving(model: Path, tmp_path: Path, where: str) -> None:
    ready = tmp_path / f"ready-{where}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(ready), where, *_run_args(model, tmp_path)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    try:
        while not ready.exists():
            assert child.poll() is None, child.stderr.read() if child.stderr else b""
            assert time.monotonic() < deadline, "the child never reached the save"
            time.sleep(0.1)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL


def _leftovers(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out."))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_chat_model(tmp_path_factory.mktemp("models") / "tiny", seed=5)


def test_kill_while_writing_weights_leaves_no_folder_and_the_next_run_saves(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _kill_while_saving(tiny, tmp_path, "weights")
    assert not (tmp_path / "out").exists()  # nothing under the final name
    partial = _leftovers(tmp_path)
    assert len(partial) == 1 and partial[0].startswith(".out.partial-")
    assert (tmp_path / partial[0] / "model.safetensors").is_file()  # it was killed mid-save

    monkeypatch.chdir(tmp_path)
    assert cli.main(_run_args(tiny, tmp_path)) == 0
    assert (tmp_path / "out" / "results.json").is_file()
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert _leftovers(tmp_path) == []  # the killed run's staging folder is gone


def test_kill_before_results_json_lets_the_next_run_replace_the_folder(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _kill_while_saving(tiny, tmp_path, "results")
    out = tmp_path / "out"
    assert (out / "model.safetensors").is_file() and not (out / "results.json").exists()
    assert export.is_blasphemer_output(out)  # the marker says a later run may replace it

    monkeypatch.chdir(tmp_path)
    assert cli.main(_run_args(tiny, tmp_path)) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["chosen"]["number"] == 0
    assert _leftovers(tmp_path) == []


def test_leftovers_of_live_processes_are_kept(tmp_path: Path) -> None:
    target = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    for name in (
        f".out.partial-{dead}-abc",
        f".out.old-{dead}-def",
        f".out.partial-{os.getpid()}-x",
    ):
        (tmp_path / name).mkdir()
    (tmp_path / ".other.partial-1-x").mkdir()
    removed = export.clean_leftovers(target)
    assert sorted(p.name for p in removed) == [f".out.old-{dead}-def", f".out.partial-{dead}-abc"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".other.partial-1-x",
        f".out.partial-{os.getpid()}-x",
    ]
