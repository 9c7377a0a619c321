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


def small_llama_every_layer():
    """small-llama exported at every cut (shared by the benchmarks; a no-op once exported)."""
    from seam.export.exporter import ExportRequest, export

    out = WORK / "small-llama-cuts-all"
    export(ExportRequest(model="small-llama", out=out, cuts="all", validate=False, quiet=True))
    return out


def real_model_every_layer():
    """SmolLM2-135M-Instruct, from its packaged GGUF, exported at every cut (a no-op once exported)."""
    from seam.export.exporter import ExportRequest, export

    out = WORK / "smollm2-cuts-all"
    export(ExportRequest(model="smollm2-135m-instruct", out=out, validate=False, quiet=True))
    return out


def trained_llama():
    """The trained preset (trained on first use, about three minutes; a no-op afterwards)."""
    from seam.export.exporter import ExportRequest, export

    out = WORK / "trained-llama"
    export(ExportRequest(model="trained-llama", out=out, validate=False, quiet=True))
    return out


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
