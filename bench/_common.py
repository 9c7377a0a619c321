"""Shared by the benchmark scripts: host description, timing helpers and the RESULT line convention."""

from __future__ import annotations

import json
import platform
import statistics
import sys
from pathlib import Path

import onnxruntime
import psutil

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
WORK = ROOT / ".work"
sys.path.insert(0, str(ROOT.parent))


def host() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cores": psutil.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "providers": onnxruntime.get_available_providers(),
    }


def median_ms(seconds: list[float]) -> float:
    return 1e3 * statistics.median(seconds)


def report(name: str, result: dict) -> None:
    """Writes bench/results/NAME.json with the host and prints the final RESULT line."""
    RESULTS.mkdir(exist_ok=True)
    payload = {"benchmark": name, "host": host(), **result}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    print("RESULT " + json.dumps(result))


def small_llama_every_layer():
    """small-llama exported at every cut (shared by the benchmarks; a no-op once exported)."""
    from export.exporter import ExportRequest, export

    out = WORK / "small-llama-cuts-all"
    export(ExportRequest(model="small-llama", out=out, cuts="all", validate=False, quiet=True))
    return out
