"""The benchmark scripts, each run once on the CPU at its smallest settings: CI does not time anything, but a script
that an API change broke is found here, not on a lent GPU whose minutes are counted; and what each reports beside
its speeds (features within tolerance of float32's, resampling within rounding of resampy's, set-to-none training
as fused Adam does) is held."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import REPO


def _run(script: str, *arguments: str) -> str:
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *arguments], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "2"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _ratios(line: str) -> list[float]:
    return [float(value) for value in re.findall(r"\(\s*([\d.]+)x", line)]


def test_decode_benchmark_compares_with_the_naive_decoder(video_dir):
    report = _run("decode.py", str(video_dir), "--repeats", "1")
    assert re.search(r"^\d+ clips x 1: naive [\d.]+ clips/s", report, re.M), report
    assert re.search(r"^  decode_clip, cpu video decoder: [\d.]+ clips/s \([\d.]+x\)", report, re.M), report


def test_extract_benchmark_keeps_every_candidates_features_within_tolerance(video_dir):
    clips = sorted(str(path) for path in video_dir.glob("ave_*.mp4"))
    report = _run("extract.py", *clips, "--device", "cpu", "--frames-per-second", "1", "--frames", "2", "--batch", "2")
    lines = report.splitlines()
    assert any(re.match(r"\s+baseline\s+one frame, float32\s+[\d.]+ frames/s\s+1\.00x$", line) for line in lines)
    distances = [float(value) for value in re.findall(r"cosine distance to float32: mean \S+ max (\S+)", report)]
    assert len(distances) >= 4 and max(distances) < 1e-2, report  # batched, channels_last, bf16, int8
    assert f"end to end, {len(clips)} clips at 1 frames/s" in report
    assert re.search(r"extract\(\) with \d+ decode worker\(s\): [\d.]+ s = [\d.]+ clips/s", report), report
    assert re.search(r"cpu busy with the networks \d+ % of the steady state", report), report


def test_localize_benchmark_reports_against_its_goals(video_dir):
    report = _run("localize.py", str(video_dir / "ave_16eUxQwxxbs.mp4"), "--device", "cpu", "--frames-per-second",
                  "1", "--repeats", "1", "--files", "2")
    first = re.search(r"first\s+([\d.]+) s\s+\(decode\s+([\d.]+)\s+visual\s+([\d.]+)\s+audio\s+([\d.]+)\s+model\s+"
                      r"([\d.]+)\s+other\s+([\d.]+)\)", report)
    assert first, report
    total, *parts = map(float, first.groups())
    assert sum(parts) == pytest.approx(total, abs=0.01)  # where the time went adds up to the time
    assert re.search(r"command to labels [\d.]+ s\s+goal < 10 s: (met|NOT met)", report), report
    assert re.search(r"2 files in one call: [\d.]+ s per file decoding 2 ahead, [\d.]+ s decoding each in its turn "
                     r"\([\d.]+x\)", report), report


def test_model_benchmark_measures_float32_and_bf16_against_float64():
    report = _run("model.py", "--device", "cpu", "--batch-size", "2", "--iters", "1", "--warmup", "0", "--skip",
                  "compile", "compile-bf16")
    rows = {line.split(":")[0].strip(): line for line in report.splitlines() if "samples/s" in line}
    assert list(rows) == ["float64", "float32", "bf16-autocast"], report
    assert _ratios(rows["float64"]) == [1.0, 1.0]  # train and inference, against themselves
    assert all(ratio > 0 for ratio in _ratios(rows["float32"]) + _ratios(rows["bf16-autocast"]))


def test_resample_benchmark_stays_within_rounding_of_resampy():
    report = _run("resample.py", "--repeats", "1", "--seconds", "1")
    lines = [line for line in report.splitlines() if "Hz -> 16 kHz" in line]
    assert len(lines) == 6, report
    if "resampy is not installed" in report:
        pytest.skip("resampy 0.2.2 installs only on Python < 3.12: no comparison to hold")
    differences = [float(re.search(r"largest difference (\S+)$", line).group(1)) for line in lines]
    assert max(differences) < 1e-9, report


def test_startup_benchmark_compares_the_entry_points():
    report = _run("startup.py", "--repeats", "1")
    assert re.search(r"^main\s+median [\d.]+ s", report, re.M) and re.search(r"^run\s+median [\d.]+ s", report, re.M)
    assert re.search(r"^run saves -?[\d.]+ s per command \([\d.]+x\)$", report, re.M), report


def test_train_benchmark_times_a_whole_run_and_what_lies_outside_its_epochs():
    report = _run("train.py", "--device", "cpu", "--clips", "32", "--eval-clips", "16", "--full", "float32",
                  "--full-epochs", "2", "--epochs", "1")
    assert re.search(r"eager\s+float32: first epoch\s+[\d.]+ s, then\s+[\d.]+ s/epoch \(\s*1\.0x\)", report), report
    outside = re.search(r"outside the epochs: set-up ([\d.]+) s, between epochs ([\d.]+) s, after the last ([\d.]+) s",
                        report)
    full = re.search(r"full run, float32: 2 epochs in ([\d.]+) s from the call: .* outside the epochs ([\d.]+) s",
                     report)
    assert outside and full, report
    assert sum(map(float, outside.groups())) == pytest.approx(float(full.group(2)), abs=0.15)


def test_train_step_benchmark_trains_with_set_to_none_as_with_fused_adam():
    report = _run("train_step.py", "ops")
    counts = re.search(r"operations per eager step: grouped (\d+), set-to-none (\d+)", report)
    assert counts and int(counts.group(2)) < int(counts.group(1)), report
    assert re.search(r"set-to-none after 3 steps: parameters differ from fused-adam's by at most 0$", report, re.M)
