"""A stand-in for the decoding interface of PyNvVideoCodec (NVIDIA's Video Codec SDK binding) that bmfn uses, made
of FFmpeg's CPU decoders through PyAV: tests of bmfn_pipeline.nvcodec and decode._nvcodec_frames run without the
library or a GPU. Frames come as NV12 arrays behind DLPack, with their presentation times, in display order, as
SimpleDecoder gives them: each with its packet's decoding time, which is what the library's getPTS() returned on
an H100.

Environment, read at each call (decoding workers inherit it): STANDIN_NVC_LOG names a file that gets a JSON line
per decoder made or reconfigured; STANDIN_NVC_FAULT, a comma-separated list, makes it misbehave: "raise" (every file
fails), "late" (frame 5's time is one tick late), "pts" (frames come with their presentation times instead),
"drop2" (the first two frames are missing), "crop" (frames lose their last two rows), "short" (only 40 frames).
A decoder made prints a line on standard output, as libraries of this kind do.
"""

import itertools
import json
import os

import av


def faults() -> set[str]:
    return set(filter(None, os.environ.get("STANDIN_NVC_FAULT", "").split(",")))


class OutputColorType:
    NATIVE = "native"


class DecodedFrame:
    def __init__(self, planes, pts):
        self._planes, self._pts = planes, pts

    def __dlpack__(self, **kwargs):
        return self._planes.__dlpack__(**{k: v for k, v in kwargs.items() if k in ("stream", "max_version")})

    def __dlpack_device__(self):
        return self._planes.__dlpack_device__()

    def getPTS(self):
        return self._pts


class SimpleDecoder:
    def __init__(self, enc_file_path, gpu_id=0, cuda_context=0, cuda_stream=0, use_device_memory=True,
                 max_width=0, max_height=0, need_scanned_stream_metadata=False, decoder_cache_size=4,
                 output_color_type=OutputColorType.NATIVE, **_):
        self.gpu_id = gpu_id
        print(f"stand-in decoder on GPU {gpu_id}", flush=True)
        self._open("create", enc_file_path)

    def reconfigure_decoder(self, new_source):
        self._open("reconfigure", new_source)

    def _open(self, what, path):
        log = os.environ.get("STANDIN_NVC_LOG")
        if log:
            with open(log, "a") as f:
                f.write(json.dumps({"call": what, "path": str(path), "gpu": self.gpu_id, "pid": os.getpid()}) + "\n")
        if "raise" in faults():
            raise RuntimeError("stand-in decoder failure\nsecond line")
        with av.open(str(path)) as container:
            self._decoded_at = {p.pts: p.dts for p in container.demux(container.streams.video[0]) if p.size}
        container = av.open(str(path))
        self._frames = enumerate(container.decode(container.streams.video[0]))

    def get_batch_frames(self, batch_size):
        fault, batch = faults(), []
        for number, frame in itertools.islice(self._frames, batch_size):
            if "short" in fault and number >= 40:
                self._frames = iter(())
                break
            planes = frame.reformat(format="nv12").to_ndarray()
            if "crop" in fault:
                planes = planes[:-2]
            if "drop2" in fault and number < 2:
                continue
            pts = (frame.pts if "pts" in fault else self._decoded_at[frame.pts]) + ("late" in fault and number == 5)
            batch.append(DecodedFrame(planes, pts))
        return batch
