"""Decode speed on the real model (SmolLM2-135M-Instruct from its packaged GGUF): Seam's every-layer artifact in
one process, and split at layer 15 over loopback (edge_server and a UE session), against transformers' eager
PyTorch on the same dequantized weights and the same two threads, at past lengths 128 and 1024.

The three paths step in turn within one run, so that the machine's drift falls on each alike; each step runs at
the given past length (the cache is rewound after it), and the medians and their ratios are reported.
"""

from __future__ import annotations

import statistics

import numpy as np

from _common import real_model_every_layer, report, seam_decode_step, timed, torch_decode_step

from seam.edge_server.process import edge_server
from seam.runtime.artifact import Artifact
from seam.runtime.shell import table
from seam.ue_client.client import EdgeClient

MODEL, SPLIT, PASTS, STEPS, THREADS = "smollm2-135m-instruct", 15, (128, 1024), 30, 2


def split_times(artifact: Artifact, address: str, past: int, steps: int) -> list[float]:
    """Per-token times of a split generation at ``past`` over loopback: a prompt of ``past`` tokens, then decode."""
    prompt = list(np.random.default_rng(0).integers(3, 1000, past))
    with EdgeClient(artifact, address, threads=THREADS) as client, client.session(SPLIT) as session:
        list(session.generate([prompt], steps + 1))
        return list(np.diff(session.stats.arrivals))  # what a user waits per token, after the first


def main() -> None:
    import torch

    from seam.export.sources import load_model

    torch.set_num_threads(THREADS)
    out = real_model_every_layer()
    artifact = Artifact.open(out)
    reference = load_model(MODEL).model
    rows, results = [], {}
    with open("/dev/null", "w") as quiet, edge_server(out, "--threads", str(THREADS), log=quiet) as (_, address):
        for past in PASTS:
            paths = {"seam": seam_decode_step(artifact, past, THREADS), "transformers": torch_decode_step(reference, past)}
            medians = timed(paths, STEPS)
            split = split_times(artifact, address, past, STEPS)
            medians["split"] = 1e3 * statistics.median(split)
            results[str(past)] = {name: round(value, 2) for name, value in medians.items()}
            results[str(past)]["seam_vs_transformers"] = round(medians["seam"] / medians["transformers"], 3)
            results[str(past)]["split_vs_transformers"] = round(medians["split"] / medians["transformers"], 3)
            rows.append([str(past), f"{medians['transformers']:.1f}", f"{medians['seam']:.1f}",
                         f"{medians['split']:.1f}", f"{medians['seam'] / medians['transformers']:.2f}x",
                         f"{medians['split'] / medians['transformers']:.2f}x"])
    print(table(["past", "transformers eager ms", "Seam one process ms", f"Seam split {SPLIT} ms",
                 "one process / eager", "split / eager"], rows))
    report("real_model_speed", {"model": MODEL, "threads": THREADS, "split": SPLIT, "decode_ms": results})


if __name__ == "__main__":
    main()
