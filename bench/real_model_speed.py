"""Decode speed on the real model (SmolLM2-135M-Instruct from its packaged GGUF): Seam's every-layer artifact in
one process, and split at layer 15 over loopback (edge_server and a UE session), against transformers' eager
PyTorch on the same dequantized weights and the same two threads, at past lengths 128 and 1024.

The three paths step in turn within one run, so that the machine's drift falls on each alike; each step runs at
the given past length (the cache is rewound after it), and the medians and their ratios are reported.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from _common import real_model_every_layer, report

from seam.edge_server.process import edge_server
from seam.runtime.artifact import Artifact
from seam.runtime.executor import SessionPool
from seam.runtime.shell import table
from seam.runtime.spans import Span
from seam.ue_client.client import EdgeClient

MODEL, SPLIT, PASTS, STEPS, THREADS = "smollm2-135m-instruct", 15, (128, 1024), 30, 2


def seam_step(artifact: Artifact, past: int):
    """A decode step at ``past`` through every layer in one process."""
    runner = SessionPool(artifact, THREADS).runner(Span(0, artifact.num_layers))
    runner.reset(1)
    prompt = np.random.default_rng(0).integers(3, 1000, (1, past))
    runner.run_in_chunks(prompt, np.ones((1, past), np.int64), np.arange(past)[None], 256)
    cache = dict(runner.cache)

    def step() -> None:
        runner.cache = dict(cache)
        runner.run(np.array([[42]]), np.ones((1, past + 1), np.int64), np.array([[past]]))
    return step


def torch_step(model, past: int):
    """The same step in transformers' eager PyTorch, its cache rewound the same way."""
    import torch
    from transformers import DynamicCache

    ids = torch.from_numpy(np.random.default_rng(0).integers(3, 1000, (1, past)))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    layers = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]

    def step() -> None:
        rewound = DynamicCache()
        for index, (keys, values) in enumerate(layers):
            rewound.update(keys, values, index)
        with torch.no_grad():
            model(torch.tensor([[42]]), past_key_values=rewound, use_cache=True)
    return step


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
            paths = {"seam": seam_step(artifact, past), "transformers": torch_step(reference, past)}
            times = {name: [] for name in paths}
            for index in range(STEPS + 3):
                for name, step in paths.items():
                    started = time.perf_counter()
                    step()
                    if index >= 3:
                        times[name].append(time.perf_counter() - started)
            split = split_times(artifact, address, past, STEPS)
            medians = {name: 1e3 * statistics.median(values) for name, values in times.items()}
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
