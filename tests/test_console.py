"""Help texts with defaults, progress output (umo_core/console.py: a bar on a terminal, plain lines in a log) and
how a command ends: its status, one error line, or one line when Ctrl-C or SIGTERM stops it."""

from __future__ import annotations

import argparse
import io
import os
import signal
import sys

import pytest
from tqdm import tqdm

from umo_core import console
from umo_core.errors import UMOError
from umo_core.files import atomic_path


def test_help_shows_each_default_once_and_none_for_options_without_one():
    parser = argparse.ArgumentParser(formatter_class=console.HelpFormatter)
    parser.add_argument("--size", type=int, default=768, help="width and height")
    parser.add_argument("--out", help="output folder")
    parser.add_argument("--fast", action="store_true", help="go fast")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    text = " ".join(parser.format_help().split())
    assert "width and height (default: 768)" in text and "first seed (default: 0)" in text
    assert "output folder (default" not in text and "go fast (default" not in text


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_in_a_log(monkeypatch, capsys):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stderr", Terminal())
    bar = console.progress(3, "photos", "photo")
    assert isinstance(bar, tqdm)
    bar.close()

    monkeypatch.setattr("sys.stderr", io.StringIO())
    lines = console.progress(5, "photos", "photo")
    assert isinstance(lines, console.ProgressLines)
    lines.interval = 0.0  # a line at every update, as after each PROGRESS_INTERVAL
    lines.update(2)
    lines.update(3)
    lines.close()
    written = sys.stderr.getvalue().splitlines()
    assert [line.rsplit(",", 1)[0] for line in written] == ["photos: 2/5 photos", "photos: 5/5 photos",
                                                            "photos: 5/5 photos"]
    assert "\r" not in sys.stderr.getvalue()


def test_progress_lines_wait_for_the_interval(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    lines = console.ProgressLines(10, "crops", "photo", interval=3600)
    for _ in range(10):
        lines.update()
    assert stream.getvalue() == ""  # nothing until the interval has passed ...
    lines.close()
    assert stream.getvalue().startswith("crops: 10/10 photos, ")  # ... and one line at the end


def _stops_itself(number: int) -> int:
    os.kill(os.getpid(), number)  # the signal arrives at once, as a user's Ctrl-C or a scheduler's SIGTERM would
    raise AssertionError("the signal did not stop the work")


@pytest.mark.parametrize(("number", "reason"), [(signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM")])
def test_a_stopped_command_is_one_line_and_the_shells_status_and_its_clean_up_runs(tmp_path, capsys, number, reason):
    """Before stop_signals, SIGTERM ended the process at once: no `finally`, a temporary file left behind."""
    target = tmp_path / "image.png"

    def work() -> int:
        with atomic_path(target) as temporary:
            temporary.write_bytes(b"half an image")
            _stops_itself(number)
        return 0

    before = {sig: signal.getsignal(sig) for sig in console.STOP_SIGNALS}
    assert console.command_status(work, "what is kept") == 128 + number
    assert capsys.readouterr().err == f"stopped by {reason}: what is kept\n"
    assert os.listdir(tmp_path) == []
    assert {sig: signal.getsignal(sig) for sig in console.STOP_SIGNALS} == before  # the caller's handlers are back


def test_a_bad_input_is_one_error_line_and_status_2(capsys):
    def work() -> int:
        raise UMOError("--size 17 must be a multiple of 16")

    assert console.command_status(work, "nothing") == 2
    assert capsys.readouterr().err == "error: --size 17 must be a multiple of 16\n"
    assert console.command_status(lambda: 0, "nothing") == 0
