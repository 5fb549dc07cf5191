"""`bmfn train` speed on AVE-sized data resident on the device: seconds per epoch (training plus val and test
evaluation, as `train` runs it) for the eager step against whole-step CUDA graphs, in float32, tf32 and bf16,
measured in the same run; then, with --full, a complete 200-epoch run timed from the call to its return, and
where the time outside its epochs goes (set-up, between epochs, after the last; checkpoint writes and curves).

    python benchmarks/train.py                    # CUDA: eager vs graphs, 4 epochs each
    python benchmarks/train.py --full tf32        # ... and a full 200-epoch run in tf32
    python benchmarks/train.py --compile --full bfloat16 --full-compile   # with torch.compile variants
    python benchmarks/train.py --device cpu --clips 64 --epochs 1
    python benchmarks/train.py --device cpu --clips 32 --eval-clips 16 --full float32 --full-only --full-epochs 3

The features are random (float16, like a bmfn store): speed does not depend on their values.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time

import numpy as np
import torch

from bmfn_pipeline import ave, train as train_module
from bmfn_pipeline.data import ClipArrays, FeatureData
from bmfn_pipeline.train import REFERENCE, TrainConfig, train

AVE_SPLITS = {"train": 3339, "val": 402, "test": 402}  # bmfn-reference.md section 9


def make_data(clips_per_split: dict[str, int], device: torch.device) -> FeatureData:
    total = sum(clips_per_split.values())
    generator = torch.Generator(device=device).manual_seed(0)
    visual = torch.rand(total, ave.SEGMENTS, 7, 7, 512, device=device, generator=generator, dtype=torch.float16)
    audio = torch.rand(total, ave.SEGMENTS, 128, device=device, generator=generator)
    rng = np.random.default_rng(0)
    labels = np.zeros((total, ave.SEGMENTS, ave.NUM_CLASSES), np.float32)
    for i in range(total):
        start, end = sorted(rng.choice(ave.SEGMENTS + 1, 2, replace=False))
        labels[i, :, ave.BACKGROUND] = 1
        labels[i, start:end, ave.BACKGROUND], labels[i, start:end, rng.integers(ave.BACKGROUND)] = 0, 1
    video = labels.max(axis=1)
    bounds = np.cumsum([0, *clips_per_split.values()])
    splits = {name: np.arange(bounds[i], bounds[i + 1]) for i, name in enumerate(clips_per_split)}
    clips = ClipArrays(visual, audio, torch.from_numpy(labels).to(device), torch.from_numpy(video).to(device))
    return FeatureData(clips, [f"clip{i}" for i in range(total)], splits, "benchmark", {"benchmark": True},
                       {"kind": "benchmark", "path": "random", "annotations": None, "splits": None})


class Outside:
    """Where a run's time outside its epochs goes, by wrapping three of train()'s steps while it runs: each epoch's
    batches (an epoch's start), checkpoint writes and the curves."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.saving = self.curves = 0.0

    @contextlib.contextmanager
    def watching(self):
        original = train_module.batches, train_module._save, train_module._plot_curves

        def batches(*args, **kwargs):
            self.starts.append(time.perf_counter())
            return original[0](*args, **kwargs)

        def timed(name, step):
            def call(*args, **kwargs):
                began = time.perf_counter()
                try:
                    return step(*args, **kwargs)
                finally:
                    setattr(self, name, getattr(self, name) + time.perf_counter() - began)
            return call

        train_module.batches, train_module._save, train_module._plot_curves = \
            batches, timed("saving", original[1]), timed("curves", original[2])
        try:
            yield self
        finally:
            train_module.batches, train_module._save, train_module._plot_curves = original

    def line(self, called: float, returned: float, times: list[float]) -> str:
        """Set-up (the call to the first epoch), between epochs and after the last: they sum to the wall time with
        the epochs' own."""
        between = sum(b - a - t for a, b, t in zip(self.starts, self.starts[1:], times))
        return (f"outside the epochs: set-up {self.starts[0] - called:.1f} s, between epochs {between:.1f} s, after the "
                f"last {returned - self.starts[-1] - times[-1]:.1f} s; of these, checkpoint writes {self.saving:.1f} s "
                f"and curves {self.curves:.1f} s")


def run(data: FeatureData, device: torch.device, epochs: int, precision: str, graphs: bool,
        checkpoint_every: float, compiled: bool = False, outside: Outside | None = None) -> tuple[list[float], float]:
    """Per-epoch seconds as train() records them, and the call's wall time; with `outside`, a line on the rest."""
    with tempfile.TemporaryDirectory() as out, outside.watching() if outside else contextlib.nullcontext():
        config = TrainConfig(out=f"{out}/run", epochs=epochs, device=device.type, precision=precision,
                             cuda_graphs=graphs, compile=compiled, checkpoint_every=checkpoint_every, progress=False)
        began = time.perf_counter()
        result = train(config, data=data, log=lambda line: line.startswith("warning") and print(line))
        returned = time.perf_counter()
    times = [h["time"] for h in result.runs[0].history]
    if outside:
        print(outside.line(began, returned, times))
    return times, returned - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--epochs", type=int, default=4, help="epochs per variant (the first includes capture)")
    parser.add_argument("--clips", type=int, default=None, help="training clips (default: AVE's 3339)")
    parser.add_argument("--eval-clips", type=int, default=None, help="val and test clips each (default: AVE's 402)")
    parser.add_argument("--every-epoch", action="store_true",
                        help="first the eager step writing last.pt after every epoch (before checkpoint intervals)")
    parser.add_argument("--compile", action="store_true",
                        help="also with the network compiled (train --compile), in tf32 and bf16")
    parser.add_argument("--full", choices=["float32", "tf32", "bfloat16"], default=None,
                        help="then train the reference 200 epochs with CUDA graphs in this precision")
    parser.add_argument("--full-compile", action="store_true", help="... with train --compile")
    parser.add_argument("--full-only", action="store_true", help="only the full run, without the comparison")
    parser.add_argument("--full-epochs", type=int, default=REFERENCE["fully"].epochs,
                        help="epochs of the full run (the reference 200; fewer to try the script on a CPU)")
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    sizes = dict(AVE_SPLITS, **({"train": args.clips} if args.clips else {}),
                 **({"val": args.eval_clips, "test": args.eval_clips} if args.eval_clips else {}))
    data = make_data(sizes, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; {sizes} clips, batch {REFERENCE['fully'].batch_size}, fully supervised")
    # (label, precision, CUDA graphs, checkpoint interval, compiled)
    variants = [("eager, last.pt every epoch", "float32", False, 0.0, False)] if args.every_epoch else []
    variants += [("eager", "float32", False, 60.0, False)]
    if device.type == "cuda":
        variants += [("cuda graphs", precision, True, 60.0, False) for precision in ("float32", "tf32", "bfloat16")]
    if args.compile:
        graphs = device.type == "cuda"
        variants += [(f"{'cuda graphs + ' if graphs else ''}compiled", precision, graphs, 60.0, True)
                     for precision in ("tf32", "bfloat16")]
    base = None
    for label, precision, graphs, every, compiled in [] if args.full and args.full_only else variants:
        times, wall = run(data, device, args.epochs, precision, graphs, every, compiled)
        steady = statistics.median(times[1:]) if len(times) > 1 else times[0]
        base = base or steady
        print(f"{label:>36} {precision:>8}: first epoch {times[0]:6.2f} s, then {steady:6.3f} s/epoch "
              f"({base / steady:5.1f}x), 200 epochs ~ {times[0] + 199 * steady:7.1f} s", flush=True)
    if args.full:
        times, wall = run(data, device, args.full_epochs, args.full, True, 60.0, args.full_compile, Outside())
        how = f"{'cuda graphs ' if device.type == 'cuda' else ''}{args.full}{', compiled' if args.full_compile else ''}"
        print(f"full run, {how}: {len(times)} epochs in {wall:.1f} s from the call: the first epoch {times[0]:.1f} s "
              f"({'compiling, captures' if device.type == 'cuda' or args.full_compile else 'warming up'}), the others "
              f"{sum(times[1:]):.1f} s (median {statistics.median(times):.3f} s), outside the epochs "
              f"{wall - sum(times):.1f} s (set-up, checkpoints, curves)")


if __name__ == "__main__":
    main()
