"""A synthetic audio-visual event dataset in the AVE file layout, for ``bmfn demo`` on a machine with no downloads.

Each class is a visible object (shape + colour) and a sound (a tone pattern or noise band) that together make an
audio-visual event; the classes borrow AVE category names so the whole pipeline stays on the AVE 29-way label
space. A clip has one event interval [start, end) of whole seconds. The other seconds are background of three
kinds, each present in every clip: the sound without the object, the object without the sound, and neither. So
video alone cannot tell an event from a silent object, and audio alone cannot tell it from an unseen sound.
Background texture, colour noise, a neutral distractor shape, random positions, a noise floor and hum vary
from clip to clip so that the classes are not told apart by anything but the object and the sound.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

from .ave import ANNOTATIONS_FILE, LIST_FILE, SEGMENTS, SPLITS, AnnotationRow
from .decode import SAMPLE_RATE
from .errors import BmfnError

VIDEO_DIR = "videos"
SPLIT_FILES = {name: LIST_FILE.format(name) for name in SPLITS}  # the dataset zip's split lists
QUALITY = "good"  # AVE's Quality field
VIDEO_CODEC = "libx264"
VIDEO_OPTIONS = {"preset": "ultrafast", "crf": "18"}  # fast, and near-lossless so the colours survive
AUDIO_CODEC = "aac"
AUDIO_BITRATE = 48_000
AUDIO_CHUNK = 1024  # samples per encoded AAC frame
DEFAULT_SIZE = (160, 120)  # width, height; decode resizes to 224 x 224 anyway
DEFAULT_FPS = 8
MIN_EVENT_S = 2
BACKGROUND_KINDS = ("sound only", "object only", "neither")
# Fractions of the clips in the val and test splits (the rest is train), stratified by class.
VAL_FRACTION = 0.15
TEST_FRACTION = 0.15

# Video nuisances.
OBJECT_RADIUS = 0.2  # of the frame height
OBJECT_DRIFT_PX = 4.0  # amplitude of the object's slow wobble
TEXTURE_CELLS = 8  # coarse random colour field, upsampled: blotchy background texture
TEXTURE_STD = 12.0  # clipped at 2 std: channels differ by under 50, far from any class colour's spread
FRAME_NOISE_STD = 6.0  # per-pixel colour noise, fresh each frame
BACKGROUND_GREY = (60, 190)  # range of the background's mean grey level
# Audio nuisances.
EVENT_AMPLITUDE = (0.2, 0.4)
NOISE_FLOOR_STD = (0.003, 0.02)
HUM_HZ = (50.0, 120.0)  # below every class band
HUM_AMPLITUDE = (0.0, 0.03)
RAMP_S = 0.01  # fade at each second's edge so gating a sound on and off does not click


@dataclass(frozen=True)
class SyntheticClass:
    """One event class: the AVE category it borrows, what is seen, and the band where its sound's energy lies."""

    category: str
    shape: str  # 'triangle' | 'square' | 'circle' | 'diamond'
    colour: tuple[int, int, int]  # RGB, saturated so that no grey background pixel comes near it
    band_hz: tuple[float, float]  # where the sound's main energy lies
    sound: Callable[[np.ndarray, tuple[float, float], np.random.Generator], np.ndarray]  # (t, band_hz, rng) -> wave


@dataclass(frozen=True)
class SyntheticClip:
    """One clip, its annotation row, and which seconds are heard and seen (the truth behind the labels)."""

    path: Path
    row: AnnotationRow
    audible: tuple[bool, ...]
    visible: tuple[bool, ...]

    @property
    def label(self) -> int:
        return self.row.label


@dataclass(frozen=True)
class SyntheticDataset:
    root: Path
    clips: list[SyntheticClip]
    splits: dict[str, list[int]]  # split name -> clip indices (= annotation row indices)

    @property
    def video_dir(self) -> Path:
        return self.root / VIDEO_DIR

    @property
    def annotations(self) -> Path:
        return self.root / ANNOTATIONS_FILE

    @property
    def rows(self) -> list[AnnotationRow]:
        return [clip.row for clip in self.clips]

    @property
    def paths(self) -> list[Path]:
        return [clip.path for clip in self.clips]


def make_dataset(out_dir: str | os.PathLike, n_clips: int, *, seed: int = 0, seconds: int = SEGMENTS,
                 size: tuple[int, int] = DEFAULT_SIZE, fps: int = DEFAULT_FPS) -> SyntheticDataset:
    """Write ``n_clips`` clips to ``out_dir/videos``, plus ``Annotations.txt`` and the three split lists.

    Clip i depends only on (seed, i), so a larger dataset with the same seed starts with the same clips.
    """
    if n_clips < len(SPLITS):
        raise BmfnError(f"{out_dir}: need at least {len(SPLITS)} synthetic clips (one per split), got {n_clips}")
    if not MIN_EVENT_S + len(BACKGROUND_KINDS) <= seconds <= SEGMENTS:
        raise BmfnError(f"{out_dir}: synthetic clips need {MIN_EVENT_S + len(BACKGROUND_KINDS)} to {SEGMENTS} "
                        f"seconds, got {seconds}")
    width, height = size
    if width % 2 or height % 2 or min(size) < 32:
        raise BmfnError(f"{out_dir}: frame size must be even and at least 32 pixels a side, got {width}x{height}")
    root = Path(out_dir)
    (root / VIDEO_DIR).mkdir(parents=True, exist_ok=True)
    clips = [_make_clip(root / VIDEO_DIR, i, np.random.default_rng([seed, i]), seconds, size, fps)
             for i in range(n_clips)]
    splits = _split(clips, np.random.default_rng([seed, n_clips]))
    _write_rows(root / ANNOTATIONS_FILE, [clip.row for clip in clips])
    for name, indices in splits.items():
        _write_rows(root / SPLIT_FILES[name], [clips[i].row for i in indices])
    return SyntheticDataset(root, clips, splits)


def _write_rows(path: Path, rows: list[AnnotationRow]) -> None:
    """AVE's ``Category&VideoID&Quality&Start&End`` lines, no header (as in the AVE-ECCV18 git copy)."""
    path.write_text("".join(f"{r.category}&{r.video_id}&{r.quality}&{r.start}&{r.end}\n" for r in rows),
                    encoding="utf-8")


def _split(clips: list[SyntheticClip], rng: np.random.Generator) -> dict[str, list[int]]:
    """Stratified split: clips shuffled within each class, then dealt a class at a time (classes in random order)
    into test, val and train."""
    by_class: dict[int, list[int]] = {}
    for i, clip in enumerate(clips):
        by_class.setdefault(clip.label, []).append(i)
    queues = [list(rng.permutation(by_class[label])) for label in rng.permutation(sorted(by_class))]
    dealt = [int(queue.pop()) for _ in range(max(map(len, queues))) for queue in queues if queue]
    n_test = max(1, round(TEST_FRACTION * len(clips)))
    n_val = max(1, round(VAL_FRACTION * len(clips)))
    return {"train": sorted(dealt[n_test + n_val:]), "val": sorted(dealt[n_test:n_test + n_val]),
            "test": sorted(dealt[:n_test])}


def _make_clip(directory: Path, index: int, rng: np.random.Generator, seconds: int, size: tuple[int, int],
               fps: int) -> SyntheticClip:
    cls = CLASSES[index % len(CLASSES)]
    length = int(rng.integers(MIN_EVENT_S, seconds - len(BACKGROUND_KINDS) + 1))
    start = int(rng.integers(0, seconds - length + 1))
    # Every background kind at least once, the remaining background seconds drawn at random.
    background = [t for t in range(seconds) if not start <= t < start + length]
    kinds = list(BACKGROUND_KINDS) + list(rng.choice(BACKGROUND_KINDS, len(background) - len(BACKGROUND_KINDS)))
    kind_of = dict(zip(background, rng.permutation(kinds)))
    audible = tuple(kind_of.get(t, "event") in ("event", "sound only") for t in range(seconds))
    visible = tuple(kind_of.get(t, "event") in ("event", "object only") for t in range(seconds))

    video_id = f"synthetic_{index:05d}"
    path = directory / f"{video_id}.mp4"
    frames = _frames(cls, visible, rng, size, fps)
    audio = _audio(cls, audible, rng)
    _encode(path, frames, audio, fps)
    row = AnnotationRow(cls.category, video_id, QUALITY, start, start + length)
    return SyntheticClip(path, row, audible, visible)


# Video ----------------------------------------------------------------------------------------------------------
def _shape_mask(shape: str, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.2 * r
    if shape == "triangle":  # apex up
        return (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    raise ValueError(f"unknown shape {shape!r}")


def _frames(cls: SyntheticClass, visible: tuple[bool, ...], rng: np.random.Generator, size: tuple[int, int],
            fps: int) -> np.ndarray:
    """uint8 [seconds * fps, H, W, 3]: textured grey background, a grey distractor, the object when visible."""
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    grey = rng.uniform(*BACKGROUND_GREY)
    cells = np.clip(rng.normal(0.0, TEXTURE_STD, (TEXTURE_CELLS, TEXTURE_CELLS, 3)), -2 * TEXTURE_STD,
                    2 * TEXTURE_STD).astype(np.float32)
    background = grey + cv2.resize(cells, (width, height), interpolation=cv2.INTER_CUBIC)
    # A neutral distractor, lighter or darker than the background, wandering across the frame all clip long.
    distractor_grey = grey + rng.choice([-1, 1]) * rng.uniform(40, 60)
    distractor_shape = str(rng.choice(["circle", "square"]))
    distractor_r = rng.uniform(0.08, 0.15) * height
    path_start, path_end = rng.uniform([0, 0], [width, height], (2, 2))

    r = OBJECT_RADIUS * height
    cx0, cy0 = rng.uniform([r + OBJECT_DRIFT_PX, r + OBJECT_DRIFT_PX],
                           [width - r - OBJECT_DRIFT_PX, height - r - OBJECT_DRIFT_PX])
    wobble_hz, phase = rng.uniform(0.2, 0.6), rng.uniform(0, 2 * np.pi)

    n = len(visible) * fps
    frames = np.empty((n, height, width, 3), np.uint8)
    for k in range(n):
        t = k / fps
        frame = background + FRAME_NOISE_STD * rng.standard_normal((height, width, 3), dtype=np.float32)
        dx, dy = path_start + (path_end - path_start) * (k / n)
        frame[_shape_mask(distractor_shape, xx, yy, dx, dy, distractor_r)] = distractor_grey
        if visible[k // fps]:
            cx = cx0 + OBJECT_DRIFT_PX * np.sin(2 * np.pi * wobble_hz * t + phase)
            cy = cy0 + OBJECT_DRIFT_PX * np.cos(2 * np.pi * wobble_hz * t + phase)
            frame[_shape_mask(cls.shape, xx, yy, cx, cy, r)] = cls.colour
        frames[k] = np.clip(frame, 0, 255)
    return frames


# Audio ----------------------------------------------------------------------------------------------------------
def _decay_train(t: np.ndarray, rate_hz: float, tau_s: float) -> np.ndarray:
    """Strikes at `rate_hz` (the first at t = 0), each decaying with time constant tau."""
    return np.exp(-np.mod(t, 1.0 / rate_hz) / tau_s)


def _band_noise(n: int, band_hz: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1.0 / SAMPLE_RATE)
    spectrum[(freqs < band_hz[0]) | (freqs > band_hz[1])] = 0
    noise = np.fft.irfft(spectrum, n)
    return noise / (np.abs(noise).max() + 1e-9)


def _church_bell(t: np.ndarray, band_hz: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """Inharmonic bell partials on the band centre, struck twice a second."""
    f0 = np.mean(band_hz)
    partials = sum(a * np.sin(2 * np.pi * f0 * ratio * t) for ratio, a in ((1.0, 1.0), (2.5, 0.4), (3.76, 0.25)))
    return partials * _decay_train(t, 2.0, 0.25)


def _bark(t: np.ndarray, band_hz: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """Short bursts of noise filling the band, four a second."""
    gate = (np.mod(t, 0.25) < 0.12).astype(np.float64)
    return _band_noise(len(t), band_hz, rng) * gate


def _flute(t: np.ndarray, band_hz: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """A steady tone on the band centre with 5 Hz vibrato inside the band, and a soft octave."""
    depth_hz, rate_hz = 0.3 * (band_hz[1] - band_hz[0]) / 2, 5.0
    phase = 2 * np.pi * np.mean(band_hz) * t + (depth_hz / rate_hz) * np.sin(2 * np.pi * rate_hz * t)
    return np.sin(phase) + 0.2 * np.sin(2 * phase)


def _plucked(t: np.ndarray, band_hz: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """A harmonic tone with its fundamental on the band centre, plucked three times a second."""
    f0 = np.mean(band_hz)
    tone = sum(a * np.sin(2 * np.pi * f0 * h * t) for h, a in ((1, 1.0), (2, 0.5), (3, 0.3)))
    return tone * _decay_train(t, 3.0, 0.12)


CLASSES: tuple[SyntheticClass, ...] = (
    SyntheticClass("Church bell", "triangle", (235, 200, 30), (650.0, 750.0), _church_bell),
    SyntheticClass("Bark", "square", (220, 40, 40), (1000.0, 1600.0), _bark),
    SyntheticClass("Flute", "circle", (40, 90, 230), (1950.0, 2050.0), _flute),
    SyntheticClass("Acoustic guitar", "diamond", (30, 200, 60), (200.0, 240.0), _plucked),
)


def _audio(cls: SyntheticClass, audible: tuple[bool, ...], rng: np.random.Generator) -> np.ndarray:
    """float32 16 kHz mono: the class sound in the audible seconds over a noise floor and mains-like hum."""
    n = len(audible) * SAMPLE_RATE
    t = np.arange(n) / SAMPLE_RATE
    sound = cls.sound(t, cls.band_hz, rng)
    sound = sound / (np.abs(sound).max() + 1e-9) * rng.uniform(*EVENT_AMPLITUDE)
    ramp = np.clip(np.minimum(np.mod(t, 1.0), 1.0 - np.mod(t, 1.0)) / RAMP_S, 0.0, 1.0)
    gate = np.repeat(np.asarray(audible, np.float64), SAMPLE_RATE) * ramp
    hum = rng.uniform(*HUM_AMPLITUDE) * np.sin(2 * np.pi * rng.uniform(*HUM_HZ) * t)
    noise = rng.normal(0.0, rng.uniform(*NOISE_FLOOR_STD), n)
    return np.clip(sound * gate + hum + noise, -1.0, 1.0).astype(np.float32)


# Encoding -------------------------------------------------------------------------------------------------------
def _encode(path: Path, frames: np.ndarray, audio: np.ndarray, fps: int) -> None:
    """H.264 + AAC in MP4, one keyframe a second so that seeking to any second is cheap."""
    with av.open(str(path), "w") as container:
        video = container.add_stream(VIDEO_CODEC, rate=fps)
        video.width, video.height = frames.shape[2], frames.shape[1]
        video.pix_fmt = "yuv420p"
        video.gop_size = fps
        video.options = VIDEO_OPTIONS
        sound = container.add_stream(AUDIO_CODEC, rate=SAMPLE_RATE, layout="mono")
        sound.bit_rate = AUDIO_BITRATE
        for second in range(len(audio) // SAMPLE_RATE):  # one second of each stream at a time: interleaved
            for k in range(second * fps, (second + 1) * fps):
                frame = av.VideoFrame.from_ndarray(frames[k], format="rgb24")
                frame.pts, frame.time_base = k, Fraction(1, fps)
                container.mux(video.encode(frame))
            for offset in range(second * SAMPLE_RATE, (second + 1) * SAMPLE_RATE, AUDIO_CHUNK):
                chunk = audio[None, offset:min(offset + AUDIO_CHUNK, (second + 1) * SAMPLE_RATE)]
                frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
                frame.sample_rate, frame.pts, frame.time_base = SAMPLE_RATE, offset, Fraction(1, SAMPLE_RATE)
                container.mux(sound.encode(frame))
        container.mux(video.encode())
        container.mux(sound.encode())
