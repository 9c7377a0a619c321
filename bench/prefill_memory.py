"""The edge's peak memory for one long prefill, run in chunks against run whole: small-llama's tail (layers
6-12) takes one sequence of 512, 1024 and 2048 positions of hidden states, each configuration in a fresh server.
The edge process's resident memory is read before the prefill (VmRSS) and its peak during it (VmHWM, reset
first); the growth is set beside the working memory the edge reserves for that step (``seam.planning.memory``),
which must not be smaller."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from _common import report, small_llama_every_layer

from seam.edge_server.process import edge_server
from seam.planning.memory import step_working_bytes
from seam.runtime.artifact import DTYPE_BYTES, Artifact
from seam.runtime.protocol import PROTOCOL_VERSION, Hello, OpenSession, SessionOpened, Step, StepResult, Welcome
from seam.runtime.shell import table
from seam.runtime.transport import TransportConfig, UeSocket
from seam.runtime.replies import expect

LENGTHS = (512, 1024, 2048)
SPLIT = 6
CHUNK = 512


def status_mib(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field}")


def peak_mib(pid: int) -> float:
    return status_mib(pid, "VmHWM")


def prefill_peak(artifact: Artifact, length: int, chunk: int) -> tuple[float, float]:
    """The edge's resident MiB before one prefill of ``length`` positions, and its peak during it."""
    hidden = artifact.manifest.dims.hidden_size
    with open("/dev/null", "w") as quiet, edge_server(artifact.root, "--prefill-chunk", str(chunk), "--threads", "2",
                                                      log=quiet) as (process, address):
        socket = UeSocket(address, TransportConfig(timeout_s=300))
        expect(socket.request(Hello(PROTOCOL_VERSION, artifact.manifest.artifact_fingerprint)), Welcome)
        expect(socket.request(OpenSession("p", SPLIT, 1, {}, length + 1)), SessionOpened)
        Path(f"/proc/{process.pid}/clear_refs").write_text("5")  # the peak from here on, not loading's
        before = status_mib(process.pid, "VmRSS")
        states = np.random.default_rng(0).standard_normal((1, length, hidden)).astype(np.float32)
        step = Step("p", 0, np.ones((1, length), np.int64), np.arange(length)[None], hidden_states=states)
        expect(socket.request(step), StepResult)
        socket.close()
        return before, peak_mib(process.pid)


def reserved_mib(artifact: Artifact, length: int, chunk: int) -> float:
    """The largest chunk's working memory, as the edge reserves it: the last one, after the others' positions."""
    manifest, new = artifact.manifest, min(chunk, length)
    return step_working_bytes(manifest.dims, manifest.kv_bytes_per_token_per_layer, DTYPE_BYTES[manifest.dtype],
                              artifact.num_layers - SPLIT, 1, new, length - new) / 2**20


def main() -> None:
    artifact = Artifact.open(small_llama_every_layer())
    rows, results = [], {}
    for length in LENGTHS:
        measured = {chunk: prefill_peak(artifact, length, chunk) for chunk in (CHUNK, length)}
        (_, chunked), (_, whole) = measured[CHUNK], measured[length]
        growth = {chunk: after - before for chunk, (before, after) in measured.items()}
        reserved = {chunk: reserved_mib(artifact, length, chunk) for chunk in measured}
        results[str(length)] = {"chunked_mib": round(chunked, 1), "whole_mib": round(whole, 1),
                                "ratio": round(chunked / whole, 3),
                                "growth_mib": {str(chunk): round(growth[chunk], 1) for chunk in measured},
                                "reserved_mib": {str(chunk): round(reserved[chunk], 1) for chunk in measured}}
        rows.append([str(length), f"{whole:.0f}", f"{chunked:.0f}", f"{chunked / whole:.2f}x",
                     f"{growth[length]:.0f} / {reserved[length]:.0f}", f"{growth[CHUNK]:.0f} / {reserved[CHUNK]:.0f}"])
    print(table(["prefill positions", "peak MiB, whole", f"peak MiB, chunks of {CHUNK}", "chunked / whole",
                 "growth / reserved MiB, whole", "growth / reserved MiB, chunked"], rows))
    report("prefill_memory", {"model": "small-llama", "split": SPLIT, "chunk": CHUNK, "peak": results})


if __name__ == "__main__":
    main()
