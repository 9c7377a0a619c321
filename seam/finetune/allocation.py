"""The radio model and input checks shared by the split fine-tuning planners (fedsllm.py and dashf.py).

A UE sending in a share b of a band of B Hz gets the Shannon rate r(b) = b·B·log2(1 + k/(b·B)), where k = p·g/N0 is
its received power over the noise power spectral density, in Hz. r is increasing and concave in b and saturates at
k/ln 2 as b grows (the power-limited regime), so a transfer time bits/r(b) is convex in b: this is what makes both
planners' bandwidth problems convex.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
from scipy.special import lambertw

from seam.runtime.errors import SeamError

LN2 = math.log(2)


def rate_bps(shares, bandwidth_hz, k_hz) -> np.ndarray:
    """Shannon rate of each UE in its band share (0 where the share is 0)."""
    hz = np.asarray(shares, float) * bandwidth_hz
    with np.errstate(divide="ignore", invalid="ignore"):
        rate = hz * np.log1p(k_hz / hz) / LN2
    return np.where(hz > 0, rate, 0.0)


def min_share(rate, bandwidth_hz, k_hz) -> np.ndarray:
    """The least band share whose Shannon rate reaches ``rate`` bit/s; inf at or beyond the ceiling k/ln 2.

    With x = k/(b·B) the condition is ln(1 + x)/x = m, m = rate·ln 2/k in (0, 1), whose nontrivial root is
    1 + x = -W(-m·e^-m)/m on the lower branch of the Lambert W function; then b = k/(B·x).
    """
    rate, k = np.broadcast_arrays(np.asarray(rate, float), np.asarray(k_hz, float))
    m = rate * LN2 / k
    inside = (m > 0) & (m < 1)
    safe = np.where(inside, m, 0.5)  # keeps lambertw's argument in its domain where the answer is 0 or inf anyway
    x = -lambertw(-safe * np.exp(-safe), -1).real / safe - 1
    with np.errstate(divide="ignore"):
        share = k / (bandwidth_hz * x)
    return np.where(inside, share, np.where(m <= 0, 0.0, np.inf))


def checked(name: str, values, shape: tuple[int, ...], *, positive: bool = True, integer: bool = False) -> np.ndarray:
    """``values`` as a float (or int) array of exactly ``shape``, finite and positive (or non-negative)."""
    array = np.asarray(values, dtype=float)
    if array.shape != shape:
        raise SeamError(f"{name} has shape {array.shape}, expected {shape} (one value per user, server or layer)")
    if not np.all(np.isfinite(array)):
        raise SeamError(f"{name} must be finite numbers")
    if positive and np.any(array <= 0):
        raise SeamError(f"{name} must be positive, got {array.min():g}")
    if not positive and np.any(array < 0):
        raise SeamError(f"{name} must not be negative, got {array.min():g}")
    if integer:
        if np.any(array != np.round(array)):
            raise SeamError(f"{name} must be whole numbers")
        return array.astype(int)
    return array


def positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) and math.isfinite(value) and value > 0):
        raise SeamError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def users(gains) -> int:
    """The number of users, from the first axis of the channel gains; refuses an empty set."""
    count = np.shape(gains)[0] if np.ndim(gains) else 0
    if count == 0:
        raise SeamError("no users: give at least one user (one channel gain per user)")
    return count
