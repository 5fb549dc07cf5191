"""Writes that fail (a full disk, a file-size limit, a read-only folder) as one line, keeping what was there."""

from __future__ import annotations

import errno
import os
import shutil
from collections import namedtuple

import pytest

from bmfn_pipeline import errors
from bmfn_pipeline.errors import WriteError, written

# A failure as each writer reports it: the system, HDF5 (errno's words inside its own text), torch.save (nothing).
HDF5_FLUSH = ("Unable to flush raw data (file write failed: time = Fri Nov 27 06:19:20 2026\n, filename = "
              "'z/feats.h5.tmp-13452', file descriptor = 5, errno = 27, error message = 'File too large', buf = 0x1)")
TORCH_SAVE = "[enforce fail at inline_container.cc:672] . unexpected pos 96606080 vs 96605968"


@pytest.mark.parametrize("failure, reason", [
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    (RuntimeError(HDF5_FLUSH), "File too large"),
    (RuntimeError(TORCH_SAVE), TORCH_SAVE),
], ids=["system", "hdf5", "torch"])
def test_a_failed_write_keeps_the_previous_file_and_says_why_in_one_line(tmp_path, failure, reason):
    path = tmp_path / "result.json"
    path.write_text("the earlier result")
    with pytest.raises(WriteError) as refused:
        with written(path) as tmp:
            tmp.write_text("half of the new one")
            raise failure
    assert str(refused.value) == f"{path}: cannot write ({reason})"
    assert path.read_text() == "the earlier result" and os.listdir(tmp_path) == ["result.json"]


def test_a_write_that_fails_without_saying_why_on_a_full_disk_is_put_down_to_it(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: usage(10 << 30, 10 << 30, 4096))
    with pytest.raises(WriteError, match=r"cannot write \(No space left on device\)$"):
        with written(tmp_path / "last.pt"):
            raise RuntimeError(TORCH_SAVE)


def test_what_was_written_and_what_became_of_the_work_join_the_line():
    assert str(WriteError("a.json", "File too large", "the json result", "b.json was written")) == (
        "a.json: cannot write the json result: File too large; b.json was written")


def test_an_interrupted_write_leaves_no_temporary_file_and_is_not_a_write_error(tmp_path):
    path = tmp_path / "best.pt"
    with pytest.raises(KeyboardInterrupt):
        with written(path) as tmp:
            tmp.write_bytes(b"partial")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_an_hdf5_write_failure_is_remembered_for_the_exit(tmp_path, monkeypatch):
    monkeypatch.setattr(errors, "hdf5_write_failed", False)
    with pytest.raises(WriteError):
        with written(tmp_path / "a.h5"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert not errors.hdf5_write_failed
    with pytest.raises(WriteError):
        with written(tmp_path / "b.h5", hdf5=True):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert errors.hdf5_write_failed
