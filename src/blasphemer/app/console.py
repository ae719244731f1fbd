"""The only module that prints. Everything a user sees goes through :class:`Console`.

Live progress uses Rich when attached to a terminal; ``quiet`` mode (or a non-terminal) prints
plain, greppable log lines instead.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from statistics import median
from typing import TYPE_CHECKING, Any

from rich.console import Console as RichConsole
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.prompt import Confirm, Prompt
from rich.table import Table

from blasphemer.evaluation.markers import wilson_interval
from blasphemer.optimization.selection import tier

if TYPE_CHECKING:  # annotations only: the console loads without torch or optuna
    from blasphemer.optimization.objective import TrialResult


def rate_cell(rate: float, count: int, n: int) -> str:
    """A refusal rate with the 95 % Wilson interval of ``count`` in ``n``, as tables show it."""
    low, high = wilson_interval(count, n)
    return f"{rate:.1%} [{low:.0%}-{high:.0%}]"


def front_cells(result: TrialResult, star: TrialResult | None) -> list[str]:
    """The columns every console table of a Pareto front opens with: the trial (⭐ for the
    recommended one), its refusal rate with the 95 % interval, KL and quality tier."""
    mark = "⭐ " if star is not None and star.number == result.number else ""
    return [
        f"{mark}{result.number}",
        rate_cell(result.refusal_rate, result.refusals or 0, result.n_prompts or 1),
        f"{result.kl:.3f}",
        tier(result.refusal_rate, result.kl).value,
    ]


TREND_IMPROVING, TREND_WORSE, TREND_FLAT = "▼", "▲", "■"
# Quiet progress logs a line at most this often (a stage of minutes shows it is alive).
PROGRESS_LOG_SECONDS = 30.0


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


@dataclass
class TrialMonitor:
    """Tracks finished trials for the live line: N/M, elapsed, ETA, latest, best so far, trend.

    "Best so far" minimises ``refusal_rate + kl`` (both are on comparable 0..1-ish scales at the
    interesting end); the trend compares the median of that key over the last ``window`` trials
    with the ``window`` before them (▼ improving, ▲ worse, ■ within 5 %).
    """

    total: int
    done_before: int = 0
    window: int = 5
    started: float = field(default_factory=time.monotonic)
    keys: list[float] = field(default_factory=list)
    best: tuple[int, float, float] | None = None  # (trial number, refusal rate, kl)

    def record(self, number: int, refusal_rate: float, kl: float) -> None:
        key = refusal_rate + kl
        self.keys.append(key)
        if self.best is None or key < self.best[1] + self.best[2]:
            self.best = (number, refusal_rate, kl)

    @property
    def done(self) -> int:
        return self.done_before + len(self.keys)

    def trend(self) -> str:
        if len(self.keys) < 2 * self.window:
            return TREND_FLAT
        recent = median(self.keys[-self.window :])
        earlier = median(self.keys[-2 * self.window : -self.window])
        if recent < earlier * 0.95:
            return TREND_IMPROVING
        if recent > earlier * 1.05:
            return TREND_WORSE
        return TREND_FLAT

    def eta_seconds(self) -> float | None:
        if not self.keys:
            return None
        elapsed = time.monotonic() - self.started
        return elapsed / len(self.keys) * max(self.total - self.done, 0)

    def line(self, latest: tuple[int, float, float] | None) -> str:
        elapsed = format_duration(time.monotonic() - self.started)
        eta = self.eta_seconds()
        parts = [f"trial {self.done}/{self.total}", f"elapsed {elapsed}"]
        parts.append(f"ETA {format_duration(eta)}" if eta is not None else "ETA --")
        if latest is not None:
            parts.append(f"latest #{latest[0]}: refusals {latest[1]:.1%}, KL {latest[2]:.3f}")
        if self.best is not None:
            number, rate, kl = self.best
            best = f"best #{number}: refusals {rate:.1%}, KL {kl:.3f}"
            parts.append(f"{best} {self.trend()} ({tier(rate, kl).value})")
        return " | ".join(parts)


class Console:
    """Prints progress, tables and questions. ``quiet`` turns live displays into log lines."""

    def __init__(self, quiet: bool = False, debug: bool = False, stream: Any = None) -> None:
        self.quiet = quiet
        self.debug = debug
        self._out = RichConsole(file=stream or sys.stdout, highlight=False, soft_wrap=True)
        self._err = RichConsole(file=sys.stderr, highlight=False, soft_wrap=True)
        self.interactive = sys.stdin.isatty() and self._out.is_terminal

    def on_stderr(self) -> Console:
        """A console like this one that writes everything to standard error (for the status
        lines of a command whose standard output is JSON)."""
        return Console(quiet=True, debug=self.debug, stream=sys.stderr)

    # --- lines ------------------------------------------------------------------------------
    def info(self, message: str) -> None:
        self._out.print(escape(message))

    def stage(self, number: int, total: int, title: str) -> None:
        self._out.print(f"[bold cyan][{number}/{total}][/] {escape(title)}")

    def warn(self, message: str) -> None:
        self._err.print(f"[yellow]warning:[/] {escape(message)}")

    def error(self, message: str) -> None:
        """One line on standard error (line breaks in ``message`` become spaces)."""
        line = " ".join(part.strip() for part in message.splitlines() if part.strip())
        self._err.print(f"[bold red]error:[/] {escape(line)}")

    def exception(self) -> None:
        self._err.print_exception()

    # --- progress -----------------------------------------------------------------------------
    @contextmanager
    def progress(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        """Yield ``advance(n)`` for a bar of ``total`` units. In quiet mode (or off a terminal)
        a log line with the count and an ETA at most every ``PROGRESS_LOG_SECONDS``, and one
        at the end."""
        if self.quiet or not self._out.is_terminal:
            started = last = time.monotonic()
            done = 0

            def advance(n: int) -> None:
                nonlocal done, last
                done += n
                now = time.monotonic()
                if not 0 < done < total or now - last < PROGRESS_LOG_SECONDS:
                    return
                last = now
                eta = format_duration((now - started) / done * (total - done))
                elapsed = format_duration(now - started)
                self.info(f"{description}: {done}/{total}, elapsed {elapsed}, ETA {eta}")

            yield advance
            self.info(
                f"{description}: {total} done in {format_duration(time.monotonic() - started)}"
            )
            return
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=self._out, transient=True) as bar:
            task = bar.add_task(description, total=total)
            yield lambda n: bar.advance(task, n)
        self.info(f"{description}: {total} done")

    def trial_finished(
        self, monitor: TrialMonitor, number: int, refusal_rate: float, kl: float
    ) -> None:
        monitor.record(number, refusal_rate, kl)
        self.info(monitor.line((number, refusal_rate, kl)))

    # --- tables ----------------------------------------------------------------------------------
    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        if self.quiet or not self._out.is_terminal:
            self.info(title)
            self.info("  " + " | ".join(columns))
            for row in rows:
                self.info("  " + " | ".join(row))
            return
        table = Table(title=title)
        for column in columns:
            table.add_column(column)
        for row in rows:
            table.add_row(*(escape(cell) for cell in row))
        self._out.print(table)

    # --- questions -------------------------------------------------------------------------------
    def ask(self, question: str, choices: Sequence[str], default: str) -> str:
        """Ask for one of ``choices``; without a terminal the default is taken and said."""
        if not self.interactive:
            self.info(f"{question} -> {default} (no terminal)")
            return default
        return Prompt.ask(question, choices=list(choices), default=default, console=self._out)

    def confirm(self, question: str, default: bool) -> bool:
        if not self.interactive:
            self.info(f"{question} -> {'yes' if default else 'no'} (no terminal)")
            return default
        return Confirm.ask(question, default=default, console=self._out)

    def text(self, prompt: str) -> str:
        """Read one line from the user (chat REPL)."""
        return self._out.input(prompt)

    def stream(self, piece: str) -> None:
        """Print a streamed fragment without a newline (chat REPL)."""
        self._out.print(escape(piece), end="")
