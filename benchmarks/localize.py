"""Localization speed: seconds from command to labels for one 10-second clip, split into decode, visual, audio, model.

    python benchmarks/localize.py [VIDEO] [--frames-per-second 16] [--device cpu cuda] [--threads 2] [--repeats 2]
    python benchmarks/localize.py --device cpu --precision auto int8
    python benchmarks/localize.py --device cuda --video-decoders cpu cuda
    python benchmarks/localize.py --device cpu --precision int8 --files 0 --weight-files ~/.cache/bmfn-bench-weights

Goals: under 10 s on 2 CPU cores at 16 frames/s; under 0.5 s on an H100. Reported per device:
- startup: importing torch and bmfn (once per command, measured for this process);
- setup: building BMFN (the full-size model) and the seeded random VGG-19 and VGGish, as a checkpoint load would;
- first: the first clip through `Localizer.run` (pays one-off costs: cuDNN autotuning, allocation); as `bmfn localize`
  does, the first configuration reads it in a process of its own while torch is imported (`--read-first in-turn`:
  not), so its decode time is only the wait for that read;
- warm: the best of `--repeats` further runs, what each further file of a command costs;
- several files: one call on `--files` copies, per file, decoding files ahead in threads against one at a time.
"command to labels" = startup + setup + first. Weights are seeded random ones: speed does not depend on their values.
With --weight-files DIR they are written once into DIR as files of the real layouts and sizes (torchvision's VGG-19
with its classifier, torchvggish's VGGish), registered under their own checksums, and loaded as a user's files are:
verified, then read; otherwise setup makes them from their seed (VGGish's 72 M weights: ~0.35 s).
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bmfn_pipeline.decode import BackgroundRead  # noqa: E402

DEFAULT_CLIP = Path(__file__).resolve().parents[2] / "shared" / "media" / "video" / "ave_16eUxQwxxbs.mp4"  # 10.03 s
GOALS_S = {"cpu": 10.0, "cuda": 0.5}  # issue 5: 2 CPU cores at 16 frames/s; one H100


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("clip", nargs="?", type=Path, default=DEFAULT_CLIP)
    parser.add_argument("--frames-per-second", type=int, default=16)
    parser.add_argument("--device", nargs="+", help="default: cpu, and cuda where there is one")
    parser.add_argument("--threads", type=int, help="torch CPU threads (the CPU goal is for 2 cores)")
    parser.add_argument("--repeats", type=int, default=2, help="warm runs after the first (best is reported)")
    parser.add_argument("--files", type=int, default=4,
                        help="also time one call on this many copies of the clip, decoding ahead or not (0: skip)")
    parser.add_argument("--precision", nargs="+", default=["auto"], choices=["auto", "float32", "bfloat16", "int8"],
                        help="VGG-19 precisions to compare (int8 on CPUs only; its first run calibrates, later runs "
                             "load the cached model)")
    parser.add_argument("--video-decoders", nargs="+", default=["cpu"], choices=["cpu", "cuda"],
                        help="video decoders to compare on a CUDA device (`bmfn localize --video-decoder`)")
    parser.add_argument("--read-first", choices=["early", "in-turn"], default="early",
                        help="early: the first clip is read while torch is imported, as `bmfn localize` reads it "
                             "(the first configuration's first run takes that read); in-turn: when its turn comes")
    parser.add_argument("--weight-files", type=Path, metavar="DIR",
                        help="load the networks from weight files kept in DIR (written on first use), not from a seed")
    parser.add_argument("--malloc", choices=["keep", "default"], default="keep",
                        help="keep: glibc keeps freed memory for reuse, as the bmfn executable has it "
                             "(cli.keep_freed_memory); default: glibc's own settings")
    return parser.parse_args()


# Not in the reading process, which runs this script as its main module before it reads.
if __name__ == "__main__":
    ARGS = arguments()
    EARLY_READ = [BackgroundRead(ARGS.clip, frames_per_second=ARGS.frames_per_second)] \
        if ARGS.read_first == "early" else []

    import torch

    from bmfn_pipeline.cli import keep_freed_memory
    from bmfn_pipeline.extract import ExtractOptions, features_provenance, load_extractors
    from bmfn_pipeline.localize import Localizer
    from bmfn_pipeline.model import BMFN, BMFNConfig
    from extractors.vgg19 import vgg19_pool5_random
    from extractors.vggish import random_vggish
    from extractors.weights import WEIGHTS, file_checksum, uninitialised

    IMPORTED = time.perf_counter()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run(localizer: Localizer, clip: Path, started: list[BackgroundRead] | None = None) -> dict[str, float]:
    """One clip through the localizer: wall time and where it went."""
    localizer.timings = dict.fromkeys(localizer.timings, 0.0)
    _sync(localizer.device)
    began = time.perf_counter()
    [(_, result)] = list(localizer.run([clip], started=started or []))
    _sync(localizer.device)
    if isinstance(result, Exception):
        raise SystemExit(f"benchmark clip failed: {result}")
    timings = {"total": time.perf_counter() - began, **localizer.timings}
    timings["other"] = timings["total"] - sum(localizer.timings.values())
    return timings


def _several(localizer: Localizer, clip: Path, files: int, ahead: int) -> float:
    """Seconds per file of one `run` over `files` copies of the clip, decoding `ahead` files in advance."""
    localizer.decode_ahead = ahead
    _sync(localizer.device)
    began = time.perf_counter()
    outcomes = [result for _, result in localizer.run([clip] * files)]
    _sync(localizer.device)
    if any(isinstance(result, Exception) for result in outcomes):
        raise SystemExit(f"benchmark clip failed: {outcomes}")
    return (time.perf_counter() - began) / files


def _line(name: str, timings: dict[str, float]) -> str:
    parts = "  ".join(f"{key} {value:6.3f}" for key, value in timings.items() if key != "total")
    return f"  {name:<6} {timings['total']:7.3f} s   ({parts})"


def weight_files(folder: Path) -> dict[str, Path]:
    """Seeded random VGG-19 and VGGish in the layouts and sizes of torchvision's and torchvggish's files, written
    into `folder` once and registered (for this process) under their own SHA-256, as the real files are."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"vgg19-torchvision": folder / "vgg19-random.pth", "vggish": folder / "vggish-random.pth"}
    if not files["vgg19-torchvision"].is_file():
        state = {f"features.{key}": value for key, value in vgg19_pool5_random(0).state_dict().items()}
        generator = torch.Generator().manual_seed(0)
        for i, (n_in, n_out) in zip((0, 3, 6), ((25088, 4096), (4096, 4096), (4096, 1000))):  # the classifier
            state[f"classifier.{i}.weight"] = torch.randn(n_out, n_in, generator=generator) * 0.01
            state[f"classifier.{i}.bias"] = torch.zeros(n_out)
        torch.save(state, files["vgg19-torchvision"])
    if not files["vggish"].is_file():
        torch.save(random_vggish(0).state_dict(), files["vggish"])
    for name, path in files.items():
        WEIGHTS[name] = dataclasses.replace(WEIGHTS[name], checksum="sha256:" + file_checksum(path, "sha256"))
    return files


def benchmark(clip: Path, device: str, frames_per_second: int, repeats: int, precision: str = "auto",
              files: int = 0, weights: dict[str, Path] | None = None, video_decoder: str = "cpu") -> float:
    """Print the breakdown for one device and VGG-19 precision; return command-to-labels seconds."""
    torch_device = torch.device(device)
    began = time.perf_counter()
    if weights:
        given = {"vgg19_weights": str(weights["vgg19-torchvision"]), "vggish_weights": str(weights["vggish"])}
        options = ExtractOptions(frames_per_second=frames_per_second, visual_source="torchvision", **given)
    else:
        given, options = {}, ExtractOptions(frames_per_second=frames_per_second, random_seed=0)
    provenance = features_provenance(options, *load_extractors(options, torch.device("cpu")))
    provenance_s = time.perf_counter() - began  # not part of a real command: its checkpoint stores this
    began = time.perf_counter()
    model = uninitialised(lambda: BMFN(BMFNConfig()))  # as load_checkpoint builds it, before loading its weights
    localizer = Localizer(model, provenance, device=device, precision=precision, video_decoder=video_decoder, **given)
    _sync(torch_device)
    setup = time.perf_counter() - began
    first = _run(localizer, clip, EARLY_READ)
    EARLY_READ.clear()  # taken (or cancelled, if made for other settings)
    warm = min((_run(localizer, clip) for _ in range(repeats)), key=lambda t: t["total"], default=None)
    startup = IMPORTED - STARTED
    total = startup + setup + first["total"]
    name = torch.cuda.get_device_name(torch_device) if torch_device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    made = "weight files" if weights else "random weights made from a seed"
    print(f"{device} ({name}), VGG-19 {localizer.visual.precision}, {frames_per_second} frames/s, {clip.name}, "
          f"{made}, {video_decoder} video decoder")
    print(f"  startup {startup:6.3f} s   setup {setup:6.3f} s   (untimed: {provenance_s:.1f} s making the provenance)")
    print(_line("first", first))
    if warm is not None:
        print(_line("warm", warm))
    goal = GOALS_S.get(torch_device.type)
    verdict = "" if goal is None else f"   goal < {goal:g} s: {'met' if total < goal else 'NOT met'}"
    print(f"  command to labels {total:.3f} s{verdict}")
    if warm is not None and goal is not None:
        print(f"  per further clip  {warm['total']:.3f} s   goal < {goal:g} s: "
              f"{'met' if warm['total'] < goal else 'NOT met'}")
    if files > 1:
        ahead = localizer.decode_ahead
        serial, overlapped = _several(localizer, clip, files, 0), _several(localizer, clip, files, ahead)
        print(f"  {files} files in one call: {overlapped:.3f} s per file decoding {ahead} ahead, {serial:.3f} s "
              f"decoding each in its turn ({serial / overlapped:.2f}x)")
    return total


def main(args: argparse.Namespace) -> None:
    if args.malloc == "keep":
        keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    weights = weight_files(args.weight_files) if args.weight_files else None
    for device in args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]):
        base = None
        for precision in args.precision:
            for decoder in args.video_decoders:
                if (precision == "int8" and device != "cpu") or (decoder == "cuda" and device == "cpu"):
                    continue  # int8 runs on CPUs, NVDEC beside a GPU
                total = benchmark(args.clip, device, args.frames_per_second, args.repeats, precision, args.files,
                                  weights, decoder)
                base = base or total
                print(f"  {base / total:.2f}x the first precision's and decoder's command to labels")


if __name__ == "__main__":
    main(ARGS)
