"""Blasphemer: fully automatic removal of refusal behaviour by directional ablation."""

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
