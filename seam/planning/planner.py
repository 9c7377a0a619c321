"""The reward of a (split, codec) choice, the model-based planner that maximises it, and the state a learned
policy sees. Pure functions, torch-free: the UE runs them.

The reward follows Chen et al.: ``alpha * r_quality + beta * r_latency``. ``r_quality`` is theirs,
(PPL0 - PPL) / PPL0, the share of perplexity lost (minus the increase). Their load term counts the layers left
on the UE; Seam's is what the user feels, the speed-up over running every layer here (local per-token time
over the choice's), which is 1 when running alone and grows as offloading pays. A choice beyond the user's
quality budget scores nothing, less than running alone ever does, so that the best choice always keeps the
budget. The planner searches every (split, codec) with the cost model for latency and a table of predicted
perplexity increases (the reward surrogate's, or a measured ``seam analyze``) for quality.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from seam.planning.cost_model import DeviceModel, Link
from seam.planning.policy import Scales, per_token_s

LOSSLESS = "fp32"  # the hidden states as they are: no quality lost at any cut
OBSERVATION_SIZE = 7


@dataclass(frozen=True)
class Objective:
    alpha: float = 10.0  # weight of the quality term (the paper's code uses 10 or 10.5)
    beta: float = 1.0  # weight of the latency term
    max_increase_pct: float = math.inf  # the user's quality budget

    def reward(self, increase_pct: float, per_token: float, local_per_token: float) -> float:
        if increase_pct > self.max_increase_pct:
            return 0.0
        return -self.alpha * increase_pct / 100 + self.beta * local_per_token / per_token


@dataclass(frozen=True)
class Choice:
    split: int
    codec: str
    per_token_s: float
    increase_pct: float
    reward: float


def actions(splits: Sequence[int], codecs: Sequence[str], num_layers: int) -> list[tuple[int, str]]:
    """Every (split, codec) a policy may pick: at the split that keeps every layer here nothing crosses, so
    only one codec is listed there."""
    return [(split, codec) for split in splits for codec in (codecs if split < num_layers else [LOSSLESS])]


def increase_of(table: Mapping[tuple[int, str], float], split: int, codec: str, num_layers: int) -> float:
    """The predicted perplexity increase of ``codec`` at ``split``; unknown pairs are out of reach (inf). A
    measured decrease is noise (a few thousandths of a percent): no codec improves the model."""
    if codec == LOSSLESS or split >= num_layers:
        return 0.0
    return max(table.get((split, codec), math.inf), 0.0)


def evaluate(ue: DeviceModel, edge: DeviceModel, link: Link, choices: Sequence[tuple[int, str]],
             table: Mapping[tuple[int, str], float], objective: Objective, context: int, batch: int = 1,
             scales: Scales = Scales()) -> list[Choice]:
    """Every choice scored: latency from the cost model scaled as the session measured, quality from ``table``."""
    num_layers = ue.split_points[-1]
    local = per_token_s(ue, edge, link, num_layers, context, batch, scales)
    scored = []
    for split, codec in choices:
        latency = per_token_s(ue, edge, link, split, context, batch, scales, None if split >= num_layers else codec)
        increase = increase_of(table, split, codec, num_layers)
        scored.append(Choice(split, codec, latency, increase, objective.reward(increase, latency, local)))
    return scored


def plan(ue: DeviceModel, edge: DeviceModel, link: Link, choices: Sequence[tuple[int, str]],
         table: Mapping[tuple[int, str], float], objective: Objective, context: int, batch: int = 1,
         scales: Scales = Scales()) -> Choice:
    """The choice with the highest reward; of equal ones, the first listed."""
    return max(evaluate(ue, edge, link, choices, table, objective, context, batch, scales), key=lambda c: c.reward)


def effective_link(link: Link, network_scale: float) -> Link:
    """The link as the session's steps see it: a network part ``network_scale`` times slower than the estimate
    is a link with rates that much lower and a round trip that much longer."""
    return Link(link.rtt_s * network_scale, link.up_bytes_per_s / network_scale,
                link.down_bytes_per_s / network_scale)


def observation(link: Link, scales: Scales, context: int, max_increase_pct: float) -> np.ndarray:
    """What a learned policy sees, each entry of order one: the link as the steps see it (log rates and round
    trip), how much slower each side runs than profiled, the context length and the quality budget."""
    seen = effective_link(link, scales.network)
    budget = min(max_increase_pct, 100.0)
    return np.array([
        math.log10(seen.up_mbit), math.log10(seen.down_mbit), math.log10(max(seen.rtt_s * 1e3, 0.1)),
        math.log2(scales.edge), math.log2(scales.ue), math.log2(max(context, 1)) / 4, math.log10(budget + 0.01),
    ], dtype=np.float32)
