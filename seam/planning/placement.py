"""Placing a model's layers over a pipeline of heterogeneous nodes: the UE's head first (raw text never leaves
it), then each edge node in the order given, every stage a contiguous span of layers between two of the
artifact's cuts. ``place`` chooses the spans that minimise the pipeline's step time for training or the
per-token latency for inference, each node's memory a hard bound; a node may be left out when using it does
not pay.

How a placement is scored (``evaluate``):
- **Training**, ``micro_batches`` micro-batches per step: a stage's busy time per micro-batch is its forward and
  backward, as ``seam profile --training`` measured it in PyTorch, the last stage's with the head scoring every
  position (without that measurement, ``TRAIN_FACTOR`` times the profiled prefill, the head ``Facts.head_layers``
  layers' worth), and each link between two stages is a resource of its
  own that carries the activations forward and their gradients back. The pipeline advances at its slowest
  resource, and a step of GPipe or 1F1B takes ``(micro_batches + stages - 1)`` such periods (the fill and drain
  bubble); a node's busy share is its compute over the step.
- **Inference**, one token at past length ``context``: every stage's decode in turn, one hidden state across
  each link between them, and the token back to the UE.

Pure functions of the profiles' fits, the artifact's facts and the links: no I/O.
"""

from __future__ import annotations

import itertools
import statistics
from dataclasses import dataclass

from seam.planning.cost_model import DeviceModel, Link
from seam.planning.memory import step_working_bytes, training_step_bytes
from seam.runtime.artifact import DTYPE_BYTES, Dimensions, Manifest
from seam.runtime.errors import SeamError

TRAIN_FACTOR = 3.0  # a backward costs about twice its forward
MODES = ("train", "infer")


@dataclass(frozen=True)
class Node:
    name: str
    model: DeviceModel
    memory_bytes: int | None  # None: unbounded
    link_in: Link | None  # from the stage before it (None for the UE, the first stage)


@dataclass(frozen=True)
class Workload:
    mode: str  # "train" or "infer"
    micro_batch: int = 1  # sequences per micro-batch (inference: sequences decoded together)
    micro_batches: int = 8
    sequence: int = 256  # tokens per training sequence
    context: int = 1024  # inference: the past length a token is decoded at


@dataclass(frozen=True)
class Facts:
    """What placement needs of the artifact."""

    dims: Dimensions
    dtype_bytes: int
    kv_bytes_per_token_per_layer: int
    cuts: tuple[int, ...]  # every point a stage may start or end at, 0 and the last layer included
    block_spans: tuple[tuple[int, int], ...]
    block_weight_bytes: tuple[int, ...]
    # What the head costs in training, in layers: it scores every position (a profiled prefill scores only the
    # last), a matrix of hidden x vocabulary against a layer's weights; in a small model, several layers' worth.
    head_layers: float = 0.0

    @classmethod
    def of(cls, manifest: Manifest) -> Facts:
        spans = tuple((block.layers.start, block.layers.end) for block in manifest.blocks)
        weights = tuple(block.variants[manifest.dtype].weight_bytes for block in manifest.blocks)
        dtype_bytes = DTYPE_BYTES[manifest.dtype]
        # The median block holds no embedding or head: its weights per layer are a layer's.
        layer_params = statistics.median(size / (end - start) for (start, end), size in zip(spans, weights)) / dtype_bytes
        head_layers = manifest.dims.hidden_size * manifest.dims.vocab_size / layer_params
        return cls(manifest.dims, dtype_bytes, manifest.kv_bytes_per_token_per_layer,
                   (0, *manifest.cuts, manifest.dims.num_layers), spans, weights, head_layers)


@dataclass(frozen=True)
class Stage:
    node: str
    span: tuple[int, int]  # layers [start, end); start == end: the node is left out
    compute_s: float  # per micro-batch (training) or per token (inference)
    link_s: float  # what crossing into this stage costs per micro-batch or token (0 for the first)
    memory_bytes: int
    busy_share: float = 0.0  # compute over the step (training) or over the token (inference)


@dataclass(frozen=True)
class Placement:
    stages: tuple[Stage, ...]
    step_s: float  # a training step, or one token

    def spans(self) -> tuple[tuple[int, int], ...]:
        return tuple(stage.span for stage in self.stages)


def _compute_s(node: Node, span: tuple[int, int], facts: Facts, workload: Workload) -> float:
    if span[0] == span[1]:
        return 0.0
    if workload.mode == "train":
        measured = node.model.train_s(*span, workload.sequence, workload.micro_batch,
                                      head=span[1] == facts.dims.num_layers)
        if measured is not None:
            return measured
        forward = node.model.compute_s(*span, "prefill", workload.sequence, workload.micro_batch)
        if span[1] == facts.dims.num_layers:  # the last stage also scores every position
            forward *= 1 + facts.head_layers / (span[1] - span[0])
        return TRAIN_FACTOR * forward
    return node.model.compute_s(*span, "decode", workload.context, workload.micro_batch)


def _link_s(link: Link, facts: Facts, workload: Workload) -> float:
    """One crossing: a micro-batch's activations forward and their gradients back, or one token's hidden state."""
    if workload.mode == "train":
        size = workload.micro_batch * workload.sequence * facts.dims.hidden_size * facts.dtype_bytes
        return link.rtt_s + size / link.up_bytes_per_s + size / link.down_bytes_per_s
    size = workload.micro_batch * facts.dims.hidden_size * facts.dtype_bytes
    return link.rtt_s / 2 + size / link.up_bytes_per_s


def _memory_bytes(span: tuple[int, int], facts: Facts, workload: Workload) -> int:
    """The span's weights, and what its work holds: the activations a training step keeps for its backward
    (every micro-batch in flight at once, as GPipe holds them), or the KV cache at ``context`` and one step."""
    layers = span[1] - span[0]
    if layers == 0:
        return 0
    weights = sum(size for (start, end), size in zip(facts.block_spans, facts.block_weight_bytes)
                  if span[0] <= start and end <= span[1])
    if workload.mode == "train":
        kept = training_step_bytes(facts.dims, layers, workload.micro_batch, workload.sequence, head=False)
        return weights + workload.micro_batches * kept
    cache = facts.kv_bytes_per_token_per_layer * workload.micro_batch * workload.context * layers
    step = step_working_bytes(facts.dims, facts.kv_bytes_per_token_per_layer, facts.dtype_bytes, layers,
                              workload.micro_batch, 1, workload.context)
    return weights + cache + step


def evaluate(nodes: list[Node], boundaries: tuple[int, ...], facts: Facts, workload: Workload) -> Placement | None:
    """The placement whose stage i runs layers [boundaries[i], boundaries[i + 1]) on ``nodes[i]``, scored; None
    when a node's memory cannot hold its stage."""
    stages, first = [], True
    for node, start, end in zip(nodes, boundaries, boundaries[1:]):
        memory = _memory_bytes((start, end), facts, workload)
        if node.memory_bytes is not None and memory > node.memory_bytes:
            return None
        crossing = 0.0 if first or start == end else _link_s(node.link_in, facts, workload)
        first = first and start == end
        stages.append(Stage(node.name, (start, end), _compute_s(node, (start, end), facts, workload), crossing, memory))
    active = [stage for stage in stages if stage.span[0] < stage.span[1]]
    if workload.mode == "train":
        period = max(max(stage.compute_s, stage.link_s) for stage in active)
        step = (workload.micro_batches + len(active) - 1) * period
        busy = workload.micro_batches
    else:
        back = _link_s(nodes[1].link_in, facts, workload) if len(active) > 1 else 0.0  # the token, to the UE
        step = sum(stage.compute_s + stage.link_s for stage in active) + back
        busy = 1
    return Placement(tuple(_share(stage, busy, step) for stage in stages), step)


def _share(stage: Stage, busy: int, step: float) -> Stage:
    return Stage(stage.node, stage.span, stage.compute_s, stage.link_s, stage.memory_bytes,
                 busy * stage.compute_s / step if step > 0 else 0.0)


def _check(nodes: list[Node], facts: Facts, min_ue_layers: int) -> None:
    if len(nodes) < 2:
        raise SeamError("a pipeline needs the UE and at least one edge node")
    if any(node.link_in is None for node in nodes[1:]):
        raise SeamError("every edge node needs the link into it")
    for node in nodes:
        if node.model.num_layers != facts.dims.num_layers:
            raise SeamError(f"{node.name}'s profile is of a {node.model.num_layers}-layer model, the artifact has "
                            f"{facts.dims.num_layers}")
    if min_ue_layers > facts.dims.num_layers:
        raise SeamError(f"the UE cannot keep {min_ue_layers} of {facts.dims.num_layers} layers")


def place(nodes: list[Node], facts: Facts, workload: Workload, min_ue_layers: int = 1) -> Placement:
    """The best placement: a dynamic programme over (stage, boundary, stages in use), each stage's terms its own
    (its compute, and the link into it), so that it is exact for the scoring of ``evaluate``."""
    if workload.mode not in MODES:
        raise SeamError(f"workload mode {workload.mode!r} is not one of {', '.join(MODES)}")
    _check(nodes, facts, min_ue_layers)
    cuts = facts.cuts
    # best[(stage, end boundary, stages in use)] = (cost so far, boundaries so far); cost is the slowest
    # resource (training) or the latency so far (inference).
    best: dict[tuple[int, int, int], tuple[float, tuple[int, ...]]] = {}
    for end in cuts:
        if end >= min_ue_layers:
            placed = evaluate(nodes[:1], (0, end), facts, workload)
            if placed is not None and end > 0:
                best[(0, end, 1)] = (_term(placed.stages[0], workload), (0, end))
    for index in range(1, len(nodes)):
        for (stage, start, used), (cost, bounds) in list(best.items()):
            if stage != index - 1:
                continue
            for end in (cut for cut in cuts if cut >= start):
                span_cost = _stage_term(nodes[index], (start, end), facts, workload)
                if span_cost is None:
                    continue
                active = used + (end > start)
                total = max(cost, span_cost) if workload.mode == "train" else cost + span_cost
                key = (index, end, active)
                if key not in best or total < best[key][0]:
                    best[key] = (total, bounds + (end,))
    finals = [bounds for (stage, end, _), (_, bounds) in best.items()
              if stage == len(nodes) - 1 and end == facts.dims.num_layers]
    scored = [placed for placed in (evaluate(nodes, bounds, facts, workload) for bounds in finals) if placed]
    if not scored:
        raise SeamError("no placement fits every node's memory; add memory or nodes, or shrink the micro-batch")
    return min(scored, key=lambda placed: placed.step_s)


def _term(stage: Stage, workload: Workload) -> float:
    return max(stage.compute_s, stage.link_s) if workload.mode == "train" else stage.compute_s + stage.link_s


def _stage_term(node: Node, span: tuple[int, int], facts: Facts, workload: Workload) -> float | None:
    """A non-first stage's own term (0 when it is left out), or None when it does not fit the node."""
    memory = _memory_bytes(span, facts, workload)
    if node.memory_bytes is not None and memory > node.memory_bytes:
        return None
    if span[0] == span[1]:
        return 0.0
    return _term(Stage(node.name, span, _compute_s(node, span, facts, workload), _link_s(node.link_in, facts, workload),
                       memory), workload)


def exhaustive(nodes: list[Node], facts: Facts, workload: Workload, min_ue_layers: int = 1) -> Placement:
    """Every placement scored, the best returned: the reference ``place`` is tested against on small cases."""
    cuts = [cut for cut in facts.cuts]
    best = None
    for inner in itertools.combinations_with_replacement(cuts, len(nodes) - 1):
        bounds = (0, *inner, facts.dims.num_layers)
        if bounds[1] < max(min_ue_layers, 1):
            continue
        placed = evaluate(nodes, bounds, facts, workload)
        if placed is not None and (best is None or placed.step_s < best.step_s):
            best = placed
    if best is None:
        raise SeamError("no placement fits every node's memory")
    return best


def even(nodes: list[Node], facts: Facts, workload: Workload, min_ue_layers: int = 1) -> Placement | None:
    """The UE keeps its fewest layers and the edge nodes share the rest as evenly as the cuts allow."""
    head = min(cut for cut in facts.cuts if cut >= max(min_ue_layers, 1))
    share = (facts.dims.num_layers - head) / (len(nodes) - 1)
    inner = [min(facts.cuts, key=lambda cut: abs(cut - (head + share * i))) for i in range(1, len(nodes) - 1)]
    return evaluate(nodes, (0, head, *sorted(max(cut, head) for cut in inner), facts.dims.num_layers), facts, workload)


def single_node(nodes: list[Node], facts: Facts, workload: Workload, min_ue_layers: int = 1) -> Placement | None:
    """The UE's fewest layers and the rest on the one edge node that runs them fastest (the two-party split)."""
    head = min(cut for cut in facts.cuts if cut >= max(min_ue_layers, 1))
    options = []
    for chosen in range(1, len(nodes)):
        bounds = (0, head, *([head] * (chosen - 1)), *([facts.dims.num_layers] * (len(nodes) - chosen)))
        placed = evaluate(nodes, bounds, facts, workload)
        if placed is not None:
            options.append(placed)
    return min(options, key=lambda placed: placed.step_s, default=None)

