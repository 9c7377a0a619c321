"""Split fine-tuning against local fine-tuning of the same model and batch: time per optimizer step and tokens/s.

small-llama with LoRA on every layer's attention projections; local: transformers' forward and loss in this
process (``finetune.local``); split: this process trains layers [0, cut) and an ``edge_server --train`` on the
same machine trains the rest, over loopback, in edge-loss and in u-shaped mode. The two sides take turns, so each
has both cores while it computes. Rounds interleave the three runs step by step, and the medians of each run's
steps are compared, with the edge's share of each split step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from _common import report, small_llama_every_layer

from seam.edge_server.process import edge_server
from seam.export.corpus import generate_corpus
from seam.runtime.shell import table
from seam.finetune.data import batches, tokenize
from seam.finetune.local import LocalTrainer
from seam.finetune.ue import SplitTrainer
from seam.runtime.artifact import Artifact
from seam.runtime.text import load_tokenizer
from seam.ue_client.client import EdgeClient


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128, help="tokens per sample")
    parser.add_argument("--cut", type=int, default=6)
    parser.add_argument("--steps", type=int, default=8, help="measured steps per run (after one warm-up step)")
    args = parser.parse_args()

    out = small_llama_every_layer()
    artifact = Artifact.open(out)
    sentences = generate_corpus(2000, seed=3).splitlines()
    samples = [" ".join(sentences[i:i + 8]) for i in range(0, len(sentences) - 8, 8)]
    sequences = tokenize(samples, load_tokenizer(artifact), args.length)
    pad = artifact.manifest.tokenizer["pad_token_id"]
    tokens = args.batch * args.length
    runs: dict[str, list[float]] = {"local": [], "split, edge-loss": [], "split, u-shaped": []}
    edge_s: dict[str, list[float]] = {name: [] for name in runs if name != "local"}
    with open(os.devnull, "w") as quiet, edge_server(out, "--train", log=quiet) as (_, address), \
            EdgeClient(artifact, address) as client:
        trainers = {"local": LocalTrainer(artifact, seed=0),
                    "split, edge-loss": SplitTrainer(artifact, client, args.cut, "edge-loss", seed=0),
                    "split, u-shaped": SplitTrainer(artifact, client, args.cut, "u-shaped", seed=0)}
        data = {name: batches(sequences, args.batch, pad, seed=0) for name in runs}
        for step in range(args.steps + 1):
            for name, trainer in trainers.items():
                batch = next(data[name])
                edge_before = getattr(getattr(trainer, "edge", None), "edge_compute_s", 0.0)
                started = time.perf_counter()
                trainer.step(batch)
                seconds = time.perf_counter() - started
                if step == 0:
                    continue  # the first step allocates the optimizer state and warms the kernels
                runs[name].append(seconds)
                if name in edge_s:
                    edge_s[name].append(trainer.edge.edge_compute_s - edge_before)
    local = statistics.median(runs["local"])
    rows, result = [], {"model": "small-llama", "batch": args.batch, "length": args.length, "cut": args.cut,
                        "steps": args.steps, "runs": {}}
    for name, seconds in runs.items():
        median = statistics.median(seconds)
        entry = {"step_s": median, "tokens_per_s": tokens / median, "vs_local": median / local}
        row = [name, f"{1e3 * median:.0f}", f"{tokens / median:.0f}", f"{median / local:.3f}"]
        if name in edge_s:
            edge = statistics.median(edge_s[name])
            entry["edge_compute_s"] = edge
            row.append(f"{1e3 * edge:.0f}")
        else:
            row.append("-")
        result["runs"][name] = entry
        rows.append(row)
    print(table(["run", "ms per step", "tokens/s", "vs local", "edge compute ms"], rows))
    result["split_over_local"] = {name: float(np.round(entry["vs_local"], 4)) for name, entry in result["runs"].items()}
    report("split_training", result)


if __name__ == "__main__":
    main()
