"""The `bmfn` executable's entry point (the commands themselves are tested with their stages)."""

import errno
import gc
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import BUFFERED

from bmfn_pipeline import cli


@pytest.mark.parametrize("code", [0, 1])
def test_run_keeps_the_exit_code_and_frees_cycles_before_freezing_the_rest(monkeypatch, code, handlers_kept):
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
    tuned = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: tuned.append(True))  # not in the test process
    frozen_before = gc.get_freeze_count()  # some Pythons start with objects frozen (375 in a pyenv 3.12.1)
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
    assert frozen > frozen_before  # what is left is skipped by shutdown's collections
    assert tuned == [True]


@pytest.mark.parametrize("rank", [None, "1"])
def test_an_interrupt_in_any_command_is_one_line_with_the_signals_status(tmp_path, monkeypatch, rank):
    """A command with nothing of its own to say on Ctrl-C or SIGTERM still ends in one line (not click's 'Aborted!'
    and status 1); under torchrun rank 0 alone says it."""
    import bmfn_pipeline.info as info_module

    def terminated(*args, **kwargs):
        raise cli.Terminated

    monkeypatch.setattr(info_module, "info", terminated)
    if rank:
        monkeypatch.setenv("RANK", rank)
    result = CliRunner().invoke(cli.main, ["info", str(tmp_path)])
    assert result.exit_code == 128 + 15 and result.stderr == ("" if rank else "bmfn: terminated\n")


@pytest.fixture
def handlers_kept():
    """The test process's signal handlers and unraisable hook, as they were after a test that runs the executable."""
    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGALRM)
    kept = [signal.getsignal(signum) for signum in signals], sys.unraisablehook
    yield kept
    for signum, handler in zip(signals, kept[0]):
        signal.signal(signum, handler)
    sys.unraisablehook = kept[1]


def test_the_executable_stops_on_sigterm_and_gives_the_handlers_back(monkeypatch, handlers_kept):
    def command():
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(cli, "main", command)
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: None)
    with pytest.raises(cli.Terminated):  # main's own commands turn it into their line (above)
        cli.run(exiting=False)
    assert ([signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM)],
            sys.unraisablehook) == handlers_kept


def test_a_sigterm_that_lands_in_a_finaliser_still_stops_the_command(monkeypatch, handlers_kept):
    """Python drops an exception raised in a finaliser (printing 'Exception ignored'): the command went on to the
    end and exited 0 (5 of 40 SIGTERMs to export-ave in a review). The signal is raised again."""
    went_on = []

    class Finalised:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)  # its handler runs at the next line: here, in the finaliser
            went_on.append("finaliser")

    def command():
        Finalised()
        time.sleep(1)  # the signal raised again lands here, in a command that goes on for more than 10 ms
        went_on.append("command")

    monkeypatch.setattr(cli, "main", command)
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: None)
    with pytest.raises(cli.Terminated):
        cli.run(exiting=False)
    assert went_on == []


def test_a_finished_command_is_not_killed_while_the_executable_exits(monkeypatch, handlers_kept):
    """A SIGTERM (or Ctrl-C) while the executable collects garbage before exiting (0.3 s with torch loaded): the
    command is done, and the process exits 0 instead of dying of the signal."""
    collect = cli.gc.collect

    def signalled_meanwhile():
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        return collect()

    monkeypatch.setattr(cli, "main", lambda: None)
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: None)
    monkeypatch.setattr(cli.gc, "collect", signalled_meanwhile)
    cli.run()  # returns: the signals are ignored now
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN is signal.getsignal(signal.SIGINT)


# The layer outputs (MB) that a batch of 4 frames through VGG-19 allocates and frees, each allocated before the
# previous one is freed.
_LAYER_OUTPUTS_MB = (12.8, 12.8, 3.2, 6.4, 6.4, 1.6, 3.2, 3.2, 3.2, 3.2, 0.8, 1.6, 1.6, 1.6, 1.6, 0.4, 0.4, 0.1)
_FAULTS = f"""
import resource, sys
import numpy as np
from bmfn_pipeline import cli
print(cli.keep_freed_memory() if sys.argv[1] == "keep" else False)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for batch in range(20):
    previous = np.ones(2_400_000, np.float32)
    for megabytes in {_LAYER_OUTPUTS_MB}:
        output = np.ones(int(megabytes * 1e6), np.uint8)
        del previous
        previous = output
    del previous
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_the_executable_keeps_freed_memory_for_the_next_batch():
    """With glibc, a network's per-batch allocations reuse the memory the previous batch freed instead of faulting
    fresh pages in: measured by the page faults of the same allocations in two fresh processes."""
    runs = {how: subprocess.run([sys.executable, "-c", _FAULTS, how], capture_output=True, text=True, check=True,
                                cwd=Path(cli.__file__).parents[1]).stdout.split() for how in ("default", "keep")}
    if runs["keep"][0] != "True":
        pytest.skip("the C library is not glibc: its allocator is left as it is")
    assert int(runs["keep"][1]) * 5 < int(runs["default"][1]), runs


def test_an_os_error_no_stage_named_is_one_line_with_its_file(monkeypatch):
    """A full disk or an unwritable folder met anywhere: one line naming the file and the system's reason."""
    from bmfn_pipeline import decode

    def full_disk(*_, **__):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "feats.h5.parts/clip.h5")

    monkeypatch.setattr(decode, "probe", full_disk)
    result = CliRunner().invoke(cli.main, ["probe", "clip.mp4"])
    assert result.exit_code == 1
    assert result.stderr == "bmfn: error: feats.h5.parts/clip.h5: No space left on device\n"


REPO = Path(cli.__file__).parents[1]


@pytest.mark.parametrize("unbuffered", [False, True], ids=["buffered", "unbuffered"])
@pytest.mark.parametrize("arguments", [["probe", "--json"], ["--version"]], ids=["command", "outside-a-command"])
def test_standard_output_that_takes_nothing_more_is_one_line(video_dir, arguments, unbuffered):
    """A full disk behind standard output (or a reader that has gone): one line and exit code 1, not Python's
    'Exception ignored' at exit (code 120) or click's traceback. Unbuffered (PYTHONUNBUFFERED, as in the Docker
    image), the failed write itself raises, and the line named no file: it names standard output too."""
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "bmfn_pipeline", *arguments, *([str(video_dir)] * (
            arguments[0] == "probe"))], stdout=full, stderr=subprocess.PIPE, text=True, cwd=REPO,
            env={**BUFFERED, **({"PYTHONUNBUFFERED": "1"} if unbuffered else {})})
    assert (done.returncode, done.stderr) == (1, "bmfn: error: standard output: No space left on device\n")


def test_a_closed_standard_error_costs_nothing_but_the_notes(video_dir, tmp_path):
    """`2>&-` (Python then has no sys.stderr): the command still does its work."""
    out = tmp_path / "feats.h5"
    done = subprocess.run([sys.executable, "-m", "bmfn_pipeline", "extract", str(video_dir / "ave_0lFf-HP86Q0.mp4"),
                           "--out", str(out), "--weights", "random", "--frames-per-second", "1", "--workers", "0"],
                          stdout=subprocess.PIPE, text=True, cwd=REPO, preexec_fn=lambda: os.close(2))
    assert done.returncode == 0 and f"1 extracted, 0 already done, 0 failed -> {out}" in done.stdout


def test_every_option_of_every_command_says_what_it_does():
    """README: `bmfn <command> --help` lists every option; each with a description, not a bare name and type."""
    import click

    bare = [f"bmfn {name} {option.opts[0]}" for name, command in cli.main.commands.items()
            for option in command.params if isinstance(option, click.Option) and not option.help]
    assert bare == []
