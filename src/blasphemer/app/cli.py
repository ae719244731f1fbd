"""Command line: parse, build :class:`~blasphemer.app.config.Settings`, dispatch, exit code.

``blasphemer MODEL`` is short for ``blasphemer run MODEL``. Every option of ``run`` is generated
from the settings fields, so ``--help`` and ``config.default.toml`` never disagree with the code.
Errors Blasphemer raises on purpose become one line on standard error and a non-zero exit code;
tracebacks only with ``--debug``.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from blasphemer.app.config import Settings, load_settings
from blasphemer.app.console import Console
from blasphemer.errors import BlasphemerError, ConfigError

SUBCOMMANDS = (
    "run",
    "demo",
    "worker",
    "status",
    "evaluate",
    "chat",
    "inspect",
    "export-gguf",
    "judge",
)

# Settings that are positional or special per subcommand, not generated as --options.
_POSITIONAL = {"model"}


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError instead of printing usage and exiting."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(f"{message} (see `{self.prog} --help`)")


def _option_type(annotation: Any) -> tuple[Callable[[str], Any] | None, bool, bool]:
    """Map a field annotation to (argparse type, is_bool, is_list)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _option_type(args[0])
    if annotation is bool:
        return None, True, False
    if origin is list:
        inner, _, _ = _option_type(args[0])
        return inner, False, True
    if origin is typing.Literal:
        return str, False, False
    if annotation in (int, float, str, Path):
        return annotation, False, False
    return str, False, False


def _add_settings_options(
    parser: argparse.ArgumentParser, names: Sequence[str] | None = None
) -> None:
    for name, info in Settings.model_fields.items():
        if name in _POSITIONAL or (names is not None and name not in names):
            continue
        flag = "--" + name.replace("_", "-")
        kind, is_bool, is_list = _option_type(info.annotation)
        help_text = info.description or ""
        if is_bool or kind is None:
            parser.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif is_list:
            parser.add_argument(flag, dest=name, type=kind, nargs="+", default=None, help=help_text)
        else:
            choices = (
                typing.get_args(info.annotation)
                if typing.get_origin(info.annotation) is typing.Literal
                else None
            )
            parser.add_argument(
                flag, dest=name, type=kind, default=None, choices=choices, help=help_text
            )


def _add_preset_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset",
        default=None,
        help="Shipped settings for a kind of machine, beneath --config (cpu-small: a 0.5-1 B "
        "model on a small CPU).",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="blasphemer", description="Remove refusal behaviour from a language model."
    )
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        child = sub.add_parser(name, help=help_text, description=help_text)
        child.add_argument("--config", type=Path, default=None, help="TOML settings file.")
        return child

    run = command(
        "run", "Optimise an ablation of MODEL and save the chosen result (the default command)."
    )
    _add_preset_option(run)
    run.add_argument(
        "model", nargs="?", default=None, help="Hugging Face model id, local folder or .gguf file."
    )
    _add_settings_options(run)

    demo = command(
        "demo", "Run the main job on the bundled demo model (offline, a few minutes on a CPU)."
    )
    _add_settings_options(demo, ["n_trials", "seed", "output_dir", "quiet", "debug", "run_dir"])

    worker = command("worker", "Join a shared study and run trials until its budget is used up.")
    _add_settings_options(
        worker, ["storage", "study_name", "quiet", "debug", "batch_size", "device_map"]
    )

    status = command("status", "Show the workers, trials and current Pareto front of a study.")
    _add_settings_options(status, ["storage", "study_name", "debug", "run_dir"])

    evaluate = command("evaluate", "Score MODEL's refusals and KL divergence against --base.")
    evaluate.add_argument("model", help="Model to score.")
    _add_preset_option(evaluate)
    evaluate.add_argument(
        "--base", required=True, help="The original model it is compared with (or a .gguf file)."
    )
    evaluate.add_argument(
        "--base-gguf-file", default=None, help="Name of the .gguf file inside the --base folder."
    )
    evaluate.add_argument("--json", action="store_true", help="Print machine-readable JSON.")
    _add_settings_options(
        evaluate,
        [
            "harmful",
            "harmless",
            "harmful_column",
            "harmless_column",
            "system_prompt",
            "refusal_markers",
            "max_new_tokens",
            "n_report_prompts",
            "batch_size",
            "dtypes",
            "device_map",
            "debug",
            "split_seed",
            "gguf_file",
            "judge",
            "judge_encoder",
        ],
    )

    chat = command("chat", "Chat with a model folder in the terminal (streaming).")
    chat.add_argument("model", help="Model folder, hub id or .gguf file.")
    _add_settings_options(
        chat, ["system_prompt", "max_new_tokens", "dtypes", "device_map", "debug", "gguf_file"]
    )

    inspect = command(
        "inspect", "Print the layers and residual-stream writers Blasphemer edits in MODEL."
    )
    inspect.add_argument("model", help="Model folder, hub id or .gguf file.")
    inspect.add_argument("--json", action="store_true", help="Print machine-readable JSON.")
    _add_settings_options(
        inspect,
        [
            "architecture_override",
            "trust_remote_code",
            "revision",
            "dtypes",
            "device_map",
            "debug",
            "gguf_file",
        ],
    )
    export_gguf = command(
        "export-gguf", "Write a saved model folder as one GGUF file for llama.cpp and friends."
    )
    export_gguf.add_argument("model", type=Path, help="Folder of a saved (edited) model.")
    export_gguf.add_argument("output", type=Path, help="The .gguf file to write.")
    export_gguf.add_argument(
        "--type",
        dest="gguf_type",
        default=None,
        choices=["f16", "bf16", "q8_0"],
        help="Tensor type (default f16; from a source GGUF only edited tensors that cannot keep "
        "their source type use it, default q8_0).",
    )
    export_gguf.add_argument("--force", action="store_true", help="Overwrite an existing file.")
    export_gguf.add_argument(
        "--source-gguf",
        type=Path,
        default=None,
        help="The GGUF the model was loaded from (default: the one its results.json names, "
        "if it is still there unchanged); unedited tensors are copied from it byte for byte.",
    )
    _add_settings_options(export_gguf, ["debug"])

    judge = command(
        "judge", "Judge answers you already have (JSONL with prompt and response) for refusals."
    )
    judge.add_argument("answers", type=Path, help="JSONL file, one {prompt, response} a line.")
    judge.add_argument(
        "--json", action="store_true", help="One JSON line per answer, in order, instead."
    )
    _add_settings_options(judge, ["refusal_markers", "judge", "judge_encoder", "debug"])
    return parser


def _normalise_argv(argv: Sequence[str]) -> list[str]:
    """``blasphemer MODEL ...`` means ``blasphemer run MODEL ...``."""
    args = list(argv)
    if args and args[0] not in SUBCOMMANDS and args[0] not in ("-h", "--help", "--version"):
        return ["run", *args]
    return args


def _quiet_libraries(debug: bool) -> None:
    """Our console reports progress; the libraries' own log lines and bars would interleave."""
    import logging

    import huggingface_hub
    import optuna
    import transformers

    optuna.logging.set_verbosity(logging.DEBUG if debug else logging.WARNING)
    if debug:
        transformers.logging.set_verbosity_info()
        huggingface_hub.logging.set_verbosity_info()
    else:
        transformers.logging.set_verbosity_error()
        # An unreachable hub logs every HTTP retry as a warning; our error line says it once.
        huggingface_hub.logging.set_verbosity_error()
    # Also silences the GGUF loader's bar (see blasphemer.loading.gguf_bar_follows_the_switch).
    transformers.utils.logging.disable_progress_bar()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("blasphemer").setLevel(logging.DEBUG if debug else logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``blasphemer`` console script. Returns the process exit code."""
    args_list = _normalise_argv(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args_list
    console = Console(quiet="--quiet" in args_list, debug=debug)
    try:
        if "--version" in args_list[:1]:
            from blasphemer import __version__

            console.info(f"blasphemer {__version__}")
            return 0
        parser = build_parser()
        if not args_list:
            parser.print_help()
            return 2
        namespace = parser.parse_args(args_list)
        # Only a command that loads models pays for these imports; --help, argument errors and
        # judge (text only) stay fast.
        if namespace.command != "judge":
            _quiet_libraries(debug)
        return _dispatch(namespace, console)
    except BlasphemerError as error:
        if debug:
            console.exception()
        console.error(str(error))
        return error.exit_code
    except KeyboardInterrupt:
        console.error(
            "interrupted; finished trials are saved in the study, run the same command to resume"
        )
        return 130


def _dispatch(namespace: argparse.Namespace, console: Console) -> int:
    values = {k: v for k, v in vars(namespace).items() if k in Settings.model_fields}
    config_file = namespace.config
    preset = getattr(namespace, "preset", None)
    command = namespace.command
    if command == "run":
        settings = load_settings(values, config_file, preset)
        if settings.model is None:
            raise ConfigError(
                "no model given; run `blasphemer MODEL` with a hub id or a local folder"
            )
        from blasphemer.app import pipeline

        return pipeline.run(settings, console)
    if command == "demo":
        from blasphemer.app import pipeline

        return pipeline.demo(load_settings(values, config_file), console)
    if command == "worker":
        from blasphemer.app import worker

        return worker.work(load_settings(values, config_file), console)
    if command == "judge":
        from blasphemer.app import judge_command

        settings = load_settings(values, config_file)
        return judge_command.judge(settings, namespace.answers, namespace.json, console)
    from blasphemer.app import model_commands, study_status

    if command == "status":
        return study_status.status(load_settings(values, config_file), console)
    if command == "evaluate":
        settings = load_settings({**values, "model": namespace.model}, config_file, preset)
        base = model_commands.ModelRef(namespace.base, namespace.base_gguf_file)
        return model_commands.evaluate(settings, base, namespace.json, console)
    if command == "chat":
        return model_commands.chat(
            load_settings({**values, "model": namespace.model}, config_file), console
        )
    if command == "inspect":
        settings = load_settings({**values, "model": namespace.model}, config_file)
        return model_commands.inspect(settings, namespace.json, console)
    if command == "export-gguf":
        return model_commands.export_gguf(
            namespace.model,
            namespace.output,
            gguf_type=namespace.gguf_type,
            force=namespace.force,
            source_gguf=namespace.source_gguf,
            console=console,
        )
    raise ConfigError(f"unknown command {command!r}; choose one of {', '.join(SUBCOMMANDS)}")


if __name__ == "__main__":
    raise SystemExit(main())
