"""Training BMFN: the reference hyper-parameters per mode, selection on val, checkpoints, metrics, resume.

A run directory holds `run.json` (the resolved configuration), `command.txt`, `metrics.jsonl` (one line per
epoch), `curves.png`, `best.pt` (selected epoch) and `last.pt` (latest saved epoch plus optimiser, scheduler and RNG
state, so `--resume` continues bit for bit on the same device). Both are written after the first epoch, then at
most every `checkpoint_every` seconds and at the end: on a GPU an AVE epoch takes well under a second and a 320 MB
last.pt per epoch would cost more than the training; the selected epoch's weights wait in memory until then. With
several seeds each has its own `seed-<n>/` folder and `summary.json` gives mean and standard deviation (its paths
relative to the run folder). `--resume` goes on with run.json's settings; epochs, precision, CUDA graphs,
compilation, the evaluation batch or the checkpoint interval given anew are written to it, for the next resume, and
another value of what the run learns from or how (FIXED_ON_RESUME) is refused.

On a single CUDA device each training step is replayed as a CUDA graph (bmfn_pipeline.graphs). A resumed run
captures its graphs anew, and its first steps, run eagerly, draw other dropout masks than the replays they stand
for: there, --resume continues the run faithfully but not bit for bit.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import random
import shlex
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from numbers import Integral, Real
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from bmfn_pipeline import __version__
from bmfn_pipeline.data import (NOISY_AUDIO_FILE, NOISY_VISUAL_FILE, FeatureData, batches, find_default_data,
                                load_data, num_batches)
from bmfn_pipeline.distributed import (all_sum, gathered, local_batch, process_group, rank_device, rank_env,
                                       rank_share, resolve_device, seed_rank, share_from_main, stand_in, summed, wrap)
from bmfn_pipeline.errors import BmfnError, WriteError, check_counts, failed_writes, percent, written
from bmfn_pipeline.evaluate import (CLASS_NAMES, compute_precision, precision_note, predict_labels, predict_rows,
                                     to_numpy)
from bmfn_pipeline.graphs import GraphedStep
from bmfn_pipeline.store import exclusive_lock
from bmfn_pipeline.model import (BMFN, BMFNConfig, BMFNOutput, fully_supervised_loss, group_state_dict,
                                 predict_segments, weakly_supervised_loss)
from extractors.weights import read_torch_file, uninitialised, use_compile_cache


@dataclass(frozen=True)
class Hyper:
    lr: float
    milestones: tuple[int, ...]
    gamma: float
    epochs: int
    batch_size: int
    clip: float
    seed: int


# The official training scripts' values (bmfn-reference.md section 7): Adam, MultiStepLR stepped once per epoch.
REFERENCE = {
    "fully": Hyper(lr=5e-4, milestones=(10, 20, 30), gamma=0.5, epochs=200, batch_size=32, clip=0.1, seed=890),
    "weakly": Hyper(lr=5e-4, milestones=(5, 20, 40), gamma=0.5, epochs=200, batch_size=32, clip=0.5, seed=550),
}
CHECKPOINT_FORMAT = "bmfn-checkpoint-1"
BEST, LAST, METRICS, CURVES, COMMAND, RUN_FILE, SUMMARY, RUN_LOCK = (
    "best.pt", "last.pt", "metrics.jsonl", "curves.png", "command.txt", "run.json", "summary.json", ".lock")
RUNS_DIR = "runs"
CHECKPOINT_EVERY = 60.0  # seconds between writes of last.pt and best.pt (0: after every epoch)
# How a run runs, for a new run when not given; a resumed run keeps its own (run.json) unless given. With epochs,
# what --resume may change; a change is written to run.json, so that a later plain --resume goes on alike.
RUN_DEFAULTS = {"precision": "float32", "cuda_graphs": True, "compile": False, "checkpoint_every": CHECKPOINT_EVERY}
RESUME_SETTINGS = ("epochs", "eval_batch_size", *RUN_DEFAULTS)  # how a run goes on: given anew on resume, kept
# What a run learns from, and how: a resumed run keeps its own, and refuses another given (it went unused, unsaid).
FIXED_ON_RESUME = ("mode", "ave_dir", "features", "annotations", "splits", "batch_size", "lr", "milestones", "gamma",
                   "clip", "seed", "seeds", "select_on_test", "include_noisy", "model")
CLI_FIXED = {*FIXED_ON_RESUME, "esa_activation"} - {"include_noisy", "model"}  # those `bmfn train` has options for
PROGRESS_EVERY = 10  # steps between progress-bar figures (reading them waits for the GPU)
# --compile's inductor settings. Combo kernels fuse independent small kernels (such as the weights' bf16 casts) into
# one launch: a graphed bf16 step on an H100 went from 863 to 661 kernels, 5.07 to 4.70 ms.
COMPILE_OPTIONS = {"combo_kernels": True}
# Provenance keys (a store's words, see bmfn_pipeline.extract.features_provenance) that change the feature space:
# which network weights (random:<seed> included) and preprocessing, how frames and audio were framed.
FEATURE_KEYS = ("visual.source", "visual.weights", "visual.checksum", "visual.preprocessing", "audio.weights",
                "audio.checksum", "audio.pca", "audio.alignment", "frames_per_second", "seconds", "alignment")


@dataclass
class TrainConfig:
    """One `bmfn train` invocation. Settings left None take the reference value for the mode (fully, by default) in
    a new run, and the run's own in a resumed one."""

    mode: str | None = None  # fully or weakly
    ave_dir: str | None = None
    features: str | None = None
    annotations: str | None = None
    splits: str | None = None
    out: str | None = None  # run directory; default runs/<mode>-<timestamp>
    runs_dir: str = RUNS_DIR
    epochs: int | None = None
    batch_size: int | None = None
    eval_batch_size: int | None = None  # None: 16 (the official test batch) on CPUs, 256 on GPUs; no result changes
    lr: float | None = None
    milestones: tuple[int, ...] | None = None
    gamma: float | None = None
    clip: float | None = None
    seed: int | None = None
    seeds: int | None = None  # run seed, seed+1, ... and report mean and std (1)
    device: str = "auto"
    # These four left None take RUN_DEFAULTS in a new run, the run's own values on resume.
    precision: str | None = None  # float32, tf32 or bfloat16 (bmfn_pipeline.evaluate.PRECISIONS)
    cuda_graphs: bool | None = None  # replay each step as a CUDA graph on a single CUDA device (ignored elsewhere)
    compile: bool | None = None  # torch.compile the network for full training batches
    checkpoint_every: float | None = None  # seconds (CHECKPOINT_EVERY)
    select_on_test: bool | None = None  # the official protocol: keep the epoch with the best TEST accuracy (False)
    include_noisy: bool | None = None  # weakly: the 178 background clips join the training set when present (True)
    force: bool = False  # resume on features whose provenance differs
    model: dict = field(default_factory=dict)  # BMFNConfig overrides (e.g. a smaller model for experiments)
    resume: str | None = None  # a run directory to continue from its last.pt
    progress: bool = True
    command: str | None = None  # what to record in command.txt (the CLI passes its argv)

    def __post_init__(self) -> None:
        check_counts("TrainConfig", epochs=self.epochs, batch_size=self.batch_size,
                     eval_batch_size=self.eval_batch_size, seeds=self.seeds)
        check_counts("TrainConfig", minimum=0, seed=self.seed)
        for name in ("lr", "gamma", "clip"):  # NaN and infinity pass a comparison with 0, and ruin every weight
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, Real) or not value > 0
                                      or not math.isfinite(value)):
                raise BmfnError(f"TrainConfig: {name}={value!r}, expected a finite number above 0")
        if self.milestones is not None:
            if isinstance(self.milestones, str) or not all(isinstance(m, Integral) and m >= 1 for m in self.milestones):
                raise BmfnError(f"TrainConfig: milestones={self.milestones!r}, expected epochs such as (10, 20, 30)")
            self.milestones = tuple(int(m) for m in self.milestones)
        if self.checkpoint_every is not None and (isinstance(self.checkpoint_every, bool) or not isinstance(
                self.checkpoint_every, Real) or not self.checkpoint_every >= 0):  # inf: after epoch 1 and the end
            raise BmfnError(f"TrainConfig: checkpoint_every={self.checkpoint_every!r}, expected seconds, 0 or more")
        # Plain str, int and float, as run.json holds them: a notebook's Path or numpy number is taken as such.
        for name, kind in PLAIN_FIELDS.items():
            if (value := getattr(self, name)) is not None:
                try:
                    setattr(self, name, kind(value))
                except TypeError:
                    raise BmfnError(f"TrainConfig: {name}={value!r}, expected a path") from None
        if self.seed is not None and self.seed + (self.seeds or 1) > 2 ** 32:  # numpy's global seed takes 32 bits
            raise BmfnError(f"TrainConfig: seed={self.seed!r} with seeds={self.seeds or 1}, expected seeds below "
                            "2**32")
        self.model = _model_overrides(self.model)

    def resolved(self) -> "TrainConfig":
        mode = self.mode or "fully"
        if mode not in REFERENCE:
            raise BmfnError(f"mode {self.mode!r}: use fully or weakly")
        ref = REFERENCE[mode]
        defaults = {**{f.name: getattr(ref, f.name) for f in fields(Hyper)}, **RUN_DEFAULTS, "mode": mode, "seeds": 1,
                    "select_on_test": False, "include_noisy": True}
        filled = {name: value if getattr(self, name) is None else getattr(self, name)
                  for name, value in defaults.items()}
        filled["milestones"] = tuple(int(m) for m in filled["milestones"])
        return replace(self, **filled)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


# TrainConfig's fields whose values are converted to these types (a Path to str, numpy's numbers to Python's).
PLAIN_FIELDS = {**dict.fromkeys(("ave_dir", "features", "annotations", "splits", "out", "runs_dir", "resume"),
                                os.fsdecode),
                **dict.fromkeys(("epochs", "batch_size", "eval_batch_size", "seed", "seeds"), int),
                **dict.fromkeys(("lr", "gamma", "clip", "checkpoint_every"), float)}


def _model_overrides(model: dict) -> dict:
    """TrainConfig.model checked by building the network's config from it (before a run folder is written), its
    numbers as Python's own."""
    names = {f.name for f in fields(BMFNConfig)} - {"mode"}
    if not isinstance(model, dict) or not all(isinstance(name, str) for name in model):
        raise BmfnError(f"TrainConfig: model={model!r}, expected a dict of BMFNConfig fields")
    if unknown := sorted(set(model) - names):
        raise BmfnError(f"TrainConfig: model has {', '.join(map(repr, unknown))}, not a BMFNConfig field"
                        + (" (set TrainConfig.mode instead)" if "mode" in unknown else "")
                        + f"; the fields are {', '.join(sorted(names))}")
    plain = {name: value.item() if isinstance(value, (np.generic, np.ndarray)) and np.ndim(value) == 0 else value
             for name, value in model.items()}
    try:
        checked = BMFNConfig(**plain)  # its own checks are BmfnErrors; it keeps plain numbers
    except TypeError as exc:  # e.g. an unhashable esa_activation
        raise BmfnError(f"TrainConfig: model={model!r}: {exc}") from None
    return {name: getattr(checked, name) for name in plain}


@dataclass
class RunResult:
    """One seed's outcome; accuracies are percentages for the selected (best) epoch, None for a split without
    clips."""

    run_dir: Path
    seed: int
    best_epoch: int
    selected_on: str  # 'val' or 'test'
    val_acc: float | None
    test_acc: float | None
    epochs: int
    history: list[dict]

    @property
    def best_checkpoint(self) -> Path:
        return self.run_dir / BEST


@dataclass
class TrainResult:
    """All seeds of one `train` call."""

    run_dir: Path
    runs: list[RunResult]
    data: str

    def _stat(self, name: str) -> tuple[float, float] | tuple[None, None]:
        if any(getattr(r, name) is None for r in self.runs):
            return None, None
        values = np.array([getattr(r, name) for r in self.runs], float)
        return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0

    @property
    def test_mean_std(self) -> tuple[float, float] | tuple[None, None]:
        return self._stat("test_acc")

    @property
    def val_mean_std(self) -> tuple[float, float] | tuple[None, None]:
        return self._stat("val_acc")

    @property
    def best_checkpoint(self) -> Path:
        """The seed whose selected accuracy is highest (on the split used for selection)."""
        key = "test_acc" if self.runs[0].selected_on == "test" else "val_acc"
        return max(self.runs, key=lambda r: getattr(r, key)).best_checkpoint

    def summary(self) -> str:
        lines = []
        for r in self.runs:
            lines.append(f"seed {r.seed}: best epoch {r.best_epoch}/{r.epochs} (selected on {r.selected_on}): "
                         f"val {percent(r.val_acc)}, test {percent(r.test_acc)}  [{r.best_checkpoint}]")
        if self.runs[0].selected_on == "test":
            lines.append("note: --select-on-test picked the epoch with the best TEST accuracy (the official "
                         "protocol); the test figure is optimistic, not a held-out estimate")
        if len(self.runs) > 1:
            (vm, vs), (tm, ts) = self.val_mean_std, self.test_mean_std
            lines.append(f"{len(self.runs)} seeds: val {percent(vm, vs)}, test {percent(tm, ts)} (mean ± std)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """summary.json: the seeds' folders and the best checkpoint relative to the run folder, so that the run
        is found from any folder and after a move (run_dir: where it was written)."""
        (vm, vs), (tm, ts) = self.val_mean_std, self.test_mean_std
        return {"run_dir": str(self.run_dir.resolve()), "data": self.data,
                "best_checkpoint": self.best_checkpoint.relative_to(self.run_dir).as_posix(),
                "val_mean": vm, "val_std": vs, "test_mean": tm, "test_std": ts,
                "runs": [{"seed": r.seed, "run_dir": r.run_dir.relative_to(self.run_dir).as_posix(),
                          "best_epoch": r.best_epoch, "selected_on": r.selected_on, "val_acc": r.val_acc,
                          "test_acc": r.test_acc, "epochs": r.epochs} for r in self.runs]}


# ---------------------------------------------------------------------------------------------- public API


def train(config: TrainConfig, data: FeatureData | None = None,
          log: Callable[[str], None] | None = print) -> TrainResult:
    """Train one model per seed, selecting epochs on val (or test with select_on_test); see the module docstring.

    `data` is already loaded features (bmfn_pipeline.data.load_data), else the config's files are loaded. Each
    line of progress goes to `log` (None: nowhere). Python's, NumPy's and torch's global random generators are
    seeded for the run and given back their state when it ends, so a notebook's own draws go on as before (CUDA's
    where CUDA was in use before the call; one started by the call keeps the run's seeds).

    Under torchrun, every rank trains a DistributedDataParallel replica on its slice of each global batch
    (bmfn_pipeline.distributed); rank 0 alone writes the run folder and logs.
    """
    log = log or _silent
    with process_group(resolve_device(config.device)) as env, _global_rng_kept():
        if not env.is_main:
            config, log = replace(config, progress=False), _silent
        return _train(config, data, log)


@contextlib.contextmanager
def _global_rng_kept():
    """The global generators' states before the block, restored after it."""
    state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _silent(*_) -> None:
    pass


def _train(config: TrainConfig, data: FeatureData | None, log) -> TrainResult:
    if config.resume:
        config, run_dir = _resume_config(config)
    else:
        config = config.resolved()
        run_dir = share_from_main(lambda: _new_run_dir(config))  # a timestamped name must be the same on all ranks
    device = rank_device(resolve_device(config.device))
    if data is None:
        data = _load_config_data(config, log)
    _check_same_data_on_every_rank(data)
    # Absolute paths of what was loaded, so --resume and `bmfn evaluate` find it from any folder.
    config = replace(config, **{"ave_dir" if data.source["kind"] == "ave-dir" else "features": data.source["path"],
                                "annotations": data.source["annotations"], "splits": data.source["splits"]})
    log(f"data: {data.describe()}")
    for note in data.notes:
        log(f"note: {note}")
    if config.mode == "weakly":
        data = _with_video_classes(data, log)
        if config.include_noisy and data.noisy is None:
            log(_no_background_note(data))
    if len(data.splits["train"]) == 0:
        raise BmfnError(f"{data.source['path']}: the train split is empty ({data.split_rule})")
    # Features the network does not take fail now, naming their file, not in the first step of a new run folder.
    BMFNConfig(mode=config.mode, **config.model).check_inputs(
        f"{data.source['path']}: features the network does not take",
        (1, *data.clips.visual.shape[1:]), (1, *data.clips.audio.shape[1:]))
    selection = "test" if config.select_on_test else "val"
    if len(data.splits[selection]) == 0:
        other = "" if config.select_on_test or not len(data.splits["test"]) else \
            " (--select-on-test selects on the test split instead, as the official code does)"
        raise BmfnError(f"{data.source['path']}: the {selection} split is empty ({data.split_rule}); "
                        f"model selection needs it{other}")
    for split in ("val", "test"):
        if len(data.splits[split]) == 0:
            log(f"note: no {split} clips ({data.split_rule}): no {split} accuracy is reported")
    if config.select_on_test:
        log("--select-on-test: keeping the epoch with the best TEST accuracy (the official protocol); "
            "the reported test accuracy is then optimistic")
    main = rank_env().is_main  # rank 0 writes the run folder; under torchrun the others write nothing
    held: list[int] = []  # rank 0's lock on the run folder, kept while it trains

    def open_run_folder() -> None:
        if not main:  # under torchrun rank 0 alone runs it
            return
        if not config.resume:
            run_dir.mkdir(parents=True, exist_ok=True)
        held.extend(_locked_run(run_dir))  # before anything is written: a run being trained is refused
        if config.resume:
            _remove_unfinished_writes(run_dir)
            _record_resume_settings(run_dir, config)
        else:
            _write_json(run_dir / RUN_FILE, {"config": config.to_dict(), "data": data.source,
                                             "split_rule": data.split_rule, "started": time.time()})
        with failed_writes(run_dir / COMMAND), open(run_dir / COMMAND, "a") as f:
            f.write((config.command or _api_command(config)) + "\n")

    try:
        share_from_main(open_run_folder)  # a refusal reaches every rank; a lock taken is released below
        log(f"run: {run_dir} ({config.mode}, device {device}, {config.precision})")
        if note := precision_note(device, config.precision):
            log(note)
        if device.type == "cuda":
            data = data.to(device)  # AVE fits on any current GPU (2.1 GB as float16): no host reads per batch
        seeds = [config.seed + i for i in range(config.seeds)]
        runs = []
        for seed in seeds:
            seed_dir = run_dir if config.seeds == 1 else run_dir / f"seed-{seed}"
            runs.append(_train_seed(config, seed, data, seed_dir, device, log))
        result = TrainResult(run_dir, runs, data.describe())
        if config.seeds > 1 and main:
            _write_json(run_dir / SUMMARY, result.to_dict())
        return result
    finally:
        for fd in held:
            os.close(fd)  # releases the lock


def _locked_run(run_dir: Path) -> list[int]:
    """An exclusive lock on the run folder (its RUN_LOCK file), as [its descriptor]; [] where there are no locks.
    Two processes training one run (a second --resume) would write each other's checkpoints."""
    try:
        fd = exclusive_lock(run_dir / RUN_LOCK)
    except BlockingIOError:
        raise BmfnError(f"{run_dir}: another process is training this run now") from None
    except OSError as exc:
        raise BmfnError(f"{run_dir / RUN_LOCK}: cannot write ({exc.strerror or exc})") from None
    return [] if fd is None else [fd]


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[BMFN, dict]:
    """A checkpoint's model in eval mode and its metadata (config, classes, provenance, data, epoch, metrics); a run
    folder means its selected checkpoint, as for the commands."""
    path = resolve_checkpoint(path)
    state = _load_state(path, device, mmap=True)  # not last.pt's optimizer state
    _check_finite(path, state["model_state"])
    try:
        config = BMFNConfig(**state["model_config"])
    except (BmfnError, TypeError) as exc:
        raise BmfnError(f"{path}: its model_config cannot be used ({exc})") from None
    model = uninitialised(lambda: BMFN(config))
    model.load_state_dict(state["model_state"])  # also checkpoints of bmfn before grouping
    model.to(device).eval()
    return model, _metadata(state)


def load_checkpoint_metadata(path: str | Path) -> dict:
    """A checkpoint's metadata as load_checkpoint gives it, without its model: the weights are mapped, never read."""
    return _metadata(_load_state(resolve_checkpoint(path), "cpu", mmap=True))


def _metadata(state: dict) -> dict:
    return {k: v for k, v in state.items() if k not in ("model_state", "optimizer", "scheduler", "rng")}


def _check_finite(path: Path, weights: dict) -> None:
    """A diverged run's weights (NaN or infinity) make every output NaN: refuse them in one line. A sum per tensor
    first (a NaN or infinity carries into it), 16 ms for BMFN's 27 M weights on 2 cores, counting only if one fails."""
    weights = [v for v in weights.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if weights and torch.stack([v.sum(dtype=torch.float64) for v in weights]).isfinite().all():
        return
    if bad := sum(int(v.numel() - torch.isfinite(v).sum()) for v in weights):
        raise BmfnError(f"{path}: {bad} of its weights are not finite (NaN or infinity); the training that wrote it "
                        "diverged: use an earlier checkpoint")


def _started(run: Path) -> float:
    """When a run started, by its run.json; a damaged one counts as oldest, not as an error for every command."""
    try:
        return float(json.loads((run / RUN_FILE).read_text()).get("started", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0.0


def latest_checkpoint(runs_dir: str | Path = RUNS_DIR) -> Path:
    """The best checkpoint of the newest run under `runs_dir` (by start time), for commands given none."""
    runs_dir = Path(runs_dir)
    runs = sorted((d for d in runs_dir.glob("*") if (d / RUN_FILE).is_file()), key=_started, reverse=True)
    for run in runs:
        if (found := _run_best(run)) is not None:
            return found
    raise BmfnError(f"{runs_dir}: no training run with a {BEST} here; train one with `bmfn train` or name a checkpoint")


def resolve_checkpoint(checkpoint: str | Path | None, runs_dir: str | Path = RUNS_DIR) -> Path:
    """The checkpoint file a command means: a file as it is; a run folder's best checkpoint (of its best seed);
    with none, the newest run's under `runs_dir`."""
    if checkpoint is None:
        return latest_checkpoint(runs_dir)
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        found = _run_best(checkpoint)
        if found is None and (checkpoint / RUN_FILE).is_file():
            last = [str(p) for p in (checkpoint / LAST, *checkpoint.glob(f"seed-*/{LAST}")) if p.is_file()]
            raise BmfnError(f"{checkpoint}: a training run without a {BEST} (stopped, or its disk full?); "
                            + (f"name its {last[0]}, or " if last else "")
                            + f"go on with `bmfn train --resume {shlex.quote(str(checkpoint))}`")
        if found is None:
            raise BmfnError(f"{checkpoint}: a folder without a {BEST}; name a checkpoint file or a `bmfn train` run "
                            "folder")
        return found
    return checkpoint


def _run_best(run: Path) -> Path | None:
    """A run folder's selected checkpoint: its summary's, else the newest best.pt in it or its seed folders (not
    deeper: a folder holding runs, or any folder, is no run, and an unrelated checkpoint must not be taken for it)."""
    if (run / SUMMARY).is_file():
        try:
            named = Path(json.loads((run / SUMMARY).read_text())["best_checkpoint"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BmfnError(f"{run / SUMMARY}: not a run's summary ({exc})") from None
        # Relative to the run folder; summaries of earlier versions hold an absolute path or one relative to the
        # folder training ran in (e.g. runs/x/seed-891/best.pt), whose seed folder and file name still tell it.
        for path in (run / named, named, run / named.parent.name / named.name):
            if path.is_file():
                return path
        raise BmfnError(f"{run / SUMMARY}: its best checkpoint {named} is not in {run}")
    found = sorted([*run.glob(BEST), *run.glob(f"seed-*/{BEST}")], key=lambda p: p.stat().st_mtime, reverse=True)
    return found[0] if found else None


def check_provenance(trained: dict, given: dict, *, force: bool = False, what: str = "features") -> list[str]:
    """Refuse features made differently from the checkpoint's on FEATURE_KEYS (returns the differences when forced)."""
    differ = []
    for key in FEATURE_KEYS:
        a, b = _dotted(trained, key), _dotted(given, key)
        if a != b:
            differ.append(f"{key} {a!r} (checkpoint) vs {b!r}")
    if differ and not force:
        raise BmfnError(f"{what}: features were made differently from the checkpoint's: {'; '.join(differ)} "
                        "(--force to use them anyway)")
    return differ


# ---------------------------------------------------------------------------------------------- one seed


def _train_seed(config: TrainConfig, seed: int, data: FeatureData, run_dir: Path, device: torch.device,
                log) -> RunResult:
    main = rank_env().is_main
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    _seed_everything(seed)
    generator = torch.Generator().manual_seed(seed)  # the shuffling order, saved with the rest of the RNG state
    model = BMFN(BMFNConfig(mode=config.mode, **config.model)).to(device)
    replica = wrap(model, device)  # DDP under torchrun (model's BatchNorm synchronised in place), else model
    # --compile: the whole network, for full batches only. The epoch's short batch and evaluation run the same
    # weights eagerly, so that one batch shape is compiled (a first epoch of 56 s on an H100, 6.9 s with the kernels
    # in the compile cache, which use_compile_cache puts in bmfn's cache folder).
    if config.compile:
        use_compile_cache()
    compiled = torch.compile(replica, options=COMPILE_OPTIONS) if config.compile else replica
    graphs = config.cuda_graphs and device.type == "cuda" and replica is model
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, capturable=graphs, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(config.milestones), config.gamma)
    start, best = 0, {"epoch": 0, "selected": -math.inf, "val_acc": None, "test_acc": None}
    if (run_dir / LAST).is_file():
        state = _load_state(run_dir / LAST, "cpu")
        check_provenance(state["provenance"], data.provenance, force=config.force, what=data.source["path"])
        if group_state_dict(state["model_state"]) is not state["model_state"]:
            raise BmfnError(f"{run_dir / LAST}: written by an earlier bmfn with one module per block; its optimizer "
                            f"state cannot resume in this version: start a new run (its checkpoints still load)")
        model.load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict({**state["scheduler"], "milestones": Counter(state["scheduler"]["milestones"])})
        _set_rng_state(state["rng"], generator)
        start, best = state["epoch"], state["best"]
        log(f"seed {seed}: resuming after epoch {start} from {run_dir / LAST}" if start < config.epochs else
            f"seed {seed}: all {start} epochs are done ({run_dir / LAST}); --epochs {start + 1} or more trains on")
    elif config.resume:
        log(f"seed {seed}: no {LAST} in {run_dir} yet: starting from epoch 1")
    _prepare_optimizer(optimizer, graphs, device)
    history = _read_metrics(run_dir / METRICS, keep_through=start) if main else []

    loss_fn = fully_supervised_loss if config.mode == "fully" else weakly_supervised_loss
    target_key = "labels" if config.mode == "fully" else "video_labels"
    parts = [(data.clips, data.splits["train"])]
    if config.mode == "weakly" and config.include_noisy and data.noisy is not None:
        parts.append((data.noisy, np.arange(len(data.noisy))))
    selection = "test" if config.select_on_test else "val"
    sums = EpochSums(device)
    parameters = list(model.parameters())

    def step(batch: dict[str, torch.Tensor]) -> None:
        """One optimisation step, tensor work only (it may be captured as a CUDA graph)."""
        network = compiled if len(batch["audio"]) == config.batch_size else replica
        batch, weight = local_batch(batch)  # the whole batch and 1.0 in a single process
        with compute_precision(device, config.precision), stand_in(weight == 0):
            output = network(batch["visual"], batch["audio"])
        output = BMFNOutput(*(None if t is None else t.float() for t in output))
        loss = loss_fn(output, batch[target_key])
        # Backward then writes the gradients instead of adding them into zeros, about 80 fewer kernels (a graphed
        # bf16 step on an H200: 7.55 against 7.81 ms); a captured step keeps the gradients it allocated, and each
        # replay writes them again.
        optimizer.zero_grad(set_to_none=True)
        (loss * weight).backward()
        torch.nn.utils.clip_grad_norm_(parameters, config.clip)
        optimizer.step()
        n = len(batch["audio"]) if weight else 0  # a zero-weight stand-in row (see local_batch) is not counted
        correct = (predict_segments(output) == batch["labels"].argmax(-1))[:n].sum()
        sums.add(loss.detach(), correct, n, n * batch["labels"].shape[1])

    run_step = GraphedStep(step, enabled=graphs, log=log)
    # Evaluation of val and test after each epoch: the forward passes replayed as CUDA graphs too (each result is
    # copied to the host before the next call, so the batch shapes' graphs can share their memory).
    predict = GraphedStep(functools.partial(predict_labels, model, device=device, precision=config.precision),
                          enabled=graphs, log=log, share_memory=True)
    saver = _Saver(run_dir, config.checkpoint_every, enabled=main)
    try:
        for epoch in range(start + 1, config.epochs + 1):
            began = time.perf_counter()
            replica.train()
            seed_rank(seed, epoch)
            lr = float(f"{float(optimizer.param_groups[0]['lr']):.7g}")  # float32 precision, as a graph holds it
            sums.reset()
            bar = tqdm(batches(parts, config.batch_size, device, generator),
                       total=num_batches(parts, config.batch_size), desc=f"seed {seed} epoch {epoch}/{config.epochs}",
                       disable=not config.progress, leave=False, unit="batch")
            for number, batch in enumerate(bar, 1):
                run_step(batch)
                if config.progress and (number % PROGRESS_EVERY == 0 or number == bar.total):
                    bar.set_postfix(sums.postfix())
            # Summed over ranks (under torchrun), with the steps whose loss was not finite: every rank stops together.
            loss_sum, correct, clips, segments, _, any_bad = all_sum(sums.values[:6]).tolist()
            if any_bad:
                if main:
                    _plot_curves(history, run_dir / CURVES, log)
                # the first rank whose loss was not finite, and what rank 0 kept
                totals = sums.totals()
                bad_step, bad_loss = next((step, loss) for step, loss in gathered(
                    (totals["bad_step"], totals["bad_loss"])) if step)
                kept = share_from_main(lambda: [f"{LAST} (epoch {saver.saved_epoch})"] * bool(saver.saved_epoch) + [
                    f"{BEST} (epoch {best['epoch']}, the best so far)"] * bool(best["epoch"]))
                raise BmfnError(f"{run_dir}: the loss became {bad_loss} at epoch {epoch}, batch {int(bad_step)}; "
                                f"training stopped. Kept: {', '.join(kept) or 'nothing'}. Try a lower --lr or --clip"
                                + (", or --precision float32" if config.precision != "float32" else ""))
            accs = {split: _split_accuracy(model, data.clips, data.splits[split], device, config, predict)
                    for split in ("val", "test")}
            scheduler.step()
            record = {"epoch": epoch, "loss": loss_sum / clips, "train_acc": 100 * correct / segments,
                      "val_acc": accs["val"], "test_acc": accs["test"], "lr": lr,
                      "time": time.perf_counter() - began}
            improved = accs[selection] >= best["selected"]  # on a tie, the longer-trained checkpoint
            if improved:
                best = {"epoch": epoch, "selected": accs[selection], "val_acc": accs["val"],
                        "test_acc": accs["test"]}
            record["best"] = improved
            history.append(record)
            if main:
                if improved:
                    saver.keep_best(_checkpoint(model, config, data, seed, epoch, record, best, selection))
                # The metrics line first: a kill before last.pt is saved only leaves lines that resume drops.
                with failed_writes(run_dir / METRICS), open(run_dir / METRICS, "a") as f:
                    f.write(json.dumps(record) + "\n")
                saver.maybe_save(epoch, lambda: {
                    **_checkpoint(model, config, data, seed, epoch, record, best, selection),
                    "optimizer": optimizer.state_dict(), "scheduler": _scheduler_state(scheduler),
                    "rng": _rng_state(generator)}, final=epoch == config.epochs)
            log(f"seed {seed} epoch {epoch}/{config.epochs}: loss {record['loss']:.4f}, "
                f"train {record['train_acc']:.2f} %, val {percent(accs['val'])}, test {percent(accs['test'])}, "
                f"lr {lr:.3g}, {record['time']:.2f} s" + ("  * best" if improved else ""))
    finally:
        saver.flush_best()  # the selected weights are never lost, even when the run stops early
    if main:
        _plot_curves(history, run_dir / CURVES, log)
    return RunResult(run_dir, seed, best["epoch"], selection, best["val_acc"], best["test_acc"], config.epochs,
                     history)


def _split_accuracy(model: BMFN, clips, rows: np.ndarray, device: torch.device, config: TrainConfig,
                    predict) -> float | None:
    """Segment accuracy on `rows`, each rank predicting its share (under torchrun); None, not NaN, for a split
    without clips: metrics.jsonl stays strict JSON."""
    if not len(rows):
        return None
    preds, targets = predict_rows(model, clips, rank_share(np.sort(rows)), device, config.eval_batch_size,
                                  config.precision, predict)
    correct, segments = summed([float((preds == targets).sum()), float(targets.size)], device)
    return 100.0 * correct / segments  # as evaluate.segment_accuracy: pooled over every clip and second


class EpochSums:
    """An epoch's running totals, kept on the device and added to in place by every step, so that no step waits
    for the GPU and a CUDA-graph replay updates them: the loss times clips, correct segments, clips, segments,
    steps, and the first step whose loss was not finite, with that loss (training stops after the epoch)."""

    NAMES = ("loss", "correct", "clips", "segments", "steps", "bad_step", "bad_loss")

    def __init__(self, device: torch.device) -> None:
        self.values = torch.zeros(len(self.NAMES), dtype=torch.float64, device=device)

    def reset(self) -> None:
        self.values.zero_()

    def add(self, loss: torch.Tensor, correct: torch.Tensor, clips: int, segments: int) -> None:
        v, loss = self.values, loss.double()
        step = v[4] + 1
        first_bad = (v[5] == 0) & ~torch.isfinite(loss)
        self.values.copy_(torch.stack([v[0] + loss * clips, v[1] + correct, v[2] + clips, v[3] + segments, step,
                                       torch.where(first_bad, step, v[5]), torch.where(first_bad, loss, v[6])]))

    def totals(self) -> dict[str, float]:
        return dict(zip(self.NAMES, self.values.tolist()))

    def postfix(self) -> dict[str, str]:
        """This process's loss and accuracy so far, for its progress bar; none before its first clip (under torchrun
        a global batch smaller than the world leaves a rank without clips)."""
        totals = self.totals()
        if not totals["clips"]:
            return {}
        return {"loss": f"{totals['loss'] / totals['clips']:.4f}",
                "acc": f"{100 * totals['correct'] / totals['segments']:.1f}"}


class _Saver:
    """Writes last.pt after the run's first epoch, then at most every `every` seconds and at the end, and best.pt
    along with it; the newest selected epoch's checkpoint waits in memory, its weights as a copy on the training
    device. The first write makes a run stopped early resumable: without a last.pt, --resume starts from epoch 1,
    and the new run's best.pt would replace the stopped run's."""

    def __init__(self, run_dir: Path, every: float, enabled: bool) -> None:
        self.run_dir, self.every, self.enabled = run_dir, every, enabled
        self.best: dict | None = None
        self.saved_epoch = 0
        self.last_time = time.monotonic()

    def keep_best(self, state: dict) -> None:
        self.best = state

    def flush_best(self) -> None:
        if self.enabled and self.best is not None:
            _save(_on_cpu(self.best), self.run_dir / BEST)
            self.best = None

    def maybe_save(self, epoch: int, state, final: bool) -> None:
        if not self.enabled or not (final or not self.saved_epoch or time.monotonic() - self.last_time >= self.every):
            return
        self.flush_best()  # before last.pt: a resumed run never names a best epoch that has no best.pt
        _save(_on_cpu(state()), self.run_dir / LAST)
        self.saved_epoch, self.last_time = epoch, time.monotonic()


def _checkpoint(model: BMFN, config: TrainConfig, data: FeatureData, seed: int, epoch: int, record: dict,
                best: dict, selection: str) -> dict:
    """Only tensors, dicts, lists, strings and numbers, so torch.load(weights_only=True) opens it. The weights are
    a copy on the model's device (cheap on a GPU); _on_cpu moves them when the checkpoint is written."""
    return {"format": CHECKPOINT_FORMAT, "bmfn_version": __version__, "epoch": epoch, "seed": seed,
            "model_state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "model_config": asdict(model.config), "class_names": list(CLASS_NAMES),
            "provenance": json.loads(json.dumps(data.provenance)),
            "data": {**data.source, "split_rule": data.split_rule}, "train_config": config.to_dict(),
            "metrics": record, "best": best, "selected_on": selection}


def _on_cpu(state):
    if isinstance(state, torch.Tensor):
        return state.cpu()
    if isinstance(state, dict):
        return {k: _on_cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_on_cpu(v) for v in state)
    return state


def _prepare_optimizer(optimizer: torch.optim.Optimizer, graphs: bool, device: torch.device) -> None:
    """A loaded state keeps the saving run's settings; make them this run's. On CUDA, Adam is fused (one kernel
    for all parameters instead of a dozen per tensor group: a graphed BMFN step on an H200 went from 12.9 to
    10.8 ms) and keeps its step counts on the device; a captured step also reads the learning rate from a device
    tensor, which MultiStepLR fills in place."""
    fused = device.type == "cuda"
    for group in optimizer.param_groups:
        lr = float(group["lr"])
        group["lr"] = torch.tensor(lr, device=device) if graphs else lr
        group["capturable"], group["fused"] = graphs, fused
    for parameter, state in optimizer.state.items():
        if "step" in state:
            state["step"] = state["step"].to(device if graphs or fused else "cpu", torch.float32)
        for key, value in list(state.items()):  # Adam's moments in their parameter's layout, which fused Adam requires
            if (key != "step" and isinstance(value, torch.Tensor) and value.shape == parameter.shape
                    and value.stride() != parameter.stride()):
                state[key] = torch.empty_like(parameter).copy_(value)  # a last.pt of bmfn before 8f94c53


def _save(state: dict, path: Path) -> None:
    """Written beside and renamed into place: a kill or a full disk mid-save keeps the previous file."""
    with written(path) as tmp:
        torch.save(state, tmp)


def _load_state(path: Path, device, mmap: bool = False) -> dict:
    if not path.is_file():
        raise BmfnError(f"{path}: no such checkpoint")
    state = read_torch_file(path, "bmfn checkpoint", device=device, mmap=mmap)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise BmfnError(f"{path}: not a bmfn checkpoint (format {CHECKPOINT_FORMAT} expected)")
    return state


def _scheduler_state(scheduler) -> dict:
    state = scheduler.state_dict()
    return {**state, "milestones": dict(state["milestones"])}  # a Counter is not weights_only-loadable


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _rng_state(generator: torch.Generator) -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(), "shuffle": generator.get_state(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
             "python": [version, list(internal), gauss_next]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["shuffle"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------- run plumbing


def _new_run_dir(config: TrainConfig) -> Path:
    if config.out:
        out = Path(config.out)
        if (out / LAST).is_file() or (out / RUN_FILE).is_file():
            raise BmfnError(f"{out}: already holds a run; continue it with --resume {out} or choose another --out")
        return out
    stem = Path(config.runs_dir) / f"{config.mode}-{time.strftime('%Y%m%d-%H%M%S')}"
    out, n = stem, 1
    while out.exists():
        n += 1
        out = stem.with_name(f"{stem.name}-{n}")
    return out


def _remove_unfinished_writes(run_dir: Path) -> None:
    """Remove what a run killed while writing left of its files (`last.pt.tmp`, as large as last.pt): under the run's
    lock no other process writes them, and each is written anew as a whole. One that cannot be removed stays: the
    run's own writes say what is wrong with its folder, if anything."""
    names = {f"{name}.tmp" for name in (BEST, LAST, METRICS, CURVES, RUN_FILE, SUMMARY)}
    for tmp in [*run_dir.glob("*.tmp"), *run_dir.glob("seed-*/*.tmp")]:
        if tmp.name in names:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)


def _resume_config(given: TrainConfig) -> tuple[TrainConfig, Path]:
    """The interrupted run's own configuration; only epochs and how it runs (device, precision, progress, CUDA
    graphs, checkpoint interval) may change, RESUME_SETTINGS not given stay the run's, and FIXED_ON_RESUME given
    otherwise are refused."""
    run_dir = Path(given.resume)
    if not (run_dir / RUN_FILE).is_file():
        raise BmfnError(f"{run_dir}: no {RUN_FILE}; not a bmfn run directory")
    saved = json.loads((run_dir / RUN_FILE).read_text())["config"]
    saved["milestones"] = tuple(saved["milestones"])
    changed = {name: getattr(given, name) for name in RESUME_SETTINGS if getattr(given, name) is not None}
    config = TrainConfig(**{**saved, **changed, "resume": str(run_dir), "device": given.device,
                            "progress": given.progress, "force": given.force, "command": given.command})
    if given.out is not None and Path(given.out).resolve() != run_dir.resolve():
        raise BmfnError(f"{run_dir}: a resumed run goes on in its own folder, not --out {given.out}")
    unset = TrainConfig()  # a field at its default was not given
    for name in FIXED_ON_RESUME:
        value, own = getattr(given, name), getattr(config, name)
        if value != getattr(unset, name) and (differing := _differs(name, value, own, config)):
            option, own, value = differing
            option = f"--{option.replace('_', '-')}" if option in CLI_FIXED else option  # else the API's field
            raise BmfnError(f"{run_dir}: a resumed run keeps its own {option} "
                            f"({'none' if own is None else own}), not {value}; train a new run for another")
    for seed in range(config.seed, config.seed + config.seeds):  # fewer epochs than done would train none
        last = (run_dir if config.seeds == 1 else run_dir / f"seed-{seed}") / LAST
        done = _load_state(last, "cpu", mmap=True)["epoch"] if last.is_file() else 0
        if config.epochs < done:
            raise BmfnError(f"{last}: {done} epochs are done, more than --epochs {config.epochs}; resume with "
                            f"--epochs {done + 1} or more to train on")
    return config.resolved(), run_dir  # resolved: a run.json of a bmfn before RUN_DEFAULTS may lack one


def _differs(name: str, given, own, config: TrainConfig) -> tuple[str, object, object] | None:
    """(the setting, the run's value, the value given) where a FIXED_ON_RESUME value given differs from the run's in
    what it does: paths as the files they name, each model override as the run's network has it; else None."""
    if name in ("ave_dir", "features", "annotations", "splits"):
        return None if own is not None and Path(given).resolve() == Path(own).resolve() else (name, own, given)
    if name == "model":
        network = BMFNConfig(mode=config.mode or "fully", **own)
        return next(((key, getattr(network, key), value) for key, value in given.items()
                     if getattr(network, key) != value), None)
    return None if given == own else (name, own, given)


def _record_resume_settings(run_dir: Path, config: TrainConfig) -> None:
    """Write RESUME_SETTINGS changed on resume (e.g. more --epochs) to run.json: a later plain --resume, after a
    kill, goes on with them instead of the run's first ones."""
    run = json.loads((run_dir / RUN_FILE).read_text())
    settings = {name: getattr(config, name) for name in RESUME_SETTINGS}
    if any(run["config"].get(name) != value for name, value in settings.items()):
        run["config"].update(settings)
        _write_json(run_dir / RUN_FILE, run)


def _write_json(path: Path, value: dict) -> None:
    _write_text(path, json.dumps(value, indent=2))


def _write_text(path: Path, text: str) -> None:
    """Written beside and renamed into place: a kill or a full disk mid-write keeps the previous file."""
    with written(path) as tmp:
        tmp.write_text(text)


def _load_config_data(config: TrainConfig, log) -> FeatureData:
    sources = {"ave_dir": config.ave_dir, "features": config.features}
    if not any(sources.values()):
        sources = find_default_data(".")
        log(f"no data named: using {next(iter(sources.values()))} found in the current folder")
    return load_data(**sources, annotations=config.annotations, splits=config.splits,
                     include_noisy=config.include_noisy and config.mode == "weakly", progress=config.progress)


def _check_same_data_on_every_rank(data: FeatureData) -> None:
    """Under torchrun each rank loads the data itself; ranks that read different clips (a store that `bmfn extract`
    was still writing) would wait for each other's batches for ever: all of them stop with one line instead."""
    digest = hashlib.sha1("\n".join(data.clip_ids).encode("utf-8", "surrogateescape"))
    for name in sorted(data.splits):
        digest.update(f"\n{name}:".encode() + np.asarray(data.splits[name], np.int64).tobytes())
    counts = gathered((digest.hexdigest(), len(data.clip_ids)))
    if len({value for value, _ in counts}) > 1:
        raise BmfnError(f"{data.source['path']}: the ranks read different clips or splits ("
                        f"{', '.join(str(n) for _, n in counts)} clips on ranks 0-{len(counts) - 1}): it changed "
                        "while they read it (is `bmfn extract` still writing to it?); train once it no longer does")


def _with_video_classes(data: FeatureData, log) -> FeatureData:
    """Weak targets are video classes, never background (bmfn-reference.md section 9). Labels without an event
    second and without the class (an empty interval in labels.h5 without mil_labels.h5, or in a store labelled by
    a bmfn that kept no video classes) give none: such clips are left out of weak training, where background would
    be a wrong target."""
    rows = data.splits["train"]
    known = to_numpy(data.clips.video_labels)[rows].any(axis=-1)
    if known.all():
        return data
    log(f"note: {int((~known).sum())} training clips have no event second in their labels, hence no video class: "
        "weakly supervised training leaves them out (--annotations Annotations.txt gives their classes)")
    return replace(data, splits={**data.splits, "train": rows[known]})


def _no_background_note(data: FeatureData) -> str:
    """What weak training lacks without the AVE release's 178 background-only clips, and where they would be."""
    where = (f"beside {data.source['path']} ({NOISY_VISUAL_FILE} and {NOISY_AUDIO_FILE})"
             if data.source["kind"] == "ave-dir" else
             "in a feature store (the AVE release's 178 come with its folder, --ave-dir)")
    return (f"note: no background-only clips {where}: unlike the official weakly supervised training, no training "
            "video has background as its target")


def _api_command(config: TrainConfig) -> str:
    return f"# python API ({shlex.join(sys.argv)}): train({config!r})"


def _read_metrics(path: Path, keep_through: int) -> list[dict]:
    """Metric lines of finished epochs; lines past `keep_through` (written before a kill) are dropped, a torn one
    (a kill or a full disk during the append) included."""
    if not path.is_file():
        return []
    kept, dropped = [], False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            beyond = record["epoch"] > keep_through
        except (ValueError, TypeError, KeyError) as err:
            beyond = keep_through == 0 or bool(kept) and kept[-1]["epoch"] >= keep_through  # all kept ones read
            if not beyond:
                raise BmfnError(f"{path}: line {number} is not a metrics record ({err}); it holds one of the epochs "
                                f"up to {keep_through} that resuming keeps") from None
        if beyond:
            dropped = True
        else:
            kept.append(record)
    if dropped:
        _write_text(path, "".join(json.dumps(line) + "\n" for line in kept))
    return kept


def _plot_curves(history: list[dict], path: Path, log) -> None:
    """The loss and accuracy curves as a PNG; one that cannot be written is said in a line, the run goes on."""
    if not history:
        return
    from matplotlib.figure import Figure  # not pyplot: a notebook's backend and figures stay as they were

    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(11, 4))
    left, right = fig.subplots(1, 2)
    left.plot(epochs, [h["loss"] for h in history])
    left.set_xlabel("epoch")
    left.set_ylabel("training loss")
    for key in ("train_acc", "val_acc", "test_acc"):
        values = [h.get(key) for h in history]
        if any(v is not None for v in values):  # None: a split without clips
            right.plot(epochs, [math.nan if v is None else v for v in values], label=key.replace("_acc", ""))
    right.set_xlabel("epoch")
    right.set_ylabel("segment accuracy (%)")
    right.legend()
    fig.tight_layout()
    try:
        with written(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    except WriteError as exc:
        log(f"warning: {exc}: no training curves")


def _dotted(mapping: dict, key: str):
    for part in key.split("."):
        if not isinstance(mapping, dict) or part not in mapping:
            return None
        mapping = mapping[part]
    return mapping
