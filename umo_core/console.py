"""What the commands show besides their results: help texts with defaults, progress, and how a command ends.

Progress is a tqdm bar when stderr is a terminal. Anywhere else (a log file, a batch system's output) a bar's
redraws would fill the file, so a plain line is written every PROGRESS_INTERVAL seconds and one at the end.

A command ends with its result, with one `error: ...` line and status 2 (a UMOError), or, stopped by Ctrl-C or
SIGTERM (a scheduler's preemption), with one `stopped by ...` line and the shell's status for the signal, 128 + its
number (130, 143): a script or scheduler must not take a stopped run for a finished one.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn, Protocol

from tqdm import tqdm

from .errors import UMOError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

PROGRESS_INTERVAL = 30.0  # seconds between two progress lines in a log


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written, and every option's default after its help (none for options without one)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        # Identity, not ==: a default of 0 (a seed, a weight that is off) is shown.
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


class Progress(Protocol):
    """What `progress` gives: a tqdm bar or ProgressLines, both context managers that close when the block ends."""

    def update(self, n: int = 1) -> object: ...

    def close(self) -> None: ...

    def __enter__(self) -> Progress: ...

    def __exit__(self, *exception) -> object: ...


class ProgressLines:
    """Progress as plain lines on stderr: '<description>: <done>/<total> <unit>s' every `interval` seconds, and
    once at the end when anything was done."""

    def __init__(self, total: int, description: str, unit: str, interval: float = PROGRESS_INTERVAL):
        self.total, self.description, self.unit, self.interval = total, description, unit, interval
        self.done = 0
        self.started = self.shown = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.done += n
        if time.monotonic() - self.shown >= self.interval:
            self._show()

    def close(self) -> None:
        if self.done:
            self._show()

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(self, error_type, *_) -> None:
        if error_type is None:  # after an error, its own line says what happened
            self.close()

    def _show(self) -> None:
        self.shown = time.monotonic()
        print(f"{self.description}: {self.done}/{self.total} {self.unit}s, {self.shown - self.started:.0f} s",
              file=sys.stderr, flush=True)


def progress(total: int, description: str, unit: str, **bar_options) -> Progress:
    """A tqdm bar (with `bar_options`, e.g. position) on a terminal, else ProgressLines."""
    if sys.stderr.isatty():
        return tqdm(total=total, desc=description, unit=unit, file=sys.stderr, **bar_options)
    return ProgressLines(total, description, unit)


def tell(kind: str, text: str) -> None:
    """A 'note:' or 'warning:' line on stderr that does not break a progress bar."""
    tqdm.write(f"{kind}: {text}", file=sys.stderr)


def signal_reason(number: int) -> str:
    """How a stop signal is named to the user: 'Ctrl-C' or 'SIGTERM'."""
    return "Ctrl-C" if number == signal.SIGINT else signal.Signals(number).name


class Stopped(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, raised wherever the command is (`stop_signals`). As an exception, unlike the default
    end by SIGTERM, it runs `finally` blocks and atomic_path's clean-up: nothing half-written is left."""

    def __init__(self, number: int) -> None:
        self.signal = signal.Signals(number)
        super().__init__(signal_reason(number))


def stop_signal(interrupt: KeyboardInterrupt) -> signal.Signals:
    """The signal behind `interrupt`: Stopped's, else SIGINT (Python's own KeyboardInterrupt is Ctrl-C)."""
    return interrupt.signal if isinstance(interrupt, Stopped) else signal.SIGINT


def raise_stopped(number: int, _frame) -> NoReturn:
    """The signal handler that raises Stopped."""
    raise Stopped(number)


@contextmanager
def stop_signals() -> Iterator[None]:
    """Within the block Ctrl-C and SIGTERM raise Stopped; the handlers from before are put back after it (a test
    that calls a command's main keeps its own)."""
    before = {number: signal.signal(number, raise_stopped) for number in STOP_SIGNALS}
    try:
        yield
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)


def command_status(work: Callable[[], int], stopped: str) -> int:
    """The exit status of a command that does `work`: work's own; 2 after one `error: ...` line for a UMOError;
    128 + the signal's number after one `stopped by Ctrl-C: <stopped>` line (`stopped` says what is kept) for
    Ctrl-C or SIGTERM."""
    try:
        with stop_signals():
            return work()
    except UMOError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # Stopped, or Ctrl-C caught by a default handler outside stop_signals
        number = stop_signal(stop)
        print(f"stopped by {signal_reason(number)}: {stopped}", file=sys.stderr)
        return 128 + number


def ignore_stop_signals() -> None:
    """Ctrl-C and SIGTERM do nothing from here (until stop_signals' block ends): for work that is done."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)


def exit_program(status: int) -> NoReturn:
    """End the program with `status`. Ctrl-C and SIGTERM are ignored from here: the work is done, and Python's
    teardown of torch and onnxruntime (seconds) would otherwise print a traceback and turn the finished run into
    one killed by the signal."""
    ignore_stop_signals()
    raise SystemExit(status)
