"""Inference over a pipeline of edge stages: what each extra hop costs per token.

The UE runs layers [0, split) and the rest run on one, two or three ``edge_server`` stages chained with
``--until``/``--next``, each stage a process of its own on one thread, all on loopback. The three pipelines run
side by side in one run, their generations interleaved, so that the machine's drift falls on all of them alike.
Reported: the median per-token decode time of each, its ratio to one stage, the cost of one extra hop, and the
raw round trip of a step-sized message on this loopback for scale. The edge's layers are the same in every
pipeline, so what grows is the hops: a message's encoding, a loopback crossing and a stage's receive loop.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import ExitStack

import numpy as np
from _common import real_model_every_layer, report, small_llama_every_layer

from seam.edge_server.process import edge_server
from seam.runtime.artifact import Artifact
from seam.runtime.protocol import Ping
from seam.runtime.shell import table
from seam.ue_client.client import EdgeClient


def stage_ends(artifact: Artifact, split: int, stages: int) -> list[int]:
    """Where each stage but the last ends: the layers [split, L) in ``stages`` near-equal parts, on cuts."""
    last = artifact.num_layers
    ends = [split + round(index * (last - split) / stages) for index in range(1, stages)]
    missing = [end for end in ends if end not in artifact.split_points]
    if missing:
        raise SystemExit(f"this artifact has no cut at {missing}; export it with --cuts all")
    return ends


def start_pipeline(stack: ExitStack, artifact: Artifact, ends: list[int], threads: int) -> str:
    """Starts the stages, the last first; returns the first stage's address."""
    quiet = stack.enter_context(open("/dev/null", "w"))
    following = None
    for end in [*ends, None][::-1]:
        flags = ["--threads", str(threads), *(("--until", str(end), "--next", following) if end else ())]
        _, following = stack.enter_context(edge_server(artifact.root, *flags, log=quiet))
    return following


def decode_ms(client: EdgeClient, split: int, prompt: list[int], tokens: int) -> float:
    """The median time between tokens after the first, in ms."""
    with client.session(split) as session:
        for _ in session.generate([prompt], tokens):
            pass
    arrivals = session.stats.arrivals
    return 1e3 * statistics.median(np.diff(arrivals))


def round_trip_ms(client: EdgeClient, hidden_bytes: int, repeats: int = 50) -> float:
    """A step-sized ping there and a token-sized pong back, median ms."""
    payload = np.zeros(hidden_bytes, np.uint8)
    times = []
    for nonce in range(repeats):
        started = time.perf_counter()
        client.socket.request(Ping(nonce, 8, payload))
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=["small-llama", "real"], default="small-llama")
    parser.add_argument("--split", type=int, default=2, help="layers on the UE")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads per stage")
    args = parser.parse_args()
    artifact = Artifact.open(small_llama_every_layer() if args.model == "small-llama" else real_model_every_layer())
    prompt = list(range(5, 37))
    counts = (1, 2, 3)
    spans = {count: list(zip([args.split, *ends], [*ends, artifact.num_layers]))
             for count in counts for ends in [stage_ends(artifact, args.split, count)]}
    with ExitStack() as stack:
        clients = {}
        for count in counts:
            address = start_pipeline(stack, artifact, [end for _, end in spans[count][:-1]], args.threads)
            clients[count] = stack.enter_context(EdgeClient(artifact, address, threads=1))
        for client in clients.values():  # warm every stage's graphs
            decode_ms(client, args.split, prompt, 4)
        measured = {count: [] for count in counts}
        for _ in range(args.repeats):
            for count, client in clients.items():
                measured[count].append(decode_ms(client, args.split, prompt, args.tokens))
        hidden = artifact.manifest.dims.hidden_size * 4
        rtt = round_trip_ms(clients[1], hidden)
    medians = {count: statistics.median(values) for count, values in measured.items()}
    one = medians[1]
    rows = [[str(count), " ".join(f"[{start},{end})" for start, end in spans[count]), f"{medians[count]:.2f}",
             f"{medians[count] / one:.3f}"] for count in counts]
    print(table(["edge stages", "layers per stage", "ms per token", "vs one stage"], rows))
    per_hop = (medians[counts[-1]] - one) / (counts[-1] - 1)
    print(f"one extra hop: {per_hop:.2f} ms per token; a step-sized round trip on this loopback: {rtt:.2f} ms")
    report(f"pipeline-inference-{args.model}", {
        "model": args.model, "split": args.split, "tokens": args.tokens, "repeats": args.repeats,
        "threads_per_stage": args.threads, "ms_per_token": {str(c): round(m, 3) for c, m in medians.items()},
        "ratio_to_one_stage": {str(c): round(m / one, 3) for c, m in medians.items()},
        "per_hop_ms": round(per_hop, 3), "round_trip_ms": round(rtt, 3)})


if __name__ == "__main__":
    main()
