"""The one error type the CLI turns into a one-line message instead of a traceback, and file names made printable
for such messages and the outputs."""

from numbers import Integral


class BmfnError(Exception):
    """A user-facing failure: bad input, missing file or weights. The message names the file and the problem."""


def check_counts(owner: str, minimum: int = 1, **values) -> None:
    """One line for a setting that must be a whole number of at least `minimum` (None: its default), as the CLI's
    options are checked: a caller of the Python API gets the same refusal, not a failure deep inside a run."""
    for name, value in values.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, Integral) or value < minimum):
            raise BmfnError(f"{owner}: {name}={value!r}, expected a whole number of at least {minimum}")


def printable(text: str) -> str:
    """`text` as it can be stored (HDF5 strings are UTF-8) and printed: the bytes of a file name that are not UTF-8,
    which Python keeps as surrogates, as \\xNN escapes."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
