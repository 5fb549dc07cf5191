"""VGGish audio embeddings as used by the released AVE features: the post-ReLU network on the log-mel examples of
extractors/vggish_input.py (Google's front end, features-reference.md §2.1-2.3).

The network matches the state_dict layout of torchvggish's `vggish-10086976.pth` (§2.4, §2.7) and keeps the final
ReLU (§2.5). PCA and 8-bit quantisation (§2.6) are off unless asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from bmfn_pipeline.ave import SEGMENTS
from bmfn_pipeline.errors import BmfnError
from extractors.vgg19 import vgg_layers
from extractors.vggish_input import ALIGNMENTS, segment_examples
from extractors.weights import (random_weights_provenance, read_torch_file, uninitialised, weight_path,
                                weights_provenance)

# --- network (§2.4) ---
EMBEDDING_SIZE = 128
QUANTIZE_MIN = -2.0  # QUANTIZE_MIN_VAL, §2.6
QUANTIZE_MAX = 2.0  # QUANTIZE_MAX_VAL, §2.6
QUANTIZE_LEVELS = 255  # 8-bit codes, §2.6
CONV_CHANNELS = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M")  # torchvggish features.{0,3,6,8,11,13}
POOL4_SHAPE = (6, 4)  # 96x64 halved four times
FC_SIZE = 4096

# --- random weights (issue 3) ---
# Kaiming-normal fan_in init keeps the activations' second moment at that of the log-mel input through every layer:
# embeddings of real sounds (AVE clips, farm animals; four seeds) come out with mean ~1.7, std ~2.6, while random
# VGG-19 pool5 maps (vgg19.py: Kaiming fan_out, caffe input; real frames, four seeds) have mean ~4.5, std ~6. Training
# on random features needs the two modalities on one scale (issue 3), so fc2 is scaled to put the audio in that range.
# Released weights need no gain: they give the released scale (mean 0.12, std 0.26, §2.5).
RANDOM_EMBEDDING_GAIN = 2.5


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
    state = read_torch_file(path, "VGGish weight file", mmap=True)
    if not isinstance(state, dict):
        raise BmfnError(f"{path}: expected a state_dict, found {type(state).__name__}")
    return state


def vggish_from_file(path: str | Path) -> VGGish:
    """VGGish with the weights of a torchvggish-layout file (`vggish-10086976.pth`); a wrong layout names the file."""
    path = Path(path)
    state = _load_state_dict(path)
    model = uninitialised(VGGish)
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
    model.load_state_dict(state)  # copied from the mapped file: 0.1 s instead of 0.3 s for torch.load's read + copy
    return model.eval()


def random_vggish(seed: int) -> VGGish:
    """Seeded random VGGish whose embeddings vary with the sound, on the random visual maps' scale (tests, demos).

    Kaiming-normal (fan_in, ReLU) for every conv and linear layer, zero biases: variance-preserving, where PyTorch's
    default init shrinks the activations layer by layer; fc2 is then scaled by RANDOM_EMBEDDING_GAIN (with zero biases
    the network is positively homogeneous, so this scales the embedding exactly).
    """
    generator = torch.Generator().manual_seed(seed)
    model = uninitialised(VGGish)
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
    # The release pickles numpy arrays (§2.7): allow exactly their reconstruction, never unrestricted unpickling.
    params = read_torch_file(path, "VGGish PCA parameter file", allow=_NUMPY_PICKLE_GLOBALS)
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
    def embeddings(self, examples: np.ndarray) -> torch.Tensor:
        """[n, 96, 64] log-mel examples -> [n, 128] float32 embeddings (PCA codes when enabled) on the device."""
        x = torch.as_tensor(np.asarray(examples, dtype=np.float32), device=self.device)
        out = self.model(x)
        if self.postprocessor is not None:
            out = self.postprocessor(out)
        return out.float()

    def embed(self, examples: np.ndarray) -> np.ndarray:
        """embeddings as numpy."""
        return self.embeddings(examples).cpu().numpy()

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
