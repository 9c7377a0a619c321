"""Channel impairments for research: what an unreliable link does to the float32 activation at the cut.

``erasure:P`` zeroes each element independently with probability P, as the paper's code does for lost symbols;
``awgn:SNR`` adds white Gaussian noise at SNR dB. ``parse`` turns such a spec string into an impairment, whose
``apply(x, rng)`` returns a new array and draws only from the generator it is given, so a seed reproduces a run.

AWGN measures signal power as the mean square over the whole tensor, not per token row: a channel's noise floor
does not know where one token's values end, so with a fixed transmit power the noise is set by the average power
of everything sent. Per-row power would also hand the few tokens with massive activations (the attention-sink
first token of most LLMs) noise orders of magnitude stronger than the rest. For a decode step, one token, the two
coincide.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from seam.runtime.errors import SeamError


@dataclass(frozen=True)
class Erasure:
    p: float

    def apply(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        erased = rng.random(x.shape, dtype=np.float32) < self.p
        return np.where(erased, np.float32(0), x)

    def __str__(self) -> str:
        return f"erasure:{self.p:g}"


@dataclass(frozen=True)
class AWGN:
    snr_db: float

    def apply(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        signal_power = float(np.mean(np.square(x, dtype=np.float64))) if x.size else 0.0
        if not math.isfinite(signal_power):
            raise SeamError("awgn needs a finite activation to measure its power; this one holds inf or NaN")
        sigma = math.sqrt(signal_power / 10 ** (self.snr_db / 10))
        return x + np.float32(sigma) * rng.standard_normal(x.shape, dtype=np.float32)

    def __str__(self) -> str:
        return f"awgn:{self.snr_db:g}"


Impairment = Erasure | AWGN


def _erasure(value: float) -> Erasure:
    if not 0 <= value < 1:
        raise SeamError(f"erasure probability must be in [0, 1), got {value:g}")
    return Erasure(value)


def _awgn(value: float) -> AWGN:
    if not math.isfinite(value):
        raise SeamError(f"awgn SNR must be a finite number of dB, got {value:g}")
    return AWGN(value)


_KINDS = {"erasure": _erasure, "awgn": _awgn}


def parse(spec: str) -> Impairment:
    """``erasure:P`` with P in [0, 1), or ``awgn:SNR`` with SNR in dB; raises SeamError on anything else."""
    kind, _, raw = spec.partition(":")
    if kind not in _KINDS:
        raise SeamError(f"unknown impairment {spec!r}; expected erasure:P or awgn:SNR_DB")
    try:
        value = float(raw)
    except ValueError:
        raise SeamError(f"impairment {spec!r} needs a number after '{kind}:'") from None
    return _KINDS[kind](value)
