"""Where a model writes into its residual stream: registry, resolution, structural guess, override.

``resolve(model)`` returns a :class:`ModelMap` (decoder layers and, per layer, every writer);
``describe(model_map)`` turns it into JSON for ``blasphemer inspect``.
"""

from blasphemer.architectures.base import (
    ArchitectureSpec,
    ComponentKind,
    Layout,
    ModelMap,
    PostNorm,
    Writer,
    WriterSpec,
)
from blasphemer.architectures.override import dump_override, load_override, spec_from_dict
from blasphemer.architectures.registry import REGISTRY, spec_for_model_types
from blasphemer.architectures.resolve import describe, guess_spec, model_types, resolve

__all__ = [
    "REGISTRY",
    "ArchitectureSpec",
    "ComponentKind",
    "Layout",
    "ModelMap",
    "PostNorm",
    "Writer",
    "WriterSpec",
    "describe",
    "dump_override",
    "guess_spec",
    "load_override",
    "model_types",
    "resolve",
    "spec_for_model_types",
    "spec_from_dict",
]
