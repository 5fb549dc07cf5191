"""`bmfn info`: what a feature store, a training run or a checkpoint holds, read without loading features or a model.

A store weeks after its run: how many clips, made how (weights, precision, frames per second), labelled into which
splits, which clips failed and why, which carry decode notes, and whether a stopped run left clips in its journal.
A run folder: its epochs done of those asked for, each seed's selected epoch and accuracies, whether it stopped and
how it goes on. A checkpoint: its mode, epoch, accuracies, the data it was trained on and how those features were made.
"""

from __future__ import annotations

import json
import shlex
import zipfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py

from bmfn_pipeline.ave import SPLITS
from bmfn_pipeline.errors import BmfnError, counted, one_line, percent
from bmfn_pipeline.store import AVE_KEY, FeatureStore, locked_by_another
SHOWN = 3  # clips named per list in the text form; --json lists them all


@dataclass
class StoreInfo:
    """A feature store's contents (`FeatureStore` read-only: safe while `bmfn extract` writes to it)."""

    path: str
    clip_ids: list[str]
    dtype: str
    size_bytes: int  # the file and its journal
    provenance: dict
    splits: dict[str, int]  # labelled clips per split that has any ('': labelled, no split stored)
    unlabelled: list[str]
    failed: dict[str, dict]  # clip id -> {"path", "error"}
    notes: dict[str, list[str]]  # clip id -> decode notes
    journaled: list[str]  # clips not consolidated yet
    writing: bool  # a process is writing to the store now
    annotation_rows: int  # the labels it keeps, also of clips it has not extracted
    kind: str = field(default="feature store", init=False)

    def lines(self) -> list[str]:
        labelled = sum(self.splits.values())
        if not labelled and self.annotation_rows:
            labels = (f"none: no clip has one of its {counted(self.annotation_rows, 'annotation row')} (a clip's id, "
                      "its file name without extension, must be the annotation's video id)")
        elif not labelled:
            labels = "none (`bmfn extract --annotations` adds them)"
        elif set(self.splits) == {""}:
            labels = f"{counted(labelled, 'clip')}, no split stored (training splits them 80/10/10 by video id)"
        else:
            labels = f"{counted(labelled, 'clip')}: " + ", ".join(
                [f"{name} {self.splits.get(name, 0)}" for name in SPLITS]
                + ([f"no split {self.splits['']}"] if "" in self.splits else []))
        if self.unlabelled and labelled:
            labels += f"; {len(self.unlabelled)} without an annotation row ({_some(self.unlabelled)})"
        writing = ", being written now" if self.writing else ""
        lines = [f"{one_line(self.path)}: feature store, {counted(len(self.clip_ids), 'clip')}, {self.dtype}, "
                 f"{_size(self.size_bytes)}{writing}", *features_lines(self.provenance), f"  labels    {labels}"]
        if self.journaled:
            journaled = counted(len(self.journaled), "clip")
            lines.append(f"  journal   {journaled} of the run writing now, which consolidates them at its end"
                         if self.writing else f"  journal   {journaled} not consolidated yet (a run was stopped): "
                         "the next `bmfn extract` to this store folds them in")
        lines += _listed("notes", {cid: "; ".join(notes) for cid, notes in self.notes.items()})
        lines += _listed("failed", {cid: failure["error"] for cid, failure in self.failed.items()})  # names the file
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
    metrics: dict  # this epoch's: loss, train_acc (running, during the epoch), val_acc, test_acc, ...
    best: dict  # the selected epoch so far: epoch, val_acc, test_acc
    data: dict
    provenance: dict
    command: str
    bmfn_version: str
    kind: str = field(default="checkpoint", init=False)

    def lines(self) -> list[str]:
        best = self.best.get("epoch")
        selected = "selected" if best == self.epoch else f"best so far: epoch {best}"
        return [f"{one_line(self.path)}: BMFN checkpoint, {self.mode} supervised, epoch {self.epoch} of "
                f"{self.epochs} ({selected} on {self.selected_on})",
                f"  accuracy  {_accuracies(self.metrics)}", *self.trained_lines()]

    def trained_lines(self) -> list[str]:
        """What it was trained on and how; shared by a run's lines."""
        split_rule = f" ({self.data['split_rule']})" if self.data.get("split_rule") else ""
        return [f"  data      {self.data.get('kind', '?')} {one_line(str(self.data.get('path', '?')))}{split_rule}",
                *features_lines(self.provenance),
                f"  command   {one_line(self.command)}" if self.command else f"  bmfn      {self.bmfn_version}"]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SeedInfo:
    """One seed of a run: its folder, the epochs it finished, its best.pt and last.pt."""

    seed: int
    folder: str
    epochs_done: int  # finished epochs, by metrics.jsonl
    best: CheckpointInfo | None
    last: CheckpointInfo | None  # where --resume goes on from


@dataclass
class RunInfo:
    """A `bmfn train` run folder: its settings, each seed's progress and selected checkpoint, the seeds' summary."""

    path: str
    mode: str
    epochs: int
    seeds: list[SeedInfo]
    summary: dict | None  # summary.json of a finished run of several seeds
    selected: str | None  # the checkpoint the commands take for the run (of its best seed)
    training: bool  # a process is training it now (it holds the run's lock)
    kind: str = field(default="run", init=False)

    @property
    def finished(self) -> bool:
        return all(seed.epochs_done >= self.epochs for seed in self.seeds) and bool(self.seeds)

    @property
    def current_summary(self) -> dict | None:
        """summary.json where it is of the run as it stands (a run resumed for more epochs keeps its old one)."""
        if not self.summary or not self.finished:
            return None
        return self.summary if all(run.get("epochs") == self.epochs for run in self.summary.get("runs", [])) else None

    def lines(self) -> list[str]:
        seeds = f"{len(self.seeds)} seeds of {counted(self.epochs, 'epoch')}" if len(self.seeds) > 1 else \
            f"{min((s.epochs_done for s in self.seeds), default=0)} of {counted(self.epochs, 'epoch')}"
        state = "being trained now" if self.training else "finished" if self.finished else \
            f"stopped: `bmfn train --resume {shlex.quote(one_line(self.path))}` goes on"
        lines = [f"{one_line(self.path)}: training run, {self.mode} supervised, {seeds}, {state}"]
        summary = self.current_summary
        for seed in self.seeds:
            name = f"seed {seed.seed}" if len(self.seeds) > 1 else "best.pt"
            done = f"{seed.epochs_done} of {counted(self.epochs, 'epoch')}; " if len(self.seeds) > 1 else ""
            if seed.best is None:
                lines.append(f"  {name:<9} {done}no best.pt" if done else f"  {name:<9} none")
            else:
                mark = "  <- selected" if summary and _same_file(seed.best.path, self.selected) else ""
                lines.append(f"  {name:<9} {done}epoch {seed.best.epoch} selected on {seed.best.selected_on}: "
                             f"{_accuracies(seed.best.metrics)}{mark}")
            if not self.training and (seed.epochs_done < self.epochs or seed.best is None):
                lines.append(f"  {'':<9} last.pt: epoch {seed.last.epoch}, where --resume goes on" if seed.last else
                             f"  {'':<9} no last.pt: --resume starts from epoch 1")
        if summary:
            spread = {split: percent(summary.get(f"{split}_mean"), summary.get(f"{split}_std") or 0.0)
                      for split in ("val", "test")}
            lines.append(f"  mean      val {spread['val']}, test {spread['test']}")
        known = next((c for seed in self.seeds for c in (seed.best, seed.last) if c is not None), None)
        return lines + (known.trained_lines() if known else [])

    def to_dict(self) -> dict:
        return {**asdict(self), "finished": self.finished, "summary_current": self.current_summary is not None}


def info(path: str | Path) -> StoreInfo | RunInfo | CheckpointInfo:
    """What `path` holds: a feature store (HDF5), a run folder, or a checkpoint (a torch zip file)."""
    path = Path(path)
    if not path.exists():
        raise BmfnError(f"{path}: no such file or folder")
    try:
        return _described(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:  # a damaged file: HDF5's, JSON's or zip's words
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise BmfnError(f"{path}: cannot be read ({reason})") from None


def _described(path: Path) -> StoreInfo | RunInfo | CheckpointInfo:
    if path.is_dir():
        from bmfn_pipeline.train import RUN_FILE  # torch: not for a store's info

        return run_info(path) if (path / RUN_FILE).is_file() else checkpoint_info(path)  # a seed folder: its best.pt
    if h5py.is_hdf5(path):
        return store_info(path)
    if zipfile.is_zipfile(path) and _holds_pickle(path):
        return checkpoint_info(path)
    from bmfn_pipeline.decode import VIDEO_EXTENSIONS

    hint = "; `bmfn probe` shows what a video holds" if path.suffix.lower() in VIDEO_EXTENSIONS else ""
    raise BmfnError(f"{path}: neither a feature store (HDF5), a run folder nor a checkpoint{hint}")


def store_info(path: str | Path) -> StoreInfo:
    _refuse_ave_layout(Path(path))
    with FeatureStore.open(path, readonly=True) as store:
        clip_ids = store.clip_ids()
        labels = store.labels()
        counts = Counter(labels[cid].split for cid in clip_ids if cid in labels)
        splits = {name: counts[name] for name in (*SPLITS, "") if counts[name]}
        size = sum(_file_size(p) for p in [store.path, *store.parts_dir.glob("*")])
        failed = {cid: {"path": where, "error": error} for cid, (where, error) in store.failures().items()}
        return StoreInfo(str(path), clip_ids, str(store.dtype), size, store.provenance, splits,
                         store.unlabelled(), failed, store.notes(), store.journaled(), store.being_written(),
                         len(labels))


def checkpoint_info(path: str | Path) -> CheckpointInfo:
    from bmfn_pipeline.train import load_checkpoint_metadata, resolve_checkpoint  # torch: not for a store's info

    path = resolve_checkpoint(path)
    meta = load_checkpoint_metadata(path)
    config = meta.get("train_config", {})
    epochs = _run_epochs(path) or config.get("epochs", meta["epoch"])
    return CheckpointInfo(str(path), meta["model_config"]["mode"], meta["epoch"], epochs,
                          meta.get("selected_on", "val"), meta.get("metrics", {}), meta.get("best", {}),
                          meta.get("data", {}), meta.get("provenance", {}), config.get("command") or "",
                          meta.get("bmfn_version", "?"))


def run_info(path: str | Path) -> RunInfo:
    """A run folder by its own files: run.json, each seed's metrics.jsonl, best.pt and last.pt, summary.json."""
    from bmfn_pipeline.train import BEST, LAST, METRICS, RUN_FILE, RUN_LOCK, SUMMARY, _run_best

    path = Path(path)
    try:
        config = json.loads((path / RUN_FILE).read_text())["config"]
        seed, count = int(config["seed"]), int(config.get("seeds", 1))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BmfnError(f"{path / RUN_FILE}: not a run's record ({exc})") from None
    seeds = []
    for number in range(seed, seed + count):
        folder = path if count == 1 else path / f"seed-{number}"
        best, last = (checkpoint_info(folder / name) if (folder / name).is_file() else None for name in (BEST, LAST))
        seeds.append(SeedInfo(number, str(folder), _epochs_done(folder / METRICS), best, last))
    selected = _run_best(path)  # first: it says what is wrong with a summary.json that cannot be read
    summary = json.loads((path / SUMMARY).read_text()) if (path / SUMMARY).is_file() else None
    return RunInfo(str(path), config.get("mode", "?"), int(config.get("epochs", 0)), seeds, summary,
                   str(selected) if selected else None, locked_by_another(path / RUN_LOCK))


def _run_epochs(checkpoint: Path) -> int | None:
    """The epochs asked of the run folder a checkpoint lies in (its own, or its seed folder's parent), by run.json: a
    resumed run's checkpoints hold the epochs asked for when they were written. None where it lies in no run."""
    from bmfn_pipeline.train import RUN_FILE

    folder = checkpoint.parent
    for run in (folder, folder.parent) if folder.name.startswith("seed-") else (folder,):
        try:
            return int(json.loads((run / RUN_FILE).read_text())["config"]["epochs"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


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
    frames = counted(provenance.get("frames_per_second", "?"), "frame")
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


def _refuse_ave_layout(path: Path) -> None:
    """A file of the AVE release's layout (or `bmfn export-ave`'s) is no store: say what reads it."""
    with h5py.File(path, "r") as f:
        if AVE_KEY in f and "clip_ids" not in f:
            raise BmfnError(f"{path}: a file of the AVE release's layout (key {AVE_KEY!r}), not a bmfn feature "
                            f"store; `bmfn train --ave-dir {shlex.quote(str(path.parent))}` reads such a folder")


def _same_file(a: str, b: str | None) -> bool:
    return b is not None and Path(a).resolve() == Path(b).resolve()


def _holds_pickle(path: Path) -> bool:
    """Whether a zip file is torch.save's (a data.pkl inside), not any zip (an .npz)."""
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("data.pkl") for name in archive.namelist())


def _epochs_done(metrics: Path) -> int:
    """The last finished epoch recorded in a metrics.jsonl (0 without one); a line torn by a kill is not one."""
    done = 0
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                done = max(done, int(json.loads(line)["epoch"]))
            except (ValueError, KeyError, TypeError):
                continue
    return done


def _accuracies(metrics: Mapping) -> str:
    """val and test of an epoch, then its train accuracy, which is the running one during the epoch (dropout on,
    weights changing), not `bmfn evaluate --split train`'s."""
    train = metrics.get("train_acc")
    during = f" (train {percent(train)} while training)" if train is not None else ""
    return f"val {percent(metrics.get('val_acc'))}, test {percent(metrics.get('test_acc'))}{during}"


def _listed(title: str, items: Mapping[str, str]) -> list[str]:
    if not items:
        return []
    lines = [f"  {title:<9} {counted(len(items), 'clip')}"]
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


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def to_json(result: StoreInfo | RunInfo | CheckpointInfo) -> str:
    return json.dumps(result.to_dict(), default=str)
