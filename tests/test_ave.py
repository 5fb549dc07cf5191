"""The AVE data layer against the dataset's own files in ../shared/ave."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from bmfn_pipeline.ave import (
    BACKGROUND,
    CATEGORIES,
    HEADER,
    NUM_CLASSES,
    SEGMENTS,
    AnnotationRow,
    load_splits,
    read_annotations,
    segment_labels,
    video_id_rows,
    video_labels,
)
from bmfn_pipeline.errors import BmfnError


@pytest.fixture(scope="module")
def rows(ave_dir: Path) -> list[AnnotationRow]:
    return read_annotations(ave_dir / "Annotations.txt")


def _released(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f["avadataset"][()]


def test_rows_match_the_reference(rows):
    # media/README.md: 4143 rows, 4097 unique ids (45 duplicated, one of them three times), row 26 empty.
    assert len(rows) == 4143
    by_id = video_id_rows(rows)
    assert len(by_id) == 4097
    assert sorted(len(v) for v in by_id.values() if len(v) > 1) == [2] * 44 + [3]
    assert rows[26] == AnnotationRow("Church bell", "VWi2ENBuTbw", "good", 0, 0)
    # Duplicated ids stay separate rows, each with its own category.
    for indices in by_id.values():
        assert all(rows[i].video_id == rows[indices[0]].video_id for i in indices)
        assert len({rows[i].category for i in indices}) == len(indices)


def test_category_order_is_first_appearance(rows):
    first_seen = list(dict.fromkeys(row.category for row in rows))
    assert tuple(first_seen) == CATEGORIES
    assert (len(CATEGORIES), BACKGROUND, NUM_CLASSES, SEGMENTS) == (28, 28, 29, 10)


def test_segment_labels_equal_labels_closs(rows, ave_dir):
    labels = segment_labels(rows)
    assert labels.shape == (4143, SEGMENTS, NUM_CLASSES) and labels.dtype == np.float32
    np.testing.assert_array_equal(labels.sum(-1), 1.0)
    event = 1.0 - labels[:, :, BACKGROUND]
    np.testing.assert_array_equal(event, _released(ave_dir / "labels_closs.h5"))
    # The event seconds carry the row's category (the video label) and nothing else.
    np.testing.assert_array_equal(labels[:, :, :BACKGROUND].max(1), video_labels(rows)[:, :BACKGROUND] * event.max(1)[:, None])


def test_video_labels_equal_mil_labels(rows, ave_dir):
    labels = video_labels(rows)
    assert labels.dtype == np.float32
    np.testing.assert_array_equal(labels, _released(ave_dir / "mil_labels.h5"))
    assert labels[:, BACKGROUND].sum() == 0


def test_order_splits(ave_dir, rows):
    splits = load_splits(ave_dir, n_rows=len(rows))
    assert {k: len(v) for k, v in splits.items()} == {"train": 3339, "val": 402, "test": 402}
    assert all(v.dtype == np.int64 for v in splits.values())
    together = np.concatenate(list(splits.values()))
    assert len(np.unique(together)) == len(together)  # disjoint
    np.testing.assert_array_equal(np.sort(together), np.arange(len(rows)))


def test_split_lists_give_the_order_files_indices(ave_dir, rows, tmp_path):
    lines = (ave_dir / "Annotations.txt").read_text().splitlines()
    expected = load_splits(ave_dir)
    for name, indices in expected.items():
        # The dataset zip's lists carry the header too; the duplicated ids' rows must map to their own line.
        (tmp_path / f"{name}Set.txt").write_text(HEADER + "\n" + "\n".join(lines[i] for i in indices) + "\n")
    got = load_splits(tmp_path, annotations=ave_dir / "Annotations.txt")
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])
    # Default annotations: Annotations.txt beside the lists.
    (tmp_path / "Annotations.txt").write_text("\n".join(lines) + "\n")
    np.testing.assert_array_equal(load_splits(tmp_path)["val"], expected["val"])


def test_split_list_line_not_in_annotations(tmp_path):
    (tmp_path / "Annotations.txt").write_text("Bark&a&good&0&10\nCat&b&good&1&3\n")
    (tmp_path / "trainSet.txt").write_text("Bark&a&good&0&10\n")
    (tmp_path / "valSet.txt").write_text("Cat&b&good&1&4\n")
    (tmp_path / "testSet.txt").write_text("")
    with pytest.raises(BmfnError, match=r"valSet\.txt: line 1: no \(unused\) row"):
        load_splits(tmp_path)


def test_identical_lines_in_split_lists_take_their_rows_in_order(tmp_path):
    """Two identical annotation lines are two rows: a split list naming the line twice takes the first row for its
    first mention and the second for its next, and a third mention finds no unused row; two lists naming it once
    each take one row each (both took the first, then refused as a row in two splits)."""
    (tmp_path / "Annotations.txt").write_text("Bark&a&good&0&10\nCat&b&good&1&3\nBark&a&good&0&10\n")
    (tmp_path / "trainSet.txt").write_text("Bark&a&good&0&10\nBark&a&good&0&10\n")
    (tmp_path / "valSet.txt").write_text("Cat&b&good&1&3\n")
    (tmp_path / "testSet.txt").write_text("")
    assert {name: rows.tolist() for name, rows in load_splits(tmp_path).items()} == {
        "train": [0, 2], "val": [1], "test": []}
    (tmp_path / "trainSet.txt").write_text("Bark&a&good&0&10\n")
    (tmp_path / "testSet.txt").write_text("Bark&a&good&0&10\n")
    assert {name: rows.tolist() for name, rows in load_splits(tmp_path).items()} == {
        "train": [0], "val": [1], "test": [2]}
    (tmp_path / "testSet.txt").write_text("")
    (tmp_path / "trainSet.txt").write_text("Bark&a&good&0&10\n" * 3)
    with pytest.raises(BmfnError, match=r"trainSet\.txt: line 3: no \(unused\) row of the annotations reads "
                                        r"'Bark&a&good&0&10'"):
        load_splits(tmp_path)


def test_overlapping_or_incomplete_splits_refused(tmp_path):
    for name, order in {"train": [0, 1], "val": [1], "test": [2]}.items():
        with h5py.File(tmp_path / f"{name}_order.h5", "w") as f:
            f["order"] = np.array(order, dtype=np.int64)
    with pytest.raises(BmfnError, match="row 1 is in both the train and the val split"):
        load_splits(tmp_path)
    with h5py.File(tmp_path / "val_order.h5", "w") as f:
        f["order"] = np.array([3], dtype=np.int64)
    assert load_splits(tmp_path)["val"].tolist() == [3]
    with pytest.raises(BmfnError, match=r"val split has row indices outside 0\.\.2"):
        load_splits(tmp_path, n_rows=3)
    # numpy would wrap a negative index round to the last clips; a row twice would count twice in the accuracy;
    # float indices would be truncated
    for order, message in (([-1], r"val split has row indices outside 0\.\.N"), ([3, 3], "row 3 is twice in the val"),
                           (np.array([3.0]), "a 1-D integer array, got float64")):
        with h5py.File(tmp_path / "val_order.h5", "w") as f:
            f["order"] = np.asarray(order)
        with pytest.raises(BmfnError, match=message):
            load_splits(tmp_path)
    for bad, found in ((b"3,4", "a 1-D integer array, got"), (None, "is a group")):  # one line, not a traceback
        with h5py.File(tmp_path / "val_order.h5", "w") as f:
            f.create_group("order") if bad is None else f.create_dataset("order", data=bad)
        with pytest.raises(BmfnError, match=rf"val_order\.h5: 'order' (must be|is a group).*"):
            load_splits(tmp_path)
    (tmp_path / "test_order.h5").unlink()
    with pytest.raises(BmfnError, match="missing test_order.h5"):
        load_splits(tmp_path)


def test_header_variant_reads_the_same_rows(ave_dir, rows, tmp_path):
    text = (ave_dir / "Annotations.txt").read_text()
    with_header = tmp_path / "Annotations.txt"
    with_header.write_text(HEADER + "\r\n" + text.replace("\n", "\r\n"))
    assert read_annotations(with_header) == rows


@pytest.mark.parametrize(
    "bad, message",
    [
        ("Bark&abc&good&0", r"line 3: expected 5 '&'-separated fields"),
        ("Barking&abc&good&0&10", r"line 3: unknown category 'Barking'"),
        ("Bark&abc&good&zero&10", r"line 3: start and end must be integer seconds"),
        ("Bark&abc&good&6&4", r"line 3: need 0 <= start <= end <= 10"),
        ("Bark&abc&good&3&11", r"line 3: need 0 <= start <= end <= 10, got start 3 and end 11"),  # past the clip
        ("Bark&abc&good&-1&4", r"line 3: need 0 <= start <= end <= 10, got start -1 and end 4"),
        ("Bark& &good&0&10", r"line 3: empty video id"),
        (HEADER, r"line 3: unknown category 'Category'"),  # the header only as the first line
        ("", r"line 3: empty line"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, bad, message):
    path = tmp_path / "ann.txt"
    path.write_text(f"{HEADER}\nBark&xyz&good&0&10\n{bad}\nCat&q&good&1&2\n")
    with pytest.raises(BmfnError, match=message) as err:
        read_annotations(path)
    assert str(path) in str(err.value)


def test_small_labels_by_hand(tmp_path):
    path = tmp_path / "ann.txt"
    path.write_text("Cat&x&good&2&5\nCat&x&bad&0&0\n\n")
    rows = read_annotations(path)
    labels = segment_labels(rows)
    cat = CATEGORIES.index("Cat")
    np.testing.assert_array_equal(labels[0, :, cat], [0, 0, 1, 1, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(labels[1, :, BACKGROUND], np.ones(SEGMENTS))
    assert video_id_rows(rows) == {"x": [0, 1]}
    np.testing.assert_array_equal(video_labels(rows).argmax(1), [cat, cat])
