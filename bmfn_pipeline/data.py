"""Training data: the AVE release or a bmfn feature store, as labelled clips with train/val/test splits.

Memory: the released `visual_feature.h5` is 7.7 GiB of float64. It is converted once, in slices, to a
float16 `.npy` cache (4143 x 10 x 7 x 7 x 512 x 2 B = 2.1 GB, plus 0.09 GB for the 178 noisy clips) that
is memory-mapped, so a full AVE run needs about 2.1 GB of page cache, not 7.7 GiB of RAM; audio and
labels are small (float32, 21 MB). A bmfn `feats.h5` store is read into memory in its stored dtype
(float16: the same 2.1 GB for AVE-sized data).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import torch
from tqdm import tqdm

from bmfn_pipeline import ave
from bmfn_pipeline.ave import SPLITS, video_labels_from_segments
from bmfn_pipeline.errors import BmfnError, counted, failed_writes

# File names and HDF5 key of the AVE release (bmfn-reference.md section 9).
AVE_KEY = "avadataset"
VISUAL_FILE = "visual_feature.h5"
AUDIO_FILE = "audio_feature.h5"
LABELS_FILE = "labels.h5"
VIDEO_LABELS_FILE = "mil_labels.h5"
ANNOTATIONS_FILE = "Annotations.txt"
NOISY_VISUAL_FILE = "visual_feature_noisy.h5"
NOISY_AUDIO_FILE = "audio_feature_noisy.h5"
NOISY_LABELS_FILE = "labels_noisy.h5"
# Any of these in an AVE folder makes ave.load_splits apply (and refuse an incomplete set).
SPLIT_FILES = tuple(pattern.format(name) for pattern in (ave.ORDER_FILE, ave.LIST_FILE) for name in SPLITS)
STORE_FILE = "feats.h5"  # what `bmfn extract --out feats.h5` writes and a plain `bmfn train` looks for

# Split used when the data carries none: 80/10/10 by a hash of the video id (issue 4).
HASH_SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
# float16 holds pool5 maps (non-negative, far below 65504) to ~3 significant digits at a quarter of float64's size.
CACHE_DTYPE = np.float16
NUMBER_KINDS = "biuf"  # numpy dtype kinds read as features or labels: bool, integers, floats
# 16 frames averaged per segment in the released features (features-reference.md 1.1; decode.FRAMES_PER_SEGMENT,
# not imported so that training needs no video decoder installed).
AVE_FRAMES_PER_SEGMENT = 16
CONVERT_ROWS = 32  # rows per slice when converting the float64 visual file: 32 x 2 MB of float64 in memory at once



@dataclass
class ClipArrays:
    """Per-clip arrays, row-aligned: visual [N,10,7,7,512], audio [N,10,128], labels [N,10,29], video labels [N,29]."""

    visual: np.ndarray | torch.Tensor
    audio: np.ndarray | torch.Tensor
    labels: np.ndarray | torch.Tensor
    video_labels: np.ndarray | torch.Tensor

    def __len__(self) -> int:
        return len(self.audio)

    def to(self, device: torch.device) -> "ClipArrays":
        """All arrays as tensors on `device` (visual stays in its compact dtype until a batch is taken)."""
        return ClipArrays(*(torch.from_numpy(np.array(a)).to(device) if isinstance(a, np.ndarray) else a.to(device)
                            for a in (self.visual, self.audio, self.labels, self.video_labels)))

    def take(self, rows: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
        """The rows as float32 tensors on `device`; rows are read in sorted order (memory-mapped files read faster).

        Tensors on a GPU are indexed there, with the row numbers copied from pinned memory: a copy from pageable
        memory would first wait for the GPU to finish its queue, so the next step would only be queued after the
        previous one ended, with the GPU idle meanwhile."""
        rows = np.sort(rows)
        out, indices = {}, {}
        for name in ("visual", "audio", "labels", "video_labels"):
            array = getattr(self, name)
            if isinstance(array, torch.Tensor):
                if array.device not in indices:
                    index = torch.from_numpy(rows)
                    indices[array.device] = (index.pin_memory().to(array.device, non_blocking=True)
                                             if array.device.type == "cuda" else index)
                part = array[indices[array.device]]
            else:
                part = torch.from_numpy(np.ascontiguousarray(array[rows]))
            out[name] = part.to(device=device, dtype=torch.float32, non_blocking=True)
        return out


@dataclass
class FeatureData:
    """Everything training and evaluation need from one data source."""

    clips: ClipArrays
    clip_ids: list[str]
    splits: dict[str, np.ndarray]  # 'train', 'val', 'test' -> row indices into clips
    split_rule: str  # where the splits came from, said in the output and recorded in the run
    provenance: dict  # how the features were made (compared against a checkpoint's)
    source: dict  # how to load the same data again: kind, path, annotations, splits (recorded in checkpoints)
    noisy: ClipArrays | None = None  # the 178 background-only clips that join the weak training set
    notes: list[str] = field(default_factory=list)  # things the user should hear about (skipped clips, ...)

    def describe(self) -> str:
        sizes = ", ".join(f"{name} {len(self.splits[name])}" for name in SPLITS)
        noisy = f" + {len(self.noisy)} background clips for weak training" if self.noisy is not None else ""
        return f"{self.source['kind']} {self.source['path']}: {len(self.clip_ids)} clips ({sizes}; {self.split_rule}){noisy}"

    def to(self, device: torch.device) -> "FeatureData":
        """A copy whose arrays live on `device` (used on GPUs, where AVE fits: 2.1 GB in float16)."""
        noisy = self.noisy.to(device) if self.noisy is not None else None
        return FeatureData(self.clips.to(device), self.clip_ids, self.splits, self.split_rule, self.provenance,
                           self.source, noisy, self.notes)


def load_data(*, ave_dir: str | Path | None = None, features: str | Path | None = None,
              annotations: str | Path | None = None, splits: str | Path | None = None,
              include_noisy: bool = True, cache_dir: str | Path | None = None, progress: bool = True) -> FeatureData:
    """Load either the AVE release directory or a bmfn feature store (exactly one of `ave_dir`, `features`);
    `progress`: a bar while the AVE release's visual file is converted (once)."""
    if (ave_dir is None) == (features is None):
        raise BmfnError("give exactly one data source: --ave-dir DIR (the AVE release) or --features feats.h5")
    if ave_dir is not None:
        return load_ave_dir(ave_dir, annotations=annotations, splits=splits, include_noisy=include_noisy,
                            cache_dir=cache_dir, progress=progress)
    return load_store(features, annotations=annotations, splits=splits)


def find_default_data(directory: str | Path = ".") -> dict[str, Path]:
    """What a plain `bmfn train` uses: `feats.h5` in the folder, else the AVE release files in it."""
    directory = Path(directory)
    if (directory / STORE_FILE).is_file():
        return {"features": directory / STORE_FILE}
    if (directory / VISUAL_FILE).is_file() and (directory / AUDIO_FILE).is_file():
        return {"ave_dir": directory}
    raise BmfnError(f"{directory.resolve()}: no {STORE_FILE} and no {VISUAL_FILE}/{AUDIO_FILE} here; "
                    "give --features feats.h5 or --ave-dir DIR")


# ---------------------------------------------------------------------------------------------- AVE release


def load_ave_dir(directory: str | Path, *, annotations: str | Path | None = None, splits: str | Path | None = None,
                 include_noisy: bool = True, cache_dir: str | Path | None = None,
                 progress: bool = True) -> FeatureData:
    """The AVE release: features (float64 accepted), labels.h5 or Annotations.txt, order files, noisy clips."""
    directory = Path(directory)
    visual_path, audio_path = directory / VISUAL_FILE, directory / AUDIO_FILE
    for path in (visual_path, audio_path):
        if not path.is_file():
            raise BmfnError(f"{path}: missing; an AVE directory holds {VISUAL_FILE} and {AUDIO_FILE}")
    provenance = _ave_dir_provenance(visual_path, audio_path)
    audio = _read_numbers(audio_path, AVE_KEY)
    _check_features(audio_path, audio, 3)
    n = len(audio)
    with _open_h5(visual_path) as f:  # its shape before a conversion of gigabytes
        _check_features(visual_path, _dataset(f, visual_path, AVE_KEY), 5)
        _check_rows(visual_path, f[AVE_KEY], audio, audio_path.name)
    visual = compact_visual(visual_path, cache_dir, progress)

    # Annotations given by the user relabel the clips, whatever labels.h5 and mil_labels.h5 say; the folder's own
    # Annotations.txt does not (runs of earlier versions recorded it, and resume or evaluation would name it).
    own = directory / ANNOTATIONS_FILE
    relabel = annotations is not None and not (own.is_file() and Path(annotations).resolve() == own.resolve())
    annotations = Path(annotations) if relabel else own
    rows = ave.read_annotations(annotations) if relabel or annotations.is_file() else None
    if rows is not None and len(rows) != n:
        raise BmfnError(f"{annotations}: {len(rows)} rows but the features have {n}; row i must be line i")
    if rows is not None and (relabel or not (directory / LABELS_FILE).is_file()):
        labels, labels_from = ave.segment_labels(rows), annotations
    elif (directory / LABELS_FILE).is_file():
        labels, labels_from = _read_numbers(directory / LABELS_FILE, AVE_KEY), directory / LABELS_FILE
    else:
        raise BmfnError(f"{directory}: neither {LABELS_FILE} nor {ANNOTATIONS_FILE}; one of them gives the labels")
    if labels.shape != (n, ave.SEGMENTS, ave.NUM_CLASSES):
        raise BmfnError(f"{directory / LABELS_FILE}: shape {labels.shape}, expected ({n}, {ave.SEGMENTS}, {ave.NUM_CLASSES})")
    notes = []
    if rows is not None and labels_from != annotations:  # labels.h5 used while the folder's Annotations.txt is there
        differ = int((labels.argmax(-1) != ave.segment_labels(rows).argmax(-1)).any(axis=1).sum())
        if differ:  # the release's own: AVEL issue #10 reports two such rows
            notes.append(f"{counted(differ, 'clip')} labelled otherwise in {LABELS_FILE} than in {annotations.name}; "
                         f"{LABELS_FILE} is used (--annotations {annotations} uses the annotations)")
    if rows is not None and (relabel or not (directory / VIDEO_LABELS_FILE).is_file()):
        video_labels = ave.video_labels(rows)
    elif (directory / VIDEO_LABELS_FILE).is_file():
        video_labels = _read_numbers(directory / VIDEO_LABELS_FILE, AVE_KEY)
        _check_shape(directory / VIDEO_LABELS_FILE, video_labels, (n, ave.NUM_CLASSES), AUDIO_FILE)
        ave.check_labels(str(directory / VIDEO_LABELS_FILE), None, video_labels)
    else:
        video_labels = video_labels_from_segments(labels)
    ave.check_labels(str(labels_from), labels)
    clip_ids = [row.video_id for row in rows] if rows is not None else [f"row-{i}" for i in range(n)]

    # Given split files must be whole (load_splits names what is missing); so must any in the AVE folder.
    split_dir = Path(splits) if splits else directory
    if splits or any((split_dir / name).is_file() for name in SPLIT_FILES):
        split_rows = ave.load_splits(split_dir, n_rows=n, annotations=rows)
        split_rule = f"splits from {split_dir}"
    else:
        split_rows = hash_split(clip_ids)
        split_rule = "no split files: deterministic 80/10/10 split by video id hash"

    noisy = None
    # Both halves, or none (the authors' data/ folder has the audio half only): weak training says so.
    if include_noisy and (directory / NOISY_VISUAL_FILE).is_file() and (directory / NOISY_AUDIO_FILE).is_file():
        noisy_audio = _read_numbers(directory / NOISY_AUDIO_FILE, AVE_KEY)
        _check_features(directory / NOISY_AUDIO_FILE, noisy_audio, 3, like=audio)
        # Video labels as the official code reads them, from labels_noisy.h5 (all background in the release,
        # bmfn-reference.md section 9); without the file, all background. Their segments are background only.
        noisy_video = np.zeros((len(noisy_audio), ave.NUM_CLASSES), np.float32)
        noisy_video[:, ave.BACKGROUND] = 1
        if (directory / NOISY_LABELS_FILE).is_file():
            noisy_video = _read_numbers(directory / NOISY_LABELS_FILE, AVE_KEY)
            _check_shape(directory / NOISY_LABELS_FILE, noisy_video, (len(noisy_audio), ave.NUM_CLASSES),
                         NOISY_AUDIO_FILE)
        noisy_labels = np.zeros((len(noisy_audio), ave.SEGMENTS, ave.NUM_CLASSES), np.float32)
        noisy_labels[..., ave.BACKGROUND] = 1
        with _open_h5(directory / NOISY_VISUAL_FILE) as f:  # before its conversion, as the main file
            noisy_shape = _dataset(f, directory / NOISY_VISUAL_FILE, AVE_KEY)
            _check_features(directory / NOISY_VISUAL_FILE, noisy_shape, 5, like=visual)
            _check_rows(directory / NOISY_VISUAL_FILE, noisy_shape, noisy_audio, NOISY_AUDIO_FILE)
        noisy_visual = compact_visual(directory / NOISY_VISUAL_FILE, cache_dir, progress)
        noisy = ClipArrays(noisy_visual, noisy_audio, noisy_labels, noisy_video)
    source = {"kind": "ave-dir", "path": str(directory.resolve()),
              "annotations": str(annotations.resolve()) if relabel else None,  # the folder's own: found again
              "splits": str(split_dir.resolve()) if splits else None}
    return FeatureData(ClipArrays(visual, audio, labels, video_labels), clip_ids,
                       split_rows, split_rule, provenance, source, noisy, notes)


def _ave_dir_provenance(visual_path: Path, audio_path: Path) -> dict:
    """How an AVE-layout folder's features were made: the provenance `bmfn export-ave` writes into both files, else
    the release's (whose files carry none)."""
    visual, audio = read_provenance(visual_path), read_provenance(audio_path)
    if visual != audio:
        raise BmfnError(f"{visual_path}: made differently from {audio_path.name} (their provenance attributes "
                        "differ); export both from one store")
    from bmfn_pipeline.store import export_mark

    if export_mark(visual_path) != export_mark(audio_path):
        raise BmfnError(f"{visual_path.parent}: {VISUAL_FILE} and {AUDIO_FILE} are of two exports (one stopped "
                        "between writing them?); run `bmfn export-ave` again")
    return visual or ave_release_provenance()


def ave_release_provenance() -> dict:
    """What the released features were made with (features-reference.md section 0), in a store's provenance words."""
    from extractors.weights import WEIGHTS

    visual, audio = WEIGHTS["vgg19-keras"], WEIGHTS["vggish"]
    return {"source": "ave-release",
            "visual": {"source": "ave", "weights": visual.name, "checksum": visual.checksum,
                       "preprocessing": visual.preprocessing},
            "audio": {"weights": audio.name, "checksum": audio.checksum, "alignment": "ave", "pca": False},
            "frames_per_second": AVE_FRAMES_PER_SEGMENT, "seconds": ave.SEGMENTS, "alignment": "ave"}


def compact_visual(path: Path, cache_dir: str | Path | None = None, progress: bool = True) -> np.ndarray:
    """A read-only float16 memory map of an `avadataset` visual file, converted once and reused.

    Every file (the release's float64, an export's float32 or float16) is streamed slice by slice into
    `<name>.f16.npy` beside it, or in the bmfn cache directory when that folder is read-only. float16 keeps pool5
    maps to about 1e-3 of their size: BMFN's logits move by about 5e-5 (100 times float32's own rounding), and no
    segment's label changed in the measurement that found it.
    """
    with _open_h5(path) as f:
        dataset = _dataset(f, path, AVE_KEY)
        stamp = {"source": str(path.resolve()), "size": path.stat().st_size, "mtime_ns": path.stat().st_mtime_ns,
                 "shape": list(dataset.shape)}
        cache = _cache_file(path, stamp, cache_dir)
        meta = cache.with_suffix(".json")
        from bmfn_pipeline.store import locked_temporary, remove_dead_temporaries

        for target in (cache, meta):
            remove_dead_temporaries(target)  # of conversions killed before (up to 2 GB each), even when one finished
        if _stands_for(cache, stamp):
            with suppress(ValueError, OSError):  # else damaged (cut short, say): converted again
                return np.load(cache, mmap_mode="r")
        if dataset.dtype.kind not in NUMBER_KINDS:
            raise BmfnError(f"{path}: '{AVE_KEY}' holds {dataset.dtype}, not numbers")
        # Each process its own temporary file: torchrun's ranks all convert on their first run, and rename in turn.
        with locked_temporary(cache) as tmp:
            out = _new_cache_file(tmp, dataset.shape, path)
            for start in tqdm(range(0, dataset.shape[0], CONVERT_ROWS), desc=f"{path.name} -> float16 cache (once)",
                              unit="slice", leave=False, disable=not progress):
                block = dataset[start:start + CONVERT_ROWS]
                _check_finite(path, block, first_row=start)
                with np.errstate(over="ignore"):
                    converted = block.astype(CACHE_DTYPE)
                if not np.isfinite(converted).all():
                    raise BmfnError(f"{path}: values beyond float16's range (max {np.abs(block).max():.4g}) in "
                                    f"rows {start}+")
                out[start:start + len(block)] = converted
            out.flush()
            del out
            os.replace(tmp, cache)
    with locked_temporary(meta) as tmp, failed_writes(meta):  # whole or not at all: another rank may read it
        tmp.write_text(json.dumps(stamp))
        os.replace(tmp, meta)
    return np.load(cache, mmap_mode="r")


def _stands_for(cache: Path, stamp: dict) -> bool:
    """Whether `cache` is a whole conversion of the source file that `stamp` describes (its .json says so)."""
    meta = cache.with_suffix(".json")
    try:
        return cache.is_file() and meta.is_file() and json.loads(meta.read_text()) == stamp
    except (OSError, ValueError):
        return False


def _new_cache_file(tmp: Path, shape: tuple[int, ...], source: Path) -> np.memmap:
    """A writable float16 memory map of `shape` in `tmp`, its disk blocks allocated now: the pages of a sparse file
    that the disk cannot hold kill the process with SIGBUS when they are written, with no message."""
    size = int(np.prod(shape)) * np.dtype(CACHE_DTYPE).itemsize
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=CACHE_DTYPE, shape=shape)
        if hasattr(os, "posix_fallocate"):
            with open(tmp, "r+b") as f:
                try:
                    os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
                except OSError as err:
                    if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system that cannot: as before
                        raise
    except OSError as err:
        needs = f"{size / 1e9:.1f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"
        raise BmfnError(f"{tmp.parent}: cannot write the float16 cache of {source} ({needs}): "
                        f"{err.strerror or err}") from None
    return out


def _cache_file(path: Path, stamp: dict, cache_dir: str | Path | None) -> Path:
    """Beside the source when its folder is writable or a cache made there still stands for it (the folder made
    read-only since), else under the bmfn cache directory (keyed by path and date)."""
    beside = path.with_name(path.stem + ".f16.npy")
    if cache_dir is None and (os.access(path.parent, os.W_OK) or _stands_for(beside, stamp)):
        return beside
    if cache_dir is None:
        from extractors.weights import cache_dir as bmfn_cache_dir

        cache_dir = bmfn_cache_dir() / "features"
    cache_dir = Path(cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BmfnError(f"{cache_dir}: cannot write the float16 cache of {path}: {err.strerror or err}") from None
    key = hashlib.sha1(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir / f"{path.stem}-{key}.f16.npy"


# ---------------------------------------------------------------------------------------------- bmfn store


def load_store(path: str | Path, *, annotations: str | Path | None = None,
               splits: str | Path | None = None) -> FeatureData:
    """A `bmfn extract` store; labels and splits stored in it, or (re)made from `annotations` and `splits`."""
    from bmfn_pipeline import store

    path = Path(path)
    if not path.is_file():
        what, name = ("a folder, not a feature store file", "feats.h5") if path.is_dir() else \
            ("no such feature store", path.name)
        raise BmfnError(f"{path}: {what} (make one with `bmfn extract VIDEOS --out {name}`)")
    arrays = store.load_arrays(path)
    provenance = read_provenance(path)
    clip_ids = [_text(c) for c in arrays["clip_ids"]]
    if not clip_ids:  # a store whose extraction was stopped before its first clip
        raise BmfnError(f"{path}: holds no clip yet; extract into it first (`bmfn extract VIDEOS --out {path}`)")
    labels, stored_split = arrays["labels"], arrays["split"]
    notes: list[str] = []

    rows = ave.read_annotations(annotations) if annotations is not None else None
    if splits is not None and rows is None:
        raise BmfnError(f"{splits}: --splits needs --annotations (split files index annotation rows)")
    row_splits = ave.load_splits(splits, n_rows=len(rows), annotations=rows) if splits is not None else None
    if rows is not None:
        labels, video_labels, known, given_split, repeated = _labels_by_id(clip_ids, rows, row_splits)
        if repeated:
            notes.append(f"{repeated} clips have several rows in {annotations}: each takes its first row's labels "
                         "and split, as `bmfn extract --annotations` stores them")
        if clip_ids and not known.any():
            raise BmfnError(f"{path}: none of its {len(clip_ids)} clips has a row in {annotations}: a clip's id is its "
                            f"video file name without extension (here e.g. {clip_ids[0]!r}) and must be the "
                            "annotation's video id")
        if not known.all():
            notes.append(f"{counted(int((~known).sum()), 'clip')} without a row in {annotations} left out")
    elif not np.asarray(arrays["has_label"]).any():
        raise BmfnError(f"{path}: none of its {len(clip_ids)} clips has labels; give --annotations Annotations.txt "
                        "(or extract with `bmfn extract ... --annotations`), whose video ids are the clips' file "
                        "names without extension")
    else:
        labels, video_labels = np.asarray(labels, np.float32), np.asarray(arrays["video_labels"], np.float32)
        known = np.asarray(arrays["has_label"], bool)
        ave.check_labels(f"{path}: its labels (--annotations relabels it)", labels[known], video_labels[known],
                         names=[cid for cid, k in zip(clip_ids, known) if k])  # a store of an older bmfn
        if not known.all():
            notes.append(f"{counted(int((~known).sum()), 'clip')} without labels in {path.name} left out")

    if splits is not None:
        names = given_split
        split_rule = f"splits from {splits}"
    elif any(_text(s) in SPLITS for s in stored_split):
        names = np.array([_text(s) for s in stored_split])
        split_rule = f"splits stored in {path.name}"
        if unsplit := int((known & ~np.isin(names, SPLITS)).sum()):  # e.g. a merge of stores with and without
            notes.append(f"{counted(unsplit, 'labelled clip')} without a split in {path.name} left out (the other "
                         "clips have splits; --annotations with --splits gives every clip one)")
    else:
        names = np.full(len(clip_ids), "", dtype=object)
        for name, idx in hash_split(clip_ids).items():
            names[idx] = name
        split_rule = "no split information: deterministic 80/10/10 split by video id hash"
    split_rows = {name: np.flatnonzero((names == name) & known).astype(np.int64) for name in SPLITS}
    source = {"kind": "features", "path": str(path.resolve()),
              "annotations": str(Path(annotations).resolve()) if annotations else None,
              "splits": str(Path(splits).resolve()) if splits else None}
    clips = ClipArrays(np.asarray(arrays["visual"]), np.asarray(arrays["audio"], np.float32), labels, video_labels)
    return FeatureData(clips, clip_ids, split_rows, split_rule, provenance, source, None, notes)


def read_provenance(path: str | Path) -> dict:
    """The store's provenance (root attribute `provenance`, JSON), {} when absent."""
    with _open_h5(path) as f:
        raw = f.attrs.get("provenance")
    return json.loads(_text(raw)) if raw is not None else {}


def _labels_by_id(clip_ids: list[str], rows: list[ave.AnnotationRow], row_splits: dict[str, np.ndarray] | None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Segment labels, video labels, whether the id has a row, and split ('' without splits) per clip id, and how
    many clip ids have several rows. Such an id (45 in AVE, 18 of them in two splits) takes its first row, as
    `bmfn extract --annotations` stores it: one feature row per video. The video label is the row's category, also
    for an empty interval."""
    segments, videos = ave.segment_labels(rows), ave.video_labels(rows)
    split_of = {int(i): name for name, indices in (row_splits or {}).items() for i in indices}
    by_id = ave.video_id_rows(rows)
    first = np.array([by_id[clip][0] if clip in by_id else -1 for clip in clip_ids], np.int64)
    known = first >= 0
    labels = np.zeros((len(clip_ids), ave.SEGMENTS, ave.NUM_CLASSES), np.float32)
    video_labels = np.zeros((len(clip_ids), ave.NUM_CLASSES), np.float32)
    labels[known], video_labels[known] = segments[first[known]], videos[first[known]]
    split = np.array([split_of.get(int(row), "") for row in first], dtype=object)
    repeated = sum(len(by_id.get(clip, ())) > 1 for clip in clip_ids)
    return labels, video_labels, known, split, repeated


# ---------------------------------------------------------------------------------------------- shared helpers


def hash_split(clip_ids: list[str]) -> dict[str, np.ndarray]:
    """Deterministic 80/10/10 split: unique ids ordered by SHA-1, cut at 80 % and 90 % (rows of one id stay together)."""
    unique = sorted(set(clip_ids), key=lambda c: (hashlib.sha1(c.encode()).hexdigest(), c))
    n = len(unique)
    n_val = max(1, round(n * HASH_SPLIT_FRACTIONS[1])) if n >= 3 else 0
    n_test = max(1, round(n * HASH_SPLIT_FRACTIONS[2])) if n >= 3 else 0
    cut = {c: ("train" if i < n - n_val - n_test else "val" if i < n - n_test else "test")
           for i, c in enumerate(unique)}
    names = np.array([cut[c] for c in clip_ids])
    return {name: np.flatnonzero(names == name).astype(np.int64) for name in SPLITS}


def batches(parts: list[tuple[ClipArrays, np.ndarray]], batch_size: int, device: torch.device,
            generator: torch.Generator | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Batches over the given rows of one or more clip sets; shuffled together when a generator is given."""
    owner = np.concatenate([np.full(len(rows), k) for k, (_, rows) in enumerate(parts)])
    row = np.concatenate([rows for _, rows in parts]).astype(np.int64)
    order = torch.randperm(len(row), generator=generator).numpy() if generator is not None else np.arange(len(row))
    for start in range(0, len(order), batch_size):
        pick = order[start:start + batch_size]
        pieces = [parts[k][0].take(row[pick][owner[pick] == k], device) for k in range(len(parts))
                  if (owner[pick] == k).any()]
        yield {name: torch.cat([p[name] for p in pieces]) if len(pieces) > 1 else pieces[0][name]
               for name in pieces[0]}


def num_batches(parts: list[tuple[ClipArrays, np.ndarray]], batch_size: int) -> int:
    return -(-sum(len(rows) for _, rows in parts) // batch_size)


def _read_numbers(path: Path, key: str) -> np.ndarray:
    """A dataset of numbers as float32, every one finite."""
    array = _read_h5(path, key)
    if array.dtype.kind not in NUMBER_KINDS:
        raise BmfnError(f"{path}: '{key}' holds {array.dtype}, not numbers")
    _check_finite(path, array)
    return array.astype(np.float32)


def _check_finite(path: Path, array: np.ndarray, first_row: int = 0) -> None:
    """NaN or infinity in features or labels gave NaN losses blamed on the learning rate, or accuracies computed on
    garbage: refused, naming the rows."""
    bad = ~np.isfinite(array.reshape(len(array), -1)).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad) + first_row
        raise BmfnError(f"{path}: NaN or infinity in {counted(len(rows), 'row')} (the first: row {rows[0]})")


def _read_h5(path: Path, key: str) -> np.ndarray:
    with _open_h5(path) as f:
        try:
            return _dataset(f, path, key)[()]
        except OSError as err:
            raise BmfnError(f"{path}: cannot read '{key}': {err}") from None


@contextmanager
def _open_h5(path: Path) -> Iterator[h5py.File]:
    """h5py's own message names no file: a damaged one would say only 'file signature not found'."""
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise BmfnError(f"{path}: cannot read as HDF5: {err}") from None
    with f:
        yield f


def _check_rows(path: Path, visual: np.ndarray, audio: np.ndarray, audio_name: str) -> None:
    """Row i of the visual file is row i of the audio file."""
    if len(visual) != len(audio):
        raise BmfnError(f"{path}: {len(visual)} rows but {audio_name} has {len(audio)}")


def _check_features(path: Path, array: np.ndarray, ndim: int, like: np.ndarray | None = None) -> None:
    """Features [clips, 10, ...] of `ndim` dims; the noisy clips' per clip as the main files' (`like`)."""
    if array.ndim != ndim or array.shape[1] != ave.SEGMENTS:
        raise BmfnError(f"{path}: shape {list(array.shape)}, expected {ndim} dims [clips, {ave.SEGMENTS}, ...]")
    if like is not None and array.shape[1:] != like.shape[1:]:
        raise BmfnError(f"{path}: {list(array.shape[1:])} per clip, but the main features have {list(like.shape[1:])}")


def _check_shape(path: Path, array: np.ndarray, expected: tuple[int, ...], like: str) -> None:
    if array.shape != expected:
        raise BmfnError(f"{path}: shape {list(array.shape)}, expected {list(expected)} like {like}")


def _dataset(f: h5py.File, path: Path, key: str) -> h5py.Dataset:
    if key not in f:
        raise BmfnError(f"{path}: no dataset '{key}' (found: {', '.join(f.keys()) or 'nothing'})")
    dataset = f[key]
    if not isinstance(dataset, h5py.Dataset) or dataset.ndim == 0:
        what = "a group" if isinstance(dataset, h5py.Group) else "a single value"
        raise BmfnError(f"{path}: '{key}' is {what}, not an array")
    return dataset


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
