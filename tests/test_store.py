"""The feature store: round trip, resume, provenance, failures, labels, SIGKILL safety and AVE export."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

import bmfn_pipeline.store as store_module
from bmfn_pipeline.ave import BACKGROUND, CATEGORIES, NUM_CLASSES, load_splits, read_annotations
from bmfn_pipeline.errors import BmfnError
from bmfn_pipeline.store import (
    AUDIO_SHAPE,
    VISUAL_SHAPE,
    FeatureStore,
    export_ave,
    labels_from_annotations,
    load_arrays,
    merge_stores,
)

REPO = Path(__file__).resolve().parents[1]
PROVENANCE = {
    "bmfn_version": "0.1.0",
    "visual": {"name": "vgg19-keras", "checksum": "random:0"},
    "audio": {"name": "vggish", "checksum": "random:0"},
    "frames_per_second": 2,
    "audio_alignment": "ave",
    "dtype": "float32",
}


def clip(seed: int, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """A clip's features as the extractor gives them (float32), in the storage dtype."""
    rng = np.random.default_rng(seed)
    visual, audio = rng.standard_normal(VISUAL_SHAPE, np.float32), rng.random(AUDIO_SHAPE, np.float32)
    return visual.astype(dtype), audio.astype(dtype)


def assert_clip(store: FeatureStore, clip_id: str, seed: int) -> None:
    visual, audio = store.read(clip_id)
    want_v, want_a = clip(seed, store.dtype)
    np.testing.assert_array_equal(visual, want_v)
    np.testing.assert_array_equal(audio, want_a)


def test_round_trip_before_and_after_consolidate(tmp_path):
    out = tmp_path / "feats.h5"
    ids = ["b", "a/with slash", "Ä ünïcode", "A"]  # "a"/"A" differ only in case
    with FeatureStore.open(out, PROVENANCE) as store:
        for seed, cid in enumerate(ids):
            store.add_clip(cid, *clip(seed), path=f"videos/{cid}.mp4", warnings=[f"w{seed}"])
        for seed, cid in enumerate(ids):
            assert_clip(store, cid, seed)
        store.consolidate()
        assert not list(store.parts_dir.glob("*.h5"))
        assert store.clip_ids() == ids
        store.add_clip("late", *clip(9), path="late.mp4")
        store.consolidate()
    with FeatureStore.open(out, create=False) as store:
        assert store.clip_ids() == ids + ["late"] and len(store) == 5
        for seed, cid in enumerate(ids):
            assert_clip(store, cid, seed)
        assert store.clip_info(ids[2]) == {"path": f"videos/{ids[2]}.mp4", "warnings": ["w2"], "precision": None}
        assert store.provenance == PROVENANCE
    with h5py.File(out, "r") as f:  # the documented layout
        assert f["visual"].chunks == (1, *VISUAL_SHAPE) and f["audio"].chunks == (1, *AUDIO_SHAPE)
        assert f["visual"].dtype == np.float32 and f.attrs["format_version"] == 1
    arrays = load_arrays(out, ids=["late", ids[0]])
    np.testing.assert_array_equal(arrays["visual"][0], clip(9)[0])
    np.testing.assert_array_equal(arrays["audio"][1], clip(0)[1])
    assert list(arrays["clip_ids"]) == ["late", ids[0]]


def test_a_clip_added_again_replaces_its_consolidated_row(tmp_path):
    """A clip extracted again after consolidation: its new features replace the old row, and the rows kept around
    it (copied in runs of consecutive rows) keep theirs."""
    out = tmp_path / "feats.h5"
    with FeatureStore.open(out, PROVENANCE) as store:
        for seed in range(5):
            store.add_clip(f"c{seed}", *clip(seed), path=f"c{seed}.mp4")
        store.consolidate()
        store.add_clip("c1", *clip(11), path="again.mp4")  # rows 0, 2, 3, 4 of the file are kept
        store.consolidate()
        assert store.clip_ids() == ["c0", "c2", "c3", "c4", "c1"]
        assert [store.clip_info(f"c{i}")["path"] for i in range(5)] == ["c0.mp4", "again.mp4", "c2.mp4", "c3.mp4",
                                                                       "c4.mp4"]
    arrays = load_arrays(out)
    for row, seed in enumerate([0, 2, 3, 4, 11]):
        np.testing.assert_array_equal(arrays["visual"][row], clip(seed)[0])
        np.testing.assert_array_equal(arrays["audio"][row], clip(seed)[1])


def test_float16_storage_and_shape_checks(tmp_path):
    with FeatureStore.open(tmp_path / "f.h5", {**PROVENANCE, "dtype": "float16"}) as store:
        store.add_clip("x", *clip(1), path="x.mp4")
        assert store.read("x")[0].dtype == np.float16
        assert_clip(store, "x", 1)
        with pytest.raises(BmfnError, match=r"bad\.mp4: visual features have shape \(10, 512\)"):
            store.add_clip("bad", np.zeros((10, 512)), clip(1)[1], path="bad.mp4")
        nan_audio = clip(1)[1].copy()
        nan_audio[3, 3] = np.nan
        with pytest.raises(BmfnError, match="NaN"):
            store.add_clip("bad", clip(1)[0], nan_audio, path="bad.mp4")
        assert "bad" not in store
    with pytest.raises(BmfnError, match="storage dtype 'float64'"):
        FeatureStore.open(tmp_path / "g.h5", {**PROVENANCE, "dtype": "float64"})


def test_lookup_is_in_memory_after_open(tmp_path, monkeypatch):
    out = tmp_path / "feats.h5"
    with FeatureStore.open(out, PROVENANCE) as store:
        for seed in range(3):
            store.add_clip(f"c{seed}", *clip(seed), path="p")
        store.consolidate()
        store.add_clip("pending", *clip(7), path="p")
    with FeatureStore.open(out, create=False, readonly=True) as store:
        def no_reads(*args, **kwargs):
            raise AssertionError("lookup read the file")

        monkeypatch.setattr(h5py.Dataset, "__getitem__", no_reads)
        assert all(f"c{i}" in store for i in range(3)) and "pending" in store and "c9" not in store
        assert store.clip_ids() == ["c0", "c1", "c2", "pending"]


def test_resume_sees_completed_clips_without_consolidate(tmp_path):
    out = tmp_path / "feats.h5"
    store = FeatureStore.open(out, PROVENANCE)
    store.add_clip("done", *clip(1), path="done.mp4")
    (store.parts_dir / "half.0123456789abcdef.clip.h5.tmp").write_bytes(b"\x89HDF partial")
    store.close()  # as if killed: no consolidate
    readers_view = load_arrays(out)
    assert list(readers_view["clip_ids"]) == ["done"]
    with FeatureStore.open(out, PROVENANCE) as store:
        assert "done" in store and store.clip_ids() == ["done"]
        assert_clip(store, "done", 1)
        assert not list(store.parts_dir.glob("*.tmp"))  # the unfinished write is dropped


def test_one_writer_at_a_time(tmp_path):
    out = tmp_path / "feats.h5"
    with FeatureStore.open(out, PROVENANCE):
        with pytest.raises(BmfnError, match="another process is writing"):
            FeatureStore.open(out, PROVENANCE)
        with FeatureStore.open(out, readonly=True) as reader:
            with pytest.raises(BmfnError, match="read-only"):
                reader.add_clip("x", *clip(0), path="x")
    FeatureStore.open(out, PROVENANCE).close()


def test_a_store_where_none_can_be_written_is_one_line(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" / "feats.h5"
    with pytest.raises(BmfnError) as refused:
        FeatureStore.open(out, PROVENANCE)
    assert str(refused.value) == f"{out}: cannot write a feature store there (Not a directory)"


def test_a_file_that_is_not_a_store_is_refused_and_left_alone(tmp_path):
    out = tmp_path / "notes.md"
    out.write_text("# notes\n")
    with pytest.raises(BmfnError) as refused:
        FeatureStore.open(out, PROVENANCE)
    assert str(refused.value) == f"{out}: not a bmfn feature store (not an HDF5 file)"
    assert out.read_text() == "# notes\n" and sorted(tmp_path.iterdir()) == [out]  # no notes.md.parts/ beside it
    with pytest.raises(BmfnError) as refused:  # a reader gets the same line
        FeatureStore.open(out, create=False, readonly=True, refuse_writers=True)
    assert str(refused.value) == f"{out}: not a bmfn feature store (not an HDF5 file)"
    labels = tmp_path / "labels.h5"  # HDF5, but no store: an AVE release file named by mistake
    with h5py.File(labels, "w") as f:
        f["avadataset"] = np.zeros((2, 10, 29))
    with pytest.raises(BmfnError) as refused:
        FeatureStore.open(labels, PROVENANCE)
    assert str(refused.value) == f"{labels}: not a bmfn feature store (no provenance or format_version attribute)"
    assert sorted(tmp_path.iterdir()) == [labels, out]


def test_a_store_that_cannot_be_read_is_one_line(tmp_path, monkeypatch):
    out = tmp_path / "feats.h5"
    FeatureStore.open(out, PROVENANCE).close()

    def unreadable(path):  # what h5py raises for a file this user may not read (root reads every file)
        raise PermissionError(13, "Unable to determine if file is accessible as hdf5 (Permission denied)")

    monkeypatch.setattr(h5py, "is_hdf5", unreadable)
    for kwargs in ({"provenance": PROVENANCE}, {"create": False, "readonly": True, "refuse_writers": True}):
        with pytest.raises(BmfnError) as refused:
            FeatureStore.open(out, **kwargs)
        assert str(refused.value).startswith(f"{out}: cannot read it as a feature store (")
        assert "Permission denied" in str(refused.value)


def test_provenance_mismatch_refused(tmp_path):
    out = tmp_path / "feats.h5"
    FeatureStore.open(out, PROVENANCE).close()
    other = {**PROVENANCE, "visual": {"name": "vgg19-keras", "checksum": "sha256:abc"}, "frames_per_second": 16}
    with pytest.raises(BmfnError) as err:
        FeatureStore.open(out, other)
    assert str(out) in str(err.value)
    assert "frames_per_second" in str(err.value) and "visual.checksum" in str(err.value)
    assert "audio" not in str(err.value)
    assert str(err.value).endswith("features were made differently: frames_per_second 2 (the store) vs 16 (this run); "
                                   "visual.checksum 'random:0' (the store) vs 'sha256:abc' (this run); use another "
                                   "output file")
    # The bmfn version describes the run, not the features.
    FeatureStore.open(out, {**PROVENANCE, "bmfn_version": "9.9"}).close()
    with pytest.raises(BmfnError, match="no such feature store"):
        FeatureStore.open(tmp_path / "absent.h5", create=False)
    with pytest.raises(BmfnError, match="without provenance"):
        FeatureStore.open(tmp_path / "absent.h5")


def test_verified_weights_under_another_file_name_make_the_same_features(tmp_path):
    """The checksum names the weights; the file name is where they were found. Random weights have no file and
    stay told apart by their seed (random:<seed>)."""
    def made_with(visual_file: str, pca_file: str, checksum: str = "sha256:v") -> dict:
        return {**PROVENANCE, "visual": {"weights": "vgg19-keras", "file": visual_file, "checksum": checksum},
                "audio": {"weights": "vggish", "file": "vggish.pth", "checksum": "sha256:a",
                          "pca_file": pca_file, "pca_checksum": "sha256:p"}}

    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    for path, seed in ((a, 0), (b, 1)):
        with FeatureStore.open(path, made_with(f"cached-{path.stem}.h5", "pca.npz")) as store:
            store.add_clip(path.stem, *clip(seed), path=f"{path.stem}.mp4")
    FeatureStore.open(a, made_with("/data/models/vgg19_notop.h5", "renamed_pca.npz")).close()
    assert merge_stores([a, b], tmp_path / "merged.h5").clips == 2  # shards of machines that named them apart
    with pytest.raises(BmfnError, match=r"visual\.checksum 'sha256:v' \(the store\) vs 'sha256:w'"):
        FeatureStore.open(a, made_with("vgg19_notop.h5", "pca.npz", checksum="sha256:w"))


def test_a_weight_file_name_without_a_checksum_still_tells_the_features_apart(tmp_path):
    """Only a file name with a checksum beside it is left out of the comparison: without one, the name is all
    that says which weights made the features."""
    out = tmp_path / "feats.h5"
    FeatureStore.open(out, {**PROVENANCE, "visual": {"name": "vgg19-keras", "file": "a.h5"}}).close()
    with pytest.raises(BmfnError, match=r"visual\.file 'a\.h5' \(the store\) vs 'b\.h5' \(this run\)"):
        FeatureStore.open(out, {**PROVENANCE, "visual": {"name": "vgg19-keras", "file": "b.h5"}})


def test_storage_dtype_is_float32_unless_float16_is_recorded(tmp_path):
    without = {k: v for k, v in PROVENANCE.items() if k != "dtype"}
    with FeatureStore.open(tmp_path / "feats.h5", without) as store:
        assert store.dtype == np.float32
    with pytest.raises(BmfnError, match=r"double\.h5: storage dtype 'float64' is not one of float32, float16$"):
        FeatureStore.open(tmp_path / "double.h5", {**PROVENANCE, "dtype": "float64"})


def test_a_clip_id_too_long_for_a_file_name_is_journaled_and_read_back(tmp_path):
    """A journal part's name keeps 80 characters of the id (file names end at 255 bytes); the id is in the part."""
    long_id = "é/" * 150
    with FeatureStore.open(tmp_path / "feats.h5", PROVENANCE) as store:
        store.add_clip(long_id, *clip(0), path="long.mp4")
    with FeatureStore.open(tmp_path / "feats.h5", PROVENANCE) as store:
        assert store.clip_ids() == [long_id]
        assert_clip(store, long_id, 0)


def test_a_store_made_in_two_precisions_says_so(tmp_path):
    """The precision describes the run, so a store may be appended to in another; its provenance then names both,
    also when the appending run was killed before consolidating and a run in the first precision finished it."""
    bf16, fp32 = ({**PROVENANCE, "precision": p} for p in ("bfloat16", "float32"))
    out = tmp_path / "feats.h5"
    with FeatureStore.open(out, bf16) as store:
        store.add_clip("a", *clip(0), path="a.mp4")
        store.consolidate()
    with FeatureStore.open(out, fp32) as store:
        store.add_clip("b", *clip(1), path="b.mp4")  # killed here: journaled, not consolidated
        assert [store.clip_info(c)["precision"] for c in "ab"] == ["bfloat16", "float32"]
    with FeatureStore.open(out, bf16) as store:
        store.consolidate()
        assert store.provenance["precision"] == "bfloat16+float32"
        assert store.clip_info("b")["precision"] == "bfloat16+float32"  # no longer told apart per clip
    with FeatureStore.open(out, create=False, readonly=True) as store:
        assert store.provenance == {**PROVENANCE, "precision": "bfloat16+float32"}

    # A store whose every clip is made again in one precision says that one; a merge names its inputs' precisions.
    with FeatureStore.open(out, fp32) as store:
        for seed, cid in enumerate("ab"):
            store.add_clip(cid, *clip(seed), path=f"{cid}.mp4")
        store.consolidate()
        assert store.provenance["precision"] == "float32"
    other = tmp_path / "other.h5"
    with FeatureStore.open(other, bf16) as store:
        store.add_clip("c", *clip(2), path="c.mp4")  # journaled only
    merge_stores([out, other], tmp_path / "merged.h5")
    with FeatureStore.open(tmp_path / "merged.h5", create=False, readonly=True) as store:
        assert store.provenance["precision"] == "bfloat16+float32"
    merge_stores([out], tmp_path / "alone.h5")
    with FeatureStore.open(tmp_path / "alone.h5", create=False, readonly=True) as store:
        assert store.provenance["precision"] == "float32"
    # in their sorted order, whatever order a set of them comes in (1 in 720 for six by chance)
    precisions = {"int8", "bfloat16", "fp8", "float32", "tf32", "float16"}
    assert store_module._with_precisions(PROVENANCE, precisions)["precision"] == \
        "bfloat16+float16+float32+fp8+int8+tf32"


def test_failures_recorded_and_cleared(tmp_path):
    out = tmp_path / "feats.h5"
    with FeatureStore.open(out, PROVENANCE) as store:
        store.add_failure("bad", "v/bad.mp4", "no audio stream")
        store.add_failure("worse", "v/worse.mp4", "truncated")
    with FeatureStore.open(out, PROVENANCE) as store:
        assert store.failures() == {"bad": ("v/bad.mp4", "no audio stream"), "worse": ("v/worse.mp4", "truncated")}
        assert "bad" not in store
        store.consolidate()
    with h5py.File(out, "r") as f:
        assert sorted(f["failed/clip_ids"].asstr()[()]) == ["bad", "worse"]
    with FeatureStore.open(out, PROVENANCE) as store:
        assert set(store.failures()) == {"bad", "worse"}
        store.add_clip("bad", *clip(3), path="v/bad.mp4")  # fixed and rerun
        assert set(store.failures()) == {"worse"}
        store.consolidate()
        assert set(store.failures()) == {"worse"}
    with h5py.File(out, "r") as f:
        assert list(f["failed/clip_ids"].asstr()[()]) == ["worse"]


def test_labels_stored_per_clip(tmp_path):
    ann = tmp_path / "Annotations.txt"
    ann.write_text("Cat&x&good&2&5\nBark&x&good&0&10\nHorse&y&good&0&10\nBus&z&good&0&3\n")
    rows = read_annotations(ann)
    labels, repeated = labels_from_annotations(rows, {"train": np.array([0, 2]), "val": np.array([1]),
                                                      "test": np.array([3])})
    assert repeated == ["x"]
    assert {v.split for v in labels_from_annotations(rows)[0].values()} == {""}  # no split lists: no split
    out = tmp_path / "feats.h5"
    with FeatureStore.open(out, PROVENANCE) as store:
        store.set_labels(labels)
        for seed, cid in enumerate(["x", "y", "stray"]):
            store.add_clip(cid, *clip(seed), path=f"{cid}.mp4")
        assert store.unlabelled() == ["stray"]
    arrays = load_arrays(out, ids=["x", "y", "stray"])  # pending parts, labels from the journal
    assert list(arrays["split"]) == ["train", "train", ""]
    cat, horse = CATEGORIES.index("Cat"), CATEGORIES.index("Horse")
    assert [np.flatnonzero(v).tolist() for v in arrays["video_labels"]] == [[cat], [horse], []]
    with FeatureStore.open(out, PROVENANCE) as store:
        store.consolidate()
    arrays = load_arrays(out)
    assert list(arrays["clip_ids"]) == ["x", "y", "stray"]
    assert list(arrays["has_label"]) == [True, True, False]
    assert list(arrays["split"]) == ["train", "train", ""]
    np.testing.assert_array_equal(arrays["labels"][0].argmax(1), [BACKGROUND] * 2 + [cat] * 3 + [BACKGROUND] * 5)
    with h5py.File(out, "r") as f:  # for readers of the file itself, beside the segment labels
        assert [np.flatnonzero(v).tolist() for v in f["video_labels"][()]] == [[cat], [horse], []]
    # A clip extracted later still finds the label given before it existed.
    with FeatureStore.open(out, PROVENANCE) as store:
        store.add_clip("z", *clip(5), path="z.mp4")
        store.consolidate()
    assert load_arrays(out, ids=["z"])["split"][0] == "test"


def test_set_labels_checks_shapes_and_gives_a_video_class(tmp_path):
    """Labels given as (segments, split) take the classes their segments show; (segments, split, video class) keep
    the class also without an event second; a wrong shape is one line naming the clip."""
    segments = np.zeros((10, 29), np.float32)
    segments[:, BACKGROUND] = 1
    event = segments.copy()
    event[4:6], event[4:6, 3] = 0, 1
    bark = np.eye(29, dtype=np.float32)[CATEGORIES.index("Bark")]
    with FeatureStore.open(tmp_path / "feats.h5", PROVENANCE) as store:
        store.set_labels({"empty": (segments, "train"), "event": (event, "val"), "given": (segments, "test", bark)})
        with pytest.raises(BmfnError, match=r"feats\.h5: video class of 'bad' have shape \(28,\), expected \(29,\)"):
            store.set_labels({"bad": (segments, "train", bark[:28])})
        with pytest.raises(BmfnError, match=r"labels of 'bad' have shape \(10, 28\), expected \(10, 29\)"):
            store.set_labels({"bad": (segments[:, :28], "train")})
        labels = store.labels()
    assert "bad" not in labels
    assert [np.flatnonzero(labels[c].video).tolist() for c in ("empty", "event", "given")] == [[], [3], [bark.argmax()]]


def test_export_ave_round_trip_and_missing_clip(tmp_path):
    ann = tmp_path / "Annotations.txt"
    # "x" is annotated twice: its features are duplicated, row i = line i.
    ann.write_text("Cat&x&good&2&5\nHorse&y&good&0&10\nBark&x&good&0&10\n")
    out = tmp_path / "feats.h5"
    with FeatureStore.open(out, PROVENANCE) as store:
        store.add_clip("y", *clip(2), path="y.mp4")
        store.consolidate()
        store.add_clip("x", *clip(1), path="x.mp4")  # still a pending part
        store.add_clip("unused", *clip(8), path="u.mp4")
    visual_path, audio_path = export_ave(out, ann, tmp_path / "ave")
    with h5py.File(visual_path, "r") as fv, h5py.File(audio_path, "r") as fa:
        visual, audio = fv["avadataset"], fa["avadataset"]
        assert visual.shape == (3, *VISUAL_SHAPE) and audio.shape == (3, *AUDIO_SHAPE)
        assert visual.dtype == np.float64 and audio.dtype == np.float64
        for row, seed in enumerate([1, 2, 1]):
            np.testing.assert_array_equal(visual[row], clip(seed)[0])
            np.testing.assert_array_equal(audio[row], clip(seed)[1])
    before = visual_path.stat().st_mtime_ns
    dead = visual_path.with_name(f"{visual_path.name}.tmp-dead")  # a killed export's, gigabytes for AVE
    dead.write_bytes(b"\x89HDF half written")
    with pytest.raises(BmfnError, match=r"visual_feature\.h5: already exists; export into another folder, or "
                                        r"replace it with --force$"):
        export_ave(out, ann, tmp_path / "ave")  # a release's own folder is not overwritten by mistake
    assert visual_path.stat().st_mtime_ns == before and not dead.exists()
    assert export_ave(out, ann, tmp_path / "ave", dtype="float16", force=True) == (visual_path, audio_path)
    with h5py.File(visual_path, "r") as fv:
        assert fv["avadataset"].dtype == np.float16
    ann.write_text("Cat&x&good&2&5\nHorse&gone&good&0&10\nBark&lost&good&0&10\nBus&gone&good&1&2\n")
    with pytest.raises(BmfnError, match=r"2 clips of .*Annotations\.txt are missing from the store, first 'gone'"):
        export_ave(out, ann, tmp_path / "ave2")
    assert not (tmp_path / "ave2" / "visual_feature.h5").exists()


@pytest.mark.parametrize("text", ["", "Category&VideoID&Quality&StartTime&EndTime\n"], ids=["empty", "header"])
def test_export_ave_of_no_rows_is_one_line(tmp_path, text):
    out = tmp_path / "feats.h5"
    with FeatureStore.open(out, PROVENANCE) as store:
        store.add_clip("x", *clip(1), path="x.mp4")
    ann = tmp_path / "Annotations.txt"
    ann.write_text(text)
    with pytest.raises(BmfnError) as refused:
        export_ave(out, ann, tmp_path / "ave")
    assert str(refused.value).startswith(f"{ann}: ") and "\n" not in str(refused.value)


def one_clip_to_export(tmp_path: Path) -> tuple[Path, Path]:
    """A store of one clip and an annotation file naming it."""
    out = tmp_path / "feats.h5"
    with FeatureStore.open(out, PROVENANCE) as store:
        store.add_clip("x", *clip(1), path="x.mp4")
    ann = tmp_path / "Annotations.txt"
    ann.write_text("Cat&x&good&2&5\n")
    return out, ann


@contextlib.contextmanager
def held_as_a_running_writer_holds_it(path: Path):
    """`path` locked by another process as locked_temporary locks a file it writes (shared), until the block ends."""
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
                               "fcntl.flock(fd, fcntl.LOCK_SH); print(flush=True); sys.stdin.read()", path],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        holder.stdout.readline()  # locked
        yield
    finally:
        holder.communicate()


def test_export_ave_removes_what_a_killed_export_left(tmp_path):
    """Files of a killed export go; those of an export still writing stay, whatever process id they are named after
    (from another container or host, that of a dead process here): it holds a lock on them, as a second process does."""
    out, ann = one_clip_to_export(tmp_path)
    ave = tmp_path / "ave"
    ave.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    left, running = ave / f"visual_feature.h5.tmp-{dead}", ave / f"audio_feature.h5.tmp-{dead}"
    for path in (left, running):
        path.write_bytes(b"\x89HDF half written")
    with held_as_a_running_writer_holds_it(running):
        export_ave(out, ann, ave)
    assert sorted(p.name for p in ave.iterdir()) == sorted(["audio_feature.h5", "visual_feature.h5", running.name])


def test_an_export_killed_between_its_two_files_is_neither_trained_on_nor_in_the_way(tmp_path, monkeypatch):
    """A kill after visual_feature.h5 is renamed into place, before audio_feature.h5: the folder holds one new file
    beside an old one (or none). Training refuses the pair; the next export replaces it without --force."""
    from bmfn_pipeline.data import load_ave_dir

    out, ann = one_clip_to_export(tmp_path)
    ave = tmp_path / "ave"
    export_ave(out, ann, ave)
    replace = os.replace

    def killed_after_the_first(src, dst):
        replace(src, dst)
        if Path(dst).name == "visual_feature.h5":
            raise KeyboardInterrupt

    monkeypatch.setattr(store_module.os, "replace", killed_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        export_ave(out, ann, ave, force=True)
    monkeypatch.setattr(store_module.os, "replace", replace)
    with pytest.raises(BmfnError, match=r"ave: visual_feature\.h5 and audio_feature\.h5 are of two exports"):
        load_ave_dir(ave)
    (ave / "audio_feature.h5").unlink()  # killed in the first export into a folder: the visual file alone
    export_ave(out, ann, ave)  # no --force needed
    assert len(load_ave_dir(ave, annotations=ann).clip_ids) == 1
    with pytest.raises(BmfnError, match="already exists"):  # a whole pair still needs --force
        export_ave(out, ann, ave)


def test_ctrl_c_in_merge_or_export_is_one_line(tmp_path, monkeypatch):
    """As in extract and train: what became of the output, and the shell's status for SIGINT (click: 'Aborted!', 1)."""
    from click.testing import CliRunner

    from bmfn_pipeline.cli import main

    out, ann = one_clip_to_export(tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(store_module, "_write_store", interrupted)
    monkeypatch.setattr(FeatureStore, "read", interrupted)
    for args, said in ((["merge", out, "--out", tmp_path / "merged.h5"],
                        f"the merge did not finish; {tmp_path / 'merged.h5'} is as it was"),
                       (["export-ave", out, "--annotations", ann, "--out", tmp_path / "ave"],
                        "the export did not finish; run the same command again")):
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code == 130 and result.stderr.splitlines()[-1] == f"bmfn: interrupted: {said}"
    assert not (tmp_path / "merged.h5").exists() and not list((tmp_path / "ave").iterdir())


def test_two_exports_to_one_folder_at_once(tmp_path, monkeypatch):
    """An export locks the folder while it writes its pair: one started meanwhile is refused (both went on, and the
    folder could end with one's visual file beside the other's audio file), and leaves the first one's files."""
    out, ann = one_clip_to_export(tmp_path)
    read = FeatureStore.read

    def another_export_meanwhile(self, clip_id):
        monkeypatch.setattr(FeatureStore, "read", read)
        with pytest.raises(BmfnError, match=r"ave: another export is writing into this folder now$"):
            export_ave(out, ann, tmp_path / "ave", force=True)
        return read(self, clip_id)

    monkeypatch.setattr(FeatureStore, "read", another_export_meanwhile)
    export_ave(out, ann, tmp_path / "ave")
    assert sorted(p.name for p in (tmp_path / "ave").iterdir()) == ["audio_feature.h5", "visual_feature.h5"]


def test_a_reader_goes_on_while_the_writer_consolidates(tmp_path, monkeypatch):
    """Read-only opens may read while another process writes: the writer's consolidate() swaps a new main file in
    and then deletes the journal parts that a reader opened before had listed."""
    out = tmp_path / "feats.h5"
    writer = FeatureStore.open(out, PROVENANCE)
    for seed in range(3):
        writer.add_clip(f"c{seed}", *clip(seed), path=f"c{seed}.mp4", warnings=[f"w{seed}"])
    writer.add_failure("bad", "bad.mp4", "bad.mp4: truncated")
    with FeatureStore.open(out, create=False, readonly=True) as reader:
        writer.consolidate()
        assert_clip(reader, "c0", 0)
        assert reader.clip_info("c1") == {"path": "c1.mp4", "warnings": ["w1"], "precision": None}
        assert reader.failures() == {"bad": ("bad.mp4", "bad.mp4: truncated")}
    for seed in range(3, 5):
        writer.add_clip(f"c{seed}", *clip(seed), path=f"c{seed}.mp4")
    read = FeatureStore.read

    def consolidated_meanwhile(self, clip_id):
        if self.readonly:
            writer.consolidate()
        return read(self, clip_id)

    monkeypatch.setattr(FeatureStore, "read", consolidated_meanwhile)
    arrays = load_arrays(out)  # c0-c2 consolidated, c3 and c4 journal parts when it starts
    writer.close()
    assert list(arrays["clip_ids"]) == [f"c{seed}" for seed in range(5)]
    for seed in range(5):
        np.testing.assert_array_equal(arrays["visual"][seed], clip(seed)[0])


def test_a_reader_opening_while_the_writer_consolidates_sees_every_clip(tmp_path, monkeypatch):
    """A reader reads the store's main file and its journal one after the other; a consolidation between the two
    moves clips (and labels) from the journal into a new main file, and the reader must find them in one of them."""
    out = tmp_path / "feats.h5"
    writer = FeatureStore.open(out, PROVENANCE)
    writer.add_clip("old", *clip(0), path="old.mp4")
    writer.consolidate()
    for seed in (1, 2):
        writer.add_clip(f"c{seed}", *clip(seed), path=f"c{seed}.mp4")
    segments = np.zeros((10, len(CATEGORIES) + 1), np.float32)
    segments[:, BACKGROUND] = 1
    writer.set_labels({"c1": (segments, "train")})
    reads = []

    def consolidated_between_the_reads(method):
        original = getattr(FeatureStore, method)

        def read(self):
            if self.readonly:
                reads.append(method)
                if len(reads) == 2:
                    writer.consolidate()
            return original(self)

        monkeypatch.setattr(FeatureStore, method, read)

    consolidated_between_the_reads("_load_main")
    consolidated_between_the_reads("_scan_parts")
    with FeatureStore.open(out, create=False, readonly=True) as reader:
        assert sorted(reader.clip_ids()) == ["c1", "c2", "old"] and list(reader.labels()) == ["c1"]
        assert_clip(reader, "c2", 2)
    assert not writer.journaled()
    writer.close()


def test_a_part_removed_while_hdf5_opens_it_is_read_from_the_new_main_file(tmp_path, monkeypatch):
    """HDF5 opens a file, then looks its name up again: a part that a consolidation removes in between fails with a
    plain OSError naming no file, which a reader takes as the part consolidated: it reads the store again."""
    out = tmp_path / "feats.h5"
    writer = FeatureStore.open(out, PROVENANCE)
    writer.add_clip("c", *clip(3), path="c.mp4")
    reader = FeatureStore.open(out, create=False, readonly=True)
    File, removed = h5py.File, []

    def removed_while_opening(name, *args, **kwargs):
        if str(name).endswith(".clip.h5") and not removed:
            removed.append(name)
            writer.consolidate()
            raise OSError("Unable to synchronously open file (can't retrieve stat info for file)")
        return File(name, *args, **kwargs)

    monkeypatch.setattr(h5py, "File", removed_while_opening)
    assert_clip(reader, "c", 3)
    assert removed and reader.clip_ids() == ["c"] and not reader.journaled()
    reader.close()
    writer.close()


def test_text_that_is_not_utf8_is_stored_escaped(tmp_path):
    """A path with bytes that are not UTF-8 (kept by Python as surrogates) is stored with them escaped; such an id
    cannot be stored, and says so in one line."""
    out = tmp_path / "feats.h5"
    odd = os.fsdecode(b"caf\xe9")
    with FeatureStore.open(out, PROVENANCE) as store:
        store.add_clip("x", *clip(1), path=f"{odd}/x.mp4")
        store.add_failure("y", f"{odd}/y.mp4", f"{odd}/y.mp4: truncated")
        with pytest.raises(BmfnError, match=r"clip id 'caf\\xe9' is not UTF-8 text"):
            store.add_clip(odd, *clip(2), path=f"{odd}.mp4")
        store.consolidate()
        assert store.clip_info("x")["path"] == "caf\\xe9/x.mp4"
        assert store.failures() == {"y": ("caf\\xe9/y.mp4", "caf\\xe9/y.mp4: truncated")}


def test_a_store_whose_layout_is_damaged_is_one_line(tmp_path):
    """A dataset removed or cut, a provenance that is not a mapping: tracebacks (KeyError, AttributeError, a
    broadcast ValueError while loading) before."""
    path = tmp_path / "feats.h5"
    with FeatureStore.open(path, PROVENANCE) as store:
        store.add_clip("a", *clip(0), path="a.mp4")
        store.set_labels({"a": (np.eye(NUM_CLASSES, dtype=np.float32)[[BACKGROUND] * 10], "train")})
        store.consolidate()
    original = path.read_bytes()

    def drop(name):
        def change(f):
            del f[name]
        return change

    def cut_visual(f):
        values = f["visual"][()]
        del f["visual"]
        f["visual"] = values[:, :5]

    def provenance_list(f):
        f.attrs["provenance"] = "[1, 2]"

    def short(name):  # consolidation and merge failed with an IndexError, labels were dropped by zip()
        def change(f):
            values = f[name][()]
            del f[name]
            f.create_dataset(name, data=values[:0], dtype=h5py.string_dtype() if values.dtype == object else None)
        return change

    for change, message in [(drop("clip_ids"), "a damaged feature store (\"Unable to synchronously open object "),
                            (drop("failed"), "a damaged feature store ("),
                            (cut_visual, "a damaged feature store ('visual' has shape [1, 5, 7, 7, 512] for 1 clip)"),
                            (short("paths"), "a damaged feature store ('paths' has shape [0] for 1 clip)"),
                            (short("label_table/split"), "a damaged feature store (the datasets of '/label_table' have "
                                                         "[0, 1] rows)"),
                            (provenance_list, "not a bmfn feature store (its provenance is list, not a mapping)")]:
        path.write_bytes(original)
        with h5py.File(path, "r+") as f:
            change(f)
        with pytest.raises(BmfnError, match=f"^{re.escape(f'{path}: {message}')}"):
            load_arrays(path)


def test_a_damaged_input_of_a_merge_or_an_export_is_named_as_the_input(tmp_path):
    """A read that fails inside a write is not the output's write failure (failed_writes would take it for one)."""
    paths = [tmp_path / "a.h5", tmp_path / "b.h5"]
    for seed, path in enumerate(paths):
        with FeatureStore.open(path, PROVENANCE) as store:
            store.add_clip(path.stem, *clip(seed), path=f"{path.stem}.mp4")  # left in the journal
    damaged = next(Path(f"{paths[1]}.parts").glob("*.clip.h5"))
    with h5py.File(damaged, "r") as f:
        offset = f["visual"].id.get_offset()
    with open(damaged, "r+b") as f:  # cut inside the clip's features
        f.truncate(offset + 100)
    refusal = rf"^{paths[1]}: cannot read clip 'b' \(.*\); the store is damaged$"
    with pytest.raises(BmfnError, match=refusal):
        merge_stores(paths, tmp_path / "merged.h5")
    annotations = tmp_path / "Annotations.txt"
    annotations.write_text(f"{CATEGORIES[0]}&b&good&0&10\n")
    with pytest.raises(BmfnError, match=refusal):
        export_ave(paths[1], annotations, tmp_path / "ave")
    assert not list(tmp_path.glob("merged*")) and not list((tmp_path / "ave").iterdir())


def test_merge_reads_its_inputs_without_writing_to_them(tmp_path, monkeypatch):
    """Shards copied from other machines may be read-only: merge writes nothing beside them, not even a lock (which
    it makes where it can: test_no_writer_starts_while_merge_reads_a_store_without_a_lock_file)."""
    shards = tmp_path / "shards"
    shards.mkdir()
    paths = [shards / "a.h5", shards / "b.h5"]
    for seed, path in enumerate(paths):
        with FeatureStore.open(path, PROVENANCE) as store:
            store.add_clip(path.stem, *clip(seed), path=f"{path.stem}.mp4")
            store.consolidate()
        shutil.rmtree(f"{path}.parts")  # the files alone
        path.chmod(0o444)
    shards.chmod(0o555)
    mkdir = Path.mkdir

    def read_only_mount(self, *args, **kwargs):  # root writes past the modes: refused as on a read-only mount
        if self.parent == shards and not self.exists():
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only_mount)
    try:
        summary = merge_stores(paths, tmp_path / "merged.h5")
    finally:
        shards.chmod(0o755)
        for path in paths:
            path.chmod(0o644)
    assert summary.clips == 2 and sorted(shards.iterdir()) == paths


def test_a_reader_opens_the_store_in_the_instant_after_a_consolidation(tmp_path, monkeypatch):
    """The new main file is renamed into place while its writer still holds the temporary file's lock: a reader's
    HDF5 (which locks a file it reads, shared) opens it all the same."""
    out = tmp_path / "feats.h5"
    replace, opened = os.replace, []

    def read_right_after(src, dst):
        replace(src, dst)
        with h5py.File(dst, "r") as f:  # HDF5's own file locking, as every reader has it
            opened.append(len(f["clip_ids"]))

    with FeatureStore.open(out, PROVENANCE) as store:
        store.add_clip("a", *clip(0), path="a.mp4")
        monkeypatch.setattr(store_module.os, "replace", read_right_after)
        store.consolidate()
    assert opened == [1]


def test_a_refused_merge_leaves_no_journal_folder_behind(tmp_path):
    """The new store's lock lives in its journal folder; a merge that makes no store takes the folder away again."""
    with pytest.raises(BmfnError, match="missing.h5: no such feature store"):
        merge_stores([tmp_path / "missing.h5"], tmp_path / "merged.h5")
    assert not list(tmp_path.iterdir())


def test_merge_removes_what_a_killed_merge_left(tmp_path):
    """A merge killed while writing leaves its temporary file, as large as the merged store: the next merge into
    the same file (or a writer of it) removes it, but not one a running merge holds locked."""
    with FeatureStore.open(tmp_path / "a.h5", PROVENANCE) as store:
        store.add_clip("a", *clip(0), path="a.mp4")
    dead, running = tmp_path / "merged.h5.tmp-dead", tmp_path / "merged.h5.tmp-running"
    for path in (dead, running):
        path.write_bytes(b"\x89HDF half written")
    with held_as_a_running_writer_holds_it(running):
        assert merge_stores([tmp_path / "a.h5"], tmp_path / "merged.h5").clips == 1
    assert sorted(p.name for p in tmp_path.glob("merged.h5*")) == ["merged.h5", "merged.h5.parts", running.name]
    dead.write_bytes(b"\x89HDF half written")
    with FeatureStore.open(tmp_path / "merged.h5", PROVENANCE):  # a writer of the merged store
        pass
    assert sorted(p.name for p in tmp_path.glob("merged.h5*")) == ["merged.h5", "merged.h5.parts"]


def test_no_writer_starts_while_merge_reads_a_store_without_a_lock_file(tmp_path, monkeypatch):
    """A store copied without its journal folder has no lock file; merge makes one to hold while it reads the store,
    so that `bmfn extract` cannot add to it meanwhile. The store merge writes is locked as its writer would lock it:
    an extract into it, or a second merge into it, is refused meanwhile (both went on, and one's work was lost)."""
    with FeatureStore.open(tmp_path / "a.h5", PROVENANCE) as store:
        store.add_clip("a", *clip(0), path="a.mp4")
    merged, again = tmp_path / "merged.h5", tmp_path / "again.h5"
    merge_stores([tmp_path / "a.h5"], merged)
    shutil.rmtree(f"{merged}.parts")  # copied without it
    write_store = store_module._write_store

    def writers_meanwhile(*args, **kwargs):
        for writer in (lambda: FeatureStore.open(merged, PROVENANCE), lambda: FeatureStore.open(again, PROVENANCE),
                       lambda: merge_stores([tmp_path / "a.h5"], again)):
            with pytest.raises(BmfnError, match=r"another process is writing to \(or merging( into)?\) this feature "
                                                r"store"):
                writer()
        return write_store(*args, **kwargs)

    monkeypatch.setattr(store_module, "_write_store", writers_meanwhile)
    assert merge_stores([merged], again).clips == 1
    assert sorted(p.name for p in Path(f"{merged}.parts").iterdir()) == [".lock"]


def test_a_lock_file_of_another_user_does_not_refuse_the_owners_writer(tmp_path, monkeypatch):
    """A killed merge by another user leaves the lock file it made in a store without one: the owner, who may not
    write that file, still extracts into the store (the lock is taken on a read-only descriptor), and that lock
    still refuses a second writer."""
    with FeatureStore.open(tmp_path / "a.h5", PROVENANCE) as store:
        store.add_clip("a", *clip(0), path="a.mp4")
    merged = tmp_path / "merged.h5"
    merge_stores([tmp_path / "a.h5"], merged)
    with FeatureStore.open(merged, readonly=True, refuse_writers=True):  # another user's reader makes the lock file
        pass
    lock = Path(f"{merged}.parts") / ".lock"
    real_open = os.open

    def not_ours(path, flags, *args):  # root writes past file modes: refused as another user's 0644 file is
        if Path(path) == lock and flags & (os.O_WRONLY | os.O_RDWR):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", not_ours)
    with FeatureStore.open(merged, PROVENANCE) as store:
        store.add_clip("b", *clip(1), path="b.mp4")
        with pytest.raises(BmfnError, match=r"another process is writing to \(or merging\) this feature store"):
            FeatureStore.open(merged, PROVENANCE)
    with FeatureStore.open(merged, readonly=True) as store:
        assert sorted(store.clip_ids()) == ["a", "b"]


def test_labels_from_the_real_annotations(ave_dir):
    rows = read_annotations(ave_dir / "Annotations.txt")
    labels, repeated = labels_from_annotations(rows, load_splits(ave_dir, len(rows)))
    assert len(labels) == 4097 and len(repeated) == 45
    assert sum(v.split == "train" for v in labels.values()) <= 3339
    every_class = np.stack([v.video for v in labels.values()])
    assert (every_class.sum(axis=1) == 1).all() and not every_class[:, BACKGROUND].any()
    empty = labels["VWi2ENBuTbw"]  # Church bell&VWi2ENBuTbw&good&0&0: no event second, still its class
    assert empty.segments[:, BACKGROUND].all() and empty.video.argmax() == CATEGORIES.index("Church bell")


WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from bmfn_pipeline.store import AUDIO_SHAPE, VISUAL_SHAPE, FeatureStore

    out, total, every, provenance = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), eval(sys.argv[4])
    with FeatureStore.open(out, provenance) as store:
        for seed in range(total):
            if str(seed) in store:
                continue
            rng = np.random.default_rng(seed)
            visual, audio = rng.standard_normal(VISUAL_SHAPE, np.float32), rng.random(AUDIO_SHAPE, np.float32)
            store.add_clip(str(seed), visual, audio, path=f"{seed}.mp4")
            print("added", seed, flush=True)
            if (seed + 1) % every == 0:
                print("consolidating", flush=True)
                store.consolidate()
        print("consolidating", flush=True)
        store.consolidate()
    print("finished", flush=True)
    """
)


def test_sigkill_at_random_moments_keeps_every_complete_clip(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    out = tmp_path / "feats.h5"
    total, every = 24, 5
    provenance = {**PROVENANCE, "dtype": "float16"}
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    chance = random.Random(1234)
    kills = []
    for attempt in range(6):
        proc = subprocess.Popen([sys.executable, str(script), str(out), str(total), str(every), repr(provenance)],
                                stdout=subprocess.PIPE, text=True, env=env)
        # Wait for a random event (a clip written, or the start of a consolidation), then a random delay.
        wanted = "consolidating" if attempt % 2 else "added"
        skip = chance.randint(0, 3)
        for line in proc.stdout:
            if line.startswith(wanted) or line.startswith("finished"):
                if skip == 0 or line.startswith("finished"):
                    break
                skip -= 1
        time.sleep(chance.uniform(0, 0.03))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills.append(wanted)
        proc.stdout.close()
        proc.wait()
        with FeatureStore.open(out, create=False, readonly=True) as store:
            done = store.clip_ids()
            assert len(done) == len(set(done))
            for cid in done:
                assert_clip(store, cid, int(cid))
        np.testing.assert_array_equal(load_arrays(out)["visual"].shape, (len(done), *VISUAL_SHAPE))
    assert "consolidating" in kills and "added" in kills
    # A last, uninterrupted run resumes and finishes everything.
    subprocess.run([sys.executable, str(script), str(out), str(total), str(every), repr(provenance)],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    with FeatureStore.open(out, create=False) as store:
        assert sorted(store.clip_ids(), key=int) == [str(i) for i in range(total)]
        for cid in store.clip_ids():
            assert_clip(store, cid, int(cid))
    assert not [p for p in (tmp_path / "feats.h5.parts").iterdir() if p.name != ".lock"]
    assert not list(tmp_path.glob("feats.h5.tmp-*"))


def test_load_arrays_repeats_a_clip_asked_for_twice(tmp_path):
    path = tmp_path / "feats.h5"
    with FeatureStore.open(path, PROVENANCE) as store:
        store.add_clip("a", *clip(0), path="a.mp4")
        store.add_clip("b", *clip(1), path="b.mp4")
    arrays = load_arrays(path, ["b", "a", "b"])
    assert list(arrays["clip_ids"]) == ["b", "a", "b"]
    np.testing.assert_array_equal(arrays["visual"][0], clip(1)[0])
    np.testing.assert_array_equal(arrays["visual"][2], clip(1)[0])
    np.testing.assert_array_equal(arrays["audio"][1], clip(0)[1])
