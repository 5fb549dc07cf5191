"""Training: learning on a synthetic AVE-format task, resume, checkpoints, provenance, NaN stop, CLI chain."""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import per_branch_state_dict
from test_data import (SMALL_MODEL, STORE_PROVENANCE, make_ave_dir, make_empty_interval_store, make_store,
                       without_video_classes)

from bmfn_pipeline import ave, train as train_module
from bmfn_pipeline.cli import main
from bmfn_pipeline.data import compact_visual, load_store
from bmfn_pipeline.errors import BmfnError, WriteError
from bmfn_pipeline.evaluate import eval_batch_size, evaluate
from bmfn_pipeline.model import BMFN, BMFNConfig
from bmfn_pipeline.train import (REFERENCE, TrainConfig, check_provenance, latest_checkpoint, load_checkpoint,
                                 resolve_checkpoint, train)

FAST = {"batch_size": 8, "lr": 2e-3, "clip": 1.0, "milestones": (100,), "model": SMALL_MODEL, "progress": False}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def quiet(*_):
    pass


def test_reference_hyper_parameters():
    """bmfn-reference.md section 7."""
    fully, weakly = TrainConfig(mode="fully").resolved(), TrainConfig(mode="weakly").resolved()
    assert (fully.lr, fully.milestones, fully.gamma, fully.epochs, fully.batch_size, fully.clip,
            fully.seed) == (5e-4, (10, 20, 30), 0.5, 200, 32, 0.1, 890)
    assert eval_batch_size(torch.device("cpu")) == 16 and eval_batch_size(torch.device("cpu"), 4) == 4
    assert (weakly.milestones, weakly.clip, weakly.seed) == ((5, 20, 40), 0.5, 550)
    assert TrainConfig(mode="fully", lr=1e-3).resolved().lr == 1e-3
    assert (fully.precision, fully.cuda_graphs, fully.checkpoint_every) == ("float32", True, 60.0)


def test_fully_supervised_learns_and_writes_the_run(tmp_path):
    directory = make_ave_dir(tmp_path / "ave", n_clips=60)
    result = train(TrainConfig(mode="fully", ave_dir=str(directory), out=str(tmp_path / "run"), epochs=4, **FAST),
                   log=quiet)
    run = result.runs[0]
    assert run.test_acc >= 90 and run.val_acc >= 90
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2, 3, 4]
    assert {"loss", "train_acc", "val_acc", "test_acc", "lr", "time"} <= set(lines[0])
    assert lines[-1]["loss"] < lines[0]["loss"]
    best_val = max(line["val_acc"] for line in lines)
    assert run.best_epoch == max(line["epoch"] for line in lines if line["val_acc"] == best_val)  # last of a tie
    for name in ("best.pt", "last.pt", "curves.png", "command.txt", "run.json"):
        assert (tmp_path / "run" / name).is_file(), name

    state = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert state["epoch"] == run.best_epoch and len(state["class_names"]) == ave.NUM_CLASSES
    assert state["provenance"]["visual"]["weights"] == "vgg19-keras"
    assert "optimizer" in torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    model, meta = load_checkpoint(tmp_path / "run" / "best.pt")
    assert not model.training and meta["bmfn_version"]
    # the reloaded checkpoint reproduces the test accuracy recorded for the selected epoch
    assert evaluate(tmp_path / "run" / "best.pt", plot=False).accuracy == pytest.approx(run.test_acc)
    # ... and evaluates the split it is asked for: its clips, each true class's segments, its accuracy
    labels = ave.segment_labels(ave.read_annotations(directory / "Annotations.txt")).argmax(-1)
    for split in ("train", "val"):
        rows = ave.load_splits(directory)[split]
        report = evaluate(tmp_path / "run" / "best.pt", split=split, plot=False)
        assert (report.clips, report.segments) == (len(rows), 10 * len(rows))
        np.testing.assert_array_equal(np.array(report.confusion).sum(axis=1),
                                      np.bincount(labels[rows].ravel(), minlength=ave.NUM_CLASSES))
    assert evaluate(tmp_path / "run" / "best.pt", split="val", plot=False).accuracy == pytest.approx(run.val_acc)
    with pytest.raises(BmfnError, match=r"^split 'dev': use train, val or test$"):  # not a KeyError
        evaluate(tmp_path / "run" / "best.pt", split="dev", plot=False)


def test_quiet_training_shows_no_bar_while_converting_the_visual_file(tmp_path, capsys):
    directory = make_ave_dir(tmp_path / "ave", n_clips=12)
    train(TrainConfig(ave_dir=str(directory), out=str(tmp_path / "run"), epochs=1, **FAST), log=quiet)
    assert (directory / "visual_feature.f16.npy").is_file()  # converted by this run
    assert "float16 cache" not in capsys.readouterr().err
    other = make_ave_dir(tmp_path / "other", n_clips=12)
    compact_visual(other / "visual_feature.h5")  # the bar a run with progress shows, which the check above looks for
    assert "visual_feature.h5 -> float16 cache (once)" in capsys.readouterr().err


def test_weakly_supervised_learns_from_video_labels(tmp_path, monkeypatch):
    directory = make_ave_dir(tmp_path / "ave", n_clips=60, noisy=20)
    logged, targets = [], []
    original = train_module.weakly_supervised_loss
    monkeypatch.setattr(train_module, "weakly_supervised_loss",
                        lambda output, labels: targets.append(labels.argmax(-1)) or original(output, labels))
    result = train(TrainConfig(mode="weakly", ave_dir=str(directory), out=str(tmp_path / "run"), epochs=6,
                               **{**FAST, "lr": 5e-3}), log=logged.append)
    assert any("+ 20 background clips" in line for line in logged)
    assert not any("no background-only clips" in line for line in logged)
    # every epoch trains on the 40 training clips' video classes and the 20 background clips
    targets = torch.cat(targets)
    assert len(targets) == 6 * 60 and (targets == ave.BACKGROUND).sum() == 6 * 20
    run = result.runs[0]
    rows = ave.read_annotations(directory / "Annotations.txt")
    labels = ave.segment_labels(rows)
    test_rows = ave.load_splits(directory)["test"]
    always_background = 100 * (labels[test_rows].argmax(-1) == ave.BACKGROUND).mean()
    assert run.test_acc >= 50 and run.test_acc >= always_background + 15


def test_an_empty_val_split_stops_training_and_names_the_way_on(tmp_path):
    directory = make_ave_dir(tmp_path / "ave", n_clips=12)
    with h5py.File(directory / "val_order.h5", "r") as f:
        val = f["order"][()]
    with h5py.File(directory / "train_order.h5", "a") as f:  # the val clips go to train: val is empty
        train_rows = np.concatenate([f["order"][()], val])
        del f["order"]
        f["order"] = train_rows
    with h5py.File(directory / "val_order.h5", "w") as f:
        f["order"] = np.zeros(0, np.int64)
    config = dict(mode="fully", ave_dir=str(directory), epochs=1, **FAST)
    with pytest.raises(BmfnError, match=r"val split is empty .*; model selection needs it \(--select-on-test"):
        train(TrainConfig(out=str(tmp_path / "run"), **config), log=quiet)
    assert not (tmp_path / "run").exists()
    result = train(TrainConfig(out=str(tmp_path / "run"), select_on_test=True, **config), log=quiet)
    assert result.runs[0].best_epoch == 1 and (tmp_path / "run" / "best.pt").is_file()


def test_resume_continues_where_the_run_stopped(tmp_path):
    directory = make_ave_dir(tmp_path / "ave", n_clips=24)
    # A milestone after the resume point: the resumed run must halve the rate where the straight one does.
    config = dict(mode="fully", ave_dir=str(directory), **{**FAST, "milestones": (3,)})
    train(TrainConfig(out=str(tmp_path / "straight"), epochs=4, **config), log=quiet)
    train(TrainConfig(out=str(tmp_path / "resumed"), epochs=2, **config), log=quiet)
    with open(tmp_path / "resumed" / "metrics.jsonl", "a") as f:  # lines written just before a kill are dropped,
        f.write(json.dumps({"epoch": 3, "loss": 0.0}) + "\n" + '{"epoch": 4, "lo')  # a torn one too
    # As a CUDA run saves it (fused, capturable Adam): resuming on the CPU must switch both off again. And as bmfn
    # before 8f94c53 saved it, with the grouped weights' Adam moments contiguous: they must take their parameters'
    # layout again (fused Adam requires it).
    last = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    for group in last["optimizer"]["param_groups"]:
        group.update(fused=True, capturable=True)
    for moments in last["optimizer"]["state"].values():
        moments.update({key: value.contiguous() for key, value in moments.items() if key != "step"})
    torch.save(last, tmp_path / "resumed" / "last.pt")
    result = train(TrainConfig(resume=str(tmp_path / "resumed"), epochs=4, progress=False), log=quiet)
    assert result.runs[0].epochs == 4

    def metrics(run):
        lines = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in line.items() if k != "time"} for line in lines]

    assert [line["lr"] for line in metrics("straight")] == [2e-3, 2e-3, 2e-3, 1e-3]
    assert metrics("resumed") == metrics("straight")
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["model_state"]
    resumed = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    b = resumed["model_state"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    names = [name for name, _ in BMFN(BMFNConfig(**resumed["model_config"])).named_parameters()]
    moments = resumed["optimizer"]["state"]
    assert any(not b[name].is_contiguous() for name in names)  # the grouped weights
    assert all(moments[i][key].stride() == b[name].stride() for i, name in enumerate(names)
               for key in ("exp_avg", "exp_avg_sq"))


def test_resume_keeps_the_epoch_selected_before_the_stop(tmp_path, monkeypatch):
    """The selection survives a resume: with val accuracy best at epoch 1, epochs 3 and 4 of the resumed run (no
    better) leave epoch 1 selected, in the result, the metrics and best.pt."""
    directory = make_ave_dir(tmp_path / "ave", n_clips=12)
    accuracies = [60.0, 60.0, 50.0, 50.0]  # (val, test) per epoch: epoch 1 best on val
    monkeypatch.setattr(train_module, "_split_accuracy", lambda *_: accuracies.pop(0))
    train(TrainConfig(mode="fully", ave_dir=str(directory), out=str(tmp_path / "run"), epochs=2, **FAST), log=quiet)
    accuracies += [55.0, 55.0, 40.0, 40.0]
    result = train(TrainConfig(resume=str(tmp_path / "run"), epochs=4, progress=False), log=quiet)
    assert (result.runs[0].best_epoch, result.runs[0].val_acc) == (1, 60.0)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["best"] for line in lines] == [True, False, False, False]
    assert torch.load(tmp_path / "run" / "best.pt", weights_only=True)["epoch"] == 1


def test_epoch_loss_and_train_accuracy_are_means_over_clips_and_segments(tmp_path, monkeypatch):
    """metrics.jsonl's loss is the mean over training clips of their batch's loss (a short last batch weighs
    less), and train_acc the share of training segments predicted right. Each batch's loss is made its size and
    every prediction background here, so both are known: 16 training clips in batches of 6, 6 and 4."""
    directory = make_ave_dir(tmp_path / "ave", n_clips=24)
    original = train_module.fully_supervised_loss
    monkeypatch.setattr(train_module, "fully_supervised_loss",
                        lambda output, labels: original(output, labels) * 0 + len(labels))
    monkeypatch.setattr(train_module, "predict_segments",
                        lambda output: torch.full(output.event_logits.shape, ave.BACKGROUND))
    result = train(TrainConfig(mode="fully", ave_dir=str(directory), out=str(tmp_path / "run"), epochs=1,
                               **{**FAST, "batch_size": 6}), log=quiet)
    (record,) = result.runs[0].history
    assert record["loss"] == pytest.approx((6 * 6 + 6 * 6 + 4 * 4) / 16)
    train_rows = ave.load_splits(directory)["train"]
    assert len(train_rows) == 16
    labels = ave.segment_labels(ave.read_annotations(directory / "Annotations.txt"))[train_rows].argmax(-1)
    assert record["train_acc"] == pytest.approx(100 * (labels == ave.BACKGROUND).mean())
    assert 0 < record["train_acc"] < 100


def test_a_broken_metrics_line_of_a_kept_epoch_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1, "loss": 1.0}\n{"epoch": 2, "lo\n')
    with pytest.raises(BmfnError, match=r"metrics\.jsonl: line 2 is not a metrics record .*epochs up to 2"):
        train_module._read_metrics(path, keep_through=2)
    assert train_module._read_metrics(path, keep_through=1) == [{"epoch": 1, "loss": 1.0}]
    assert path.read_text() == '{"epoch": 1, "loss": 1.0}\n'


def test_resume_keeps_the_runs_settings_and_records_the_ones_given(tmp_path):
    """A plain `bmfn train --resume` goes on in the run's precision, CUDA graphs and checkpoint interval; what is
    given (more epochs, another precision) is written to run.json, so that the next plain resume keeps it."""
    directory = make_ave_dir(tmp_path / "ave", n_clips=12)
    run = tmp_path / "run"
    train(TrainConfig(mode="fully", ave_dir=str(directory), out=str(run), epochs=1, precision="bfloat16",
                      cuda_graphs=False, checkpoint_every=0, **FAST), log=quiet)
    runner = CliRunner()
    result = runner.invoke(main, ["train", "--resume", str(run), "--epochs", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    assert re.search(r"^run: .*, bfloat16\)$", result.output, re.M)
    saved = json.loads((run / "run.json").read_text())["config"]
    assert (saved["epochs"], saved["precision"], saved["cuda_graphs"], saved["checkpoint_every"]) == \
        (2, "bfloat16", False, 0)
    result = runner.invoke(main, ["train", "--resume", str(run), "--precision", "float32", "--quiet"])
    assert result.exit_code == 0 and re.search(r"^run: .*, float32\)$", result.output, re.M)
    saved = json.loads((run / "run.json").read_text())["config"]
    assert (saved["epochs"], saved["precision"]) == (2, "float32")
    lines = []
    assert train(TrainConfig(resume=str(run), progress=False), log=lines.append).runs[0].epochs == 2
    assert f"seed 890: all 2 epochs are done ({run / 'last.pt'}); --epochs 3 or more trains on" in lines  # not
    # "resuming after epoch 2", then nothing
    # what shapes the learning stays the run's: another value given was dropped without a word
    other = runner.invoke(main, ["train", "--resume", str(run), "--lr", "0.01", "--epochs", "3", "--quiet"])
    assert other.exit_code == 1 and other.output == (f"bmfn: error: {run}: a resumed run keeps its own --lr (0.002), "
                                                     "not 0.01; train a new run for another\n")
    same = runner.invoke(main, ["train", "--resume", str(run), "--lr", "0.002", "--batch-size", "8", "--quiet"])
    assert same.exit_code == 0, same.output
    (tmp_path / "other.h5").touch()
    for given, own in ((["--mode", "weakly"], "fully"), (["--features", str(tmp_path / "other.h5")], "none"),
                       (["--seeds", "2"], "1"), (["--esa-activation", "relu6"], "sigmoid")):
        other = runner.invoke(main, ["train", "--resume", str(run), *given, "--quiet"])
        assert other.exit_code == 1, other.output
        assert f"a resumed run keeps its own {given[0]} ({own}), not {given[1]}; " in other.output, other.output
    other = runner.invoke(main, ["train", "--resume", str(run), "--out", str(tmp_path / "elsewhere"), "--quiet"])
    assert other.exit_code == 1 and f"goes on in its own folder, not --out {tmp_path / 'elsewhere'}" in other.output
    # ... judged by what it makes: the default activation given is the run's network, as its data folder is
    for given in ({"model": {"esa_activation": "sigmoid"}}, {"mode": "fully", "seeds": 1}, {"ave_dir": directory}):
        train_module._resume_config(TrainConfig(resume=str(run), **given))  # not refused
    # --compile and --eval-batch-size are how the run goes on, as --precision is: kept for later resumes (they
    # were dropped, the run's own kept)
    resumed, _ = train_module._resume_config(TrainConfig(resume=str(run), compile=True, eval_batch_size=4))
    assert (resumed.compile, resumed.eval_batch_size) == (True, 4)
    assert not train_module._resume_config(TrainConfig(resume=str(run)))[0].compile
    fewer = runner.invoke(main, ["train", "--resume", str(run), "--epochs", "1", "--quiet"])  # 2 are done
    assert fewer.exit_code == 1 and "2 epochs are done, more than --epochs 1; resume with --epochs 3" in fewer.output
    assert json.loads((run / "run.json").read_text())["config"]["epochs"] == 2
    # TF32 is CUDA's: on the CPU a run (and an evaluation) in tf32 says it computes in float32
    note = "note: tf32 is a CUDA matmul mode: on the CPU this computes in float32"
    tf32 = runner.invoke(main, ["train", "--resume", str(run), "--epochs", "3", "--precision", "tf32", "--device",
                                "cpu", "--quiet"])
    assert tf32.exit_code == 0 and re.search(rf"^run: .*, tf32\)\n{note}$", tf32.output, re.M), tf32.output
    logged = []
    evaluate(run, split="val", device="cpu", precision="tf32", plot=False, log=logged.append)
    assert logged == [note]


def test_resume_sees_the_apis_explicit_selection_and_background_clips(tmp_path, monkeypatch):
    """select_on_test=False and include_noisy=True given to the Python API on a run made otherwise were taken as not
    given (they were the fields' defaults) and dropped without a word; a plain resume keeps the run's own. Every
    other setting of what the run learns from, and how, given otherwise is refused too, naming the run's value;
    checkpoint_every=0 and cuda_graphs=False given (false, yet given) are taken."""
    run = tmp_path / "run"
    train(TrainConfig(mode="weakly", ave_dir=str(make_ave_dir(tmp_path / "ave", n_clips=12)), out=str(run),
                      epochs=1, select_on_test=True, include_noisy=False, **FAST), log=quiet)
    for given, option, own in (({"select_on_test": False}, "--select-on-test", True),
                               ({"include_noisy": True}, "include_noisy", False)):
        with pytest.raises(BmfnError, match=f"a resumed run keeps its own {option} \\({own}\\), not {not own}; "):
            train_module._resume_config(TrainConfig(resume=str(run), **given))
    folder = (tmp_path / "ave").resolve()
    for name, value, own in (("mode", "fully", "weakly"), ("ave_dir", str(tmp_path / "other"), folder),
                             ("annotations", str(tmp_path / "alt.txt"), "none"),
                             ("splits", str(tmp_path / "splits"), "none"), ("batch_size", 4, 8), ("gamma", 0.1, 0.5),
                             ("milestones", (5, 10), (100,)), ("clip", 0.5, 1.0), ("seed", 1, 550)):
        option = f"--{name.replace('_', '-')}"
        with pytest.raises(BmfnError, match=re.escape(f"a resumed run keeps its own {option} ({own}), not {value}; ")):
            train_module._resume_config(TrainConfig(resume=str(run), **{name: value}))
    resumed, _ = train_module._resume_config(TrainConfig(resume=str(run), checkpoint_every=0, cuda_graphs=False))
    assert (resumed.checkpoint_every, resumed.cuda_graphs) == (0, False)  # the run's own: 60 s, True
    # paths as the files they name: the run's folders given relative to the current folder are its own
    monkeypatch.chdir(tmp_path)
    train_module._resume_config(TrainConfig(resume=str(run), out="run", ave_dir="ave"))  # not refused
    with pytest.raises(BmfnError, match=re.escape(f"keeps its own --ave-dir ({folder}), not run; ")):
        train_module._resume_config(TrainConfig(resume="run", ave_dir="run"))
    with pytest.raises(BmfnError, match=r"keeps its own esa_layers \(2\), not 1; "):  # an API-only model field
        train_module._resume_config(TrainConfig(resume=str(run), model={**SMALL_MODEL, "esa_layers": 1}))
    resumed, _ = train_module._resume_config(TrainConfig(resume=str(run), select_on_test=True))
    assert (resumed.select_on_test, resumed.include_noisy) == (True, False)
    new = TrainConfig().resolved()  # a new run's defaults
    assert (new.select_on_test, new.include_noisy) == (False, True)


def test_a_checkpoint_that_cannot_be_written_stops_the_run_in_one_line_keeping_the_last_ones(tmp_path, monkeypatch):
    """A disk that fills up mid-save: torch.save's error says nothing of it (the writer's stream just fails)."""
    directory = make_ave_dir(tmp_path / "ave", n_clips=12)
    run = tmp_path / "run"
    train(TrainConfig(mode="fully", ave_dir=str(directory), out=str(run), epochs=1, checkpoint_every=0, **FAST),
          log=quiet)
    before = {name: (run / name).read_bytes() for name in ("best.pt", "last.pt")}
    save = torch.save

    def disk_fills_up(state, path):
        save(state, path)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 96606080 vs 96605968")

    monkeypatch.setattr(torch, "save", disk_fills_up)
    monkeypatch.setattr("shutil.disk_usage", lambda folder: shutil._ntuple_diskusage(1 << 40, 1 << 40, 0))
    with pytest.raises(WriteError, match=rf"^{re.escape(str(run))}/(best|last)\.pt: cannot write \(No space left on "
                                         r"device\)$"):
        train(TrainConfig(resume=str(run), epochs=2, progress=False), log=quiet)
    assert {name: (run / name).read_bytes() for name in before} == before
    assert not list(run.glob("*.tmp"))


def test_training_curves_that_cannot_be_drawn_cost_a_warning_not_the_run(tmp_path, monkeypatch):
    def full_disk(figure, path, **kwargs):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr("matplotlib.figure.Figure.savefig", full_disk)
    logged = []
    result = train(TrainConfig(mode="fully", ave_dir=str(make_ave_dir(tmp_path / "ave", n_clips=12)),
                               out=str(tmp_path / "run"), epochs=1, **FAST), log=logged.append)
    assert result.runs[0].best_epoch == 1 and (tmp_path / "run" / "best.pt").is_file()
    assert f"warning: {tmp_path / 'run' / 'curves.png'}: cannot write (No space left on device): no training " \
           "curves" in logged


def test_resume_of_a_run_stopped_before_its_first_last_pt_says_it_starts_again(tmp_path):
    directory = make_ave_dir(tmp_path / "ave", n_clips=12)
    run = tmp_path / "run"
    train(TrainConfig(mode="fully", ave_dir=str(directory), out=str(run), epochs=1, **FAST), log=quiet)
    (run / "last.pt").unlink()  # as a run stopped in its first minute leaves it: best.pt only
    (run / "summary.json.tmp").write_text("{")  # as a kill while writing a file of the run leaves it
    (run / "notes.tmp").write_text("the user's")
    lines = []
    result = train(TrainConfig(resume=str(run), epochs=2, progress=False), log=lines.append)
    assert f"seed 890: no last.pt in {run} yet: starting from epoch 1" in lines
    assert [record["epoch"] for record in result.runs[0].history] == [1, 2]
    assert not (run / "summary.json.tmp").exists() and (run / "notes.tmp").read_text() == "the user's"


def test_checkpoints_of_bmfn_before_grouping_load_and_refuse_to_resume(tmp_path):
    directory = make_ave_dir(tmp_path / "ave", n_clips=24)
    run = tmp_path / "run"
    train(TrainConfig(mode="fully", ave_dir=str(directory), out=str(run), epochs=1, **FAST), log=quiet)
    model, _ = load_checkpoint(run / "best.pt")
    for name in ("best.pt", "last.pt"):  # as the previous layout wrote them: one module per block
        state = torch.load(run / name, weights_only=True)
        state["model_state"] = per_branch_state_dict(state["model_state"])
        torch.save(state, run / name)
    old, _ = load_checkpoint(run / "best.pt")
    c = model.config
    visual, audio = torch.rand(2, 10, 2, 2, c.visual_dim), torch.rand(2, 10, c.audio_dim)  # SMALL_MODEL: 4 cells
    with torch.no_grad():
        assert torch.equal(model(visual, audio).event_logits, old(visual, audio).event_logits)
    with pytest.raises(BmfnError, match="earlier bmfn with one module per block"):
        train(TrainConfig(resume=str(run), epochs=2, progress=False), log=quiet)
    # sizes written as whole floats (an earlier bmfn took model={"segments": 10.0}) load; a config that cannot be
    # used is named with its file
    state = torch.load(run / "best.pt", weights_only=True)
    state["model_config"]["segments"] = 10.0
    torch.save(state, run / "best.pt")
    assert load_checkpoint(run / "best.pt")[0].config.segments == 10
    state["model_config"]["heads"] = 0
    torch.save(state, run / "best.pt")
    with pytest.raises(BmfnError, match=f"^{re.escape(str(run / 'best.pt'))}: its model_config cannot be used "
                                        r"\(BMFN config: heads=0, expected a whole number of at least 1\)$"):
        load_checkpoint(run / "best.pt")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    directory = make_ave_dir(tmp_path / "ave", n_clips=12)
    calls = []

    original = train_module.fully_supervised_loss

    def failing(output, labels):
        calls.append(1)
        loss = original(output, labels)
        return loss * float("nan") if len(calls) > nan_after else loss  # 8 training clips: one batch per epoch

    nan_after = 1

    monkeypatch.setattr(train_module, "fully_supervised_loss", failing)
    with pytest.raises(BmfnError, match=r"loss became nan at epoch 2, batch 1.*last\.pt \(epoch 1\)"):
        train(TrainConfig(mode="fully", ave_dir=str(directory), out=str(tmp_path / "run"), epochs=3,
                          checkpoint_every=0, **FAST), log=quiet)
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 1
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1
    # last.pt written after epoch 1 only (then every hour), epoch 2 the best on val, NaN in epoch 3 of a float32 run
    calls.clear()
    nan_after = 2
    accuracies = [50.0, 50.0, 55.0, 55.0]  # (val, test) per epoch
    monkeypatch.setattr(train_module, "_split_accuracy", lambda *_: accuracies.pop(0))
    with pytest.raises(BmfnError) as stopped:
        train(TrainConfig(mode="fully", ave_dir=str(directory), out=str(tmp_path / "run2"), epochs=4,
                          checkpoint_every=3600, precision="float32", **FAST), log=quiet)
    assert str(stopped.value).endswith("training stopped. Kept: last.pt (epoch 1), best.pt (epoch 2, the best so "
                                       "far). Try a lower --lr or --clip")
    assert torch.load(tmp_path / "run2" / "best.pt", weights_only=True)["epoch"] == 2
    assert torch.load(tmp_path / "run2" / "last.pt", weights_only=True)["epoch"] == 1
    load_checkpoint(tmp_path / "run2")
    diverged = torch.load(tmp_path / "run2" / "best.pt", weights_only=True)  # as a run at an infinite lr wrote it
    next(iter(diverged["model_state"].values())).view(-1)[0] = float("nan")
    torch.save(diverged, tmp_path / "diverged.pt")
    with pytest.raises(BmfnError, match=r"diverged.pt: 1 of its weights are not finite \(NaN or infinity\)"):
        load_checkpoint(tmp_path / "diverged.pt")


def test_checkpoints_are_written_at_intervals_and_best_is_the_selected_epoch(tmp_path, monkeypatch):
    """With a long interval, last.pt is written only after the first epoch (a run stopped early can resume) and at
    the end, yet best.pt holds the selected epoch's weights."""
    directory = make_ave_dir(tmp_path / "ave", n_clips=24)
    saved = []
    original = train_module._save
    monkeypatch.setattr(train_module, "_save", lambda state, path: (saved.append((path.name, state["epoch"])),
                                                                     original(state, path)))
    # Selection on val is made to prefer epoch 2 of 4, so best.pt must not be the last epoch's weights.
    monkeypatch.setattr(train_module, "_split_accuracy", lambda *_: 50.0 + (calls.pop(0) if calls else 0))
    calls = [0, 0, 5, 5, 1, 1, 2, 2]  # (val, test) per epoch: epoch 2 is best on val
    result = train(TrainConfig(mode="fully", ave_dir=str(directory), out=str(tmp_path / "run"), epochs=4,
                               checkpoint_every=3600, **FAST), log=quiet)
    assert result.runs[0].best_epoch == 2
    assert saved == [("best.pt", 1), ("last.pt", 1), ("best.pt", 2), ("last.pt", 4)]
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert best["epoch"] == 2 and best["metrics"]["val_acc"] == 55.0 and last["best"]["epoch"] == 2
    assert not all(torch.equal(best["model_state"][k], last["model_state"][k]) for k in best["model_state"])


@pytest.mark.parametrize("setting, message", [
    ({"epochs": "2"}, "epochs='2', expected a whole number of at least 1"),
    ({"epochs": 0}, "epochs=0, expected a whole number"),  # a run of no epoch and no checkpoint
    ({"batch_size": 0}, "batch_size=0, expected"),
    ({"seeds": 0}, "seeds=0, expected"),
    ({"lr": -1.0}, "lr=-1.0, expected a finite number above 0"),
    ({"lr": float("nan")}, "lr=nan, expected a finite number above 0"),  # every weight NaN after the first step
    ({"lr": float("inf")}, "lr=inf, expected a finite number above 0"),
    ({"clip": -1.0}, "clip=-1.0, expected a finite number above 0"),
    ({"gamma": float("nan")}, "gamma=nan, expected a finite number above 0"),
    ({"milestones": "5,10"}, "milestones='5,10', expected epochs such as"),
    ({"seed": -1}, "seed=-1, expected a whole number of at least 0"),  # numpy's global seed refused it mid-run
    ({"seed": 2 ** 32 - 1, "seeds": 2}, "seed=4294967295 with seeds=2, expected seeds below 2**32"),
    ({"checkpoint_every": -1.0}, "checkpoint_every=-1.0, expected seconds, 0 or more"),
    ({"checkpoint_every": float("nan")}, "checkpoint_every=nan, expected seconds, 0 or more"),
    ({"out": 3}, "out=3, expected a path"),
    # the network's settings are checked before a run folder is written (they made it unusable, then)
    ({"model": {"dropuot": 0.1}}, "model has 'dropuot', not a BMFNConfig field; the fields are"),
    ({"model": {"mode": "weakly"}}, "model has 'mode', not a BMFNConfig field (set TrainConfig.mode instead)"),
    ({"model": None}, "model=None, expected a dict of BMFNConfig fields"),
    ({"model": {"d_model": 250}}, "BMFN config: d_model 250 is not divisible by heads 4"),
    ({"model": {"d_model": "256"}}, "BMFN config: d_model='256', expected a whole number of at least 1"),
    ({"model": {"heads": 0}}, "BMFN config: heads=0, expected a whole number of at least 1"),  # ZeroDivisionError
    ({"model": {"d_model": 32.5}}, "BMFN config: d_model=32.5, expected a whole number of at least 1"),
    ({"model": {"dropout": 1.5}}, "BMFN config: dropout=1.5, expected a rate from 0 to below 1"),
    ({"model": {"esa_activation": ["relu6"]}}, "model={'esa_activation': ['relu6']}: "),
])
def test_train_settings_from_python_are_checked_as_the_cli_checks_them(setting, message):
    owner = "" if message.startswith("BMFN config: ") else "TrainConfig: "
    with pytest.raises(BmfnError, match=f"^{owner}{re.escape(message)}"):
        TrainConfig(**setting)
    assert TrainConfig(milestones=[5, np.int64(10)], epochs=np.int64(3)).milestones == (5, 10)
    plain = TrainConfig(checkpoint_every=math.inf, out=b"runs/a", model={"dropout": np.array(0.2), "heads": np.int8(2)})
    assert (plain.checkpoint_every, plain.out) == (math.inf, "runs/a")  # inf: after the first epoch and the end
    assert plain.model == {"dropout": 0.2, "heads": 2} and json.dumps(plain.to_dict())
    assert [type(value) for value in plain.model.values()] == [float, int]


def test_a_notebooks_paths_and_numpy_numbers_train_and_a_failed_start_leaves_no_lock(tmp_path, monkeypatch):
    """Path and numpy values are what a notebook has at hand: run.json gets them as plain JSON (json.dumps failed
    on them after the run folder's lock was taken, and the lock stayed held by the process: its next call was
    refused as "another process is training this run now")."""
    directory = make_ave_dir(tmp_path / "ave", n_clips=20)
    config = TrainConfig(ave_dir=directory, out=tmp_path / "run", epochs=np.int64(1),
                         **{**FAST, "lr": np.float32(2e-3)})
    assert (config.ave_dir, config.out, type(config.epochs), type(config.lr)) == (str(directory),
                                                                                   str(tmp_path / "run"), int, float)

    def fails(*_):
        raise WriteError(tmp_path / "run" / "command.txt", "No space left on device")

    with monkeypatch.context() as patched:  # a failure after the lock is taken, before training
        patched.setattr(train_module, "_api_command", fails)
        with pytest.raises(WriteError):
            train(config, log=None)
    result = train(TrainConfig(ave_dir=directory, out=tmp_path / "run2", epochs=1, **FAST), log=None)
    assert json.loads((result.run_dir / "run.json").read_text())["config"]["out"] == str(tmp_path / "run2")
    assert train(replace(config, resume=tmp_path / "run"), log=None).runs[0].epochs == 1  # not refused as locked
    with pytest.raises(BmfnError, match=r"^evaluate: batch_size=-1, expected a whole number of at least 1$"):
        evaluate(result.run_dir, batch_size=-1, plot=False)  # was an accuracy of NaN over no segment


def test_training_keeps_a_notebooks_random_state_and_plot_backend(tmp_path):
    """train() seeds the global generators for its run and gives them back their state; its curves are drawn
    without pyplot, which would switch a notebook's backend to Agg (its inline plots then stop showing)."""
    import matplotlib

    directory = make_ave_dir(tmp_path / "ave", n_clips=20)
    backend = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        random.seed(5), np.random.seed(5), torch.manual_seed(5)
        expected = random.random(), np.random.rand(), torch.rand(1)
        random.seed(5), np.random.seed(5), torch.manual_seed(5)
        train(TrainConfig(ave_dir=str(directory), out=str(tmp_path / "run"), epochs=1, **FAST), log=None)
        evaluate(tmp_path / "run", plot=True)
        assert (tmp_path / "run" / "curves.png").is_file() and list((tmp_path / "run").glob("confusion-*.png"))
        assert (random.random(), np.random.rand(), torch.rand(1)) == expected
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(backend)


def test_progress_of_a_rank_without_clips_yet_is_empty_not_a_division_by_zero():
    """Under torchrun a global batch smaller than the world leaves a rank's slice empty (local_batch's stand-in row
    of weight 0): its progress bar showed loss / 0 clips, a ZeroDivisionError that killed the run."""
    sums = train_module.EpochSums(torch.device("cpu"))
    assert sums.postfix() == {}
    sums.add(torch.tensor(0.5), torch.tensor(7.0), clips=1, segments=10)
    assert sums.postfix() == {"loss": "0.5000", "acc": "70.0"}


def test_provenance_difference_is_refused_unless_forced():
    trained = dict(STORE_PROVENANCE)
    other = {**trained, "visual": {**trained["visual"], "checksum": "random:1"}, "bmfn_version": "9", "dtype": "x"}
    with pytest.raises(BmfnError, match=r"visual\.checksum 'random:0' \(checkpoint\) vs 'random:1'"):
        check_provenance(trained, other)
    assert check_provenance(trained, other, force=True) == ["visual.checksum 'random:0' (checkpoint) vs 'random:1'"]
    assert check_provenance(trained, {**trained, "bmfn_version": "9", "dtype": "float32"}) == []


def test_seeds_report_mean_and_std(tmp_path):
    directory = make_ave_dir(tmp_path / "ave", n_clips=12)
    result = train(TrainConfig(mode="fully", ave_dir=str(directory), out=str(tmp_path / "run"), epochs=1, seeds=2,
                               seed=3, **FAST), log=quiet)
    assert [r.seed for r in result.runs] == [3, 4]
    tests = [r.test_acc for r in result.runs]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["test_mean"] == pytest.approx(np.mean(tests))
    assert summary["test_std"] == pytest.approx(np.std(tests, ddof=1))
    assert (tmp_path / "run" / "seed-3" / "best.pt").is_file() and (tmp_path / "run" / "seed-4" / "last.pt").is_file()
    assert latest_checkpoint(tmp_path) == result.best_checkpoint == tmp_path / "run" / summary["best_checkpoint"]
    with pytest.raises(BmfnError, match="no training run"):
        latest_checkpoint(tmp_path / "run" / "seed-3")
    # a command's --checkpoint: a run folder means its selected checkpoint, a seed folder its own, a file itself
    assert resolve_checkpoint(tmp_path / "run") == result.best_checkpoint
    assert load_checkpoint(tmp_path / "run")[1]["epoch"] == load_checkpoint(result.best_checkpoint)[1]["epoch"]
    assert resolve_checkpoint(tmp_path / "run" / "seed-4") == tmp_path / "run" / "seed-4" / "best.pt"
    assert resolve_checkpoint(tmp_path / "run" / "seed-4" / "last.pt") == tmp_path / "run" / "seed-4" / "last.pt"
    assert resolve_checkpoint(None, tmp_path) == result.best_checkpoint
    with pytest.raises(BmfnError, match=f"^{re.escape(str(directory))}: a folder without a best.pt"):
        resolve_checkpoint(directory)
    with pytest.raises(BmfnError, match=f"^{re.escape(str(tmp_path))}: a folder without a best.pt"):
        resolve_checkpoint(tmp_path)  # holds a run, but is none: not a checkpoint found somewhere below it


def test_several_seeds_report_the_mean_and_the_best_seed_on_the_selection_split(tmp_path):
    """The seeds' accuracies are summarised by their mean (not their median: 50, 100 and 60 % have 70 and 60) and
    sample standard deviation; the best checkpoint is the seed highest on the split that selected its epochs."""
    val, test = (50.0, 100.0, 60.0), (90.0, 30.0, 45.0)

    def seeds(selected_on):
        return train_module.TrainResult(tmp_path, [
            train_module.RunResult(tmp_path / f"seed-{seed}", seed, 1, selected_on, v, t, 1, [])
            for seed, v, t in zip((1, 2, 3), val, test)], "data")

    result = seeds("val")
    assert result.val_mean_std == pytest.approx((70.0, np.std(val, ddof=1)))
    assert result.test_mean_std == pytest.approx((55.0, np.std(test, ddof=1)))
    assert f"3 seeds: val 70.00 ± {np.std(val, ddof=1):.2f} %, test 55.00 ± " in result.summary()
    assert result.best_checkpoint == tmp_path / "seed-2" / "best.pt"  # val 100 %
    assert result.to_dict()["best_checkpoint"] == "seed-2/best.pt"
    assert seeds("test").best_checkpoint == tmp_path / "seed-1" / "best.pt"  # test 90 %


def test_a_rank_other_than_0_writes_nothing_into_the_run_folder(tmp_path, monkeypatch):
    """Under torchrun rank 0 writes the run folder; another rank writing too (summary.json of several seeds) raced
    it for the same temporary file. Here one process plays rank 1 of 2, with the folder rank 0 would have made."""
    from bmfn_pipeline.distributed import RankEnv

    directory = make_ave_dir(tmp_path / "ave", n_clips=12)
    monkeypatch.setattr(train_module, "rank_env", lambda: RankEnv(rank=1, world_size=2))
    (tmp_path / "run").mkdir()
    result = train(TrainConfig(mode="fully", ave_dir=str(directory), out=str(tmp_path / "run"), epochs=1, seeds=2,
                               **FAST), log=quiet)
    assert len(result.runs) == 2 and list((tmp_path / "run").iterdir()) == []


def test_a_run_without_best_pt_says_how_to_go_on(tmp_path):
    directory = make_ave_dir(tmp_path / "ave", n_clips=12)
    run = tmp_path / "run"
    train(TrainConfig(mode="fully", ave_dir=str(directory), out=str(run), epochs=1, **FAST), log=quiet)
    (run / "best.pt").unlink()  # a disk that filled up, say
    with pytest.raises(BmfnError, match=f"^{re.escape(str(run))}: a training run without a best.pt .*; name its "
                                        f"{re.escape(str(run / 'last.pt'))}, or go on with `bmfn train --resume "):
        resolve_checkpoint(run)
    (run / "last.pt").unlink()
    with pytest.raises(BmfnError, match=r"without a best.pt \(stopped, or its disk full\?\); go on with `bmfn train"):
        resolve_checkpoint(run)


def test_summary_finds_the_best_checkpoint_from_any_folder_and_after_a_move(tmp_path, monkeypatch):
    directory = make_ave_dir(tmp_path / "ave", n_clips=12)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    result = train(TrainConfig(mode="fully", ave_dir=str(directory), out="run", epochs=1, seeds=2, seed=3, **FAST),
                   log=quiet)
    best = result.best_checkpoint.relative_to("run")  # seed-3/best.pt or seed-4/best.pt
    summary = json.loads(Path("run/summary.json").read_text())
    assert summary["best_checkpoint"] == best.as_posix() and summary["runs"][0]["run_dir"] == "seed-3"
    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoint(tmp_path / "work" / "run") == tmp_path / "work" / "run" / best
    (tmp_path / "work" / "run").rename(tmp_path / "moved")
    assert resolve_checkpoint(tmp_path / "moved") == tmp_path / "moved" / best
    # summaries of earlier versions: relative to the folder training ran in, or absolute
    for old in ("work/run/seed-4/best.pt", str(tmp_path / "moved" / "seed-4" / "best.pt")):
        (tmp_path / "moved" / "summary.json").write_text(json.dumps({**summary, "best_checkpoint": old}))
        assert resolve_checkpoint(tmp_path / "moved") == tmp_path / "moved" / "seed-4" / "best.pt"


def test_empty_test_split_reports_no_test_accuracy(tmp_path):
    """Said once; null in metrics.jsonl and summary.json (strict JSON has no NaN), '-' in the output."""
    directory = make_ave_dir(tmp_path / "ave", n_clips=12)
    with h5py.File(directory / "test_order.h5", "r+") as f:
        test_rows = f["order"][()]
        del f["order"]
        f["order"] = np.zeros(0, np.int64)
    with h5py.File(directory / "train_order.h5", "r+") as f:
        train_rows = f["order"][()]
        del f["order"]
        f["order"] = np.concatenate([train_rows, test_rows])
    logged = []
    result = train(TrainConfig(mode="fully", ave_dir=str(directory), out=str(tmp_path / "run"), epochs=2, seeds=2,
                               **FAST), log=logged.append)
    assert sum("no test clips" in line for line in logged) == 1
    assert all("test -" in line for line in logged if " epoch " in line)
    assert "test -" in result.summary() and result.runs[0].test_acc is None

    def strict(text):
        return json.loads(text, parse_constant=lambda constant: pytest.fail(f"{constant} in JSON"))

    lines = [strict(line) for line in (tmp_path / "run" / "seed-890" / "metrics.jsonl").read_text().splitlines()]
    assert [line["test_acc"] for line in lines] == [None, None] and lines[0]["val_acc"] >= 0
    summary = strict((tmp_path / "run" / "summary.json").read_text())
    assert summary["test_mean"] is None and summary["runs"][0]["test_acc"] is None
    # evaluating the empty split is refused in a line, not an accuracy of NaN over no segment
    with pytest.raises(BmfnError, match=r"ave: the test split is empty \(splits from .*ave\)$"):
        evaluate(tmp_path / "run", plot=False)
    assert (tmp_path / "run" / "seed-890" / "curves.png").is_file()
    resumed = train(TrainConfig(resume=str(tmp_path / "run"), epochs=3, progress=False), log=quiet)
    assert resumed.runs[1].history[-1]["test_acc"] is None


def test_weak_training_without_background_clips_says_it_departs_from_the_official_training(tmp_path):
    """The official weak training always has the 178 background-only clips, the only videos whose target is
    background; a store (or a folder without the *_noisy.h5 files) has none, which was said nowhere."""
    directory = make_ave_dir(tmp_path / "ave", n_clips=20)
    logged = []
    train(TrainConfig(mode="weakly", ave_dir=str(directory), out=str(tmp_path / "run"), epochs=1, **FAST),
          log=logged.append)
    assert (f"note: no background-only clips beside {directory.resolve()} (visual_feature_noisy.h5 and "
            "audio_feature_noisy.h5): unlike the official weakly supervised training, no training video has "
            "background as its target") in logged
    path, _ = make_empty_interval_store(tmp_path)  # a store: the files beside it would not be read
    assert train_module._no_background_note(load_store(path)).startswith(
        "note: no background-only clips in a feature store (the AVE release's 178 come with its folder, --ave-dir): ")


def test_features_the_network_does_not_take_fail_before_a_run_folder_is_made(tmp_path):
    """They failed in the first step, naming no file, after run.json was written: the folder then said to resume a
    run that could never go on."""
    directory = make_ave_dir(tmp_path / "ave", n_clips=12)  # 2x2x16 maps, 8-d audio: not the real network's
    with pytest.raises(BmfnError, match=re.escape(f"{directory.resolve()}: features the network does not take: "
                                                  "expected visual [B,T,7,7,512] and audio [B,T,128], got "
                                                  "[1, 10, 2, 2, 16] and [1, 10, 8]")):
        train(TrainConfig(ave_dir=str(directory), out=str(tmp_path / "run"), epochs=1, progress=False), log=quiet)
    assert not (tmp_path / "run").exists()


def test_evaluate_reproduces_a_runs_record_by_default(tmp_path, monkeypatch):
    """A bfloat16 run is evaluated in bfloat16 unless asked otherwise (float32 gave other accuracies than the
    recorded ones); the run's own data, named explicitly or not, keeps the run's annotations (the folder's own were
    taken instead) and its split order files (not the folder's); confusion plots of two folders of one name are two
    files (the second replaced the first)."""
    directory = make_ave_dir(tmp_path / "ave", n_clips=30)
    rows = (directory / "Annotations.txt").read_text().splitlines()
    shifted = [f"{ave.CATEGORIES[(ave.CATEGORIES.index(r.split('&')[0]) + 1) % 28]}&{r.split('&', 1)[1]}" for r in rows]
    (tmp_path / "alt.txt").write_text("\n".join(shifted) + "\n")
    own = ave.load_splits(directory)  # 20 train, 5 val, 5 test clips; the run's test split takes 3 train clips more
    (tmp_path / "splits").mkdir()
    for name, order in (("train", own["train"][3:]), ("val", own["val"]),
                        ("test", np.concatenate([own["test"], own["train"][:3]]))):
        with h5py.File(tmp_path / "splits" / f"{name}_order.h5", "w") as f:
            f["order"] = order
    run = train(TrainConfig(ave_dir=str(directory), annotations=str(tmp_path / "alt.txt"), out=str(tmp_path / "run"),
                            splits=str(tmp_path / "splits"), epochs=2, precision="bfloat16", **FAST), log=quiet).runs[0]
    precisions = []
    original = evaluate.__globals__["predict_rows"]  # bmfn_pipeline.evaluate's
    monkeypatch.setitem(evaluate.__globals__, "predict_rows", lambda *args: precisions.append(args[5]) or original(*args))
    for report in (evaluate(tmp_path / "run", plot=False), evaluate(tmp_path / "run", ave_dir=directory, plot=False)):
        assert (report.clips, report.accuracy) == (8, run.test_acc)
    assert precisions == ["bfloat16", "bfloat16"]
    for name in ("one", "two"):
        shutil.copytree(directory, tmp_path / name / "ave")
        evaluate(tmp_path / "run", ave_dir=tmp_path / name / "ave", precision="float32")
    assert len(list((tmp_path / "run").glob("confusion-best-test-on-ave-*.png"))) == 2


def test_weak_training_leaves_out_clips_without_a_video_class(tmp_path):
    """bmfn-reference.md section 9: a weak target is never background; a clip whose labels give no class (an empty
    event interval in a store that kept segment labels only) is left out of weak training, and said so."""
    path, _ = make_empty_interval_store(tmp_path)
    logged = []
    assert train_module._with_video_classes(load_store(path), logged.append).splits["train"].tolist() == [0, 1]
    without_video_classes(path)
    data = load_store(path)
    kept = train_module._with_video_classes(data, logged.append)
    assert kept.splits["train"].tolist() == [1] and data.splits["train"].tolist() == [0, 1]
    assert len(logged) == 1 and "1 training clips have no event second" in logged[0]


def test_cli_chain_train_then_evaluate_on_a_store(tmp_path, monkeypatch):
    """The real BMFN configuration on a tiny store: `bmfn train` finds feats.h5, `bmfn evaluate` the newest run."""
    one_hot = np.zeros((6, 10, 29), np.float32)
    one_hot[..., ave.BACKGROUND] = 1
    for i in range(6):
        one_hot[i, 2:8, ave.BACKGROUND] = 0
        one_hot[i, 2:8, i % 3] = 1
    splits = ["train", "train", "train", "train", "val", "test"]
    make_store(tmp_path / "feats.h5", n_clips=6, labels={f"vid{i:04d}": (one_hot[i], splits[i]) for i in range(6)})
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    argv = ["train", "--epochs", "1", "--batch-size", "4", "--quiet", "--esa-activation", "relu6"]
    monkeypatch.setattr("sys.argv", ["/somewhere/bin/bmfn", *argv])
    result = runner.invoke(main, argv)
    assert result.exit_code == 0, result.output
    assert "feats.h5 found in the current folder" in result.output
    assert "splits stored in feats.h5" in result.output
    run_dirs = list((tmp_path / "runs").iterdir())
    assert len(run_dirs) == 1 and run_dirs[0].name.startswith("fully-")
    assert (run_dirs[0] / "command.txt").read_text() == f"bmfn {' '.join(argv)}\n"
    model, _ = load_checkpoint(run_dirs[0] / "best.pt")  # the official code's activation, from the command line
    assert model.config.esa_activation == "relu6"

    result = runner.invoke(main, ["evaluate", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.splitlines()[-1])
    assert report["split"] == "test" and report["segments"] == 10 and report["clips"] == 1
    assert Path(report["checkpoint"]).resolve() == (run_dirs[0] / "best.pt").resolve()
    assert np.array(report["confusion"]).sum() == 10 and os.path.isfile(report["confusion_png"])
    # the checkpoint as the argument, as localize's files are given: a run folder, or a file of it
    for named in (run_dirs[0], run_dirs[0] / "last.pt"):
        result = runner.invoke(main, ["evaluate", str(named), "--json"])
        assert result.exit_code == 0, result.output
        given = json.loads(result.stdout.splitlines()[-1])
        assert Path(given["checkpoint"]).name == Path(named / "best.pt" if named.is_dir() else named).name
        assert given["accuracy"] == report["accuracy"] and "no checkpoint named" not in result.stderr
    result = runner.invoke(main, ["evaluate", str(run_dirs[0]), "--checkpoint", str(run_dirs[0] / "last.pt")])
    assert result.exit_code == 2 and "two checkpoints named" in result.output

    # A folder the confusion PNG cannot go to (a read-only checkpoint folder) costs the PNG, not the result; a
    # damaged run.json beside the run does not stop the search for the newest one.
    (tmp_path / "runs" / "broken").mkdir()
    (tmp_path / "runs" / "broken" / "run.json").write_text('{"started": 1')

    def read_only(figure, path, **kwargs):
        raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr("matplotlib.figure.Figure.savefig", read_only)
    result = runner.invoke(main, ["evaluate", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[-1])["confusion_png"] is None
    assert re.search(r"^bmfn: warning: .*confusion-best-test\.png: the confusion matrix was not written "
                     r"\(Read-only file system\)$", result.stderr, re.M)

    other = make_store(tmp_path / "other.h5", n_clips=6, labels={f"vid{i:04d}": (one_hot[i], splits[i]) for i in range(6)},
                       provenance={**STORE_PROVENANCE, "visual": {**STORE_PROVENANCE["visual"], "checksum": "random:1"}})
    result = runner.invoke(main, ["evaluate", "--features", str(other)])
    assert result.exit_code == 1 and "made differently" in result.output and "visual.checksum" in result.output
    result = runner.invoke(main, ["evaluate", "--features", str(other), "--force", "--split", "val", "--json"])
    assert result.exit_code == 0
    report = json.loads(result.stdout.splitlines()[-1])  # --force is said, and recorded; the own plot is kept
    assert report["forced"] == ["visual.checksum 'random:0' (checkpoint) vs 'random:1'"]
    assert "bmfn: warning: --force: visual.checksum" in result.stderr
    assert re.search(r"confusion-best-val-on-other-[0-9a-f]{6}\.png: the confusion matrix was not written", result.stderr)
    assert result.stderr.startswith("bmfn: no checkpoint named: using the newest run's ")  # as localize says it


def test_select_on_test_is_said(tmp_path):
    directory = make_ave_dir(tmp_path / "ave", n_clips=12)
    logged = []
    result = train(TrainConfig(mode="fully", ave_dir=str(directory), out=str(tmp_path / "run"), epochs=1,
                               select_on_test=True, **FAST), log=logged.append)
    assert any("best TEST accuracy" in line for line in logged)
    assert "optimistic" in result.summary() and result.runs[0].selected_on == "test"


def test_compiled_network_trains_like_eager(tmp_path, monkeypatch):
    """TrainConfig.compile changes the kernels, not the arithmetic: without dropout (whose random numbers differ
    once compiled) the losses match eager ones, and the checkpoint is a plain BMFN state_dict. Only the full batches
    run compiled: the short batch (20 training clips, batch 8) and evaluation add no second compiled graph. The
    compiled run keeps its kernels in bmfn's cache folder (use_compile_cache, tested in test_weights.py; here left
    where earlier runs compiled, so that this test compiles from a warm cache)."""
    cache_calls = []
    monkeypatch.setattr(train_module, "use_compile_cache", lambda: cache_calls.append(1))
    directory = make_ave_dir(tmp_path / "ave", n_clips=30)
    model = {**SMALL_MODEL, "dropout": 0.0, "visual_dropout": 0.0}
    config = dict(FAST, model=model, mode="fully", ave_dir=str(directory), epochs=2)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager, compiled = (train(TrainConfig(out=str(tmp_path / name), compile=name == "compiled", **config), log=quiet)
                       for name in ("eager", "compiled"))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # the network, once, for one batch shape
    losses = [[h["loss"] for h in result.runs[0].history] for result in (eager, compiled)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    restored, _ = load_checkpoint(compiled.runs[0].best_checkpoint)
    assert set(restored.state_dict()) == set(torch.load(eager.runs[0].best_checkpoint, weights_only=True)["model_state"])
    assert cache_calls == [1]  # the compiled run only


def test_ctrl_c_says_how_to_go_on(tmp_path, monkeypatch):
    """Click's own word for Ctrl-C is "Aborted!"; bmfn says what goes on from where, with a shell's exit status."""
    directory = make_ave_dir(tmp_path / "ave", n_clips=12)
    run = tmp_path / "my (run)"  # the folder's name is read back from the "run: " line
    train(TrainConfig(mode="fully", ave_dir=str(directory), out=str(run), epochs=1, **FAST), log=quiet)
    monkeypatch.setattr(train_module, "fully_supervised_loss", lambda output, labels: (_ for _ in ()).throw(
        KeyboardInterrupt))
    result = CliRunner().invoke(main, ["train", "--resume", str(run), "--epochs", "3", "--quiet"])
    assert result.exit_code == 130
    assert result.stderr.splitlines()[-1] == (f"bmfn: interrupted: `bmfn train --resume {run}` goes on from its "
                                              "last.pt (written after the first epoch, then every --checkpoint-every "
                                              "seconds)")
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1
    (run / "last.pt").unlink()  # as a run stopped in its first epoch: nothing to go on from
    result = CliRunner().invoke(main, ["train", "--resume", str(run), "--epochs", "3", "--quiet"])
    assert result.exit_code == 130
    assert result.stderr.splitlines()[-1] == (f"bmfn: interrupted: no last.pt in {run} yet (the first comes after "
                                              f"epoch 1): `bmfn train --resume {run}` starts it again")
