"""`bmfn info`: what a feature store or a checkpoint holds, read without loading features or building a model.

A store weeks after its run: how many clips, made how (weights, precision, frames per second), labelled into which
splits, which clips failed and why, which carry decode notes, and whether a stopped run left clips in its journal.
A checkpoint: its mode, epoch and accuracies, the data it was trained on and how those features were made.
"""

from __future__ import annotations

import json
import zipfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py

from bmfn_pipeline.errors import BmfnError, one_line
from bmfn_pipeline.store import FeatureStore

SPLITS = ("train", "val", "test")
SHOWN = 3  # clips named per list in the text form; --json lists them all


@dataclass
class StoreInfo:
    """A feature store's contents (`FeatureStore` read-only: safe while `bmfn extract` writes to it)."""

    path: str
    clips: int
    dtype: str
    size_bytes: int  # the file and its journal
    provenance: dict
    splits: dict[str, int]  # labelled clips per split that has any ('': labelled, no split stored)
    unlabelled: list[str]
    failed: dict[str, str]  # clip id -> "path: error"
    notes: dict[str, list[str]]  # clip id -> decode notes
    journaled: list[str]  # clips not consolidated yet
    writing: bool  # a process is writing to the store now
    kind: str = field(default="feature store", init=False)

    def lines(self) -> list[str]:
        labelled = sum(self.splits.values())
        if not labelled:
            labels = "none (`bmfn extract --annotations` adds them)"
        elif set(self.splits) == {""}:
            labels = f"{_count(labelled, 'clip')}, no split stored (training splits them 80/10/10 by video id)"
        else:
            labels = f"{_count(labelled, 'clip')}: " + ", ".join(
                [f"{name} {self.splits.get(name, 0)}" for name in SPLITS]
                + ([f"no split {self.splits['']}"] if "" in self.splits else []))
        if self.unlabelled and labelled:
            labels += f"; {len(self.unlabelled)} without an annotation row ({_some(self.unlabelled)})"
        writing = ", being written now" if self.writing else ""
        lines = [f"{one_line(self.path)}: feature store, {_count(self.clips, 'clip')}, {self.dtype}, "
                 f"{_size(self.size_bytes)}{writing}", *features_lines(self.provenance), f"  labels    {labels}"]
        if self.journaled:
            journaled = _count(len(self.journaled), "clip")
            lines.append(f"  journal   {journaled} of the run writing now, which consolidates them at its end"
                         if self.writing else f"  journal   {journaled} not consolidated yet (a run was stopped): "
                         "the next `bmfn extract` to this store folds them in")
        lines += _listed("notes", {cid: "; ".join(notes) for cid, notes in self.notes.items()})
        lines += _listed("failed", self.failed)
        return lines

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CheckpointInfo:
    """A checkpoint's training run, from its metadata (the weights are mapped, not read)."""

    path: str
    mode: str
    epoch: int
    epochs: int
    selected_on: str
    metrics: dict  # this epoch's: loss, train_acc, val_acc, test_acc, ...
    best: dict  # the selected epoch so far: epoch, val_acc, test_acc
    data: dict
    provenance: dict
    command: str
    bmfn_version: str
    kind: str = field(default="checkpoint", init=False)

    def lines(self) -> list[str]:
        best = self.best.get("epoch")
        selected = "selected" if best == self.epoch else f"best so far: epoch {best}"
        split_rule = f" ({self.data['split_rule']})" if self.data.get("split_rule") else ""
        accuracy = ", ".join(f"{split} {_percent(self.metrics.get(f'{split}_acc'))}" for split in SPLITS)
        return [f"{one_line(self.path)}: BMFN checkpoint, {self.mode} supervised, epoch {self.epoch} of "
                f"{self.epochs} ({selected} on {self.selected_on})",
                f"  accuracy  {accuracy}",
                f"  data      {self.data.get('kind', '?')} {one_line(str(self.data.get('path', '?')))}{split_rule}",
                *features_lines(self.provenance),
                f"  command   {one_line(self.command)}" if self.command else f"  bmfn      {self.bmfn_version}"]

    def to_dict(self) -> dict:
        return asdict(self)


def info(path: str | Path) -> StoreInfo | CheckpointInfo:
    """What `path` holds: a feature store (HDF5), a checkpoint (a torch zip file) or a run folder's checkpoint."""
    path = Path(path)
    if not path.exists():
        raise BmfnError(f"{path}: no such file or folder")
    if path.is_file() and h5py.is_hdf5(path):
        return store_info(path)
    if path.is_dir() or zipfile.is_zipfile(path):
        return checkpoint_info(path)
    hint = "" if path.suffix.lower() in (".h5", ".hdf5", ".pt", ".pth") else "; `bmfn probe` shows what a video holds"
    raise BmfnError(f"{path}: neither a feature store (HDF5) nor a checkpoint{hint}")


def store_info(path: str | Path) -> StoreInfo:
    with FeatureStore.open(path, readonly=True) as store:
        clip_ids = store.clip_ids()
        labels = store.labels()
        counts = Counter(labels[cid].split for cid in clip_ids if cid in labels)
        splits = {name: counts[name] for name in (*SPLITS, "") if counts[name]}
        size = sum(_file_size(p) for p in [store.path, *store.parts_dir.glob("*")])
        failed = {cid: f"{where}: {error}" for cid, (where, error) in store.failures().items()}
        return StoreInfo(str(path), len(clip_ids), str(store.dtype), size, store.provenance, splits,
                         store.unlabelled(), failed, store.notes(), store.journaled(), store.being_written())


def checkpoint_info(path: str | Path) -> CheckpointInfo:
    from bmfn_pipeline.train import load_checkpoint_metadata, resolve_checkpoint  # torch: not for a store's info

    path = resolve_checkpoint(path)
    meta = load_checkpoint_metadata(path)
    config = meta.get("train_config", {})
    return CheckpointInfo(str(path), meta["model_config"]["mode"], meta["epoch"], config.get("epochs", meta["epoch"]),
                          meta.get("selected_on", "val"), meta.get("metrics", {}), meta.get("best", {}),
                          meta.get("data", {}), meta.get("provenance", {}), config.get("command") or "",
                          meta.get("bmfn_version", "?"))


def features_lines(provenance: Mapping) -> list[str]:
    """How features were made: each network's weights, VGG-19's precision, the sampling, the alignment; and a
    warning line where weights were random."""
    if not provenance:
        return ["  features  made by an unknown extractor (no provenance recorded)"]
    if provenance.get("source") == "ave-release":
        return ["  features  the AVE release's (VGG-19 with Keras weights, 16 frames/s; VGGish, alignment ave)"]
    visual, audio = provenance.get("visual", {}), provenance.get("audio", {})
    precision = f", {provenance['precision']}" if provenance.get("precision") else ""
    revision = provenance.get("features_revision")
    made = f"; revision {revision} (bmfn {provenance.get('bmfn_version', '?')})" if revision else ""
    frames = _count(provenance.get("frames_per_second", "?"), "frame")
    lines = [f"  features  VGG-19 {_weights(visual)}{precision}, {frames}/s; "
             f"VGGish {_weights(audio)}, alignment {provenance.get('alignment', '?')}{made}"]
    if any(str(record.get("checksum", "")).startswith("random:") for record in (visual, audio)):
        lines.append("  warning   RANDOM network weights: these features are for tests and demos only")
    return lines


def _weights(record: Mapping) -> str:
    checksum = str(record.get("checksum", ""))
    if checksum.startswith("random:"):
        return f"RANDOM (seed {checksum.split(':', 1)[1]})"
    return f"{record.get('weights', '?')} ({checksum[:12] or 'no checksum'})"


def _listed(title: str, items: Mapping[str, str]) -> list[str]:
    if not items:
        return []
    lines = [f"  {title:<9} {_count(len(items), 'clip')}"]
    lines += [f"    {one_line(cid)}: {one_line(text)}" for cid, text in list(items.items())[:SHOWN]]
    if len(items) > SHOWN:
        lines.append(f"    ... and {len(items) - SHOWN} more (--json lists them all)")
    return lines


def _some(ids: list[str]) -> str:
    shown = ", ".join(one_line(cid) for cid in ids[:SHOWN])
    return shown + (f", ... {len(ids) - SHOWN} more" if len(ids) > SHOWN else "")


def _file_size(path: Path) -> int:
    """0 for a journal part that a writer consolidated away meanwhile."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _percent(value) -> str:
    return "-" if value is None else f"{value:.2f} %"


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def to_json(result: StoreInfo | CheckpointInfo) -> str:
    return json.dumps(result.to_dict(), default=str)
