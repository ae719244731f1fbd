"""One exception hierarchy. Every message names the problem *and* the fix, in one line.

The command line turns a :class:`BlasphemerError` into that one line and a non-zero exit code;
tracebacks are shown only with ``--debug``.
"""

from __future__ import annotations


class BlasphemerError(Exception):
    """Base of every error Blasphemer raises on purpose; ``exit_code`` is what the CLI returns."""

    exit_code = 1


class ConfigError(BlasphemerError):
    """Invalid settings, options or configuration files."""

    exit_code = 2


class ModelLoadError(BlasphemerError):
    """The model or tokenizer cannot be loaded (missing path, not a model, bad dtype, ...)."""


class UnsupportedArchitectureError(BlasphemerError):
    """No registry entry matches and the structural guess failed."""


class DatasetError(BlasphemerError):
    """A prompt set is missing, empty, malformed or too small for the requested split."""


class StorageError(BlasphemerError):
    """The study storage is unreachable, or holds a study of another model or settings."""


class ExportError(BlasphemerError):
    """The merged model cannot be written (permissions, output over the source, ...)."""
