"""The one error type the CLI turns into a one-line message instead of a traceback, and file names made printable
for such messages and the outputs."""


class BmfnError(Exception):
    """A user-facing failure: bad input, missing file or weights. The message names the file and the problem."""


def printable(text: str) -> str:
    """`text` as it can be stored (HDF5 strings are UTF-8) and printed: the bytes of a file name that are not UTF-8,
    which Python keeps as surrogates, as \\xNN escapes."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
