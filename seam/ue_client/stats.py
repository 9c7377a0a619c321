"""What a generation measured: each step's time by part, token arrivals, and the moves of its split."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from seam.planning.snapshot import StepTiming


@dataclass
class GenerationStats:
    timings: list[StepTiming] = field(default_factory=list)  # prefill first
    started: float = 0.0
    arrivals: list[float] = field(default_factory=list)

    @property
    def time_to_first_token_s(self) -> float:
        return self.arrivals[0] - self.started

    @property
    def tokens_per_second(self) -> float:
        if len(self.arrivals) < 2:
            return float("nan")
        return (len(self.arrivals) - 1) / (self.arrivals[-1] - self.arrivals[0])

    def decode_medians_ms(self) -> dict[str, float]:
        decode = self.timings[1:] or self.timings
        return {part: 1e3 * statistics.median(getattr(t, part) for t in decode) for part in ("ue_s", "network_s", "edge_s")}

    def record(self, timing: StepTiming, arrived: float) -> None:
        self.timings.append(timing)
        self.arrivals.append(arrived)


@dataclass(frozen=True)
class Move:
    """One move of the split during a generation, or of the session to another edge at the same split."""

    before_step: int
    from_split: int
    to_split: int
    sent_bytes: int  # KV cache, or hidden states to recompute it from, that crossed the link
    seconds: float
    reason: str = ""
    predicted_s: float | None = None  # what the profiles said it would take, when a policy chose it
    edge: str = ""  # the edge the session moved to, when it left one that was lost or shutting down
