"""Decode latency of small-llama cut at every layer and at 4 cuts, against the same model as a single block.

All three artifacts are exported in this run and their decode steps interleaved round-robin, so machine drift
hits each alike. Every step runs at past length 128 (the cache is rewound after each step). Reports medians,
the median of per-round ratios to the single block, export time per layer and artifact sizes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from _common import WORK, median_ms, report

from seam.export.exporter import ExportRequest, export
from seam.runtime.shell import table
from seam.runtime.artifact import Artifact
from seam.runtime.executor import SessionPool
from seam.runtime.spans import Span

VARIANTS = {"single block": "none", "4 cuts": "2,5,7,10", "every layer": "all"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="small-llama")
    parser.add_argument("--past", type=int, default=128)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()

    # One-time costs (exporter imports, first tracing) would otherwise land on whichever export runs first.
    export(ExportRequest(model="tiny-llama", out=WORK / "warmup", force=True, validate=False, quiet=True))
    exports = {}
    for name, cuts in VARIANTS.items():
        out = WORK / f"{args.model}-cuts-{cuts.replace(',', '_')}"
        started = time.perf_counter()
        manifest = export(
            ExportRequest(model=args.model, out=out, cuts=cuts, force=True, validate=False, quiet=True)
        ).manifest
        seconds = time.perf_counter() - started
        size = sum(f.stat().st_size for f in out.iterdir() if f.name.endswith((".onnx", ".data")))
        exports[name] = {"dir": out, "export_s": seconds, "bytes": size, "layers": manifest.dims.num_layers}

    rng = np.random.default_rng(0)
    runners = {}
    for name, info in exports.items():
        artifact = Artifact.open(info["dir"])
        runner = SessionPool(artifact).runner(Span(0, artifact.num_layers))
        vocab = artifact.manifest.dims.vocab_size
        prompt = rng.integers(0, vocab, size=(1, args.past), dtype=np.int64)
        runner.reset(1)
        runner.run(prompt, np.ones((1, args.past), np.int64), np.arange(args.past)[None, :])
        runners[name] = (runner, dict(runner.cache))

    mask = np.ones((1, args.past + 1), np.int64)
    position = np.array([[args.past]], np.int64)
    token = np.array([[7]], np.int64)
    samples = {name: [] for name in runners}
    for step in range(args.warmup + args.steps):
        for name, (runner, prefilled) in runners.items():
            runner.cache = dict(prefilled)  # rewind to past length 128
            started = time.perf_counter()
            runner.run(token, mask, position)
            if step >= args.warmup:
                samples[name].append(time.perf_counter() - started)

    single = samples["single block"]
    rows, result = [], {"model": args.model, "past_length": args.past, "steps": args.steps, "variants": {}}
    for name, info in exports.items():
        ratio = statistics.median(a / b for a, b in zip(samples[name], single))
        entry = {
            "blocks": len(Artifact.open(info["dir"]).manifest.blocks),
            "decode_ms_median": round(median_ms(samples[name]), 3),
            "decode_ratio_to_single": round(ratio, 3),
            "export_s_per_layer": round(info["export_s"] / info["layers"], 3),
            "artifact_mib": round(info["bytes"] / 2**20, 1),
            "size_ratio_to_single": round(info["bytes"] / exports["single block"]["bytes"], 3),
        }
        result["variants"][name] = entry
        rows.append([name, *map(str, entry.values())])
    print(table(["artifact", "blocks", "decode ms", "x single", "export s/layer", "MiB", "size x single"], rows))
    result["every_layer_ratio"] = result["variants"]["every layer"]["decode_ratio_to_single"]
    result["target_every_layer_ratio"] = 1.10
    report("export_decode", result)


if __name__ == "__main__":
    main()
