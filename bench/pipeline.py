"""Fine-tuning over a pipeline of heterogeneous nodes: the placement of ``seam plan-pipeline`` against an even
split, the two-party split on the fastest node alone, and one process training the whole model.

small-llama cut at every layer; four nodes as processes on this machine, one thread each: the UE and three edge
nodes that compute ``--speeds`` times slower than this machine (``seam train-pipeline --emulate-slowdown``: a
node waits as a slower one would still compute, so that a 2-core machine can hold four unequal nodes). The
placement comes from the same profile scaled by each node's slowdown. Every run is ``seam train-pipeline`` with
one process per rank over gloo on loopback, the same data, batch and micro-batches; reported: tokens per second,
each node's busy share (its compute, emulated waits included, over the run's wall time) and the ratios. The
single process trains at the fastest node's speed with the UE's raw text, which the pipeline never moves.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from _common import WORK, report, small_llama_every_layer

from seam.planning.cost_model import DeviceModel, Link
from seam.planning.loading import profile_key
from seam.planning.placement import Facts, Node, Workload, even, place, single_node
from seam.planning.schema import DeviceProfile, load
from seam.runtime.artifact import Artifact
from seam.runtime.shell import table

NAMES = ("ue", "edge-a", "edge-b", "edge-c")
LOOPBACK = Link.from_mbit(10_000, 0.05)  # between processes on one machine


def profile(out: Path, shape: str) -> DeviceProfile:
    """This machine's profile of the artifact on one thread, fine-tuning at the micro-batch ``shape`` timed too
    (measured once, cached with the artifact)."""
    artifact = Artifact.open(out)
    key = profile_key(artifact, "cpu", 1, artifact.manifest.dtype)
    subprocess.run([sys.executable, "-m", "seam.cli", "profile", str(out), "--quiet", "--threads", "1", "--training",
                    "--train-shapes", shape], check=True, capture_output=True)
    return load(out / "profiles" / key.file_name(), DeviceProfile)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def train(out: Path, cuts: list[int], slowdowns: list[float], args, data: Path) -> dict:
    """One pipeline run: tokens/s and every rank's busy share, from rank 0's report."""
    port, adapter = free_port(), WORK / "pipeline-adapter"
    flags = ["--stages", ",".join(map(str, cuts)), "--rendezvous", f"tcp://127.0.0.1:{port}", "--batch",
             str(args.batch), "--microbatches", str(args.microbatches), "--seq-len", str(args.seq_len), "--steps",
             str(args.steps), "--schedule", "1f1b", "--timeout", "300"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    processes = [subprocess.Popen(
        [sys.executable, "-m", "seam.cli", "train-pipeline", str(out), "--rank", str(rank), *flags,
         "--emulate-slowdown", str(slowdown),
         *(("--data", str(data), "--out", str(adapter)) if rank == 0 else ())],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for rank, slowdown in enumerate(slowdowns)]
    outputs = [process.communicate(timeout=1200) for process in processes]
    if any(process.returncode for process in processes):
        raise SystemExit("a pipeline run failed: " + " | ".join(err.strip().splitlines()[-1] for _, err in outputs
                                                                 if err.strip()))
    text = outputs[0][0]
    return {"tokens_per_s": float(re.search(r"([\d.]+) tokens/s", text).group(1)),
            "busy": [float(x) for x in re.findall(r"^\s*\d+\s+\d+-\d+\s+([\d.]+)$", text, re.M)]}


def one_process(out: Path, args, data: Path, slowdown: float) -> float:
    """Tokens/s of one process training the whole model at ``slowdown`` (the reference the pipeline matches)."""
    import torch

    from seam.finetune.data import batches, read_samples, tokenize
    from seam.finetune.pipeline import PipelineJob, fixed_batches, reference_run
    from seam.runtime.text import load_tokenizer

    torch.set_num_threads(1)
    artifact = Artifact.open(out)
    job = PipelineJob((1,), artifact.num_layers, "gpipe", args.microbatches, args.batch, args.seq_len, args.steps)
    pad_id = artifact.manifest.tokenizer["pad_token_id"]
    sequences = tokenize(read_samples(data), load_tokenizer(artifact), args.seq_len)
    stream = fixed_batches(batches(sequences, args.batch, pad_id, 0), args.seq_len, pad_id)
    chosen = [next(stream) for _ in range(args.steps)]
    started = time.perf_counter()
    reference_run(artifact, job, chosen)
    return args.steps * args.batch * args.seq_len / ((time.perf_counter() - started) * slowdown)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--speeds", default="4,1,2,3", help="each node's slowdown: the UE's, then each edge node's")
    parser.add_argument("--dilate", type=float, default=3.0,
                        help="every node this much slower again, so that the nodes computing at once fit this "
                             "machine's cores: each node's own compute is at most 1/dilate of its time")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    slowdowns = [args.dilate * float(x) for x in args.speeds.split(",")]
    out = small_llama_every_layer()
    base = profile(out, f"{args.batch // args.microbatches}x{args.seq_len}")
    artifact = Artifact.open(out)
    nodes = [Node(name, DeviceModel.from_profile(base.slowed(slowdown)), None, None if index == 0 else LOOPBACK)
             for index, (name, slowdown) in enumerate(zip(NAMES, slowdowns))]
    facts = Facts.of(artifact.manifest)
    workload = Workload("train", args.batch // args.microbatches, args.microbatches, args.seq_len)
    data = WORK / "pipeline-data.txt"
    data.write_text("\n".join(f"line {i}: the pipeline carries hidden states from node to node, {i % 7} times"
                              for i in range(64)) + "\n")
    rows, results = [], {}
    for label, placement in (("placed", place(nodes, facts, workload)), ("even", even(nodes, facts, workload)),
                             ("fastest node alone", single_node(nodes, facts, workload))):
        used = [(stage, slowdowns[NAMES.index(stage.node)]) for stage in placement.stages
                if stage.span[0] < stage.span[1]]
        cuts = [stage.span[0] for stage, _ in used[1:]]
        measured = train(out, cuts, [slowdown for _, slowdown in used], args, data)
        results[label] = {"stages": [[stage.node, *stage.span] for stage, _ in used],
                          "predicted_step_s": placement.step_s, **measured}
        rows.append([label, " ".join(f"{stage.node}[{stage.span[0]},{stage.span[1]})" for stage, _ in used),
                     f"{measured['tokens_per_s']:.0f}", " ".join(f"{share:.2f}" for share in measured["busy"])])
    single = one_process(out, args, data, min(slowdowns[1:]))
    results["one process"] = {"tokens_per_s": single}
    rows.append(["one process (fastest node)", f"every layer at {min(slowdowns[1:]):g}x", f"{single:.0f}", "-"])
    placed = results["placed"]["tokens_per_s"]
    for label in results:
        results[label]["placed_vs_this"] = round(placed / results[label]["tokens_per_s"], 3)
    print(table(["run", "stages", "tokens/s", "busy share per node"], rows))
    print("placed pipeline / each: " + ", ".join(f"{label} {r['placed_vs_this']:.2f}x" for label, r in results.items()))
    report("pipeline", {"speeds": slowdowns, "dilate": args.dilate, "batch": args.batch, "microbatches": args.microbatches,
                        "seq_len": args.seq_len, "steps": args.steps, "runs": results})


if __name__ == "__main__":
    main()
