"""Clips per second of decode_clip against a naive decoder, on the real clips, in the same run.

The naive decoder decodes every frame to full-resolution RGB and keeps them all, then picks and resizes; its audio
goes through the same path as decode_clip, so the ratio measures the streaming frame selection.

    python benchmarks/decode.py [VIDEO_DIR] [--repeats N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import av
import cv2
import numpy as np

from bmfn_pipeline.decode import FRAME_SIZE, _decode_audio, _open, decode_clip, probe, segment_frame_indices

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


def clips_per_second(decode, clips: list[Path], repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        for clip in clips:
            decode(clip)
    return repeats * len(clips) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("video_dir", nargs="?", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    clips = sorted(p for p in args.video_dir.iterdir() if p.is_file())
    decode_clip(clips[0], frames_per_second=2)  # warm up: the resampling filter bank, page cache
    fast = clips_per_second(decode_clip, clips, args.repeats)
    naive = clips_per_second(naive_decode, clips, args.repeats)
    print(f"{len(clips)} clips x {args.repeats}: decode_clip {fast:.2f} clips/s, naive {naive:.2f} clips/s, "
          f"ratio {fast / naive:.2f}x")


if __name__ == "__main__":
    main()
