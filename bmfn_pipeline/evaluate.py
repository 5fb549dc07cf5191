"""Segment accuracy (bmfn-reference.md section 6), per-class accuracy, confusion matrix, and `bmfn evaluate`."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from bmfn_pipeline import ave
from bmfn_pipeline.data import ClipArrays, FeatureData, batches, load_data
from bmfn_pipeline.errors import BmfnError, WriteError, check_counts, counted, written

EVAL_BATCH_SIZE = 16  # the official test batch size (bmfn-reference.md section 7), used on CPUs
# On GPUs: in eval mode every clip's output is independent of its batch (ESA's BatchNorm uses running statistics),
# so a larger batch changes no result, only the number of launches; 256 clips need about 6 GB.
GPU_EVAL_BATCH_SIZE = 256
CLASS_NAMES = (*ave.CATEGORIES, "background")
# float32: IEEE float32 throughout; tf32: float32 tensors, matmuls on TF32 tensor cores (10-bit mantissa products,
# float32 sums; float32 on CPUs); bfloat16: autocast (bmfn-reference.md 13(c)).
PRECISIONS = ("float32", "tf32", "bfloat16")


def to_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def segment_accuracy(pred, target) -> float:
    """Percentage of segments whose label (0..28, 28 = background) is right, pooled over all videos and segments."""
    pred, target = to_numpy(pred), to_numpy(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from target shape {target.shape}")
    if target.size == 0:
        return float("nan")
    return 100.0 * float((pred == target).sum()) / target.size


def confusion_matrix(pred, target, num_classes: int = ave.NUM_CLASSES) -> np.ndarray:
    """Counts [num_classes, num_classes] of segments: row = true class, column = predicted class."""
    pred, target = to_numpy(pred).ravel().astype(np.int64), to_numpy(target).ravel().astype(np.int64)
    return np.bincount(target * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def per_class_accuracy(pred, target, num_classes: int = ave.NUM_CLASSES) -> np.ndarray:
    """Percentage of each true class's segments predicted right (recall); NaN for classes with no segment."""
    matrix = confusion_matrix(pred, target, num_classes)
    totals = matrix.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, 100.0 * np.diag(matrix) / totals, np.nan)


def plot_confusion(matrix: np.ndarray, path: str | Path, class_names=CLASS_NAMES, title: str = "") -> Path:
    """A row-normalised confusion matrix as PNG (rows: true class, columns: predicted)."""
    from matplotlib.figure import Figure  # not pyplot: a notebook's backend and figures stay as they were

    rows = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, rows, out=np.zeros(matrix.shape), where=rows > 0)
    fig = Figure(figsize=(11, 10))
    axis = fig.subplots()
    image = axis.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    axis.set_xticks(range(len(class_names)), class_names, rotation=90, fontsize=7)
    axis.set_yticks(range(len(class_names)), class_names, fontsize=7)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(title)
    fig.colorbar(image, ax=axis, fraction=0.046, label="share of the true class's segments")
    fig.tight_layout()
    path = Path(path)
    with written(path) as tmp:  # an earlier plot stays whole if this one cannot be written
        fig.savefig(tmp, dpi=100, format="png")
    return path


def eval_batch_size(device: torch.device, requested: int | None = None) -> int:
    """The requested evaluation batch, else EVAL_BATCH_SIZE on CPUs and GPU_EVAL_BATCH_SIZE on GPUs."""
    if requested is not None:
        return requested
    return EVAL_BATCH_SIZE if device.type == "cpu" else GPU_EVAL_BATCH_SIZE


@contextmanager
def compute_precision(device: torch.device, precision: str):
    """Runs the body in one of PRECISIONS. The autocast cache is off: it may not outlive a CUDA-graph capture,
    and BMFN uses each weight once per call."""
    if precision not in PRECISIONS:
        raise BmfnError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    matmul = torch.get_float32_matmul_precision()
    if precision == "tf32" and device.type == "cuda":  # on CPUs "high" could mean bf16 products: stay float32
        torch.set_float32_matmul_precision("high")
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16", cache_enabled=False):
            yield
    finally:
        torch.set_float32_matmul_precision(matmul)


def precision_note(device: torch.device, precision: str) -> str | None:
    """A line for a precision that means something else on `device`: TF32 is a mode of CUDA's matmuls only."""
    if precision == "tf32" and device.type != "cuda":
        return f"note: tf32 is a CUDA matmul mode: on the {device.type.upper()} this computes in float32"
    return None


def predict_labels(model: torch.nn.Module, inputs: dict[str, torch.Tensor], device: torch.device,
                   precision: str = "float32") -> torch.Tensor:
    """Segment labels [B,10] of a batch's visual and audio features, in the model's current mode."""
    from bmfn_pipeline.model import predict_segments

    with compute_precision(device, precision):
        return predict_segments(model(inputs["visual"], inputs["audio"]))


@torch.no_grad()
def predict_rows(model: torch.nn.Module, clips: ClipArrays, rows: np.ndarray, device: torch.device,
                 batch_size: int | None = None, precision: str = "float32",
                 predict: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Predicted and true segment labels [len(rows),10] for the given rows, in sorted row order. `predict` maps a
    batch's {"visual", "audio"} to its labels (train passes predict_labels replayed as a CUDA graph: evaluating
    val and test after each epoch is otherwise bound by kernel launches); default: predict_labels."""
    model.eval()
    predict = predict or (lambda inputs: predict_labels(model, inputs, device, precision))
    preds, targets = [], []
    for batch in batches([(clips, np.sort(rows))], eval_batch_size(device, batch_size), device):
        preds.append(predict({"visual": batch["visual"], "audio": batch["audio"]}).cpu())
        targets.append(batch["labels"].argmax(-1).cpu())
    if not preds:
        return np.zeros((0, ave.SEGMENTS), np.int64), np.zeros((0, ave.SEGMENTS), np.int64)
    return torch.cat(preds).numpy(), torch.cat(targets).numpy()


@dataclass
class EvalResult:
    """What `bmfn evaluate` reports; `to_dict()` is its --json output."""

    checkpoint: str
    split: str
    data: str
    clips: int
    segments: int
    accuracy: float  # percent, bmfn-reference.md section 6
    per_class: dict[str, float]  # percent per true class (NaN: no segment of that class)
    confusion: list[list[int]]  # [29,29], row = true, column = predicted
    confusion_png: str | None
    forced: list[str] = field(default_factory=list)  # how the features differ from the checkpoint's (--force)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["per_class"] = {k: (None if np.isnan(v) else v) for k, v in self.per_class.items()}
        return out

    def summary(self) -> str:
        counts = f"{counted(self.clips, 'clip')}, {counted(self.segments, 'segment')}"
        lines = [f"{self.split} segment accuracy: {self.accuracy:.2f} % ({counts})",
                 f"checkpoint: {self.checkpoint}", f"data: {self.data}", "per class:"]
        scored = {name: acc for name, acc in self.per_class.items() if not np.isnan(acc)}
        lines += [f"  {name:<32} {acc:6.2f}" for name, acc in scored.items()]
        if len(scored) < len(self.per_class):
            unscored = len(self.per_class) - len(scored)
            lines.append(f"  ({unscored} {'class has' if unscored == 1 else 'classes have'} no {self.split} segments)")
        if self.confusion_png:
            lines.append(f"confusion matrix: {self.confusion_png}")
        lines += [f"features made differently (--force): {difference}" for difference in self.forced]
        return "\n".join(lines)


def evaluate(checkpoint: str | Path | None = None, *, split: str = "test", ave_dir: str | Path | None = None,
             features: str | Path | None = None, annotations: str | Path | None = None,
             splits: str | Path | None = None, batch_size: int | None = None, device: str = "auto",
             precision: str | None = None, force: bool = False, plot: bool = True,
             runs_dir: str | Path = "runs", data: FeatureData | None = None,
             log: Callable[[str], None] = lambda message: None) -> EvalResult:
    """Accuracy of a checkpoint (a file or a run folder; default: the newest run's best.pt) on a split of its
    training data or other data; with `plot`, a confusion-matrix PNG beside the checkpoint where that folder can be
    written (else said through `log`), named after the data where it is not the checkpoint's own. `precision`
    defaults to the run's, in which its recorded accuracies were computed; the run's own data (named or not) keeps
    its annotations and splits unless others are given."""
    from bmfn_pipeline.train import check_provenance, load_checkpoint, resolve_checkpoint, resolve_device

    if split not in ("train", "val", "test"):
        raise BmfnError(f"split {split!r}: use train, val or test")
    check_counts("evaluate", batch_size=batch_size)
    checkpoint = resolve_checkpoint(checkpoint, runs_dir)
    torch_device = resolve_device(device)
    model, meta = load_checkpoint(checkpoint, device=torch_device)
    trained_on = meta["data"]
    precision = precision or meta.get("train_config", {}).get("precision") or "float32"  # as its accuracies were
    if data is None:
        if ave_dir is None and features is None:
            ave_dir, features = (trained_on["path"], None) if trained_on["kind"] == "ave-dir" else \
                (None, trained_on["path"])
        if Path(ave_dir or features).resolve() == Path(trained_on.get("path") or "").resolve():  # the run's data:
            annotations = annotations or trained_on.get("annotations")  # its labels and splits, unless given
            splits = splits or trained_on.get("splits")
        data = load_data(ave_dir=ave_dir, features=features, annotations=annotations, splits=splits,
                         include_noisy=False)
    model.config.check_inputs(f"{data.source['path']}: features that {checkpoint} does not take",
                              (1, *data.clips.visual.shape[1:]), (1, *data.clips.audio.shape[1:]))
    forced = check_provenance(meta["provenance"], data.provenance, force=force, what=data.source["path"])
    for difference in forced:
        log(f"warning: --force: {difference}")
    rows = data.splits[split]
    if len(rows) == 0:
        raise BmfnError(f"{data.source['path']}: the {split} split is empty ({data.split_rule})")
    if note := precision_note(torch_device, precision):
        log(note)
    pred, target = predict_rows(model, data.clips, rows, torch_device, batch_size, precision)
    matrix = confusion_matrix(pred, target)
    png = None
    if plot:
        try:
            source = Path(data.source["path"]).resolve()
            own = source == Path(trained_on.get("path") or "").resolve()
            # other data: its name and a digest of its path (two folders called ave/ would share one file)
            other = f"-on-{source.stem}-{hashlib.sha1(str(source).encode()).hexdigest()[:6]}"
            name = f"confusion-{checkpoint.stem}-{split}{'' if own else other}.png"
            png = str(plot_confusion(matrix, checkpoint.parent / name, title=f"{checkpoint} on {split}"))
        except WriteError as err:  # beside a read-only checkpoint, say: the accuracy still counts
            log(f"warning: {err.path}: the confusion matrix was not written ({err.reason})")
    names = meta.get("class_names", CLASS_NAMES)
    return EvalResult(str(checkpoint), split, data.describe(), len(rows), int(target.size),
                      segment_accuracy(pred, target),
                      {name: float(acc) for name, acc in zip(names, per_class_accuracy(pred, target))},
                      matrix.tolist(), png, forced)
