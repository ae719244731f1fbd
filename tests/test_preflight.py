"""Preflight: memory accounting, storage, folders and model files (the CLI tests cover how
its errors reach the user)."""

from __future__ import annotations

import socket
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from blasphemer.app import preflight
from blasphemer.app.preflight import MemoryEstimate
from blasphemer.errors import ConfigError, ModelLoadError, StorageError

GIB = 2**30


def test_summary_names_where_the_available_memory_is() -> None:
    cpu = MemoryEstimate(
        weights_on_disk=GIB,
        weights_in_memory=2 * GIB,
        ram_available=8 * GIB,
        disk_available=None,
    )
    assert cpu.summary() == "weights 2.00 GiB in memory; available 8.00 GiB (RAM)"
    gpu = MemoryEstimate(
        weights_on_disk=GIB,
        weights_in_memory=2 * GIB,
        ram_available=8 * GIB,
        disk_available=None,
        gpu_available=80 * GIB,
    )
    assert gpu.summary().endswith("available 88.00 GiB (GPU 80.00 GiB + RAM 8.00 GiB)")


def test_gpu_memory_counts_only_when_the_device_map_may_use_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(preflight.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(preflight.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(preflight.torch.cuda, "mem_get_info", lambda i: ((i + 1) * GIB, 99 * GIB))
    assert preflight.gpu_memory_available("auto") == 3 * GIB
    assert preflight.gpu_memory_available("cpu") == 0
    monkeypatch.setattr(preflight.psutil, "virtual_memory", lambda: SimpleNamespace(available=GIB))
    for device_map, gpu in (("auto", 3 * GIB), ("cpu", 0)):
        memory = preflight.estimate(tmp_path, ["auto"], device_map, "none")
        assert (memory.ram_available, memory.gpu_available) == (GIB, gpu)
        assert memory.memory_available == GIB + gpu


# --- storage, folders and model files: checked before the model loads ----------------------------


def test_sqlite_storage_checks_create_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new' / 'deeper' / 'study.db'}"
    preflight.check_storage(url)
    assert list(tmp_path.iterdir()) == []  # the folder is probed, not created
    existing = tmp_path / "ok.db"
    sqlite3.connect(existing).close()
    existing.write_bytes(b"")  # an empty file is a fresh database to SQLite
    preflight.check_storage(f"sqlite:///{existing}")
    preflight.check_storage("sqlite:///:memory:")


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda t: f"sqlite:///{t}", "names a folder"),
        (lambda t: f"sqlite:///{_text(t / 'a.db')}", "not an SQLite database"),
        (lambda t: "sqlite:////proc/blasphemer-test/s.db", "not writable"),
        (lambda t: "nosuchdb://x", "cannot use storage URL"),
    ],
    ids=["folder", "not-sqlite", "unwritable", "dialect"],
)
def test_bad_sqlite_storage(tmp_path: Path, make: Callable[[Path], str], needle: str) -> None:
    with pytest.raises(StorageError, match=needle):
        preflight.check_storage(make(tmp_path))


def _text(path: Path) -> Path:
    path.write_text("not a database")
    return path


def test_a_silent_server_times_out_in_seconds() -> None:
    # A loopback socket that accepts connections and never answers: only the timeout ends it.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(StorageError, match="timeout") as error:
            preflight.check_storage(f"postgresql://u:pw-9@127.0.0.1:{port}/db", timeout_s=1)
        assert time.monotonic() - started < 4
    assert "pw-9" not in str(error.value) and "u:***@" in str(error.value)


def test_writable_folder_check(tmp_path: Path) -> None:
    preflight.check_writable_folder(tmp_path / "a" / "b", "--run-dir")
    assert not (tmp_path / "a").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        preflight.check_writable_folder(tmp_path / "file", "--run-dir")
    with pytest.raises(ConfigError, match="cannot write"):
        preflight.check_writable_folder(Path("/proc/blasphemer-test"), "--run-dir")


def test_weight_headers_are_checked_without_loading(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(4, 4)}, tmp_path / "model-00001.safetensors")
    preflight.check_weight_files(tmp_path)
    whole = (tmp_path / "model-00001.safetensors").read_bytes()
    (tmp_path / "model-00002.safetensors").write_bytes(whole[:-8])
    with pytest.raises(ModelLoadError, match=r"model-00002\.safetensors is corrupt or truncated"):
        preflight.check_weight_files(tmp_path)


@pytest.mark.parametrize(
    "content", [b"\xff\xfe{", b'{"model_type": ', b"[1, 2]"], ids=["binary", "cut", "list"]
)
def test_config_file_must_be_a_json_object(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        preflight.check_model_path(str(tmp_path))


def test_the_judge_is_checked_only_when_a_run_asks_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from blasphemer.evaluation import semantic

    missing = str(tmp_path / "no-encoder")
    preflight.check_judge("markers", "markers", missing)  # markers only: nothing to check
    for judge, search_judge in (("both", "markers"), ("markers", "semantic")):
        with pytest.raises(ConfigError, match=r"--judge-encoder .*no-encoder"):
            preflight.check_judge(judge, search_judge, missing)
    preflight.check_judge("semantic", "markers", "sentence-transformers/all-MiniLM-L6-v2")
    garbage = tmp_path / "judge.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    monkeypatch.setattr(semantic, "default_head", lambda: garbage)
    with pytest.raises(ConfigError, match="corrupt"):
        preflight.check_judge("both", "markers", "sentence-transformers/all-MiniLM-L6-v2")
