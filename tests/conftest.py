"""Shared fixtures: the bundled demo model, and a throwaway PostgreSQL server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from blasphemer.app.pipeline import demo_model_path

torch.set_num_threads(1)  # one thread was measured faster than two on the CI machine
os.environ.setdefault("OMP_NUM_THREADS", "1")

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "refusal_direction"


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    """The bundled demo model (``BLASPHEMER_TEST_DEMO_MODEL`` points elsewhere, for development)."""
    override = os.environ.get("BLASPHEMER_TEST_DEMO_MODEL")
    path = Path(override) if override else demo_model_path()
    assert (path / "config.json").is_file(), f"demo model missing at {path}"
    return path


@pytest.fixture(scope="session")
def postgres() -> Iterator[object]:
    """A PostgreSQL cluster on 127.0.0.1 for the whole session, stopped at the end."""
    from postgres_server import PostgresServer

    server = PostgresServer.start()
    try:
        yield server
    finally:
        server.stop()
