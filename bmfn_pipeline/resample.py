"""resampy's band-limited resampling (features-reference.md 2.1: resampy 0.2.2, kaiser_best), computed as matrix
products: the same output to about 2e-15, 1.5-15x faster (benchmarks/resample.py), and without numba.

resampy walks the output samples one by one: output t reads the input around n = int(r_t), where the time register
r_t adds 1/ratio per sample in float64, and weighs it with the filter table interpolated at frac(r_t). With the
rates reduced to sr_new/sr_orig = L/M, the exact register of output t = m*L + p is m*M + p*M/L: L phases whose
weights are shared by every block m, so one product of strided input windows with an L-column weight bank gives
them all. The float register drifts from the exact one, which moves each output's interpolation point a little;
its weights are linear in that point, so two more products (the filter's differences, per wing) times each
output's drift reproduce resampy's values. The few outputs whose drift moves them to another table entry or input
sample are computed one by one, as resampy does; so is every output of a rate pair whose bank would be too large.

The filter table is made here from kaiser_best's parameters, as resampy 0.2.2 made the one it ships (a Kaiser-
windowed sinc): its entries equal the shipped ones to 2.3e-16 (99.8 % of them exactly). resampy 0.2.2 itself
cannot be installed on Python 3.12 or later (its setup.py imports the removed `imp`), and later resampy versions
regenerated the table with other values (features-reference.md 2.1); the tests hold this module to resampy 0.2.2
where it installs.
"""

from __future__ import annotations

from functools import cached_property, lru_cache
from math import gcd

import numpy as np

# kaiser_best, resampy's default filter, used for the AVE features: a sinc of 64 zero crossings per wing, tabulated
# at 2**9 points per crossing, its band edge at ROLLOFF of Nyquist, under a Kaiser window of shape KAISER_BETA.
NUM_ZEROS = 64
TABLE_PRECISION = 9
ROLLOFF = 0.9475937167399596
KAISER_BETA = 14.769656459379492
# Input periods per block when the rate ratio has few phases (48 kHz -> 16 kHz has one), so products stay wide.
MIN_PHASES = 128
# Weights a bank may hold (phases x taps of a block's window, three such arrays of float64: 48 MiB): rate pairs of
# many phases and a long block (44056 -> 16000 has 2000 phases of 5,637 taps) are computed output by output instead.
MAX_BANK_ENTRIES = 2**21
DIRECT_BATCH_TAPS = 2**18  # outputs x taps per vectorised batch of the one-by-one path (a few arrays of 2 MiB)


def resample(x: np.ndarray, sr_orig: int, sr_new: int) -> np.ndarray:
    """1-D float64 signal from sr_orig to sr_new Hz: resampy.resample(x, sr_orig, sr_new, filter='kaiser_best')."""
    x = np.asarray(x, np.float64)
    if sr_orig <= 0 or sr_new <= 0:
        raise ValueError(f"invalid sample rates {sr_orig} -> {sr_new} Hz")
    ratio = float(sr_new) / sr_orig
    if not _table_step(ratio):
        raise ValueError(f"{sr_orig} -> {sr_new} Hz: the filter table cannot resolve a rate ratio below 1/512")
    n_out = int(x.shape[0] * ratio)
    if n_out < 1:
        raise ValueError(f"input of {x.shape[0]} samples is too short to resample from {sr_orig} to {sr_new} Hz")
    register = np.zeros(n_out)
    np.cumsum(np.full(n_out - 1, 1.0 / ratio), out=register[1:])  # resampy's running sum, added in the same order
    if _bank_entries(sr_orig, sr_new) > MAX_BANK_ENTRIES:
        return _Taps(ratio).direct_all(x, register)
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

    n, left_off, left_eta, right_off, right_eta = bank.point(register)
    phase = np.arange(n_out) % bank.phases
    exact_n = (np.arange(n_out) // bank.phases) * bank.hop + bank.phase_n[phase]
    y = base + (left_eta - bank.left_eta[phase]) * left + (right_eta - bank.right_eta[phase]) * right
    moved = (n != exact_n) | (left_off != bank.left_off[phase]) | (right_off != bank.right_off[phase])
    bank.direct(x, y, np.flatnonzero(moved), n, left_off, left_eta, right_off, right_eta)
    return y


class _Taps:
    """The filter table scaled for one rate ratio, and resampy's arithmetic for one output."""

    def __init__(self, ratio: float) -> None:
        window, self.num_table = _filter()
        if ratio < 1:
            window = window * ratio
        self.window = window
        self.delta = np.zeros_like(window)
        self.delta[:-1] = np.diff(window)
        self.scale = min(1.0, ratio)
        self.step = _table_step(ratio)

    def point(self, register: np.ndarray):
        """resampy's per-output quantities: input index, and table offset and interpolation factor per wing."""
        n = register.astype(np.int64)
        frac = self.scale * (register - n)
        left = frac * self.num_table
        left_off = left.astype(np.int64)
        right = (self.scale - frac) * self.num_table
        right_off = right.astype(np.int64)
        return n, left_off, left - left_off, right_off, right - right_off

    def direct_all(self, x: np.ndarray, register: np.ndarray) -> np.ndarray:
        """Every output computed from its own register, as resampy's loop does."""
        y = np.empty(register.shape[0])
        self.direct(x, y, np.arange(register.shape[0]), *self.point(register))
        return y

    @cached_property
    def _wing_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """The window's and its differences' entries a wing reads at each table offset, [step + 1, taps]: made once
        per rate pair (a bank is kept across calls), not per call."""
        offsets, i = np.arange(self.step + 1)[:, None], np.arange(_wing_taps(self.step))
        kept = i < (self.window.shape[0] - offsets) // self.step
        index = np.where(kept, offsets + i * self.step, 0)
        return np.where(kept, self.window[index], 0.0), np.where(kept, self.delta[index], 0.0)

    def direct(self, x: np.ndarray, y: np.ndarray, outputs: np.ndarray, n: np.ndarray, left_off: np.ndarray,
               left_eta: np.ndarray, right_off: np.ndarray, right_eta: np.ndarray) -> None:
        """y[outputs] computed one by one (in vectorised batches) from the per-output quantities of point(). A wing
        at table offset r reads window[r + i*step] for i < (len(window) - r) // step (resampy's count, which leaves
        out a last entry short of a whole step): row r of _wing_rows, zero after; its input samples run from
        the output's sample outwards, zero past the signal's ends (where resampy's loops stop)."""
        if not len(outputs):
            return
        window, delta = self._wing_rows
        taps = window.shape[1]
        padded = np.concatenate([np.zeros(taps), x, np.zeros(taps)])
        spans = np.lib.stride_tricks.sliding_window_view(padded, taps)  # spans[j] = padded[j:j + taps]
        chunk = max(1, DIRECT_BATCH_TAPS // taps)  # heavy downsampling has thousands of taps
        for first in range(0, outputs.shape[0], chunk):
            t = outputs[first:first + chunk]
            left = window[left_off[t]] + left_eta[t, None] * delta[left_off[t]]
            right = window[right_off[t]] + right_eta[t, None] * delta[right_off[t]]
            y[t] = (np.einsum("ij,ij->i", left, spans[n[t] + 1, ::-1])  # x[n], x[n-1], ...
                    + np.einsum("ij,ij->i", right, spans[n[t] + taps + 1]))  # x[n+1], x[n+2], ...


class _Bank(_Taps):
    """The weights of every phase of one rate pair, as columns over the taps of a block's input window."""

    def __init__(self, sr_orig: int, sr_new: int) -> None:
        super().__init__(float(sr_new) / sr_orig)
        self.phases, self.hop = _phases_and_hop(sr_orig, sr_new)
        g = gcd(sr_orig, sr_new)
        up, down = sr_new // g, sr_orig // g
        # Exact registers of the phases: integer part and fraction p*down/up.
        p = np.arange(self.phases)
        self.phase_n = (p * down) // up
        exact = (p * down % up) / up  # the fraction resampy would see without rounding
        _, self.left_off, self.left_eta, self.right_off, self.right_eta = self.point(self.phase_n + exact)
        taps = [(self._wing(int(lo)), self._wing(int(ro))) for lo, ro in zip(self.left_off, self.right_off)]
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

    def _wing(self, offset: int) -> np.ndarray:
        """The table entries one wing at `offset` reads (as many as resampy's loop takes)."""
        return offset + np.arange((self.window.shape[0] - offset) // self.step) * self.step


def _phases_and_hop(sr_orig: int, sr_new: int) -> tuple[int, int]:
    """A block's outputs (whole periods of the phases, at least MIN_PHASES) and the input samples it advances."""
    g = gcd(sr_orig, sr_new)
    periods = -(-MIN_PHASES // (sr_new // g))
    return sr_new // g * periods, sr_orig // g * periods


def _table_step(ratio: float) -> int:
    """Table entries between a wing's taps: the table's resolution, scaled down when downsampling (resampy's)."""
    return int(min(1.0, ratio) * 2**TABLE_PRECISION)


def _wing_taps(step: int) -> int:
    """The most taps one wing of an output reads (from table offset 0)."""
    return (NUM_ZEROS * 2**TABLE_PRECISION + 1) // step + 1


def _bank_entries(sr_orig: int, sr_new: int) -> int:
    """A bound on phases x width of the bank of a rate pair: a block's input plus both wings of the filter."""
    phases, hop = _phases_and_hop(sr_orig, sr_new)
    return phases * (hop + 2 * _wing_taps(_table_step(float(sr_new) / sr_orig)))


@lru_cache(maxsize=8)
def _bank(sr_orig: int, sr_new: int) -> _Bank:
    return _Bank(sr_orig, sr_new)


@lru_cache(maxsize=1)
def _filter() -> tuple[np.ndarray, int]:
    """kaiser_best's table (one wing, from the centre out) and its entries per zero crossing, made as resampy 0.2.2
    made the one it ships: the sinc sampled at every table point, times the matching half of a Kaiser window."""
    num_table = 2**TABLE_PRECISION
    n = num_table * NUM_ZEROS
    sinc = ROLLOFF * np.sinc(ROLLOFF * np.linspace(0, NUM_ZEROS, num=n + 1))
    k = np.arange(n, 2 * n + 1)
    kaiser = np.i0(KAISER_BETA * np.sqrt(1 - ((k - n) / n) ** 2)) / np.i0(KAISER_BETA)
    return kaiser * sinc, num_table
