"""The bundled demo model: a small Llama chat model that refuses harmful requests.

It lets every command run end to end, offline, in minutes on a CPU, with real refusal behaviour
to remove. :mod:`tools.demo_model.train` trains it from scratch (seeded, CPU only) on the
fit split of the bundled prompt sets; :mod:`tools.demo_model.evaluate` measures it. This training
code is not shipped in the wheel; only the trained files in ``blasphemer/data/demo-model`` are.
Run it from the repository root: ``python -m tools.demo_model.train --output DIR``.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

DEMO_MODEL_PATH: Path = Path(str(importlib.resources.files("blasphemer"))) / "data" / "demo-model"
"""Folder of the committed model; load it like any hub model (``from_pretrained``)."""

__all__ = ["DEMO_MODEL_PATH"]
