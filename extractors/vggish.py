"""VGGish audio embeddings as used by the released AVE features: Google's log-mel front end and the post-ReLU network.

The front end is a numpy float64 re-implementation of Google's `mel_features.py` / `vggish_input.py`
(features-reference.md §2.1-2.3); the network matches the state_dict layout of torchvggish's `vggish-10086976.pth`
(§2.4, §2.7) and keeps the final ReLU (§2.5). PCA and 8-bit quantisation (§2.6) are off unless asked for.
"""

from __future__ import annotations

import functools
import pickle
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from bmfn_pipeline.ave import SEGMENTS
from bmfn_pipeline.errors import BmfnError
from bmfn_pipeline.resample import resample
from extractors.vgg19 import vgg_layers
from extractors.weights import random_weights_provenance, weight_path, weights_provenance

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
EMBEDDING_SIZE = 128
QUANTIZE_MIN = -2.0  # QUANTIZE_MIN_VAL, §2.6
QUANTIZE_MAX = 2.0  # QUANTIZE_MAX_VAL, §2.6
QUANTIZE_LEVELS = 255  # 8-bit codes, §2.6
# HTK mel scale m(f) = 1127 ln(1 + f/700), mel_features.py (§2.2 step 4)
MEL_BREAK_HZ = 700.0
MEL_HIGH_Q = 1127.0
FRAMES_PER_SECOND = SAMPLE_RATE // STFT_HOP_SAMPLES  # 100 frames per second: exact windows start every 100 frames

# --- network (§2.4) ---
CONV_CHANNELS = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M")  # torchvggish features.{0,3,6,8,11,13}
POOL4_SHAPE = (6, 4)  # 96x64 halved four times
FC_SIZE = 4096
ALIGNMENTS = ("ave", "exact")

# --- random weights (issue 3) ---
# Kaiming-normal fan_in init keeps the activations' second moment at that of the log-mel input through every layer:
# embeddings of real sounds (AVE clips, farm animals; four seeds) come out with mean ~1.7, std ~2.6, while random
# VGG-19 pool5 maps (vgg19.py: Kaiming fan_out, caffe input; real frames, four seeds) have mean ~4.5, std ~6. Training
# on random features needs the two modalities on one scale (issue 3), so fc2 is scaled to put the audio in that range.
# Released weights need no gain: they give the released scale (mean 0.12, std 0.26, §2.5).
RANDOM_EMBEDDING_GAIN = 2.5


# ----------------------------------------------------------------------------------------------- front end


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


# ----------------------------------------------------------------------------------------------- network


class VGGish(nn.Module):
    """VGGish with torchvggish's state_dict layout; [n, 96, 64] or [n, 1, 96, 64] log-mel -> [n, 128] post-ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.features = vgg_layers(CONV_CHANNELS, in_channels=1)
        self.embeddings = nn.Sequential(
            nn.Linear(CONV_CHANNELS[-2] * POOL4_SHAPE[0] * POOL4_SHAPE[1], FC_SIZE),
            nn.ReLU(inplace=True),
            nn.Linear(FC_SIZE, FC_SIZE),
            nn.ReLU(inplace=True),
            nn.Linear(FC_SIZE, EMBEDDING_SIZE),
            nn.ReLU(inplace=True),  # the 2017/2018 fc2 had a ReLU: the AVE features are post-ReLU (§2.5)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        x = self.features(x)
        # TF flattened NHWC: index (h*4 + w)*512 + c (§2.4)
        x = x.permute(0, 2, 3, 1).flatten(1)
        return self.embeddings(x)


class Postprocessor(nn.Module):
    """PCA whitening and 8-bit quantisation of AudioSet (§2.6); NOT what the AVE features use."""

    def __init__(self, eigen_vectors: torch.Tensor, means: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("pca_eigen_vectors", eigen_vectors.to(torch.float32))
        self.register_buffer("pca_means", means.reshape(-1).to(torch.float32))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        pca = (embeddings - self.pca_means) @ self.pca_eigen_vectors.T
        clipped = pca.clamp(QUANTIZE_MIN, QUANTIZE_MAX)
        # TF truncates to uint8 (torchvggish rounds instead): codes 0..255 as floats
        return torch.floor((clipped - QUANTIZE_MIN) * (QUANTIZE_LEVELS / (QUANTIZE_MAX - QUANTIZE_MIN)))


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError) as err:
        raise BmfnError(f"{path}: not a readable PyTorch weight file ({type(err).__name__})") from err
    if not isinstance(state, dict):
        raise BmfnError(f"{path}: expected a state_dict, found {type(state).__name__}")
    return state


def vggish_from_file(path: str | Path) -> VGGish:
    """VGGish with the weights of a torchvggish-layout file (`vggish-10086976.pth`); a wrong layout names the file."""
    path = Path(path)
    state = _load_state_dict(path)
    model = VGGish()
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    found = {key: tuple(value.shape) for key, value in state.items() if isinstance(value, torch.Tensor)}
    if found != expected:
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
        problem = "; ".join(
            f"{label}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
            for label, keys in (("missing", missing), ("unexpected", extra), ("wrong shape", wrong))
            if keys
        )
        raise BmfnError(f"{path}: not a VGGish state_dict in the torchvggish layout ({problem})")
    model.load_state_dict(state)
    return model.eval()


def random_vggish(seed: int) -> VGGish:
    """Seeded random VGGish whose embeddings vary with the sound, on the random visual maps' scale (tests, demos).

    Kaiming-normal (fan_in, ReLU) for every conv and linear layer, zero biases: variance-preserving, where PyTorch's
    default init shrinks the activations layer by layer; fc2 is then scaled by RANDOM_EMBEDDING_GAIN (with zero biases
    the network is positively homogeneous, so this scales the embedding exactly).
    """
    generator = torch.Generator().manual_seed(seed)
    model = VGGish()
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu", generator=generator)
            nn.init.zeros_(module.bias)
    with torch.no_grad():
        model.embeddings[4].weight.mul_(RANDOM_EMBEDDING_GAIN)
    return model.eval()


# The globals a pickled float numpy array refers to; files written under numpy 1.x name numpy.core.
_NUMPY_RECONSTRUCT = (getattr(np, "_core", None) or np.core).multiarray._reconstruct
_NUMPY_PICKLE_GLOBALS = [
    np.ndarray,
    np.dtype,
    np.dtypes.Float32DType,
    np.dtypes.Float64DType,
    _NUMPY_RECONSTRUCT,
    (_NUMPY_RECONSTRUCT, "numpy.core.multiarray._reconstruct"),
]


def postprocessor_from_file(path: str | Path) -> Postprocessor:
    """The PCA parameters of `vggish_pca_params-970ea276.pth` (keys pca_eigen_vectors [128,128], pca_means [128])."""
    path = Path(path)
    try:
        params = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # The release pickles numpy arrays (§2.7), which the weights-only unpickler rejects by default; allow exactly
        # the numpy array reconstruction it needs instead of falling back to unrestricted unpickling.
        try:
            with torch.serialization.safe_globals(_NUMPY_PICKLE_GLOBALS):
                params = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, pickle.UnpicklingError, EOFError) as err:
            raise BmfnError(f"{path}: not a readable VGGish PCA parameter file ({type(err).__name__})") from err
    except (OSError, RuntimeError, EOFError) as err:
        raise BmfnError(f"{path}: not a readable VGGish PCA parameter file ({type(err).__name__})") from err
    try:
        vectors = torch.as_tensor(np.asarray(params["pca_eigen_vectors"]), dtype=torch.float32)
        means = torch.as_tensor(np.asarray(params["pca_means"]), dtype=torch.float32).reshape(-1)
    except (KeyError, TypeError, IndexError) as err:
        raise BmfnError(f"{path}: expected a dict with pca_eigen_vectors and pca_means") from err
    if vectors.shape != (EMBEDDING_SIZE, EMBEDDING_SIZE) or means.shape != (EMBEDDING_SIZE,):
        raise BmfnError(
            f"{path}: PCA shapes {tuple(vectors.shape)} and {tuple(means.shape)}, expected [128,128] and [128]"
        )
    return Postprocessor(vectors, means)


# ----------------------------------------------------------------------------------------------- extractor


class AudioExtractor:
    """A loaded VGGish and its framing: 16 kHz waveform -> [segments, 128] float32, with the provenance to record."""

    def __init__(
        self,
        model: VGGish,
        provenance: dict,
        postprocessor: Postprocessor | None = None,
        alignment: str = "ave",
        device: str | torch.device = "cpu",
    ) -> None:
        if alignment not in ALIGNMENTS:
            raise BmfnError(f"alignment {alignment!r}: expected one of {', '.join(ALIGNMENTS)}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.postprocessor = postprocessor.to(self.device) if postprocessor is not None else None
        self.alignment = alignment
        self.provenance = provenance

    @torch.inference_mode()
    def embed(self, examples: np.ndarray) -> np.ndarray:
        """[n, 96, 64] log-mel examples -> [n, 128] float32 embeddings (PCA codes when enabled)."""
        x = torch.as_tensor(np.asarray(examples, dtype=np.float32), device=self.device)
        out = self.model(x)
        if self.postprocessor is not None:
            out = self.postprocessor(out)
        return out.float().cpu().numpy()

    def __call__(self, waveform_16k: np.ndarray, segments: int = SEGMENTS) -> np.ndarray:
        return self.embed(segment_examples(waveform_16k, segments, self.alignment))

    def batch(self, waveforms: Sequence[np.ndarray], segments: int = SEGMENTS) -> np.ndarray:
        """[len(waveforms), segments, 128]: all clips' examples through the network in one pass."""
        examples = np.concatenate([segment_examples(w, segments, self.alignment) for w in waveforms])
        return self.embed(examples).reshape(len(waveforms), segments, EMBEDDING_SIZE)


def load_audio_extractor(
    weights: str | Path | None = None,
    random_seed: int | None = None,
    pca: bool = False,
    alignment: str = "ave",
    device: str | torch.device = "cpu",
    pca_weights: str | Path | None = None,
) -> AudioExtractor:
    """The AVE audio extractor: released VGGish weights (a local file, else cache/download), or seeded random ones.

    Random weights only when `random_seed` is given, never as a fallback; `pca=True` adds the PCA/uint8 step that
    AVE does not use (§2.6).
    """
    if random_seed is not None and weights is not None:
        raise BmfnError(f"{weights}: give VGGish weights or a random seed, not both")
    if random_seed is not None:
        model = random_vggish(random_seed)
        provenance: dict = random_weights_provenance(random_seed)
    else:
        path = weight_path("vggish", weights)
        model = vggish_from_file(path)
        provenance = weights_provenance("vggish", path)
    postprocessor = None
    if pca:
        pca_path = weight_path("vggish-pca", pca_weights)
        postprocessor = postprocessor_from_file(pca_path)
        pca_record = weights_provenance("vggish-pca", pca_path)
        provenance.update(pca_file=pca_record["file"], pca_checksum=pca_record["checksum"])
    provenance.update(alignment=alignment, pca=pca)
    return AudioExtractor(model, provenance, postprocessor, alignment, device)
