"""The matrix-product resampler reproduces resampy 0.2.2's kaiser_best (the AVE audio path) to float64 rounding.
(tests/test_vggish.py holds the whole audio front end to the AVE-era reference values, with or without resampy.)"""

from __future__ import annotations

import numpy as np
import pytest

from bmfn_pipeline.resample import MAX_BANK_ENTRIES, _filter, resample


@pytest.mark.parametrize("rate", [44100, 48000, 22050, 32000, 24000, 8000, 96000, 11025, 44056])
def test_matches_resampy_on_noise(resampy, rate):
    """Common rates take the bank path; 44056 -> 16000 (2000 phases) would need too large a bank and is computed
    output by output."""
    x = np.random.default_rng(rate).standard_normal(rate * 3 + 17) * 0.3
    expected = resampy.resample(x, rate, 16000, filter="kaiser_best")
    got = resample(x, rate, 16000)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_only_rare_rates_are_past_the_bank_limit():
    from bmfn_pipeline.resample import _bank, _bank_entries

    assert _bank_entries(44056, 16000) > MAX_BANK_ENTRIES
    for rate in (7350, 8000, 11025, 16000, 22050, 44100, 48000, 88200, 96000, 192000):
        bank = _bank(rate, 16000)
        assert bank.phases * bank.width <= _bank_entries(rate, 16000) <= MAX_BANK_ENTRIES  # the estimate bounds it


def test_the_filter_table_is_the_one_resampy_ships(resampy):
    """The table made from kaiser_best's parameters: each entry the shipped one or one rounding step from it."""
    from pathlib import Path

    shipped = np.load(Path(resampy.__file__).parent / "data" / "kaiser_best.npz")
    table, per_crossing = _filter()
    assert per_crossing == int(shipped["precision"])
    assert table.shape == shipped["half_window"].shape
    np.testing.assert_allclose(table, shipped["half_window"], rtol=0, atol=2.3e-16)


def test_matches_resampy_on_real_audio_at_the_edges(resampy, video_dir):
    """A real soundtrack (tones, silence, clipping edges) and inputs shorter than the filter."""
    import av

    with av.open(str(video_dir / "ave_22olCB3wQaA.mp4")) as container:
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate
        mono = np.concatenate([f.to_ndarray().mean(axis=0) for f in container.decode(stream)]).astype(np.float64)
    for x in (mono, mono[:50], mono[1000:1003]):
        np.testing.assert_allclose(resample(x, rate, 16000), resampy.resample(x, rate, 16000), rtol=0, atol=1e-12)


def test_bad_input_is_refused_like_resampy():
    with pytest.raises(ValueError, match="too short"):
        resample(np.zeros(2), 44100, 16000)
    with pytest.raises(ValueError, match="invalid sample rates 0 -> 16000"):
        resample(np.zeros(100), 0, 16000)
