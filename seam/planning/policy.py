"""Split policies: which split the next step should run at, from the cost model and a ``SessionSnapshot`` of the
generation (its link estimate, measured step times, context and what it allows); the session applies the
``Decision``.

``choose_split`` is a pure function. It predicts every allowed split's per-token latency at the current context,
scales each side's compute by what the running session measured against its profile (an edge busy with other
UEs, a UE warmer than when it was profiled), and moves only when the time saved over the tokens still to come
pays for the move, and the new split is faster by a margin, so that noise in the estimate never makes the split
flap. A move carries the moved layers' KV cache across, or lets the side that takes them over recompute it from
hidden states (or tokens), whichever the model says is quicker: a cache holds two tensors per layer per position,
the hidden states one. The network part is scaled the same way by the steps' own network times, which see a
collapsed link before any bandwidth sample does. Policies: ``static`` (never moves) and ``cost-model`` here;
``planner`` and ``learned`` (``seam.planning.learned``) choose the target differently and move the same way.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace

from seam.planning.cost_model import DeviceModel, Link, predict
from seam.planning.dynamics import State, downlink_following, expected_remaining_s, move_scale, rate_before, states
from seam.planning.snapshot import Decision, SessionSnapshot
from seam.runtime.codecs import CODECS, encoded_bytes
from seam.runtime.errors import SeamError

# What a move's saving, less the way back, must come to, in multiples of the move's own predicted time.
PAYBACK = 2.0
STEP_PROBE_AGE_S = 2.0  # step-sized probes older than this no longer describe the link
# Measured network time over predicted may range this far: a collapsed link makes steps a hundred times slower
# than the estimate from before, and a recovered one the other way round, before any rate sample shows it.
NETWORK_SCALE_BOUNDS = (1e-3, 1e3)


@dataclass(frozen=True)
class Constraints:
    min_ue_layers: int = 0  # privacy: layers that always run on the UE
    ue_memory_bytes: int | None = None  # the UE's budget for weights and KV cache
    allowed: tuple[int, ...] | None = None  # split points the policy may choose; None = all


def candidate_splits(ue: DeviceModel, constraints: Constraints, kv_bytes_per_token: Sequence[int], batch: int,
                     max_length: int, weight_bytes: Sequence[int]) -> list[int]:
    """Split points the constraints allow: ``weight_bytes[i]`` and ``kv_bytes_per_token[i]`` describe block i."""
    splits = []
    for split in ue.split_points:
        if split < constraints.min_ue_layers or (constraints.allowed is not None and split not in constraints.allowed):
            continue
        inside = [i for i, fit in enumerate(ue.blocks) if fit.layers[1] <= split]
        needed = sum(weight_bytes[i] + kv_bytes_per_token[i] * batch * max_length for i in inside)
        if constraints.ue_memory_bytes is None or needed <= constraints.ue_memory_bytes:
            splits.append(split)
    if not splits:
        raise SeamError("no split satisfies the constraints (minimum UE layers, UE memory, allowed splits)")
    return splits


@dataclass(frozen=True)
class Scales:
    """Measured over predicted, per part of a step, from the running session (1 = as predicted).

    ``measured_at``: the split the compute was measured at (None: the scales hold for every layer alike). At
    another split, a side's measured time against its profile is read both as a rate and as the time it added
    or saved, and the reading nearer the profile is taken (``carried``): one small block beating its profile
    by a third says little of a dozen layers, and priced as a rate it would pull every layer onto a device that
    then runs them at the profile's speed; one block running 1.3-1.4 times its profile mostly shows the step's
    own work beside its layers (coding, sampling, waking up), and priced as a rate it kept the UE from running
    twelve layers it runs at its profile's speed. A device busier than profiled shows so once it runs them."""

    ue: float = 1.0
    edge: float = 1.0
    network: float = 1.0
    measured_at: int | None = None

    def unmeasured(self) -> Scales:
        """The scales of compute the session has not measured (a prefill of layers it never ran)."""
        if self.measured_at is None:
            return self
        return replace(self, ue=max(self.ue, 1.0), edge=max(self.edge, 1.0))


def per_token_s(ue: DeviceModel, edge: DeviceModel, link: Link, split: int, context: int, batch: int,
                scales: Scales = Scales(), codec: str | None = None, private_output: bool = False) -> float:
    step = predict(ue, edge, link, split, context, batch, codec, private_output).decode
    network = step.uplink_s + step.downlink_s + step.rtt_s
    ue_s, edge_s = step.ue_s * scales.ue, step.edge_s * scales.edge
    if scales.measured_at not in (None, split):
        measured = predict(ue, edge, link, scales.measured_at, context, batch, None, private_output).decode
        ue_s, edge_s = carried(step.ue_s, scales.ue, measured.ue_s), carried(step.edge_s, scales.edge, measured.edge_s)
    return ue_s + edge_s + network * scales.network


def carried(profile_s: float, scale: float, measured_profile_s: float) -> float:
    """A side's time at a split its profile puts at ``profile_s``, from ``scale`` measured where its profile
    said ``measured_profile_s``: as a rate or as the time added or saved, whichever is nearer the profile."""
    as_rate, as_time = profile_s * scale, profile_s + measured_profile_s * (scale - 1)
    return max(as_rate, as_time) if scale < 1 else min(as_rate, as_time)


# Bytes rank the codecs alike at any hidden size; of two as small, the better one (first in CODECS) comes first.
FEWEST_BYTES_FIRST = sorted(CODECS, key=lambda name: encoded_bytes(name, (1, 1, 64)))


@dataclass(frozen=True)
class QualityBudget:
    """What each codec costs in quality at each cut, as ``seam analyze`` measured it (perplexity increase in %),
    and how much of it the user accepts. The UE reads the measured table rather than the surrogate: it runs
    without torch, and a table of a few dozen cells covers every choice it can make."""

    increase_pct: dict[tuple[int, str], float]  # (cut, codec) -> measured perplexity increase
    max_increase_pct: float

    @classmethod
    def from_analysis(cls, cells: Sequence[dict], max_increase_pct: float) -> QualityBudget:
        table = {(cell["cut"], cell["variant"].split(":", 1)[1]): cell["increase_pct"]
                 for cell in cells if cell["variant"].startswith("codec:")}
        if not table:
            raise SeamError("the quality analysis holds no codec results; run seam analyze with --codecs")
        return cls(table, max_increase_pct)

    def codec(self, split: int, offered: Sequence[str]) -> str:
        """The codec with the fewest bytes whose measured increase at ``split`` stays within the budget; fp32
        (lossless) when none does or the cut was not analysed."""
        fitting = [name for name in offered if name == "fp32"
                   or self.increase_pct.get((split, name), math.inf) <= self.max_increase_pct]
        return min(fitting or ["fp32"], key=FEWEST_BYTES_FIRST.index)


def move_s(link: Link, current: int, split: int, kv_bytes_per_token_per_layer: int, batch: int, context: int) -> float:
    """Time to carry the cache of the layers between ``current`` and ``split`` across the link."""
    moved = abs(split - current) * kv_bytes_per_token_per_layer * batch * context
    rate = link.up_bytes_per_s if split < current else link.down_bytes_per_s
    return link.rtt_s + moved / rate


def rebuild_s(ue: DeviceModel, edge: DeviceModel, link: Link, current: int, split: int, batch: int, context: int,
              scales: Scales, boundary_bytes_per_token: int, kept: Collection[int]) -> float:
    """Time for the side that takes layers over to recompute their cache instead of receiving it.

    Layers the UE takes over it recomputes from the hidden states it kept at ``current`` (else from the tokens),
    and a message tells the edge to drop them; layers the edge takes over it recomputes from the hidden states at
    ``split``, which the UE must have kept (``kept``) and sends: ``boundary_bytes_per_token`` per position."""
    if split > current:
        start = current if current in kept else 0
        recompute = ue.compute_s(start, split, "prefill", context, batch) * scales.unmeasured().ue
        return recompute + link.rtt_s * scales.network
    if split not in kept:
        return math.inf
    upload = batch * context * boundary_bytes_per_token / link.up_bytes_per_s
    return link.rtt_s + upload + edge.compute_s(split, current, "prefill", context, batch) * scales.unmeasured().edge


def choose_split(
    ue: DeviceModel,
    edge: DeviceModel,
    link: Link,
    *,
    current: int,
    candidates: Sequence[int],
    context: int,
    remaining: int,
    batch: int,
    kv_bytes_per_token_per_layer: int,
    boundary_bytes_per_token: int = 0,
    kept: Collection[int] = (),
    margin: float = 0.1,
    payback: float = PAYBACK,
    scales: Scales = Scales(),
    codecs: Mapping[int, str] | None = None,
    state_s: float | None = None,
    move_scales: tuple[float, float] = (1.0, 1.0),
    back_link: Link | None = None,
    private_output: bool = False,
) -> Decision:
    """The split for the next step: the candidate with the largest net saving over the tokens to come (at most
    ``remaining``, and what the current split makes in the ``state_s`` s the link's present state is expected to
    last), its saving less the way back ``payback`` times the move's predicted time: a move's cost is known to a
    factor of a few. ``kept``: cuts where the UE holds every position's hidden states (``rebuild_s``); ``codecs``:
    each split's codec; ``move_scales``: moves' (towards the UE, the edge) measured over predicted time;
    ``back_link``: the link the way back will likely cross once the present state ends."""
    codecs = codecs or {}
    costs = {split: per_token_s(ue, edge, link, split, context, batch, scales, codecs.get(split), private_output)
             for split in sorted({*candidates, current})}
    now = costs[current]
    tokens = remaining if state_s is None else max(min(remaining, int(state_s / now)), 1)

    def carry_and_recompute_s(start: int, end: int, over: Link = link, at: int = context) -> tuple[float, float]:
        return (move_s(over, start, end, kv_bytes_per_token_per_layer, batch, at),
                rebuild_s(ue, edge, over, start, end, batch, at, scales, boundary_bytes_per_token, kept))

    best, best_gain, best_rebuild, best_move = current, 0.0, False, 0.0
    for split in (other for other in candidates if other != current):
        moving, rebuilding = carry_and_recompute_s(current, split)
        there = min(moving, rebuilding) * move_scales[0 if split > current else 1]
        # Links rarely hold still: a move must also pay for the way back, dear after a move onto a link merely
        # worse (not gone). Expected once the present state ends (``back_link``), it carries the cache of
        # every token produced meanwhile; without that, when it comes is anyone's guess.
        back = min(carry_and_recompute_s(split, current, back_link or link, context + tokens * bool(back_link)))
        back *= move_scales[1 if split > current else 0]
        saving = (now - costs[split]) * tokens - back
        if saving - there > best_gain and saving >= payback * there and costs[split] < now * (1 - margin):
            best, best_gain, best_rebuild = split, saving - there, rebuilding < moving
            best_move = min(moving, rebuilding)
    label = f"link up {link.up_mbit:.1f}, down {link.down_mbit:.1f} Mbit/s, rtt {link.rtt_s * 1e3:.1f} ms"
    if best == current:
        return Decision(current, costs, f"{label}: split {current} stays ({1e3 * now:.1f} ms/token)",
                        codec=codecs.get(current))
    how = "moving the cache" if not best_rebuild else "recomputing the cache " + ("here" if best > current else "there")
    lasting = "" if state_s is None else f" (the link's state expected to last {state_s:.1f} s)"
    reason = (f"{label}: {1e3 * now:.1f} -> {1e3 * costs[best]:.1f} ms/token, saves {best_gain:.2f} s over the "
              f"next {tokens} tokens{lasting} after {how} and the way back")
    return Decision(best, costs, reason, best_rebuild, codecs.get(best), best_move)


def calibration(measured_s: Sequence[float], predicted_s: float, bounds: tuple[float, float] = (0.25, 4.0)) -> float:
    """How much slower (> 1) or faster a part of a step runs than predicted, from recent measured steps;
    bounded so that one stall cannot make the policy believe a device is useless."""
    if not measured_s or predicted_s <= 0:
        return 1.0
    return min(max(statistics.median(measured_s) / predicted_s, bounds[0]), bounds[1])


class CostModelPolicy:
    """The ``cost-model`` policy: before each step it calibrates both sides' compute against the session's steps
    since its last move, and returns ``choose_split``'s decision over the link as the session estimates it (kept
    fresh by the session's background probes), or None when it has nothing to go on."""

    def __init__(self, ue: DeviceModel, edge: DeviceModel, constraints: Constraints = Constraints(),
                 margin: float = 0.1, window: int = 2, horizon: int = 128, settle_tokens: int = 64,
                 quality: QualityBudget | None = None):
        self.ue, self.edge = ue, edge
        self.quality = quality  # with it, each split's hidden states cross in the cheapest codec the budget allows
        self.constraints = constraints
        self.margin = margin
        self.window = window  # steps to calibrate on: the median of two is their mean, so one step slowed by a
        # collapsed link shows at once, and one slowed by a hiccup of a few tens of ms barely does
        self.horizon = horizon  # tokens a move must pay back within: links rarely hold still for much longer
        # Each move within this many tokens doubles the margin the next one needs: on a link that hovers where
        # two splits cost about the same, predictions err both ways and would otherwise bounce the split.
        self.settle_tokens = settle_tokens
        self.decisions: list[Decision] = []  # every decision returned, for the caller to inspect

    def candidates(self, snapshot: SessionSnapshot) -> list[int]:
        """The splits the session may move to; its batch and max_length bound the cache they must hold (before a
        generation sets them, weights alone count)."""
        facts, constraints = snapshot.artifact, self.constraints
        if not snapshot.allow_token_upload:  # split 0 would send token ids
            constraints = replace(constraints, min_ue_layers=max(constraints.min_ue_layers, 1))
        if snapshot.served:  # a stage of a pipeline ends where the next begins: the split stays before that
            allowed = constraints.allowed if constraints.allowed is not None else snapshot.served
            constraints = replace(constraints, allowed=tuple(split for split in allowed if split in snapshot.served))
        per_layer = facts.kv_bytes_per_token_per_layer
        return candidate_splits(self.ue, constraints, [layers * per_layer for layers in facts.block_layers],
                                max(snapshot.batch, 1), snapshot.max_length, facts.block_weight_bytes)

    def targets(self, snapshot: SessionSnapshot, scales: Scales, candidates: list[int],
                link: Link) -> tuple[list[int], dict[int, str]]:
        """The splits a move may go to and the codec each would send its hidden states in: every candidate, and
        with a quality budget the cheapest codec it allows there. ``link``: the link as the move is priced on."""
        if self.quality is None:
            return candidates, {}
        return candidates, {split: self.quality.codec(split, snapshot.offered_codecs)
                            for split in candidates if 0 < split < snapshot.artifact.num_layers}

    def scales(self, snapshot: SessionSnapshot, candidates: list[int]) -> Scales | None:
        """Measured over predicted for each part of a step, or None while nothing measures the network yet."""
        probed = [seconds for at, seconds in snapshot.step_probes
                  if snapshot.now_s - at < STEP_PROBE_AGE_S][-self.window:]
        if snapshot.alone and not probed:
            # Alone on the UE, nothing measures the link but the background probes: offloading without them
            # could push a whole cache into a link that has collapsed.
            return None
        if snapshot.step and snapshot.up_measured_at is None:
            # The uplink rests on the prior: never measured, or outrun by a quicker message and not measured
            # since. A move priced on the prior's 10 Mbit/s left the UE for a 1.5 Mbit/s link; the probe that
            # measures it is a few hundred ms away. (The start decision has only the prior to go on.)
            return None
        link, recent = snapshot.link, snapshot.timings_since_move[-self.window:]
        if not snapshot.alone and snapshot.move_steps and len(recent) < self.window:
            # The first steps at a split just moved to carry its setting up (a span's first run, the edge taking
            # the session in), which reads as a slow network: judged on them, one move would bring the next.
            return None
        predicted = predict(self.ue, self.edge, link, snapshot.split, snapshot.past, snapshot.batch,
                            snapshot.codec, snapshot.private_output).decode
        # Steps, or alone on the UE step-sized probes, measure the network exactly where the link estimate is
        # weakest: small messages on a link whose rate has not been sampled lately.
        if not snapshot.alone:
            # The quicker of the last steps: leaving the edge takes two slow steps in a row, so that the step
            # that crosses quickly as an outage ends stops the move its slow steps would otherwise bring about.
            network, offloaded = [min(t.network_s for t in recent)] if recent else [], predicted
        else:
            network = probed
            offloaded = predict(self.ue, self.edge, link, min(candidates), snapshot.past, snapshot.batch).decode
        return Scales(
            measured_at=snapshot.split,
            ue=calibration([t.ue_s for t in recent], predicted.ue_s),
            edge=calibration([t.edge_s for t in recent], predicted.edge_s),
            network=calibration(network, offloaded.uplink_s + offloaded.downlink_s + offloaded.rtt_s,
                                NETWORK_SCALE_BOUNDS),
        )

    @staticmethod
    def back_link(link: Link, found: list[State]) -> Link | None:
        """``link`` as it was before the link's present state (``found``'s last), when that was faster: a move
        made for a fade comes back when the fade ends, not over the fade."""
        before = rate_before(found)
        if before is None or before <= link.up_bytes_per_s:
            return None
        return replace(link, up_bytes_per_s=before, down_bytes_per_s=link.down_bytes_per_s * before / link.up_bytes_per_s)

    def __call__(self, snapshot: SessionSnapshot) -> Decision | None:
        candidates = self.candidates(snapshot)
        scales = self.scales(snapshot, candidates)
        if scales is None:
            return None
        facts = snapshot.artifact
        recent_moves = sum(step > snapshot.step - self.settle_tokens for step in snapshot.move_steps)
        found = states(snapshot.link_history, snapshot.now_s)
        prior_rate = None if snapshot.prior is None else snapshot.prior.up_bytes_per_s
        link = downlink_following(snapshot.link, found, snapshot.down_measured_at)
        targets, codecs = self.targets(snapshot, scales, candidates, link)
        decision = choose_split(
            self.ue, self.edge, link, current=snapshot.split, candidates=targets, context=snapshot.past,
            remaining=min(snapshot.max_length - snapshot.past - 1, self.horizon), batch=snapshot.batch,
            kv_bytes_per_token_per_layer=facts.kv_bytes_per_token_per_layer,
            boundary_bytes_per_token=facts.boundary_bytes_per_token, kept=snapshot.kept, scales=scales,
            margin=self.margin * 2 ** recent_moves, codecs=codecs, state_s=expected_remaining_s(found, prior_rate),
            move_scales=(move_scale(snapshot.move_costs, True), move_scale(snapshot.move_costs, False)),
            back_link=self.back_link(link, found), private_output=snapshot.private_output,
        )
        self.decisions.append(decision)
        return decision
