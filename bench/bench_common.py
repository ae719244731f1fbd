"""Shared pieces of the benchmarks: a child process runner that timestamps every output line and
measures the child's peak memory, and the pure helpers behind the summaries (Pareto fronts,
medians, ratios, Markdown tables).

Nothing here imports torch or Blasphemer, so the benchmark drivers stay light and these helpers
are quick to test.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import select
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

Key = TypeVar("Key", bound=Hashable)
# Answer to an interactive prompt: given the finished lines so far and the unfinished last line,
# return the text to type (without newline), or None when the last line is not a prompt.
Responder = Callable[[list[str], str], str | None]


class BenchError(RuntimeError):
    """A benchmark step failed; the message names the step, the log and, where known, the fix."""


def apply_presets(args: argparse.Namespace, presets: Mapping[str, tuple[object, object]]) -> None:
    """Fill every option left unset from ``presets`` (option: (full run, ``--quick``))."""
    for key, (full, quick) in presets.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)


def exit_code(body: Callable[[], object]) -> int:
    """Run a benchmark: 0, or 1 with its one-line error on stderr when a step failed."""
    try:
        body()
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


# --- child processes ----------------------------------------------------------------------------


def child_env(threads: int, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a model process: fixed thread count, offline hub, unbuffered wide output."""
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    env.update(
        {
            "PYTHONUNBUFFERED": "1",  # lines arrive when printed, so their timestamps are right
            "COLUMNS": "400",  # Rich wraps at the terminal width; keep menu lines whole
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "NO_COLOR": "1",
        }
    )
    env.update(extra or {})
    return env


@dataclass
class ProcessRecord:
    """One finished child process: its output lines with times, wall time and peak memory."""

    command: list[str]
    started_at: float  # epoch seconds at launch
    seconds: float  # wall time from launch to exit
    returncode: int
    peak_rss_mib: float  # ru_maxrss of the child (and its waited-for children)
    lines: list[tuple[float, str]] = field(default_factory=list)  # (seconds since launch, text)
    log_path: Path | None = None

    def first_time(self, marker: str) -> float | None:
        """Seconds from launch to the first line that contains ``marker``."""
        for at, text in self.lines:
            if marker in text:
                return at
        return None

    def tail(self, count: int = 15) -> str:
        return "\n".join(text for _, text in self.lines[-count:])


def _clean_line(raw: str) -> str:
    # Progress bars redraw with carriage returns; keep what the line finally showed.
    return raw.rstrip("\r").rsplit("\r", 1)[-1]


def run_timed(
    command: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    log_path: Path,
    responder: Responder | None = None,
    timeout: float | None = None,
) -> ProcessRecord:
    """Run ``command``, timestamp each output line (stdout and stderr merged) and log it.

    ``responder`` answers interactive prompts: whenever the output stops in the middle of a
    line, it is asked whether that line is a prompt, and its answer is typed. A child that runs
    past ``timeout`` seconds is killed (its whole process group) and raises :class:`BenchError`.
    Peak memory comes from ``wait4`` on the child, so it is this child's alone.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started_at = time.time()
    start = time.monotonic()
    process = subprocess.Popen(
        list(command),
        cwd=cwd,
        env=dict(env),
        stdin=subprocess.PIPE if responder else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # a process group we can kill as a whole on timeout
    )
    assert process.stdout is not None
    fd = process.stdout.fileno()
    lines: list[tuple[float, str]] = []
    pending = ""
    with log_path.open("w", encoding="utf-8") as log:

        def finish_line(text: str) -> None:
            at = time.monotonic() - start
            lines.append((at, text))
            log.write(f"{at:9.2f} | {text}\n")
            log.flush()

        try:
            while True:
                elapsed = time.monotonic() - start
                if timeout is not None and elapsed >= timeout:
                    raise BenchError(
                        f"{Path(command[0]).name} ran past {timeout:.0f} s and was stopped; "
                        f"see {log_path}"
                    )
                wait = 1.0 if timeout is None else min(timeout - elapsed, 1.0)
                ready, _, _ = select.select([fd], [], [], wait)
                if ready:
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        break
                    pending += chunk.decode("utf-8", errors="replace")
                    *complete, pending = pending.split("\n")
                    for raw in complete:
                        finish_line(_clean_line(raw))
                # Asked on idle ticks too, so that a responder can give up on a stalled prompt.
                if responder and pending:
                    answer = responder([text for _, text in lines], _clean_line(pending))
                    if answer is not None:
                        finish_line(f"{_clean_line(pending)}{answer}")
                        pending = ""
                        _type(process, answer)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # the whole group: no orphaned process
            process.wait()
            raise
        if pending:
            finish_line(_clean_line(pending))
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    if process.stdin is not None:
        process.stdin.close()
    process.stdout.close()
    return ProcessRecord(
        command=list(command),
        started_at=started_at,
        seconds=time.monotonic() - start,
        returncode=process.returncode,
        peak_rss_mib=usage.ru_maxrss / 1024,  # Linux reports KiB
        lines=lines,
        log_path=log_path,
    )


def _type(process: subprocess.Popen[bytes], answer: str) -> None:
    assert process.stdin is not None
    try:
        process.stdin.write(f"{answer}\n".encode())
        process.stdin.flush()
    except BrokenPipeError:
        pass  # the child has exited; its exit code tells what happened


# --- summaries ----------------------------------------------------------------------------------


def pareto_front(points: Mapping[Key, tuple[float, float]]) -> list[Key]:
    """Keys whose (refusals, KL) no other point beats in both (lower is better).

    Of several identical points only the first key (in the mapping's order) is kept. The front
    is returned sorted by refusals, then KL.
    """
    front: list[Key] = []
    seen: set[tuple[float, float]] = set()
    items = list(points.items())
    for key, (refusals, kl) in items:
        if math.isnan(refusals) or math.isnan(kl) or (refusals, kl) in seen:
            continue
        dominated = any(
            r <= refusals and k <= kl and (r, k) != (refusals, kl) for _, (r, k) in items
        )
        if not dominated:
            front.append(key)
            seen.add((refusals, kl))
    return sorted(front, key=lambda key: points[key])


def spread(items: Sequence[Key], count: int) -> list[Key]:
    """At most ``count`` items, evenly spaced, always keeping the first and the last."""
    if count <= 0:
        return []
    if len(items) <= count:
        return list(items)
    if count == 1:
        return [items[0]]
    step = (len(items) - 1) / (count - 1)
    return [items[round(i * step)] for i in range(count)]


def median(values: Iterable[float | None]) -> float | None:
    """Median of the values that are present, or None when none are."""
    present = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(present) if present else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def fmt(value: float | None, digits: int = 2, suffix: str = "") -> str:
    """A number for a table cell; a dash when missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}{suffix}"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A GitHub Markdown table; cells are padded so the source is readable too."""
    table = [list(headers), *[list(row) for row in rows]]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    separator = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(table[0]), separator, *(line(row) for row in table[1:])])
