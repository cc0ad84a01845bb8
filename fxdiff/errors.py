"""The one exception type fxdiff raises for bad user input."""


class FxdiffError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits with code 2."""
