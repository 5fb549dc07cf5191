"""Decode stage: a video file -> sampled 224x224 RGB frames and a 16 kHz mono waveform, as the AVE features were made.

Frame indices, resize and audio path follow features-reference.md sections 1.1, 1.2 and 2.1. Decoding streams
through the file with PyAV: only the frames that are sampled are converted to RGB and kept.

Two frame-index rules (documented choice):
- AVE indexing, for a clip whose length is within half a second of `seconds` and decoded from its start (the case
  the released features came from): n = round(container duration x nominal fps), fi = n // seconds, and sample i of
  segment l is frame floor(l*fi + (i/frames_per_second)*fi). A "segment" is 1/seconds of the clip, as in AVE.
- Wall-clock indexing, for any other clip or a window starting at `start_s` > 0: segment l covers
  [start_s + l, start_s + l + 1) s and sample i is frame floor((start_s + l + i/frames_per_second) x fps). Stretching
  a 30 s clip into ten 3 s "segments" would not give per-second labels, so longer clips are cut (decode later windows
  with `start_s`) and shorter ones padded.
For integer frame rates the two rules give the same indices on a clip of exactly `seconds` seconds. Frame i is the
i-th frame decoded, as a frame-counting reader (the released features') takes it, where the frames' times keep
within VFR_DRIFT_S of i / fps; in a video whose rate varies more, frame i is the one shown at i / fps (to half a
frame at fps: the first whose time rounds to i, else the one on screen then).

Segments that exist: a trailing part second counts as a segment when it is at least half a second long, so a 5.31 s
clip has 5 segments, a 1 s clip 1, a 9.64 s clip 10 (never fewer than 1). Segments beyond them repeat the last frame,
and their audio is what sound is left (the 0.31 s of a 5.31 s clip), then silence.

Stream starts: video and audio are each read from their own start, as the released features were, unless they start
half a second or more apart (a video that begins seconds after its sound); then both are placed on one timeline from
the earlier start, so each second gets the frames and sound a player presents together: before the video starts, its
first frame; before the sound starts, silence.

Stream ends: a stream that stops more than half a second before its file says it ends is a cut or damaged file and
is refused, unless the file shows that it ends so by design (_designed_end: Matroska and WebM declare no length
per stream, so a sound that stops before its video looks like a cut one there).

Video on a GPU (video_decoder="cuda"): NVDEC decodes through PyAV's CUDA hwaccel and keeps the frames on the GPU;
only the sampled ones are copied back, rearranged from NV12 into the CPU decoders' yuv420p layout and converted as
theirs are. Video decoding is exact (the codecs specify every output bit), so the frames are the same, and the CPU
is left with demuxing, the sampled frames and the audio. video_decoder="nvcodec" decodes on NVDEC through NVIDIA's
own binding instead (nvcodec.py: a decoder kept across files), where _nvcodec_frames can show that its frames are
the CPU decoder's, and on the CPU elsewhere.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import math
import mmap
import multiprocessing
import os
import secrets
import signal
import sys
import tempfile
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from multiprocessing import resource_tracker, shared_memory
from numbers import Real
from typing import Any, NamedTuple, TypeVar
from pathlib import Path

import av
import cv2
import numpy as np
from av.codec.hwaccel import HWAccel
from threadpoolctl import threadpool_limits

from .ave import SEGMENTS
from . import nvcodec
from .errors import BmfnError, check_counts, counted
from .nvcodec import NVDEC_LIBRARY
from .resample import resample

_T = TypeVar("_T")

# Container extensions a folder is searched for; a file named explicitly is tried whatever its extension.
VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".flv", ".mpg", ".mpeg", ".wmv", ".3gp", ".ogv", ".ts"}
)
SAMPLE_RATE = 16000  # VGGish input rate (features-reference.md 2.2)
FRAME_SIZE = 224  # VGG-19 input side; plain resize, no crop (features-reference.md 1.2)
FRAMES_PER_SEGMENT = 16  # frames averaged per segment in the released AVE features (features-reference.md 1.1)
FLOAT_SAMPLES = {"flt": np.float32, "fltp": np.float32, "dbl": np.float64, "dblp": np.float64}  # sample formats
INT16_SCALE = 32768.0  # wav int16 -> float, as vggish wavfile_to_examples (features-reference.md 2.1)
AVE_TOLERANCE_S = 0.5  # clips this close to `seconds` use AVE indexing; also the part second that counts as a segment
TRUNCATION_TOLERANCE_S = 0.5  # a stream ending this much earlier than its header says is truncated, not just rounding
STREAM_START_TOLERANCE_S = 0.5  # video and sound starting this far apart are read on one timeline (module docstring)
AUDIO_MARGIN_S = 1.0  # audio decoded either side of a window so the resampling filter sees real context at its edges
# Frames are counted (as the released features' were) where their times all stay this close (at least one frame) to a
# steady rate's; a video whose frames stray further (a variable rate) has them picked by their times.
VFR_DRIFT_S = 0.1
# A Matroska/WebM file: an EBML header, then a Segment whose elements follow each other, each an ID and a size: its
# Info (holding the MuxingApp) after a SeekHead and some Void, Tracks, the Clusters of blocks, Cues, Tags...
EBML_HEADER_ID, MATROSKA_SEGMENT_ID, MATROSKA_INFO_ID = 0x1A45DFA3, 0x18538067, 0x1549A966
MATROSKA_MUXING_APP_ID, MATROSKA_CLUSTER_ID = 0x4D80, 0x1F43B675
EBML_VOID_ID, EBML_CRC_ID = 0xEC, 0xBF
MATROSKA_SEGMENT_CHILDREN = frozenset({  # SeekHead, Info, Tracks, Cluster, Cues, Chapters, Tags, Attachments
    0x114D9B74, MATROSKA_INFO_ID, 0x1654AE6B, MATROSKA_CLUSTER_ID, 0x1C53BB6B, 0x1043A770, 0x1254C367, 0x1941A469,
    EBML_VOID_ID, EBML_CRC_ID})
MATROSKA_CLUSTER_CHILDREN = frozenset({  # Timestamp, SilentTracks, Position, PrevSize, SimpleBlock, BlockGroup,
    0xE7, 0x5854, 0xA7, 0xAB, 0xA3, 0xA0, 0xAF, EBML_VOID_ID, EBML_CRC_ID})  # EncryptedBlock
MATROSKA_HEAD_BYTES = 64 * 1024  # read for the MuxingApp (mkvmerge reserves a few KiB before the Info)
# FFmpeg decoder threads per stream; 0 lets FFmpeg choose (one per core). Decoding workers set their share.
DECODER_THREADS = 0
IN_FLIGHT_PER_WORKER = 2  # decoded clips queued per worker: bounds memory, keeps every worker busy
MAX_WORKER_DEATHS = 3  # pools in a row whose worker died before any clip decoded: decoding itself is broken
# Names, in a decoding worker's environment, the file it writes when it finds a bmfn call at its script's top level
# (refuse_in_starting_worker).
WORKER_MARK_ENV = "BMFN_DECODING_WORKER_MARK"
# Decoding workers hand frames over in shared memory when SHARED_MEMORY_DIR has this many times the room that the
# clips in flight can take; else through the result pipe. Set in workers by _init_worker.
SHARED_MEMORY_DIR = "/dev/shm"
SHARED_MEMORY_MARGIN = 2
_SHARE_FRAMES = False
# Where video frames are decoded: "cpu" (FFmpeg's decoders), "cuda[:N]" (NVDEC, through PyAV's CUDA hwaccel) or
# "nvcodec[:N]" (NVDEC, through PyNvVideoCodec: nvcodec.py).
VIDEO_DECODERS = ("cpu", "cuda", "nvcodec")
# Per GPU, the decoding settings and the CUDA device context this process keeps (video_hwaccel).
_HELD_DECODER_DEVICES: dict[int, tuple[HWAccel, HWAccel]] = {}
FIELD_ORDER_PROGRESSIVE = 1  # FFmpeg's AV_FIELD_PROGRESSIVE; 0 is unknown, above are the interlaced orders
# What the GPU decoders read that PyAV has since version 18 (the last for Python 3.10 is 17): a hardware frame's
# layout, and whether a stream is interlaced.
GPU_DECODING_PYAV = hasattr(av.VideoFrame, "sw_format") and hasattr(av.video.codeccontext.VideoCodecContext,
                                                                     "field_order")
PR_SET_PDEATHSIG = 1  # Linux prctl option: a signal for this process when its parent dies (linux/prctl.h)


@dataclass
class ClipInfo:
    """What bmfn will read from a file: container, chosen streams and how it will be cut into segments."""

    path: str
    container: str
    duration_s: float
    video_index: int
    video_codec: str
    width: int
    height: int
    frame_rate: Fraction  # nominal (average) frame rate
    n_frames: int  # round(duration_s * fps): the frame-count estimate of features-reference.md 1.1
    # The most a frame's time strays from a steady frame_rate (seconds, from its packets' times); beyond VFR_DRIFT_S
    # (at least a frame) the rate is variable and frames are picked by their times (module docstring).
    frame_time_drift_s: float
    audio_index: int | None
    audio_codec: str | None
    sample_rate: int | None
    channels: int | None
    video_streams: int
    audio_streams: int
    seconds: int  # segments per decoded window
    start_s: float  # window start
    indexing: str  # "ave" or "wall-clock" (module docstring)
    segments: int  # segments of the window that hold real content (module docstring)
    # Where each stream starts on the clip's timeline (module docstring, stream starts): 0 unless they start apart.
    video_start_s: float = 0.0
    audio_start_s: float = 0.0

    @property
    def fps(self) -> float:
        return float(self.frame_rate)

    @property
    def variable_frame_rate(self) -> bool:
        return self.frame_time_drift_s * self.fps > _drift_limit(self.frame_rate)

    def to_dict(self) -> dict:
        """JSON-ready facts: the exact frame rate as a string, plus `fps` as a float."""
        facts = asdict(self)
        facts["frame_rate"] = str(self.frame_rate)
        facts["fps"] = self.fps
        facts["variable_frame_rate"] = self.variable_frame_rate
        return facts


@dataclass
class DecodedClip:
    """One window of a clip, ready for the visual and audio extractors."""

    frames: np.ndarray  # uint8 [seconds, frames_per_second, 224, 224, 3] RGB
    audio: np.ndarray  # float32 [seconds * 16000] mono
    info: ClipInfo
    warnings: list[str] = field(default_factory=list)

    def __reduce_ex__(self, protocol):
        """In a decoding worker, the frames (24 MB a clip at 16 frames/s) travel through shared memory: through the
        result pipe they cost the parent ~20 ms of unpickling per clip and the worker a fifth of its time."""
        if not _SHARE_FRAMES:
            return super().__reduce_ex__(protocol)
        block = shared_memory.SharedMemory(create=True, size=max(1, self.frames.nbytes))
        try:
            np.ndarray(self.frames.shape, self.frames.dtype, buffer=block.buf)[...] = self.frames
        except BaseException:
            block.unlink()
            raise
        finally:
            block.close()
        return _from_shared_memory, (block.name, self.frames.shape, self.frames.dtype.str, self.audio, self.info,
                                     self.warnings)


def _from_shared_memory(name: str, shape: tuple, dtype: str, audio: np.ndarray, info: ClipInfo,
                        warnings: list[str]) -> DecodedClip:
    """Unpickling in the parent: map the block and remove its name at once (the mapping lives on with the array,
    and nothing is left behind). No copy: the consumer reads the pages the worker wrote."""
    path = os.path.join(SHARED_MEMORY_DIR, name)
    descriptor = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(descriptor).st_size
        mapping = mmap.mmap(descriptor, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    finally:
        os.close(descriptor)
        os.unlink(path)
        resource_tracker.unregister("/" + name, "shared_memory")  # the worker's block, registered when created
    count = math.prod(shape)
    frames = np.frombuffer(mapping, np.dtype(dtype), count).reshape(shape)
    return DecodedClip(frames, audio, info, warnings)


def ave_frame_indices(n_frames: int, segment: int, *, seconds: int = SEGMENTS,
                      frames_per_second: int = FRAMES_PER_SEGMENT) -> list[int]:
    """features-reference.md 1.1: floor(l*fi + (i/F)*fi) with fi = n // seconds, in exact arithmetic."""
    fi = n_frames // seconds
    return [math.floor(segment * fi + Fraction(i, frames_per_second) * fi) for i in range(frames_per_second)]


def wall_clock_frame_indices(frame_rate: Fraction, segment: int, *, start_s: float = 0.0,
                             frames_per_second: int = FRAMES_PER_SEGMENT) -> list[int]:
    """Frames sampled evenly over the second [start_s + segment, start_s + segment + 1) at the nominal frame rate."""
    start = Fraction(start_s) + segment
    return [math.floor((start + Fraction(i, frames_per_second)) * frame_rate) for i in range(frames_per_second)]


def segment_frame_indices(info: ClipInfo, segment: int, *, frames_per_second: int = FRAMES_PER_SEGMENT) -> list[int]:
    """Indices (in decode order from the start of the video stream) of the frames sampled for one segment."""
    if info.indexing == "ave":
        return ave_frame_indices(info.n_frames, segment, seconds=info.seconds, frames_per_second=frames_per_second)
    return wall_clock_frame_indices(info.frame_rate, segment, start_s=info.start_s,
                                    frames_per_second=frames_per_second)


def find_videos(inputs: str | os.PathLike | Iterable[str | os.PathLike], *, keep_missing: bool = False,
                on_empty: Callable[[Path], None] | None = None, _reading: frozenset[Path] = frozenset()) -> list[Path]:
    """Video files from files, folders (recursive, by extension) and .txt lists of paths (relative to the list).

    A path that does not exist is an error, or with `keep_missing` kept as it is, for the caller to report in its turn.
    `on_empty` hears of each folder or list that gives no video file (one among others would go unnoticed). A list
    that names itself, as `ls > videos.txt` writes it, or a list that names it back, is not read again. A path
    found twice (a folder and a file in it, `a.mp4` and `./a.mp4`) is kept once, where it was first found.
    """
    found: list[Path] = []
    if isinstance(inputs, (str, os.PathLike)):  # one path, not the characters of one
        inputs = [inputs]
    for item in map(Path, inputs):
        if item.is_dir():  # a link to nothing is kept, to fail as its clip in one line, not be passed over unsaid
            videos = sorted(p for p in item.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS
                            and (p.is_file() or p.is_symlink() and not p.exists()))
        elif item.suffix.lower() == ".txt" and item.is_file():
            if item.resolve() in _reading:
                continue
            try:
                lines = [line.strip() for line in item.read_text(encoding="utf-8-sig").splitlines()]
            except UnicodeDecodeError as err:
                raise BmfnError(f"{item}: not a UTF-8 list of paths ({err.reason} at byte {err.start})") from None
            videos = find_videos((item.parent / line for line in lines if line and not line.startswith("#")),
                                 keep_missing=keep_missing, on_empty=on_empty, _reading=_reading | {item.resolve()})
        elif item.is_file() or keep_missing:
            found.append(item)
            continue
        else:
            raise BmfnError(f"{item}: no such file or folder")
        if not videos and on_empty is not None:
            on_empty(item)
        found.extend(videos)
    first: dict[str, Path] = {}
    for path in found:  # the same name, not the same file: a link under its own name is a clip of its own
        first.setdefault(os.path.abspath(path), path)
    return list(first.values())


def probe(path: str | os.PathLike, *, seconds: int = SEGMENTS, start_s: float = 0.0,
          wall_clock: bool = False) -> ClipInfo:
    """Read the container header and choose streams, without decoding: the facts `bmfn probe` prints."""
    with _open(path) as container:
        return _clip_info(path, container, seconds, start_s, wall_clock)


def first_frame_filters(path: str | os.PathLike, info: ClipInfo) -> list[str]:
    """The display_filters of the chosen video's frames (FFmpeg exposes the display matrix on decoded frames, so this
    decodes the first one): what `bmfn probe` reports."""
    with _open(path) as container:
        stream = next(s for s in container.streams.video if s.index == info.video_index)
        try:
            frame = next(container.decode(stream), None)
        except av.error.FFmpegError as exc:
            raise BmfnError(f"{path}: corrupt or truncated video ({_reason(exc)})") from None
    return display_filters(frame) if frame is not None else []


def decode_clip(path: str | os.PathLike, *, seconds: int = SEGMENTS, frames_per_second: int = FRAMES_PER_SEGMENT,
                start_s: float = 0.0, allow_silent: bool = False, wall_clock: bool = False,
                video_decoder: str = "cpu") -> DecodedClip:
    """Decode `seconds` one-second segments from `start_s`: sampled frames and the 16 kHz mono waveform.

    Frames are picked at AVE's indices for a clip about `seconds` long decoded from 0 s, else by wall-clock time;
    wall_clock=True always picks them by time and says nothing of the video going on past the window (for
    windows of a longer video, whose frame times must not drift from the audio's).
    video_decoder="cuda[:N]" decodes the video on that GPU's NVDEC (video_hwaccel); the frames are the same.
    video_decoder="nvcodec[:N]" decodes it there through PyNvVideoCodec where its frames are known to be the CPU
    decoder's (_nvcodec_frames), else on the CPU with a note in the warnings.
    Raises BmfnError for a file that cannot be used; with allow_silent=True a file without audio gives silence.
    """
    check_counts("decode_clip", seconds=seconds, frames_per_second=frames_per_second)
    if isinstance(start_s, bool) or not isinstance(start_s, Real) or not 0 <= start_s < math.inf:
        raise BmfnError(f"decode_clip: start_s={start_s!r}, expected seconds, 0 or more")
    hwaccel = video_hwaccel(video_decoder)
    with _open(path, hwaccel) as container:
        info = _clip_info(path, container, seconds, start_s, wall_clock)
        if info.audio_index is None and not allow_silent:
            raise BmfnError(f"{path}: no audio stream, and the audio features need sound "
                            "(from Python, allow_silent=True reads it as silence)")
        warnings = _header_warnings(info, window_chosen=wall_clock)
        if info.audio_index is None:
            frames = _decode_frames(path, container, info, frames_per_second, warnings, video_decoder)
            audio = np.zeros(seconds * SAMPLE_RATE, np.float32)
            warnings.append(f"{path}: no audio stream, using silence")
        else:
            # Audio (its decoding and resampling products release the GIL) runs on its own demuxer beside the video.
            audio_warnings: list[str] = []
            with ThreadPoolExecutor(max_workers=1) as pool:
                audio_future = pool.submit(_decode_audio_file, path, info, audio_warnings)
                frames = _decode_frames(path, container, info, frames_per_second, warnings, video_decoder)
                audio = audio_future.result()
            warnings += audio_warnings
    return DecodedClip(frames=frames, audio=audio, info=info, warnings=warnings)


def _decode_audio_file(path: str | os.PathLike, info: ClipInfo, warnings: list[str]) -> np.ndarray:
    with _open(path) as container:
        return _decode_audio(path, container, info, warnings)


def video_hwaccel(video_decoder: str) -> HWAccel | None:
    """PyAV's decoding settings for a VIDEO_DECODERS choice: None for "cpu"; for "cuda[:N]", NVDEC on GPU N with the
    frames left on the GPU, so that only the sampled ones are copied back (_rgb), and FFmpeg's decoder where NVDEC
    cannot take a stream.

    The first call per GPU creates a device context that the process keeps: FFmpeg retains CUDA's primary context
    for each file it opens and would otherwise create and destroy it every time. FFmpeg wants that context with
    blocking synchronisation; when torch made it first (with its own flags: a process that used the GPU before its
    first NVDEC decode), FFmpeg refuses it, and the files are decoded in a context of FFmpeg's own instead, made
    per file. Raises BmfnError where NVDEC cannot be used: no NVIDIA driver or GPU, an FFmpeg without CUDA, or no
    NVDEC library (a container without the driver's video capability), where FFmpeg would quietly decode every
    file on the CPU instead. For "nvcodec[:N]", whose frames come from another library, None after nvcodec.check's
    test of that library."""
    if video_decoder == "cpu":
        return None
    if not GPU_DECODING_PYAV:
        raise BmfnError(f"GPU video decoding (--video-decoder {video_decoder}) needs PyAV 18 or later, which needs "
                        f"Python 3.11 or later; this is PyAV {av.__version__}: decode on the CPU instead "
                        "(--video-decoder cpu)")
    nvcodec_device = nvcodec.device_of(video_decoder)
    if nvcodec_device is not None:
        nvcodec.check(nvcodec_device)
        return None
    kind, _, index = video_decoder.partition(":")
    if kind != "cuda" or not (index == "" or index.isdigit()):
        raise BmfnError(f"video decoder {video_decoder!r}: choose one of cpu, cuda, cuda:N, nvcodec or nvcodec:N")
    device = int(index or 0)
    if device not in _HELD_DECODER_DEVICES:
        accel = HWAccel("cuda", device=str(device), allow_software_fallback=True, is_hw_owned=True)
        try:
            ctypes.CDLL(NVDEC_LIBRARY)
            try:
                held = accel.create(av.Codec("h264", "r"))
            except av.error.FFmpegError as exc:
                if getattr(exc, "errno", None) != errno.ENOTSUP:  # not "primary context active with other flags"
                    raise
                accel = HWAccel("cuda", device=str(device), allow_software_fallback=True, is_hw_owned=True,
                                options={"primary_ctx": "0"})
                held = accel.create(av.Codec("h264", "r"))
        except (av.error.FFmpegError, NotImplementedError, OSError) as exc:
            reason = _reason(exc) if isinstance(exc, av.error.FFmpegError) else str(exc)
            raise BmfnError(f"GPU video decoding (NVDEC) on cuda:{device} is not available here ({reason}); "
                            "decode on the CPU instead (--video-decoder cpu)") from None
        _HELD_DECODER_DEVICES[device] = (accel, held)
    return _HELD_DECODER_DEVICES[device][0]


def decode_window(path: str | os.PathLike, **kwargs) -> DecodedClip:
    """decode_clip(path, **kwargs) as localization reads a file: a file without sound is read as silence (no
    audio-visual event), and a crash inside a decoder is a BmfnError naming the file, so that the other files go on."""
    try:
        return decode_clip(path, allow_silent=True, **kwargs)
    except BmfnError:
        raise
    except Exception as exc:
        raise BmfnError(f"{path}: cannot decode ({type(exc).__name__}: {exc})") from None


def read_for_labels(path: str | os.PathLike, *, window: int = SEGMENTS, frames_per_second: int = FRAMES_PER_SEGMENT,
                    video_decoder: str = "cpu") -> tuple[ClipInfo, int, DecodedClip | None]:
    """What localization reads of a file ahead of its turn: its header, the seconds it labels (every second of its
    length, by this module's rule for a part second), and, for a video of at most `window` seconds, its decoded
    window (a longer video is decoded window by window in its turn, to bound memory). Failures are BmfnErrors."""
    try:
        info = probe(path, seconds=window)
        seconds = info.segments
        if seconds == window:  # as long as a window or longer: count every second
            seconds = probe(path, seconds=math.ceil(info.duration_s), wall_clock=True).segments
    except BmfnError:
        raise
    except Exception as exc:  # a demuxer crash on one file must not end the run
        raise BmfnError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from None
    if seconds > window:
        return info, seconds, None
    clip = decode_window(path, seconds=window, frames_per_second=frames_per_second, video_decoder=video_decoder)
    return info, seconds, clip


class BackgroundRead:
    """read_for_labels of one file in a process of its own, started before a command imports torch and loads its
    networks: importing torch keeps one core busy for 1.3 s, and another core reads the file meanwhile (a cold
    `bmfn localize` on 2 cores printed its labels 0.21 s sooner, median of 10 interleaved runs). The process ends
    once its result is taken, and with the command."""

    def __init__(self, path: str | os.PathLike, *, window: int = SEGMENTS,
                 frames_per_second: int = FRAMES_PER_SEGMENT, video_decoder: str = "cpu") -> None:
        self.path = Path(path)
        self.settings = {"window": window, "frames_per_second": frames_per_second, "video_decoder": video_decoder}
        # The frames come back in shared memory that this process makes and so always removes (through the pipe,
        # 24 MB took 0.1 s); through the pipe where there is no room for it.
        self._shape = (window, frames_per_second, FRAME_SIZE, FRAME_SIZE, 3)
        size = math.prod(self._shape)
        self._block = (shared_memory.SharedMemory(create=True, size=size)
                       if _shared_memory_free() >= SHARED_MEMORY_MARGIN * size else None)
        context = multiprocessing.get_context("spawn")  # as decode_many's workers: no half-copied threads
        self._receiver, sender = context.Pipe(duplex=False)
        self._process = context.Process(target=_read_and_send, daemon=True,
                                        args=(sender, self.path, self.settings, self._block and self._block.name))
        try:
            with _interrupts_ignored():
                self._process.start()
        except BaseException:  # no process to spare (OSError): leave nothing behind for the caller's error
            self._receiver.close()
            _release(self._block)
            raise
        finally:
            sender.close()
        # However the command ends (Ctrl-C, an error before the file's turn), the process and block go with it.
        self._end = weakref.finalize(self, _end_read, self._process, self._receiver, self._block)

    def result(self) -> tuple[ClipInfo, int, DecodedClip | None] | None:
        """read_for_labels' result, or its BmfnError raised here; None if the process died without one."""
        try:
            outcome = self._receiver.recv()
            if isinstance(outcome, tuple) and outcome[2] is not None and outcome[2].frames is None:
                view = np.ndarray(self._shape, np.uint8, buffer=self._block.buf)
                outcome[2].frames = view.copy()
                del view  # the block can only be closed once no array looks into it
        except EOFError:
            outcome = None
        finally:
            self._end()
        if isinstance(outcome, BmfnError):
            raise outcome
        return outcome

    def cancel(self) -> None:
        """Stop the process: its result is not wanted (the file is read with other settings). Once the result is
        taken, nothing is left to do."""
        self._end()


@contextmanager
def _interrupts_ignored() -> Iterator[None]:
    """A process started meanwhile ignores Ctrl-C (an ignored signal stays ignored across exec). Ctrl-C reaches
    every process of the terminal's group; the command stops its reading and decoding processes itself (after the
    clips they are on, so the store keeps them), and an interrupt inside one would only print its traceback.
    Signal handlers belong to the main thread; from another, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _end_read(process, receiver, block: shared_memory.SharedMemory | None) -> None:
    """BackgroundRead's end: its process stopped (it has sent its result, or it is not wanted), the pipe closed and
    the block removed."""
    process.terminate()
    process.join()
    receiver.close()
    _release(block)


def _release(block: shared_memory.SharedMemory | None) -> None:
    if block is not None:
        block.close()
        block.unlink()


def _read_and_send(sender, path: Path, settings: dict, block: str | None) -> None:
    """BackgroundRead's process, on one thread: the other cores are busy importing torch. With a shared-memory
    `block`, the frames go there and the clip is sent without them."""
    _init_worker(1, share_frames=False)
    try:
        try:
            outcome = read_for_labels(path, **settings)
        except BmfnError as exc:
            outcome = exc
        else:
            if block is not None and outcome[2] is not None:
                _write_frames(block, outcome[2].frames)
                outcome[2].frames = None
        sender.send(outcome)
    except OSError:  # the command ended without taking the result (the pipe or block is gone): nothing to say
        pass
    finally:
        sender.close()


def _write_frames(block: str, frames: np.ndarray) -> None:
    """Copy `frames` into the shared-memory block named `block`, opened as a plain file: attaching to it as a
    SharedMemory would also register it for removal, which is its maker's to do."""
    descriptor = os.open(os.path.join(SHARED_MEMORY_DIR, block), os.O_RDWR)
    try:
        mapping = mmap.mmap(descriptor, frames.nbytes)
    finally:
        os.close(descriptor)
    with mapping:
        target = np.frombuffer(mapping, np.uint8, frames.size).reshape(frames.shape)
        target[...] = frames
        del target


def decode_or_error(path: Path, seconds: int, frames_per_second: int,
                    prepare: Callable[[DecodedClip], Any] | None = None, video_decoder: str = "cpu") -> Any:
    """A decoded clip (passed through `prepare`, if given), or the one-line reason it could not be decoded.

    This is the entry point of decoding workers; `prepare` lets a caller move CPU work on the clip into them.
    """
    try:
        clip = decode_clip(path, seconds=seconds, frames_per_second=frames_per_second, video_decoder=video_decoder)
        return clip if prepare is None else prepare(clip)
    except BmfnError as exc:
        return str(exc)
    except Exception as exc:  # a decoder crash on one file must not end the run
        return f"{path}: cannot decode ({type(exc).__name__}: {exc})"


def _init_worker(threads: int, share_frames: bool, video_decoder: str = "cpu") -> None:
    """Worker initialiser: FFmpeg, OpenCV and numpy's BLAS (the resampling products) would each start a thread per
    core in every worker; idle BLAS threads spin, which cost 15-25 % of the clips/s of 2 workers on 2 cores.
    `video_decoder` is the one decode_many checked in the parent."""
    global DECODER_THREADS, _SHARE_FRAMES
    _die_with_parent()
    nvcodec_device = nvcodec.device_of(video_decoder)
    if nvcodec_device is not None:
        nvcodec.passed(nvcodec_device)
    os.dup2(2, 1)  # a worker writes nothing to standard output; what libraries print there (nvcodec's) is not data
    DECODER_THREADS, _SHARE_FRAMES = threads, share_frames
    cv2.setNumThreads(1)
    threadpool_limits(threads)


def refuse_in_starting_worker(call: str) -> None:
    """A decoding worker starts by running the calling script's top level again (spawn imports the main module):
    in a script without `if __name__ == "__main__":` that is a second `call` in every worker, which failed on the
    store's lock, each clip then failed as "the decoding worker died". Called there, this leaves `call`'s name in
    the file WORKER_MARK_ENV names and ends the worker; decode_many, seeing the pool broken, stops the run saying
    why. It does nothing elsewhere, but in another process of that script started while bmfn decodes."""
    mark = os.environ.get(WORKER_MARK_ENV)
    if not mark or not getattr(multiprocessing.current_process(), "_inheriting", False):  # a spawned child starting
        return
    try:
        Path(mark).write_text(call)
    except OSError:  # the parent cannot be told: the worker's own error says it
        raise RuntimeError(f"{call}() was called again in a decoding worker as it started: call it under "
                           "`if __name__ == \"__main__\":` in a script") from None
    raise SystemExit(1)


def _unguarded_call(mark: Path) -> str | None:
    """The call a decoding worker found at its script's top level (refuse_in_starting_worker), if one did."""
    try:
        return mark.read_text() or "bmfn"
    except OSError:
        return None


def _die_with_parent() -> None:
    """In a process bmfn started, on Linux: have the kernel kill it when its parent dies, even by SIGKILL, which runs
    no clean-up. A decoding worker waits for clips on a pipe and would otherwise wait forever (and multiprocessing's
    resource tracker with it, which ends once the last process holding it has). The signal comes when the thread
    that started the process ends: decode_many's and BackgroundRead's caller, which also takes their results."""
    parent = multiprocessing.parent_process()
    if parent is None or not sys.platform.startswith("linux"):
        return
    try:
        prctl = ctypes.CDLL(None).prctl
    except (OSError, AttributeError):  # not glibc or musl: left to end with its pipes, as elsewhere
        return
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent.pid:  # the parent died before the signal was set up
        os._exit(1)


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (taskset, a container's --cpuset-cpus, a batch job's
    allocation), not the machine's count os.cpu_count() gives, which would start a worker per core of the host."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # no affinity on this system (macOS, Windows)
        return os.cpu_count() or 1


def decode_many(
    paths: list[Path], *, seconds: int = SEGMENTS, frames_per_second: int = FRAMES_PER_SEGMENT, workers: int = 1,
    prepare: Callable[[DecodedClip], Any] | None = None, video_decoder: str = "cpu",
) -> Iterator[tuple[Path, Any]]:
    """Decode in `workers` processes, in order, with at most IN_FLIGHT_PER_WORKER clips per worker in flight.

    Yields (path, clip or prepare(clip)) or (path, error line). The machine's cores are shared out between the
    workers' decoder threads. `prepare` must be picklable (a module-level function or a partial of one).
    A worker that dies (killed, out of memory, a crash inside a decoder) fails the clip that killed it, found by
    decoding the clips that were in flight one at a time; the others go on in fresh workers.
    """
    video_hwaccel(video_decoder)  # a GPU decoder that cannot work fails here, once, not in every clip
    if workers <= 0:
        for path in paths:
            yield path, decode_or_error(path, seconds, frames_per_second, prepare, video_decoder)
        return
    threads = max(1, usable_cores() // workers)
    clip_bytes = seconds * frames_per_second * FRAME_SIZE * FRAME_SIZE * 3
    share = _shared_memory_free() >= SHARED_MEMORY_MARGIN * IN_FLIGHT_PER_WORKER * workers * clip_bytes
    todo, suspects, deaths = deque(paths), 0, 0
    while todo:
        done, suspects = yield from _decode_in_pool(todo, suspects, (seconds, frames_per_second, prepare,
                                                                     video_decoder), workers,
                                                   (threads, share, video_decoder))
        deaths = 0 if done else deaths + 1
        if deaths >= MAX_WORKER_DEATHS and todo:
            raise BmfnError(f"decoding workers died {deaths} times in a row without decoding a clip; "
                            f"{len(todo)} clips not decoded, starting with {todo[0]}")


def _decode_in_pool(todo: deque, suspects: int, decode_args: tuple, workers: int, initargs: tuple):
    """decode_many's work in one pool, taking clips off `todo` until it is empty or a worker dies.

    A dead worker breaks the whole pool and every clip in flight with it, without saying which one killed it: those
    go back on `todo` as suspects, and the next pool decodes the first `suspects` clips one at a time, so that a clip
    that kills its worker again is the one failed. `decode_args` are decode_or_error's after the path. Yields like
    decode_many; returns (clips done, suspects left)."""
    # spawn, not fork: the parent may hold CUDA state and threads that a fork would copy half-way.
    context = multiprocessing.get_context("spawn")
    done = 0
    try:
        pool = ProcessPoolExecutor(workers, context, initializer=_init_worker, initargs=initargs)
    except OSError as exc:  # the semaphores of its queues are made in /dev/shm
        if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOSPC, errno.ENOSYS):
            raise
        raise BmfnError(f"{SHARED_MEMORY_DIR}: decoding worker processes cannot start ({exc.strerror or exc}); decode "
                        "in this process with --workers 0") from None
    with pool, _worker_mark() as mark:  # the workers inherit it as they start
        pending: deque[tuple[Path, Future]] = deque()
        try:
            while todo or pending:
                while todo and len(pending) < (1 if suspects else IN_FLIGHT_PER_WORKER * workers):
                    with _interrupts_ignored():  # a submit may start a worker: Ctrl-C is for this process
                        pending.append((todo[0], pool.submit(decode_or_error, todo[0], *decode_args)))
                    todo.popleft()
                path, result = pending[0][0], pending[0][1].result()
                pending.popleft()
                done, suspects = done + 1, max(0, suspects - 1)
                yield path, result
        except BrokenProcessPool:
            if (call := _unguarded_call(mark)) is not None:
                mark.unlink(missing_ok=True)
                raise BmfnError(f"decoding workers run the calling script's top level again as they start, and "
                                f"found its {call}() there: call it under `if __name__ == \"__main__\":`") from None
            if suspects and pending:  # alone in flight: this clip killed its worker
                path = pending.popleft()[0]
                done, suspects = done + 1, suspects - 1
                yield path, f"{path}: the decoding worker died (killed, out of memory, or a crash inside the decoder)"
            elif not suspects:
                suspects = len(pending)
            todo.extendleft(reversed([waiting for waiting, _ in pending]))
    return done, suspects


_marks = {"users": 0, "lock": threading.Lock()}


@contextmanager
def _worker_mark() -> Iterator[Path]:
    """This process's mark file (refuse_in_starting_worker), named in os.environ[WORKER_MARK_ENV] while any of its
    decoding pools (a call's, or concurrent calls') lives: the workers they start inherit it, no other process."""
    with _marks["lock"]:
        if "path" not in _marks:
            _marks["path"] = Path(tempfile.gettempdir()) / f"bmfn-worker-{os.getpid()}-{secrets.token_hex(8)}"
        _marks["users"] += 1
        os.environ[WORKER_MARK_ENV] = str(_marks["path"])
    try:
        yield _marks["path"]
    finally:
        with _marks["lock"]:
            _marks["users"] -= 1
            if not _marks["users"]:
                os.environ.pop(WORKER_MARK_ENV, None)


def _shared_memory_free() -> int:
    """Free bytes of the shared-memory file system (0 where there is none): a container's /dev/shm is 64 MB unless
    it is started with --shm-size or --ipc=host, and a worker writing past it would die of SIGBUS."""
    try:
        stat = os.statvfs(SHARED_MEMORY_DIR)
    except OSError:
        return 0
    return stat.f_bavail * stat.f_frsize


def _open(path: str | os.PathLike, hwaccel: HWAccel | None = None) -> av.container.InputContainer:
    file = Path(path)
    if file.is_dir():
        raise BmfnError(f"{path}: a folder, not a video file")
    if not file.is_file():
        raise BmfnError(f"{path}: " + ("a link to nothing (or a loop of links)" if file.is_symlink() and not
                                       file.exists() else "not a regular file" if file.exists() else "no such file"))
    if file.stat().st_size == 0:
        raise BmfnError(f"{path}: empty file")
    try:
        return av.open(str(file), hwaccel=hwaccel)
    except av.error.EOFError:
        raise BmfnError(f"{path}: no media data (zero duration)") from None
    except av.error.PermissionError as exc:
        raise BmfnError(f"{path}: cannot read it ({_reason(exc)})") from None
    except av.error.FFmpegError as exc:
        raise BmfnError(f"{path}: not a media file, or truncated or corrupt ({_reason(exc)})") from None


def _reason(exc: av.error.FFmpegError) -> str:
    return getattr(exc, "strerror", None) or str(exc)


def _best_stream(streams, size) -> av.stream.Stream | None:
    """ffmpeg's default choice: a cover picture (attached_pic) last, then a default-disposition stream first, then the
    largest `size`; ties go to the first."""
    best, best_key = None, None
    for stream in streams:
        key = (not stream.disposition & av.stream.Disposition.attached_pic,
               bool(stream.disposition & av.stream.Disposition.default), size(stream))
        if best_key is None or key > best_key:
            best, best_key = stream, key
    return best


def _clip_info(path, container, seconds: int, start_s: float, wall_clock: bool = False) -> ClipInfo:
    video = _best_stream(container.streams.video, lambda s: (s.codec_context.width * s.codec_context.height,
                                                              s.codec_context.bit_rate or 0))
    if video is None:
        raise BmfnError(f"{path}: no video stream")
    audio = _best_stream(container.streams.audio, lambda s: (s.codec_context.channels, s.codec_context.sample_rate,
                                                              s.codec_context.bit_rate or 0))
    still = container.format.name.endswith("_pipe") or container.format.name == "image2"  # FFmpeg's image readers
    duration_s = 0.0 if still else _duration_s(path, container, video)
    if duration_s <= 0:
        raise BmfnError(f"{path}: {'a still image, not a video' if still else 'zero duration'}")
    if not 0 <= start_s < duration_s:
        raise BmfnError(f"{path}: window start {start_s} s is outside the clip (0 to {duration_s:.2f} s)")
    frame_rate = video.average_rate or video.base_rate or video.guessed_rate
    if not frame_rate:
        raise BmfnError(f"{path}: video stream {video.index} has no frame rate")
    video_start_s, audio_start_s = _stream_starts(video, audio)
    ave = not wall_clock and start_s == 0 and abs(duration_s - seconds) < AVE_TOLERANCE_S
    remaining = duration_s - start_s
    segments = seconds if ave else max(1, min(seconds, math.floor(remaining + AVE_TOLERANCE_S)))
    return ClipInfo(
        path=str(path), container=container.format.name, duration_s=duration_s,
        video_index=video.index, video_codec=video.codec_context.name,
        width=video.codec_context.width, height=video.codec_context.height,
        frame_rate=Fraction(frame_rate), n_frames=round(duration_s * frame_rate),
        frame_time_drift_s=_frame_time_drift(path, video, Fraction(frame_rate)) / float(frame_rate),
        audio_index=None if audio is None else audio.index,
        audio_codec=None if audio is None else audio.codec_context.name,
        # None where the header does not say (MPEG-TS's MP2 until its first packet is read): the frames tell
        sample_rate=None if audio is None else audio.codec_context.sample_rate or None,
        channels=None if audio is None else audio.codec_context.channels or None,
        video_streams=len(container.streams.video), audio_streams=len(container.streams.audio),
        seconds=seconds, start_s=start_s, indexing="ave" if ave else "wall-clock", segments=segments,
        video_start_s=video_start_s, audio_start_s=audio_start_s,
    )


def _stream_starts(video, audio) -> tuple[float, float]:
    """(video, audio) start on the clip's timeline. Streams starting within STREAM_START_TOLERANCE_S of each other are
    each read from their own start, as the released features were (a decoder counting frames, ffmpeg writing a wav);
    streams further apart (a video that starts seconds after its sound) are placed on one timeline, so that each
    second's frames and sound are the ones a player presents together."""
    starts = [float((s.start_time or 0) * s.time_base) if s is not None and s.time_base else 0.0
              for s in (video, audio)]
    if audio is None or abs(starts[0] - starts[1]) < STREAM_START_TOLERANCE_S:
        return 0.0, 0.0
    origin = min(starts)
    return starts[0] - origin, starts[1] - origin


def _duration_s(path, container, video) -> float:
    """The container duration (what imageio's frame-count estimate used), else the video stream's, else where the
    last video or sound packet ends (a file written live, such as a browser's WebM recording, declares neither).
    Matroska's duration, and a packet's end, are times on the file's timeline: its length is what follows its start
    (MP4 and MPEG-TS durations are lengths already)."""
    start = (container.start_time or 0) / av.time_base
    if container.duration:
        return container.duration / av.time_base - (start if start and _duration_is_an_end(path, container) else 0)
    if video.duration and video.time_base:
        return float(video.duration * video.time_base)
    ends = _per_file(_packet_ends, path).av
    return float(max(ends.values())) - start if ends else 0.0


def _duration_is_an_end(path, container) -> bool:
    """Whether the container's duration is where the file's timeline ends rather than its length: FFmpeg's Matroska
    muxer writes a Segment's Duration so (mkvmerge, as the specification, writes a length), and FFmpeg's demuxer
    passes either on as the file's duration. MP4's and MPEG-TS's are lengths."""
    if not container.format.name.startswith("matroska"):
        return False
    return _per_file(_matroska_muxing_app, path).startswith("Lavf")


def _declared_end_s(path, container, stream, start_s: float, otherwise: float) -> float:
    """Where a stream starting at `start_s` on the clip's timeline says it ends: after its duration, except in
    FFmpeg's Matroska, where a stream's duration is, as the file's (_duration_is_an_end), where it ends on the
    file's timeline; `otherwise` where it declares none."""
    if not stream.duration:
        return otherwise
    duration_s = float(stream.duration * stream.time_base)
    if _duration_is_an_end(path, container):
        duration_s -= float((stream.start_time or 0) * stream.time_base)
    return start_s + duration_s


def _header_warnings(info: ClipInfo, window_chosen: bool = False) -> list[str]:
    warnings = []
    end_s = info.start_s + info.seconds
    if info.segments < info.seconds:
        warnings.append(f"{info.path}: {info.duration_s - info.start_s:.2f} s from {info.start_s:g} s is shorter "
                        f"than {info.seconds} s: segments {info.segments}..{info.seconds - 1} repeat the last frame, "
                        f"with silence after {info.duration_s:.2f} s")
    elif info.indexing == "wall-clock" and not window_chosen and info.duration_s > end_s:
        warnings.append(f"{info.path}: {info.duration_s:.2f} s is longer than the window: only "
                        f"{info.start_s:g}-{end_s:g} s is used (`bmfn localize` reads every window of a video; from "
                        "Python, decode_clip's start_s picks another)")
    if info.video_streams > 1 or info.audio_streams > 1:
        audio = "none" if info.audio_index is None else f"#{info.audio_index} ({info.audio_codec}" + (
            f" {info.sample_rate} Hz)" if info.sample_rate else ")")
        warnings.append(f"{info.path}: {info.video_streams} video and {info.audio_streams} audio streams: using video "
                        f"#{info.video_index} ({info.video_codec} {info.width}x{info.height}) and audio {audio}")
    return warnings


def _decode_frames(path, container, info: ClipInfo, frames_per_second: int, warnings: list[str],
                   video_decoder: str = "cpu") -> np.ndarray:
    """Stream the video once; convert and resize only the sampled frames. Indices past the end reuse the last frame."""
    stream = next(s for s in container.streams.video if s.index == info.video_index)
    stream.codec_context.thread_type = "AUTO"
    stream.codec_context.thread_count = DECODER_THREADS
    positions: dict[int, list[tuple[int, int]]] = {}
    for segment in range(info.segments):
        for sample, index in enumerate(segment_frame_indices(info, segment, frames_per_second=frames_per_second)):
            positions.setdefault(index, []).append((segment, sample))
    wanted_max = max(positions)
    out = np.zeros((info.seconds, frames_per_second, FRAME_SIZE, FRAME_SIZE, 3), np.uint8)
    nvcodec_device = nvcodec.device_of(video_decoder)
    if nvcodec_device is not None:
        refusal = _nvcodec_frames(path, stream, info, positions, out, nvcodec_device)
        if refusal is None:
            out[info.segments:] = out[info.segments - 1, -1]
            return out
        warnings.append(f"{path}: video decoded on the CPU, not by nvcodec: {refusal}")
    by_time = info.variable_frame_rate  # frames picked by their times (module docstring)
    if by_time:
        warnings.append(f"{path}: a variable frame rate (its frames' times stray up to {info.frame_time_drift_s:.2f} "
                        f"s from a steady {info.fps:.3f} fps): frames are picked by their times")
    index, previous, first = _seek_index(container, stream, info), None, None
    try:
        for frame in container.decode(stream):
            if by_time and (frame.pts is None or previous is not None and frame.pts <= previous.pts):
                by_time = False  # times that go back (files joined, each from 0) are no timeline: count from here
            if previous is None and index is not None and frame.pts is not None:
                # A recording cut mid-GOP: the pictures before its first keyframe are dropped, so its first frame
                # comes seconds after its stream's start, and is counted from its time.
                timed = _frame_index(frame.pts, stream, info)
                if timed - (index + 1) > _drift_limit(info.frame_rate):
                    index = timed - 1
            if index is None or by_time:
                slot = _frame_index(frame.pts, stream, info)
                if previous is not None and slot <= index:  # within the slot of the frame before: later on screen
                    previous = frame
                    continue
                if previous is not None:  # the frame before stayed on screen for the slots in between
                    held = [spot for j in range(index + 1, slot) for spot in positions.pop(j, [])]
                    image = _resize(previous) if held else None
                    for segment, sample in held:
                        out[segment, sample] = image
                index = slot
            else:
                index += 1
            if first is None:
                first = index, frame
            previous = frame
            spots = positions.pop(index, [])
            if spots:
                image = _resize(frame)
                for segment, sample in spots:
                    out[segment, sample] = image
            if not positions:
                break
    except av.error.FFmpegError as exc:
        raise BmfnError(f"{path}: corrupt or truncated video ({_reason(exc)})") from None
    if previous is None:
        raise BmfnError(f"{path}: no video frame could be decoded (corrupt or truncated)")
    before = {i: spots for i, spots in positions.items() if i < first[0]}
    if before:  # the video starts later than the sound (or a seek landed past the window): show its first frame
        reason = (f"the video starts {info.video_start_s:.2f} s after the sound" if info.video_start_s
                  else f"frame {min(before)} wanted but the first decoded is {first[0]}")
        warnings.append(f"{path}: {reason}: the seconds before show its first frame")
        image = _resize(first[1])
        for i, spots in before.items():
            del positions[i]
            for segment, sample in spots:
                out[segment, sample] = image
    if positions:
        decoded_s = float((index + 1) / info.frame_rate)
        if by_time and previous.pts is not None and previous.duration:  # a last frame held for seconds
            decoded_s = max(decoded_s, _frame_seconds(previous.pts + previous.duration, stream, info))
        declared_s = _declared_end_s(path, container, stream, info.video_start_s, info.duration_s)  # the sound
        # may go on after it
        cover = bool(stream.disposition & av.stream.Disposition.attached_pic)  # one picture for the whole file
        if (not cover and decoded_s < min(declared_s, info.start_s + info.segments) - TRUNCATION_TOLERANCE_S
                and (stream.duration or _designed_end(path, container, stream.index) is None)):
            raise BmfnError(f"{path}: truncated or corrupt: video stops at {decoded_s:.2f} s of {declared_s:.2f} s")
        if cover:
            warnings.append(f"{path}: a cover picture, shown throughout")
        elif not by_time:
            warnings.append(f"{path}: frame {wanted_max} wanted but only {index + 1} frames decode: the last is "
                            "repeated")
        elif wanted_max / info.frame_rate >= decoded_s + TRUNCATION_TOLERANCE_S:
            warnings.append(f"{path}: frames are wanted until {float(wanted_max / info.frame_rate):.2f} s and the "
                            f"video ends at {decoded_s:.2f} s: its last frame is repeated")
        last = _resize(previous)
        for spots in positions.values():
            for segment, sample in spots:
                out[segment, sample] = last
    out[info.segments:] = out[info.segments - 1, -1]
    return out


def _nvcodec_frames(path, stream, info: ClipInfo, positions: dict[int, list[tuple[int, int]]], out: np.ndarray,
                    device: int) -> str | None:
    """Fill `out` with the sampled frames as NVDEC decodes them through nvcodec.py: None when done, else why the CPU
    decoder must decode this file (what was filled is then overwritten).

    NVDEC's frames stand for the CPU decoder's only where both are known to give the same frames in the same order:
    an MP4 or MOV file (the library counts frames from its header; Matroska's has no count) whose only video stream
    is in a codec both decode exactly (nvcodec.EXACT_CODECS), as progressive 8-bit 4:2:0 pictures of even size,
    read from its start, with a frame at every wanted index before its end. And on every file, each frame's time
    must be the one the CPU decoder's frame at its place has, and the first frame must equal the CPU decoder's in
    every plane (the same crop, the same pixels). The library's getPTS() gives a frame's packet's decoding time, not
    its presentation time (seen on an H100: every time it gave for four files with B-frames was that), so the
    decoding times are compared, and only they: a file whose decoding times are its presentation times moved by
    whole frames would otherwise take NVDEC's frames shifted by as many (a still opening passes the first frame's
    check); a library that gave presentation times would have such files refused, not misread.
    The rest of a short or late video (its last frame repeated, its first shown early) is the CPU path's."""
    codec, starts_at = stream.codec_context, round(Fraction(info.video_start_s) * info.frame_rate)
    refusal = (f"a {info.container.split(',')[0]} file, not MP4 or MOV" if not info.container.startswith("mov,mp4")
               else f"{codec.name} video (NVDEC matches FFmpeg on {', '.join(sorted(nvcodec.EXACT_CODECS))})"
               if codec.name not in nvcodec.EXACT_CODECS else
               f"{codec.format.name if codec.format else 'unknown'} pixels, not yuv420p"
               if codec.format is None or codec.format.name != "yuv420p" else
               "interlaced video" if codec.field_order > FIELD_ORDER_PROGRESSIVE else
               f"an odd size, {info.width}x{info.height}" if info.width % 2 or info.height % 2 else
               "a window after the file's start" if info.start_s else
               f"{info.video_streams} video streams" if info.video_streams > 1 else
               "the video starts after the sound" if min(positions) < starts_at else
               f"PyNvVideoCodec failed on the last {nvcodec.MAX_FAILURES} files" if not nvcodec.usable() else None)
    if refusal:
        return refusal
    try:
        with _open(path) as container:
            like, times, decode_times = _cpu_display_times(container, info.video_index)
    except (av.error.FFmpegError, BmfnError):
        return "its packets cannot be read ahead"  # the CPU path says why, or reads what it can
    if isinstance(times, str):
        return times
    if like.interlaced_frame:
        return "interlaced video"
    if info.variable_frame_rate:
        return "a variable frame rate (the CPU path picks its frames by their times)"
    pending, index, count = dict(positions), starts_at - 1, 0
    decoded = nvcodec.frames(str(path), device)
    try:
        while pending:
            try:  # the library's part: its errors are RuntimeErrors of many texts
                pts, frame = next(decoded, (None, None))
                planes = nvcodec.host_planes(frame) if frame is not None and (not count or index + 1 in pending) \
                    else None
            except Exception as exc:
                nvcodec.record(False)
                return f"PyNvVideoCodec failed ({type(exc).__name__}: {(str(exc).strip() or '?').splitlines()[0]})"
            if frame is None:
                break
            if count >= len(times) or pts != decode_times[count]:
                return (f"NVDEC's frame {count} is at {pts}, the CPU decoder's is decoded at "
                        f"{decode_times[count] if count < len(times) else 'none'} (the decoding times NVDEC gives, "
                        "in the stream's time base)")
            if not count and (planes.shape != (like.height * 3 // 2, like.width) or not np.array_equal(
                    planar_from_nv12(planes, like.height, like.width), like.to_ndarray())):
                return f"NVDEC's first frame ({planes.shape[1]}x{planes.shape[0] * 2 // 3}) is not the CPU decoder's"
            index, count = index + 1, count + 1
            spots = pending.pop(index, None)
            if spots:
                image = _resize(yuv420p_from_nv12(planes, like), shown_as=like)
                for segment, sample in spots:
                    out[segment, sample] = image
    finally:
        decoded.close()
    nvcodec.record(True)
    if pending:
        return f"frame {max(pending)} is wanted and NVDEC decodes {index + 1}"
    return None


def _cpu_display_times(container, stream_index: int) -> tuple[av.VideoFrame | None, list[int] | str, list[int]]:
    """The CPU decoder's first frame, from the packets the presentation times of the frames it gives in order, and
    each one's packet's decoding time: those of the packets it does not discard, sorted, from the first frame's on
    (frames before it, such as an open GOP's leading pictures, it drops). Instead of the times, why they cannot
    stand for the CPU decoder's: a packet without a time, or one of zeros, a damaged download's never-written
    stretch, which the CPU decoder refuses and NVDEC might pass over."""
    stream = next(s for s in container.streams.video if s.index == stream_index)
    first, packets, problem = None, [], ""
    for packet in container.demux(stream):
        if packet.size == 0:  # the flush packet at the end
            continue
        if packet.pts is None:
            problem = "its packets' times are unknown"
        elif not np.frombuffer(packet, np.uint8).any():
            problem = "a packet of zeros (a damaged download)"
        elif not packet.is_discard:
            packets.append((packet.pts, packet.dts))
        if first is None:
            first = next(iter(packet.decode()), None)
    if first is None:
        first = next(iter(stream.decode(None)), None)
    if first is None or first.pts is None:
        return first, "no frame decodes" if first is None else "its frames' times are unknown", []
    shown = sorted((pts, dts) for pts, dts in packets if pts >= first.pts)
    return first, problem or [pts for pts, _ in shown], [dts for _, dts in shown]


def _designed_end(path, container, stream_index: int) -> Fraction | None:
    """Where the stream's packets end (container time), if it ends early by the file's design, not because the file
    was cut or damaged: another video or sound stream goes on TRUNCATION_TOLERANCE_S or more past it (a sound that
    stops before its video, a late start), or the file is a Matroska/WebM whose elements are all intact (a
    download's never-written stretch is zeros, a cut file ends early) and the stream's packets reach its declared
    end (a last picture held for seconds) or a subtitle's do (a caption outlasting the picture and sound). Else None:
    a cut or damaged file's streams all stop where the damage begins, or skip it (a subtitle's packet spans its
    display time, which may run past the damage). Asked only where a stream ends early and its container declares no
    duration of its own (Matroska, WebM)."""
    ends = _per_file(_packet_ends, path)
    own = ends.av.get(stream_index)
    if own is None:
        return None
    declared_end = None
    if container.duration:
        start = 0 if _duration_is_an_end(path, container) else (container.start_time or 0)
        declared_end = Fraction(container.duration + start, av.time_base)
    tolerance = Fraction(TRUNCATION_TOLERANCE_S)
    if max(ends.av.values()) - own >= tolerance:
        return own
    # The packets after a damaged stretch are found again, and reach the end: only the file's structure tells.
    reaches = declared_end is not None and own >= declared_end - tolerance
    captioned = declared_end is not None and ends.subtitles is not None and ends.subtitles >= declared_end - tolerance
    return own if (reaches or captioned) and _per_file(_matroska_intact, path) else None


def _per_file(read: Callable[..., _T], path, *args) -> _T:
    """read(path, size, mtime_ns, *args): a per-file cache's key, so that a changed file is read again."""
    stat = os.stat(path)
    return read(os.fspath(path), stat.st_size, stat.st_mtime_ns, *args)


@functools.lru_cache(maxsize=4)
def _matroska_muxing_app(path: str, size: int, mtime_ns: int) -> str:
    """The library that wrote a Matroska/WebM file ("Lavf..." for FFmpeg's, "libebml ... + libmatroska ..." for
    mkvmerge), from its Segment's Info; '' for another format or where the Info is not among its first bytes."""
    with open(path, "rb") as f:
        data = f.read(MATROSKA_HEAD_BYTES)
    try:
        element, size, at = _element(data, 0)
        if element != EBML_HEADER_ID:
            return ""
        element, size, at = _element(data, at + size)
        while element != MATROSKA_INFO_ID:
            if element not in (MATROSKA_SEGMENT_ID, *MATROSKA_SEGMENT_CHILDREN) or element == MATROSKA_CLUSTER_ID:
                return ""
            element, size, at = _element(data, at if element == MATROSKA_SEGMENT_ID else at + size)
        end = at + size
        while at < end:
            element, size, at = _element(data, at)
            if element == MATROSKA_MUXING_APP_ID:
                return data[at:at + size].decode("utf-8", "replace")
            at += size
    except (IndexError, ValueError, TypeError):
        pass
    return ""


@functools.lru_cache(maxsize=4)
def _matroska_intact(path: str, size: int, mtime_ns: int) -> bool:
    """Whether a Matroska/WebM file's elements follow each other by their declared sizes from its Segment's start to
    its end, the Clusters' blocks included: a cut file's run past its last byte, and a stretch never written (zeros)
    is no element. False where it cannot tell (another format, an element of unknown size: a file written live)."""
    try:
        with open(path, "rb") as f:
            element, length, at = _element_in(f, 0)
            segment, length, at = _element_in(f, at + length)
            if (element, segment) != (EBML_HEADER_ID, MATROSKA_SEGMENT_ID) or at + length > size:
                return False
            end = at + length
            while at < end:
                element, length, at = _element_in(f, at)
                if element not in MATROSKA_SEGMENT_CHILDREN:
                    return False
                if element == MATROSKA_CLUSTER_ID:
                    child_at = at
                    while child_at < at + length:
                        child, child_length, child_at = _element_in(f, child_at)
                        if child not in MATROSKA_CLUSTER_CHILDREN:
                            return False
                        child_at += child_length
                    if child_at != at + length:
                        return False
                at += length
            return at == end
    except (IndexError, ValueError, TypeError):
        return False


def _element_in(f, at: int) -> tuple[int, int, int]:
    """The EBML element at byte `at` of the open file `f` (see _element), where its data begins in the file."""
    f.seek(at)
    element, length, end = _element(f.read(16), 0)
    return element, length, at + end


def _element(data: bytes, at: int) -> tuple[int, int, int]:
    """The EBML element at `at`: its ID, its size (TypeError where unknown: all its bits set) and where its data
    begins."""
    element, at = _ebml_number(data, at, keep_marker=True)
    size, at = _ebml_number(data, at)
    if size is None:
        raise TypeError("an element of unknown size")
    return element, size, at


def _ebml_number(data: bytes, at: int, keep_marker: bool = False) -> tuple[int | None, int]:
    """The EBML variable-length number at `at` and where it ends: an element ID keeps its length marker; a size
    does not, and is None where all its bits are set (unknown)."""
    length = 9 - data[at].bit_length()  # the marker is the first set bit
    if length > 8 or at + length > len(data):
        raise ValueError("not an EBML number")
    raw = int.from_bytes(data[at:at + length], "big")
    if keep_marker:
        return raw, at + length
    value = raw & ((1 << 7 * length) - 1)
    return (None if value == (1 << 7 * length) - 1 else value), at + length


class _PacketEnds(NamedTuple):
    av: dict[int, Fraction]  # each video and sound stream's last packet end (container time)
    subtitles: Fraction | None  # the subtitles' last end


@functools.lru_cache(maxsize=4)
def _packet_ends(path: str, size: int, mtime_ns: int) -> _PacketEnds:
    """Where each video, sound and subtitle stream's packets end, demuxing the whole file without decoding: once per
    file, not once per window of a long video."""
    ends: dict[int, Fraction] = {}
    try:
        with _open(path) as container:
            av_streams = (*container.streams.video, *container.streams.audio)
            subtitle_indices = [s.index for s in container.streams.subtitles]  # streams outlive no container
            av_indices = [s.index for s in av_streams]
            for packet in container.demux(*av_streams, *container.streams.subtitles):
                time = packet.pts if packet.pts is not None else packet.dts
                if time is not None:  # the demuxer's flush packets have none
                    end = (time + (packet.duration or 0)) * packet.time_base
                    ends[packet.stream.index] = max(end, ends.get(packet.stream.index, end))
    except (av.error.FFmpegError, BmfnError):
        return _PacketEnds({}, None)
    return _PacketEnds({i: ends[i] for i in av_indices if i in ends},
                       max((ends[i] for i in subtitle_indices if i in ends), default=None))


def _seek_index(container, stream, info: ClipInfo) -> int | None:
    """The index before the first frame when decoding from the start (frames are then counted, from where the video
    starts on the clip's timeline); None after seeking to a window (indices from pts)."""
    if info.start_s == 0:
        return round(Fraction(info.video_start_s) * info.frame_rate) - 1
    within = max(Fraction(0), Fraction(info.start_s) - Fraction(info.video_start_s))  # time into the video stream
    target = int((within + (stream.start_time or 0) * stream.time_base) / stream.time_base)
    try:
        container.seek(target, stream=stream, backward=True, any_frame=False)
    except av.error.FFmpegError as exc:  # e.g. a Matroska video whose packets have no times
        raise BmfnError(f"{info.path}: cannot seek to {info.start_s:g} s ({_reason(exc)})") from None
    return None


def _drift_limit(frame_rate: Fraction) -> float:
    """How many frames a frame's time may be off its count before the video counts as one of a variable rate."""
    return max(1.0, VFR_DRIFT_S * float(frame_rate))


def _frame_time_drift(path, stream, frame_rate: Fraction) -> float:
    """The most, in frames at `frame_rate`, that a video frame's presentation time strays from its count (from the
    first frame's): its packets' times, sorted (frames come out of a decoder in that order; files without
    presentation times, such as AVI, give their packets' decoding order, which is steady)."""
    times = _per_file(_video_packet_times, path, stream.index)
    if len(times) < 2 or not stream.time_base:
        return 0.0
    offsets = (times - times[0]) * (float(stream.time_base) * float(frame_rate))
    return float(np.abs(offsets - np.arange(len(times))).max())


@functools.lru_cache(maxsize=4)
def _video_packet_times(path: str, size: int, mtime_ns: int, stream_index: int) -> np.ndarray:
    """A video stream's packet presentation times, sorted (int64, its time base), demuxing the whole file without
    decoding: once per file, not once per window of a long video."""
    try:
        with _open(path) as container:
            stream = next(s for s in container.streams.video if s.index == stream_index)
            times = [packet.pts for packet in container.demux(stream) if packet.pts is not None and packet.size]
    except (av.error.FFmpegError, BmfnError):
        return np.zeros(0, np.int64)
    return np.sort(np.array(times, np.int64))


def _frame_seconds(pts: int, stream, info: ClipInfo) -> Fraction:
    """A presentation time as seconds on the clip's timeline."""
    return (pts - (stream.start_time or 0)) * stream.time_base + Fraction(info.video_start_s)


def _frame_index(pts: int, stream, info: ClipInfo) -> int:
    """Frame index at the nominal rate on the clip's timeline from a presentation time: where a seek lands, and in
    a video of a variable rate."""
    return round(_frame_seconds(pts, stream, info) * info.frame_rate)


def _resize(frame: av.VideoFrame, shown_as: av.VideoFrame | None = None) -> np.ndarray:
    """features-reference.md 1.2: the uint8 RGB frame, OpenCV INTER_LINEAR to 224x224, no crop, shown upright (as
    `shown_as` says, for a frame rebuilt from another decoder's pixels).

    One swscale thread: PyAV otherwise starts a thread per core for every frame it converts, which costs more CPU
    than the conversion itself (0.5 vs 0.08 core-s per 720p clip), with the same pixels."""
    image = cv2.resize(_rgb(frame), (FRAME_SIZE, FRAME_SIZE), interpolation=cv2.INTER_LINEAR)
    return _upright(frame if shown_as is None else shown_as, image)


def _rgb(frame: av.VideoFrame) -> np.ndarray:
    """The frame as uint8 RGB [H, W, 3]. A frame that NVDEC left on the GPU is copied back first."""
    layout = getattr(frame, "sw_format", None)  # None for a CPU frame; PyAV before 18 has no GPU frames here
    if layout is not None and layout.name == "nv12" and frame.width % 2 == 0 == frame.height % 2:
        return yuv420p_from_nv12(frame.to_ndarray(), frame).to_ndarray(format="rgb24", threads=1)
    # CPU frames; NVDEC's other layouts (10-bit p010) as they come, not checked against the CPU decoder's pixels
    return frame.to_ndarray(format="rgb24", threads=1)


def yuv420p_from_nv12(planes: np.ndarray, like: av.VideoFrame) -> av.VideoFrame:
    """NV12 planes [H*3/2, W] (NVDEC's output: U and V interleaved) as the yuv420p frame FFmpeg's CPU decoders give,
    with `like`'s colour tags. swscale converts the two layouts to RGB differently (from NV12 it interpolates
    chroma: up to 25 levels apart on AVE clips), and the same from this rearrangement: the features stay the same."""
    frame = av.VideoFrame.from_ndarray(planar_from_nv12(planes, like.height, like.width), format="yuv420p")
    frame.colorspace, frame.color_range = like.colorspace, like.color_range
    return frame


def planar_from_nv12(planes: np.ndarray, height: int, width: int) -> np.ndarray:
    """NV12 planes [H*3/2, W] as yuv420p's [H*3/2, W] (PyAV's array of a yuv420p frame): Y, then U, then V."""
    chroma = planes[height:].reshape(height // 2, width // 2, 2)
    planar = np.concatenate([planes[:height].reshape(-1), chroma[..., 0].reshape(-1), chroma[..., 1].reshape(-1)])
    return planar.reshape(height * 3 // 2, width)


# What FFmpeg's autorotate inserts to show a frame as its display matrix says, on an [H, W, 3] image.
DISPLAY_FILTERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "transpose=clock": lambda image: np.rot90(image, -1),
    "transpose=cclock": lambda image: np.rot90(image, 1),
    "transpose=cclock_flip": lambda image: image.transpose(1, 0, 2),
    "transpose=clock_flip": lambda image: np.rot90(image, -1)[::-1],
    "hflip": lambda image: image[:, ::-1],
    "vflip": lambda image: image[::-1],
}


def display_filters(frame: av.VideoFrame) -> list[str]:
    """The DISPLAY_FILTERS that FFmpeg's autorotate (fftools) applies to show `frame` upright: none without a
    display matrix; quarter turns and flips from it (other angles are left as they are)."""
    data = frame.side_data.get(av.sidedata.sidedata.Type.DISPLAYMATRIX)  # by type: PyAV 19 iterates types, 18 data
    if data is None:
        return []
    matrix = np.frombuffer(memoryview(data), np.int32)
    turn = -round(frame.rotation) % 360  # clockwise degrees, FFmpeg's get_rotation
    a, c, d = matrix[0], matrix[3], matrix[4]  # 16.16 fixed point, [a b u; c d v; x y w]
    if turn == 90:
        return ["transpose=cclock_flip" if c > 0 else "transpose=clock"]
    if turn == 270:
        return ["transpose=clock_flip" if c < 0 else "transpose=cclock"]
    if turn == 180:
        return [name for name, flip in (("hflip", a < 0), ("vflip", d < 0)) if flip]
    return ["vflip"] if turn == 0 and d < 0 else []


def _upright(frame: av.VideoFrame, image: np.ndarray) -> np.ndarray:
    """`image` (the resized frame) as players show it: a frame stored sideways or mirrored with a display matrix
    (phone videos) is turned and flipped as FFmpeg's autorotate does, so VGG-19 sees what a viewer sees. Turning the
    224x224 result equals resizing the turned frame (each axis keeps its own scale). AVE's YouTube clips carry no
    display matrix."""
    filters = display_filters(frame)
    for name in filters:
        image = DISPLAY_FILTERS[name](image)
    return np.ascontiguousarray(image) if filters else image


def _channel_mean(frame: av.AudioFrame) -> np.ndarray:
    """A packed s16 frame's channel mean, [samples] in [-1, 1]. Packed, not planar: PyAV 18 gives a planar frame of
    8 channels a ninth plane, and its to_ndarray() then crashes the process."""
    return (frame.to_ndarray().reshape(-1, len(frame.layout.channels)) / INT16_SCALE).mean(axis=1)


def _finite(frame: av.AudioFrame) -> tuple[av.AudioFrame, int]:
    """A float frame with its NaN and infinite samples made silent, and how many there were. FFmpeg's conversion to
    s16 makes each of them full scale (NaN and +inf alike become -1): a damaged float track clicked in VGGish's
    input. Other frames, and clean ones (all of a healthy file's), are returned as they are."""
    dtype = FLOAT_SAMPLES.get(frame.format.name)
    if dtype is None:
        return frame, 0
    channels = len(frame.layout.channels)
    # Planar: one plane per channel (PyAV 18 may list a ninth for 8 channels); packed: the channels interleaved.
    planes = [np.frombuffer(plane, dtype, count=frame.samples) for plane in frame.planes[:channels]] \
        if frame.format.is_planar else [np.frombuffer(frame.planes[0], dtype, count=frame.samples * channels)]
    if all(np.isfinite(plane.sum()) for plane in planes):  # NaN and infinity carry into a sum: a quicker check
        return frame, 0
    bad = sum(int(np.count_nonzero(~np.isfinite(plane))) for plane in planes)
    if not bad:  # finite samples whose sum overflowed
        return frame, 0
    clean = av.AudioFrame.from_ndarray(np.nan_to_num(np.stack(planes), nan=0.0, posinf=0.0, neginf=0.0),
                                       format=frame.format.name, layout=frame.layout.name)
    clean.sample_rate, clean.pts = frame.sample_rate, frame.pts
    if frame.time_base is not None:
        clean.time_base = frame.time_base
    return clean, bad


def _decode_audio(path, container, info: ClipInfo, warnings: list[str] | None = None) -> np.ndarray:
    """features-reference.md 2.1: native rate and layout quantised to s16, / 32768, channel mean, resampy's kaiser_best
    to 16 kHz (bmfn_pipeline.resample).

    The window plus a margin is decoded and resampled, then cut to [start_s, start_s + seconds): for a clip about
    `seconds` long from its start this is the whole clip, as for the released features.
    """
    stream = next(s for s in container.streams.audio if s.index == info.audio_index)
    rate = None  # the first frame's: a header may say 0 Hz (MPEG-TS's MP2 before its first packet is read)
    begin_s = max(0.0, info.start_s - AUDIO_MARGIN_S)
    end_s = info.start_s + info.seconds + AUDIO_MARGIN_S
    # Times below are on the clip's timeline, where the audio stream starts at info.audio_start_s.
    stream_start = (stream.start_time or 0) * stream.time_base - Fraction(info.audio_start_s)
    # From the clip's start, no seek: the demuxer's first packet may be an AAC encoder's priming packet before 0 s,
    # which a seek to 0 s skips, and the decoder's state, hence every later sample, would differ from decoding the
    # whole clip (features-reference.md 2.1; up to 0.036 at 16 kHz on an AVE clip). The container is fresh here.
    if begin_s > info.audio_start_s:
        try:
            container.seek(int((Fraction(begin_s) + stream_start) / stream.time_base), stream=stream, backward=True)
        except av.error.FFmpegError as exc:
            raise BmfnError(f"{path}: cannot seek to {begin_s:g} s in its sound ({_reason(exc)})") from None
    chunks, first_s, resampler, source, decoded, non_finite = [], None, None, None, 0, 0
    try:
        for frame in container.decode(stream):
            frame, bad = _finite(frame)
            non_finite += bad
            if resampler is None:
                rate = frame.sample_rate
                first_s = float(frame.pts * stream.time_base - stream_start) if frame.pts is not None else 0.0
            if (frame.format.name, frame.layout.name, frame.sample_rate) != source:
                # Format conversion only, at the first frame's rate, as ffmpeg writing a 16-bit wav would. A track
                # whose rate or layout changes (joined recordings) is converted to that rate from there on, each
                # part averaged over its own channels.
                if resampler is not None:
                    chunks.extend(_channel_mean(f) for f in resampler.resample(None))
                resampler = av.AudioResampler(format="s16", layout=frame.layout.name, rate=rate)
                source = frame.format.name, frame.layout.name, frame.sample_rate
            for converted in resampler.resample(frame):
                chunks.append(_channel_mean(converted))
                decoded += converted.samples
            if first_s + decoded / rate >= end_s:
                break
        if resampler is not None:
            chunks.extend(_channel_mean(f) for f in resampler.resample(None))
    except av.error.FFmpegError as exc:
        raise BmfnError(f"{path}: corrupt or truncated audio ({_reason(exc)})") from None
    if not chunks:  # a window after the sound has ended (Matroska's seek lands past its last packet), or a bad file
        end = None if stream.duration else _designed_end(path, container, stream.index)
        if end is None or float(end - stream_start) > info.start_s + TRUNCATION_TOLERANCE_S:
            raise BmfnError(f"{path}: no audio could be decoded (corrupt or truncated)")
        if warnings is not None:
            warnings.append(f"{path}: the sound ends at {float(end - stream_start):.2f} s: the seconds after are silent")
        return np.zeros(info.seconds * SAMPLE_RATE, np.float32)
    if warnings is not None and non_finite:
        warnings.append(f"{path}: NaN or infinity in {counted(non_finite, 'sound sample')} (a damaged float track): "
                        "silent there")
    mono = np.concatenate(chunks)
    decoded_end_s = first_s + mono.shape[0] / rate
    declared_s = _declared_end_s(path, container, stream, info.audio_start_s, info.duration_s)
    if (decoded_end_s < min(declared_s, end_s) - TRUNCATION_TOLERANCE_S
            and (stream.duration or _designed_end(path, container, stream.index) is None)):
        raise BmfnError(f"{path}: truncated or corrupt: audio stops at {decoded_end_s:.2f} s of {declared_s:.2f} s")
    content_end_s = min(info.duration_s, info.start_s + info.segments)
    if warnings is not None and info.audio_start_s > info.start_s:
        warnings.append(f"{path}: the sound starts {info.audio_start_s:.2f} s after the video: the seconds before "
                        "are silent")
    if warnings is not None and decoded_end_s < content_end_s - TRUNCATION_TOLERANCE_S:
        warnings.append(f"{path}: the sound ends at {decoded_end_s:.2f} s: the seconds after are silent")
    if rate != SAMPLE_RATE:
        mono = resample(mono, rate, SAMPLE_RATE)
    offset = round((info.start_s - first_s) * SAMPLE_RATE)
    window = np.zeros(info.seconds * SAMPLE_RATE, np.float32)
    piece = mono[max(offset, 0):max(offset, 0) + window.size - max(-offset, 0)]
    window[max(-offset, 0):max(-offset, 0) + piece.size] = piece
    return window
