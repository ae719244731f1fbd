"""Drive Heretic (PyPI ``heretic-llm``) headless, as a separate program, for the comparison.

Heretic is AGPL; nothing of it is copied here. It runs from its own virtual environment under
``bench/.venv-heretic`` and is talked to only through what any user sees:

- a ``config.toml`` in its working directory (its settings file);
- plain ``.txt`` prompt files, one prompt per line (its local-file dataset form);
- its end menus: with ``KAGGLE_KERNEL_RUN_TYPE`` set, Heretic prints numbered choices and reads
  the number from standard input (its notebook mode). :class:`MenuDriver` answers them: pick a
  trial, "Save the model to a local folder", a path, "Return to the trial selection menu", and
  finally "Exit program";
- its Optuna journal (``checkpoints/*.jsonl``), which holds every trial's refusals, KL and
  start/end times.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench_common import BenchError, ProcessRecord, child_env, run_timed
from heretic_output import (  # noqa: F401 (re-exported: the harness and its tests read them here)
    HereticTrial,
    batch_size_from,
    find_journal,
    parse_journal,
    trial_phases,
)

HERETIC_PACKAGE = "heretic-llm"
HERETIC_VERSION = "1.4.0"
# A bare torch range pulls a multi-GB CUDA build; this pin resolves to the local CPU wheel.
TORCH_PIN = "torch==2.13.0"

# Lines of Heretic's console output that open each phase (used for phase timings).
PHASE_LINES = {
    "load": "Loading model ",
    "batch_size": "Determining optimal batch size",
    "prefix": "Checking for common response prefix",
    "baseline": "Loading good evaluation prompts",
    "directions": "Calculating per-layer refusal directions",
    "first_trial": "Running trial 1 of",
    "finished": "Optimization finished!",
    "saved": "Model saved to",
}
# The lines that bound the directions and mark a saved model, for the summary of a run.
SUMMARY_PHASES = {
    "directions": PHASE_LINES["directions"],
    "directions_end": PHASE_LINES["first_trial"],
    "saved": PHASE_LINES["saved"],
}


# --- installation -------------------------------------------------------------------------------


def heretic_executable(venv: Path) -> Path:
    return venv / "bin" / "heretic"


def installed_version(venv: Path) -> str | None:
    """Version of heretic-llm in ``venv``, or None when it (or the venv) is missing."""
    python = venv / "bin" / "python"
    if not python.exists() or not heretic_executable(venv).exists():
        return None
    probe = "import importlib.metadata as m; print(m.version('heretic-llm'))"
    result = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else None


def ensure_installed(venv: Path, *, skip_install: bool, log: Callable[[str], None] = print) -> Path:
    """Heretic's executable in ``venv``, installing torch (pinned) and heretic-llm if missing."""
    version = installed_version(venv)
    if version == HERETIC_VERSION:
        return heretic_executable(venv)
    if skip_install:
        found = f"version {version}" if version else "nothing"
        raise BenchError(
            f"{venv} holds {found}, not {HERETIC_PACKAGE} {HERETIC_VERSION}; "
            "run without --skip-install to install it"
        )
    log(f"installing {HERETIC_PACKAGE}=={HERETIC_VERSION} into {venv} (once) ...")
    if not (venv / "bin" / "python").exists():
        # The base interpreter, not our venv's: the two environments must not share packages.
        base = Path(sys.base_prefix) / "bin" / "python3"
        _run_checked([str(base if base.exists() else sys.executable), "-m", "venv", str(venv)])
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    _run_checked([*pip, TORCH_PIN])
    _run_checked([*pip, f"{HERETIC_PACKAGE}=={HERETIC_VERSION}"])
    if installed_version(venv) != HERETIC_VERSION:
        raise BenchError(f"{HERETIC_PACKAGE} {HERETIC_VERSION} did not install into {venv}")
    return heretic_executable(venv)


def _run_checked(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise BenchError(f"`{' '.join(command)}` failed:\n{tail}")


# --- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class HereticConfig:
    """The Heretic settings the benchmark sets; everything else keeps Heretic's default."""

    model: str
    good_fit: Path
    bad_fit: Path
    good_eval: Path
    bad_eval: Path
    n_trials: int
    seed: int
    max_response_length: int
    system_prompt: str
    n_startup_trials: int | None = None  # None: Heretic's own default
    refusal_markers: tuple[str, ...] | None = None  # None: Heretic's own markers
    batch_size: int = 0  # 0: Heretic measures it
    extra: tuple[tuple[str, Any], ...] = ()  # further settings, as TOML values


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML form for {value!r}")


def config_toml(config: HereticConfig) -> str:
    """The text of Heretic's ``config.toml`` for one benchmark run (CPU, float32, headless)."""
    settings: dict[str, Any] = {
        "model": config.model,
        "dtypes": ["float32"],
        "device_map": "cpu",
        "offload_outputs_to_cpu": False,
        "batch_size": config.batch_size,
        "n_trials": config.n_trials,
        "seed": config.seed,
        "max_response_length": config.max_response_length,
        "system_prompt": config.system_prompt,
        "export_strategy": "merge",  # no export question in the save menu
        "good_prompts": {"dataset": str(config.good_fit)},
        "bad_prompts": {"dataset": str(config.bad_fit)},
        "good_evaluation_prompts": {"dataset": str(config.good_eval)},
        "bad_evaluation_prompts": {"dataset": str(config.bad_eval)},
    }
    if config.n_startup_trials is not None:
        settings["n_startup_trials"] = config.n_startup_trials
    if config.refusal_markers is not None:
        settings["refusal_markers"] = list(config.refusal_markers)
    settings.update(dict(config.extra))
    lines = ["# Written by bench/vs_heretic.py for one benchmark run."]
    lines += [f"{key} = {_toml_value(value)}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


# --- the end menus ------------------------------------------------------------------------------

_CHOICE = re.compile(r"^\[(\d+)\] (.*)$")
_TRIAL_CHOICE = re.compile(r"^\[Trial\s+(\d+)\]")


def parse_menu(lines: Sequence[str]) -> tuple[str, dict[str, int]]:
    """The question and its choices (title → number) of the numbered menu that ends ``lines``."""
    choices: dict[str, int] = {}
    index = len(lines)
    while index > 0 and (match := _CHOICE.match(lines[index - 1].strip())):
        choices[match.group(2).strip()] = int(match.group(1))
        index -= 1
    question = lines[index - 1].strip() if index > 0 else ""
    return question, choices


def trial_choices(choices: dict[str, int]) -> dict[int, int]:
    """Heretic trial index (1-based, as its menu shows) → menu number."""
    found = {}
    for title, number in choices.items():
        if match := _TRIAL_CHOICE.match(title):
            found[int(match.group(1))] = number
    return found


@dataclass
class MenuDriver:
    """Answers Heretic's end menus: save each planned trial to its folder, then exit.

    ``plan()`` is called once, when the trial menu first appears (Heretic's journal is complete
    by then), and returns {Heretic trial index (1-based, as its menu shows it): folder}. A trial
    that the menu does not offer is recorded in ``missing`` and skipped. A question the driver
    does not know raises :class:`BenchError` rather than being guessed at.
    """

    plan: Callable[[], Mapping[int, Path]]
    stall_seconds: float = 60.0
    clock: Callable[[], float] = time.monotonic
    targets: dict[int, Path] = field(default_factory=dict)
    saved: list[int] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)
    current: int | None = None
    _queue: list[int] | None = None
    _waiting: tuple[str, float] | None = None  # an unknown question and when it was first seen

    def __call__(self, lines: list[str], tail: str) -> str | None:
        stripped = tail.rstrip()
        if stripped.endswith("Path to the folder::"):
            if self.current is None:
                raise BenchError("Heretic asked for a folder before a trial was chosen")
            return str(self.targets[self.current])
        if stripped != "Enter number:":
            self._check_stall(stripped)
            return None
        question, choices = parse_menu(lines)
        if question.startswith("Which trial do you want to use?"):
            return self._pick_trial(choices)
        if question.startswith("What do you want to do with the decensored model?"):
            if self.current is not None and self.current not in self.saved:
                self.saved.append(self.current)
                return str(_choice(choices, "Save the model to a local folder"))
            self.current = None
            return str(_choice(choices, "Return to the trial selection menu"))
        if question.startswith("How would you like to proceed?"):
            return str(_choice(choices, "Ignore the previous run and start from scratch"))
        raise BenchError(f"unexpected Heretic question: {question!r} (choices {list(choices)})")

    def _check_stall(self, stripped: str) -> None:
        """Give up when Heretic has waited at a question the driver cannot answer.

        Output can stop mid-line for long (Heretic prints "Trying batch size 64... " and then
        works), so only a line ending like a question, unchanged for ``stall_seconds``, counts.
        """
        if not stripped.endswith((":", "?")):
            self._waiting = None
            return
        if self._waiting is None or self._waiting[0] != stripped:
            self._waiting = (stripped, self.clock())
        elif self.clock() - self._waiting[1] >= self.stall_seconds:
            raise BenchError(f"Heretic waits for an answer the benchmark cannot give: {stripped!r}")

    def _pick_trial(self, choices: dict[str, int]) -> str:
        if self._queue is None:
            self.targets = dict(self.plan())
            self._queue = list(self.targets)
        offered = trial_choices(choices)
        while self._queue:
            index = self._queue.pop(0)
            if index in offered:
                self.current = index
                return str(offered[index])
            self.missing.append(index)
        return str(_choice(choices, "Exit program"))


def _choice(choices: dict[str, int], title: str) -> int:
    if title not in choices:
        raise BenchError(f"Heretic's menu has no {title!r} (choices {list(choices)})")
    return choices[title]


# --- one run ------------------------------------------------------------------------------------


@dataclass
class HereticRun:
    process: ProcessRecord
    trials: list[HereticTrial]
    saved: dict[int, Path]  # trial index → folder
    missing: list[int]


def run_heretic(
    executable: Path,
    config: HereticConfig,
    workdir: Path,
    *,
    plan_saves: Callable[[list[HereticTrial]], Mapping[int, Path]],
    threads: int,
    timeout: float | None,
) -> HereticRun:
    """Run Heretic once in ``workdir`` (emptied first) and save the planned trials.

    ``plan_saves(trials)`` gets the journal's trials once the optimisation has finished and
    returns {trial index: folder} for the models to save through Heretic's own menu.
    """
    shutil.rmtree(workdir, ignore_errors=True)  # no old checkpoints (never resume), no old saves
    workdir.mkdir(parents=True)
    (workdir / "config.toml").write_text(config_toml(config), encoding="utf-8")
    driver = MenuDriver(lambda: plan_saves(parse_journal(find_journal(workdir))))
    process = run_timed(
        [str(executable)],
        cwd=workdir,
        env=child_env(threads, {"KAGGLE_KERNEL_RUN_TYPE": "batch"}),
        log_path=workdir / "log.txt",
        responder=driver,
        timeout=timeout,
    )
    if process.returncode != 0:
        raise BenchError(
            f"Heretic exited with code {process.returncode}; see {process.log_path}\n"
            f"{process.tail()}"
        )
    trials = parse_journal(find_journal(workdir))
    saved = {index: driver.targets[index] for index in driver.saved}
    for index, folder in saved.items():
        if not (folder / "config.json").exists():
            raise BenchError(
                f"Heretic did not save trial {index} to {folder}; see {process.log_path}"
            )
    return HereticRun(process, trials, saved, driver.missing)
