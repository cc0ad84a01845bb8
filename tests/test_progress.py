"""Progress: a transient spinner on a terminal's stderr for steps that take a moment; silent otherwise."""

import io
import time

from rich.console import Console

from fxdiff import progress


def terminal() -> Console:
    return Console(file=io.StringIO(), force_terminal=True, width=80)


def test_a_slow_step_is_shown_then_cleared():
    console = terminal()
    with progress.shown(console, delay=0.05):
        with progress.step("matching"):
            time.sleep(0.5)
    out = console.file.getvalue()
    assert "matching" in out
    assert out.endswith("\x1b[2K"), "transient: the line is erased when the step ends"


def test_a_quick_step_shows_nothing():
    console = terminal()
    with progress.shown(console, delay=5):
        with progress.step("judging"):
            pass
    assert "judging" not in console.file.getvalue()


def test_silent_when_not_a_terminal_or_not_shown():
    console = Console(file=io.StringIO(), force_terminal=False)
    with progress.shown(console, delay=0):
        with progress.step("loading"):
            time.sleep(0.05)
    assert console.file.getvalue() == ""
    with progress.step("the API alone"):   # no display: a no-op
        pass
