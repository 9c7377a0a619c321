"""Shared by the benchmark scripts: host description, timing helpers and the RESULT line convention."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
WORK = ROOT / ".work"
sys.path.insert(0, str(ROOT.parent))

from seam.profiler.host import describe  # noqa: E402  (after the path is set)


def median_ms(seconds: list[float]) -> float:
    return 1e3 * statistics.median(seconds)


def report(name: str, result: dict) -> None:
    """Writes bench/results/NAME.json with the host and prints the final RESULT line."""
    RESULTS.mkdir(exist_ok=True)
    payload = {"benchmark": name, "host": describe(), **result}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    print("RESULT " + json.dumps(result))


def timed(paths: dict, steps: int) -> dict[str, float]:
    """Median milliseconds of each path, the paths stepping in turn."""
    import time

    times = {name: [] for name in paths}
    for index in range(steps + 3):
        for name, step in paths.items():
            started = time.perf_counter()
            step()
            if index >= 3:
                times[name].append(time.perf_counter() - started)
    return {name: 1e3 * statistics.median(values) for name, values in times.items()}


def seam_decode_step(artifact, past: int, threads: int, merge: bool = True):
    """A decode step at ``past`` through every layer of ``artifact`` in one process, rewound after each call:
    shared buffers by their length, a concat cache by its arrays (copying nothing either way). ``merge``: its
    blocks joined into one graph, as a running span is."""
    import numpy as np

    from seam.runtime.executor import SessionPool
    from seam.runtime.spans import Span

    runner = SessionPool(artifact, threads, merge=merge).runner(Span(0, artifact.num_layers))
    runner.join_blocks(wait=True)  # as a running generation soon does: timed from the first step
    runner.reset(1)
    prompt = np.random.default_rng(0).integers(3, min(1000, artifact.manifest.dims.vocab_size), (1, past))
    runner.run_in_chunks(prompt, np.ones((1, past), np.int64), np.arange(past)[None], 256)
    cache = dict(runner.cache)
    mask, position = np.ones((1, past + 1), np.int64), np.array([[past]])

    def step() -> None:
        if runner.buffers is not None:
            runner.buffers.length = past
        else:
            runner.cache = dict(cache)
        runner.run(np.array([[42]]), mask, position)
    return step


def torch_decode_step(model, past: int):
    """A decode step at ``past`` in transformers' eager PyTorch, its cache rewound after each call."""
    import numpy as np
    import torch
    from transformers import DynamicCache

    ids = torch.from_numpy(np.random.default_rng(0).integers(3, min(1000, model.config.vocab_size), (1, past)))
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


def work_export(name: str, model: str, **options) -> Path:
    """``model`` exported into the benchmarks' scratch directory ``name``, unvalidated unless ``options`` say
    otherwise (a no-op once exported).
    An export there from other arguments or an older Seam is the benchmarks' own, and is replaced with what
    profiles they wrote into it."""
    import shutil

    from seam.export.exporter import ExportRequest, export
    from seam.runtime.errors import SeamError

    out = WORK / name
    request = ExportRequest(model=model, out=out, **{"validate": False, "quiet": True, **options})
    try:
        export(request)
    except SeamError:
        shutil.rmtree(out, ignore_errors=True)
        export(request)
    return out


def small_llama_every_layer(kv_layout: str | None = None, dtype: str = "fp32"):
    """small-llama exported at every cut (shared by the benchmarks)."""
    name = "small-llama-cuts-all" + (f"-{kv_layout}" if kv_layout else "") + ("" if dtype == "fp32" else f"-{dtype}")
    return work_export(name, "small-llama", cuts="all", kv_layout=kv_layout, dtype=dtype)


def real_model_every_layer():
    """SmolLM2-135M-Instruct, from its packaged GGUF, exported at every cut."""
    return work_export("smollm2-cuts-all", "smollm2-135m-instruct")


def trained_llama():
    """The trained preset (trained on first use, about three minutes; a no-op afterwards)."""
    return work_export("trained-llama", "trained-llama")


def profiled_pair(out: Path, ue_slowdown: float):
    """Cost models of the artifact at ``out`` for the benchmarks' two sides, profiled once and cached with it:
    the edge on two threads, the UE on one thread pinned to CPU 0 and ``ue_slowdown`` times slower."""
    import subprocess

    from seam.planning.cost_model import DeviceModel
    from seam.planning.loading import profile_key
    from seam.planning.schema import DeviceProfile, load
    from seam.runtime.artifact import Artifact

    artifact = Artifact.open(out)
    models = {}
    for side, options in (("edge", ["--threads", "2"]), ("ue", ["--threads", "1", "--cpus", "0"])):
        subprocess.run([sys.executable, "-m", "seam.cli", "profile", str(out), "--quiet", *options], check=True,
                       capture_output=True)
        key = profile_key(artifact, "cpu", int(options[1]), artifact.manifest.dtype)
        measured = load(out / "profiles" / key.file_name(), DeviceProfile)
        models[side] = DeviceModel.from_profile(measured.slowed(ue_slowdown) if side == "ue" else measured)
    return models["ue"], models["edge"]
