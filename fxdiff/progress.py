"""Progress for the command line: a transient spinner on stderr naming the step that runs, shown
once a step has taken more than a moment, and only when stderr is a terminal.

The API stays silent: ``step`` does nothing unless the CLI has turned the display on with ``shown``.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

from rich.console import Console
from rich.text import Text

DELAY = 1.0   # seconds a step runs before it is shown
_displays: list[_Spinner] = []


class _Spinner:
    """One rich status line, started by a timer when a step outlasts ``delay``, stopped when it ends."""

    def __init__(self, console: Console, delay: float):
        self.status = console.status("")
        self.delay = delay
        self.lock = threading.Lock()
        self.current = 0      # which step the pending timer belongs to
        self.running = False

    @contextlib.contextmanager
    def step(self, text: str) -> Iterator[None]:
        with self.lock:
            self.current += 1
            self.status.update(Text(text))   # a path or model name is text, never rich markup
        timer = threading.Timer(self.delay, self._start, (self.current,))
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()
            with self.lock:
                self.current += 1
                if self.running:
                    self.status.stop()
                    self.running = False

    def _start(self, which: int) -> None:
        with self.lock:
            if which == self.current and not self.running:
                self.status.start()
                self.running = True


@contextlib.contextmanager
def shown(console: Console | None = None, delay: float = DELAY) -> Iterator[None]:
    """Show the steps run inside this block on ``console`` (default: stderr) when it is a terminal."""
    console = console or Console(stderr=True)
    if not console.is_terminal:
        yield
        return
    _displays.append(_Spinner(console, delay))
    try:
        yield
    finally:
        _displays.pop()


def step(text: str) -> contextlib.AbstractContextManager:
    """A context manager around one step of work, e.g. ``with step("matching"): ...``."""
    return _displays[-1].step(text) if _displays else contextlib.nullcontext()
