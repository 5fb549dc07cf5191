"""`bmfn info`: what a feature store or a checkpoint holds, as lines and as JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from test_data import SMALL_MODEL, STORE_PROVENANCE, make_ave_dir, make_store

from bmfn_pipeline import ave
from bmfn_pipeline.cli import main
from bmfn_pipeline.info import CheckpointInfo, StoreInfo, info
from bmfn_pipeline.store import FeatureStore
from bmfn_pipeline.train import TrainConfig, train
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
        store.add_failure("broken", "broken.mp4", "not a media file")
        store.set_labels({"vid0000": (one_hot(2, 5, 3), "train"), "vid0001": (one_hot(0, 10, 4), "train"),
                          "short": (one_hot(0, 5, 4), "test")})
        store.consolidate()
    with FeatureStore.open(path, STORE_PROVENANCE) as store:
        rng = np.random.default_rng(2)
        store.add_clip("late", rng.random((10, 7, 7, 512)), rng.random((10, 128)), path="late.mp4")
        store.add_failure("empty", "empty.mp4", "no video stream")
    return path


def test_a_store_says_its_clips_labels_journal_failures_and_notes(tmp_path):
    result = info(store_with_everything(tmp_path / "feats.h5"))
    assert isinstance(result, StoreInfo)
    assert (result.clips, result.dtype, result.journaled, result.writing) == (6, "float16", ["late"], False)
    assert result.splits == {"train": 2, "test": 1}
    assert sorted(result.unlabelled) == ["late", "vid0002", "vid0003"]
    assert result.failed == {"broken": "broken.mp4: not a media file", "empty": "empty.mp4: no video stream"}
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
        assert result.writing and result.clips == 2
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


def test_a_checkpoint_says_its_run(tmp_path):
    directory = make_ave_dir(tmp_path / "ave", n_clips=12)
    train(TrainConfig(ave_dir=str(directory), out=str(tmp_path / "run"), epochs=2, batch_size=8, model=SMALL_MODEL,
                      progress=False, command="bmfn train --epochs 2"), log=lambda *_: None)
    result = info(tmp_path / "run")  # a run folder: its best.pt
    assert isinstance(result, CheckpointInfo)
    assert result.path == str(tmp_path / "run" / "best.pt")
    assert (result.mode, result.epochs, result.selected_on) == ("fully", 2, "val")
    assert result.best["epoch"] == result.epoch and result.data["kind"] == "ave-dir"
    lines = result.lines()
    assert lines[0].endswith(f"BMFN checkpoint, fully supervised, epoch {result.epoch} of 2 (selected on val)")
    assert lines[1] == (f"  accuracy  train {result.metrics['train_acc']:.2f} %, val {result.best['val_acc']:.2f} %, "
                        f"test {result.best['test_acc']:.2f} %")
    assert "  features  the AVE release's" in lines[3] and lines[-1] == "  command   bmfn train --epochs 2"
    last = info(tmp_path / "run" / "last.pt")
    assert last.epoch == 2 and ("selected on val" in last.lines()[0]) == (last.best["epoch"] == 2)


def test_the_command_shows_each_path_and_one_line_for_each_it_cannot_read(tmp_path):
    store = store_with_everything(tmp_path / "feats.h5")
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"not a video")
    result = CliRunner().invoke(main, ["info", str(tmp_path / "missing.h5"), str(video), str(store), "--json"])
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line]
    assert errors == [f"bmfn: error: {tmp_path / 'missing.h5'}: no such file or folder",
                      f"bmfn: error: {video}: neither a feature store (HDF5) nor a checkpoint; `bmfn probe` shows what "
                      "a video holds"]
    shown = json.loads(result.stdout)
    assert shown["kind"] == "feature store" and shown["journaled"] == ["late"] and len(shown["failed"]) == 2


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 a zip file of something else"])
def test_a_file_that_is_no_checkpoint_is_one_line(tmp_path, content):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    result = CliRunner().invoke(main, ["info", str(path)])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1 and str(path) in result.stderr
    assert "probe" not in result.stderr  # the hint is for videos
