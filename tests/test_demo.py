"""`bmfn demo --quick` end to end: synthetic clips -> random-network features -> BMFN -> localized test clips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from bmfn_pipeline.ave import BACKGROUND, read_annotations, segment_labels
from bmfn_pipeline.cli import main
from bmfn_pipeline.data import load_data
from bmfn_pipeline.demo import (DATA_DIR, FEATURES_FILE, FULL, QUICK, REPORT_FILE, RESULTS_DIR, RUN_DIR, SUMMARY_FILE,
                                DemoResult, run_demo)
from bmfn_pipeline.errors import BmfnError
from bmfn_pipeline.synthetic import SPLIT_FILES
from bmfn_pipeline.train import load_checkpoint
from bmfn_pipeline.writers import LocalizationResult


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One quick demo through the CLI: its output and its folder."""
    out = tmp_path_factory.mktemp("demo") / "out"
    result = CliRunner().invoke(main, ["demo", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return result.output, out


def test_quick_demo_beats_the_majority_baseline(demo_run):
    output, out = demo_run
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["accuracy"] > summary["majority"]
    assert summary["accuracy"] >= max(summary["audio_only"], summary["visual_only"])
    assert f"{summary['accuracy']:.2f} %" in output
    assert "RANDOM" in output  # said plainly: these are not AVE features
    lines = output.strip().splitlines()
    assert str(out.resolve()) in lines[0] and str(out.resolve()) in lines[-1]


def test_majority_baseline_is_the_commonest_train_label_on_test(demo_run):
    _, out = demo_run
    summary = json.loads((out / SUMMARY_FILE).read_text())
    rows = read_annotations(out / DATA_DIR / "Annotations.txt")
    by_id = {row.video_id: row for row in rows}
    split = {name: segment_labels([by_id[r.video_id] for r in read_annotations(out / DATA_DIR / file)]).argmax(-1)
             for name, file in SPLIT_FILES.items()}
    label = np.bincount(split["train"].ravel(), minlength=BACKGROUND + 1).argmax()
    assert summary["majority_label"] == label
    assert summary["majority"] == pytest.approx(100 * np.mean(split["test"] == label))


def test_demo_folder_holds_features_run_and_per_clip_results(demo_run):
    output, out = demo_run
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert Path(summary["features"]) == out.resolve() / FEATURES_FILE  # found from any folder
    data = load_data(features=out / FEATURES_FILE)
    assert len(data.clip_ids) == QUICK.clips
    assert data.provenance["visual"]["checksum"].startswith("random:")
    _, meta = load_checkpoint(out / RUN_DIR / "best.pt")
    assert meta["provenance"]["visual"]["checksum"] == data.provenance["visual"]["checksum"]

    test_ids = sorted(data.clip_ids[i] for i in data.splits["test"])
    results = sorted((out / RESULTS_DIR).glob("*.json"))
    assert [p.stem for p in results] == test_ids
    assert sorted(p.stem for p in (out / RESULTS_DIR).glob("*.png")) == test_ids
    rows = {row.video_id: row for row in read_annotations(out / DATA_DIR / "Annotations.txt")}
    predicted, truth = [], []
    for path in results:
        result = LocalizationResult.from_dict(json.loads(path.read_text()))
        assert len(result.seconds) == 10
        predicted.append([s.label for s in result.seconds])
        truth.append(segment_labels([rows[path.stem]])[0].argmax(-1))
        assert path.stem in (out / REPORT_FILE).read_text()
    # The reported accuracy is that of the per-clip results written.
    assert summary["accuracy"] == pytest.approx(100 * np.mean(np.array(predicted) == np.array(truth)))


def test_demo_refuses_a_folder_in_use_and_a_negative_seed(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(BmfnError, match="not empty"):
        run_demo(tmp_path, quick=True, log=lambda line: None)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
    with pytest.raises(BmfnError, match="--seed -1: give 0 or more"):  # before anything is made
        run_demo(tmp_path / "new", quick=True, seed=-1, log=lambda line: None)
    assert not (tmp_path / "new").exists()


def test_summary_says_when_one_modality_alone_does_as_well():
    result = DemoResult(Path("out"), 80.0, 47.5, BACKGROUND, 70.0, 47.5, 4, Path("f.h5"), Path("best.pt"),
                        Path("results"))
    assert "one modality alone" not in result.summary()
    result.audio_only = 80.0
    assert "note: one modality alone reaches BMFN's accuracy here: on these 4 clips" in result.summary()
    result.test_clips = 1  # `--clips 6`
    assert result.summary().startswith("test segment accuracy (1 held-out clip, 10 seconds):")
    assert "here: on this clip the model" in result.summary()


def test_help_states_the_plans_sizes():
    text = " ".join(CliRunner().invoke(main, ["demo", "--help"]).output.split())
    assert f"(default {FULL.clips}; {QUICK.clips} with --quick)" in text
    epochs = f"{FULL.epochs}" if FULL.epochs == QUICK.epochs else f"{FULL.epochs}; {QUICK.epochs} with --quick"
    assert f"Training epochs (default {epochs})" in text
