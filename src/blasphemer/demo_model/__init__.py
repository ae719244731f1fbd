"""The bundled demo model: a small Llama chat model that refuses harmful requests.

It lets every command run end to end, offline, in minutes on a CPU, with real refusal behaviour
to remove. :mod:`blasphemer.demo_model.train` trains it from scratch (seeded, CPU only) on the
fit split of the bundled prompt sets; :mod:`blasphemer.demo_model.evaluate` measures it.
"""

from __future__ import annotations

from pathlib import Path

DEMO_MODEL_PATH: Path = Path(__file__).resolve().parent.parent / "data" / "demo-model"
"""Folder of the committed model; load it like any hub model (``from_pretrained``)."""

__all__ = ["DEMO_MODEL_PATH"]
