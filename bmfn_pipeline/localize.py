"""Localization: video files -> per-second audio-visual event labels from a trained BMFN checkpoint.

Features are made exactly as the checkpoint's were (its stored provenance: visual source and weights, random
seeds included, frames per second, VGGish alignment); other weights are refused unless forced.

Videos of any length: BMFN sees 10 one-second segments at a time, so a longer video is cut into 10 s windows
every `stride` seconds (the last one ending at the video's end) and each second's probabilities are the mean over
the windows that contain it: the event probability sigmoid(event logit) is averaged, the class distribution
softmax(class logits) is averaged and its argmax is the class. A second is an event when its mean event
probability exceeds 0.5 (as model.predict_segments), labelled with that class; otherwise background (28). Its
`class_prob` is always the mean probability of the top class, so a background second still says which event it
most resembled and how strongly. A video of at most 10 seconds is one window, decoded and padded exactly as
`bmfn extract` does, and gets labels only for the seconds it has (decode.py decides how many: 5 for 5.3 s); its
frames are counted at AVE's indices where it is about 10 s long (9.5 to 10.5 s), as the training clips' were, so
its last seconds' frames may be up to half a second off their times (0.36 s early in a 9.64 s video). A last part
second is labelled where it is half a second or more; a shorter one is not, and a note says so (except at AVE's
indices, whose frames spread over the whole video).

Speed: a long video is decoded once, in chunks; VGG-19 runs once per second of video (its per-second maps do not
depend on the window); VGGish runs per window because the AVE framing (0.96 s hops) is relative to a window's
start; BMFN runs on batches of windows shared by all the files of one call, while the next files are decoded.
"""

from __future__ import annotations

import math
import numbers
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bmfn_pipeline.ave import BACKGROUND, SEGMENTS
from bmfn_pipeline.decode import (FRAME_SIZE, SAMPLE_RATE, BackgroundRead, ClipInfo, DecodedClip, decode_window,
                                  find_videos, read_for_labels, video_hwaccel)
from bmfn_pipeline.errors import BmfnError, check_counts
from bmfn_pipeline.evaluate import EVAL_BATCH_SIZE
from bmfn_pipeline.extract import (FRAMES_PER_SECOND, ExtractOptions, features_provenance, load_extractors,
                                   resolve_device, video_decoder_on)
from bmfn_pipeline.model import BMFN, EVENT_THRESHOLD
from bmfn_pipeline.train import RUNS_DIR, check_provenance, load_checkpoint, resolve_checkpoint
from bmfn_pipeline.writers import STRIP_HEIGHT_PX, LocalizationResult, SecondLabel, plot_timeline

WINDOW = SEGMENTS  # seconds BMFN sees at once: the 10 segments of an AVE clip (bmfn-reference.md)
DEFAULT_STRIDE = 5  # seconds between window starts: each second of a long video is judged in two contexts
# Files probed and (up to 10 s) decoded in threads ahead of the one being featurised: decoding overlaps VGG-19 on a
# CPU and keeps a GPU fed; PyAV, OpenCV and FFmpeg's decoder threads do their work outside the GIL.
DECODE_AHEAD = 2
# A last part second under half a second is not labelled (decode.py's rule); one this long or longer is said in a
# note (headers are off by hundredths: an AVE clip of 10.03 s says nothing).
UNLABELLED_NOTE_S = 0.1
CHUNK_SECONDS = 60  # seconds of a long video decoded at once: 60 x 16 frames x 150 kB bounds frames to ~150 MB
KEYFRAME_STEP = max(1, FRAME_SIZE // STRIP_HEIGHT_PX)  # keyframes kept for the plot at its strip's resolution
RANDOM_PREFIX = "random:"  # how a provenance records seeded random weights (extractors.weights.random_provenance)
WEIGHT_CHOICES = ("checkpoint", "pretrained", "random")


def check_stride(stride: int) -> None:
    if not isinstance(stride, numbers.Integral) or isinstance(stride, bool):  # windows start on whole seconds
        raise BmfnError(f"stride {stride!r}: expected a whole number of seconds, 1 to {WINDOW}")
    if not 1 <= stride <= WINDOW:
        raise BmfnError(f"stride {stride} s: expected 1 to {WINDOW} s (a longer one would leave seconds unlabelled)")


def window_starts(seconds: int, stride: int = DEFAULT_STRIDE) -> list[int]:
    """Start seconds of the windows covering `seconds` labelled seconds: every `stride` s, the last one ending
    at the end (so every second is covered and every window is whole); one window when the video fits in one."""
    check_stride(stride)
    if seconds <= WINDOW:
        return [0]
    starts = list(range(0, seconds - WINDOW + 1, stride))
    if starts[-1] != seconds - WINDOW:
        starts.append(seconds - WINDOW)
    return starts


def merge_windows(seconds: int, starts: list[int], event_probs: np.ndarray,
                  class_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-second event probabilities [seconds] and class distributions [seconds, C], each the mean over the
    windows covering that second. event_probs [W, WINDOW] per window second; class_probs [W, C] per window."""
    event = np.zeros(seconds)
    classes = np.zeros((seconds, class_probs.shape[-1]))
    count = np.zeros(seconds)
    for start, window_event, window_classes in zip(starts, event_probs, class_probs):
        span = slice(start, min(start + WINDOW, seconds))
        event[span] += window_event[: span.stop - start]
        classes[span] += window_classes
        count[span] += 1
    if not count.all():
        raise ValueError(f"windows {starts} leave seconds of 0..{seconds - 1} uncovered")
    return event / count, classes / count[:, None]


def label_seconds(event: np.ndarray, classes: np.ndarray, duration_s: float) -> list[SecondLabel]:
    """SecondLabels from merged probabilities (module docstring); the last second ends at the video's end."""
    top = classes.argmax(axis=1)
    labels = np.where(event > EVENT_THRESHOLD, top, BACKGROUND)
    return [SecondLabel(float(t), float(min(t + 1, duration_s)), int(labels[t]), float(event[t]),
                        float(classes[t, top[t]])) for t in range(len(event))]


def check_result_names(files: Iterable[str | os.PathLike]) -> None:
    """Result files are named after their video's stem: refuse, before any work, two videos that would share them."""
    named: dict[str, Path] = {}
    for file in map(Path, files):
        if named.setdefault(file.stem, file) != file:
            raise BmfnError(f"{named[file.stem]} and {file} would write result files of the same name; localize "
                            "them in separate calls or with separate output folders")


def timeline_path(plot_dir: str | os.PathLike, video: str | os.PathLike) -> Path:
    """Where `--plot` writes a video's timeline PNG (named after the video, like the result files)."""
    return Path(plot_dir) / f"{Path(video).stem}.png"


class PlotFailed(BmfnError):
    """A file whose labels were made but whose timeline plot was not: its error, holding the labels (`result`)."""

    def __init__(self, result: LocalizationResult, error: Exception) -> None:
        self.result = result
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        if not isinstance(error, BmfnError):
            reason = f"{result.path}: cannot draw the timeline plot ({type(error).__name__}: {reason})"
        super().__init__(f"{reason}; its labels were made")


@dataclass
class _Video:
    """One file between decoding and its last window's prediction."""

    path: Path
    duration_s: float
    seconds: int  # labelled seconds
    starts: list[int]
    visual: np.ndarray  # [max(seconds, WINDOW), 7, 7, 512] per-second mean pool5 maps
    audio: np.ndarray  # [windows, WINDOW, 128] VGGish embeddings per window
    warnings: list[str]
    keyframes: np.ndarray | None = None  # [seconds, h, w, 3] for the plot
    waveform: np.ndarray | None = None
    event: list[np.ndarray | None] = field(init=False)  # per window: [WINDOW] event probabilities
    classes: list[np.ndarray | None] = field(init=False)  # per window: [C] class distribution

    def __post_init__(self) -> None:
        self.event, self.classes = [None] * len(self.starts), [None] * len(self.starts)

    @property
    def done(self) -> bool:
        return all(e is not None for e in self.event)


class Localizer:
    """A loaded BMFN and the extractors matching its features; call `run` on any number of files."""

    def __init__(self, model: BMFN, provenance: dict, *, checkpoint: str = "", epoch: int | None = None,
                 stride: int = DEFAULT_STRIDE, device: str = "auto", batch_size: int = EVAL_BATCH_SIZE,
                 frames_per_second: int | None = None, weights: str = "checkpoint",
                 vgg19_weights: str | os.PathLike | None = None, vggish_weights: str | os.PathLike | None = None,
                 seed: int | None = None, precision: str = "auto", force: bool = False, video_decoder: str = "cpu",
                 log: Callable[[str], None] | None = None) -> None:
        self.log = log or (lambda message: None)
        self.device = resolve_device(device)
        self.video_decoder = video_decoder_on(video_decoder, self.device)
        video_hwaccel(self.video_decoder)  # no NVDEC here: one line now, before the networks load
        self.model = model.to(self.device).eval()
        check_stride(stride)
        check_counts("localize", batch_size=batch_size, frames_per_second=frames_per_second)
        self.stride = int(stride)  # a numpy integer would reach the JSON result as text
        self.batch_size = int(batch_size)
        self.checkpoint = checkpoint or "(model given in Python)"
        self.epoch = epoch
        self.trained = provenance
        self.options = self._options(frames_per_second, weights, vgg19_weights, vggish_weights, seed, precision,
                                     force)
        self.visual, self.audio = load_extractors(self.options, self.device)
        self.provenance = features_provenance(self.options, self.visual, self.audio)
        for difference in check_provenance(provenance, self.provenance, force=force,
                                           what=f"localize with {self.checkpoint}"):
            self.log(f"warning: --force: {difference}")
        if self.options.random_seed is not None:
            same = self.provenance["visual"].get("checksum") == (provenance or {}).get("visual", {}).get("checksum")
            self.log(f"using RANDOM network weights (seed {self.options.random_seed})"
                     + (" as the checkpoint's features were made" if same else "")
                     + ": labels are meaningful for tests and demos only")
        self.timings = {"decode": 0.0, "visual": 0.0, "audio": 0.0, "model": 0.0}  # seconds, summed over calls
        self.decode_ahead = DECODE_AHEAD
        # Called as VGG-19 gets through a file: (file, seconds done, seconds in all), e.g. for a progress bar.
        self.progress: Callable[[Path, int, int], None] | None = None

    @classmethod
    def from_checkpoint(cls, checkpoint: str | os.PathLike | None = None, *, runs_dir: str | os.PathLike = RUNS_DIR,
                        device: str = "auto", **options) -> Localizer:
        """Load `checkpoint`: a file, or a run folder's best checkpoint (default: the newest run's best.pt under
        `runs_dir`, said through `log`)."""
        log = options.get("log") or (lambda message: None)
        named = checkpoint
        checkpoint = resolve_checkpoint(checkpoint, runs_dir)
        if named is None:
            log(f"no checkpoint named: using the newest run's {checkpoint}")
        # NVDEC's CUDA context first: FFmpeg shares CUDA's primary context only if it makes it (video_hwaccel).
        video_hwaccel(video_decoder_on(options.get("video_decoder", "cpu"), resolve_device(device)))
        model, meta = load_checkpoint(checkpoint, resolve_device(device))
        return cls(model, meta.get("provenance") or {}, checkpoint=str(checkpoint), epoch=meta.get("epoch"),
                   device=device, **options)

    def _options(self, frames_per_second, weights, vgg19_weights, vggish_weights, seed, precision,
                 force) -> ExtractOptions:
        """Extraction settings from the checkpoint's provenance; asking for other weights is refused here, before
        any weights are loaded (or downloaded), unless forced."""
        if weights not in WEIGHT_CHOICES:
            raise BmfnError(f"weights {weights!r}: choose one of {', '.join(WEIGHT_CHOICES)}")
        trained = self.trained
        visual = trained.get("visual") or {}
        checksum = str(visual.get("checksum") or "")
        trained_seed = int(checksum[len(RANDOM_PREFIX):]) if checksum.startswith(RANDOM_PREFIX) else None
        files = vgg19_weights is not None or vggish_weights is not None
        if weights == "random":
            random_seed = seed if seed is not None else (trained_seed if trained_seed is not None else 0)
        elif weights == "pretrained" or files or trained_seed is None:
            random_seed = None
        else:
            random_seed = trained_seed if seed is None else seed
        if (random_seed is None) != (trained_seed is None) and not force:
            made = f"random networks ({checksum})" if trained_seed is not None else "pretrained networks"
            asked = f"random weights (seed {random_seed})" if random_seed is not None else "pretrained weights"
            raise BmfnError(f"{self.checkpoint}: the checkpoint was trained on features of {made} but {asked} were "
                            "asked for; its labels would be meaningless (--force to go on anyway)")
        return ExtractOptions(
            frames_per_second=frames_per_second or trained.get("frames_per_second") or FRAMES_PER_SECOND,
            visual_source=visual.get("source") or ExtractOptions.visual_source,
            vgg19_weights=vgg19_weights, vggish_weights=vggish_weights, random_seed=random_seed,
            alignment=trained.get("alignment") or ExtractOptions.alignment, precision=precision,
        )

    @property
    def read_settings(self) -> dict:
        """read_for_labels' settings for this localizer's files (a BackgroundRead made with others is not used)."""
        return {"window": WINDOW, "frames_per_second": self.options.frames_per_second,
                "video_decoder": self.video_decoder}

    def run(self, paths: Iterable[str | os.PathLike], *, plot_dir: str | os.PathLike | None = None,
            started: Iterable[BackgroundRead] = ()) -> Iterator[tuple[Path, LocalizationResult | BmfnError]]:
        """(path, result) per file in input order, or (path, BmfnError) for a file that failed; the others go on.

        Files are featurised one at a time while the next `decode_ahead` are probed and decoded in threads; their
        windows queue up and go through BMFN in batches of `batch_size` windows, across files. With `plot_dir`,
        each file's timeline PNG is written there. `started`: reads of some of the files already under way (the
        CLI starts the first before importing torch); one with other settings than `read_settings` is cancelled.
        """
        started = list(started)
        early = {}
        for read in started:
            if read.settings == self.read_settings:
                early.setdefault(read.path, read)
            else:
                read.cancel()
        pending: deque[tuple[Path, _Video | BmfnError]] = deque()
        queue: list[tuple[_Video, int]] = []
        pool = ThreadPoolExecutor(max(1, self.decode_ahead))
        try:
            files = ((path, early.pop(path, None)) for path in map(Path, paths))
            for (path, _), media in _ahead(pool, lambda file: self._media(*file), files, self.decode_ahead):
                try:
                    video = self._prepare(path, *media.result(), keep_media=plot_dir is not None)
                except BmfnError as exc:
                    pending.append((path, exc))
                else:
                    pending.append((path, video))
                    queue += [(video, w) for w in range(len(video.starts))]
                while len(queue) >= self.batch_size:
                    self._predict(queue[: self.batch_size])
                    del queue[: self.batch_size]
                yield from self._finished(pending, plot_dir)
        finally:
            pool.shutdown(cancel_futures=True)
            for read in started:  # reads not taken: of files not in `paths`, or left when the caller stopped early
                read.cancel()
        if queue:
            self._predict(queue)
        yield from self._finished(pending, plot_dir)

    def _finished(self, pending: deque, plot_dir) -> Iterator[tuple[Path, LocalizationResult | BmfnError]]:
        while pending and (isinstance(pending[0][1], BmfnError) or pending[0][1].done):
            path, video = pending.popleft()
            if isinstance(video, BmfnError):
                yield path, video
                continue
            result = self._result(video)
            if plot_dir is not None:
                try:
                    plot_timeline(result, video.keyframes, video.waveform, timeline_path(plot_dir, path))
                except Exception as exc:  # a plot that fails is this file's error, not the run's
                    yield path, PlotFailed(result, exc)
                    continue
            yield path, result

    def _result(self, video: _Video) -> LocalizationResult:
        event, classes = merge_windows(video.seconds, video.starts, np.stack(video.event), np.stack(video.classes))
        model = {"checkpoint": self.checkpoint, "mode": self.model.config.mode, "epoch": self.epoch,
                 "window_s": WINDOW, "stride_s": self.stride, "windows": len(video.starts),
                 "device": str(self.device), "features": self.provenance}
        return LocalizationResult(str(video.path), video.duration_s, label_seconds(event, classes, video.duration_s),
                                  video.warnings, model)

    # ------------------------------------------------------------------------------------------ one file

    def _media(self, path: Path, started: BackgroundRead | None = None
               ) -> tuple[ClipInfo, int, DecodedClip | None, float]:
        """read_for_labels(path), in a decoding thread ahead of the file's turn, or the result of its `started`
        read (read here after all if that process died); and the seconds this took."""
        began = time.perf_counter()
        read = started.result() if started is not None else None
        if read is None:
            read = read_for_labels(path, **self.read_settings)
        return *read, time.perf_counter() - began

    def _prepare(self, path: Path, info: ClipInfo, seconds: int, clip: DecodedClip | None, decode_s: float, *,
                 keep_media: bool) -> _Video:
        """Featurise one file: per-second visual maps and per-window audio embeddings."""
        self.timings["decode"] += decode_s
        starts = window_starts(seconds, self.stride)
        if clip is not None:
            visual, waveform, keyframes, warnings = self._short_video(path, clip, seconds, keep_media)
        else:
            visual, waveform, keyframes, warnings = self._long_video(path, seconds, keep_media)
        # (at AVE's indices, a 10.4 s video's frames spread over all of it: only its sound past 10 s goes unheard)
        if (tail := info.duration_s - seconds) >= UNLABELLED_NOTE_S and info.indexing != "ave":
            warnings.append(f"{path}: its last {tail:.2f} s (from {seconds} s) are less than half a second: not "
                            "labelled")
        began = time.perf_counter()
        audio = self.audio.batch([waveform[s * SAMPLE_RATE:(s + WINDOW) * SAMPLE_RATE] for s in starts], WINDOW)
        self.timings["audio"] += time.perf_counter() - began
        media_end = min(len(waveform), math.ceil(info.duration_s * SAMPLE_RATE))
        return _Video(path, info.duration_s, seconds, starts, visual, audio, warnings, keyframes,
                      waveform[:media_end] if keep_media else None)

    def _keyframes(self, frames: np.ndarray) -> np.ndarray:
        """The middle sample of each second, at the plot strip's resolution."""
        return frames[:, frames.shape[1] // 2, ::KEYFRAME_STEP, ::KEYFRAME_STEP].copy()

    def _maps(self, path: Path, frames: np.ndarray, done: int, total: int) -> np.ndarray:
        """Per-second mean maps of frames [seconds, frames_per_second, 224, 224, 3]. With a `progress` listener, a
        batch's worth of seconds at a time (the batches VGG-19 runs anyway), telling it after each; without, in one
        call (on a GPU, one wait for the results instead of one per batch)."""
        if self.progress is None:
            return self.visual.segments(frames)
        step = max(1, self.visual.batch_size // frames.shape[1])
        if done == 0:
            self.progress(path, 0, total)
        maps = []
        for start in range(0, len(frames), step):
            maps.append(self.visual.segments(frames[start:start + step]))
            self.progress(path, min(done + start + step, total), total)
        return np.concatenate(maps)

    def _short_video(self, path: Path, clip: DecodedClip, seconds: int, keep_media: bool):
        """One window decoded as `bmfn extract` decodes a clip (AVE frame indices, padding past the end)."""
        real = clip.info.segments
        began = time.perf_counter()
        maps = self._maps(path, clip.frames[:real], 0, real)
        if real < WINDOW:
            # Padding segments repeat one frame (decode.py), so their mean maps are that frame's map: one forward.
            padding = self.visual.segments(clip.frames[real:real + 1, :1])
            maps = np.concatenate([maps, np.repeat(padding, WINDOW - real, axis=0)])
        self.timings["visual"] += time.perf_counter() - began
        keyframes = self._keyframes(clip.frames[:seconds]) if keep_media else None
        return maps, clip.audio, keyframes, clip.warnings

    def _long_video(self, path: Path, seconds: int, keep_media: bool):
        """Chunks of CHUNK_SECONDS decoded with wall-clock frame indices, so frame times never drift from the
        audio (AVE's indices keep a fixed number of frames per segment, which drifts at non-integer rates)."""
        maps, waves, keyframes, warnings = [], [], [], []
        for start in range(0, seconds, CHUNK_SECONDS):
            count = min(CHUNK_SECONDS, seconds - start)
            began = time.perf_counter()
            clip = decode_window(path, seconds=count, start_s=float(start), wall_clock=True,
                                 frames_per_second=self.options.frames_per_second, video_decoder=self.video_decoder)
            self.timings["decode"] += time.perf_counter() - began
            began = time.perf_counter()
            maps.append(self._maps(path, clip.frames[:count], start, seconds))
            self.timings["visual"] += time.perf_counter() - began
            waves.append(clip.audio[: count * SAMPLE_RATE])
            if keep_media:
                keyframes.append(self._keyframes(clip.frames[:count]))
            warnings += clip.warnings
        return (np.concatenate(maps), np.concatenate(waves), np.concatenate(keyframes) if keep_media else None,
                list(dict.fromkeys(warnings)))

    @torch.inference_mode()
    def _predict(self, items: list[tuple[_Video, int]]) -> None:
        """One BMFN forward over windows of possibly several files; stores each window's probabilities."""
        began = time.perf_counter()
        visual = np.stack([video.visual[video.starts[w]:video.starts[w] + WINDOW] for video, w in items])
        audio = np.stack([video.audio[w] for video, w in items])
        output = self.model(torch.from_numpy(visual).to(self.device), torch.from_numpy(audio).to(self.device))
        event = torch.sigmoid(output.event_logits.float()).cpu().numpy()
        classes = torch.softmax(output.class_logits.float(), dim=-1).cpu().numpy()
        for (video, w), window_event, window_classes in zip(items, event, classes):
            video.event[w], video.classes[w] = window_event, window_classes
        self.timings["model"] += time.perf_counter() - began


def _ahead(pool: ThreadPoolExecutor, work: Callable, items: Iterable, depth: int) -> Iterator[tuple[Any, Future]]:
    """(item, future of work(item)) in order, with `depth` further items already submitted to `pool`."""
    submitted: deque[tuple[Any, Future]] = deque()
    for item in items:
        submitted.append((item, pool.submit(work, item)))
        if len(submitted) > depth:
            yield submitted.popleft()
    yield from submitted


def localize(paths: str | os.PathLike | Iterable[str | os.PathLike], checkpoint: str | os.PathLike | None = None,
             *, stride: int = DEFAULT_STRIDE, device: str = "auto", batch_size: int = EVAL_BATCH_SIZE,
             frames_per_second: int | None = None, weights: str = "checkpoint",
             vgg19_weights: str | os.PathLike | None = None, vggish_weights: str | os.PathLike | None = None,
             seed: int | None = None, precision: str = "auto", force: bool = False, video_decoder: str = "cpu",
             plot_dir: str | os.PathLike | None = None, runs_dir: str | os.PathLike = RUNS_DIR,
             log: Callable[[str], None] | None = None) -> LocalizationResult | list[LocalizationResult | BmfnError]:
    """Per-second labels of one video (a LocalizationResult; a failure raises BmfnError) or of several: a list of
    paths, a folder (searched recursively for video files) or a .txt list give a list in their order, each file once
    (one named twice is labelled once), where a file that failed holds its BmfnError so the others' results are
    kept; the error's `.video` is its file, as a result's `.path` is. A file whose labels were made but whose plot
    failed gives a PlotFailed, a BmfnError that holds them as `.result`.

    `checkpoint` defaults to the newest run's best.pt under `runs_dir`; `frames_per_second` and the weights
    default to those the checkpoint's features were made with; `precision` is VGG-19's (auto, float32, bfloat16,
    or int8 on CPUs); `video_decoder` "cuda" decodes on the GPU's NVDEC; see the module docstring for windows and
    labels.
    """
    single = isinstance(paths, (str, os.PathLike))
    files = find_videos([paths] if single else paths, keep_missing=True)
    if not files:
        raise BmfnError(f"no video files found in {paths}")
    single = single and files == [Path(paths)]  # one video file, not a folder or a list
    if plot_dir is not None:
        check_result_names(files)
    localizer = Localizer.from_checkpoint(
        checkpoint, runs_dir=runs_dir, device=device, stride=stride, batch_size=batch_size,
        frames_per_second=frames_per_second, weights=weights, vgg19_weights=vgg19_weights,
        vggish_weights=vggish_weights, seed=seed, precision=precision, force=force, video_decoder=video_decoder,
        log=log)
    outcomes = []
    for path, outcome in localizer.run(files, plot_dir=plot_dir):
        if isinstance(outcome, BmfnError):
            outcome.video = str(path)
        outcomes.append(outcome)
    if single:
        if isinstance(outcomes[0], BmfnError):
            raise outcomes[0]
        return outcomes[0]
    return outcomes
