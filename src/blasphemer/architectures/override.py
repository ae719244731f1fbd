"""User architecture overrides: a TOML (or JSON) file read into an :class:`ArchitectureSpec`,
and a spec written back as TOML (a starting point for a new override file).

Every problem with the file raises :class:`~blasphemer.errors.ConfigError` with one line naming
the file, the key and the fix.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from blasphemer.architectures.base import ArchitectureSpec, ComponentKind, Layout, WriterSpec
from blasphemer.errors import ConfigError

_TOP_KEYS = ("name", "layers", "embeddings", "writers")
_WRITER_KEYS = (
    "kind", "module", "layout", "weight", "bias", "optional", "post_norm", "post_norm_offset"
)  # fmt: skip


def load_override(path: Path | str) -> ArchitectureSpec:
    """Read a user override (TOML, or JSON by ``.json`` suffix) into an :class:`ArchitectureSpec`.

    Raises :class:`ConfigError` with a one-line message for unreadable or invalid files.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(
            f"cannot read architecture override {path}: {error.strerror}; check the path"
        ) from error
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"architecture override {path} is not UTF-8 text ({error.reason} at byte "
            f"{error.start}); save it as UTF-8"
        ) from error
    is_json = path.suffix.lower() == ".json"
    try:
        data = json.loads(text) if is_json else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as error:
        reason = str(error).splitlines()[0]
        raise ConfigError(
            f"architecture override {path} is not valid {'JSON' if is_json else 'TOML'}: {reason}"
        ) from error
    return spec_from_dict(data, source=str(path))


def spec_from_dict(data: Any, source: str = "override") -> ArchitectureSpec:
    """Validate a parsed override document and build its spec (``ConfigError`` on problems)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a table with 'layers' and [[writers]]")
    _check_keys(data, _TOP_KEYS, source)
    writers = data.get("writers")
    if not isinstance(writers, list) or not writers:
        raise ConfigError(f"{source}: add at least one [[writers]] table (kind, module, layout)")
    return ArchitectureSpec(
        name=_typed(data, "name", str, source, Path(source).stem),
        model_types=(),
        layers=_paths(data.get("layers"), "layers", source),
        writers=tuple(
            _writer_from_dict(w, f"{source} writers[{i}]") for i, w in enumerate(writers)
        ),
        embeddings=_paths(data.get("embeddings", []), "embeddings", source, allow_empty=True),
    )


def _writer_from_dict(data: Any, source: str) -> WriterSpec:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: each writer must be a table")
    _check_keys(data, _WRITER_KEYS, source)
    kinds = {kind.value: kind for kind in ComponentKind}
    layouts = {layout.value: layout for layout in Layout}
    kind = data.get("kind")
    if kind not in kinds:
        raise ConfigError(f"{source}: kind must be one of {sorted(kinds)}, got {kind!r}")
    layout = data.get("layout", Layout.OUT_IN.value)
    if layout not in layouts:
        raise ConfigError(f"{source}: layout must be one of {sorted(layouts)}, got {layout!r}")
    offset = data.get("post_norm_offset", 0.0)
    if isinstance(offset, bool) or not isinstance(offset, int | float):
        raise ConfigError(f"{source}: post_norm_offset must be a number, got {offset!r}")
    return WriterSpec(
        kind=kinds[kind],
        module=_paths(data.get("module"), "module", source),
        layout=layouts[layout],
        weight=_typed(data, "weight", str, source, "weight"),
        bias=_typed(data, "bias", str, source, "bias"),
        optional=_typed(data, "optional", bool, source, False),
        post_norm=_typed(data, "post_norm", str, source, None),
        post_norm_offset=float(offset),
    )


def _check_keys(data: Mapping[str, Any], allowed: tuple[str, ...], source: str) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]!r}; allowed: {', '.join(allowed)}")


def _typed(data: Mapping[str, Any], key: str, kind: type, source: str, default: Any) -> Any:
    value = data.get(key, default)
    if value is not default and not isinstance(value, kind):
        raise ConfigError(f"{source}: {key} must be a {kind.__name__}, got {value!r}")
    return value


def _paths(value: Any, key: str, source: str, allow_empty: bool = False) -> tuple[str, ...]:
    paths = [value] if isinstance(value, str) else value
    valid = isinstance(paths, list) and all(isinstance(p, str) and p.strip() for p in paths)
    if not valid or (not paths and not allow_empty):
        raise ConfigError(
            f"{source}: {key} must be a dotted module path or a list of them, got {value!r}"
        )
    return tuple(p.strip() for p in paths)


def dump_override(spec: ArchitectureSpec) -> str:
    """Render ``spec`` as an override TOML file (e.g. to start from a guessed mapping)."""

    def paths(values: tuple[str, ...]) -> str:
        return json.dumps(values[0]) if len(values) == 1 else json.dumps(list(values))

    lines = [f"name = {json.dumps(spec.name)}", f"layers = {paths(spec.layers)}"]
    if spec.embeddings:
        lines.append(f"embeddings = {paths(spec.embeddings)}")
    for writer in spec.writers:
        lines += [
            "",
            "[[writers]]",
            f"kind = {json.dumps(writer.kind.value)}",
            f"module = {paths(writer.module)}",
            f"layout = {json.dumps(writer.layout.value)}",
            f"weight = {json.dumps(writer.weight)}",
            f"bias = {json.dumps(writer.bias)}",
            f"optional = {'true' if writer.optional else 'false'}",
        ]
        if writer.post_norm is not None:
            lines.append(f"post_norm = {json.dumps(writer.post_norm)}")
            lines.append(f"post_norm_offset = {writer.post_norm_offset!r}")
    return "\n".join(lines) + "\n"
