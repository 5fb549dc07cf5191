"""VGG-19 pool5 maps per frame, the visual features of the AVE literature (features-reference.md section 1).

The network is torchvision's `vgg19().features` layout (so torchvision state dicts load by key) filled either
from the Keras ImageNet file the released AVE features were made with, from torchvision's own weights (a
different feature space), or from seeded random weights for tests and demos.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import torch
from torch import nn

from bmfn_pipeline.errors import BmfnError
from extractors.int8 import cached_int8, calibration_record, is_int8, quantize_int8
from extractors.weights import (WEIGHTS, random_weights_provenance, read_torch_file, uninitialised, use_compile_cache,
                               weight_path, weights_provenance)

# VGG-19 is configuration E of Simonyan & Zisserman 2015 (torchvision vgg.cfgs["E"]): conv widths, "M" a 2x2 max-pool.
VGG19_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")
# Keras 'caffe' preprocess_input: BGR mean pixel of the Oxford training set, no scaling (features-reference.md 1.2).
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
# torchvision IMAGENET1K_V1 normalisation of [0,1] RGB (features-reference.md 1.6).
TORCHVISION_RGB_MEAN = (0.485, 0.456, 0.406)
TORCHVISION_RGB_STD = (0.229, 0.224, 0.225)
# Frames per forward pass. On a CPU, few: each layer's output (3.2 MB a frame after conv1) stays small enough to be
# reused from cache and from the allocator. On 2 AVX-512 cores, with the executable's allocator settings
# (cli.keep_freed_memory), 4 frames a batch ran 4 % faster than 16 and 9 % faster than 32 in bf16, and 3 % faster
# than 64 in int8, where 16 did as well (benchmarks/extract.py --batch-sizes). A GPU wants many.
CPU_BATCH_SIZE = 4
GPU_BATCH_SIZE = 64
# Compute precisions: autocast dtype (None = plain float32). bf16 stays within 1e-2 cosine distance of float32,
# and so does int8 (extractors/int8.py: a quantised copy of the network, CPU only).
PRECISIONS: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16, "int8": None}


def _keras_layer_indices() -> dict[str, int]:
    """Keras layer name -> index in `vgg19_pool5()`: each conv takes two slots (conv, ReLU), each pool one."""
    indices, block, conv, index = {}, 1, 1, 0
    for width in VGG19_CONFIG:
        if width == "M":
            indices[f"block{block}_pool"] = index
            block, conv, index = block + 1, 1, index + 1
        else:
            indices[f"block{block}_conv{conv}"] = index
            conv, index = conv + 1, index + 2
    return indices


# The table of features-reference.md 1.3 (block1_conv1 -> 0, ..., block5_pool -> 36).
KERAS_LAYER_INDEX = _keras_layer_indices()


def vgg_layers(config: tuple[int | str, ...], in_channels: int) -> nn.Sequential:
    """A VGG convolution stack (3x3 'same' convolutions with ReLU; "M" = 2x2 max-pool), torchvision's layout.

    VGG-19 and VGGish both use it, so their state_dict indices match torchvision's and torchvggish's.
    """
    layers: list[nn.Module] = []
    for width in config:
        if width == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_channels, int(width), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            in_channels = int(width)
    return nn.Sequential(*layers)


def vgg19_pool5() -> nn.Sequential:
    """VGG-19 up to block5_pool, with torchvision `vgg19().features` indices 0..36: [n,3,224,224] -> [n,512,7,7]."""
    return vgg_layers(VGG19_CONFIG, in_channels=3)


def _convs(module: nn.Sequential) -> list[nn.Conv2d]:
    return [layer for layer in module if isinstance(layer, nn.Conv2d)]


def vgg19_pool5_random(seed: int) -> nn.Sequential:
    """Seeded random weights that keep activations alive through 16 convs: Kaiming-normal (fan_out, ReLU) and
    zero bias, as torchvision's VGG initialises; PyTorch's default init shrinks them until all inputs look alike."""
    module = uninitialised(vgg19_pool5)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in _convs(module):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu", generator=generator)
            nn.init.zeros_(conv.bias)
    return module.eval()


def _keras_conv(f: h5py.File, path: Path, layer: str, conv: nn.Conv2d) -> tuple[np.ndarray, np.ndarray]:
    """The kernel [3,3,in,out] and bias [out] of one Keras layer, in the order its `weight_names` attribute lists."""
    group = f.get(layer)
    if not isinstance(group, h5py.Group):
        raise BmfnError(f"{path}: layer {layer} is missing; not the Keras VGG-19 notop weights file")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs.get("weight_names", [])]
    expected = ((3, 3, conv.in_channels, conv.out_channels), (conv.out_channels,))
    if len(names) != len(expected):
        raise BmfnError(f"{path}: layer {layer} lists {len(names)} weights in weight_names, expected kernel and bias")
    arrays = []
    for name, shape in zip(names, expected):
        data = group.get(name)
        if not isinstance(data, h5py.Dataset) or data.shape != shape:
            found = data.shape if isinstance(data, h5py.Dataset) else "nothing"
            raise BmfnError(f"{path}: layer {layer} weight {name} has shape {found}, expected {shape}")
        arrays.append(np.asarray(data, dtype=np.float32))
    return arrays[0], arrays[1]


def vgg19_pool5_from_keras(h5_path: str | os.PathLike) -> nn.Sequential:
    """VGG-19 pool5 from the Keras weights file (features-reference.md 1.5). It expects caffe-preprocessed BGR input.

    Kernels [3,3,in,out] become [out,in,3,3] without a spatial flip: both frameworks cross-correlate.
    """
    path = Path(h5_path)
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise BmfnError(f"{path}: cannot read as an HDF5 Keras weights file ({exc})") from exc
    module = uninitialised(vgg19_pool5)
    with f, torch.no_grad():
        for layer, index in KERAS_LAYER_INDEX.items():
            conv = module[index]
            if isinstance(conv, nn.Conv2d):
                kernel, bias = _keras_conv(f, path, layer, conv)
                conv.weight.copy_(torch.from_numpy(kernel).permute(3, 2, 0, 1))
                conv.bias.copy_(torch.from_numpy(bias))
    return module.eval()


def vgg19_pool5_from_torchvision(pth_path: str | os.PathLike) -> nn.Sequential:
    """VGG-19 pool5 from a torchvision VGG-19 state dict: its `features.*` tensors; classifier keys are ignored."""
    path = Path(pth_path)
    state = read_torch_file(path, "torchvision VGG-19 state dict", mmap=True)  # 80 of its 548 MB are features
    if not isinstance(state, dict):
        raise BmfnError(f"{path}: holds a {type(state).__name__}, not a state dict")
    module = uninitialised(vgg19_pool5)
    features = {}
    for key, param in module.state_dict().items():
        tensor = state.get(f"features.{key}")
        if not isinstance(tensor, torch.Tensor) or tensor.shape != param.shape:
            found = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else "nothing"
            raise BmfnError(f"{path}: features.{key} has shape {found}, expected {tuple(param.shape)}")
        features[key] = tensor
    module.load_state_dict(features)
    return module.eval()


def caffe_preprocess(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Keras 'caffe' preprocessing: uint8 RGB [...,H,W,3] -> float32 BGR minus the mean pixel [...,3,H,W]."""
    x = torch.as_tensor(frames).to(torch.float32)
    bgr = x.flip(-1) - torch.tensor(CAFFE_BGR_MEAN, dtype=torch.float32, device=x.device)
    return bgr.movedim(-1, -3)


def torchvision_preprocess(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """torchvision ImageNet preprocessing: uint8 RGB [...,H,W,3] -> [0,1], mean/std normalised, [...,3,H,W]."""
    x = torch.as_tensor(frames).to(torch.float32) / 255.0
    mean = torch.tensor(TORCHVISION_RGB_MEAN, dtype=torch.float32, device=x.device)
    std = torch.tensor(TORCHVISION_RGB_STD, dtype=torch.float32, device=x.device)
    return ((x - mean) / std).movedim(-1, -3)


# Each preprocessing named in the weights registry, and the loader of each visual source.
PREPROCESS: dict[str, Callable[[np.ndarray | torch.Tensor], torch.Tensor]] = {
    "caffe": caffe_preprocess,
    "torchvision": torchvision_preprocess,
}
SOURCES: dict[str, tuple[str, Callable[[Path], nn.Sequential]]] = {
    "ave": ("vgg19-keras", vgg19_pool5_from_keras),
    "torchvision": ("vgg19-torchvision", vgg19_pool5_from_torchvision),
}


@dataclass
class VisualExtractor:
    """Frames -> channels-last pool5 maps, batched, channels_last memory format, optional bf16 autocast or int8."""

    module: nn.Sequential
    preprocess: Callable[[np.ndarray | torch.Tensor], torch.Tensor]
    provenance: dict[str, str]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "float32"
    batch_size: int | None = None  # None: default_batch_size(device)
    compile: bool = False  # torch.compile the network (fuses bias and ReLU into the convolutions; ~7 % on CPU)

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        self.batch_size = self.batch_size or default_batch_size(self.device)
        _check_int8(self.precision, self.device, self.compile)
        self.module = self.module.to(self.device, memory_format=torch.channels_last).eval()
        if self.precision == "int8" and not is_int8(self.module):
            self.module = quantize_int8(self.module, self.preprocess, cache_key=_int8_cache_key(self.provenance))
        if self.compile:  # compiled at the first batch; a clip's shorter last batch compiles once more
            use_compile_cache()
            self.module = torch.compile(self.module)

    @torch.inference_mode()
    def maps(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 RGB [...,224,224,3] -> float32 [...,7,7,512] on the extractor's device."""
        frames = torch.as_tensor(frames)
        if self.device.type == "cuda" and frames.device.type == "cpu":
            frames = frames.pin_memory()  # page-locked: each batch's copy overlaps the previous batch's compute
        lead = frames.shape[:-3]
        flat = frames.reshape(-1, *frames.shape[-3:])
        autocast = PRECISIONS[self.precision]
        out = []
        for start in range(0, len(flat), self.batch_size):
            batch = flat[start : start + self.batch_size].to(self.device, non_blocking=True)
            x = self.preprocess(batch).contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=autocast, enabled=autocast is not None):
                y = self.module(x)
            out.append(y.float().permute(0, 2, 3, 1))
        return torch.cat(out).reshape(*lead, *out[0].shape[1:])

    def __call__(self, frames: np.ndarray | torch.Tensor) -> np.ndarray:
        """uint8 RGB [...,224,224,3] -> float32 numpy [...,7,7,512]."""
        return self.maps(frames).cpu().numpy()

    def segment_maps(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 RGB [segments,frames,224,224,3] -> per-segment mean maps [segments,7,7,512] on the device
        (features-reference.md 1.4); on a GPU the work is queued, not waited for."""
        return self.maps(frames).mean(1)

    def segments(self, frames: np.ndarray | torch.Tensor) -> np.ndarray:
        """segment_maps as float32 numpy, averaged on the device before the copy back."""
        return self.segment_maps(frames).cpu().numpy()


def load_visual_extractor(
    source: str = "ave",
    weights: str | os.PathLike | None = None,
    random_seed: int | None = None,
    *,
    device: str | torch.device = "cpu",
    precision: str = "float32",
    batch_size: int | None = None,
    compile: bool = False,
) -> VisualExtractor:
    """The visual extractor of `source` ('ave': Keras weights + caffe input; 'torchvision': its weights + its input).

    Weights come from `weights` (a local file), else the cache or a download (weights.weight_path, which fails
    offline); random weights only with an explicit `random_seed`, recorded as 'random:<seed>'.
    """
    if source not in SOURCES:
        raise BmfnError(f"unknown visual source {source!r}; choose from {', '.join(SOURCES)}")
    if precision not in PRECISIONS:
        raise BmfnError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    _check_int8(precision, torch.device(device), compile)  # before any weights are read (or downloaded)
    name, load = SOURCES[source]
    if random_seed is not None:
        if weights is not None:
            raise BmfnError(f"give either a weights file ({weights}) or a random seed, not both")
        record = random_weights_provenance(random_seed)
    else:
        path = weight_path(name, weights)
        record = weights_provenance(name, path)
    preprocessing = WEIGHTS[name].preprocessing
    provenance = {"source": source, **record, "preprocessing": preprocessing, "precision": precision}
    module = None
    if precision == "int8":
        provenance["calibration"] = calibration_record()
        with torch.device("meta"):  # a calibrated copy cached earlier needs no float weights, only their layout
            layout = vgg19_pool5()
        module = cached_int8(layout, _int8_cache_key(provenance))
    if module is None:
        module = vgg19_pool5_random(random_seed) if random_seed is not None else load(path)
    return VisualExtractor(module, PREPROCESS[preprocessing], provenance, torch.device(device), precision, batch_size,
                           compile)


def default_batch_size(device: torch.device) -> int:
    """Frames per VGG-19 forward where none is asked for: CPU_BATCH_SIZE on a CPU, GPU_BATCH_SIZE elsewhere."""
    return CPU_BATCH_SIZE if torch.device(device).type == "cpu" else GPU_BATCH_SIZE


def _check_int8(precision: str, device: torch.device, compile: bool) -> None:
    if precision == "int8" and (device.type != "cpu" or compile):
        raise BmfnError("--precision int8 runs on the CPU, without --compile; on a GPU use bfloat16")


def _int8_cache_key(provenance: dict[str, str]) -> str | None:
    """int8 models are cached when the provenance names the weights (a verified checksum, or random:<seed>)."""
    return json.dumps(provenance, sort_keys=True) if provenance.get("checksum") else None
