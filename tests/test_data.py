"""Data loading: the AVE release layout (float64, labels from Annotations.txt, order files, noisy clips), the
float16 cache, bmfn stores, the hash split. `make_ave_dir` is also the synthetic task of test_train.py."""

from __future__ import annotations

import os
import re
from pathlib import Path

import h5py
import numpy as np
import pytest

from bmfn_pipeline import ave
from bmfn_pipeline.data import (CONVERT_ROWS, ClipArrays, batches, compact_visual, find_default_data, hash_split,
                                load_ave_dir, load_data, load_store, num_batches, video_labels_from_segments)
from bmfn_pipeline.errors import BmfnError

SMALL_VISUAL = (2, 2, 16)  # cells and channels of the tiny synthetic maps (the real ones are 7x7x512)
SMALL_AUDIO = 8
SMALL_MODEL = {"visual_dim": 16, "cells": 4, "audio_dim": 8, "d_model": 32, "ffn_dim": 64, "mfb_k": 2, "mfb_o": 32,
               "mfb_dim": 64}
TASK_CLASSES = (0, 5, 9)  # three AVE categories used by the synthetic task


def make_ave_dir(directory, n_clips=60, classes=TASK_CLASSES, visual_shape=SMALL_VISUAL, audio_dim=SMALL_AUDIO,
                 noisy=0, seed=0, order_files=True):
    """An AVE-release-layout folder (float64 features, Annotations.txt, order files) of a learnable task:
    event segments carry class-dependent visual channels and audio dimensions, background segments only noise."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    channels = visual_shape[-1]
    lines, visual, audio = [], [], []
    for i in range(n_clips):
        k = i % len(classes)
        start = int(rng.integers(0, 5))
        end = int(rng.integers(start + 3, 11))
        v = rng.random((ave.SEGMENTS, *visual_shape)) * 0.5
        a = rng.random((ave.SEGMENTS, audio_dim)) * 0.5
        band = slice(k * channels // len(classes), (k + 1) * channels // len(classes))
        v[start:end, ..., band] += 2.0
        a[start:end, k % audio_dim] += 2.0
        visual.append(v)
        audio.append(a)
        lines.append(f"{ave.CATEGORIES[classes[k]]}&vid{i:04d}&good&{start}&{end}")
    (directory / "Annotations.txt").write_text("\n".join(lines) + "\n")
    for name, data in (("visual_feature.h5", visual), ("audio_feature.h5", audio)):
        with h5py.File(directory / name, "w") as f:
            f["avadataset"] = np.stack(data).astype(np.float64)
    if order_files:
        order = rng.permutation(n_clips)
        n_val = n_test = max(1, n_clips // 6)
        parts = {"train": order[: n_clips - n_val - n_test], "val": order[n_clips - n_val - n_test: n_clips - n_test],
                 "test": order[n_clips - n_test:]}
        for name, rows in parts.items():
            with h5py.File(directory / f"{name}_order.h5", "w") as f:
                f["order"] = rows.astype(np.int64)
    if noisy:
        with h5py.File(directory / "visual_feature_noisy.h5", "w") as f:
            f["avadataset"] = rng.random((noisy, ave.SEGMENTS, *visual_shape)) * 0.5
        with h5py.File(directory / "audio_feature_noisy.h5", "w") as f:
            f["avadataset"] = rng.random((noisy, ave.SEGMENTS, audio_dim)) * 0.5
    return directory


def test_ave_dir_labels_splits_and_noisy(tmp_path):
    directory = make_ave_dir(tmp_path / "ave", n_clips=12, noisy=3)
    data = load_ave_dir(directory)
    rows = ave.read_annotations(directory / "Annotations.txt")
    assert np.array_equal(data.clips.labels, ave.segment_labels(rows))
    assert np.array_equal(data.clips.video_labels, ave.video_labels(rows))
    assert data.clips.audio.dtype == np.float32 and data.clips.visual.dtype == np.float16
    with h5py.File(directory / "visual_feature.h5") as f:
        np.testing.assert_allclose(data.clips.visual, f["avadataset"][()], rtol=1e-3)
    assert sorted(np.concatenate(list(data.splits.values()))) == list(range(12))
    assert "splits from" in data.split_rule
    assert len(data.noisy) == 3 and (data.noisy.video_labels[:, ave.BACKGROUND] == 1).all()
    assert (data.noisy.labels[..., ave.BACKGROUND] == 1).all()
    assert data.clip_ids[3] == "vid0003"


def test_noisy_video_labels_come_from_labels_noisy_h5(tmp_path):
    directory = make_ave_dir(tmp_path / "ave", n_clips=12, noisy=3)
    given = np.zeros((3, ave.NUM_CLASSES), np.float32)
    given[:, ave.BACKGROUND] = 1
    given[1] = 0.5  # a file that is not all background is read as it is, not assumed
    with h5py.File(directory / "labels_noisy.h5", "w") as f:
        f["avadataset"] = given
    np.testing.assert_array_equal(load_ave_dir(directory).noisy.video_labels, given)
    with h5py.File(directory / "labels_noisy.h5", "w") as f:
        f["avadataset"] = given[:2]
    with pytest.raises(BmfnError, match=r"labels_noisy\.h5: shape \[2, 29\], expected \[3, 29\]"):
        load_ave_dir(directory)


def test_malformed_release_files_are_named(tmp_path):
    """A wrong shape or a damaged file is a one-line error naming the file, not a traceback from deep inside."""
    directory = make_ave_dir(tmp_path / "ave", n_clips=6, noisy=3)
    for rows, columns in ((6, 28), (5, ave.NUM_CLASSES)):  # fully mode never uses too few rows: still refused
        with h5py.File(directory / "mil_labels.h5", "w") as f:
            f["avadataset"] = np.zeros((rows, columns), np.float32)
        with pytest.raises(BmfnError, match=rf"mil_labels\.h5: shape \[{rows}, {columns}\], expected \[6, 29\]"):
            load_ave_dir(directory)
    (directory / "mil_labels.h5").unlink()
    with h5py.File(directory / "visual_feature_noisy.h5", "w") as f:  # another per-clip map than the main file's
        f["avadataset"] = np.zeros((3, ave.SEGMENTS, 2, 2, 8))
    with pytest.raises(BmfnError, match=r"visual_feature_noisy\.h5: \[10, 2, 2, 8\] per clip, but the main features "
                                        r"have \[10, 2, 2, 16\]"):
        load_ave_dir(directory)
    with h5py.File(directory / "visual_feature_noisy.h5", "w") as f:
        f["avadataset"] = np.zeros((2, ave.SEGMENTS, *SMALL_VISUAL))
    with pytest.raises(BmfnError, match=r"visual_feature_noisy\.h5: 2 rows but audio_feature_noisy\.h5 has 3"):
        load_ave_dir(directory)
    assert load_ave_dir(directory, include_noisy=False).noisy is None
    (directory / "visual_feature_noisy.h5").unlink()  # the authors' data/ folder: the audio half only, not refused
    assert load_ave_dir(directory).noisy is None
    visual = (directory / "visual_feature.h5").read_bytes()
    _rewrite(directory / "visual_feature.h5", lambda v: v[:5])  # row i of the visual file must be row i of the audio
    with pytest.raises(BmfnError, match=r"visual_feature\.h5: 5 rows but audio_feature\.h5 has 6$"):
        load_ave_dir(directory, include_noisy=False)
    (directory / "visual_feature.h5").write_bytes(visual)
    annotations = (directory / "Annotations.txt").read_text()
    (directory / "Annotations.txt").write_text("".join(annotations.splitlines(keepends=True)[:5]))
    with pytest.raises(BmfnError, match=r"Annotations\.txt: 5 rows but the features have 6; row i must be line i$"):
        load_ave_dir(directory, include_noisy=False)
    (directory / "Annotations.txt").unlink()
    for shape in ((6, ave.SEGMENTS, ave.NUM_CLASSES - 1), (5, ave.SEGMENTS, ave.NUM_CLASSES)):
        with h5py.File(directory / "labels.h5", "w") as f:
            f["avadataset"] = np.eye(shape[-1], dtype=np.float32)[np.zeros(shape[:2], int)]
        with pytest.raises(BmfnError, match=re.escape(f"labels.h5: shape {shape}, expected (6, 10, 29)")):
            load_ave_dir(directory, include_noisy=False)
    (directory / "Annotations.txt").write_text(annotations)
    for name in ("labels.h5", "visual_feature.h5"):
        (directory / name).write_bytes(b"not an hdf5 file")
        with pytest.raises(BmfnError, match=rf"{directory / name}: cannot read as HDF5: .*signature"):
            load_ave_dir(directory, include_noisy=False)


def test_visual_cache_is_reused_and_refreshed(tmp_path):
    directory = make_ave_dir(tmp_path / "ave", n_clips=4)
    first = compact_visual(directory / "visual_feature.h5")
    cache = directory / "visual_feature.f16.npy"
    assert cache.is_file()
    stamp = cache.stat().st_mtime_ns
    again = compact_visual(directory / "visual_feature.h5")
    assert cache.stat().st_mtime_ns == stamp and np.array_equal(first, again)
    with h5py.File(directory / "visual_feature.h5", "r+") as f:  # a changed source is converted again
        f["avadataset"][0] = 7.0
    assert (compact_visual(directory / "visual_feature.h5")[0] == 7.0).all()


def test_two_processes_converting_at_once_both_get_the_cache(tmp_path, monkeypatch):
    """torchrun's ranks all convert the float64 file on a first run: each writes its own temporary file. Here the
    second conversion runs (and renames) while the first is about to rename its own."""
    directory = make_ave_dir(tmp_path / "ave", n_clips=4)
    replace, nested = os.replace, []

    def other_rank_first(src, dst):
        if not nested and str(dst).endswith(".f16.npy"):
            nested.append(None)  # the other rank's own rename goes straight through
            nested[0] = compact_visual(directory / "visual_feature.h5")
        replace(src, dst)

    monkeypatch.setattr("bmfn_pipeline.data.os.replace", other_rank_first)
    first = compact_visual(directory / "visual_feature.h5")
    assert np.array_equal(first, nested[0])
    assert sorted(p.name for p in directory.glob("visual_feature.f16*")) == ["visual_feature.f16.json",
                                                                            "visual_feature.f16.npy"]


def test_visual_cache_in_other_folder_when_read_only(tmp_path):
    directory = make_ave_dir(tmp_path / "ave", n_clips=3)
    cache_dir = tmp_path / "cache"
    compact_visual(directory / "visual_feature.h5", cache_dir)
    assert len(list(cache_dir.glob("visual_feature-*.f16.npy"))) == 1


def test_a_cache_made_beside_a_folder_made_read_only_since_is_still_used(tmp_path, monkeypatch):
    """An AVE folder converted once, then shared read-only: its cache is used, not made again elsewhere (2 GB for
    the release), nor refused where the bmfn cache folder cannot be written either."""
    directory = make_ave_dir(tmp_path / "ave", n_clips=3)
    first = compact_visual(directory / "visual_feature.h5")
    monkeypatch.setattr("bmfn_pipeline.data.os.access", lambda path, mode: False)  # root writes to any folder
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("BMFN_CACHE", str(tmp_path / "a-file"))
    again = compact_visual(directory / "visual_feature.h5")
    assert Path(again.filename) == directory / "visual_feature.f16.npy" and np.array_equal(first, again)
    with h5py.File(directory / "visual_feature.h5", "r+") as f:  # changed since: converted in the bmfn cache, which
        f["avadataset"][0] = 7.0  # cannot be made here
    with pytest.raises(BmfnError, match=rf"^{tmp_path / 'a-file' / 'features'}: cannot write the float16 cache of "
                                        rf"{directory / 'visual_feature.h5'}: Not a directory$"):
        compact_visual(directory / "visual_feature.h5")


def test_float16_overflow_is_refused(tmp_path):
    path = tmp_path / "visual_feature.h5"
    with h5py.File(path, "w") as f:
        f["avadataset"] = np.full((2, 10, 2, 2, 4), 1e6)
    with pytest.raises(BmfnError, match="float16"):
        compact_visual(path)


def test_nan_in_a_later_conversion_slice_names_its_own_row(tmp_path):
    """The visual file is converted in slices of CONVERT_ROWS rows: a NaN past the first slice is named by its row in
    the file, not by its row in the slice."""
    path = tmp_path / "visual_feature.h5"
    values = np.zeros((CONVERT_ROWS + 8, ave.SEGMENTS, 1, 1, 2))
    values[CONVERT_ROWS + 3, 5] = np.nan
    with h5py.File(path, "w") as f:
        f["avadataset"] = values
    with pytest.raises(BmfnError, match=rf"NaN or infinity in 1 row \(the first: row {CONVERT_ROWS + 3}\)$"):
        compact_visual(path, progress=False)


def test_load_data_takes_exactly_one_source(tmp_path):
    """An AVE folder and a feature store given together: one line saying to choose, not one of them used silently."""
    directory = make_ave_dir(tmp_path / "ave", n_clips=6)
    store = make_store(tmp_path / "feats.h5", n_clips=2)
    for sources in ({"ave_dir": directory, "features": store}, {}):
        with pytest.raises(BmfnError, match=r"^give exactly one data source: --ave-dir DIR .* or --features "
                                            r"feats\.h5$"):
            load_data(**sources)
    assert load_data(ave_dir=directory, progress=False).source["kind"] == "ave-dir"


def test_hash_split_is_deterministic_and_keeps_ids_together():
    ids = [f"clip{i}" for i in range(50)] + ["clip3", "clip7"]  # duplicated ids, as in AVE
    split = hash_split(ids)
    assert sum(len(v) for v in split.values()) == 52
    assert all(np.array_equal(split[k], hash_split(ids)[k]) for k in split)
    where = {i: k for k, rows in split.items() for i in rows}
    assert where[3] == where[50] and where[7] == where[51]
    unique = {ids[i] for i in split["val"]}
    assert len(unique) == 5 and len({ids[i] for i in split["test"]}) == 5
    tiny = hash_split(["a", "b", "c"])
    assert all(len(tiny[k]) == 1 for k in tiny)


def test_ave_dir_without_split_files_uses_hash_split(tmp_path):
    directory = make_ave_dir(tmp_path / "ave", n_clips=10, order_files=False)
    data = load_ave_dir(directory)
    assert "hash" in data.split_rule
    assert all(len(data.splits[k]) >= 1 for k in ("train", "val", "test"))


def test_missing_labels_named(tmp_path):
    directory = make_ave_dir(tmp_path / "ave", n_clips=3)
    (directory / "Annotations.txt").unlink()
    with pytest.raises(BmfnError, match="Annotations.txt"):
        load_ave_dir(directory)


def test_video_labels_from_segments_are_never_background():
    """bmfn-reference.md section 9: a clip without an event second has no known video class, not background."""
    labels = np.zeros((2, 10, 29), np.float32)
    labels[0, :, 28] = 1
    labels[1, :3, 4] = 1
    labels[1, 3:, 28] = 1
    video = video_labels_from_segments(labels)
    assert video[0].tolist() == [0] * 29
    assert np.flatnonzero(video[1]).tolist() == [4]


def test_batches_cover_parts_once_and_shuffle_deterministically():
    import torch

    def clips(n, offset):
        audio = np.arange(n, dtype=np.float32)[:, None, None] + offset + np.zeros((n, 10, 2), np.float32)
        return ClipArrays(np.zeros((n, 10, 1, 1, 2), np.float16), audio, np.zeros((n, 10, 29), np.float32),
                          np.zeros((n, 29), np.float32))

    parts = [(clips(7, 0), np.array([1, 3, 5])), (clips(4, 100), np.arange(4))]
    seen = [b["audio"][:, 0, 0].tolist() for b in batches(parts, 3, torch.device("cpu"), torch.Generator().manual_seed(1))]
    assert sorted(sum(seen, [])) == [1, 3, 5, 100, 101, 102, 103]
    assert num_batches(parts, 3) == len(seen) == 3  # 7 rows: two full batches and a short one (the bar's total)
    again = [b["audio"][:, 0, 0].tolist() for b in batches(parts, 3, torch.device("cpu"), torch.Generator().manual_seed(1))]
    assert seen == again
    assert sum(seen, []) != [1, 3, 5, 100, 101, 102, 103]  # shuffled, not in row order
    assert [b["audio"][:, 0, 0].tolist() for b in batches(parts, 3, torch.device("cpu"))] == [[1, 3, 5],
                                                                                          [100, 101, 102], [103]]


STORE_PROVENANCE = {"visual": {"source": "ave", "weights": "random", "checksum": "random:0"},
                    "audio": {"weights": "random", "checksum": "random:0", "alignment": "ave", "pca": False},
                    "frames_per_second": 2, "seconds": 10, "alignment": "ave", "dtype": "float16"}


def make_store(path, n_clips=6, classes=TASK_CLASSES, labels=None, seed=0, provenance=STORE_PROVENANCE):
    """A feature store of real-shaped random features; `labels` maps clip id -> (segment one-hot, split), as
    FeatureStore.set_labels takes them."""
    from bmfn_pipeline.store import FeatureStore

    rng = np.random.default_rng(seed)
    with FeatureStore.open(path, provenance) as store:
        for i in range(n_clips):
            k = i % len(classes)
            visual = rng.random((10, 7, 7, 512)).astype(np.float32)
            audio = rng.random((10, 128)).astype(np.float32)
            visual[..., k * 100:(k + 1) * 100] += 1.0
            audio[:, k] += 2.0
            store.add_clip(f"vid{i:04d}", visual, audio, path=f"vid{i:04d}.mp4")
        if labels:
            store.set_labels(labels)
    return path


def test_store_with_annotations_and_hash_split(tmp_path):
    make_store(tmp_path / "feats.h5")
    annotations = tmp_path / "Annotations.txt"
    annotations.write_text("Bark&vid0000&good&2&5\nCat&vid0001&good&0&10\nBark&vid0002&good&0&3\n"
                           "Goat&vid0003&good&1&9\nBus&vid0004&good&0&10\nBus&vid0004&good&0&10\n")
    data = load_store(tmp_path / "feats.h5", annotations=annotations)
    assert data.provenance["frames_per_second"] == 2
    assert any("1 clip without a row in" in n for n in data.notes)
    labelled = np.concatenate(list(data.splits.values()))
    assert sorted(labelled) == [0, 1, 2, 3, 4]  # vid0005 has no annotation row and is left out
    assert data.clips.labels[0, :, ave.CATEGORIES.index("Bark")].tolist() == [0, 0, 1, 1, 1, 0, 0, 0, 0, 0]
    assert data.clips.labels[0, :, ave.BACKGROUND].tolist() == [1, 1, 0, 0, 0, 1, 1, 1, 1, 1]
    assert "hash" in data.split_rule
    assert find_default_data(tmp_path) == {"features": tmp_path / "feats.h5"}
    with pytest.raises(BmfnError, match="none of its 6 clips has labels; give --annotations"):
        load_store(tmp_path / "feats.h5")
    make_store(tmp_path / "empty.h5", n_clips=0)  # an extraction stopped before its first clip
    with pytest.raises(BmfnError, match=r"empty\.h5: holds no clip yet; extract into it first \(`bmfn extract "
                                        r"VIDEOS --out .*empty\.h5`\)$"):
        load_store(tmp_path / "empty.h5", annotations=annotations)
    other = tmp_path / "other.txt"  # ids that none of the clips has: say how clips and rows are matched
    other.write_text("Bark&vid9999&good&2&5\n")
    with pytest.raises(BmfnError, match=r"none of its 6 clips has a row in .*other\.txt: a clip's id is its video "
                                        r"file name without extension \(here e\.g\. 'vid0000'\)"):
        load_store(tmp_path / "feats.h5", annotations=other)


def test_a_store_named_by_a_folder_or_a_missing_file_is_one_line(tmp_path):
    with pytest.raises(BmfnError, match=r"^\S+: a folder, not a feature store file \(make one with .*--out feats\.h5"):
        load_store(tmp_path)
    with pytest.raises(BmfnError, match=r"absent\.h5: no such feature store \(make one with .*--out absent\.h5"):
        load_store(tmp_path / "absent.h5")


def test_store_with_stored_labels_and_splits(tmp_path):
    one_hot = np.zeros((10, 29), np.float32)
    one_hot[:, 2] = 1
    make_store(tmp_path / "feats.h5", n_clips=4,
               labels={"vid0000": (one_hot, "train"), "vid0001": (one_hot, "val"), "vid0002": (one_hot, "test")})
    data = load_store(tmp_path / "feats.h5")
    assert {k: v.tolist() for k, v in data.splits.items()} == {"train": [0], "val": [1], "test": [2]}
    assert "stored" in data.split_rule
    assert data.clips.video_labels[0].tolist() == [0, 0, 1] + [0] * 26


def test_store_labels_are_checked_and_labelled_clips_without_a_split_are_counted(tmp_path):
    """A merge of stores labelled with and without split files: the clips without one were left out without a
    word. set_labels took any split name ('validation' was never used) and any labels (zeros, background as a
    video class)."""
    from bmfn_pipeline.store import FeatureStore

    one_hot = np.zeros((10, 29), np.float32)
    one_hot[:, 2] = 1
    path = make_store(tmp_path / "feats.h5", n_clips=4, labels={
        "vid0000": (one_hot, "train"), "vid0001": (one_hot, "val"), "vid0002": (one_hot, "test"),
        "vid0003": (one_hot, "")})
    data = load_store(path)
    assert {k: v.tolist() for k, v in data.splits.items()} == {"train": [0], "val": [1], "test": [2]}
    assert data.notes == ["1 labelled clip without a split in feats.h5 left out (the other clips have splits; "
                          "--annotations with --splits gives every clip one)"]
    with FeatureStore.open(path, create=False) as store:  # labels a bmfn before these checks stored
        store.consolidate()
    with h5py.File(path, "r+") as f:
        f["label_table/labels"][2, 4] = 0
    with pytest.raises(BmfnError, match=re.escape(f"{path}: its labels (--annotations relabels it): 1 second without a "
                                                  "class or with values outside 0 to 1 (the first: clip 'vid0002', "
                                                  "second 4)")):
        load_store(path)
    background = np.eye(29, dtype=np.float32)[28]
    with FeatureStore.open(path, create=False) as store:
        for given, message in [
            ((one_hot, "validation"), "split 'validation' of 'vid0000', expected one of 'train', 'val', 'test' or "
                                      "'' (none)"),
            ((np.zeros((10, 29)), "train"), "labels: 10 seconds without a class or with values outside 0 to 1 (the "
                                            "first: clip 'vid0000', second 0)"),
            ((one_hot, "train", background), "labels: 1 video class with values outside 0 to 1 or on background (the "
                                             "first: clip 'vid0000')"),
        ]:
            with pytest.raises(BmfnError, match=f"^{re.escape(f'{path}: {message}')}"):
                store.set_labels({"vid0000": given})


def make_empty_interval_store(directory):
    """A store labelled as `bmfn extract --annotations` labels it, whose first clip's event interval is empty
    (AVE row 26, VWi2ENBuTbw 0&0); returns it and its Annotations.txt."""
    from bmfn_pipeline.store import labels_from_annotations

    annotations = directory / "Annotations.txt"
    annotations.write_text("Church bell&vid0000&good&0&0\nBark&vid0001&good&2&8\nCat&vid0002&good&0&10\n")
    rows = ave.read_annotations(annotations)
    splits = {"train": np.array([0, 1]), "val": np.array([2]), "test": np.array([], np.int64)}
    return make_store(directory / "feats.h5", n_clips=3, labels=labels_from_annotations(rows, splits)[0]), annotations


def without_video_classes(path):
    """The store as a bmfn that kept no video classes wrote it: segment labels only."""
    from bmfn_pipeline.store import FeatureStore

    with FeatureStore.open(path, create=False) as store:
        store.consolidate()
    with h5py.File(path, "a") as f:
        del f["video_labels"], f["label_table/video_labels"]


def test_a_store_keeps_the_video_class_of_an_empty_event_interval(tmp_path):
    path, annotations = make_empty_interval_store(tmp_path)
    stored, relabelled = load_store(path), load_store(path, annotations=annotations)
    assert np.flatnonzero(stored.clips.video_labels[0]).tolist() == [ave.CATEGORIES.index("Church bell")]
    np.testing.assert_array_equal(stored.clips.video_labels, relabelled.clips.video_labels)
    np.testing.assert_array_equal(stored.clips.labels, relabelled.clips.labels)
    without_video_classes(path)  # an earlier store: the classes its segment labels show; unknown, not background
    earlier = load_store(path)
    assert not earlier.clips.video_labels[0].any()
    np.testing.assert_array_equal(earlier.clips.video_labels[1:], stored.clips.video_labels[1:])


def test_given_annotations_relabel_the_release_over_labels_h5(tmp_path):
    """`train --ave-dir D --annotations A`: A's labels, not those of D's labels.h5 and mil_labels.h5 (which the
    reference says disagree with Annotations.txt on some rows)."""
    directory = make_ave_dir(tmp_path / "ave", n_clips=6)
    rows = ave.read_annotations(directory / "Annotations.txt")
    with h5py.File(directory / "labels.h5", "w") as f:
        f["avadataset"] = ave.segment_labels(rows)
    with h5py.File(directory / "mil_labels.h5", "w") as f:
        f["avadataset"] = ave.video_labels(rows)
    fixed = tmp_path / "fixed.txt"
    lines = (directory / "Annotations.txt").read_text().splitlines()
    lines[0] = f"Bark&{rows[0].video_id}&good&0&2"
    fixed.write_text("\n".join(lines) + "\n")
    bark = ave.CATEGORIES.index("Bark")
    relabelled = load_ave_dir(directory, annotations=fixed)
    assert relabelled.clips.labels[0, :, bark].tolist() == [1, 1] + [0] * 8
    assert relabelled.clips.video_labels[0].argmax() == bark
    assert relabelled.source["annotations"] == str(fixed.resolve())
    for plain in (load_ave_dir(directory), load_ave_dir(directory, annotations=directory / "Annotations.txt")):
        # The folder's own Annotations.txt is not a relabelling (earlier runs recorded it for resume and evaluate)
        assert plain.clips.labels[0, :, bark].sum() == 0 and plain.source["annotations"] is None
    with pytest.raises(BmfnError, match=r"missing\.txt: cannot read annotations"):
        load_ave_dir(directory, annotations=tmp_path / "missing.txt")


def test_incomplete_split_files_are_refused_not_replaced_by_the_hash_split(tmp_path):
    directory = make_ave_dir(tmp_path / "ave", n_clips=12)
    given = tmp_path / "splits"
    given.mkdir()
    for name in ("val", "test"):
        (given / f"{name}_order.h5").write_bytes((directory / f"{name}_order.h5").read_bytes())
    with pytest.raises(BmfnError, match=r"splits: split order files incomplete, missing train_order\.h5"):
        load_ave_dir(directory, splits=given)
    with pytest.raises(BmfnError, match=r"empty: no split files"):
        load_ave_dir(directory, splits=(tmp_path / "empty").mkdir() or tmp_path / "empty")
    (directory / "train_order.h5").unlink()  # the release folder's own files, one missing
    with pytest.raises(BmfnError, match=r"ave: split order files incomplete, missing train_order\.h5"):
        load_ave_dir(directory)


def test_a_video_id_on_several_rows_takes_its_first_row_in_a_store(tmp_path):
    """As `bmfn extract --annotations --splits` stores it: the first row's labels and split (AVE has 45 such ids,
    18 of them in two splits), whether the store holds the labels or they are made again at training time."""
    from bmfn_pipeline.store import labels_from_annotations

    annotations = tmp_path / "Annotations.txt"
    annotations.write_text("Bark&vid0000&good&2&5\nCat&vid0001&good&0&10\nGoat&vid0000&good&6&9\n")
    rows = ave.read_annotations(annotations)
    splits = tmp_path / "splits"
    splits.mkdir()
    for name, order in (("train", [0]), ("val", [1]), ("test", [2])):
        with h5py.File(splits / f"{name}_order.h5", "w") as f:
            f["order"] = np.array(order, np.int64)
    row_splits = ave.load_splits(splits, n_rows=3, annotations=rows)
    stored = load_store(make_store(tmp_path / "stored.h5", n_clips=2,
                                   labels=labels_from_annotations(rows, row_splits)[0]))
    remade = load_store(make_store(tmp_path / "plain.h5", n_clips=2), annotations=annotations, splits=splits)
    for data in (stored, remade):
        assert {k: v.tolist() for k, v in data.splits.items()} == {"train": [0], "val": [1], "test": []}
        assert data.clips.labels[0, :, ave.CATEGORIES.index("Bark")].tolist() == [0, 0, 1, 1, 1, 0, 0, 0, 0, 0]
        assert data.clips.labels[0, :, ave.CATEGORIES.index("Goat")].sum() == 0
    assert any("1 clips have several rows" in note for note in remade.notes)


def test_malformed_arrays_in_release_files_are_named(tmp_path):
    directory = make_ave_dir(tmp_path / "ave", n_clips=6, noisy=3)
    with h5py.File(directory / "audio_feature_noisy.h5", "w") as f:  # another width than the main audio
        f["avadataset"] = np.zeros((3, ave.SEGMENTS, SMALL_AUDIO + 1))
    with pytest.raises(BmfnError, match=r"audio_feature_noisy\.h5: \[10, 9\] per clip, but the main features have "
                                        r"\[10, 8\]"):
        load_ave_dir(directory)
    with h5py.File(directory / "audio_feature.h5", "w") as f:
        f.create_group("avadataset")
    with pytest.raises(BmfnError, match=r"audio_feature\.h5: 'avadataset' is a group, not an array"):
        load_ave_dir(directory)
    with h5py.File(directory / "audio_feature.h5", "w") as f:
        f["avadataset"] = 1.0
    with pytest.raises(BmfnError, match=r"audio_feature\.h5: 'avadataset' is a single value, not an array"):
        load_ave_dir(directory)
    with h5py.File(directory / "audio_feature.h5", "w") as f:
        f["avadataset"] = np.zeros((6, ave.SEGMENTS))
    with pytest.raises(BmfnError, match=r"audio_feature\.h5: shape \[6, 10\], expected 3 dims"):
        load_ave_dir(directory)


def _rewrite(path, change) -> None:
    """An AVE file's 'avadataset' replaced by change(its values)."""
    with h5py.File(path, "r+") as f:
        values = change(f["avadataset"][()])
        del f["avadataset"]
        f["avadataset"] = values


def test_values_the_losses_would_take_wrongly_are_refused(tmp_path):
    """NaN in a val clip's audio gave an accuracy computed on garbage, in a training clip a NaN loss blamed on the
    learning rate; a second labelled all zeros trained as background and was scored as class 0; text failed with
    a traceback. Each is one line naming the file (the visual file before any conversion)."""
    directory = make_ave_dir(tmp_path / "ave", n_clips=6)
    original = {name: (directory / name).read_bytes() for name in ("audio_feature.h5", "visual_feature.h5")}

    def nan_in_row_4(values):
        values[4, 3] = np.nan
        return values

    for name, change, message in [
        ("audio_feature.h5", nan_in_row_4, "NaN or infinity in 1 row (the first: row 4)"),
        ("visual_feature.h5", lambda v: np.where(np.arange(6)[:, None, None, None, None] >= 2, np.inf, v),
         "NaN or infinity in 4 rows (the first: row 2)"),
        ("audio_feature.h5", lambda v: np.full(v.shape, b"x"), "'avadataset' holds |S1, not numbers"),
        ("visual_feature.h5", lambda v: v[:, :9], "shape [6, 9, 2, 2, 16], expected 5 dims"),  # before converting
    ]:
        _rewrite(directory / name, change)
        with pytest.raises(BmfnError, match=f"^{re.escape(str(directory / name))}: {re.escape(message)}"):
            load_ave_dir(directory)
        (directory / name).write_bytes(original[name])
        assert not list(directory.glob("*.npy")) or name == "audio_feature.h5"
    labels = ave.segment_labels(ave.read_annotations(directory / "Annotations.txt"))
    annotations_text = (directory / "Annotations.txt").read_text()
    (directory / "Annotations.txt").unlink()
    for name, values, message in [
        ("labels.h5", np.where(np.arange(10)[None, :, None] == 7, 0, labels),
         "6 seconds without a class or with values outside 0 to 1 (the first: row 0, second 7); each second's "
         "label is one-hot"),
        ("labels.h5", labels * 2, "60 seconds without a class or with values outside 0 to 1 (the first: row 0, "),
        ("mil_labels.h5", np.eye(ave.NUM_CLASSES, dtype=np.float32)[[0, 1, 2, 3, 4, ave.BACKGROUND]],
         "1 video class with values outside 0 to 1 or on background (the first: row 5)"),
        ("mil_labels.h5", np.where((np.arange(6)[:, None] == 2) & (np.arange(ave.NUM_CLASSES) == 7), -1,
                                   np.eye(ave.NUM_CLASSES, dtype=np.float32)[:6]),  # row 2 with -1 for class 7
         "1 video class with values outside 0 to 1 or on background (the first: row 2)"),
        ("mil_labels.h5", np.eye(ave.NUM_CLASSES, dtype=np.float32)[[0, 1, ave.BACKGROUND, 3, 4, ave.BACKGROUND]],
         "2 video classes with values outside 0 to 1 or on background (the first: row 2)"),
    ]:
        with h5py.File(directory / "labels.h5", "w") as f:
            f["avadataset"] = labels
        with h5py.File(directory / name, "w") as f:
            f["avadataset"] = values
        with pytest.raises(BmfnError, match=f"^{re.escape(str(directory / name))}: {re.escape(message)}"):
            load_ave_dir(directory)
        (directory / "mil_labels.h5").unlink(missing_ok=True)
    with h5py.File(directory / "labels.h5", "w") as f:
        f["avadataset"] = labels
    assert np.array_equal(load_ave_dir(directory).clips.labels, labels)
    (directory / "Annotations.txt").write_text(annotations_text)  # beside labels.h5, which wins: said where they differ
    assert load_ave_dir(directory).notes == []
    with h5py.File(directory / "labels.h5", "w") as f:
        f["avadataset"] = np.where(np.arange(6)[:, None, None] == 2, np.eye(29, dtype=np.float32)[28], labels)
    assert load_ave_dir(directory).notes == [
        f"1 clip labelled otherwise in labels.h5 than in Annotations.txt; labels.h5 is used (--annotations "
        f"{directory / 'Annotations.txt'} uses the annotations)"]


def test_a_damaged_visual_cache_is_converted_again(tmp_path):
    directory = make_ave_dir(tmp_path / "ave", n_clips=4)
    first = np.array(compact_visual(directory / "visual_feature.h5"))
    cache = directory / "visual_feature.f16.npy"
    cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])  # a copy cut short: np.load failed
    assert np.array_equal(compact_visual(directory / "visual_feature.h5"), first)


def test_float16_cache_refuses_a_full_disk_and_removes_dead_conversions(tmp_path, monkeypatch):
    """A disk without room for the cache is one line naming the folder, before any page is written (a sparse
    memory map would die of SIGBUS); temporaries of conversions killed before are removed, a live one's kept."""
    import errno
    import fcntl

    directory = make_ave_dir(tmp_path / "ave", n_clips=4)
    source = directory / "visual_feature.h5"
    dead, live = (directory / f"visual_feature.f16.npy.tmp-{name}" for name in ("dead", "live"))
    dead.write_bytes(b"x" * 100)
    live.write_bytes(b"x" * 100)
    held = os.open(live, os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)  # a conversion still running elsewhere

    def no_room(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("bmfn_pipeline.data.os.posix_fallocate", no_room)
    try:
        with pytest.raises(BmfnError, match=rf"{directory}: cannot write the float16 cache of {source} "
                                            r"\(0\.0 MB\): No space left on device"):
            compact_visual(source)
        assert sorted(p.name for p in directory.glob("visual_feature.f16*")) == [live.name]
        monkeypatch.undo()
        assert compact_visual(source).shape[0] == 4
        assert live.exists()
        dead.write_bytes(b"x")  # a rank killed while another finished the cache: removed on the next load
        compact_visual(source)
        assert not dead.exists() and live.exists()
    finally:
        os.close(held)
