"""``seam plan-pipeline DIR --ue-profile P --node NAME=PROFILE ...``: how many layers each node of a pipeline
should take (the UE's head first, then the edge nodes in the order given), from each node's ``seam profile``,
its memory and the link into it; printed beside an even split and the single fastest node."""

from __future__ import annotations

import argparse
from pathlib import Path

from seam.planning.cost_model import Link
from seam.planning.placement import MODES, Facts, Node, Placement, Workload, even, place, single_node
from seam.profiler.plan import checked_device
from seam.runtime.artifact import Artifact
from seam.runtime.errors import SeamError
from seam.runtime.shell import number, table


def _pair(flag: str):
    def parse(text: str) -> tuple[str, str]:
        name, equals, value = text.partition("=")
        if not equals or not name or not value:
            raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
        return name, value
    parse.__name__ = flag
    return parse


def add_plan_pipeline_parser(commands) -> None:
    parser = commands.add_parser("plan-pipeline",
                                 help="place a model's layers over the UE and several edge nodes in a pipeline")
    parser.add_argument("directory", type=Path, help="the artifact every profile was measured with")
    parser.add_argument("--ue-profile", type=Path, required=True, help="the UE's seam profile")
    parser.add_argument("--ue-memory-mb", type=number(float, 0, above=True), default=None)
    parser.add_argument("--node", type=_pair("--node"), action="append", default=[], metavar="NAME=PROFILE",
                        help="an edge node and its seam profile, in pipeline order (repeat for each node)")
    parser.add_argument("--memory", type=_pair("--memory"), action="append", default=[], metavar="NAME=MB",
                        help="a node's memory for weights and work (default: unbounded)")
    parser.add_argument("--link", type=_pair("--link"), action="append", default=[], metavar="NAME=MBIT:RTT_MS",
                        help="the link into a node from the stage before it (default: --default-link)")
    parser.add_argument("--default-link", default="1000:1", metavar="MBIT:RTT_MS",
                        help="the link into every node without --link (default 1000:1, a LAN)")
    parser.add_argument("--mode", choices=MODES, default="train",
                        help="train: the pipeline's step over micro-batches; infer: one token's latency")
    parser.add_argument("--micro-batch", type=number(int, 1), default=1, help="sequences per micro-batch")
    parser.add_argument("--micro-batches", type=number(int, 1), default=8, help="micro-batches per training step")
    parser.add_argument("--sequence", type=number(int, 1), default=256, help="tokens per training sequence")
    parser.add_argument("--context", type=number(int, 1), default=1024, help="inference: the past length")
    parser.add_argument("--min-ue-layers", type=number(int, 1), default=1,
                        help="layers that stay on the UE (at least 1: raw text never leaves it)")
    parser.set_defaults(handler=run_plan_pipeline)


def _link(text: str, what: str) -> Link:
    rate, colon, rtt = text.partition(":")
    try:
        link = Link.from_mbit(float(rate), float(rtt))
    except ValueError:
        link = None
    if not colon or link is None or link.up_bytes_per_s <= 0 or link.rtt_s < 0:
        raise SeamError(f"{what}: expected MBIT:RTT_MS with a positive rate, got {text!r}")
    return link


def nodes_of(args: argparse.Namespace, artifact: Artifact) -> list[Node]:
    """The UE and the edge nodes the flags describe, their profiles checked against ``artifact``."""
    if not args.node:
        raise SeamError("give the edge nodes: --node NAME=PROFILE for each, in pipeline order")
    names = [name for name, _ in args.node]
    if len(set(names)) != len(names) or "ue" in names:
        raise SeamError("node names must differ from each other and from 'ue'")
    for flag, pairs in (("--memory", args.memory), ("--link", args.link)):
        unknown = sorted({name for name, _ in pairs} - set(names))
        if unknown:
            raise SeamError(f"{flag} names {', '.join(unknown)}, which no --node gives")
    memory = {name: _megabytes(value, name) for name, value in args.memory}
    links = {name: _link(value, f"--link {name}") for name, value in args.link}
    default_link = _link(args.default_link, "--default-link")
    fingerprint, points = artifact.manifest.artifact_fingerprint, artifact.split_points
    ue_memory = None if args.ue_memory_mb is None else int(args.ue_memory_mb * 2**20)
    nodes = [Node("ue", checked_device(args.ue_profile, fingerprint, points), ue_memory, None)]
    for name, profile in args.node:
        nodes.append(Node(name, checked_device(Path(profile), fingerprint, points), memory.get(name),
                          links.get(name, default_link)))
    return nodes


def _megabytes(text: str, name: str) -> int:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise SeamError(f"--memory {name}: expected a positive number of MB, got {text!r}")
    return int(value * 2**20)


def placement_table(placed: Placement) -> str:
    rows = [[stage.node, f"[{stage.span[0]}, {stage.span[1]})" if stage.span[0] < stage.span[1] else "left out",
             f"{1e3 * stage.compute_s:.2f}", f"{1e3 * stage.link_s:.2f}", f"{100 * stage.busy_share:.0f}%",
             f"{stage.memory_bytes / 2**20:.0f}"] for stage in placed.stages]
    return table(["node", "layers", "compute ms", "link in ms", "busy", "memory MB"], rows)


def inference_commands(directory: Path, used: list) -> list[str]:
    """One command per node of an inference pipeline, each edge stage naming the next (its host by the node's
    name), the UE's last."""
    commands, following = [], None
    for stage in used[:0:-1]:
        handing_on = f" --until {stage.span[1]} --next {following}" if following else ""
        commands.append(f"  on {stage.node}: edge_server {directory} --bind tcp://0.0.0.0:5555{handing_on}")
        following = f"tcp://{stage.node}:5555"
    ue = used[0]
    target = f"--server {following}" if following else "(alone: no edge stage pays for its hop)"
    commands.append(f"  on {ue.node}: ue_client {directory} {target} --split {ue.span[1]}")
    if following:
        commands.append("  (beyond one machine, give every stage --curve-secret and --allow, and every stage that "
                        "hands on --next-server-key)")
    return commands


def run_plan_pipeline(args: argparse.Namespace) -> int:
    artifact = Artifact.open(args.directory, verify=False)  # the manifest is all placement reads
    if args.mode == "infer":
        artifact.check_context(args.context, f"--context {args.context}")
    nodes = nodes_of(args, artifact)
    workload = Workload(args.mode, args.micro_batch, args.micro_batches, args.sequence, args.context)
    facts = Facts.of(artifact.manifest)
    placed = place(nodes, facts, workload, args.min_ue_layers)
    unit = (f"a training step of {args.micro_batches} micro-batches of {args.micro_batch}x{args.sequence} tokens"
            if args.mode == "train" else f"a token at past {args.context}")
    print(f"{artifact.num_layers} layers over {len(nodes)} stages; times per micro-batch or token, the step is {unit}")
    print(placement_table(placed))
    print(f"placed: {1e3 * placed.step_s:.1f} ms")
    used = [stage for stage in placed.stages if stage.span[0] < stage.span[1]]
    if args.mode == "train":
        cuts = ",".join(str(stage.span[0]) for stage in used[1:])
        print(f"run it: seam train-pipeline {args.directory} --stages {cuts} --microbatches {args.micro_batches} "
              f"--batch {args.micro_batches * args.micro_batch} --seq-len {args.sequence} (ranks: "
              f"{', '.join(f'{rank} {stage.node}' for rank, stage in enumerate(used))})")
    else:
        print("run it, the last stage first:")
        print("\n".join(inference_commands(args.directory, used)))
    for label, other in (("an even split", even(nodes, facts, workload, args.min_ue_layers)),
                         ("the single fastest node", single_node(nodes, facts, workload, args.min_ue_layers))):
        if other is None:
            print(f"{label}: does not fit the nodes' memory")
        else:
            print(f"{label}: {1e3 * other.step_s:.1f} ms ({other.step_s / placed.step_s:.2f}x the placed pipeline); "
                  f"layers {', '.join(f'{s.node} [{s.span[0]}, {s.span[1]})' for s in other.stages)}")
    return 0
