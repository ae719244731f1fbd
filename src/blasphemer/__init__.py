"""Blasphemer: fully automatic removal of refusal behaviour by directional ablation.

The public names are imported on first use, so that ``import blasphemer`` (and the command
line's ``--help``) does not pay for torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from blasphemer._lazy import lazy_exports

if TYPE_CHECKING:
    from blasphemer.ablation import AblationParameters, KernelParameters
    from blasphemer.editing import Ablation, EditHandle, apply_ablation, merge_ablation
    from blasphemer.errors import BlasphemerError

__all__ = [
    "Ablation",
    "AblationParameters",
    "BlasphemerError",
    "EditHandle",
    "KernelParameters",
    "apply_ablation",
    "merge_ablation",
]
__version__ = "0.1.0"

__getattr__ = lazy_exports(
    __name__,
    {
        "blasphemer.ablation": ["AblationParameters", "KernelParameters"],
        "blasphemer.editing": ["Ablation", "EditHandle", "apply_ablation", "merge_ablation"],
        "blasphemer.errors": ["BlasphemerError"],
    },
)
