"""Seconds to resample 10 s of sound to 16 kHz: bmfn_pipeline/resample.py against resampy 0.2.2 (the baseline,
where it installs: Python < 3.12), in the same run, with the largest difference between the two.

    python benchmarks/resample.py [--rates 44100 48000 11025 22050 44056 7999] [--seconds 10] [--repeats 3]

Common rates take the weight bank (resample.py's module docstring); rates whose bank would be too large (44056,
7999) are computed output by output. resampy's first call compiles it with numba: that call is left out.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bmfn_pipeline.resample import MAX_BANK_ENTRIES, _bank_entries, resample


def best_of(fn, repeats: int) -> tuple[float, np.ndarray]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=int, nargs="+", default=[44100, 48000, 11025, 22050, 44056, 7999])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # resampy 0.2.2 imports the deprecated pkg_resources
            import resampy
    except ImportError:
        resampy = None
        print("resampy is not installed (it installs on Python < 3.12): bmfn's times only")
    for rate in args.rates:
        x = np.random.default_rng(rate).standard_normal(int(rate * args.seconds)) * 0.3
        path = "bank" if _bank_entries(rate, 16000) <= MAX_BANK_ENTRIES else "one by one"
        resample(x[:rate], rate, 16000)  # the bank is made once per rate pair
        ours, y = best_of(lambda: resample(x, rate, 16000), args.repeats)
        line = f"{rate:>6} Hz -> 16 kHz ({path:>10}): bmfn {ours:.3f} s"
        if resampy is not None:
            resampy.resample(x[:rate], rate, 16000, filter="kaiser_best")  # numba compiles on the first call
            theirs, expected = best_of(lambda: resampy.resample(x, rate, 16000, filter="kaiser_best"), args.repeats)
            line += (f", resampy {theirs:.3f} s: {theirs / ours:.1f}x; largest difference "
                     f"{np.abs(y - expected).max():.1e}")
        print(line, flush=True)


if __name__ == "__main__":
    main()
