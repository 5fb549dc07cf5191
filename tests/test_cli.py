"""The `bmfn` executable's entry point (the commands themselves are tested with their stages)."""

import errno
import gc
import os

import pytest
from click.testing import CliRunner

from bmfn_pipeline import cli


@pytest.mark.parametrize("code", [0, 1])
def test_run_keeps_the_exit_code_and_frees_cycles_before_freezing_the_rest(monkeypatch, code):
    class Cycle:
        finalised = False

        def __init__(self):
            self.me = self

        def __del__(self):
            Cycle.finalised = True

    def command():
        Cycle()  # garbage in a reference cycle: only a collection finalises it
        raise SystemExit(code)

    monkeypatch.setattr(cli, "main", command)
    assert gc.get_freeze_count() == 0
    gc.disable()  # no automatic collection in between: run() must do it
    try:
        with pytest.raises(SystemExit) as exit_:
            cli.run()
        frozen = gc.get_freeze_count()
    finally:
        gc.unfreeze()
        gc.enable()
    assert exit_.value.code == code
    assert Cycle.finalised
    assert frozen > 0  # what is left is skipped by shutdown's collections


def test_an_os_error_no_stage_named_is_one_line_with_its_file(monkeypatch):
    """A full disk or an unwritable folder met anywhere: one line naming the file and the system's reason."""
    from bmfn_pipeline import decode

    def full_disk(*_, **__):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "feats.h5.parts/clip.h5")

    monkeypatch.setattr(decode, "probe", full_disk)
    result = CliRunner().invoke(cli.main, ["probe", "clip.mp4"])
    assert result.exit_code == 1
    assert result.stderr == "bmfn: error: feats.h5.parts/clip.h5: No space left on device\n"
