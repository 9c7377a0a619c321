"""The split cost model: predicts each split's per-token latency and time to first token from two device
profiles and a link, and picks the best split per link.

Pure functions over profiles, no I/O. Block latencies are fitted once per block from the measured grid and
interpolated between its points: decode is linear in the past length (least squares per batch), prefill is
piecewise linear in the prompt length, and batch sizes that were not measured are interpolated between the
nearest ones that were. Message sizes come from ``seam.planning.wire_sizes``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from seam.planning.schema import BlockProfile, DeviceProfile, LinkProfile, ProfileKey, Timing
from seam.planning.wire_sizes import downlink_bytes, uplink_bytes
from seam.runtime.artifact import DTYPE_BYTES
from seam.runtime.errors import SeamError

# --- fits ---------------------------------------------------------------------------------------------------


def _interpolate(points: Sequence[tuple[float, float]], x: float) -> float:
    """Piecewise linear through ``points`` (sorted by x, distinct), extended linearly past either end.

    Never negative: extrapolating a steep segment backwards must not predict a negative latency.
    """
    if len(points) == 1:
        return max(points[0][1], 0.0)
    i = 0
    while i < len(points) - 2 and x > points[i + 1][0]:
        i += 1
    (x0, y0), (x1, y1) = points[i], points[i + 1]
    return max(y0 + (y1 - y0) * (x - x0) / (x1 - x0), 0.0)


def _by_batch(timings: Sequence[Timing]) -> dict[int, list[Timing]]:
    groups: dict[int, list[Timing]] = {}
    for timing in timings:
        groups.setdefault(timing.batch, []).append(timing)
    return dict(sorted(groups.items()))


def _least_squares(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    xs = [x for x, _ in points]
    ys = [y for _, y in points]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    if spread == 0:  # a single past length: no slope to learn
        return mean_y, 0.0
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / spread
    return mean_y - slope * mean_x, slope


@dataclass(frozen=True)
class DecodeFit:
    """Decode step latency: ``intercept + slope * past`` per measured batch, interpolated across batches."""

    lines: tuple[tuple[int, float, float], ...]  # (batch, intercept_s, slope_s per past token), by batch

    @classmethod
    def from_timings(cls, timings: Sequence[Timing]) -> DecodeFit:
        if not timings:
            raise ValueError("no decode timings")
        return cls(
            tuple(
                (batch, *_least_squares([(t.length, t.median_s) for t in group]))
                for batch, group in _by_batch(timings).items()
            )
        )

    def __call__(self, past: int, batch: int = 1) -> float:
        return _interpolate([(b, a + s * past) for b, a, s in self.lines], batch)


@dataclass(frozen=True)
class PrefillFit:
    """Prefill latency: piecewise linear in the prompt length per measured batch, interpolated across batches;
    with one measured batch, other batches are scaled to the same number of tokens."""

    curves: tuple[tuple[int, tuple[tuple[int, float], ...]], ...]  # (batch, ((length, median_s), ...))

    @classmethod
    def from_timings(cls, timings: Sequence[Timing]) -> PrefillFit:
        if not timings:
            raise ValueError("no prefill timings")
        curves = []
        for batch, group in _by_batch(timings).items():
            # A length measured twice (two runs merged into one profile) counts once, at its mean.
            lengths: dict[int, list[float]] = {}
            for t in group:
                lengths.setdefault(t.length, []).append(t.median_s)
            curves.append((batch, tuple((n, statistics.fmean(v)) for n, v in sorted(lengths.items()))))
        return cls(tuple(curves))

    def __call__(self, length: int, batch: int = 1) -> float:
        if len(self.curves) == 1:
            # One measured batch (what 'seam profile' records): prefill is compute-bound, so a batch costs about
            # what one prompt of the same number of tokens costs.
            measured, points = self.curves[0]
            return _interpolate(points, length * batch / measured)
        return _interpolate([(b, _interpolate(points, length)) for b, points in self.curves], batch)


@dataclass(frozen=True)
class BlockFit:
    layers: tuple[int, int]
    decode: DecodeFit
    prefill: PrefillFit
    train: PrefillFit | None = None  # a fine-tuning forward and backward, when measured

    @classmethod
    def from_profile(cls, block: BlockProfile) -> BlockFit:
        return cls(tuple(block.layers), DecodeFit.from_timings(block.decode), PrefillFit.from_timings(block.prefill),
                   PrefillFit.from_timings(block.train) if block.train else None)

    def latency(self, phase: str, length: int, batch: int) -> float:
        return (self.decode if phase == "decode" else self.prefill)(length, batch)


@dataclass(frozen=True)
class DeviceModel:
    """The fits of one device profile, built once and reused for every split and link."""

    key: ProfileKey
    num_layers: int
    hidden_size: int
    wire_dtype: str  # the export dtype, in which hidden states cross the link (key.dtype may name int8 blocks)
    prelude: BlockFit
    blocks: tuple[BlockFit, ...]  # by first layer, tiling [0, num_layers)
    measured: tuple[int, int, int] = (0, 0, 0)  # longest prompt, longest past, largest batch every graph measured
    head_train: PrefillFit | None = None  # the head's fine-tuning forward and backward, when measured
    head: BlockFit | None = None  # the final norm and LM head alone, when the profile measured them

    @classmethod
    def from_profile(cls, profile: DeviceProfile) -> DeviceModel:
        name = f"the {profile.key.device} profile"
        chosen: dict[tuple[int, int], BlockProfile] = {}
        for block in profile.blocks:
            span = tuple(block.layers)
            # A profile may hold several variants of a block; the one in the profile's dtype is what runs.
            if span not in chosen or block.variant == profile.key.dtype:
                chosen[span] = block
        try:
            prelude = BlockFit.from_profile(profile.prelude)
            blocks = tuple(BlockFit.from_profile(chosen[span]) for span in sorted(chosen))
        except ValueError as error:
            raise SeamError(f"{name} is incomplete ({error}); measure it again with 'seam profile'") from None
        ends = [0] + [fit.layers[1] for fit in blocks]
        if [fit.layers[0] for fit in blocks] != ends[:-1] or ends[-1] != profile.num_layers:
            spans = ", ".join(f"[{a}, {b})" for a, b in sorted(chosen))
            raise SeamError(f"{name} has blocks {spans}, which do not tile layers [0, {profile.num_layers})")
        # The prelude is never quantised, so its variant is the export dtype even when the blocks are int8.
        wire_dtype = profile.prelude.variant if profile.prelude.variant in DTYPE_BYTES else profile.key.dtype
        if wire_dtype not in DTYPE_BYTES:
            raise SeamError(f"{name} has dtype {wire_dtype!r}, not one of {sorted(DTYPE_BYTES)}")
        graphs = [profile.prelude, *chosen.values()]
        measured = (
            min(max(t.length for t in graph.prefill) for graph in graphs),
            min(max(t.length for t in graph.decode) for graph in graphs),
            min(max(t.batch for t in graph.prefill + graph.decode) for graph in graphs),
        )
        head_train = PrefillFit.from_timings(profile.head_train) if profile.trained else None
        head = BlockFit.from_profile(profile.head) if profile.head is not None else None
        return cls(profile.key, profile.num_layers, profile.hidden_size, wire_dtype, prelude, blocks, measured,
                   head_train, head)

    def beyond_measured(self, context: int, batch: int) -> list[str]:
        """What a prediction at ``context`` and ``batch`` extrapolates past this profile's grid, one line each."""
        longest_prompt, longest_past, largest_batch = self.measured
        lines = []
        if context > longest_prompt:
            lines.append(f"prompts of {context} tokens: prefill was measured up to {longest_prompt}")
        if context > longest_past:
            lines.append(f"past length {context}: decode was measured up to {longest_past}")
        if batch > largest_batch:
            lines.append(f"batch {batch}: measured up to {largest_batch}")
        return lines

    @property
    def split_points(self) -> list[int]:
        return [0] + [fit.layers[1] for fit in self.blocks]

    def train_s(self, start: int, end: int, sequence: int, micro_batch: int, head: bool) -> float | None:
        """A fine-tuning forward and backward of layers [start, end) (and the head scoring every position), as
        measured; None when this profile measured no fine-tuning."""
        if self.head_train is None:
            return None
        inside = [fit.train for fit in self.blocks if start <= fit.layers[0] and fit.layers[1] <= end]
        return sum(fit(sequence, micro_batch) for fit in inside) + (self.head_train(sequence, micro_batch) if head
                                                                      else 0.0)

    def head_s(self, batch: int) -> float:
        """The final norm and LM head for ``batch`` sequences; unmeasured, the last block's step, which holds them."""
        if self.head is not None:
            return self.head.latency("decode", 1, batch)
        return self.blocks[-1].latency("decode", 1, batch)

    def compute_s(self, start: int, end: int, phase: str, length: int, batch: int) -> float:
        """Latency of layers [start, end) for one step: the prelude once, then each block inside."""
        inside = [fit for fit in self.blocks if start <= fit.layers[0] and fit.layers[1] <= end]
        if not inside:
            return 0.0
        return self.prelude.latency(phase, length, batch) + sum(fit.latency(phase, length, batch) for fit in inside)


def _model(profile: DeviceProfile | DeviceModel) -> DeviceModel:
    return profile if isinstance(profile, DeviceModel) else DeviceModel.from_profile(profile)


# --- links and costs ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    rtt_s: float
    up_bytes_per_s: float
    down_bytes_per_s: float

    def __post_init__(self) -> None:
        if not (self.up_bytes_per_s > 0 and self.down_bytes_per_s > 0):
            raise SeamError("link bandwidth must be positive")
        if not self.rtt_s >= 0:
            raise SeamError("link round-trip time must not be negative")

    @classmethod
    def from_profile(cls, profile: LinkProfile) -> Link:
        return cls(profile.rtt_s, profile.up_bytes_per_s, profile.down_bytes_per_s)

    @classmethod
    def from_mbit(cls, bandwidth_mbit: float, rtt_ms: float, uplink_mbit: float | None = None) -> Link:
        """``bandwidth_mbit`` down (and up unless ``uplink_mbit`` is given), in Mbit/s; ``rtt_ms`` in ms."""
        up = bandwidth_mbit if uplink_mbit is None else uplink_mbit
        return cls(rtt_ms / 1e3, up * 1e6 / 8, bandwidth_mbit * 1e6 / 8)

    @property
    def down_mbit(self) -> float:
        return self.down_bytes_per_s * 8 / 1e6

    @property
    def up_mbit(self) -> float:
        return self.up_bytes_per_s * 8 / 1e6

    @property
    def label(self) -> str:
        if math.isclose(self.up_bytes_per_s, self.down_bytes_per_s):
            return f"{self.down_mbit:g} Mbit/s"
        return f"{self.down_mbit:g}/{self.up_mbit:g} Mbit/s down/up"


@dataclass(frozen=True)
class StepCost:
    """One step's latency, split into its parts; ``total_s`` is their sum."""

    ue_s: float
    uplink_bytes: int
    uplink_s: float
    edge_s: float
    downlink_bytes: int
    downlink_s: float
    rtt_s: float
    total_s: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "total_s", self.ue_s + self.uplink_s + self.rtt_s + self.edge_s + self.downlink_s)


@dataclass(frozen=True)
class SplitCost:
    """Layers [0, split) on the UE: one decode step at past = context, and the prefill of a context-long prompt."""

    split: int
    context: int
    batch: int
    decode: StepCost  # per generated token (of each sequence in the batch)
    prefill: StepCost  # time to first token


def _step(ue: DeviceModel, edge: DeviceModel, link: Link, split: int, phase: str, new: int, past: int,
          batch: int, codec: str | None = None, private_output: bool = False) -> StepCost:
    length = past if phase == "decode" else new
    L = ue.num_layers
    ue_s = ue.compute_s(0, split, phase, length, batch)
    if split == L:
        return StepCost(ue_s, 0, 0.0, 0.0, 0, 0.0, 0.0)
    up = uplink_bytes(split, batch, new, ue.hidden_size, DTYPE_BYTES[ue.wire_dtype], codec)
    edge_s = edge.compute_s(split, L, phase, length, batch)
    if private_output:  # the head moves from the edge's graph to this device, and hidden states come back
        ue_s += ue.head_s(batch)
        edge_s = max(edge_s - (edge.head.latency("decode", 1, batch) if edge.head is not None else 0.0), 0.0)
    down = downlink_bytes(batch, ue.hidden_size * DTYPE_BYTES[ue.wire_dtype] if private_output else None)
    return StepCost(
        ue_s=ue_s,
        uplink_bytes=up,
        uplink_s=up / link.up_bytes_per_s,
        edge_s=edge_s,
        downlink_bytes=down,
        downlink_s=down / link.down_bytes_per_s,
        rtt_s=link.rtt_s,
    )


def check_pair(ue: DeviceProfile | DeviceModel, edge: DeviceProfile | DeviceModel) -> None:
    """Refuses two profiles that cannot describe one split: different artifacts or dtypes on the wire."""
    if ue.key.artifact_fingerprint != edge.key.artifact_fingerprint:
        raise SeamError(
            f"profiles of different artifacts: UE profile {ue.key.artifact_fingerprint[:12]}, "
            f"edge profile {edge.key.artifact_fingerprint[:12]}; profile both devices with the same artifact"
        )
    ue_dtype, edge_dtype = _model(ue).wire_dtype, _model(edge).wire_dtype
    if ue_dtype != edge_dtype:
        raise SeamError(f"profiles of different dtypes: UE profile {ue_dtype}, edge profile {edge_dtype}")


def predict(ue: DeviceProfile | DeviceModel, edge: DeviceProfile | DeviceModel, link: Link, split: int,
            context: int, batch: int = 1, codec: str | None = None, private_output: bool = False) -> SplitCost:
    """The cost of ``split`` for prompts of ``context`` tokens: decode at past = context, and their prefill;
    hidden states coded with ``codec`` when given (its encoding time, microseconds, left out); with
    ``private_output`` the UE runs the head and the last layer's hidden states come back instead of a token."""
    ue, edge = _model(ue), _model(edge)
    check_pair(ue, edge)
    if ue.split_points != edge.split_points:
        raise SeamError(f"the UE profile splits at {ue.split_points} but the edge profile at {edge.split_points}")
    if split not in ue.split_points:
        raise SeamError(f"split {split} is not at a block boundary; choose one of {ue.split_points}")
    if context < 1 or batch < 1:
        raise SeamError("context and batch must be at least 1")
    return SplitCost(
        split,
        context,
        batch,
        decode=_step(ue, edge, link, split, "decode", 1, context, batch, codec, private_output),
        prefill=_step(ue, edge, link, split, "prefill", context, 0, batch, codec, private_output),
    )


@dataclass(frozen=True)
class LinkPlan:
    """Every split's cost over one link, and the split with the lowest decode latency."""

    name: str
    link: Link
    costs: tuple[SplitCost, ...]  # by split
    best: int

    @property
    def best_cost(self) -> SplitCost:
        return next(cost for cost in self.costs if cost.split == self.best)


def best_split(costs: Sequence[SplitCost]) -> int:
    """The split with the lowest decode total; a tie (to rounding) goes to the smaller UE share."""
    lowest = min(cost.decode.total_s for cost in costs)
    return min(cost.split for cost in costs if cost.decode.total_s <= lowest * (1 + 1e-9))


def plan(ue: DeviceProfile | DeviceModel, edge: DeviceProfile | DeviceModel,
         links: Mapping[str, Link] | Sequence[Link], context: int, batch: int = 1,
         private_output: bool = False) -> list[LinkPlan]:
    """Each split's cost for each link (named by the mapping's keys, or by their bandwidth), with its best split;
    ``private_output`` prices every split with the head on the UE."""
    ue, edge = _model(ue), _model(edge)
    check_pair(ue, edge)
    named = links.items() if isinstance(links, Mapping) else [(link.label, link) for link in links]
    plans = []
    for name, link in named:
        costs = tuple(predict(ue, edge, link, split, context, batch, private_output=private_output)
                      for split in ue.split_points)
        plans.append(LinkPlan(name, link, costs, best_split(costs)))
    return plans


# --- scoring ------------------------------------------------------------------------------------------------


def median_relative_error(predicted: Sequence[float], measured: Sequence[float]) -> float:
    """Median of |predicted - measured| / measured over pairs with a positive measurement."""
    errors = [abs(p - m) / m for p, m in zip(predicted, measured, strict=True) if m > 0]
    if not errors:
        raise ValueError("no positive measurements to score against")
    return statistics.median(errors)


def score(model: DeviceProfile | DeviceModel, measured: DeviceProfile) -> float:
    """How well ``model``'s fits predict every timing in ``measured`` (the same device's profile, or a held-out
    one): the median absolute relative error over the prelude's and the blocks' prefill and decode points."""
    model = _model(model)
    fits = {fit.layers: fit for fit in model.blocks}
    predicted, observed = [], []
    for block in [measured.prelude, *measured.blocks]:
        fit = model.prelude if block.index < 0 else fits.get(tuple(block.layers))
        if fit is None:
            continue
        for phase, timings in (("prefill", block.prefill), ("decode", block.decode)):
            for t in timings:
                predicted.append(fit.latency(phase, t.length, t.batch))
                observed.append(t.median_s)
    return median_relative_error(predicted, observed)
