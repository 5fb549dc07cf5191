"""The feature store (``feats.h5``): per-clip VGG-19 pool5 and VGGish features, labels and provenance.

Layout of the consolidated file (``FORMAT_VERSION``):

- ``visual`` [N,10,7,7,512] and ``audio`` [N,10,128], float32 or float16, chunked one clip per chunk so a
  clip is one contiguous read; ``clip_ids`` [N] and ``paths`` [N] (UTF-8), ``warnings`` [N] (JSON lists);
- ``labels`` [N,10,29] float32, ``video_labels`` [N,29] float32 (the video's class, never background; zeros
  where unknown), ``has_label`` [N] bool and ``split`` [N] ('train'/'val'/'test'/'') when labels were set, plus
  the group ``label_table`` (``clip_ids``, ``labels``, ``video_labels``, ``split``) with every label given, also
  those of clips not extracted yet. Stores written before ``video_labels`` existed are read with the classes
  found in their segment labels;
- the group ``failed`` (``clip_ids``, ``paths``, ``errors``): clips that could not be extracted;
- root attributes ``provenance`` (JSON) and ``format_version``.

Crash safety. HDF5 files are not safe to modify while a process may be killed, so the consolidated file
is never modified: it is rewritten next to itself and swapped in with ``os.replace``. New clips go to a
journal directory ``<out>.parts/``, one small file per clip, each written to ``*.tmp`` and renamed into
place, so a part either exists whole or not at all. ``consolidate()`` merges file and parts into a new
file, swaps it in, then deletes the parts; a kill at any point leaves either the old file plus the parts
or the new file plus (redundant) parts. Parts are not fsynced (a SIGKILL cannot lose the page cache);
the consolidated file is, so it also survives a power loss. The journal directory also holds the writers' lock
file (``.lock``), which stays when the store is finished: another user who may not write the store's folder can
still take a reader's lock on it (``merge``). A lock file another user made is locked through a read-only
descriptor (``open_lock_file``), so it does not refuse the owner's writer.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, TypeVar
from urllib.parse import quote, unquote

import h5py
import numpy as np

from .ave import (NUM_CLASSES, SEGMENTS, SPLITS, AnnotationRow, check_labels, read_annotations, segment_labels,
                  video_labels, video_labels_from_segments)
from .errors import BmfnError, WriteError, counted, failed_writes, printable, written

try:  # advisory single-writer lock; released by the kernel when the process dies, even by SIGKILL
    import fcntl
except ImportError:  # Windows: no lock
    fcntl = None

FORMAT_VERSION = 1
# features-reference.md 1.4: VGG-19 pool5 maps, averaged per one-second segment, channels-last.
VISUAL_SHAPE = (SEGMENTS, 7, 7, 512)
# features-reference.md 2.5: one 128-d post-ReLU VGGish embedding per segment.
AUDIO_SHAPE = (SEGMENTS, 128)
LABEL_SHAPE = (SEGMENTS, NUM_CLASSES)
STORAGE_DTYPES = ("float32", "float16")
# Provenance keys that describe the run rather than the features: they may differ between appends.
RUN_KEYS = frozenset({"bmfn_version", "created", "device", "precision", "batch_size", "workers", "command"})
# A clip in two merged stores is the same clip when each modality's arrays differ by at most this much of their
# largest magnitude, or by two steps of the storage dtype's rounding: the thread count changes VGGish embeddings in
# their last float32 digits (up to 3.4e-5 on values up to 34; torchrun runs one thread per rank), while bf16 and
# float32 maps, or a video re-encoded even near-losslessly, differ by a few thousandths.
SAME_FEATURES_RTOL = 1e-5
# Clips copied per read/write while consolidating or exporting (about 64 MiB of float32 visual features).
COPY_BLOCK = 64
# HDF5 chunk cache per dataset, large enough to hold one float32 visual clip (1 MiB) several times over.
CHUNK_CACHE_BYTES = 16 * 2**20
# What changed in the features made from the same file at each features revision (FEATURES_REVISION in extract.py).
REVISION_CHANGES = {
    2: "audio embeddings may differ for clips that begin with an AAC priming packet",
    3: "Matroska/WebM clips whose timestamps start late, and files with a cover picture beside their video, may give "
       "other features",
}
# ``export_ave``'s key and file names (features-reference.md section 3).
AVE_KEY = "avadataset"
AVE_VISUAL_FILE = "visual_feature.h5"
AVE_AUDIO_FILE = "audio_feature.h5"
AVE_EXPORT_ATTR = "bmfn_export"  # the same random mark in both files of one export

_STR = h5py.string_dtype("utf-8")
_CLIP_PART, _FAIL_PART, _LABEL_PART = "clip", "fail", "labels.h5"
_ID_CHARS = 80  # the readable part of a journal file name; the hash keeps names unique (also case-folded)
# Weight records name the file they were read from beside the checksum it matched: the checksum says which weights.
_FILE_KEYS = {"file": "checksum", "pca_file": "pca_checksum"}
# Times a read-only store is opened again when the journal part it looks for was consolidated away meanwhile.
REOPEN_TRIES = 5
# Tries to take a store's lock, LOCK_RETRY_S apart, before another process is said to hold it.
LOCK_TRIES, LOCK_RETRY_S = 3, 0.02
# Lock files are made as any file a user makes (the umask decides): in a folder a group shares (umask 002) the
# group's users can then lock what one of them made.
LOCK_FILE_MODE = 0o666
_T = TypeVar("_T")


class ClipLabels(NamedTuple):
    """A clip's per-second one-hot labels [10,29], its split ('train', 'val', 'test' or '') and its video class
    [29] (the annotation's category, also for an event interval that holds no whole second; None: the classes in
    `segments`)."""

    segments: np.ndarray
    split: str
    video: np.ndarray | None = None


def labels_from_annotations(
    rows: list[AnnotationRow], splits: Mapping[str, np.ndarray] | None = None
) -> tuple[dict[str, ClipLabels], list[str]]:
    """Labels per video id from annotation rows (and ``ave.load_splits`` indices).

    A store holds one feature row per clip, so a video id annotated on several rows gets its first row;
    those ids are returned second so the caller can report them (``export_ave`` keeps every row).
    """
    split_of = {int(i): name for name, indices in (splits or {}).items() for i in indices}
    per_row, per_video = segment_labels(rows), video_labels(rows)
    labels: dict[str, ClipLabels] = {}
    repeated = []
    for i, row in enumerate(rows):
        if row.video_id in labels:
            repeated.append(row.video_id)
            continue
        labels[row.video_id] = ClipLabels(per_row[i], split_of.get(i, ""), per_video[i])
    return labels, sorted(set(repeated))


def _check_store_file(path: Path) -> None:
    """One line for a file that is not a feature store: not HDF5, HDF5 without a store's attributes, unreadable."""
    try:
        if not h5py.is_hdf5(path):
            raise BmfnError(f"{path}: not a bmfn feature store (not an HDF5 file)")
        with h5py.File(path, "r") as f:
            missing = [key for key in ("provenance", "format_version") if key not in f.attrs]
    except OSError as err:
        raise BmfnError(f"{path}: cannot read it as a feature store ({err})") from None
    if missing:
        raise BmfnError(f"{path}: not a bmfn feature store (no {' or '.join(missing)} attribute)")


def _revision_note(differ: list[str], a: Mapping, b: Mapping, name_a: str, name_b: str) -> str:
    """Why features of two revisions (bmfn_pipeline.extract.FEATURES_REVISION; none recorded: 1) are not mixed: what
    changed since the older one's."""
    if "features_revision" not in differ:
        return ""
    revisions = sorted(((p.get("features_revision", 1), name) for p, name in ((a, name_a), (b, name_b))),
                       key=lambda pair: pair[0])
    (old, old_name), (new, _) = revisions
    changes = "; ".join(REVISION_CHANGES[r] for r in range(old + 1, new + 1) if r in REVISION_CHANGES)
    return f" ({old_name} was made by a bmfn before features revision {new}, whose {changes}: extract them again)" \
        if changes else ""


def _defining(provenance: Mapping) -> dict:
    """The keys that decide the features: not the run's (RUN_KEYS), nor the name of a weight file whose checksum is
    recorded (the same weights found under another name, or on another machine, make the same features)."""
    normalised = json.loads(json.dumps(dict(provenance), sort_keys=True, default=str))
    return _without_file_names({k: v for k, v in normalised.items() if k not in RUN_KEYS})


def _without_file_names(record):
    """`record` (JSON) without the file names that have a checksum beside them."""
    if not isinstance(record, dict):
        return record
    return {k: _without_file_names(v) for k, v in record.items() if _FILE_KEYS.get(k) not in record}


def _differences(a, b, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON-like dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _differences(a.get(key), b.get(key), f"{prefix}{key}.") if key in a and key in b else [prefix + key]
        return out
    return [] if a == b else [prefix.rstrip(".")]


def _described(differ: list[str], a: Mapping, b: Mapping, a_name: str, b_name: str) -> str:
    """The differing dotted keys with both values: 'frames_per_second 1 (the store) vs 2 (this run)'."""
    def value(record: Mapping, key: str):
        for part in key.split("."):
            record = record.get(part, "missing") if isinstance(record, Mapping) else "missing"
        return record

    def described(key: str, record: Mapping, name: str) -> str:
        if key == "visual.calibration":  # the int8 network's record: its values alone do not say what they mean
            found = value(record, key)
            return f"{'float (not int8)' if found == 'missing' else f'int8 (calibration {found})'} ({name})"
        return f"{value(record, key)!r} ({name})"

    return "; ".join(f"{'VGG-19' if key == 'visual.calibration' else key} {described(key, a, a_name)} vs "
                     f"{described(key, b, b_name)}" for key in differ)


def _precisions(value: str | None) -> set[str]:
    """The VGG-19 precisions in a ``precision`` record: several are joined by '+'."""
    return set(str(value).split("+")) if value else set()


def _with_precisions(provenance: Mapping, precisions: set[str]) -> dict:
    """``provenance`` recording the precisions its clips were made in (a store appended to in float32 and bfloat16
    says 'bfloat16+float32'); unchanged where none is known."""
    return {**provenance, "precision": "+".join(sorted(precisions))} if precisions else dict(provenance)


def _storage_dtype(provenance: Mapping, where: Path) -> np.dtype:
    name = str(provenance.get("dtype", "float32"))
    if name not in STORAGE_DTYPES:
        raise BmfnError(f"{where}: storage dtype {name!r} is not one of {', '.join(STORAGE_DTYPES)}")
    return np.dtype(name)


def _digest(clip_id: str) -> str:
    return hashlib.sha1(clip_id.encode("utf-8")).hexdigest()[:16]


def _part_name(clip_id: str, kind: str) -> str:
    return f"{quote(clip_id, safe='')[:_ID_CHARS]}.{_digest(clip_id)}.{kind}.h5"


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):  # directories cannot be opened for fsync on every platform
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _strings(values: Iterable) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def _open_part(path: Path) -> h5py.File:
    """A journal part opened for reading. HDF5 looks the name up again after opening it: a part that a writer's
    consolidation removes in between fails with a plain OSError naming no file, raised here as FileNotFoundError, so
    that a reader takes it as consolidated and reads the store again (FeatureStore._reopened_if_moved)."""
    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise
    except OSError:
        if not os.path.lexists(path):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path)) from None
        raise


@dataclass
class _Part:
    """One journal file: a complete clip or a failure."""

    path: Path
    kind: str
    mtime_ns: int


class FeatureStore:
    """A feature file plus its journal of parts. Open with ``FeatureStore.open``; one writer at a time. Clips added
    stay in the journal (`<path>.parts/`, read with the file) until ``consolidate()`` merges them into the file."""

    def __init__(self, path: Path, readonly: bool):
        self.path = path
        self.parts_dir = Path(f"{path}.parts")
        self.readonly = readonly
        self._lock_fd: int | None = None
        self._main: h5py.File | None = None
        self._main_index: dict[str, int] = {}
        self._main_failures: dict[str, tuple[str, str]] = {}
        self._parts: dict[str, _Part] = {}
        self._failures: dict[str, _Part] = {}
        self._labels: dict[str, ClipLabels] = {}
        self._journal_labels: dict[str, ClipLabels] = {}  # the journal's label table, which replaces the file's
        self._pending_labels = False
        self.provenance: dict = {}
        self._precision: str | None = None  # this writer's, recorded with each clip it journals
        self.dtype = np.dtype("float32")

    # -- opening -----------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | Path,
        provenance: Mapping | None = None,
        create: bool = True,
        readonly: bool = False,
        refuse_writers: bool = False,
    ) -> FeatureStore:
        """Open (or create) a store; refuse when ``provenance`` differs from the file's on feature-defining keys.

        Leftover parts of a killed run are picked up; their unfinished ``*.tmp`` files are removed.
        ``readonly`` opens for reading while another process may be writing (no lock, no clean-up); with
        ``refuse_writers`` it refuses a store that a process is writing and keeps writers out until closed (a shared
        lock; see ``_take_shared_lock`` for read-only stores), for a reader that must see every clip.
        """
        store = cls(Path(path), readonly)
        try:
            store._open(provenance, create, refuse_writers)
        except BaseException:
            store.close()
            raise
        return store

    def _open(self, provenance: Mapping | None, create: bool, refuse_writers: bool) -> None:
        if not self.path.exists():
            if not create or self.readonly:
                raise BmfnError(f"{self.path}: no such feature store")
            if provenance is None:
                raise BmfnError(f"{self.path}: cannot create a feature store without provenance")
        if self.path.exists():  # a file that is no store is refused before a lock or journal folder is made for it
            _check_store_file(self.path)
        if self.readonly and refuse_writers:
            self._take_shared_lock()
        if not self.readonly:
            self._take_lock()
            for stale in self.parts_dir.glob("*.tmp"):
                stale.unlink(missing_ok=True)
            remove_dead_temporaries(self.path)  # a killed consolidation's or merge's
        if not self.path.exists():
            if any(self.parts_dir.glob("*.h5")):
                raise BmfnError(f"{self.parts_dir}: journal of a feature store whose file is gone; "
                                "delete it or restore the file")
            self.provenance = json.loads(json.dumps(dict(provenance), default=str))
            self.dtype = _storage_dtype(self.provenance, self.path)
            self._write_main()  # an empty but valid store, so the provenance is fixed from the start
        self._reopened_if_moved(lambda: None, loaded=False)
        if provenance is not None:
            self._precision = provenance.get("precision")
            differ = _differences(_defining(self.provenance), _defining(provenance))
            if differ:
                raise BmfnError(f"{self.path}: features were made differently: "
                                f"{_described(differ, self.provenance, provenance, 'the store', 'this run')}"
                                f"{_revision_note(differ, self.provenance, provenance, 'the store', 'this run')}"
                                "; use another output file")

    def _take_lock(self) -> None:
        try:
            self.parts_dir.mkdir(parents=True, exist_ok=True)
            if fcntl is None:
                return
            self._lock_fd = open_lock_file(self.parts_dir / ".lock")
        except OSError as exc:
            raise BmfnError(f"{self.path}: cannot write a feature store there ({exc.strerror or exc})") from None
        self._flock(fcntl.LOCK_EX, "another process is writing to (or merging) this feature store")

    def _take_shared_lock(self) -> None:
        """A reader's lock: held beside other readers, refused while a writer holds its lock, and the other way round.

        A store without a lock file (a file copied without its journal folder, or one an earlier bmfn merged) gets one,
        or a writer starting meanwhile would not be refused. Where none can be made (a store that is read-only to
        this user), it is read without one.
        """
        if fcntl is None:
            return
        lock = self.parts_dir / ".lock"
        try:
            self.parts_dir.mkdir(exist_ok=True)
            self._lock_fd = os.open(lock, os.O_RDONLY | os.O_CREAT, LOCK_FILE_MODE)
        except OSError as exc:
            if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and not os.path.exists(lock):
                return
            raise BmfnError(f"{self.path}: cannot read its lock file ({exc.strerror or exc})") from None
        self._flock(fcntl.LOCK_SH, "another process is writing to this feature store")

    def _flock(self, kind: int, refusal: str) -> None:
        if not try_flock(self._lock_fd, kind):
            raise BmfnError(f"{self.path}: {refusal}")

    def _load_main(self) -> None:
        try:
            self._main = h5py.File(self.path, "r", rdcc_nbytes=CHUNK_CACHE_BYTES)
            f = self._main
            self.provenance = json.loads(f.attrs["provenance"])
            version = int(f.attrs["format_version"])
            if not isinstance(self.provenance, dict):
                raise ValueError(f"its provenance is {type(self.provenance).__name__}, not a mapping")
        except (OSError, KeyError, ValueError) as err:
            raise BmfnError(f"{self.path}: not a bmfn feature store ({err})") from None
        if version != FORMAT_VERSION:
            raise BmfnError(f"{self.path}: feature store format {version}, this bmfn reads {FORMAT_VERSION}")
        self.dtype = _storage_dtype(self.provenance, self.path)
        try:  # its layout, as _write_main makes it: a damaged or hand-edited file is one line, not a traceback
            self._main_index = {cid: i for i, cid in enumerate(_strings(f["clip_ids"][()]))}
            clips = len(self._main_index)
            for name, shape in (("visual", VISUAL_SHAPE), ("audio", AUDIO_SHAPE), ("paths", ()), ("warnings", ())):
                if f[name].shape != (clips, *shape):
                    raise ValueError(f"'{name}' has shape {list(f[name].shape)} for {counted(clips, 'clip')}")
            failed = f["failed"]
            table = f.get("label_table")
            for group, names in ((failed, ("clip_ids", "paths", "errors")),
                                 (table, ("clip_ids", "labels", "video_labels", "split"))):
                lengths = {len(group[name]) for name in names if group is not None and name in group}
                if len(lengths) > 1:
                    raise ValueError(f"the datasets of '{group.name}' have {sorted(lengths)} rows")
            self._main_failures = dict(zip(_strings(failed["clip_ids"][()]),
                                           zip(_strings(failed["paths"][()]), _strings(failed["errors"][()]))))
            self._labels = {**({} if table is None else _read_label_table(table)), **self._journal_labels}
        except (OSError, KeyError, ValueError, TypeError, AttributeError) as err:
            raise BmfnError(f"{self.path}: a damaged feature store ({' '.join(str(err).split())})") from None

    def _load(self) -> None:
        """Read the journal, then the main file. A writer swaps its consolidated file in before it deletes the parts
        merged into it, so each clip is found in one or the other; read the other way round, a consolidation in
        between would hide the clips it merged from a reader."""
        if self._main is not None:
            self._main.close()
            self._main = None
        self._scan_parts()
        self._load_main()

    def _reopened_if_moved(self, read: Callable[[], _T], loaded: bool = True) -> _T:
        """read(), after reading the store where it is not `loaded` yet, and again whenever a journal part it opens
        is gone: another process consolidated it, and its clip is in the main file swapped in before the parts were
        deleted. Only a read-only store can find that; a writer that does has lost a part to something else, which
        is an error."""
        for attempt in range(REOPEN_TRIES):
            try:
                if attempt or not loaded:
                    self._load()
                return read()
            except FileNotFoundError as exc:
                if not self.readonly:
                    raise
                gone = exc.filename or exc
        raise BmfnError(f"{self.path}: its journal changed under this reader {REOPEN_TRIES} times ({gone} gone); "
                        "try again once the process writing it has finished")

    def _scan_parts(self) -> None:
        self._parts, self._failures, self._journal_labels, self._pending_labels = {}, {}, {}, False
        entries = []
        if self.parts_dir.is_dir():
            with os.scandir(self.parts_dir) as it:
                entries = [e for e in it if e.name.endswith(".h5")]
        for entry in entries:
            if entry.name == _LABEL_PART:
                self._read_label_part(Path(entry.path))
                continue
            pieces = entry.name.rsplit(".", 3)
            if len(pieces) != 4 or pieces[2] not in (_CLIP_PART, _FAIL_PART):
                continue
            part = _Part(Path(entry.path), pieces[2], entry.stat().st_mtime_ns)
            clip_id = self._part_clip_id(part, pieces[0], pieces[1])
            (self._parts if part.kind == _CLIP_PART else self._failures)[clip_id] = part
        # Journal order = write order, as far as the file system's clock resolves it.
        self._parts = dict(sorted(self._parts.items(), key=lambda item: (item[1].mtime_ns, item[0])))

    @staticmethod
    def _part_clip_id(part: _Part, quoted: str, digest: str) -> str:
        clip_id = unquote(quoted)
        if _digest(clip_id) == digest:
            return clip_id
        with _open_part(part.path) as f:  # the name was shortened: the id is inside
            return str(f.attrs["clip_id"])

    def _read_label_part(self, path: Path) -> None:
        """The journal's label table (every label given, also those consolidated before), which _load_main lays over
        the file's."""
        with _open_part(path) as f:
            self._journal_labels = _read_label_table(f)
        self._pending_labels = True

    # -- queries -----------------------------------------------------------------------------------

    def clip_ids(self) -> list[str]:
        """Complete clips: the consolidated ones in file order, then the journaled ones."""
        return list(self._main_index) + [cid for cid in self._parts if cid not in self._main_index]

    def __contains__(self, clip_id: object) -> bool:
        return clip_id in self._main_index or clip_id in self._parts

    def __len__(self) -> int:
        return len(self._main_index) + sum(cid not in self._main_index for cid in self._parts)

    def failures(self) -> dict[str, tuple[str, str]]:
        """Clip id -> (path, error) for clips that failed and have not been extracted since."""
        def read() -> dict[str, tuple[str, str]]:
            out = {cid: v for cid, v in self._main_failures.items() if cid not in self}
            for cid, part in self._failures.items():
                if cid not in self:
                    with _open_part(part.path) as f:
                        out[cid] = (str(f.attrs["path"]), str(f.attrs["error"]))
            return out

        return self._reopened_if_moved(read)

    def journaled(self) -> list[str]:
        """Complete clips held only in the journal, not yet consolidated (by a run writing now, or one stopped)."""
        return [cid for cid in self._parts if cid not in self._main_index]

    def being_written(self) -> bool:
        """Whether a process holds the writer's lock now (extracting into, or merging, this store)."""
        return self._lock_fd is None and locked_by_another(self.parts_dir / ".lock")

    def notes(self) -> dict[str, list[str]]:
        """Clip id -> the decode notes recorded with it, for the clips that have any."""
        def read() -> dict[str, list[str]]:
            main = zip(self._main_index, _strings(self._main["warnings"][()]))
            out = {cid: json.loads(text) for cid, text in main if cid not in self._parts}
            for cid, part in self._parts.items():
                with _open_part(part.path) as f:
                    out[cid] = json.loads(f.attrs["warnings"])
            return {cid: notes for cid, notes in out.items() if notes}

        return self._reopened_if_moved(read)

    def labels(self) -> dict[str, ClipLabels]:
        """Every label given, keyed by clip id (also for clips not extracted yet)."""
        return dict(self._labels)

    def unlabelled(self) -> list[str]:
        """Complete clips without a label (no annotation row), to report."""
        return [cid for cid in self.clip_ids() if cid not in self._labels]

    def read(self, clip_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(visual [10,7,7,512], audio [10,128]) of one clip, in the storage dtype."""
        def read() -> tuple[np.ndarray, np.ndarray]:
            if clip_id in self._parts:
                with _open_part(self._parts[clip_id].path) as f:
                    return f["visual"][()], f["audio"][()]
            if clip_id in self._main_index:
                i = self._main_index[clip_id]
                return self._main["visual"][i], self._main["audio"][i]
            raise BmfnError(f"{self.path}: no clip {clip_id!r}")

        return self._reopened_if_moved(read)

    def clip_info(self, clip_id: str) -> dict:
        """The source path and decode warnings recorded with a clip, and the precision it was made in (for a
        consolidated clip, the store's: the precisions of all its clips)."""
        def read() -> dict:
            if clip_id in self._parts:
                with _open_part(self._parts[clip_id].path) as f:
                    return {"path": str(f.attrs["path"]), "warnings": json.loads(f.attrs["warnings"]),
                            "precision": self._part_precision(f)}
            if clip_id in self._main_index:
                i = self._main_index[clip_id]
                return {"path": _strings([self._main["paths"][i]])[0],
                        "warnings": json.loads(_strings([self._main["warnings"][i]])[0]),
                        "precision": self.provenance.get("precision")}
            raise BmfnError(f"{self.path}: no clip {clip_id!r}")

        return self._reopened_if_moved(read)

    # -- writing -----------------------------------------------------------------------------------

    def _writable(self) -> None:
        if self.readonly:
            raise BmfnError(f"{self.path}: opened read-only")

    def _write_part(self, clip_id: str, kind: str, fill) -> Path:
        self._writable()
        if printable(clip_id) != clip_id:
            raise BmfnError(f"{self.path}: clip id '{printable(clip_id)}' is not UTF-8 text, which a store keeps")
        final = self.parts_dir / _part_name(clip_id, kind)
        with written(final, hdf5=True) as tmp, h5py.File(tmp, "w") as f:
            f.attrs["clip_id"] = clip_id
            fill(f)
        return final

    def add_clip(self, clip_id: str, visual: np.ndarray, audio: np.ndarray, *, path: str | Path,
                 warnings: Iterable[str] = ()) -> None:
        """Journal one complete clip (atomically); it replaces an earlier version or failure of the same id."""
        visual, audio = np.asarray(visual), np.asarray(audio)
        for name, array, shape in (("visual", visual, VISUAL_SHAPE), ("audio", audio, AUDIO_SHAPE)):
            if array.shape != shape:
                raise BmfnError(f"{path}: {name} features have shape {array.shape}, expected {shape}")
            if not np.isfinite(array).all():
                raise BmfnError(f"{path}: {name} features contain NaN or infinity")

        def fill(f: h5py.File) -> None:
            f["visual"] = visual.astype(self.dtype)
            f["audio"] = audio.astype(self.dtype)
            f.attrs["path"] = printable(str(path))
            f.attrs["warnings"] = json.dumps(list(warnings))
            if self._precision:
                f.attrs["precision"] = str(self._precision)

        final = self._write_part(clip_id, _CLIP_PART, fill)
        self._parts[clip_id] = _Part(final, _CLIP_PART, final.stat().st_mtime_ns)
        failure = self._failures.pop(clip_id, None)
        if failure is not None:
            failure.path.unlink(missing_ok=True)

    def add_failure(self, clip_id: str, path: str | Path, error: str) -> None:
        """Journal that a clip could not be extracted, with the one-line reason."""

        def fill(f: h5py.File) -> None:
            f.attrs["path"] = printable(str(path))
            f.attrs["error"] = printable(str(error))

        final = self._write_part(clip_id, _FAIL_PART, fill)
        self._failures[clip_id] = _Part(final, _FAIL_PART, final.stat().st_mtime_ns)

    def set_labels(self, labels: Mapping[str, ClipLabels | tuple]) -> None:
        """Store per-clip labels [10,29], splits and video classes [29] (``ClipLabels``, or tuples of their fields;
        see ``labels_from_annotations``); later calls add or replace."""
        self._writable()
        for cid, given in labels.items():
            given = ClipLabels(*given)
            shapes = {"labels": (given.segments, LABEL_SHAPE), "video class": (given.video, (NUM_CLASSES,))}
            for name, (values, shape) in shapes.items():
                if values is not None and np.shape(values) != shape:
                    raise BmfnError(f"{self.path}: {name} of {cid!r} have shape {np.shape(values)}, expected {shape}")
            if given.split not in (*SPLITS, ""):  # '': none (labels without split files)
                raise BmfnError(f"{self.path}: split {given.split!r} of {cid!r}, expected one of "
                                f"{', '.join(map(repr, SPLITS))} or '' (none)")
            segments = np.asarray(given.segments, np.float32)
            video = (video_labels_from_segments(segments[None])[0] if given.video is None
                     else np.asarray(given.video, np.float32))
            check_labels(f"{self.path}: labels", segments[None], video[None], names=[cid])
            self._labels[cid] = ClipLabels(segments, given.split, video)
        with written(self.parts_dir / _LABEL_PART, hdf5=True) as tmp, h5py.File(tmp, "w") as f:
            _write_label_table(f, self._labels)
        self._pending_labels = True

    def consolidate(self) -> None:
        """Merge the journal into the main file (atomic replace), then delete the merged parts."""
        self._writable()
        if not (self._parts or self._failures or self._pending_labels):
            return
        merged = [p.path for p in (*self._parts.values(), *self._failures.values())]
        if self._pending_labels:
            merged.append(self.parts_dir / _LABEL_PART)
        try:
            self._write_main()
        except WriteError as exc:
            if not self._parts:
                raise
            waiting = f"{len(self._parts)} clip{'' if len(self._parts) == 1 else 's'}"
            raise WriteError(exc.path, exc.reason, then=f"{self.parts_dir} keeps the {waiting} not yet in it, and a "
                             "rerun goes on from them") from None
        for path in merged:
            path.unlink(missing_ok=True)
        self._parts, self._failures, self._journal_labels, self._pending_labels = {}, {}, {}, False
        self._load_main()

    def _part_precision(self, part: h5py.File) -> str | None:
        """The precision a journaled clip was made in (parts written before bmfn recorded it: the store's)."""
        return str(part.attrs["precision"]) if "precision" in part.attrs else self.provenance.get("precision")

    def _write_main(self) -> None:
        """Write main file + parts to a temporary file beside it, fsync, and swap it in."""
        keep = [(cid, i) for cid, i in self._main_index.items() if cid not in self._parts]
        new = list(self._parts.items())
        ids = [cid for cid, _ in keep] + [cid for cid, _ in new]

        def fill(visual: h5py.Dataset, audio: h5py.Dataset) -> tuple[list[str], list[str], set[str]]:
            paths, notes = _copy_rows(self._main, [i for _, i in keep], visual, audio, 0) if keep else ([], [])
            precisions = _precisions(self.provenance.get("precision")) if keep else set()
            for row, (cid, part) in enumerate(new, start=len(keep)):
                try:
                    with _open_part(part.path) as f:
                        visual[row], audio[row] = f["visual"][()], f["audio"][()]
                        paths.append(str(f.attrs["path"]))
                        notes.append(str(f.attrs["warnings"]))
                        precisions |= _precisions(self._part_precision(f))
                except (OSError, KeyError) as err:  # only a power loss can leave a renamed part incomplete
                    raise BmfnError(f"{part.path}: unreadable journal part ({err}); delete it and rerun "
                                    "to extract that clip again") from None
            return paths, notes, precisions

        with locked_temporary(self.path) as tmp:
            _write_store(tmp, self.path, self.provenance, self.dtype, ids, fill, self._labels, self.failures())
            if self._main is not None:
                self._main.close()  # Windows cannot replace an open file
                self._main = None
            os.replace(tmp, self.path)
        _fsync(self.path.parent)

    # -- closing -----------------------------------------------------------------------------------

    def close(self) -> None:
        if self._main is not None:
            self._main.close()
            self._main = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def try_flock(fd: int, kind: int) -> bool:
    """flock(fd, kind) without waiting, tried again shortly (`locked_by_another` holds a lock for an instant): whether
    it was taken."""
    for attempt in range(LOCK_TRIES):
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
            return True
        except OSError:
            if attempt < LOCK_TRIES - 1:
                time.sleep(LOCK_RETRY_S)
    return False


def open_lock_file(lock_file: Path) -> int:
    """A descriptor to take a writer's lock on `lock_file`, made where missing. flock needs no write access: a lock
    file that another user made (a reader's, say, whose process was killed) is opened read-only, so that it does not
    refuse this user's writer. OSError where it can be neither made nor read."""
    try:
        return os.open(lock_file, os.O_RDWR | os.O_CREAT, LOCK_FILE_MODE)
    except PermissionError:
        try:
            return os.open(lock_file, os.O_RDONLY)
        except OSError:
            pass
        raise


def exclusive_lock(lock_file: Path) -> int | None:
    """An exclusive lock on `lock_file` (made where missing), held until the descriptor returned is closed or the
    process dies; None where there are no locks. OSError where the file cannot be made, BlockingIOError where another
    process holds the lock."""
    if fcntl is None:
        return None
    fd = open_lock_file(lock_file)
    if not try_flock(fd, fcntl.LOCK_EX):
        os.close(fd)
        raise BlockingIOError(errno.EWOULDBLOCK, "locked by another process", str(lock_file))
    return fd


def locked_by_another(lock_file: Path) -> bool:
    """Whether a process holds an exclusive lock on `lock_file` now (a store's writer, a training run); False where
    the file is missing or there are no locks."""
    if fcntl is None:
        return False
    try:
        fd = os.open(lock_file, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)  # releases the shared lock, if taken


@contextlib.contextmanager
def _new_store_locked(out: Path) -> Iterator[None]:
    """The lock of a store `merge_stores` makes, held while it writes it: a second merge into it, or an extract, is
    refused meanwhile (both found it missing and went on: one's work was lost). Where the merge makes no store, the
    journal folder it made for the lock goes again."""
    parts = Path(f"{out}.parts")
    made = not parts.exists()
    out.parent.mkdir(parents=True, exist_ok=True)
    parts.mkdir(exist_ok=True)
    try:
        try:
            fd = exclusive_lock(parts / ".lock")
        except BlockingIOError:
            raise BmfnError(f"{out}: another process is writing to (or merging into) this feature store") from None
        try:
            if out.exists():
                raise BmfnError(f"{out}: already exists; name it among the inputs to extend it, or choose another "
                                "--out")
            if any(parts.glob("*.h5")):
                raise BmfnError(f"{parts}: journal of an unfinished store; delete it or choose another --out")
            yield
        finally:
            if fd is not None:
                os.close(fd)
    finally:
        if made and not out.exists():
            with contextlib.suppress(OSError):
                (parts / ".lock").unlink(missing_ok=True)
                parts.rmdir()


def _write_store(tmp: Path, path: Path, provenance: Mapping, dtype: np.dtype, ids: list[str], fill,
                 labels: Mapping[str, ClipLabels], failed: Mapping[str, tuple[str, str]]) -> None:
    """Write the consolidated layout (module docstring) of the store `path` to `tmp` (its locked_temporary) and
    fsync it; the caller swaps it in.

    ``fill(visual, audio)`` writes the feature rows of ``ids`` and returns their paths, warnings (JSON) and the
    precisions they were made in, which replace ``provenance``'s where any is known.
    """
    n = len(ids)
    with failed_writes(path, tmp, hdf5=True):
        with h5py.File(tmp, "w", locking=False) as out:
            out.attrs["format_version"] = FORMAT_VERSION
            # maxshape: HDF5 refuses chunks larger than an empty store's shape unless the first axis may grow.
            visual, audio = (out.create_dataset(name, (n, *shape), dtype, chunks=(1, *shape), maxshape=(None, *shape))
                             for name, shape in (("visual", VISUAL_SHAPE), ("audio", AUDIO_SHAPE)))
            paths, notes, precisions = fill(visual, audio)
            out.attrs["provenance"] = json.dumps(_with_precisions(provenance, precisions), sort_keys=True)
            out.create_dataset("clip_ids", data=ids, dtype=_STR)
            out.create_dataset("paths", data=paths, dtype=_STR)
            out.create_dataset("warnings", data=notes, dtype=_STR)
            if labels:
                given = [labels.get(cid) for cid in ids]
                out["labels"] = _stacked([g.segments if g else None for g in given], LABEL_SHAPE)
                out["video_labels"] = _stacked([g.video if g else None for g in given], (NUM_CLASSES,))
                out["has_label"] = np.array([g is not None for g in given], dtype=bool)
                out.create_dataset("split", data=[g.split if g else "" for g in given], dtype=_STR)
                _write_label_table(out.create_group("label_table"), labels)
            group = out.create_group("failed")
            group.create_dataset("clip_ids", data=list(failed), dtype=_STR)
            group.create_dataset("paths", data=[p for p, _ in failed.values()], dtype=_STR)
            group.create_dataset("errors", data=[e for _, e in failed.values()], dtype=_STR)
        _fsync(tmp)


@contextlib.contextmanager
def _reading(path: str | Path, clip_id: str | None = None) -> Iterator[None]:
    """A read from a store that fails inside a write (a merge, an export, a consolidation) is said as the input's
    failure, not the output's (failed_writes would take it for one)."""
    try:
        yield
    except (OSError, RuntimeError, KeyError) as exc:
        what = f"clip {clip_id!r} " if clip_id is not None else ""
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise BmfnError(f"{path}: cannot read {what}({reason}); the store is damaged") from None


def _copy_rows(src: h5py.File, rows: list[int], visual: h5py.Dataset, audio: h5py.Dataset,
               at: int) -> tuple[list[str], list[str]]:
    """Copy ``rows`` of a consolidated file to rows ``at``.. in runs of consecutive rows, ``COPY_BLOCK`` at a time;
    return their paths and warnings."""
    old = np.array(rows)
    with _reading(src.filename):
        old_paths, old_notes = _strings(src["paths"][()]), _strings(src["warnings"][()])
    start = 0
    while start < len(old):
        stop = start + 1
        while stop < len(old) and stop - start < COPY_BLOCK and old[stop] == old[stop - 1] + 1:
            stop += 1
        lo, hi = int(old[start]), int(old[stop - 1]) + 1
        with _reading(src.filename):
            block = src["visual"][lo:hi], src["audio"][lo:hi]
        visual[at + start:at + stop], audio[at + start:at + stop] = block
        start = stop
    return [old_paths[i] for i in old], [old_notes[i] for i in old]


def remove_dead_temporaries(path: Path) -> None:
    """Remove the ``<path>.tmp-*`` files of writers (a consolidation, a merge, an export, a float16 feature cache)
    killed while writing them.

    A running writer holds a lock on its own (``locked_temporary``), which the kernel drops when the process dies: a
    file whose lock is held stays, whichever machine or container writes it (a process id could not tell: another
    container's or host's looks dead here). Without flock (Windows) a dead writer's file cannot be told: all stay.
    """
    if fcntl is None:
        return
    for tmp in path.parent.glob(f"{glob.escape(path.name)}.tmp-*"):
        try:
            fd = os.open(tmp, os.O_RDWR)  # NFS grants exclusive locks on files open for writing only
        except OSError:  # removed meanwhile, or another user's
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: a writer is writing it
            continue
        else:
            tmp.unlink(missing_ok=True)
        finally:
            os.close(fd)


@contextlib.contextmanager
def locked_temporary(path: Path) -> Iterator[Path]:
    """A new ``<path>.tmp-*`` file to write and rename over `path`, locked until the block ends (see
    ``remove_dead_temporaries``) and removed then if it is still there. Open it with h5py's own file locking off,
    which this lock would refuse. Its name is random: process ids repeat across containers and hosts.

    The lock is shared: it goes with the file when it is renamed, and HDF5 takes a shared lock of its own to read a
    file, which an exclusive one would refuse (a reader opening the store in the instant after a consolidation's
    rename); the exclusive lock that ``remove_dead_temporaries`` tries is refused all the same."""
    while True:
        tmp = path.with_name(f"{path.name}.tmp-{secrets.token_hex(8)}")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        if fcntl is None:
            break
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:  # a remove_dead_temporaries between the open and the lock may have removed it: take another name
            if os.stat(tmp).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)
        os.close(fd)  # releases the flock


def _write_label_table(group: h5py.Group, labels: Mapping[str, ClipLabels]) -> None:
    group.create_dataset("clip_ids", data=list(labels), dtype=_STR)
    group["labels"] = _stacked([v.segments for v in labels.values()], LABEL_SHAPE)
    group["video_labels"] = _stacked([v.video for v in labels.values()], (NUM_CLASSES,))
    group.create_dataset("split", data=[v.split for v in labels.values()], dtype=_STR)


def _read_label_table(group: h5py.Group) -> dict[str, ClipLabels]:
    """A label table; one written before video classes were stored gets those of its segment labels."""
    segments = group["labels"][()]
    videos = group["video_labels"][()] if "video_labels" in group else video_labels_from_segments(segments)
    return {cid: ClipLabels(values, split, video)
            for cid, values, split, video in zip(_strings(group["clip_ids"][()]), segments,
                                                 _strings(group["split"][()]), videos)}


def _stacked(rows: list[np.ndarray | None], shape: tuple[int, ...]) -> np.ndarray:
    """float32 [len(rows), *shape], zeros for None."""
    out = np.zeros((len(rows), *shape), np.float32)
    for i, row in enumerate(rows):
        if row is not None:
            out[i] = row
    return out


def load_arrays(path: str | Path, ids: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """All (or the given) clips as numpy arrays for training, pending parts included.

    Returns ``clip_ids``, ``visual`` [n,10,7,7,512] and ``audio`` [n,10,128] in the storage dtype,
    ``labels`` [n,10,29] and ``video_labels`` [n,29] float32 (zeros where ``has_label`` is False) and ``split``
    (strings).
    Memory: the 4143 AVE clips take 4.2 GB of visual features as float32, half that as float16.
    """
    if ids is not None:
        ids = list(ids)
        unique = list(dict.fromkeys(ids))
        if len(unique) < len(ids):  # a clip asked for twice (duplicated AVE ids): read once, repeat the rows
            arrays = load_arrays(path, unique)
            where = {cid: i for i, cid in enumerate(unique)}
            take = [where[cid] for cid in ids]
            return {key: value[take] for key, value in arrays.items()}
    with FeatureStore.open(path, create=False, readonly=True) as store:
        ids = store.clip_ids() if ids is None else ids
        missing = [cid for cid in ids if cid not in store]
        if missing:
            raise BmfnError(f"{path}: {len(missing)} requested clips are not in the store, e.g. {missing[0]!r}")
        n = len(ids)
        visual = np.empty((n, *VISUAL_SHAPE), store.dtype)
        audio = np.empty((n, *AUDIO_SHAPE), store.dtype)
        # Listed before any is read: a writer consolidating meanwhile moves journaled clips into the main file.
        in_parts = [(row, cid) for row, cid in enumerate(ids) if cid in store._parts]
        in_main = [(store._main_index[cid], row) for row, cid in enumerate(ids) if cid not in store._parts]
        if in_main:
            # h5py reads increasing indices only; read sorted and scatter.
            src, rows = map(np.array, zip(*sorted(in_main)))
            for s in range(0, len(src), COPY_BLOCK):
                block = slice(s, s + COPY_BLOCK)
                wanted = src[block]
                if wanted[-1] - wanted[0] == len(wanted) - 1:  # consecutive rows: one plain slice read
                    wanted = slice(int(wanted[0]), int(wanted[-1]) + 1)
                visual[rows[block]] = store._main["visual"][wanted]
                audio[rows[block]] = store._main["audio"][wanted]
        for row, cid in in_parts:
            visual[row], audio[row] = store.read(cid)
        labels = store.labels()
        return {
            "clip_ids": np.array(ids, dtype=object),
            "visual": visual,
            "audio": audio,
            "labels": _stacked([labels[c].segments if c in labels else None for c in ids], LABEL_SHAPE),
            "video_labels": _stacked([labels[c].video if c in labels else None for c in ids], (NUM_CLASSES,)),
            "has_label": np.array([c in labels for c in ids], dtype=bool),
            "split": np.array([labels[c].split if c in labels else "" for c in ids], dtype=object),
        }


@dataclass
class MergeSummary:
    """What ``merge_stores`` wrote: clips per input, ids found with the same features in two inputs (kept once),
    failures."""

    out: Path
    clips: int
    per_input: dict[str, int]
    identical: list[str]
    failed: int

    def line(self) -> str:
        text = (f"{counted(self.clips, 'clip')} from {counted(len(self.per_input), 'store')}, "
                f"{counted(self.failed, 'failed clip')} recorded -> {self.out}")
        return text + (f" ({counted(len(self.identical), 'clip')} found in two stores, the same to float rounding, "
                       "kept once)" if self.identical else "")


def _label_difference(there: ClipLabels, here: ClipLabels) -> str | None:
    """How two inputs' labels of one clip differ, None where they agree; a split or video class that one of them
    lacks is no difference."""
    if there.split and here.split and there.split != here.split:
        return f"split {there.split!r} there, {here.split!r} here"
    if not np.array_equal(there.segments, here.segments):
        return "other per-second labels"
    if there.video.any() and here.video.any() and not np.array_equal(there.video, here.video):
        return "another video class"
    return None


def _same_features(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal but for float rounding: no element further apart than SAME_FEATURES_RTOL, or two rounding steps of the
    storage dtype, times the arrays' largest magnitude."""
    if np.array_equal(a, b):
        return True
    tolerance = max(SAME_FEATURES_RTOL, 2 * float(np.finfo(np.promote_types(a.dtype, b.dtype)).eps))
    a, b = a.astype(np.float64), b.astype(np.float64)
    return bool(np.abs(a - b).max() <= tolerance * max(np.abs(a).max(), np.abs(b).max()))


def merge_stores(inputs: Iterable[str | Path], out: str | Path) -> MergeSummary:
    """Join feature stores (e.g. the shards of ``bmfn extract --shard``) into ``out``, written whole and swapped in.

    Every input must have the first one's feature-defining provenance. A clip id in two inputs is kept once when
    its features are the same to float rounding (SAME_FEATURES_RTOL) and refused otherwise; so are labels given
    differently. Failures are kept for clips that no input holds. ``out`` may be one of the inputs (to extend it);
    otherwise it must not exist.
    Each input is locked while it is read, so a store still being written is refused and no writer starts meanwhile;
    the other inputs are only read (a reader's lock, whose file is made where an input has none), so they may be
    read-only.
    """
    inputs, out = [Path(p) for p in inputs], Path(out)
    if not inputs:
        raise BmfnError(f"{out}: no stores to merge")
    seen_files: dict[Path, Path] = {}
    for path in inputs:
        if path.resolve() in seen_files:
            raise BmfnError(f"{path}: named twice (also as {seen_files[path.resolve()]})")
        seen_files[path.resolve()] = path
    extending = out.resolve() in seen_files
    with contextlib.ExitStack() as stack:
        if not extending:  # an extended store is locked as an input; a new one is locked here, as its writer would
            stack.enter_context(_new_store_locked(out))
        stores = []
        for path in inputs:
            if not path.is_file():
                raise BmfnError(f"{path}: no such feature store")
            read_only = path.resolve() != out.resolve()
            stores.append(stack.enter_context(FeatureStore.open(path, create=False, readonly=read_only,
                                                                refuse_writers=read_only)))
        first = stores[0]
        for store in stores[1:]:
            differ = _differences(_defining(first.provenance), _defining(store.provenance))
            if differ:
                names = str(store.path), str(first.path)
                described = _described(differ, store.provenance, first.provenance, *names)
                raise BmfnError(f"{store.path}: features were made differently from {first.path}'s: {described}"
                                f"{_revision_note(differ, store.provenance, first.provenance, *names)}; they cannot be "
                                "merged")
        if extending:  # its journal goes into the merged file; consolidating first leaves no parts behind
            stores[[s.path.resolve() for s in stores].index(out.resolve())].consolidate()

        owner: dict[str, FeatureStore] = {}
        taken: list[tuple[FeatureStore, list[str]]] = []
        identical = []
        for store in stores:
            ids = []
            for cid in store.clip_ids():
                if cid not in owner:
                    owner[cid] = store
                    ids.append(cid)
                    continue
                if not all(_same_features(a, b) for a, b in zip(owner[cid].read(cid), store.read(cid))):
                    precisions = owner[cid].provenance.get("precision"), store.provenance.get("precision")
                    made = (f" (made in {precisions[0]} there and {precisions[1]} here, which differ by more than "
                            "rounding)" if None not in precisions and precisions[0] != precisions[1] else "")
                    raise BmfnError(f"{store.path}: clip {cid!r} is also in {owner[cid].path} with different "
                                    f"features{made}; remove it from one of them")
                identical.append(cid)
            # consolidated clips first (copied in blocks), then journaled ones, which replace a consolidated copy
            taken.append((store, [c for c in ids if c not in store._parts] + [c for c in ids if c in store._parts]))
        # Labels: a store keeps the rows of every annotated id, also of clips it never extracted. Two inputs must
        # agree on the clips they hold; for the others the first input's row is kept. What one input lacks (a split,
        # a video class of a store labelled before they were kept) the other gives.
        labels: dict[str, ClipLabels] = {}
        label_owner: dict[str, Path] = {}
        for store in stores:
            for cid, given in store.labels().items():
                if cid not in labels:
                    labels[cid], label_owner[cid] = given, store.path
                    continue
                known = labels[cid]
                difference = _label_difference(known, given)
                if difference and cid in owner:
                    raise BmfnError(f"{store.path}: clip {cid!r} is labelled differently in {label_owner[cid]} "
                                    f"({difference})")
                if not difference:  # what `given` adds, named as its input's from now on
                    if not known.split and given.split:
                        known, label_owner[cid] = known._replace(split=given.split), store.path
                    if not known.video.any() and given.video.any():
                        known, label_owner[cid] = known._replace(video=given.video), store.path
                    labels[cid] = known
        failed: dict[str, tuple[str, str]] = {}
        for store in stores:
            for cid, failure in store.failures().items():
                if cid not in owner:
                    failed.setdefault(cid, failure)
        ids = [cid for _, store_ids in taken for cid in store_ids]

        def fill(visual: h5py.Dataset, audio: h5py.Dataset) -> tuple[list[str], list[str], set[str]]:
            paths, notes, precisions = [], [], set()
            for store, store_ids in taken:
                consolidated = [store._main_index[cid] for cid in store_ids if cid not in store._parts]
                if consolidated:
                    more_paths, more_notes = _copy_rows(store._main, consolidated, visual, audio, len(paths))
                    paths += more_paths
                    notes += more_notes
                    precisions |= _precisions(store.provenance.get("precision"))
                for cid in store_ids[len(consolidated):]:
                    with _reading(store.path, cid):
                        features, info = store.read(cid), store.clip_info(cid)
                    precisions |= _precisions(info["precision"])
                    visual[len(paths)], audio[len(paths)] = features
                    notes.append(json.dumps(info["warnings"]))
                    paths.append(info["path"])
            return paths, notes, precisions

        remove_dead_temporaries(out)  # a killed merge's
        with locked_temporary(out) as tmp:
            _write_store(tmp, out, first.provenance, first.dtype, ids, fill, labels, failed)
            for store in stores:  # Windows cannot replace an open file; the locks are held until the swap is done
                if store._main is not None:
                    store._main.close()
                    store._main = None
            os.replace(tmp, out)
        _fsync(out.parent)
    return MergeSummary(out, len(ids), {str(store.path): len(store_ids) for store, store_ids in taken}, identical,
                        len(failed))


def export_ave(store_path: str | Path, annotations_path: str | Path, out_dir: str | Path,
               dtype: str = "float64", force: bool = False) -> tuple[Path, Path]:
    """Write ``visual_feature.h5`` and ``audio_feature.h5`` in the released AVE layout (row i = annotation line i),
    each with the store's ``provenance`` attribute, so that training on them records how the features were made
    (the release's files have none). Files already there are replaced only with force=True: `out_dir` may be the
    AVE release's own folder, whose 7.7 GiB visual file is not to be lost to a mistyped path.

    Rows are written one at a time, so the 7.7 GiB float64 visual file never sits in memory. Temporary files left by
    an export that was killed are removed.
    """
    rows = read_annotations(annotations_path)
    if not rows:
        raise BmfnError(f"{annotations_path}: no annotation rows: nothing to export")
    out_dir = Path(out_dir)
    targets = [(out_dir / AVE_VISUAL_FILE, VISUAL_SHAPE), (out_dir / AVE_AUDIO_FILE, AUDIO_SHAPE)]
    for path, _ in targets:
        remove_dead_temporaries(path)  # a killed export's (gigabytes each), also where this one is refused
    _refuse_to_replace(out_dir, force)
    with FeatureStore.open(store_path, create=False, readonly=True) as store:
        missing = sorted({row.video_id for row in rows if row.video_id not in store})
        if missing:
            raise BmfnError(f"{store_path}: {len(missing)} clips of {annotations_path} are missing from the store, "
                            f"first {missing[0]!r}")
        out_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as held:
            held.enter_context(_folder_locked(out_dir, f"{out_dir}: another export is writing into this folder now"))
            _refuse_to_replace(out_dir, force)  # again, now that no other export can write the pair meanwhile
            tmps = [held.enter_context(locked_temporary(path)) for path, _ in targets]
            held.enter_context(failed_writes(out_dir, hdf5=True))  # the temporary files go with their locks
            with h5py.File(tmps[0], "w", locking=False) as fv, h5py.File(tmps[1], "w", locking=False) as fa:
                datasets = [f.create_dataset(AVE_KEY, (len(rows), *shape), dtype, chunks=(1, *shape))
                            for f, (_, shape) in zip((fv, fa), targets)]
                export = secrets.token_hex(8)  # the pair's mark: a kill between the two renames leaves two marks
                for f in (fv, fa):
                    f.attrs["provenance"] = json.dumps(store.provenance, sort_keys=True)
                    f.attrs[AVE_EXPORT_ATTR] = export
                for i, row in enumerate(rows):
                    with _reading(store_path, row.video_id):
                        arrays = store.read(row.video_id)
                    for dataset, array in zip(datasets, arrays):
                        dataset[i] = array
            for tmp, (path, _) in zip(tmps, targets):
                os.replace(tmp, path)
    return targets[0][0], targets[1][0]


def _refuse_to_replace(out_dir: Path, force: bool) -> None:
    existing = [path for path in (out_dir / AVE_VISUAL_FILE, out_dir / AVE_AUDIO_FILE) if path.exists()]
    if existing and not force and not _half_export(existing):
        raise BmfnError(f"{existing[0]}: already exists; export into another folder, or replace it with --force")


@contextlib.contextmanager
def _folder_locked(folder: Path, refusal: str) -> Iterator[None]:
    """An exclusive lock on `folder` itself while the block runs (BmfnError `refusal` where another process holds
    it): two exports into one folder would leave one's visual file beside the other's audio file. Where the file
    system has no locks on folders (NFS), none is taken."""
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        for attempt in range(LOCK_TRIES):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == LOCK_TRIES - 1:
                    raise BmfnError(refusal) from None
                time.sleep(LOCK_RETRY_S)
            except OSError:  # no locks here
                break
        yield
    finally:
        os.close(fd)  # releases the lock


def export_mark(path: Path) -> str | None:
    """The mark `export_ave` gives both files of a pair; None for a file without one (the AVE release's)."""
    try:
        with h5py.File(path, "r") as f:
            mark = f.attrs.get(AVE_EXPORT_ATTR)
    except OSError:
        return None
    return None if mark is None else str(mark)


def _half_export(existing: list[Path]) -> bool:
    """Whether the AVE files in a folder are what an export killed between its two renames left: bmfn's, but not a
    pair (one file, or two of different exports). They are replaced without --force."""
    marks = [export_mark(path) for path in existing]
    return None not in marks and (len(marks) == 1 or marks[0] != marks[1])

