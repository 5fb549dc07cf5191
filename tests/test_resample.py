"""The matrix-product resampler reproduces resampy 0.2.2's kaiser_best (the AVE audio path) to float64 rounding.
(tests/test_vggish.py holds the whole audio front end to the AVE-era reference values, with or without resampy.)"""

from __future__ import annotations

import numpy as np
import pytest

import bmfn_pipeline.resample as resample_module
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


# Values of resampy 0.2.2's own output (resampy.resample(signal(rate), rate, 16000, filter="kaiser_best"), run on
# Python 3.11), so that the resampler is held to it where resampy 0.2.2 cannot be installed (Python 3.12+):
# {(sr_orig, sr_new): (output length, {index: value})}. 44100 and 11025 take the bank, 44056 and 7999 the direct path.
RESAMPY_022_VALUES = {
    (44100, 16000): (8006, {0: 0.008347490052171927, 1: 0.08465819417223339, 2668: 0.6024863726015751,
                            4003: 0.31178088044260827, 8004: 0.03783660478478032, 8005: 0.39890318707923983}),
    (11025, 16000): (8023, {0: 0.0016565965126840647, 1: 0.07710274771910562, 2674: -0.23683650984883933,
                            4011: 0.24492778673699675, 8021: -0.127722089910487, 8022: -0.12548085713066287}),
    (44056, 16000): (8006, {0: 0.008348409126384009, 1: 0.08471281124115461, 2668: 0.6028945125730774,
                            4003: 0.3119634965478066, 8004: 0.037623114719474895, 8005: 0.39943753556692724}),
    (7999, 16000): (8033, {0: 0.0022942911640447604, 1: 0.07033454558224003, 2677: -0.5821468293299756,
                           4016: 0.4202764674169378, 8031: -0.3817517538532894, 8032: -0.10275749151739863}),
}
# Entries of the kaiser_best table resampy 0.2.2 ships (data/kaiser_best.npz, half_window).
RESAMPY_022_TABLE = {0: 0.9475937167399596, 1: 0.947588371269956, 25: 0.9442563298018898, 512: 0.05207910617885589,
                     5123: -0.026651383380736103, 16384: 0.0012568036285549463, 32767: 1.6503291486332836e-08,
                     32768: 1.6401183069347287e-08}


def signal(rate: int) -> np.ndarray:
    """Half a second and 17 samples of a tone and a chirp."""
    t = np.arange(rate // 2 + 17) / rate
    return 0.5 * np.sin(2 * np.pi * 440 * t) + 0.25 * np.sin(2 * np.pi * 3100 * t * t)


@pytest.mark.parametrize("rates", RESAMPY_022_VALUES)
def test_reproduces_resampy_022_values_without_resampy(rates):
    length, values = RESAMPY_022_VALUES[rates]
    y = resample(signal(rates[0]), *rates)
    assert y.shape == (length,)
    np.testing.assert_allclose(y[list(values)], list(values.values()), rtol=0, atol=1e-13)


def test_the_filter_table_has_resampy_022_values():
    table, per_crossing = _filter()
    assert per_crossing == 512 and table.shape == (32769,)
    np.testing.assert_allclose(table[list(RESAMPY_022_TABLE)], list(RESAMPY_022_TABLE.values()), rtol=0, atol=2.3e-16)


@pytest.mark.parametrize("rates", [(44100, 16000), (48000, 16000), (11025, 16000), (7999, 16000), (16000, 44100),
                                   (192000, 1000), (44100, 48000)])
def test_the_direct_path_matches_resampy(resampy, monkeypatch, rates):
    """Every output computed one by one (as for rate pairs whose bank would be too large), up and down, and with
    heavy downsampling (16,385 taps a wing, in small batches)."""
    monkeypatch.setattr(resample_module, "MAX_BANK_ENTRIES", 0)
    x = np.random.default_rng(rates[0]).standard_normal(rates[0] // 3 + 5) * 0.3
    np.testing.assert_allclose(resample(x, *rates), resampy.resample(x, *rates, filter="kaiser_best"),
                               rtol=0, atol=1e-12)


def test_only_rare_rates_are_past_the_bank_limit():
    from bmfn_pipeline.resample import _bank, _bank_entries

    assert _bank_entries(44056, 16000) > MAX_BANK_ENTRIES
    for rate in (7350, 8000, 11025, 16000, 22050, 44100, 48000, 88200, 96000, 192000):
        assert _bank_entries(rate, 16000) <= MAX_BANK_ENTRIES
    # the bound holds for banks made (heavy downsampling included, where the taps are many)
    for sr_orig, sr_new in [(7350, 300), (22050, 300), (48000, 1000), (99760, 2000), (192000, 1000), (16000, 44100),
                            (11025, 16000), (44100, 22050)]:
        bank = _bank(sr_orig, sr_new)
        assert bank.phases * bank.width <= _bank_entries(sr_orig, sr_new), (sr_orig, sr_new)


def test_the_filter_table_is_the_one_resampy_ships(resampy):
    """The table made from kaiser_best's parameters: each entry the shipped one to float64 rounding."""
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
    with pytest.raises(ValueError, match="cannot resolve a rate ratio below 1/512"):
        resample(np.zeros(10**6), 16000 * 600, 16000)  # resampy divides by zero
