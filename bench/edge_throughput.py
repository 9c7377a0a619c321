"""Total edge throughput (decode tokens per second) with 1, 4 and 16 concurrent UEs, with and without batching.

UEs are threads that send prepared hidden states for small-llama's tail (split in the middle), so the edge alone
is measured: the UEs do no compute. Each UE prefills a prompt, then sends decode steps as fast as the edge
answers. Both servers (batching on and off) run side by side and the configurations are interleaved per round.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import uuid

import numpy as np

from _common import report, small_llama_every_layer

from seam.edge_server.process import edge_server
from seam.runtime.shell import table
from seam.runtime.artifact import Artifact
from seam.runtime.protocol import PROTOCOL_VERSION, Close, Hello, OpenSession, SessionOpened, Step, StepResult, Welcome
from seam.runtime.transport import TransportConfig, UeSocket
from seam.runtime.replies import expect


def one_ue(index: int, address: str, artifact: Artifact, split: int, prompt_length: int, steps: int,
           start: threading.Barrier, finished: list[float], errors: list[BaseException]) -> None:
    try:
        socket = UeSocket(address, TransportConfig(timeout_s=120))
        hidden = artifact.manifest.dims.hidden_size
        rng = np.random.default_rng(index)
        expect(socket.request(Hello(PROTOCOL_VERSION, artifact.manifest.artifact_fingerprint)), Welcome)
        session = uuid.uuid4().hex
        expect(socket.request(OpenSession(session, split, 1, {}, prompt_length + steps + 1)), SessionOpened)
        mask = np.ones((1, prompt_length), np.int64)
        prompt = rng.standard_normal((1, prompt_length, hidden)).astype(np.float32)
        expect(socket.request(Step(session, 0, mask, np.arange(prompt_length)[None], hidden_states=prompt)), StepResult)
        start.wait(timeout=120)
        for step in range(1, steps + 1):
            mask = np.ones((1, 1), np.int64)  # the new position's column: the edge holds the rest
            position = np.array([[prompt_length + step - 1]])
            state = rng.standard_normal((1, 1, hidden)).astype(np.float32)
            expect(socket.request(Step(session, step, mask, position, hidden_states=state)), StepResult)
        finished.append(time.perf_counter())
        socket.request(Close(session))
        socket.close()
    except BaseException as error:  # reported by the main thread
        errors.append(error)
        start.abort()


def tokens_per_second(address: str, artifact: Artifact, split: int, ues: int, prompt_length: int, steps: int) -> float:
    start = threading.Barrier(ues + 1)
    finished: list[float] = []
    errors: list[BaseException] = []
    threads = [
        threading.Thread(
            target=one_ue, args=(index, address, artifact, split, prompt_length, steps, start, finished, errors)
        )
        for index in range(ues)
    ]
    for thread in threads:
        thread.start()
    start.wait(timeout=300)
    began = time.perf_counter()
    for thread in threads:
        thread.join(timeout=600)
    if errors:
        raise SystemExit(f"a UE failed: {errors[0]}")
    return ues * steps / (max(finished) - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ues", default="1,4,16")
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=24, help="decode steps per UE")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    counts = [int(count) for count in args.ues.split(",")]

    artifact = Artifact.open(small_llama_every_layer())
    split = artifact.num_layers // 2
    modes = {"batched": (), "one at a time": ("--no-batching",)}
    samples = {(mode, count): [] for mode in modes for count in counts}
    with open("/dev/null", "w") as quiet, \
            edge_server(artifact.root, "--device", args.device, log=quiet) as (_, batched_address), \
            edge_server(artifact.root, "--device", args.device, "--no-batching", log=quiet) as (_, single_address):
        addresses = {"batched": batched_address, "one at a time": single_address}
        tokens_per_second(batched_address, artifact, split, 2, args.prompt_length, 4)  # warm-up
        tokens_per_second(single_address, artifact, split, 2, args.prompt_length, 4)
        for _ in range(args.rounds):
            for count in counts:
                for mode, address in addresses.items():
                    rate = tokens_per_second(address, artifact, split, count, args.prompt_length, args.steps)
                    samples[(mode, count)].append(rate)

    rows, result = [], {"model": artifact.manifest.source, "split": split, "device": args.device,
                        "prompt_length": args.prompt_length, "steps_per_ue": args.steps, "rounds": args.rounds,
                        "tokens_per_second": {}}
    for count in counts:
        batched = statistics.median(samples[("batched", count)])
        single = statistics.median(samples[("one at a time", count)])
        gain = statistics.median(b / s for b, s in zip(samples[("batched", count)], samples[("one at a time", count)]))
        result["tokens_per_second"][str(count)] = {
            "batched": round(batched, 1), "one_at_a_time": round(single, 1), "batched_ratio": round(gain, 3),
        }
        rows.append([str(count), f"{batched:.1f}", f"{single:.1f}", f"{gain:.2f}x"])
    print(table(["UEs", "tokens/s batched", "tokens/s one at a time", "batched / one at a time"], rows))
    report(f"edge_throughput_{args.device}", result)


if __name__ == "__main__":
    main()
