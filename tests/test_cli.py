"""The `bmfn` executable's entry point (the commands themselves are tested with their stages)."""

import gc

import pytest

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
