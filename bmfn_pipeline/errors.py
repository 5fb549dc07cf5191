"""The one error type the CLI turns into a one-line message instead of a traceback."""


class BmfnError(Exception):
    """A user-facing failure: bad input, missing file or weights. The message names the file and the problem."""
