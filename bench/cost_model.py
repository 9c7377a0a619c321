"""The cost model against the real thing: predicted per-token latency and time to first token of every tested
split, from this machine's profile and a probe of the loopback link, against edge_server + ue_client measured at
context lengths and splits the profile never measured.

This machine plays both the UE and the edge (one at a time, as a split runs), so one device profile serves both
sides. Reports each case and the median absolute relative error (target <= 10%).
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np

from _common import real_model_every_layer, report, small_llama_every_layer

from seam.edge_server.process import edge_server
from seam.runtime.shell import table
from seam.planning.cost_model import Link, median_relative_error, predict
from seam.planning.loading import profile_key
from seam.profiler.probe import probe_link
from seam.planning.schema import DeviceProfile, load
from seam.runtime.artifact import Artifact
from seam.runtime.ort_options import default_threads
from seam.runtime.transport import TransportConfig, UeSocket
from seam.cli import main as seam
from seam.ue_client.client import EdgeClient


def measured_case(client: EdgeClient, split: int, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(prefill step, median decode step) seconds, each UE compute + round trip + edge compute as the UE saw it."""
    with client.session(split) as session:
        for _ in session.generate([prompt], new_tokens):
            pass
    totals = [timing.ue_s + timing.network_s + timing.edge_s for timing in session.stats.timings]
    return totals[0], statistics.median(totals[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--contexts", default="48,200,400", help="prompt lengths inside the profile's range, off its grid")
    parser.add_argument("--splits", default="2,6,10")
    parser.add_argument("--real", action="store_true",
                        help="the real model (SmolLM2-135M-Instruct) instead of small-llama; use --splits 5,15,25")
    parser.add_argument("--new-tokens", type=int, default=9)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    splits = [int(s) for s in args.splits.split(",")]

    artifact = Artifact.open(real_model_every_layer() if args.real else small_llama_every_layer())
    if seam(["profile", str(artifact.root), "--quiet", "--force"]) != 0:
        raise SystemExit("profiling failed")
    path = artifact.root / "profiles" / profile_key(artifact, "cpu", default_threads(), artifact.manifest.dtype).file_name()
    device = load(path, DeviceProfile)
    rng = np.random.default_rng(0)
    prompts = {c: rng.integers(0, artifact.manifest.dims.vocab_size, size=c).tolist() for c in contexts}

    measured: dict[tuple[int, int], list[tuple[float, float]]] = {(s, c): [] for s in splits for c in contexts}
    with open("/dev/null", "w") as quiet, edge_server(artifact.root, log=quiet) as (_, address):
        probe = UeSocket(address, TransportConfig(timeout_s=30))
        link = Link.from_profile(probe_link(probe))
        probe.close()
        with EdgeClient(artifact, address) as client:
            measured_case(client, splits[0], prompts[contexts[0]], 3)  # warm-up
            for _ in range(args.rounds):
                for split in splits:
                    for context in contexts:
                        measured[(split, context)].append(measured_case(client, split, prompts[context], args.new_tokens))

    rows, cases, predicted_all, measured_all = [], [], [], []
    middle_of_decode = args.new_tokens // 2  # decode steps run at past = context .. context + new_tokens - 1
    for (split, context), samples in measured.items():
        prefill = statistics.median(sample[0] for sample in samples)
        decode = statistics.median(sample[1] for sample in samples)
        predicted_prefill = predict(device, device, link, split, context).prefill.total_s
        predicted_decode = predict(device, device, link, split, context + middle_of_decode).decode.total_s
        for phase, want, got in (("decode", decode, predicted_decode), ("prefill", prefill, predicted_prefill)):
            error = (got - want) / want
            rows.append([str(split), str(context), phase, f"{1e3 * want:.2f}", f"{1e3 * got:.2f}", f"{100 * error:+.1f}%"])
            cases.append({"split": split, "context": context, "phase": phase, "measured_ms": round(1e3 * want, 3),
                          "predicted_ms": round(1e3 * got, 3), "error": round(error, 4)})
            measured_all.append(want)
            predicted_all.append(got)
    error = median_relative_error(predicted_all, measured_all)
    print(table(["split", "context", "phase", "measured ms", "predicted ms", "error"], rows))
    print(f"median absolute error: {100 * error:.1f}% (target <= 10%)")
    report("cost_model-smollm2" if args.real else "cost_model", {
        "model": artifact.manifest.source, "link": {"rtt_ms": round(1e3 * link.rtt_s, 3),
                                                    "up_mbit": round(link.up_mbit, 1), "down_mbit": round(link.down_mbit, 1)},
        "rounds": args.rounds, "cases": cases, "median_absolute_error": round(error, 4), "target": 0.10,
    })


if __name__ == "__main__":
    main()
