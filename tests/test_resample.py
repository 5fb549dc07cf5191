"""The matrix-product resampler reproduces resampy 0.2.2's kaiser_best (the AVE audio path) to float64 rounding."""

from __future__ import annotations

import numpy as np
import pytest
import resampy

from bmfn_pipeline.resample import MAX_PHASES, resample


@pytest.mark.parametrize("rate", [44100, 48000, 22050, 32000, 24000, 8000, 96000, 11025])
def test_matches_resampy_on_noise(rate):
    """Common rates take the bank path (11025 -> 16000 has more than MAX_PHASES phases and goes to resampy)."""
    x = np.random.default_rng(rate).standard_normal(rate * 3 + 17) * 0.3
    expected = resampy.resample(x, rate, 16000, filter="kaiser_best")
    got = resample(x, rate, 16000)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_11025_is_past_the_bank_limit():
    assert 640 > MAX_PHASES  # 16000 / gcd(11025, 16000)


def test_matches_resampy_on_real_audio_at_the_edges(video_dir):
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
