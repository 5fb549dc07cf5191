"""Extraction speed: VGG-19 frames/s against a naive baseline measured in the same run, then clips/s end to end.

    python benchmarks/extract.py [VIDEO ...] [--device cpu|cuda] [--frames 48] [--frames-per-second 16]
    python benchmarks/extract.py --frames 64 --batch-sizes 64 16 4 --skip-end-to-end
    python benchmarks/extract.py --device cuda --video-decoder cuda --repeat-clips 16 --skip-visual

Baseline: one frame at a time, float32, default memory format (what a straightforward port does).
Candidates: batched float32, batched channels_last, batched channels_last + bf16 autocast (on GPUs also with
cudnn.benchmark, and torch.compile with --compile), and on CPUs int8 (extractors/int8.py); their pool5 maps'
cosine distance to float32's is reported (the features must stay within 1e-2).
End to end: `extract()` over the clips (decode workers + networks + store), with where the time goes.
Weights are seeded random ones: speed does not depend on their values.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bmfn_pipeline.cli import keep_freed_memory  # noqa: E402
from bmfn_pipeline.decode import decode_clip, decode_many  # noqa: E402
from bmfn_pipeline.extract import (ExtractOptions, decode_workers, extract, find_videos, load_extractors,  # noqa: E402
                                   video_decoder_on)
from extractors.int8 import quantize_int8  # noqa: E402
from extractors.vgg19 import caffe_preprocess, vgg19_pool5_random  # noqa: E402
from extractors.vggish_input import with_examples  # noqa: E402

SHARED_VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "media" / "video"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int = 2) -> tuple[float, torch.Tensor]:
    """Best wall time of `repeats` runs after one warm-up (the warm-up pays for autotuning and allocation)."""
    out = fn()
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best, out


def visual_benchmark(frames: np.ndarray, device: torch.device, batch: int, compile_network: bool = False) -> None:
    net = vgg19_pool5_random(0).to(device).eval()
    x = caffe_preprocess(frames).to(device)
    n = len(x)

    @torch.inference_mode()
    def one_at_a_time():
        return torch.cat([net(x[i : i + 1]) for i in range(n)])

    @torch.inference_mode()
    def batched(model, inputs, bf16=False):
        outs = []
        for i in range(0, n, batch):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                outs.append(model(inputs[i : i + batch]).float())
        return torch.cat(outs)

    base_t, base = _timed(one_at_a_time, device, repeats=1)
    print(f"visual, {n} frames on {device}:")
    print(f"  baseline  one frame, float32          {n / base_t:8.1f} frames/s   1.00x")
    results = {"batched float32": (lambda: batched(net, x))}
    net_cl = vgg19_pool5_random(0).to(device, memory_format=torch.channels_last).eval()
    x_cl = x.contiguous(memory_format=torch.channels_last)
    results["batched channels_last"] = lambda: batched(net_cl, x_cl)
    results["batched channels_last + bf16"] = lambda: batched(net_cl, x_cl, bf16=True)
    if device.type == "cuda":  # cuDNN times its algorithms for each input shape on first use, then keeps the best

        def autotuned():
            torch.backends.cudnn.benchmark = True
            try:
                return batched(net_cl, x_cl, bf16=True)
            finally:
                torch.backends.cudnn.benchmark = False

        results["... + cudnn.benchmark"] = autotuned
    if compile_network:
        compiled = torch.compile(net_cl)
        batched(compiled, x_cl, bf16=True)  # compiling is start-up, not speed
        results["... + torch.compile"] = lambda: batched(compiled, x_cl, bf16=True)
    if device.type == "cpu":
        quantized = quantize_int8(net, caffe_preprocess)  # calibration is start-up (and cached by the tool)
        results["batched channels_last int8"] = lambda: batched(quantized, x_cl)
    for name, fn in results.items():
        t, out = _timed(fn, device, repeats=1)
        cos = torch.nn.functional.cosine_similarity(out.flatten(1), base.flatten(1), dim=1)
        print(f"  {name:36s} {n / t:8.1f} frames/s {base_t / t:6.2f}x   cosine distance to float32:"
              f" mean {float((1 - cos).mean()):.2e} max {float((1 - cos).max()):.2e}")
    return quantized if device.type == "cpu" else net_cl, x_cl


def batch_size_benchmark(net: torch.nn.Module, x: torch.Tensor, device: torch.device, sizes: list[int],
                         rounds: int = 3) -> None:
    """Frames/s of the fastest candidate (int8 on a CPU, bf16 on a GPU) at each batch size, against the first size.
    The sizes take turns, `rounds` times, and each keeps its best round: machines shared with others are noisy."""
    bf16 = device.type == "cuda"

    @torch.inference_mode()
    def run(batch):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return [net(x[i : i + batch]) for i in range(0, len(x), batch)]

    best = {size: _timed(lambda: run(size), device, repeats=1)[0] for size in sizes}
    for _ in range(rounds - 1):
        for size in sizes:
            best[size] = min(best[size], _timed(lambda: run(size), device, repeats=1)[0])
    print(f"batch sizes, {'int8' if device.type == 'cpu' else 'channels_last + bf16'}, {len(x)} frames, "
          f"best of {rounds} rounds:")
    for size in sizes:
        print(f"  {size:4d} frames a batch {len(x) / best[size]:8.1f} frames/s {best[sizes[0]] / best[size]:6.2f}x")


def end_to_end(paths: list[Path], options: ExtractOptions, device: torch.device, serial_clips: int) -> None:
    visual, audio = load_extractors(options, device)
    decode_t = visual_t = audio_t = 0.0
    serial_paths = paths[:serial_clips]
    # The stages as extract() splits them: decoding and log-mel examples (in the workers), then the two networks.
    prepare = functools.partial(with_examples, alignment=options.alignment)
    decode = functools.partial(decode_clip, frames_per_second=options.frames_per_second,
                               video_decoder=video_decoder_on(options.video_decoder, device))
    clip, examples = prepare(decode(paths[0]))
    visual.segments(clip.frames), audio.embed(examples)  # compile, autotune
    for path in serial_paths:
        start = time.perf_counter()
        clip, examples = prepare(decode(path))
        decode_t += time.perf_counter() - start
        start = time.perf_counter()
        visual.segments(clip.frames)
        _sync(device)
        visual_t += time.perf_counter() - start
        start = time.perf_counter()
        audio.embed(examples)
        _sync(device)
        audio_t += time.perf_counter() - start
    serial = decode_t + visual_t + audio_t
    print(f"end to end, {len(paths)} clips at {options.frames_per_second} frames/s, precision {options.precision}, "
          f"{options.video_decoder} video decoder:")
    print(f"  serial stages over {len(serial_paths)} clips: decode + log-mel {decode_t:.2f} s, VGG-19 {visual_t:.2f} s,"
          f" VGGish {audio_t:.2f} s = {len(serial_paths) / serial:.2f} clips/s")
    serial *= len(paths) / len(serial_paths)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        finished: list[float] = []
        summary = extract(paths, Path(tmp) / "feats.h5", options, progress=False,
                          on_clip=lambda _: finished.append(time.perf_counter()))
        total = time.perf_counter() - start
    workers = decode_workers(options.workers, torch.device(options.device))
    print(f"  extract() with {workers} decode worker(s): {total:.2f} s = {len(summary.done) / total:.2f} clips/s"
          f" ({serial / total:.2f}x the serial stages; includes loading the networks and writing the store)")
    if len(finished) > 2:  # after the networks are loaded and the workers have started
        steady = (len(finished) - 1) / (finished[-1] - finished[0])
        networks_per_clip = (visual_t + audio_t) / len(serial_paths)
        print(f"  steady state, first to last clip: {steady:.2f} clips/s; "
              f"start-up until the first clip {finished[0] - start:.2f} s")
        print(f"  {device.type} busy with the networks {100 * min(1.0, networks_per_clip * steady):.0f} % of the "
              f"steady state ({1000 * networks_per_clip:.0f} ms per clip); the rest it waits for decoded clips")
    # The ceiling the decode workers set: the same decoding and log-mel framing, with no networks; with a GPU video
    # decoder, the CPU decoder's ceiling too, as the baseline.
    ceilings = {}
    for decoder in dict.fromkeys(["cpu", video_decoder_on(options.video_decoder, device)]):
        arrivals = [time.perf_counter() for _ in decode_many(paths, seconds=options.seconds, workers=workers,
                                                              frames_per_second=options.frames_per_second,
                                                              prepare=prepare, video_decoder=decoder)]
        if len(arrivals) > 2:
            ceilings[decoder] = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
            print(f"  decoding alone, {decoder} video decoder, {workers} worker(s), steady state: "
                  f"{ceilings[decoder]:.2f} clips/s ({ceilings[decoder] / ceilings['cpu']:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("videos", nargs="*", type=Path, default=[SHARED_VIDEOS])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--frames", type=int, default=32, help="frames for the visual benchmark")
    parser.add_argument("--batch", type=int, default=16, help="frames per batch for the batched candidates")
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[],
                        help="then time the fastest candidate at each of these batch sizes (the first is the baseline)")
    parser.add_argument("--frames-per-second", type=int, default=16)
    parser.add_argument("--workers", type=int, default=None, help="default: as `bmfn extract` chooses")
    parser.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--video-decoder", default="cpu", choices=["cpu", "cuda", "nvcodec"],
                        help="as `bmfn extract --video-decoder`; decoding alone is timed with the CPU decoder too")
    parser.add_argument("--repeat-clips", type=int, default=1, help="process the clip list this many times")
    parser.add_argument("--skip-visual", action="store_true")
    parser.add_argument("--skip-end-to-end", action="store_true")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd VGG-19 (bmfn extract --compile)")
    args = parser.parse_args()
    keep_freed_memory()  # as the bmfn executable runs

    device = torch.device(args.device)
    paths = find_videos(args.videos)
    if not paths:
        sys.exit(f"no videos in {args.videos}")
    if not args.skip_visual:
        clip = decode_clip(paths[0], frames_per_second=16)
        frames = clip.frames.reshape(-1, *clip.frames.shape[2:])[: args.frames]
        fastest, x = visual_benchmark(frames, device, args.batch, args.compile)
        if args.batch_sizes:
            batch_size_benchmark(fastest, x, device, args.batch_sizes)
    if args.skip_end_to_end:
        return
    options = ExtractOptions(frames_per_second=args.frames_per_second, random_seed=0, device=str(device),
                             precision=args.precision, workers=args.workers, compile=args.compile,
                             video_decoder=args.video_decoder)
    with tempfile.TemporaryDirectory() as tmp:
        if args.repeat_clips > 1:  # distinct names, so each copy is a clip of its own in the store
            copies = []
            for k in range(args.repeat_clips):
                for path in paths:
                    link = Path(tmp) / f"{path.stem}_{k}{path.suffix}"
                    link.symlink_to(path.resolve())
                    copies.append(link)
            paths = copies
        end_to_end(paths, options, device, serial_clips=len(find_videos(args.videos)))


if __name__ == "__main__":
    main()
