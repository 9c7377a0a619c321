"""The UE's int8 blocks against its fp32 ones: decode time of small-llama's first six layers (split 6) at two
context lengths, the two variants stepping in turn within one run, and the quality the export measured for each
cut (top-1 agreement with fp32 and KL divergence over a prefill and 16 greedy steps)."""

from __future__ import annotations

import statistics
import time

import numpy as np

from _common import report, work_export

from seam.runtime.artifact import Artifact
from seam.runtime.executor import SessionPool
from seam.runtime.shell import table
from seam.runtime.spans import Span

SPLIT, PASTS, STEPS = 6, (128, 1024), 40


def int8_artifact() -> Artifact:
    return Artifact.open(work_export("small-llama-int8", "small-llama", cuts="2,4,6,8,10", quantize_ue="int8",
                                       validate=True))


def decode_times(artifact: Artifact, past: int) -> dict[str, list[float]]:
    pool = SessionPool(artifact, threads=2)
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, artifact.manifest.dims.vocab_size, (1, past))
    runners = {}
    for variant in ("fp32", "int8"):
        runner = pool.runner(Span(0, SPLIT), variant)
        runner.reset(1)
        runner.run_in_chunks(prompt, np.ones((1, past), np.int64), np.arange(past)[None], 256)
        runners[variant] = runner
    times: dict[str, list[float]] = {variant: [] for variant in runners}
    for step in range(STEPS + 5):
        for variant, runner in runners.items():  # in turn, so that drift falls on both alike
            position = runner.past_length
            started = time.perf_counter()
            runner.run(np.array([[7]]), np.ones((1, position + 1), np.int64), np.full((1, 1), position))
            if step >= 5:  # warm-up
                times[variant].append(time.perf_counter() - started)
    return times


def main() -> None:
    artifact = int8_artifact()
    rows, speed = [], {}
    for past in PASTS:
        times = decode_times(artifact, past)
        fp32, int8 = (1e3 * statistics.median(times[variant]) for variant in ("fp32", "int8"))
        speed[str(past)] = {"fp32_ms": round(fp32, 2), "int8_ms": round(int8, 2), "ratio": round(int8 / fp32, 3)}
        rows.append([str(past), f"{fp32:.2f}", f"{int8:.2f}", f"{int8 / fp32:.2f}x"])
    print(table(["past", "fp32 ms/token", "int8 ms/token", "int8 / fp32"], rows))
    quality = [record for record in artifact.manifest.validation if record["dtype"] == "int8-ue"]
    print(table(["cut", "top-1 agreement", "KL divergence"],
                [[str(r["cut"]), f"{r['top1_agreement']:.3f}", f"{r['kl_divergence']:.2e}"] for r in quality]))
    report("ue_variant", {"model": "small-llama", "split": SPLIT, "decode": speed,
                          "quality": [{key: r[key] for key in ("cut", "top1_agreement", "kl_divergence")}
                                      for r in quality]})


if __name__ == "__main__":
    main()
