"""The edge's peak memory for one long prefill, run in chunks against run whole: small-llama's tail (layers
6-12) takes one sequence of 512, 1024 and 2048 positions of hidden states, and the edge process's peak resident
memory (VmHWM) is read after it, each configuration in a fresh server."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from _common import report, small_llama_every_layer

from seam.edge_server.process import edge_server
from seam.runtime.artifact import Artifact
from seam.runtime.protocol import PROTOCOL_VERSION, Hello, OpenSession, SessionOpened, Step, StepResult, Welcome
from seam.runtime.shell import table
from seam.runtime.transport import TransportConfig, UeSocket
from seam.ue_client.connection import expect

LENGTHS = (512, 1024, 2048)


def peak_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def prefill_peak(artifact: Artifact, length: int, chunk: int) -> float:
    hidden = artifact.manifest.dims.hidden_size
    with open("/dev/null", "w") as quiet, edge_server(artifact.root, "--prefill-chunk", str(chunk), "--threads", "2",
                                                      log=quiet) as (process, address):
        socket = UeSocket(address, TransportConfig(timeout_s=300))
        expect(socket.request(Hello(PROTOCOL_VERSION, artifact.manifest.artifact_fingerprint)), Welcome)
        expect(socket.request(OpenSession("p", 6, 1, {}, length + 1)), SessionOpened)
        states = np.random.default_rng(0).standard_normal((1, length, hidden)).astype(np.float32)
        step = Step("p", 0, np.ones((1, length), np.int64), np.arange(length)[None], hidden_states=states)
        expect(socket.request(step), StepResult)
        socket.close()
        return peak_mib(process.pid)


def main() -> None:
    artifact = Artifact.open(small_llama_every_layer())
    rows, results = [], {}
    for length in LENGTHS:
        chunked, whole = prefill_peak(artifact, length, 512), prefill_peak(artifact, length, length)
        results[str(length)] = {"chunked_mib": round(chunked, 1), "whole_mib": round(whole, 1),
                                "ratio": round(chunked / whole, 3)}
        rows.append([str(length), f"{whole:.0f}", f"{chunked:.0f}", f"{chunked / whole:.2f}x"])
    print(table(["prefill positions", "peak MiB, whole", "peak MiB, chunks of 512", "chunked / whole"], rows))
    report("prefill_memory", {"model": "small-llama", "split": 6, "chunk": 512, "peak": results})


if __name__ == "__main__":
    main()
