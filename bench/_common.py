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

from profiler.host import describe  # noqa: E402  (after the path is set)


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
    from export.exporter import ExportRequest, export

    out = WORK / "small-llama-cuts-all"
    export(ExportRequest(model="small-llama", out=out, cuts="all", validate=False, quiet=True))
    return out
