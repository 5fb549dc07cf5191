"""GPU video decoding through NVIDIA's Video Codec SDK binding, PyNvVideoCodec (the optional extra bmfn[nvcodec]).

Why a second GPU decoder: PyAV's NVDEC (video_decoder="cuda") makes and tears down a hardware decoder for every
file, which held an H100 to 12.7 AVE clips/s, and 16 CPU cores decode about 46 AVE clips/s, short of issue #6's 60.
PyNvVideoCodec's SimpleDecoder is kept, one per thread, and reconfigured for each file, the library's way of
decoding many short clips; only the sampled frames are copied to the host.

This module speaks to the library; decode._nvcodec_frames decides when its frames can stand for the CPU decoder's
(video decoding is exact, so what can differ is which frames come out, not their pixels) and falls back to the CPU
decoder, with a note, wherever they might not.

Tested on CPUs against a stand-in with the library's interface (tests/test_nvcodec.py), and on an H100 (twice, in
one session): where the rules let it decode a file its frames were the CPU decoder's to the bit, a damaged file was
refused, and standard output stayed clean; but files with B-frames were refused for their frames' times, which the
library gives as each frame's packet's decoding time. decode._nvcodec_frames takes those times since; that has not
run on a GPU yet: treat this path as experimental until it has.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from .errors import BmfnError

PACKAGE = "PyNvVideoCodec"
NVDEC_LIBRARY = "libnvcuvid.so.1"  # the driver's decoding library (absent in a container without the video capability)
# Codecs whose decoding NVDEC and FFmpeg both follow to the bit (the specifications define every output sample).
EXACT_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "av1"})
BATCH_FRAMES = 32  # frames asked of the decoder at a time; their GPU buffers live until the next batch
MAX_FAILURES = 3  # files in a row the library fails on before a thread stops asking it (a broken GPU or driver)

_thread = threading.local()  # per thread: decoders by device and failures in a row
_passed: set[int] = set()  # GPUs check() found the library usable on, in this process


def device_of(video_decoder: str) -> int | None:
    """The GPU index of "nvcodec[:N]"; None for the other decoders."""
    kind, _, index = video_decoder.partition(":")
    if kind != "nvcodec":
        return None
    if not (index == "" or index.isdigit()):
        raise BmfnError(f"video decoder {video_decoder!r}: choose one of cpu, cuda, cuda:N, nvcodec or nvcodec:N")
    return int(index or 0)


def check(device: int) -> None:
    """Raise BmfnError (one line) where the library cannot decode on GPU `device`: not installed, no NVDEC library,
    no such GPU. Once per process and device; decoding workers are told their parent's result (passed())."""
    if device in _passed:
        return
    problem = _problem(device)
    if problem:
        raise BmfnError(f"GPU video decoding (nvcodec) on cuda:{device} is not available here ({problem}); "
                        "decode on the CPU instead (--video-decoder cpu)")
    _passed.add(device)


def passed(device: int) -> None:
    """Take check(device) as done: in a decoding worker whose parent made it (where the library fails after all,
    each file goes to the CPU decoder with a note)."""
    _passed.add(device)


def _library() -> Any:
    os.environ.setdefault("LOGGER_LEVEL", "ERROR")  # the library's C++ log, which writes to standard output
    return importlib.import_module(PACKAGE)


def _problem(device: int) -> str | None:
    try:
        _library()
    except ImportError:
        return f"{PACKAGE} is not installed: pip install pynvvideocodec"  # bmfn's extra needs bmfn's own checkout
    except Exception as exc:  # the library's RuntimeError where the driver has no video codecs
        return f"{PACKAGE}: {(str(exc).strip() or type(exc).__name__).splitlines()[0]}"
    try:
        ctypes.CDLL(NVDEC_LIBRARY)
    except OSError as exc:
        return str(exc)
    import torch  # here, not at the top: decode imports this module in every decoding worker, most of them on CPUs

    gpus = torch.cuda.device_count()
    if device >= gpus:
        return f"{gpus} CUDA GPUs" if gpus else "no CUDA GPU"
    return None


def usable() -> bool:
    """False once this thread's last MAX_FAILURES files all failed in the library: it is not asked again."""
    return getattr(_thread, "failures", 0) < MAX_FAILURES


def record(ok: bool) -> None:
    """Count a file the library decoded (ok) or failed on, for usable()."""
    _thread.failures = 0 if ok else getattr(_thread, "failures", 0) + 1


def frames(path: str, device: int) -> Iterator[tuple[int, Any]]:
    """(presentation time in the stream's time base, frame) of each of the file's frames in display order.

    A frame lives on the GPU until the generator is advanced past its batch: take its pixels with host_planes()
    before. A failure in the library drops this thread's decoder, so that the next file gets a fresh one."""
    decoders = _thread.__dict__.setdefault("decoders", {})
    try:
        if device in decoders:
            decoders[device].reconfigure_decoder(path)
        else:
            library = _library()
            decoders[device] = library.SimpleDecoder(path, gpu_id=device, use_device_memory=True,
                                                     output_color_type=library.OutputColorType.NATIVE)
        while True:
            batch = decoders[device].get_batch_frames(BATCH_FRAMES)
            if not batch:
                return
            for frame in batch:
                yield int(frame.getPTS()), frame
    except Exception:
        decoders.pop(device, None)
        raise


def host_planes(frame: Any) -> np.ndarray:
    """A decoded NV12 frame as a host array [H*3/2, W]: the luma rows, then the interleaved chroma rows."""
    import torch

    # DLPack has torch's stream wait for the frame's decoding; the copy to the host waits for torch's stream
    return np.ascontiguousarray(torch.from_dlpack(frame).cpu().numpy())
