"""Next-token choice from logits: greedy, or temperature with top-k and top-p, seeded per session.

Pure numpy, shared by the edge server and by local generation on the UE, so one seed gives the same tokens
wherever the tail runs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from seam.runtime.errors import SeamError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 keeps every token
    top_p: float = 1.0  # nucleus mass kept, in (0, 1]
    seed: int = 0

    def __post_init__(self):
        # A peer's parameters: a wrong type or an absurd value must be refused, not fail inside the sampler.
        for name, integer in (("temperature", False), ("top_k", True), ("top_p", False), ("seed", True)):
            if not _plain_number(getattr(self, name), integer):
                raise SeamError(f"sampling parameter {name} must be a finite {'integer' if integer else 'number'} "
                                f"below 2**63, got {getattr(self, name)!r:.40}")
        if self.temperature < 0 or self.top_k < 0 or self.seed < 0 or not 0 < self.top_p <= 1:
            raise SeamError(
                f"invalid sampling parameters {asdict(self)}: need temperature >= 0, top_k >= 0, seed >= 0 and "
                "0 < top_p <= 1"
            )

    @classmethod
    def from_dict(cls, raw: dict) -> SamplingParams:
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise SeamError(f"unknown sampling parameters {sorted(unknown)}")
        return cls(**raw)


def _plain_number(value, integer: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        return False
    return abs(value) < 2**63 and (integer or math.isfinite(value))


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    @property
    def state(self) -> dict:
        """The random generator's position, JSON-safe: a split that moves to the other side takes it along, so
        the tokens sampled there continue the same sequence."""
        return self.rng.bit_generator.state

    @state.setter
    def state(self, state: dict) -> None:
        try:
            self.rng.bit_generator.state = state
        except (TypeError, ValueError, KeyError, OverflowError) as error:
            raise SeamError(f"invalid sampler state ({error})") from None

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """logits [B, V] -> token ids [B] int64."""
        params = self.params
        if params.temperature == 0:
            return logits.argmax(axis=-1).astype(np.int64)
        scaled = logits.astype(np.float64) / params.temperature
        if params.top_k:
            kth = np.sort(scaled, axis=-1)[:, -min(params.top_k, scaled.shape[-1])][:, None]
            scaled = np.where(scaled < kth, -np.inf, scaled)
        probs = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        if params.top_p < 1:
            order = np.argsort(-probs, axis=-1)
            sorted_probs = np.take_along_axis(probs, order, axis=-1)
            # keep the smallest prefix whose mass reaches top_p (the first token always stays)
            drop_sorted = np.cumsum(sorted_probs, axis=-1) - sorted_probs >= params.top_p
            drop = np.zeros_like(drop_sorted)
            np.put_along_axis(drop, order, drop_sorted, axis=-1)
            probs = np.where(drop, 0.0, probs)
            probs /= probs.sum(axis=-1, keepdims=True)
        # One uniform draw per row, as Generator.choice makes, drawn here so that ``skip`` mirrors it exactly.
        cumulative = np.cumsum(probs, axis=-1)
        draws = self.rng.random(len(probs)) * cumulative[:, -1]
        return np.array([min(np.searchsorted(row, draw, side="right"), len(row) - 1)
                         for row, draw in zip(cumulative, draws)], dtype=np.int64)

    def skip(self, rows: int) -> None:
        """Moves the generator on as sampling ``rows`` tokens would, without their logits: the UE keeps the
        position of the generator the edge samples with, so that a new edge taking the session over after the
        old one was lost (or this device finishing alone) continues the same sequence."""
        if self.params.temperature > 0:
            self.rng.random(rows)
