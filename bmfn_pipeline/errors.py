"""The one error type the CLI turns into a one-line message instead of a traceback, writes that fail as one such
line and keep what was there, and file names made printable for such messages and the outputs."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Iterator
from numbers import Integral
from pathlib import Path

FULL_DISK_BYTES = 1 << 20  # free space below which a write that failed without saying why is put down to a full disk
# HDF5 keeps a file it failed to write open and writes it again when the interpreter exits, where HDF5 2.0 crashes
# (a segmentation fault after the command's one-line error): set when that happened; cli.run then exits at once.
hdf5_write_failed = False


class BmfnError(Exception):
    """A user-facing failure: bad input, missing file or weights. The message names the file and the problem."""


class WriteError(BmfnError):
    """A file could not be written (a full disk, a file-size limit, a read-only folder): the run stops, keeping the
    work done; it is not one clip's failure. `what` names the file's content, `then` what became of the work."""

    def __init__(self, path: str | os.PathLike, reason: str, what: str = "", then: str = ""):
        self.path, self.reason = path, reason
        said = f"{path}: cannot write {what}: {reason}" if what else f"{path}: cannot write ({reason})"
        super().__init__(said + (f"; {then}" if then else ""))


@contextlib.contextmanager
def failed_writes(path: str | os.PathLike, temporary: str | os.PathLike | None = None,
                  hdf5: bool = False) -> Iterator[None]:
    """A write in the block that fails (OSError; HDF5's and torch.save's RuntimeErrors) becomes one WriteError line
    naming `path` and the system's reason; `temporary`, the file being written, is removed (whatever ends the
    block early), so that no half-written file fills the disk."""
    try:
        yield
    except BaseException as exc:
        reason = write_failure(exc, Path(path).parent) if isinstance(exc, (OSError, RuntimeError)) else None
        if temporary is not None:
            with contextlib.suppress(OSError):
                Path(temporary).unlink(missing_ok=True)
        if reason is None:
            raise
        global hdf5_write_failed
        hdf5_write_failed = hdf5_write_failed or hdf5
        raise WriteError(path, reason) from None


@contextlib.contextmanager
def written(path: str | os.PathLike, temporary: str | os.PathLike | None = None,
            hdf5: bool = False) -> Iterator[Path]:
    """A temporary file beside `path` (`<path>.tmp` unless given) to write in the block, renamed over `path` when it
    ends: a kill or a failure mid-write leaves the previous `path` as it was (failed_writes says why)."""
    path = Path(path)
    tmp = Path(temporary) if temporary is not None else path.with_name(path.name + ".tmp")
    with failed_writes(path, tmp, hdf5):
        yield tmp
        os.replace(tmp, path)


def write_failure(exc: BaseException, folder: str | os.PathLike) -> str:
    """Why a write failed, in the system's words: HDF5 puts errno's message inside its own text; torch.save's stream
    errors say nothing of the cause, which on a full disk is put down to it."""
    text = str(exc)
    found = re.search(r"error message = '([^']*)'", text)
    if found:
        return found.group(1)
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    with contextlib.suppress(OSError):
        if shutil.disk_usage(folder).free < FULL_DISK_BYTES:
            return os.strerror(errno.ENOSPC)
    return " ".join(text.split()) or type(exc).__name__


def check_counts(owner: str, minimum: int = 1, **values) -> None:
    """One line for a setting that must be a whole number of at least `minimum` (None: its default), as the CLI's
    options are checked: a caller of the Python API gets the same refusal, not a failure deep inside a run."""
    for name, value in values.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, Integral) or value < minimum):
            raise BmfnError(f"{owner}: {name}={value!r}, expected a whole number of at least {minimum}")


def counted(n, noun: str, plural: str | None = None) -> str:
    """'1 clip', '2 clips': a count and its noun, in the plural (`plural`, else the noun and 's') unless it is one."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def percent(value: float | None, std: float | None = None) -> str:
    """An accuracy as printed, with its standard deviation where given; '-' where a split has no clips."""
    if value is None:
        return "-"
    return f"{value:.2f} %" if std is None else f"{value:.2f} ± {std:.2f} %"


def printable(text: str) -> str:
    """`text` as it can be stored (HDF5 strings are UTF-8) and printed: the bytes of a file name that are not UTF-8,
    which Python keeps as surrogates, as \\xNN escapes."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


# Control characters but the tab, as Python escapes them: a file name may hold a line break.
_CONTROL_ESCAPES = {code: repr(chr(code))[1:-1] for code in (*range(9), *range(10, 32), 127)}


def one_line(text: str) -> str:
    """printable(text) for a terminal: line breaks and other control characters as escapes, so that a message
    naming a file called "a\\nb.mp4" stays one line (stores keep the name as it is)."""
    return printable(text).translate(_CONTROL_ESCAPES)
