"""Blasphemer: fully automatic removal of refusal behaviour by directional ablation.

The public names are imported on first use, so that ``import blasphemer`` (and the command
line's ``--help``) does not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from blasphemer.ablation import AblationParameters, KernelParameters
    from blasphemer.editing import EditHandle, apply_ablation, merge_ablation
    from blasphemer.errors import BlasphemerError

__all__ = [
    "AblationParameters",
    "BlasphemerError",
    "EditHandle",
    "KernelParameters",
    "apply_ablation",
    "merge_ablation",
]
__version__ = "0.1.0"

_HOMES = {
    "AblationParameters": "blasphemer.ablation",
    "KernelParameters": "blasphemer.ablation",
    "EditHandle": "blasphemer.editing",
    "apply_ablation": "blasphemer.editing",
    "merge_ablation": "blasphemer.editing",
    "BlasphemerError": "blasphemer.errors",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'blasphemer' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
