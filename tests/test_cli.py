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
from bmfn_pipeline import evaluate as evaluate_module
from bmfn_pipeline import extract as extract_module
from bmfn_pipeline import train as train_module
from bmfn_pipeline.distributed import Shard
from bmfn_pipeline.errors import BmfnError
from bmfn_pipeline.localize import Localizer


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


def _captured_call(monkeypatch, module, name: str, arguments: list) -> tuple[tuple, dict]:
    """Run `bmfn ARGUMENTS` with `module.name` (the API function the command calls) replaced by one that keeps its
    arguments and stops the command: (args, kwargs) of that call."""
    calls = []

    def stop(*args, **kwargs):
        calls.append((args, kwargs))
        raise BmfnError("stopped by the test")

    monkeypatch.setattr(module, name, stop)
    result = CliRunner().invoke(cli.main, [str(a) for a in arguments])
    assert (result.exit_code, result.stderr) == (1, "bmfn: error: stopped by the test\n"), result.output
    assert len(calls) == 1
    return calls[0]


@pytest.fixture
def paths(tmp_path):
    """Files and folders for the options that must name existing ones, each with a name of its own."""
    for name in ("ave", "splits", "resume"):
        (tmp_path / name).mkdir()
    for name in ("feats.h5", "Annotations.txt", "best.pt", "vgg19.pth", "vggish.pth", "clip.mp4"):
        (tmp_path / name).write_bytes(b"")
    return tmp_path


def test_train_gives_each_option_to_its_field_of_the_train_config(monkeypatch, paths):
    """`bmfn train`: every option reaches TrainConfig in its own field (values that no default or other option has);
    without options the fields are None, for train() to fill per mode or from a resumed run."""
    (config,), _ = _captured_call(monkeypatch, train_module, "train", [
        "train", "--mode", "weakly", "--ave-dir", paths / "ave", "--features", paths / "feats.h5",
        "--annotations", paths / "Annotations.txt", "--splits", paths / "splits", "--out", paths / "run",
        "--epochs", "7", "--batch-size", "5", "--eval-batch-size", "3", "--lr", "0.25", "--milestones", "2,4",
        "--gamma", "0.75", "--clip", "0.125", "--seed", "11", "--seeds", "2", "--device", "cpu",
        "--precision", "bfloat16", "--no-cuda-graphs", "--compile", "--checkpoint-every", "9", "--select-on-test",
        "--esa-activation", "relu6", "--resume", paths / "resume", "--force", "--quiet"])
    assert {name: getattr(config, name) for name in (
        "mode", "ave_dir", "features", "annotations", "splits", "out", "epochs", "batch_size", "eval_batch_size",
        "lr", "milestones", "gamma", "clip", "seed", "seeds", "device", "precision", "cuda_graphs", "compile",
        "checkpoint_every", "select_on_test", "model", "resume", "force", "progress")} == {
        "mode": "weakly", "ave_dir": str(paths / "ave"), "features": str(paths / "feats.h5"),
        "annotations": str(paths / "Annotations.txt"), "splits": str(paths / "splits"), "out": str(paths / "run"),
        "epochs": 7, "batch_size": 5, "eval_batch_size": 3, "lr": 0.25, "milestones": (2, 4), "gamma": 0.75,
        "clip": 0.125, "seed": 11, "seeds": 2, "device": "cpu", "precision": "bfloat16", "cuda_graphs": False,
        "compile": True, "checkpoint_every": 9.0, "select_on_test": True, "model": {"esa_activation": "relu6"},
        "resume": str(paths / "resume"), "force": True, "progress": False}
    (config,), _ = _captured_call(monkeypatch, train_module, "train", ["train", "--cuda-graphs", "--no-compile"])
    assert (config.cuda_graphs, config.compile, config.select_on_test, config.model, config.progress) == (
        True, False, None, {}, True)
    assert all(getattr(config, name) is None for name in ("mode", "epochs", "eval_batch_size", "lr", "milestones",
                                                          "gamma", "clip", "seed", "seeds", "checkpoint_every"))


def test_evaluate_gives_each_option_to_its_argument(monkeypatch, paths):
    """`bmfn evaluate`: the checkpoint and every option reach evaluate() as the arguments they name."""
    args, kwargs = _captured_call(monkeypatch, evaluate_module, "evaluate", [
        "evaluate", "--checkpoint", paths / "best.pt", "--split", "val", "--ave-dir", paths / "ave",
        "--features", paths / "feats.h5", "--annotations", paths / "Annotations.txt", "--splits", paths / "splits",
        "--batch-size", "3", "--device", "cpu", "--precision", "tf32", "--force"])
    kwargs.pop("log")
    assert args == (str(paths / "best.pt"),)
    assert kwargs == {"split": "val", "ave_dir": str(paths / "ave"), "features": str(paths / "feats.h5"),
                      "annotations": str(paths / "Annotations.txt"), "splits": str(paths / "splits"),
                      "batch_size": 3, "device": "cpu", "precision": "tf32", "force": True}
    args, kwargs = _captured_call(monkeypatch, evaluate_module, "evaluate", ["evaluate", paths / "best.pt"])
    kwargs.pop("log")
    assert args == (str(paths / "best.pt"),)
    assert kwargs == {"split": "test", "ave_dir": None, "features": None, "annotations": None, "splits": None,
                      "batch_size": None, "device": "auto", "precision": None, "force": False}


def test_extract_gives_each_option_to_its_field_of_the_extract_options(monkeypatch, paths):
    """`bmfn extract`: every option reaches ExtractOptions or extract() in its own field; --seed is the random
    networks' seed with --weights random only."""
    args, kwargs = _captured_call(monkeypatch, extract_module, "extract", [
        "extract", paths / "clip.mp4", "--out", paths / "out.h5", "--annotations", paths / "Annotations.txt",
        "--splits", paths / "splits", "--frames-per-second", "3", "--visual", "torchvision", "--weights", "random",
        "--seed", "7", "--alignment", "exact", "--device", "cpu", "--precision", "int8", "--batch-size", "5",
        "--compile", "--dtype", "float16", "--workers", "2", "--video-decoder", "cuda", "--shard", "1/4"])
    inputs, out, options = args
    assert (inputs, out) == ((str(paths / "clip.mp4"),), str(paths / "out.h5"))
    assert kwargs == {"annotations": str(paths / "Annotations.txt"), "splits": str(paths / "splits"),
                      "shard": Shard(1, 4)}
    assert {name: getattr(options, name) for name in (
        "frames_per_second", "visual_source", "vgg19_weights", "vggish_weights", "random_seed", "alignment",
        "dtype", "device", "precision", "batch_size", "compile", "workers", "video_decoder")} == {
        "frames_per_second": 3, "visual_source": "torchvision", "vgg19_weights": None, "vggish_weights": None,
        "random_seed": 7, "alignment": "exact", "dtype": "float16", "device": "cpu", "precision": "int8",
        "batch_size": 5, "compile": True, "workers": 2, "video_decoder": "cuda"}
    (_, _, options), kwargs = _captured_call(monkeypatch, extract_module, "extract", [
        "extract", paths / "clip.mp4", "--seed", "7", "--vgg19-weights", paths / "vgg19.pth",
        "--vggish-weights", paths / "vggish.pth"])
    assert (options.vgg19_weights, options.vggish_weights, options.random_seed) == (
        str(paths / "vgg19.pth"), str(paths / "vggish.pth"), None)
    assert kwargs == {"annotations": None, "splits": None, "shard": None}


def test_localize_gives_each_option_to_its_argument_of_the_localizer(monkeypatch, paths):
    """`bmfn localize`: the checkpoint and every option that decides the labels reach Localizer.from_checkpoint."""
    args, kwargs = _captured_call(monkeypatch, Localizer, "from_checkpoint", [
        "localize", paths / "clip.mp4", "--checkpoint", paths / "best.pt", "--stride", "3",
        "--frames-per-second", "2", "--weights", "random", "--seed", "9", "--vgg19-weights", paths / "vgg19.pth",
        "--vggish-weights", paths / "vggish.pth", "--device", "cpu", "--batch-size", "6", "--precision", "int8",
        "--video-decoder", "cuda", "--force"])  # cuda: no first file read ahead in a process of its own
    kwargs.pop("log")
    assert args == (str(paths / "best.pt"),)
    assert kwargs == {"device": "cpu", "stride": 3, "batch_size": 6, "frames_per_second": 2, "weights": "random",
                      "vgg19_weights": str(paths / "vgg19.pth"), "vggish_weights": str(paths / "vggish.pth"),
                      "seed": 9, "precision": "int8", "force": True, "video_decoder": "cuda"}
