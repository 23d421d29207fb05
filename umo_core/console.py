"""What the commands show besides their results: help texts with defaults, and progress.

Progress is a tqdm bar when stderr is a terminal. Anywhere else (a log file, a batch system's output) a bar's
redraws would fill the file, so a plain line is written every PROGRESS_INTERVAL seconds and one at the end.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Protocol

from tqdm import tqdm

PROGRESS_INTERVAL = 30.0  # seconds between two progress lines in a log


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written, and every option's default after its help (none for options without one)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        # Identity, not ==: a default of 0 (a seed, a weight that is off) is shown.
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


class Progress(Protocol):
    def update(self, n: int = 1) -> object: ...

    def close(self) -> None: ...


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
