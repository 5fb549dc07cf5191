"""VGG-19 in int8 on CPUs: post-training static quantisation, about twice the speed of bf16 on x86 cores with VNNI.

Weights are quantised per output channel, activations per tensor with scales chosen from histograms of a
calibration pass. The calibration images are made here, from a seed, not taken from the user's videos: a clip's
features must not depend on which videos were extracted first, and a rerun or another shard must calibrate the
same way. They are colour noise with a natural image's 1/f amplitude spectrum, which gives convolution
activations the spread that photographs give. Measured with seeded random weights on real frames held out from
calibration: cosine distance to float32 pool5 maps of 1.3e-3 to 1.7e-3 (the features must stay within 1e-2).

This is PyTorch's eager-mode quantisation (torch.ao.quantization), which PyTorch marks as deprecated in favour of
torchao's pt2e flow; that flow reaches int8 kernels through torch.compile, minutes of compilation on 2 cores
against 4 s of calibration (cached) here, and the eager API is present in the pinned torch.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import warnings
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.ao import quantization
from torch.ao.nn import quantized
from torch.ao.nn.intrinsic import quantized as quantized_intrinsic

from bmfn_pipeline.errors import BmfnError
from extractors.weights import cache_dir

CALIBRATION_NAME = "pink-noise-v1"  # recorded in provenance: another calibration is another feature space
CALIBRATION_FRAMES = 8
CALIBRATION_SEED = 0
ENGINE = "x86"  # PyTorch's quantised CPU kernels for x86 (FBGEMM and oneDNN, with VNNI where the CPU has it)
FRAME_SIZE = 224
PIXEL_MEAN, PIXEL_STD = 128.0, 60.0  # grey level and contrast of the calibration images (uint8)


def calibration_frames(count: int = CALIBRATION_FRAMES, seed: int = CALIBRATION_SEED) -> np.ndarray:
    """uint8 RGB [count,224,224,3]: per channel, random phases under an amplitude spectrum falling as 1/f."""
    rng = np.random.default_rng(seed)
    radius = np.sqrt(np.fft.fftfreq(FRAME_SIZE)[:, None] ** 2 + np.fft.rfftfreq(FRAME_SIZE)[None, :] ** 2)
    amplitude = 1.0 / np.maximum(radius, 1.0 / FRAME_SIZE)
    phases = rng.random((count, 3, *amplitude.shape))
    images = np.fft.irfft2(amplitude * np.exp(2j * np.pi * phases), s=(FRAME_SIZE, FRAME_SIZE))
    images = (images - images.mean(axis=(-2, -1), keepdims=True)) / images.std(axis=(-2, -1), keepdims=True)
    return np.clip(PIXEL_MEAN + PIXEL_STD * images, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def calibration_record() -> str:
    return f"{CALIBRATION_NAME}:{CALIBRATION_FRAMES}@{CALIBRATION_SEED}"


def quantize_int8(features: nn.Sequential, preprocess: Callable[[torch.Tensor], torch.Tensor],
                  cache_key: str | None = None) -> nn.Module:
    """An int8 copy of a float VGG `features` stack (conv, ReLU and max-pool layers): [n,3,224,224] float in,
    float out, as the original. `preprocess` turns the calibration frames into the network's input.

    With a `cache_key` (what identifies the weights and preprocessing), the calibrated model is kept in the cache
    directory, so later runs skip the calibration pass (~4 s on 2 cores): see cached_int8."""
    with _quantised_api():
        model = _observed(features)
        with torch.inference_mode():
            model(preprocess(torch.from_numpy(calibration_frames())).contiguous(memory_format=torch.channels_last))
        quantization.convert(model, inplace=True)
        if cache_key is not None:
            _save(model, _cache_file(cache_key))
        return model


def cached_int8(layout: nn.Sequential, cache_key: str) -> nn.Module | None:
    """The model quantize_int8 cached under `cache_key`, or None (not cached, or unreadable: calibrate again).

    Built from the layer `layout` alone (it may live on the meta device): a cached model needs neither the float
    weights nor their quantisation: 0.2 s of start-up for VGG-19 on 2 cores instead of ~1.2 s."""
    cached = _cache_file(cache_key)
    if not cached.is_file():
        return None
    with _quantised_api():
        model = _int8_layout(layout)
        try:
            state = torch.load(cached, weights_only=True)
            if not _fits(model, state):  # packing would take weights of any shape
                return None
            model.load_state_dict(state)
        except Exception:  # a damaged or foreign cache file
            return None
        return model


def _fits(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    """Whether `state` holds a weight of the shape of each of `model`'s quantised convolutions."""
    return all(tuple(getattr(state.get(f"{name}.weight"), "shape", ())) ==
               (conv.out_channels, conv.in_channels, *conv.kernel_size)
               for name, conv in model.named_modules() if isinstance(conv, quantized.Conv2d))


def is_int8(module: nn.Module) -> bool:
    """Whether `module` is already quantised (it quantises its input)."""
    return any(isinstance(layer, quantized.Quantize) for layer in module.modules())


@contextlib.contextmanager
def _quantised_api() -> Iterator[None]:
    """Select the quantised engine and silence the eager API's deprecation notices (see the module docstring)."""
    if ENGINE not in torch.backends.quantized.supported_engines:
        raise BmfnError(f"int8 needs PyTorch's {ENGINE!r} quantised engine, which this machine lacks "
                        f"(it has {', '.join(torch.backends.quantized.supported_engines)}); use --precision bfloat16")
    torch.backends.quantized.engine = ENGINE  # process-wide: the engine that runs the quantised kernels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.")  # quantised tensors, storages
        yield


def _save(model: nn.Module, cached: Path) -> None:
    partial = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), partial)
        partial.replace(cached)  # whole or absent, also with several processes calibrating at once
    # A read-only or full cache (torch.save says so with a RuntimeError): the model is calibrated all the same.
    except (OSError, RuntimeError):
        with contextlib.suppress(OSError):  # a cache "folder" that is a file: nothing to remove
            partial.unlink(missing_ok=True)


def _int8_layout(layout: nn.Sequential) -> nn.Module:
    """What _observed + convert make of `layout`, with placeholder int8 weights and scales for a state_dict to fill."""
    layers: list[nn.Module] = []
    for i, layer in enumerate(layout):
        if isinstance(layer, nn.Conv2d):
            fused = i + 1 < len(layout) and isinstance(layout[i + 1], nn.ReLU)
            kind = quantized_intrinsic.ConvReLU2d if fused else quantized.Conv2d
            # Packed for the CPU kernels when made, and again when the state_dict sets its weights: made with one
            # channel, the first packing is of a placeholder of 9 weights, not of a full-size one (0.3 s for VGG-19).
            conv = kind(1, 1, layer.kernel_size, stride=layer.stride, padding=layer.padding)
            conv.in_channels, conv.out_channels = layer.in_channels, layer.out_channels
            layers.append(conv)
        elif isinstance(layer, nn.ReLU) and i > 0 and isinstance(layout[i - 1], nn.Conv2d):
            layers.append(nn.Identity())  # fused into the convolution before it, as fuse_modules leaves it
        elif isinstance(layer, (nn.ReLU, nn.MaxPool2d)):
            layers.append(copy.deepcopy(layer))  # runs on quantised tensors as it is
        else:
            raise BmfnError(f"int8: no quantised counterpart for {type(layer).__name__} in the VGG layout")
    return nn.Sequential(quantized.Quantize(1.0, 0, torch.quint8), nn.Sequential(*layers), quantized.DeQuantize())


def _observed(features: nn.Sequential) -> nn.Module:
    """A copy of `features` with conv + ReLU fused and observers in place, between quantise and dequantise stubs."""
    layers = copy.deepcopy(features).cpu().eval()
    pairs = [[str(i), str(i + 1)] for i in range(len(layers) - 1)
             if isinstance(layers[i], nn.Conv2d) and isinstance(layers[i + 1], nn.ReLU)]
    quantization.fuse_modules(layers, pairs, inplace=True)  # conv + ReLU run as one int8 kernel
    model = nn.Sequential(quantization.QuantStub(), layers, quantization.DeQuantStub()).eval()
    model.qconfig = quantization.get_default_qconfig(ENGINE)
    return quantization.prepare(model)


def _cache_file(cache_key: str) -> Path:
    key = "|".join((cache_key, calibration_record(), ENGINE, torch.__version__))
    return cache_dir() / "int8" / f"vgg19-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
