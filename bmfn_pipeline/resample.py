"""resampy's band-limited resampling (features-reference.md 2.1: resampy 0.2.2, kaiser_best), computed as matrix
products: the same output to about 1e-15, 5-10x faster, and without importing numba in every decode worker.

resampy walks the output samples one by one: output t reads the input around n = int(r_t), where the time register
r_t adds 1/ratio per sample in float64, and weighs it with the filter table interpolated at frac(r_t). With the
rates reduced to sr_new/sr_orig = L/M, the exact register of output t = m*L + p is m*M + p*M/L: L phases whose
weights are shared by every block m, so one product of strided input windows with an L-column weight bank gives
them all. The float register drifts from the exact one, which moves each output's interpolation point a little;
its weights are linear in that point, so two more products (the filter's differences, per wing) times each
output's drift reproduce resampy's values. The few outputs whose drift moves them to another table entry or input
sample are computed one by one, as resampy does.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from math import gcd
from pathlib import Path

import numpy as np

FILTER = "kaiser_best"  # resampy's default, used for the AVE features
# Input periods per block when the rate ratio has few phases (48 kHz -> 16 kHz has one), so products stay wide.
MIN_PHASES = 128
# Rate pairs with more phases (11025 -> 16000 has 640) go to resampy itself: the bank grows with the phases and
# ever more outputs sit on table-entry boundaries, so the products stop paying off.
MAX_PHASES = 512
DIRECT_CHUNK = 4096  # outputs per vectorised batch of the one-by-one path


def resample(x: np.ndarray, sr_orig: int, sr_new: int) -> np.ndarray:
    """1-D float64 signal from sr_orig to sr_new Hz: resampy.resample(x, sr_orig, sr_new, filter='kaiser_best')."""
    x = np.asarray(x, np.float64)
    if sr_orig <= 0 or sr_new <= 0:
        raise ValueError(f"invalid sample rates {sr_orig} -> {sr_new} Hz")
    if sr_new // gcd(sr_orig, sr_new) > MAX_PHASES:
        import resampy

        return resampy.resample(x, sr_orig, sr_new, filter=FILTER)
    ratio = float(sr_new) / sr_orig
    n_out = int(x.shape[0] * ratio)
    if n_out < 1:
        raise ValueError(f"input of {x.shape[0]} samples is too short to resample from {sr_orig} to {sr_new} Hz")
    bank = _bank(sr_orig, sr_new)
    blocks = -(-n_out // bank.phases)
    # Zero padding on both sides stands for resampy's wings stopping at the signal's ends.
    padded = np.zeros((blocks - 1) * bank.hop + bank.width)
    start = -bank.first
    count = min(x.shape[0], padded.shape[0] - start)
    padded[start:start + count] = x[:count]
    windows = np.lib.stride_tricks.as_strided(padded, (blocks, bank.width),
                                              (bank.hop * padded.itemsize, padded.itemsize), writeable=False)
    base, left, right = (np.asarray(windows @ w).reshape(-1)[:n_out] for w in (bank.base, bank.left, bank.right))

    register = np.zeros(n_out)
    np.cumsum(np.full(n_out - 1, 1.0 / ratio), out=register[1:])  # resampy's running sum, added in the same order
    n, left_off, left_eta, right_off, right_eta = bank.point(register)
    phase = np.arange(n_out) % bank.phases
    exact_n = (np.arange(n_out) // bank.phases) * bank.hop + bank.phase_n[phase]
    y = base + (left_eta - bank.left_eta[phase]) * left + (right_eta - bank.right_eta[phase]) * right
    moved = (n != exact_n) | (left_off != bank.left_off[phase]) | (right_off != bank.right_off[phase])
    moved = np.flatnonzero(moved)
    for first in range(0, moved.shape[0], DIRECT_CHUNK):
        chunk = moved[first:first + DIRECT_CHUNK]
        y[chunk] = bank.direct(x, n[chunk], left_off[chunk], left_eta[chunk], right_off[chunk], right_eta[chunk])
    return y


class _Bank:
    """The weights of every phase of one rate pair, as columns over the taps of a block's input window."""

    def __init__(self, sr_orig: int, sr_new: int) -> None:
        ratio = float(sr_new) / sr_orig
        window, self.num_table = _filter()
        if ratio < 1:
            window = window * ratio
        self.window = window
        self.delta = np.zeros_like(window)
        self.delta[:-1] = np.diff(window)
        self.scale = min(1.0, ratio)
        self.step = int(self.scale * self.num_table)
        g = gcd(sr_orig, sr_new)
        up, down = sr_new // g, sr_orig // g
        periods = -(-MIN_PHASES // up)
        self.phases, self.hop = up * periods, down * periods
        # Exact registers of the phases: integer part and fraction p*down/up.
        p = np.arange(self.phases)
        self.phase_n = (p * down) // up
        exact = (p * down % up) / up  # the fraction resampy would see without rounding
        _, self.left_off, self.left_eta, self.right_off, self.right_eta = self.point(self.phase_n + exact)
        taps = [(self._taps(int(lo)), self._taps(int(ro))) for lo, ro in zip(self.left_off, self.right_off)]
        self.first = min(int(n) - len(lt) + 1 for n, (lt, _) in zip(self.phase_n, taps))
        last = max(int(n) + len(rt) for n, (_, rt) in zip(self.phase_n, taps))
        self.width = last - self.first + 1
        self.base, self.left, self.right = (np.zeros((self.width, self.phases)) for _ in range(3))
        for col, (n, (lt, rt)) in enumerate(zip(self.phase_n, taps)):
            rows_left = n - self.first - np.arange(len(lt))  # input n - i
            rows_right = n + 1 - self.first + np.arange(len(rt))  # input n + 1 + k
            self.base[rows_left, col] = self.window[lt] + self.left_eta[col] * self.delta[lt]
            self.base[rows_right, col] = self.window[rt] + self.right_eta[col] * self.delta[rt]
            self.left[rows_left, col] = self.delta[lt]
            self.right[rows_right, col] = self.delta[rt]

    def point(self, register: np.ndarray):
        """resampy's per-output quantities: input index, and table offset and interpolation factor per wing."""
        n = register.astype(np.int64)
        frac = self.scale * (register - n)
        left = frac * self.num_table
        left_off = left.astype(np.int64)
        right = (self.scale - frac) * self.num_table
        right_off = right.astype(np.int64)
        return n, left_off, left - left_off, right_off, right - right_off

    def _taps(self, offset: int) -> np.ndarray:
        return offset + np.arange((self.window.shape[0] - offset) // self.step) * self.step

    def direct(self, x: np.ndarray, n: np.ndarray, left_off: np.ndarray, left_eta: np.ndarray,
               right_off: np.ndarray, right_eta: np.ndarray) -> np.ndarray:
        """Outputs computed one by one from their own register, as resampy's loop does."""
        return (self._wing(x, n, left_off, left_eta, -1, n + 1)
                + self._wing(x, n + 1, right_off, right_eta, 1, x.shape[0] - n - 1))

    def _wing(self, x, first, offset, eta, direction, available) -> np.ndarray:
        """Sum over i < min(available, taps(offset)) of (window + eta * delta)[offset + i*step] * x[first + direction*i]."""
        i = np.arange(self.window.shape[0] // self.step + 1)
        count = np.minimum(available, (self.window.shape[0] - offset) // self.step)
        valid = i < count[:, None]
        table = np.where(valid, offset[:, None] + i * self.step, 0)
        weights = np.where(valid, self.window[table] + eta[:, None] * self.delta[table], 0.0)
        samples = x[np.where(valid, first[:, None] + direction * i, 0)]
        return (weights * samples).sum(axis=1)


@lru_cache(maxsize=8)
def _bank(sr_orig: int, sr_new: int) -> _Bank:
    return _Bank(sr_orig, sr_new)


@lru_cache(maxsize=1)
def _filter() -> tuple[np.ndarray, int]:
    """resampy's kaiser_best table, read from its package data without importing resampy (and so numba)."""
    spec = importlib.util.find_spec("resampy")
    if spec is None or spec.origin is None:
        raise ImportError("resampy is not installed; its filter table defines the AVE audio resampling")
    data = np.load(Path(spec.origin).parent / "data" / f"{FILTER}.npz")
    return data["half_window"].astype(np.float64), int(data["precision"])
