"""The synthetic AVE-format dataset: decodable clips, consistent annotations and splits, events both seen and heard."""

from __future__ import annotations

import av
import numpy as np
import pytest

from bmfn_pipeline.ave import CATEGORIES, SEGMENTS, load_splits, read_annotations, segment_labels
from bmfn_pipeline.decode import SAMPLE_RATE, decode_clip
from bmfn_pipeline.errors import BmfnError
from bmfn_pipeline.synthetic import CLASSES, SPLIT_FILES, make_dataset

N_CLIPS = 8
FPS = 8
COLOUR_TOLERANCE = 50  # max channel difference for a pixel to count as the object's colour


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("synthetic"), N_CLIPS, seed=3, fps=FPS)


def decode_all(path):
    """Every video frame (RGB) and the whole audio stream, straight from PyAV."""
    with av.open(str(path)) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    with av.open(str(path)) as container:
        audio = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(audio=0)])
    return frames, audio


def object_fraction(frame: np.ndarray, colour) -> float:
    return float(np.mean(np.abs(frame.astype(int) - np.asarray(colour)).max(axis=-1) <= COLOUR_TOLERANCE))


def band_power(audio: np.ndarray, second: int, band_hz) -> float:
    """Mean power in the band over the middle of one second (edges left out: ramps, codec delay)."""
    window = audio[int((second + 0.1) * SAMPLE_RATE):int((second + 0.9) * SAMPLE_RATE)]
    power = np.abs(np.fft.rfft(window)) ** 2 / len(window)
    freqs = np.fft.rfftfreq(len(window), 1.0 / SAMPLE_RATE)
    return float(power[(freqs >= band_hz[0]) & (freqs <= band_hz[1])].sum())


def test_classes_are_distinct_ave_categories():
    assert len({c.category for c in CLASSES}) == len(CLASSES) >= 3
    assert all(c.category in CATEGORIES for c in CLASSES)
    assert len({c.shape for c in CLASSES}) == len({c.colour for c in CLASSES}) == len(CLASSES)
    bands = sorted(c.band_hz for c in CLASSES)
    assert all(low_hi[1] < next_[0] for low_hi, next_ in zip(bands, bands[1:])), "class bands overlap"


def test_clips_have_ten_seconds_of_h264_and_16k_mono_audio(dataset):
    for clip in dataset.clips:
        assert clip.path.parent == dataset.video_dir and clip.path.stem == clip.row.video_id
        with av.open(str(clip.path)) as container:
            assert container.duration / av.time_base == pytest.approx(SEGMENTS, abs=0.1)
            (video,), (audio,) = container.streams.video, container.streams.audio
            assert video.codec_context.name == "h264" and video.average_rate == FPS
            assert audio.rate == SAMPLE_RATE and audio.channels == 1
        frames, samples = decode_all(clip.path)
        assert len(frames) == SEGMENTS * FPS
        assert len(samples) / SAMPLE_RATE == pytest.approx(SEGMENTS, abs=0.2)


def test_pipeline_decoder_reads_the_clips_without_warnings(dataset):
    decoded = decode_clip(dataset.clips[0].path, frames_per_second=2)
    assert decoded.frames.shape == (SEGMENTS, 2, 224, 224, 3)
    assert decoded.audio.shape == (SEGMENTS * SAMPLE_RATE,)
    assert decoded.warnings == []


def test_annotations_and_splits_parse_and_agree(dataset):
    rows = read_annotations(dataset.annotations)
    assert rows == dataset.rows
    assert [r.video_id for r in rows] == [c.path.stem for c in dataset.clips]
    splits = load_splits(dataset.root)
    assert {name: list(indices) for name, indices in splits.items()} == dataset.splits
    assert sorted(i for indices in splits.values() for i in indices) == list(range(N_CLIPS))
    assert all(len(indices) > 0 for indices in splits.values())
    for name, filename in SPLIT_FILES.items():
        assert read_annotations(dataset.root / filename) == [rows[i] for i in dataset.splits[name]]
    assert {r.category for r in rows} == {c.category for c in CLASSES}  # 8 clips cover the 4 classes


def test_every_clip_has_an_event_and_all_three_kinds_of_background(dataset):
    labels = segment_labels(dataset.rows)
    for clip, label in zip(dataset.clips, labels):
        event = np.asarray(clip.audible) & np.asarray(clip.visible)
        assert np.array_equal(event, label[:, clip.label] == 1)  # an event is exactly what is heard and seen
        assert event.sum() >= 2
        kinds = set(zip(clip.audible, clip.visible))
        assert kinds == {(True, True), (True, False), (False, True), (False, False)}


def test_events_are_seen_and_heard_background_only_one_or_neither(dataset):
    for clip in dataset.clips:
        cls = next(c for c in CLASSES if c.category == clip.row.category)
        frames, audio = decode_all(clip.path)
        seen = [object_fraction(frames[t * FPS + FPS // 2], cls.colour) for t in range(SEGMENTS)]
        heard = [band_power(audio, t, cls.band_hz) for t in range(SEGMENTS)]
        quiet = max(h for h, audible in zip(heard, clip.audible) if not audible)
        for t in range(SEGMENTS):
            # Object: a few per cent of the frame in the class colour; absent: next to no such pixel.
            assert (seen[t] > 0.02) == clip.visible[t], (clip.row, t, seen[t])
            assert seen[t] > 0.02 or seen[t] < 0.002
            if clip.audible[t]:
                assert heard[t] > 30 * quiet, (clip.row, t, heard[t], quiet)


def test_other_classes_are_neither_seen_nor_heard(dataset):
    clip = dataset.clips[0]
    frames, audio = decode_all(clip.path)
    event_second = clip.row.start
    frame = frames[event_second * FPS + FPS // 2]
    own = next(c for c in CLASSES if c.category == clip.row.category)
    for other in CLASSES:
        if other is not own:
            assert object_fraction(frame, other.colour) < 0.002
            assert band_power(audio, event_second, other.band_hz) < band_power(audio, event_second, own.band_hz) / 30


def test_same_seed_same_clips_other_seed_different(dataset, tmp_path):
    again = make_dataset(tmp_path / "again", 3, seed=3, fps=FPS)
    for a, b in zip(again.clips, dataset.clips):  # clip i depends only on (seed, i), not on the dataset size
        assert a.row == b.row and a.audible == b.audible and a.visible == b.visible
        assert a.path.read_bytes() == b.path.read_bytes()
    other = make_dataset(tmp_path / "other", 3, seed=4, fps=FPS)
    assert [(c.row.start, c.row.end, c.audible) for c in other.clips] != \
           [(c.row.start, c.row.end, c.audible) for c in again.clips]
    assert other.clips[0].path.read_bytes() != again.clips[0].path.read_bytes()


def test_bad_arguments_are_reported(tmp_path):
    with pytest.raises(BmfnError, match="at least 3"):
        make_dataset(tmp_path, 2)
    with pytest.raises(BmfnError, match="seconds"):
        make_dataset(tmp_path, 3, seconds=11)
    with pytest.raises(BmfnError, match="even"):
        make_dataset(tmp_path, 3, size=(161, 120))
