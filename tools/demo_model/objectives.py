"""Training objectives that shape the geometry directional ablation relies on (pure torch).

:func:`geometry_penalty` puts harmless prompts near zero along the refusal direction;
:class:`RunningDirection` tracks that direction during training; :func:`without_direction`
removes it from every writer for the ablation loss.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import LlamaForCausalLM


def geometry_penalty(
    harmful: torch.Tensor, harmless: torch.Tensor, per_prompt: bool = False
) -> torch.Tensor:
    """How far the harmless mean sits from zero along the difference-of-means direction.

    The projection is measured in units of the class separation, so the penalty is free of the
    activations' scale; direction and separation are constants (detached) of the step, and the
    Huber form keeps early, poorly separated steps from swamping the answer loss.
    """
    difference = (harmful.mean(0) - harmless.mean(0)).detach()
    separation = difference.norm().clamp_min(1e-6)
    points = harmless if per_prompt else harmless.mean(0, keepdim=True)
    ratio = (points @ difference) / separation.square()
    return torch.nn.functional.huber_loss(ratio, torch.zeros_like(ratio), delta=1.0)


class RunningDirection:
    """Difference of exponentially averaged class means of last-prompt states, per layer."""

    def __init__(self, decay: float = 0.9) -> None:
        self.decay = decay
        self.means: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, layer: int, harmful: torch.Tensor, harmless: torch.Tensor) -> torch.Tensor:
        """Fold in one batch's states; return the current unit direction (no gradient)."""
        batch = (harmful.detach().mean(0), harmless.detach().mean(0))
        if layer in self.means:
            batch = (
                self.decay * self.means[layer][0] + (1 - self.decay) * batch[0],
                self.decay * self.means[layer][1] + (1 - self.decay) * batch[1],
            )
        self.means[layer] = batch
        difference = batch[0] - batch[1]
        return difference / difference.norm().clamp_min(1e-6)


@contextmanager
def without_direction(model: LlamaForCausalLM, direction: torch.Tensor) -> Iterator[None]:
    """Project ``direction`` out of every attention-out and MLP-down output (training only)."""

    def hook(_module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
        return output - (output @ direction).unsqueeze(-1) * direction

    handles = []
    for layer in model.model.layers:
        handles.append(layer.self_attn.o_proj.register_forward_hook(hook))
        handles.append(layer.mlp.down_proj.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
