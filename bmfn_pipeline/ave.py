"""The AVE dataset's annotation rows, labels and splits (bmfn-reference.md sections 9 and 10).

Everything is indexed by annotation *row*, not by video id: 45 video ids occur on more than one row, and
the released feature and label files duplicate them, so row i is line i of ``Annotations.txt``.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .errors import BmfnError, counted

# bmfn-reference.md section 10: index order = first appearance in Annotations.txt = mil_labels.h5 columns.
CATEGORIES: tuple[str, ...] = (
    "Church bell",
    "Male speech, man speaking",
    "Bark",
    "Fixed-wing aircraft, airplane",
    "Race car, auto racing",
    "Female speech, woman speaking",
    "Helicopter",
    "Violin, fiddle",
    "Flute",
    "Ukulele",
    "Frying (food)",
    "Truck",
    "Shofar",
    "Motorcycle",
    "Acoustic guitar",
    "Train horn",
    "Clock",
    "Banjo",
    "Goat",
    "Baby cry, infant cry",
    "Bus",
    "Chainsaw",
    "Cat",
    "Horse",
    "Toilet flush",
    "Rodents, rats, mice",
    "Accordion",
    "Mandolin",
)
# bmfn-reference.md section 9: column 28 of labels.h5 / mil_labels.h5 is background.
BACKGROUND = len(CATEGORIES)
NUM_CLASSES = BACKGROUND + 1
# One label per second of a 10 s AVE clip (bmfn-reference.md section 9: labels_closs.h5 is [N,10]).
SEGMENTS = 10

# The header line of the copy inside the dataset zip (bmfn-reference.md section 9); the git copy has none.
HEADER = "Category&VideoID&Quality&StartTime&EndTime"
_FIELDS = len(HEADER.split("&"))
_CATEGORY_INDEX = {name: i for i, name in enumerate(CATEGORIES)}

# Split names and the two file forms they come in (bmfn-reference.md section 9; the dataset zip).
SPLITS = ("train", "val", "test")
ORDER_FILE = "{}_order.h5"
_ORDER_KEY = "order"
LIST_FILE = "{}Set.txt"
ANNOTATIONS_FILE = "Annotations.txt"


@dataclass(frozen=True)
class AnnotationRow:
    """One line ``Category&VideoID&Quality&StartTime&EndTime``; the event covers seconds start <= t < end."""

    category: str
    video_id: str
    quality: str
    start: int
    end: int

    @property
    def label(self) -> int:
        """The category's column in the label arrays."""
        return _CATEGORY_INDEX[self.category]


def _parse_line(text: str, path: Path, lineno: int) -> AnnotationRow:
    fields = text.split("&")
    where = f"{path}: line {lineno}"
    if len(fields) != _FIELDS:
        raise BmfnError(f"{where}: expected {_FIELDS} '&'-separated fields ({HEADER}), got {len(fields)}: {text!r}")
    category, video_id, quality, start_text, end_text = (field.strip() for field in fields)
    if category not in _CATEGORY_INDEX:
        raise BmfnError(f"{where}: unknown category {category!r} (not one of the {len(CATEGORIES)} AVE categories)")
    if not video_id:
        raise BmfnError(f"{where}: empty video id")
    try:
        start, end = int(start_text), int(end_text)
    except ValueError:
        raise BmfnError(f"{where}: start and end must be integer seconds, got {start_text!r} and {end_text!r}") from None
    if not 0 <= start <= end <= SEGMENTS:
        raise BmfnError(f"{where}: need 0 <= start <= end <= {SEGMENTS}, got start {start} and end {end}")
    return AnnotationRow(category, video_id, quality, start, end)


def _read_numbered(path: str | Path) -> list[tuple[int, AnnotationRow]]:
    """Rows with their 1-based line numbers; skips the optional header and trailing blank lines."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except OSError as err:
        raise BmfnError(f"{path}: cannot read annotations: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise BmfnError(f"{path}: not a UTF-8 text file ({err.reason} at byte {err.start})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    numbered = []
    for lineno, line in enumerate(lines, start=1):
        text = line.strip()
        if lineno == 1 and text.lower() == HEADER.lower():
            continue
        if not text:
            # A skipped blank line would shift every later row against the released feature files.
            raise BmfnError(f"{path}: line {lineno}: empty line (row i must be line i of the annotations)")
        numbered.append((lineno, _parse_line(text, path, lineno)))
    return numbered


def read_annotations(path: str | Path) -> list[AnnotationRow]:
    """Read ``Annotations.txt`` (or a split list in the same format), with or without the dataset zip's header."""
    return [row for _, row in _read_numbered(path)]


def segment_labels(rows: list[AnnotationRow]) -> np.ndarray:
    """Per-second one-hot labels [N,10,29]: the row's category inside [start, end), background elsewhere."""
    labels = np.zeros((len(rows), SEGMENTS, NUM_CLASSES), dtype=np.float32)
    seconds = np.arange(SEGMENTS)
    for i, row in enumerate(rows):
        event = (row.start <= seconds) & (seconds < row.end)
        labels[i, event, row.label] = 1.0
        labels[i, ~event, BACKGROUND] = 1.0
    return labels


def video_labels(rows: list[AnnotationRow]) -> np.ndarray:
    """Video-level one-hot labels [N,29] as in ``mil_labels.h5``: the category, never background."""
    labels = np.zeros((len(rows), NUM_CLASSES), dtype=np.float32)
    labels[np.arange(len(rows)), [row.label for row in rows]] = 1.0
    return labels


def video_labels_from_segments(labels: np.ndarray) -> np.ndarray:
    """Video one-hot [N,29] from segment labels [N,10,29]: the foreground classes present. A video label is never
    background (bmfn-reference.md section 9): a clip without an event second (AVE's empty intervals) gets a row of
    zeros, its class unknown, and weakly supervised training leaves it out."""
    video = np.zeros((len(labels), NUM_CLASSES), np.float32)
    video[:, :BACKGROUND] = labels[:, :, :BACKGROUND].max(axis=1)
    return video


def check_labels(where: str, segments: np.ndarray | None, videos: np.ndarray | None = None,
                 names: list[str] | None = None) -> None:
    """Refuse labels the losses would take wrongly: each second [N,10,29] needs a class (an all-zero second trained
    as background and was scored as class 0), values from 0 to 1; video classes [N,29] are 0 to 1 and never
    background (bmfn-reference.md section 9: weak targets are video classes). `names` name the N clips (default:
    their rows)."""
    def named(index: int) -> str:
        return f"clip {names[index]!r}" if names is not None else f"row {index}"

    if segments is not None:
        with np.errstate(invalid="ignore"):
            off = ~((segments >= 0) & (segments <= 1)).all(axis=-1) | ~(segments > 0).any(axis=-1)
        if off.any():
            clip, second = np.argwhere(off)[0]
            raise BmfnError(f"{where}: {counted(int(off.sum()), 'second')} without a class or with values outside 0 "
                            f"to 1 (the first: {named(clip)}, second {second}); each second's label is one-hot over "
                            f"the {NUM_CLASSES} classes, background the last")
    if videos is None:
        return
    with np.errstate(invalid="ignore"):
        off = ~((videos >= 0) & (videos <= 1)).all(axis=-1) | (videos[..., BACKGROUND] != 0)
    if off.any():
        raise BmfnError(f"{where}: {counted(int(off.sum()), 'video class', 'video classes')} with values outside 0 "
                        f"to 1 or on background (the first: {named(np.flatnonzero(off)[0])}); a video's classes are "
                        "its events")


def video_id_rows(rows: list[AnnotationRow]) -> dict[str, list[int]]:
    """Video id -> the row indices that annotate it (several for the dataset's duplicated ids)."""
    index: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        index[row.video_id].append(i)
    return dict(index)


def _read_order(path: Path) -> np.ndarray:
    try:
        with h5py.File(path, "r") as f:
            if _ORDER_KEY not in f:
                raise BmfnError(f"{path}: no dataset {_ORDER_KEY!r} (found {sorted(f.keys())})")
            if not isinstance(f[_ORDER_KEY], h5py.Dataset):
                raise BmfnError(f"{path}: {_ORDER_KEY!r} is a group, not a 1-D integer array")
            order = np.asarray(f[_ORDER_KEY][()])
    except OSError as err:
        raise BmfnError(f"{path}: cannot read as HDF5: {err}") from None
    if order.ndim != 1 or not np.issubdtype(order.dtype, np.integer):
        raise BmfnError(f"{path}: {_ORDER_KEY!r} must be a 1-D integer array, got {order.dtype} {order.shape}")
    return order.astype(np.int64)


def _rows_of_list(path: Path, free: dict[AnnotationRow, deque[int]]) -> np.ndarray:
    """Map each line of a split list to the annotation row it repeats (whole-line match, duplicated ids included),
    taking that row out of `free` (each annotation line -> its rows not yet taken by a split list)."""
    indices = []
    for lineno, row in _read_numbered(path):
        if not free.get(row):
            raise BmfnError(f"{path}: line {lineno}: no (unused) row of the annotations reads "
                            f"'{row.category}&{row.video_id}&{row.quality}&{row.start}&{row.end}'")
        indices.append(free[row].popleft())
    return np.asarray(indices, dtype=np.int64)


def load_splits(
    directory: str | Path,
    n_rows: int | None = None,
    *,
    annotations: str | Path | list[AnnotationRow] | None = None,
) -> dict[str, np.ndarray]:
    """Row indices of the train/val/test splits, from ``*_order.h5`` or else ``trainSet.txt`` etc.

    Split lists are matched line by line against ``annotations`` (default: ``Annotations.txt`` in
    ``directory``). Indices are checked to lie in ``range(n_rows)`` (when known) and not to overlap.
    """
    directory = Path(directory)
    order_files = {name: directory / ORDER_FILE.format(name) for name in SPLITS}
    list_files = {name: directory / LIST_FILE.format(name) for name in SPLITS}
    if any(p.is_file() for p in order_files.values()):
        missing = [p.name for p in order_files.values() if not p.is_file()]
        if missing:
            raise BmfnError(f"{directory}: split order files incomplete, missing {', '.join(missing)}")
        splits = {name: _read_order(path) for name, path in order_files.items()}
    elif any(p.is_file() for p in list_files.values()):
        missing = [p.name for p in list_files.values() if not p.is_file()]
        if missing:
            raise BmfnError(f"{directory}: split lists incomplete, missing {', '.join(missing)}")
        if annotations is None:
            annotations = directory / ANNOTATIONS_FILE
        if not isinstance(annotations, list):
            annotations = read_annotations(annotations)
        n_rows = len(annotations) if n_rows is None else n_rows
        # Two identical annotation lines are two rows, and two lists naming that line take one each (in the order
        # train, val, test), not both the first.
        free: dict[AnnotationRow, deque[int]] = defaultdict(deque)
        for i, row in enumerate(annotations):
            free[row].append(i)
        splits = {name: _rows_of_list(path, free) for name, path in list_files.items()}
    else:
        names = [p.name for p in order_files.values()] + [p.name for p in list_files.values()]
        raise BmfnError(f"{directory}: no split files (expected {', '.join(names)})")

    seen: dict[int, str] = {}
    for name, indices in splits.items():
        if indices.size and (indices.min() < 0 or (n_rows is not None and indices.max() >= n_rows)):
            raise BmfnError(f"{directory}: {name} split has row indices outside 0..{'N' if n_rows is None else n_rows - 1}")
        for i in indices.tolist():
            if i in seen:
                where = f"twice in the {name} split" if seen[i] == name else f"in both the {seen[i]} and the {name} split"
                raise BmfnError(f"{directory}: row {i} is {where}")
            seen[i] = name
    return splits
