"""Result writers: every format parses back to the result, intervals merge, subtitles use valid timestamps."""

from __future__ import annotations

import csv
import json
import os
import re

import numpy as np
import pytest

from bmfn_pipeline.ave import BACKGROUND, CATEGORIES, NUM_CLASSES
from bmfn_pipeline.decode import SAMPLE_RATE
from bmfn_pipeline.errors import BmfnError
from bmfn_pipeline.writers import (
    CSV_FIELDS,
    FORMATS,
    LocalizationResult,
    SecondLabel,
    WRITERS,
    class_colour,
    format_timestamp,
    get_writer,
    merge_seconds,
    plot_timeline,
)

BARK = CATEGORIES.index("Bark")
FLUTE = CATEGORIES.index("Flute")


def make_result(labels: list[int], path: str = "videos/clip one.mp4", seed: int = 0) -> LocalizationResult:
    rng = np.random.default_rng(seed)
    seconds = [SecondLabel(float(t), float(t + 1), label, float(rng.uniform(0.5, 1) if label != BACKGROUND
                                                                 else rng.uniform(0, 0.5)), float(rng.uniform()))
               for t, label in enumerate(labels)]
    return LocalizationResult(path, float(len(labels)), seconds, warnings=["audio shorter than video"],
                              model={"checkpoint": "run/best.pt", "setting": "supervised"})


# 3 background seconds, Bark 3-8, background, Flute 9-10.
LABELS = [BACKGROUND] * 3 + [BARK] * 5 + [BACKGROUND] + [FLUTE]


def test_merge_seconds_groups_runs_with_mean_probabilities():
    result = make_result(LABELS)
    intervals = merge_seconds(result.seconds)
    assert [(i.label, i.start_s, i.end_s) for i in intervals] == [
        (BACKGROUND, 0, 3), (BARK, 3, 8), (BACKGROUND, 8, 9), (FLUTE, 9, 10)]
    bark = intervals[1]
    assert bark.event_prob == pytest.approx(np.mean([s.event_prob for s in result.seconds[3:8]]))
    assert bark.class_prob == pytest.approx(np.mean([s.class_prob for s in result.seconds[3:8]]))
    assert result.summary() == "Bark: 3.0-8.0 s; Flute: 9.0-10.0 s"


def test_merge_does_not_join_seconds_with_a_gap():
    seconds = [SecondLabel(0, 1, BARK, 0.9, 0.9), SecondLabel(2, 3, BARK, 0.9, 0.9)]
    assert [(i.start_s, i.end_s) for i in merge_seconds(seconds)] == [(0, 1), (2, 3)]


def test_summary_of_background_only_and_label_names():
    result = make_result([BACKGROUND] * 4)
    assert result.summary() == "background only"
    assert result.seconds[0].name == "background"
    assert SecondLabel(0, 1, BARK, 0.9, 0.8).name == "Bark"
    for label in (29, -1):  # -1 would index the last category (Mandolin)
        with pytest.raises(ValueError, match=f"label {label} is outside 0..28"):
            SecondLabel(0, 1, label, 0.9, 0.8).name


@pytest.mark.parametrize("seconds, srt, vtt", [
    (3, "00:00:03,000", "00:00:03.000"),
    (3723.4567, "01:02:03,457", "01:02:03.457"),
    (59.9996, "00:01:00,000", "00:01:00.000"),
])
def test_format_timestamp(seconds, srt, vtt):
    assert format_timestamp(seconds, ",") == srt
    assert format_timestamp(seconds, ".") == vtt


def test_format_timestamp_refuses_a_negative_time():
    with pytest.raises(ValueError, match="negative timestamp -1"):  # else '-1:59:59,000'
        format_timestamp(-1, ",")


def test_json_parses_back_to_the_same_result(tmp_path):
    result = make_result(LABELS)
    path = get_writer("json", tmp_path)(result)
    assert path == tmp_path / "clip one.json"
    data = json.loads(path.read_text())
    assert LocalizationResult.from_dict(data) == result
    assert data["summary"] == result.summary()
    assert [(e["name"], e["start_s"], e["end_s"]) for e in data["events"]] == [("Bark", 3, 8), ("Flute", 9, 10)]


def test_csv_has_header_and_one_row_per_second(tmp_path):
    result = make_result(LABELS)
    path = get_writer("csv", tmp_path / "new" / "dir")(result)
    assert path.name == "clip one.csv"
    with path.open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert tuple(rows[0].keys()) == CSV_FIELDS
    assert len(rows) == len(result.seconds)
    assert (rows[3]["start_s"], rows[3]["end_s"]) == ("3.000", "4.000")  # milliseconds, as the subtitles give times
    for row, second in zip(rows, result.seconds):
        assert float(row["start_s"]) == second.start_s and float(row["end_s"]) == second.end_s
        assert int(row["label"]) == second.label and row["name"] == second.name
        assert float(row["event_prob"]) == pytest.approx(second.event_prob, abs=1e-3)
        assert float(row["class_prob"]) == pytest.approx(second.class_prob, abs=1e-3)


SRT_CUE = re.compile(r"(\d+)\n(\d\d):(\d\d):(\d\d),(\d{3}) --> (\d\d):(\d\d):(\d\d),(\d{3})\n(.+)")
VTT_CUE = re.compile(r"(\d\d):(\d\d):(\d\d)\.(\d{3}) --> (\d\d):(\d\d):(\d\d)\.(\d{3})\n(.+)")


def _seconds(h: str, m: str, s: str, ms: str) -> float:
    return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000


def parse_srt(text: str) -> list[tuple[int, float, float, str]]:
    blocks = [b for b in text.strip().split("\n\n") if b]
    cues = []
    for block in blocks:
        match = SRT_CUE.fullmatch(block)
        assert match, f"not an SRT cue: {block!r}"
        g = match.groups()
        cues.append((int(g[0]), _seconds(*g[1:5]), _seconds(*g[5:9]), g[9]))
    return cues


def parse_vtt(text: str) -> list[tuple[float, float, str]]:
    header, *blocks = text.strip().split("\n\n")
    assert header == "WEBVTT"
    cues = []
    for block in blocks:
        match = VTT_CUE.fullmatch(block)
        assert match, f"not a WebVTT cue: {block!r}"
        g = match.groups()
        cues.append((_seconds(*g[0:4]), _seconds(*g[4:8]), g[8]))
    return cues


def test_srt_and_vtt_have_one_cue_per_event_interval(tmp_path):
    # A long video: the events past the hour mark need the hours field.
    labels = LABELS + [BACKGROUND] * 3600 + [BARK] * 2
    result = make_result(labels)
    expected = [(3, 8, "Bark"), (9, 10, "Flute"), (3610, 3612, "Bark")]
    srt = parse_srt(get_writer("srt", tmp_path)(result).read_text())
    vtt = parse_vtt(get_writer("vtt", tmp_path)(result).read_text())
    assert [number for number, *_ in srt] == [1, 2, 3]
    for cues in ([c[1:] for c in srt], vtt):
        assert [(start, end, text.split(" (")[0]) for start, end, text in cues] == expected
    bark = result.events()[0]
    assert vtt[0][2] == f"Bark (event {bark.event_prob:.3f}, class {bark.class_prob:.3f})"


@pytest.mark.parametrize("seconds, cue_end", [(5, 3.0), (2, 2.0)])
def test_subtitles_of_a_video_without_events_say_so_and_open_in_ffmpeg(tmp_path, seconds, cue_end):
    """One short cue: a subtitle file without cues (an empty SRT) is refused by FFmpeg and the players built on it."""
    import av

    result = make_result([BACKGROUND] * seconds)
    srt, vtt = (get_writer(fmt, tmp_path)(result) for fmt in ("srt", "vtt"))
    assert parse_srt(srt.read_text()) == [(1, 0.0, cue_end, "no audio-visual event")]
    assert parse_vtt(vtt.read_text()) == [(0.0, cue_end, "no audio-visual event")]
    for path in (srt, vtt):
        with av.open(str(path)) as container:
            assert [packet.pts for packet in container.demux(subtitles=0) if packet.size] == [0]


def test_a_file_name_that_is_not_utf8_is_written_escaped(tmp_path):
    name = os.fsdecode(b"videos/clip\xff.mp4")  # as Python lists such a file: the byte kept as a surrogate
    result = make_result(LABELS, path=name)
    result.warnings.append(f"{name}: audio shorter than video")
    text = get_writer("table", tmp_path)(result).read_text(encoding="utf-8")
    assert text.startswith("# videos/clip\\xff.mp4 (") and "# warning: videos/clip\\xff.mp4: audio" in text
    assert plot_timeline(result, None, None, tmp_path / "clip.png").read_bytes()[:4] == b"\x89PNG"  # its title too


def test_a_name_in_a_script_the_font_lacks_plots_without_a_warning(tmp_path, recwarn):
    result = make_result(LABELS, path="videos/bunny 短.mp4")  # DejaVu Sans has no CJK glyphs
    assert plot_timeline(result, None, None, tmp_path / "clip.png").read_bytes()[:4] == b"\x89PNG"
    assert not [str(w.message) for w in recwarn if "Glyph" in str(w.message)]


def test_table_has_a_row_per_second_and_the_summary(tmp_path, capsys):
    result = make_result(LABELS)
    assert get_writer("table", None)(result) is None
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if re.match(r"\s*\d+\.\d\s", line)]
    assert [(float(r[0]), float(r[1]), r[2]) for r in rows] == [
        (s.start_s, s.end_s, s.name) for s in result.seconds]
    assert lines[-1] == "summary: Bark: 3.0-8.0 s; Flute: 9.0-10.0 s"
    assert "# warning: audio shorter than video" in lines
    assert get_writer("table", tmp_path)(result).read_text() == "\n".join(lines) + "\n"


def test_every_format_has_its_own_extension(tmp_path):
    result = make_result(LABELS)
    paths = {get_writer(fmt, tmp_path)(result) for fmt in FORMATS}
    assert {p.suffix for p in paths} == {".txt", ".json", ".csv", ".srt", ".vtt"}


def test_unknown_format_and_unwritable_directory(tmp_path):
    with pytest.raises(BmfnError, match="unknown output format 'xml'"):
        get_writer("xml", tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(BmfnError, match="cannot write"):
        get_writer("json", blocker)(make_result(LABELS))


def test_a_result_that_cannot_be_written_leaves_the_earlier_one_whole(tmp_path, monkeypatch):
    write = get_writer("json", tmp_path)
    path = write(make_result(LABELS))
    earlier = path.read_text()
    writer = WRITERS["json"]

    def disk_fills_up(self, result, file):
        file.write(earlier[:100])
        raise OSError(27, "File too large")

    monkeypatch.setattr(writer, "write", disk_fills_up)
    with pytest.raises(BmfnError) as refused:
        get_writer("json", tmp_path)(make_result(LABELS))
    assert str(refused.value) == f"{path}: cannot write the json result: File too large"
    assert path.read_text() == earlier and sorted(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("with_frames, with_audio", [(True, True), (False, False)])
def test_timeline_png(tmp_path, with_frames, with_audio):
    import matplotlib.image

    result = make_result(LABELS)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (10, 224, 224, 3), dtype=np.uint8) if with_frames else None
    audio = rng.standard_normal(10 * SAMPLE_RATE).astype(np.float32) * 0.1 if with_audio else None
    path = plot_timeline(result, frames, audio, tmp_path / "plots" / "clip.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    height, width = image.shape[:2]
    assert 300 <= width <= 5000 and 150 <= height <= 2000
    assert image.std() > 0.05  # something was drawn
    if with_frames:  # the extra panels make the figure taller
        bare = matplotlib.image.imread(plot_timeline(result, None, None, tmp_path / "bare.png"))
        assert height > bare.shape[0]


def test_an_hours_timeline_stays_readable(tmp_path):
    """An hour of events every other second: the title lists the events that fit on its line and counts the rest
    (it held all 900, 20,000 characters, cut off at both ends), names that would print over each other are left out
    (they made a black smear), and bars a pixel wide have no white edges (which washed out their colours)."""
    from matplotlib.figure import Figure

    from bmfn_pipeline.writers import TITLE_CHARS_PER_INCH, _plot_labels, _title

    result = make_result(([BACKGROUND] + [BARK, BARK, BACKGROUND, FLUTE]) * 720)
    title = _title(result, 40 * TITLE_CHARS_PER_INCH)
    assert len(title) <= 40 * TITLE_CHARS_PER_INCH and title.startswith("clip one.mp4: Bark: 1.0-3.0 s; Flute: ")
    assert title.endswith(f"; ... and {1440 - title.count(';')} more events")
    assert _title(make_result(LABELS), 8 * TITLE_CHARS_PER_INCH) == \
        "clip one.mp4: Bark: 3.0-8.0 s; Flute: 9.0-10.0 s"  # a short one whole
    long_name = make_result([BACKGROUND] * 10, path="x" * 97 + ".mp4")  # said "1 events"
    assert _title(long_name, 112) == "x" * 53 + "...: background only"
    assert _title(make_result([BACKGROUND] * 10, path="y" * 63 + ".mp4"), 112) == "y" * 63 + ".mp4: background only"
    ax = Figure().subplots()
    _plot_labels(ax, result, px_per_second=40 * 100 * 0.8 / 3600)
    assert 100 <= len(ax.texts) <= 3200 / (5 * len("Bark ")) and ax.patches[0].get_linewidth() == 0
    ends = [(t.get_position()[0] * 3200 / 3600 - 2.5 * len(t.get_text()),
             t.get_position()[0] * 3200 / 3600 + 2.5 * len(t.get_text())) for t in ax.texts]
    assert all(left >= right for (_, right), (left, _) in zip(ends, ends[1:]))  # apart, in pixels
    ax = Figure().subplots()
    _plot_labels(ax, make_result(LABELS), px_per_second=64)  # a 10 s clip: each event named, bars edged
    assert [t.get_text() for t in ax.texts] == ["Bark", "Flute"] and ax.patches[0].get_linewidth() == 0.5
    assert plot_timeline(result, None, None, tmp_path / "hour.png").read_bytes()[:4] == b"\x89PNG"


def test_class_colours_are_distinct_and_none_is_grey():
    colours = [class_colour(label)[:3] for label in range(NUM_CLASSES)]
    assert len(set(colours)) == NUM_CLASSES
    for rgb in colours[:BACKGROUND]:
        assert max(rgb) - min(rgb) > 0.05, f"class colour {rgb} is a grey"
