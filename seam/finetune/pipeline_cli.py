"""``seam train-pipeline``: one node's part of pipeline-parallel split fine-tuning (``seam.finetune.pipeline``).

Every node runs the same command with its own rank; rank 0 is the UE, which reads the data, hosts the
rendezvous and writes the adapter of the whole model:

  seam train-pipeline ARTIFACT --stages 4,9 --rank 0 --rendezvous tcp://UE:29500 --data mine.txt --out adapter
  seam train-pipeline ARTIFACT --stages 4,9 --rank 1 --rendezvous tcp://UE:29500      (edge node 1: layers 4-8)
  seam train-pipeline ARTIFACT --stages 4,9 --rank 2 --rendezvous tcp://UE:29500      (edge node 2: 9 to the end)

Under ``torchrun`` (``--nnodes 3 --nproc-per-node 1 --rdzv-endpoint UE:29500``) leave out ``--rank`` and
``--rendezvous``: the rank and the address come from its environment. ``seam plan-pipeline`` chooses the stages.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from urllib.parse import urlsplit

from seam.runtime.addresses import reachable_beyond_loopback
from seam.runtime.errors import SeamError
from seam.runtime.shell import comma_list, number


def add_train_pipeline_parser(commands) -> None:
    parser = commands.add_parser("train-pipeline", help="fine-tune over a pipeline of nodes (one command per node)",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path, help="the exported model (every node needs the same)")
    parser.add_argument("--stages", type=comma_list(int, positive=True), required=True,
                        help="where each stage ends and the next begins, e.g. 4,9: the UE runs layers [0, 4)")
    parser.add_argument("--rank", type=number(int, 0), help="this node's stage: 0 is the UE (default: $RANK)")
    parser.add_argument("--rendezvous", help="tcp://HOST:PORT of rank 0 (default: torchrun's $MASTER_ADDR)")
    parser.add_argument("--allow-network", action="store_true",
                        help="allow a rendezvous beyond this machine: the stages' traffic is neither "
                             "authenticated nor encrypted, so only on a network you trust")
    parser.add_argument("--data", type=Path, help="rank 0: the training text, one sample per line (or .jsonl)")
    parser.add_argument("--out", type=Path, help="rank 0: where the adapter of the whole model is written")
    parser.add_argument("--schedule", default="1f1b", choices=("gpipe", "1f1b"))
    parser.add_argument("--mode", default="edge-loss", choices=("edge-loss", "u-shaped"),
                        help="edge-loss: the last node runs the head and scores the labels rank 0 sends it; "
                             "u-shaped: the head and the labels stay on rank 0 (default edge-loss)")
    parser.add_argument("--microbatches", type=number(int, 1), default=4)
    parser.add_argument("--batch", type=number(int, 1), default=8, help="sequences per step")
    parser.add_argument("--seq-len", type=number(int, 2), default=64, help="positions of every sequence (padded)")
    parser.add_argument("--steps", type=number(int, 1), default=10)
    parser.add_argument("--lora-rank", type=number(int, 1), default=8)
    parser.add_argument("--alpha", type=number(float, 0, above=True), default=16.0)
    parser.add_argument("--lr", type=number(float, 0, above=True), default=1e-3)
    parser.add_argument("--weight-decay", type=number(float, 0), default=0.0)
    parser.add_argument("--seed", type=number(int, 0), default=0)
    parser.add_argument("--checkpoint-every", type=number(int, 0), default=0, metavar="STEPS",
                        help="every node writes its stage's adapters and optimizer state every STEPS steps")
    parser.add_argument("--checkpoint", type=Path,
                        help="this node's checkpoint directory (default: OUT.checkpoint on rank 0, "
                             "pipeline-stage-RANK.checkpoint here on the others)")
    parser.add_argument("--resume", action="store_true",
                        help="carry on from the checkpoints (every node, with the settings they were written with)")
    parser.add_argument("--emulate-slowdown", type=number(float, 1), default=1.0, metavar="FACTOR",
                        help="benchmarks: this node waits as a node FACTOR times slower would still compute")
    parser.add_argument("--timeout", type=number(float, 1), default=120.0,
                        help="seconds any node waits for another, at the start and at every exchange")
    parser.set_defaults(handler=run_train_pipeline, extra="finetune")


def rendezvous(args: argparse.Namespace) -> tuple[int, str]:
    """This node's rank and the rendezvous URL, from the flags or torchrun's environment; a host beyond this
    machine only with ``--allow-network``."""
    rank = args.rank if args.rank is not None else os.environ.get("RANK")
    address = args.rendezvous or (f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
                                  if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ else None)
    if rank is None or address is None:
        raise SeamError("give --rank and --rendezvous tcp://HOST:PORT (or run under torchrun)")
    parts = urlsplit(address)
    if parts.scheme != "tcp" or not parts.hostname or not parts.port:
        raise SeamError(f"--rendezvous {address!r}: give tcp://HOST:PORT")
    if reachable_beyond_loopback(address):
        if not args.allow_network:
            raise SeamError(f"--rendezvous {parts.hostname} is beyond this machine, and the stages' traffic is "
                            "neither authenticated nor encrypted; add --allow-network on a network you trust")
    else:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the stages then listen on loopback alone
    return int(rank), address


def run_train_pipeline(args: argparse.Namespace) -> int:
    from seam.finetune.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from seam.finetune.pipeline import PipelineJob, PipelineRank
    from seam.runtime.artifact import Artifact

    artifact = Artifact.open(args.artifact)
    rank, address = rendezvous(args)
    job = PipelineJob(tuple(args.stages), artifact.num_layers, args.schedule, args.microbatches, args.batch,
                      args.seq_len, args.steps, args.lora_rank, args.alpha, args.lr, args.weight_decay, args.seed,
                      args.mode)
    if rank == 0 and (args.data is None or args.out is None):
        raise SeamError("rank 0 (the UE) needs --data and --out")
    checkpoints = args.checkpoint or (args.out.with_name(f"{args.out.name}.checkpoint") if rank == 0
                                      else Path(f"pipeline-stage-{rank}.checkpoint"))
    settings = {**asdict(job), "cuts": list(job.cuts), "stage": rank}
    settings.pop("steps")  # a resumed run may go on for longer
    resumed = load_checkpoint(checkpoints, settings) if args.resume else None
    if resumed and resumed.step >= job.steps:
        raise SeamError(f"the checkpoint is at step {resumed.step} already; give more --steps to carry on")
    data = training_data(artifact, args, resumed.step if resumed else 0) if rank == 0 else None
    losses = resumed.losses if resumed else []
    node = PipelineRank(artifact, job, rank, address, args.timeout, args.emulate_slowdown)
    try:
        node.agree_on_start(len(losses))
        if resumed:
            node.restore(resumed.parts["stage"])
        started, first = time.perf_counter(), len(losses) + 1
        for step in range(first, job.steps + 1):
            losses.append(node.step(next(data) if data is not None else None))
            if rank == 0:
                print(f"step {step} loss {losses[-1]:.6f} ({time.perf_counter() - started:.1f} s)", flush=True)
            if args.checkpoint_every and step % args.checkpoint_every == 0:
                save_checkpoint(checkpoints, settings, Checkpoint(step, losses, {"stage": node.training_state()}))
        wall_s = time.perf_counter() - started
        shares, parts = node.busy_shares(wall_s), node.adapters()
    finally:
        node.close()
    if rank == 0:
        report(artifact, args, job, shares, parts, (job.steps + 1 - first) / wall_s)
    return 0


def training_data(artifact, args: argparse.Namespace, done: int):
    """Rank 0's batches, each padded to ``--seq-len``, past the ``done`` a checkpoint trained on (the order is
    seeded, so a resumed run sees what an uninterrupted one would)."""
    from seam.finetune.data import batches, read_samples, tokenize
    from seam.finetune.pipeline import fixed_batches
    from seam.runtime.text import load_tokenizer

    sequences = tokenize(read_samples(args.data), load_tokenizer(artifact), args.seq_len)
    pad_id = artifact.manifest.tokenizer["pad_token_id"]
    data = fixed_batches(batches(sequences, args.batch, pad_id, args.seed), args.seq_len, pad_id)
    for _ in range(done):
        next(data)
    return data


def report(artifact, args: argparse.Namespace, job, shares: list[float], parts: list, steps_per_s: float) -> None:
    """Each stage's busy share, the throughput, and the adapter of the whole model written to ``--out``."""
    from seam.finetune.adapters import save_adapter
    from seam.runtime.shell import table

    print(table(["stage", "layers", "busy share"], [
        [str(index), f"{span.start}-{span.end - 1}", f"{share:.2f}"]
        for index, (span, share) in enumerate(zip(job.spans, shares))]))
    print(f"{job.steps} steps; {steps_per_s * job.batch * job.seq_len:.0f} tokens/s")
    written = save_adapter(artifact, args.out, parts, job.rank, job.alpha, job.seed)
    print(f"adapter of every layer: {written}; merge it with seam export --adapter", file=sys.stderr)
