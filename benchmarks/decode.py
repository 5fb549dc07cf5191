"""Clips per second of decode_clip against a naive decoder, on the real clips, in the same run.

The naive decoder decodes every frame to full-resolution RGB and keeps them all, then picks and resizes; its audio
goes through the same path as decode_clip, so the ratio measures the streaming frame selection. With
--video-decoders cpu cuda nvcodec, decode_clip runs once per video decoder; the CPU seconds per clip (this process,
all its threads) say how many clips/s a machine's decoding workers can reach with each, and nvcodec's line says how
many clips it left to the CPU decoder (decode._nvcodec_frames) and whether its frames equal the CPU decoder's.

    python benchmarks/decode.py [VIDEO_DIR] [--repeats N] [--video-decoders cpu cuda nvcodec] [--threads 8]
"""

from __future__ import annotations

import argparse
import functools
import resource
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import av
import cv2
import numpy as np

from bmfn_pipeline import nvcodec
from bmfn_pipeline.decode import (FRAME_SIZE, VIDEO_DECODERS, _decode_audio, _open, decode_clip, probe,
                                  segment_frame_indices, video_hwaccel)

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "shared" / "media" / "video"


def naive_decode(path: Path, frames_per_second: int = 16) -> tuple[np.ndarray, np.ndarray]:
    info = probe(path)
    with av.open(str(path)) as container:
        stream = next(s for s in container.streams.video if s.index == info.video_index)
        every = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    frames = np.stack([
        np.stack([cv2.resize(every[min(i, len(every) - 1)], (FRAME_SIZE, FRAME_SIZE), interpolation=cv2.INTER_LINEAR)
                  for i in segment_frame_indices(info, segment, frames_per_second=frames_per_second)])
        for segment in range(info.segments)])
    with _open(path) as container:
        audio = _decode_audio(path, container, info)
    return frames, audio


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def clips_per_second(decode, clips: list[Path], repeats: int) -> tuple[float, float]:
    """(clips/s, CPU seconds per clip)."""
    start, cpu = time.perf_counter(), cpu_seconds()
    for _ in range(repeats):
        for clip in clips:
            decode(clip)
    count = repeats * len(clips)
    return count / (time.perf_counter() - start), (cpu_seconds() - cpu) / count


def decode_frames_only(path: Path, decoder: str, seconds: float = 10.0) -> int:
    """Frames decoded from the first `seconds` of the file, each left as the decoder gives it."""
    frames, device = 0, nvcodec.device_of(decoder)
    if device is not None:  # the library's own decoder, kept per thread; every frame of the file
        return sum(1 for _ in nvcodec.frames(str(path), device))
    with _open(path, video_hwaccel(decoder)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        for frame in container.decode(stream):
            if frame.time is not None and frame.time >= seconds:
                break
            frames += 1
    return frames


def decoding_ceiling(decoder: str, clips: list[Path], threads: int, repeats: int) -> str:
    work = clips * repeats
    decode_frames_only(clips[0], decoder)  # warm up: a GPU's context
    start, cpu = time.perf_counter(), cpu_seconds()
    with ThreadPoolExecutor(threads) as pool:
        frames = sum(pool.map(functools.partial(decode_frames_only, decoder=decoder), work))
    wall = time.perf_counter() - start
    return (f"  decoding alone, {decoder}, {threads} threads: {len(work) / wall:.1f} files/s, {frames / wall:.0f} "
            f"frames/s, {(cpu_seconds() - cpu) / len(work):.3f} CPU s per file")


def nvcodec_report(clips: list[Path], decoder: str) -> str:
    """How many clips nvcodec decoded itself, and whether their frames are the CPU decoder's, with its notes."""
    own, same, notes = 0, 0, []
    for clip in clips:
        gpu, cpu = decode_clip(clip, video_decoder=decoder), decode_clip(clip)
        note = next((w for w in gpu.warnings if "not by nvcodec" in w), None)
        own += note is None
        same += np.array_equal(gpu.frames, cpu.frames)
        notes += [note] if note else []
    return f"nvcodec decoded {own} of {len(clips)} clips; frames equal to the CPU decoder's in {same}" + "".join(
        f"\n    {note}" for note in notes)


def positive(text: str) -> int:
    """argparse's type for a count of at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number of at least 1")
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("video_dir", nargs="?", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--repeats", type=positive, default=1)
    parser.add_argument("--video-decoders", nargs="+", default=["cpu"], choices=VIDEO_DECODERS)
    parser.add_argument("--threads", type=int, default=0, help="then time decoding alone in this many threads")
    args = parser.parse_args()
    if not args.video_dir.is_dir():
        parser.error(f"{args.video_dir}: no such folder (give a folder of videos; the default is ../shared's)")
    clips = sorted(p for p in args.video_dir.iterdir() if p.is_file())
    if not clips:
        parser.error(f"{args.video_dir}: no files in it")
    decode_clip(clips[0], frames_per_second=2)  # warm up: the resampling filter bank, page cache
    naive, naive_cpu = clips_per_second(naive_decode, clips, args.repeats)
    print(f"{len(clips)} clips x {args.repeats}: naive {naive:.2f} clips/s, {naive_cpu:.2f} CPU s per clip")
    for decoder in args.video_decoders:
        decode = functools.partial(decode_clip, video_decoder=decoder)
        decode(clips[0], frames_per_second=2)  # warm up: a GPU's context
        fast, fast_cpu = clips_per_second(decode, clips, args.repeats)
        print(f"  decode_clip, {decoder} video decoder: {fast:.2f} clips/s ({fast / naive:.2f}x), "
              f"{fast_cpu:.2f} CPU s per clip ({naive_cpu / fast_cpu:.2f}x less)")
        if decoder.startswith("nvcodec"):
            print("   ", nvcodec_report(clips, decoder))
    for decoder in args.video_decoders if args.threads else []:
        print(decoding_ceiling(decoder, clips, args.threads, max(args.repeats, 3)))


if __name__ == "__main__":
    main()
