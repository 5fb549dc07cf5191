"""`bmfn info`: what a feature store or a checkpoint holds, as lines and as JSON."""

from __future__ import annotations

import fcntl
import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_data import SMALL_MODEL, STORE_PROVENANCE, make_ave_dir, make_store

from bmfn_pipeline import ave
from bmfn_pipeline import info as info_module
from bmfn_pipeline.cli import main
from bmfn_pipeline.errors import BmfnError
from bmfn_pipeline.info import CheckpointInfo, RunInfo, SeedInfo, StoreInfo, features_lines, info
from bmfn_pipeline.store import FeatureStore
from bmfn_pipeline.train import CHECKPOINT_FORMAT, TrainConfig, train
from extractors.weights import WEIGHTS


def one_hot(start: int, end: int, category: int) -> np.ndarray:
    labels = np.zeros((ave.SEGMENTS, ave.NUM_CLASSES), np.float32)
    labels[:, ave.BACKGROUND] = 1
    labels[start:end] = 0
    labels[start:end, category] = 1
    return labels


def store_with_everything(path):
    """5 consolidated clips (3 labelled: 2 train, 1 test; one with a decode note, one failure), then a run that
    journaled a sixth clip and a second failure and was stopped before consolidating."""
    make_store(path, n_clips=4)
    with FeatureStore.open(path, STORE_PROVENANCE) as store:
        rng = np.random.default_rng(1)
        store.add_clip("short", rng.random((10, 7, 7, 512)), rng.random((10, 128)), path="short.mp4",
                       warnings=["short.mp4: 5.31 s from 0 s is shorter than 10 s"])
        store.add_failure("broken", "broken.mp4", "broken.mp4: not a media file")  # an error names its file
        store.set_labels({"vid0000": (one_hot(2, 5, 3), "train"), "vid0001": (one_hot(0, 10, 4), "train"),
                          "short": (one_hot(0, 5, 4), "test")})
        store.consolidate()
    with FeatureStore.open(path, STORE_PROVENANCE) as store:
        rng = np.random.default_rng(2)
        store.add_clip("late", rng.random((10, 7, 7, 512)), rng.random((10, 128)), path="late.mp4")
        store.add_failure("empty", "empty.mp4", "empty.mp4: no video stream")
    return path


def test_a_store_says_its_clips_labels_journal_failures_and_notes(tmp_path):
    result = info(store_with_everything(tmp_path / "feats.h5"))
    assert isinstance(result, StoreInfo)
    assert (len(result.clip_ids), result.dtype, result.journaled, result.writing) == (6, "float16", ["late"], False)
    assert result.splits == {"train": 2, "test": 1}
    assert sorted(result.unlabelled) == ["late", "vid0002", "vid0003"]
    assert result.failed == {"broken": {"path": "broken.mp4", "error": "broken.mp4: not a media file"},
                             "empty": {"path": "empty.mp4", "error": "empty.mp4: no video stream"}}
    assert result.notes == {"short": ["short.mp4: 5.31 s from 0 s is shorter than 10 s"]}
    assert result.size_bytes > (tmp_path / "feats.h5").stat().st_size  # the journal counts too
    text = "\n".join(result.lines())
    assert text.startswith(f"{tmp_path / 'feats.h5'}: feature store, 6 clips, float16")
    assert "labels    3 clips: train 2, val 0, test 1; 3 without an annotation row" in text
    assert "journal   1 clip not consolidated yet" in text
    assert "failed    2 clips\n    broken: broken.mp4: not a media file\n    empty: empty.mp4: no video stream" in text
    assert "notes     1 clip\n    short: short.mp4: 5.31 s" in text
    assert "VGG-19 RANDOM (seed 0)" in text and "2 frames/s" in text
    assert "warning   RANDOM network weights" in text


def test_a_store_being_written_says_so_and_its_journal_is_no_stopped_run(tmp_path):
    path = make_store(tmp_path / "feats.h5", n_clips=2)
    assert "a run was stopped" in "\n".join(info(path).lines())
    with FeatureStore.open(path, STORE_PROVENANCE):  # a writer's lock, as `bmfn extract` holds it
        result = info(path)
        assert result.writing and len(result.clip_ids) == 2
        assert result.lines()[0].endswith(", being written now")
        assert "  journal   2 clips of the run writing now, which consolidates them at its end" in result.lines()
    assert not info(path).writing


def test_a_store_of_real_weights_names_them_and_warns_of_nothing(tmp_path):
    keras, vggish = WEIGHTS["vgg19-keras"], WEIGHTS["vggish"]
    provenance = {**STORE_PROVENANCE, "precision": "bfloat16", "features_revision": 3, "bmfn_version": "9.9",
                  "visual": {"source": "ave", "weights": keras.name, "checksum": keras.checksum},
                  "audio": {**STORE_PROVENANCE["audio"], "weights": vggish.name, "checksum": vggish.checksum}}
    path = make_store(tmp_path / "feats.h5", n_clips=2, provenance=provenance)
    lines = info(path).lines()
    assert lines[1] == (f"  features  VGG-19 vgg19-keras ({keras.checksum[:12]}), bfloat16, 2 frames/s; "
                        f"VGGish vggish ({vggish.checksum[:12]}), alignment ave; revision 3 (bmfn 9.9)")
    assert not any("RANDOM" in line or "failed" in line for line in lines)
    assert "  labels    none (`bmfn extract --annotations` adds them)" in lines


def small_run(tmp_path, **config):
    directory = make_ave_dir(tmp_path / "ave", n_clips=12)
    train(TrainConfig(ave_dir=str(directory), out=str(tmp_path / "run"), batch_size=8, model=SMALL_MODEL,
                      progress=False, checkpoint_every=0, command="bmfn train --epochs 2", **config),
          log=lambda *_: None)
    return tmp_path / "run"


def test_a_checkpoint_says_its_epoch_accuracies_and_data(tmp_path):
    run = small_run(tmp_path, epochs=2)
    result = info(run / "best.pt")
    assert isinstance(result, CheckpointInfo)
    assert (result.mode, result.epochs, result.selected_on) == ("fully", 2, "val")
    assert result.best["epoch"] == result.epoch and result.data["kind"] == "ave-dir"
    lines = result.lines()
    assert lines[0].endswith(f"BMFN checkpoint, fully supervised, epoch {result.epoch} of 2 (selected on val)")
    # the train figure is the running one of the epoch, said as such (not `bmfn evaluate --split train`'s)
    assert lines[1] == (f"  accuracy  val {result.best['val_acc']:.2f} %, test {result.best['test_acc']:.2f} % "
                        f"(train {result.metrics['train_acc']:.2f} % while training)")
    assert "  features  the AVE release's" in lines[3] and lines[-1] == "  command   bmfn train --epochs 2"
    last = info(run / "last.pt")
    assert last.epoch == 2 and ("selected on val" in last.lines()[0]) == (last.best["epoch"] == 2)


def test_a_run_folder_says_how_far_it_got_and_how_it_goes_on(tmp_path):
    run = small_run(tmp_path, epochs=2)
    best = info(run / "best.pt")
    result = info(run)
    assert isinstance(result, RunInfo) and result.finished and result.seeds[0].epochs_done == 2
    lines = result.lines()
    assert lines[0] == f"{run}: training run, fully supervised, 2 of 2 epochs, finished"
    assert lines[1] == f"  best.pt   epoch {best.epoch} selected on val: {best.lines()[1].split('accuracy  ')[1]}"
    assert lines[2:] == best.lines()[2:]  # data, features, command

    # asked for 5 epochs and stopped after 2 (a kill): --resume goes on from last.pt
    record = json.loads((run / "run.json").read_text())
    record["config"]["epochs"] = 5
    (run / "run.json").write_text(json.dumps(record))
    lines = info(run).lines()
    assert lines[0] == (f"{run}: training run, fully supervised, 2 of 5 epochs, stopped: `bmfn train --resume {run}` "
                        "goes on")
    with open(run / ".lock") as lock:  # as a process training it holds it
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert info(run).lines()[0] == f"{run}: training run, fully supervised, 2 of 5 epochs, being trained now"
        assert info(run).training and "--resume" not in "\n".join(info(run).lines())
        with pytest.raises(BmfnError, match=f"^{run}: another process is training this run now$"):
            train(TrainConfig(resume=str(run), progress=False), log=lambda *_: None)
    # the run's, not the 2 the checkpoint was written with, also when the checkpoint is read alone; not a copy's
    assert info(run / "best.pt").epochs == 5 and info(run).seeds[0].best.epochs == 5
    shutil.copy(run / "best.pt", tmp_path / "copy.pt")
    assert info(tmp_path / "copy.pt").epochs == 2
    assert lines[2] == "            last.pt: epoch 2, where --resume goes on"
    (run / "best.pt").unlink()  # as a full disk can leave it, or a kill in the first epoch
    (run / "last.pt").unlink()
    assert info(run).lines()[1:3] == ["  best.pt   none", "            no last.pt: --resume starts from epoch 1"]
    assert not info(run).finished and info(run).to_dict()["finished"] is False


def test_a_run_of_several_seeds_shows_each_and_their_mean(tmp_path, monkeypatch):
    run = small_run(tmp_path, epochs=1, seeds=2)
    result = info(run)
    summary = json.loads((run / "summary.json").read_text())
    assert [seed.seed for seed in result.seeds] == [890, 891] and result.summary == summary
    lines = result.lines()
    assert lines[0] == f"{run}: training run, fully supervised, 2 seeds of 1 epoch, finished"
    selected = [line for line in lines if line.endswith("<- selected")]
    assert len(selected) == 1 and selected[0].startswith(f"  seed {summary['best_checkpoint'][5:8]}  1 of 1 epoch; ")
    spread = {split: f"{summary[f'{split}_mean']:.2f} ± {summary[f'{split}_std']:.2f} %" for split in ("val", "test")}
    assert f"  mean      val {spread['val']}, test {spread['test']}" in lines
    # summaries of earlier bmfn versions name the checkpoint by an absolute path
    (run / "summary.json").write_text(json.dumps({**summary, "best_checkpoint": str(run / summary["best_checkpoint"])}))
    assert info(run).lines() == lines
    monkeypatch.chdir(tmp_path)  # the run named by a relative path: the same checkpoint is still the selected one
    assert sum(line.endswith("<- selected") for line in info("run").lines()) == 1
    # resumed for more epochs and stopped: the summary is of the run before, so neither mean nor choice is shown
    record = json.loads((run / "run.json").read_text())
    record["config"]["epochs"] = 3
    (run / "run.json").write_text(json.dumps(record))
    assert not [line for line in info(run).lines() if "selected" in line.split(":")[-1] or "mean" in line]
    assert info(run / "seed-891" / "best.pt").epochs == 3  # a seed's checkpoint read alone: its run's epochs
    (run / "summary.json").write_text("{")  # torn
    with pytest.raises(BmfnError, match=rf"^{run / 'summary.json'}: not a run's summary"):
        info(run)


def test_the_command_shows_each_path_and_one_line_for_each_it_cannot_read(tmp_path):
    store = store_with_everything(tmp_path / "feats.h5")
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"not a video")
    result = CliRunner().invoke(main, ["info", str(tmp_path / "missing.h5"), str(video), str(store), "--json"])
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line]
    assert errors == [f"bmfn: error: {tmp_path / 'missing.h5'}: no such file or folder",
                      f"bmfn: error: {video}: neither a feature store (HDF5), a run folder nor a checkpoint; "
                      "`bmfn probe` shows what a video holds"]
    shown = json.loads(result.stdout)
    assert shown["kind"] == "feature store" and shown["journaled"] == ["late"] and len(shown["failed"]) == 2
    assert sorted(shown["clip_ids"]) == ["late", "short", "vid0000", "vid0001", "vid0002", "vid0003"]


def test_a_damaged_store_is_one_line_and_the_others_are_still_shown(tmp_path):
    good = make_store(tmp_path / "good.h5", n_clips=2)
    FeatureStore.open(good, STORE_PROVENANCE).consolidate()
    damaged = tmp_path / "damaged.h5"
    damaged.write_bytes(good.read_bytes()[:100_000])  # a copy cut short
    result = CliRunner().invoke(main, ["info", str(damaged), str(good)])
    assert result.exit_code == 1 and result.stdout.startswith(f"{good}: feature store, 2 clips")
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"bmfn: error: {damaged}: ")


def test_a_store_whose_annotation_rows_match_none_of_its_clips_says_so(tmp_path):
    path = make_store(tmp_path / "feats.h5", n_clips=2)
    with FeatureStore.open(path, STORE_PROVENANCE) as store:  # rows of other videos: ids that are not file names
        store.set_labels({"other0": (one_hot(0, 10, 1), "train"), "other1": (one_hot(0, 10, 2), "test")})
    assert "  labels    none: no clip has one of its 2 annotation rows (a clip's id, its file name without " \
        "extension, must be the annotation's video id)" in info(path).lines()


@pytest.mark.parametrize("name", ["model.pt", "arrays.npz", "metrics.jsonl"])
def test_a_file_that_is_no_checkpoint_is_one_line(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".npz"):
        np.savez(path, a=np.zeros(3))  # a zip file, not torch.save's
    else:
        path.write_bytes(b"" if name.endswith(".pt") else b'{"epoch": 1}\n')
    result = CliRunner().invoke(main, ["info", str(path)])
    assert result.exit_code == 1
    assert result.stderr == f"bmfn: error: {path}: neither a feature store (HDF5), a run folder nor a checkpoint\n"


def test_a_file_of_the_ave_layout_says_what_reads_it(tmp_path):
    path = tmp_path / "visual_feature.h5"
    with h5py.File(path, "w") as f:
        f["avadataset"] = np.zeros((2, 10, 7, 7, 512), np.float32)
    with pytest.raises(BmfnError, match=rf"^{path}: a file of the AVE release's layout \(key 'avadataset'\), "
                       rf"not a bmfn feature store; `bmfn train --ave-dir {tmp_path}` reads such a folder$"):
        info(path)


def test_store_lines_say_sizes_labels_without_splits_and_at_most_three_clips_per_list():
    """Sizes in B, kB, MB, GB (1000 bytes a kB); labels with no split stored say so; each list names three clips and
    says how many more only where there are more."""
    assert [info_module._size(n) for n in (999, 1000, 1_234_567, 2_500_000_000)] == \
        ["999 B", "1.0 kB", "1.2 MB", "2.5 GB"]
    failed = {f"bad{i}": {"path": f"bad{i}.mp4", "error": f"bad{i}.mp4: not a media file"} for i in range(3)}
    notes = {f"note{i}": [f"note{i}.mp4: short"] for i in range(4)}
    store = StoreInfo("feats.h5", [f"c{i}" for i in range(5)], "float16", 1000, STORE_PROVENANCE, {"": 2},
                      ["c2", "c3", "c4"], failed, notes, [], False, 2)
    lines = store.lines()
    assert lines[0] == "feats.h5: feature store, 5 clips, float16, 1.0 kB"
    assert "  labels    2 clips, no split stored (training splits them 80/10/10 by video id); 3 without an " \
        "annotation row (c2, c3, c4)" in lines
    failed_at = lines.index("  failed    3 clips")
    assert lines[failed_at + 1:] == [f"    bad{i}: bad{i}.mp4: not a media file" for i in range(3)]
    assert lines[lines.index("  notes     4 clips") + 4] == "    ... and 1 more (--json lists them all)"


def test_features_lines_warn_of_either_network_random_and_of_no_provenance():
    audio = {"weights": "vggish", "checksum": WEIGHTS["vggish"].checksum}
    lines = features_lines({**STORE_PROVENANCE, "audio": audio})  # random VGG-19, released VGGish
    assert lines[1] == "  warning   RANDOM network weights: these features are for tests and demos only"
    assert features_lines({}) == ["  features  made by an unknown extractor (no provenance recorded)"]


def test_checkpoint_lines_show_a_zero_train_accuracy_and_the_split_rule():
    checkpoint = CheckpointInfo("best.pt", "fully", 3, 5, "val", {"val_acc": 70.0, "test_acc": 68.5, "train_acc": 0.0},
                                {"epoch": 3}, {"kind": "ave-dir", "path": "ave", "split_rule": "splits from ave"}, {},
                                "", "1.2")
    assert checkpoint.lines() == ["best.pt: BMFN checkpoint, fully supervised, epoch 3 of 5 (selected on val)",
                                  "  accuracy  val 70.00 %, test 68.50 % (train 0.00 % while training)",
                                  "  data      ave-dir ave (splits from ave)",
                                  "  features  made by an unknown extractor (no provenance recorded)",
                                  "  bmfn      1.2"]


def test_a_run_without_best_pt_says_how_resume_goes_on_and_an_old_summary_is_not_shown():
    """A run whose epochs all ran but that has no best.pt still says where --resume starts; a summary of fewer
    epochs than the run's (resumed, finished, killed before its summary was written) is no summary of it."""
    lone = RunInfo("run", "fully", 2, [SeedInfo(1, "run", 2, None, None)], None, None, False)
    assert lone.lines() == ["run: training run, fully supervised, 2 of 2 epochs, finished", "  best.pt   none",
                            "            no last.pt: --resume starts from epoch 1"]
    old = {"runs": [{"epochs": 2}, {"epochs": 2}], "val_mean": 70.0, "val_std": 1.0, "test_mean": 69.0, "test_std": 1.0}
    seeds = [SeedInfo(n, f"run/seed-{n}", 3, None, None) for n in (1, 2)]
    resumed = RunInfo("run", "fully", 3, seeds, old, None, False)
    assert resumed.finished and resumed.to_dict()["summary_current"] is False
    assert not any(line.startswith("  mean") for line in resumed.lines())


def test_a_video_in_capitals_is_pointed_to_bmfn_probe(tmp_path):
    video = tmp_path / "CLIP.MP4"
    video.write_bytes(b"not a video")
    with pytest.raises(BmfnError, match="; `bmfn probe` shows what a video holds$"):
        info(video)


def test_a_checkpoint_missing_its_settings_is_one_line(tmp_path):
    """bmfn's checkpoint format, but no model settings (or none readable): one line, not a KeyError or TypeError."""
    path = tmp_path / "edited.pt"
    for model_config, reason in (("missing", "'model_config'"), (None, "'NoneType' object .*")):
        torch.save({"format": CHECKPOINT_FORMAT, "epoch": 1,
                    **({} if model_config == "missing" else {"model_config": model_config})}, path)
        with pytest.raises(BmfnError, match=f"^{path}: cannot be read \\({reason}\\)$"):
            info(path)
