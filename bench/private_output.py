"""What keeping the output private costs: per-token time of the real model split over loopback with the head and
sampling on the UE (``--private-output``: the edge returns the last layer's hidden states) against the normal
path (the edge samples and returns a token id), at several splits, with the cost model's prediction of each.

Both paths run against one edge_server, in turn within each round, so the machine's drift falls on both alike;
every generation is greedy from the same prompt, and the tokens of both paths are checked to be the same. Reports
median decode ms per token, the ratio private / normal, the downlink bytes per token of each, and the split the
UE's part of a step takes (its layers plus, with private output, the head).
"""

from __future__ import annotations

import argparse
import statistics
import sys

import numpy as np
from _common import real_model_every_layer, report

from seam.edge_server.process import edge_server
from seam.planning.wire_sizes import downlink_bytes
from seam.runtime.artifact import DTYPE_BYTES, Artifact
from seam.runtime.executor import SessionPool
from seam.runtime.shell import table
from seam.runtime.text import load_tokenizer
from seam.ue_client.client import EdgeClient

PROMPT, TOKENS = "Write a short note about the printing press.", 48


def generation(client: EdgeClient, split: int, prompt_ids: list[int], private: bool) -> tuple[np.ndarray, dict]:
    """One greedy generation's tokens and its median decode timings in ms (total, UE, network, edge)."""
    with client.session(split, private_output=private) as session:
        tokens = np.stack(list(session.generate([prompt_ids], TOKENS)), axis=1)
    decode = session.stats.timings[1:]  # the prefill is no decode step
    parts = {"total": [t.ue_s + t.network_s + t.edge_s for t in decode], "ue": [t.ue_s for t in decode],
             "network": [t.network_s for t in decode], "edge": [t.edge_s for t in decode]}
    return tokens, {name: 1e3 * statistics.median(values) for name, values in parts.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--splits", default="5,15,25")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    artifact = Artifact.open(real_model_every_layer())
    manifest = artifact.manifest
    splits = [int(split) for split in args.splits.split(",")]
    prompt_ids = load_tokenizer(artifact).encode(PROMPT).ids
    pool = SessionPool(artifact, 1)
    measured: dict[tuple[int, bool], list[dict]] = {(split, private): [] for split in splits for private in (0, 1)}
    with edge_server(artifact.root, "--threads", "1", "--log-level", "warning") as (_, address):
        with EdgeClient(artifact, address, threads=1, pool=pool) as client:
            for _ in range(args.rounds):
                for split in splits:
                    normal, timings = generation(client, split, prompt_ids, False)
                    measured[split, False].append(timings)
                    private, timings = generation(client, split, prompt_ids, True)
                    measured[split, True].append(timings)
                    if not (normal == private).all():
                        print(f"split {split}: private output gave other tokens", file=sys.stderr)
                        return 1
    hidden_bytes = manifest.dims.hidden_size * DTYPE_BYTES[manifest.dtype]
    rows, results = [], {}
    for split in splits:
        medians = {private: {part: statistics.median(round_[part] for round_ in measured[split, private])
                             for part in ("total", "ue", "network", "edge")} for private in (False, True)}
        ratio = medians[True]["total"] / medians[False]["total"]
        results[str(split)] = {"normal_ms": medians[False], "private_ms": medians[True], "ratio": round(ratio, 3)}
        rows.append([str(split), f"{medians[False]['total']:.2f}", f"{medians[True]['total']:.2f}", f"{ratio:.3f}x",
                     f"{medians[False]['ue']:.2f} / {medians[True]['ue']:.2f}",
                     f"{medians[False]['edge']:.2f} / {medians[True]['edge']:.2f}"])
    print(f"{manifest.source}, {TOKENS} greedy tokens, medians of {args.rounds} rounds over loopback, 1 thread each")
    print(table(["split", "normal ms/token", "private ms/token", "private / normal", "UE ms (normal / private)",
                 "edge ms (normal / private)"], rows))
    down = {"normal": downlink_bytes(1), "private": downlink_bytes(1, hidden_bytes)}
    print(f"downlink per token: {down['normal']} B normal, {down['private']} B private")
    report("private_output", {"model": manifest.source, "tokens": TOKENS, "rounds": args.rounds,
                              "downlink_bytes_per_token": down, "splits": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
