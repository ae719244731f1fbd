"""Preflight memory accounting (the CLI tests cover the errors it raises)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from blasphemer import preflight
from blasphemer.preflight import Budget

GIB = 2**30


def test_summary_names_where_the_available_memory_is() -> None:
    cpu = Budget(
        weights_on_disk=GIB,
        weights_in_memory=2 * GIB,
        ram_available=8 * GIB,
        disk_available=None,
    )
    assert cpu.summary() == "weights 2.00 GiB in memory; available 8.00 GiB (RAM)"
    gpu = Budget(
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
        budget = preflight.estimate(tmp_path, ["auto"], device_map, "none")
        assert (budget.ram_available, budget.gpu_available) == (GIB, gpu)
        assert budget.memory_available == GIB + gpu
