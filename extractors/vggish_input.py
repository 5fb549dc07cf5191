"""Google's VGGish log-mel front end (`mel_features.py` / `vggish_input.py`), numpy float64 only.

Separate from the network (extractors/vggish.py) so that decoding workers, which make the examples beside the
GPU, never import torch (features-reference.md §2.1-2.3).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np

from bmfn_pipeline.ave import SEGMENTS
from bmfn_pipeline.errors import BmfnError
from bmfn_pipeline.resample import resample

if TYPE_CHECKING:
    from bmfn_pipeline.decode import DecodedClip

# --- front-end constants: vggish_params.py (features-reference.md §2.2) ---
SAMPLE_RATE = 16000  # Hz, VGGish's input rate
STFT_WINDOW_SAMPLES = 400  # 0.025 s at 16 kHz
STFT_HOP_SAMPLES = 160  # 0.010 s at 16 kHz
FFT_LENGTH = 512  # next power of two >= STFT_WINDOW_SAMPLES, giving 257 bins
NUM_MEL_BANDS = 64  # NUM_MEL_BINS
MEL_MIN_HZ = 125.0
MEL_MAX_HZ = 7500.0
LOG_OFFSET = 0.01  # added before the natural log
EXAMPLE_FRAMES = 96  # NUM_FRAMES: 0.96 s of 10 ms frames
EXAMPLE_HOP_FRAMES = 96  # EXAMPLE_HOP_SECONDS 0.96: non-overlapping examples
# HTK mel scale m(f) = 1127 ln(1 + f/700), mel_features.py (§2.2 step 4)
MEL_BREAK_HZ = 700.0
MEL_HIGH_Q = 1127.0
FRAMES_PER_SECOND = SAMPLE_RATE // STFT_HOP_SAMPLES  # 100 frames per second: exact windows start every 100 frames

ALIGNMENTS = ("ave", "exact")


def _frame(data: np.ndarray, window: int, hop: int) -> np.ndarray:
    """Overlapping frames as a strided view: no padding, an incomplete tail is dropped (§2.2 step 1)."""
    count = 0 if len(data) < window else 1 + (len(data) - window) // hop
    shape = (count, window) + data.shape[1:]
    strides = (data.strides[0] * hop,) + data.strides
    return np.lib.stride_tricks.as_strided(data, shape=shape, strides=strides, writeable=False)


def periodic_hann(length: int = STFT_WINDOW_SAMPLES) -> np.ndarray:
    """Periodic Hann window, 0.5 - 0.5 cos(2 pi n / length), as in mel_features.py (not numpy's symmetric one)."""
    return 0.5 - 0.5 * np.cos(2.0 * np.pi / length * np.arange(length))


def hertz_to_mel(hertz: np.ndarray | float) -> np.ndarray:
    """HTK mel scale."""
    return MEL_HIGH_Q * np.log(1.0 + np.asarray(hertz, dtype=np.float64) / MEL_BREAK_HZ)


@functools.lru_cache(maxsize=1)
def mel_matrix() -> np.ndarray:
    """[257, 64] triangular weights with slopes in the mel domain, peak 1, DC row zeroed (§2.2 step 4)."""
    bins_mel = hertz_to_mel(np.linspace(0.0, SAMPLE_RATE / 2.0, FFT_LENGTH // 2 + 1))
    edges = np.linspace(hertz_to_mel(MEL_MIN_HZ), hertz_to_mel(MEL_MAX_HZ), NUM_MEL_BANDS + 2)
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bins_mel[:, None] - lower) / (centre - lower)
    falling = (upper - bins_mel[:, None]) / (upper - centre)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights[0, :] = 0.0
    weights.flags.writeable = False
    return weights


def log_mel_spectrogram(waveform_16k: np.ndarray) -> np.ndarray:
    """[frames, 64] float64 log(mel(|rfft(periodic-Hann frames, 512)|) + 0.01) of a mono 16 kHz waveform."""
    frames = _frame(np.asarray(waveform_16k, dtype=np.float64), STFT_WINDOW_SAMPLES, STFT_HOP_SAMPLES)
    magnitude = np.abs(np.fft.rfft(frames * periodic_hann(), FFT_LENGTH))
    return np.log(magnitude @ mel_matrix() + LOG_OFFSET)


def _to_mono_16k(data: np.ndarray, sample_rate: int) -> np.ndarray:
    """Mean over channels ([samples, channels], as vggish_input.py) and resampy kaiser_best to 16 kHz (§2.1)."""
    data = np.asarray(data, dtype=np.float64)
    if data.ndim > 1:
        data = data.mean(axis=1)
    if sample_rate != SAMPLE_RATE:
        data = resample(data, sample_rate, SAMPLE_RATE)  # vggish_input.py's resampy kaiser_best
    return data


def waveform_to_examples(data: np.ndarray, sample_rate: int) -> np.ndarray:
    """Google's vggish_input.waveform_to_examples: samples ([N] or [N, channels]) at any rate -> [n, 96, 64] float32.

    n = 1 + (frames - 96) // 96 non-overlapping examples (§2.3); a clip under 0.975 s gives none.
    """
    log_mel = log_mel_spectrogram(_to_mono_16k(data, sample_rate))
    return _frame(log_mel, EXAMPLE_FRAMES, EXAMPLE_HOP_FRAMES).astype(np.float32)


def _samples_for_frames(frames: int) -> int:
    """The fewest samples that give `frames` STFT frames."""
    return STFT_WINDOW_SAMPLES + STFT_HOP_SAMPLES * (frames - 1)


def segment_examples(waveform_16k: np.ndarray, segments: int = SEGMENTS, alignment: str = "ave") -> np.ndarray:
    """[segments, 96, 64] float32 examples of a mono 16 kHz waveform, one per segment.

    'ave' reproduces the released features (§2.3): the clip is framed whole into non-overlapping 0.96 s examples,
    example k covering [0.96k, 0.96k + 0.975) s. A clip long enough for more examples keeps the first `segments`
    (so a 10.575 s clip gives the same 10 as its first 10 s); a shorter one is padded at the end with silence (zeros)
    up to the 153,840 samples (9.615 s for 10 segments) that `segments` examples need.
    'exact' gives example k = the 96 frames starting at k s, i.e. samples [16000k, 16000k + 15600), padded the same way.
    """
    if alignment not in ALIGNMENTS:
        raise BmfnError(f"alignment {alignment!r}: expected one of {', '.join(ALIGNMENTS)}")
    if segments < 1:
        raise BmfnError(f"segments {segments}: expected at least 1")
    waveform = np.asarray(waveform_16k, dtype=np.float64)
    if waveform.ndim != 1:
        raise BmfnError(f"waveform of shape {waveform.shape}: expected mono [samples] at {SAMPLE_RATE} Hz")
    if alignment == "ave":
        starts = np.arange(segments) * EXAMPLE_HOP_FRAMES
    else:
        starts = np.arange(segments) * FRAMES_PER_SECOND
    needed = _samples_for_frames(int(starts[-1]) + EXAMPLE_FRAMES)
    waveform = np.pad(waveform[:needed], (0, max(0, needed - len(waveform))))
    log_mel = log_mel_spectrogram(waveform)
    return np.stack([log_mel[s : s + EXAMPLE_FRAMES] for s in starts]).astype(np.float32)


def with_examples(clip: DecodedClip, alignment: str) -> tuple[DecodedClip, np.ndarray]:
    """The clip and its [segments, 96, 64] examples: what decoding workers hand to `bmfn extract`."""
    return clip, segment_examples(clip.audio, clip.frames.shape[0], alignment)
