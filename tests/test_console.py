"""Help texts with defaults and progress output (umo_core/console.py): a bar on a terminal, plain lines in a log."""

from __future__ import annotations

import argparse
import io
import sys

from tqdm import tqdm

from umo_core import console


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
