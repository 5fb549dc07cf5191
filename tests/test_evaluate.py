"""Segment accuracy (bmfn-reference.md section 6), per-class accuracy and the confusion matrix, by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_data import SMALL_AUDIO, SMALL_MODEL, SMALL_VISUAL

from bmfn_pipeline.ave import BACKGROUND, NUM_CLASSES
from bmfn_pipeline.data import ClipArrays
from bmfn_pipeline.errors import BmfnError
from bmfn_pipeline.evaluate import (EvalResult, compute_precision, confusion_matrix, per_class_accuracy,
                                    plot_confusion, predict_rows, segment_accuracy)
from bmfn_pipeline.model import BMFN, BMFNConfig


def test_accuracy_pools_all_segments_background_included():
    target = np.array([[3] * 10, [BACKGROUND] * 10])  # the second video is background only
    pred = target.copy()
    pred[0, :2] = BACKGROUND  # two event seconds missed
    pred[1, 9] = 5  # one background second called an event
    assert segment_accuracy(pred, target) == pytest.approx(100 * 17 / 20)


def test_accuracy_reference_points():
    """bmfn-reference.md section 6: always-background on the test split scores 715/4020 = 17.8 %."""
    target = np.full((402, 10), 4)
    target.flat[:715] = BACKGROUND
    assert segment_accuracy(np.full((402, 10), BACKGROUND), target) == pytest.approx(100 * 715 / 4020)
    assert segment_accuracy(torch.tensor(target), torch.tensor(target)) == 100.0


def test_background_only_videos_all_wrong_when_an_event_is_predicted():
    target = np.full((3, 10), BACKGROUND)
    assert segment_accuracy(np.full((3, 10), 0), target) == 0.0


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        segment_accuracy(np.zeros((2, 10)), np.zeros((1, 10)))


def test_accuracy_over_no_segment_is_nan_not_zero():
    """No segment has no accuracy: NaN, not 0 % (which would read as a model that got every segment wrong)."""
    assert np.isnan(segment_accuracy(np.zeros((0, 10)), np.zeros((0, 10))))


def test_predict_rows_of_no_rows_are_empty_label_arrays():
    """A split without clips (a store whose clips are all in train, say) scores as no segments, not a failed cat."""
    labels = np.zeros((2, 10, NUM_CLASSES), np.float32)
    labels[..., BACKGROUND] = 1
    clips = ClipArrays(np.zeros((2, 10, *SMALL_VISUAL), np.float16), np.zeros((2, 10, SMALL_AUDIO), np.float32),
                       labels, labels.max(axis=1))
    pred, target = predict_rows(BMFN(BMFNConfig(**SMALL_MODEL)), clips, np.array([], np.int64), torch.device("cpu"))
    assert pred.shape == target.shape == (0, 10) and pred.dtype == target.dtype == np.int64


def test_confusion_and_per_class():
    target = np.array([[0, 0, 0, 0, BACKGROUND, BACKGROUND, 1, 1, 1, 1]])
    pred = np.array([[0, 0, 0, 1, BACKGROUND, 0, 1, 1, 1, 1]])
    matrix = confusion_matrix(pred, target)
    assert matrix.shape == (NUM_CLASSES, NUM_CLASSES) and matrix.sum() == 10
    assert matrix[0, 0] == 3 and matrix[0, 1] == 1 and matrix[BACKGROUND, 0] == 1 and matrix[1, 1] == 4
    per_class = per_class_accuracy(pred, target)
    assert per_class[0] == 75.0 and per_class[1] == 100.0 and per_class[BACKGROUND] == 50.0
    assert np.isnan(per_class[2])  # no segment of class 2
    # the pooled accuracy is the trace over the total
    assert segment_accuracy(pred, target) == pytest.approx(100 * np.trace(matrix) / matrix.sum())


def test_summary_lists_the_classes_scored_and_counts_the_others():
    """Data of a few classes (one's own, the demo's) lists those, not 25 lines of dashes."""
    per_class = {"Church bell": 100.0, "Bark": 75.0, "Flute": float("nan"), "background": 81.43}
    result = EvalResult("run/best.pt", "val", "feats.h5", 2, 20, 85.0, per_class, [], None)
    lines = result.summary().splitlines()
    assert lines[lines.index("per class:") + 1:] == ["  Church bell                      100.00",
                                                     "  Bark                              75.00",
                                                     "  background                        81.43",
                                                     "  (1 class has no val segments)"]
    assert result.to_dict()["per_class"]["Flute"] is None  # --json keeps every class


def test_confusion_png(tmp_path):
    matrix = confusion_matrix(np.array([[0, BACKGROUND]]), np.array([[0, 0]]))
    path = plot_confusion(matrix, tmp_path / "confusion.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compute_precision_sets_and_restores_the_matmul_mode():
    before = torch.get_float32_matmul_precision()
    with compute_precision(torch.device("cuda"), "tf32"):
        assert torch.get_float32_matmul_precision() == "high"
    for precision in ("tf32", "float32"):  # no reduced-precision products on CPUs, and no bf16 autocast
        with compute_precision(torch.device("cpu"), precision):
            assert torch.get_float32_matmul_precision() == before and not torch.is_autocast_enabled("cpu")
    with compute_precision(torch.device("cpu"), "bfloat16"):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    assert torch.get_float32_matmul_precision() == before and not torch.is_autocast_enabled("cpu")
    with pytest.raises(BmfnError, match="precision 'fp8'"):
        with compute_precision(torch.device("cpu"), "fp8"):
            pass
