"""Per-token decode latency of small-llama split in the middle: edge_server + ue_client over loopback, against
the same blocks chained in one process, and against a raw ZeroMQ round trip of the same bytes.

The three are measured in one run, interleaved round by round so machine drift hits each alike. The split path
pays UE compute + round trip + edge compute; the in-process chain pays the compute alone; the raw round trip is a
bare echo of the same frames, so split − in-process − raw is what Seam's own messaging adds per token. The raw
round trip is measured back to back and paced (each preceded by a busy wait as long as the UE's compute), since
on a small machine a round trip that follows computation costs more than one that follows another round trip.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time

import numpy as np

from _common import median_ms, report, small_llama_every_layer

from seam.edge_server.process import edge_server
from seam.runtime.shell import table
from seam.runtime.artifact import Artifact
from seam.runtime.executor import SessionPool
from seam.runtime.generation import LocalSplit, generate
from seam.runtime.protocol import Step, StepResult, encode
from seam.runtime.transport import EdgeSocket, TransportConfig, UeSocket
from seam.ue_client.client import EdgeClient


def echo(address_out, stop, reply_frames: list[bytes]) -> None:
    """A bare ROUTER that answers every request with ``reply_frames``: the floor any transport pays."""
    socket = EdgeSocket("tcp://127.0.0.1:0", TransportConfig())
    address_out.send(socket.address)
    while not stop.is_set():
        received = socket.receive(timeout_s=0.2)
        if received is not None:
            socket.socket.send_multipart([received[0], *reply_frames], copy=False)
    socket.close()


def busy_wait(seconds: float) -> None:
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        pass


def raw_round_trips(socket: UeSocket, frames: list[bytes], count: int, pace_s: float) -> list[float]:
    durations = []
    for _ in range(count):
        busy_wait(pace_s)
        started = time.perf_counter()
        socket.socket.send_multipart(frames, copy=False)
        if not socket.socket.poll(10_000):
            raise SystemExit("the echo server did not answer")
        socket.socket.recv_multipart(copy=False)
        durations.append(time.perf_counter() - started)
    return durations


def step_durations(arrivals: list[float]) -> list[float]:
    return [later - earlier for earlier, later in zip(arrivals, arrivals[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    artifact = Artifact.open(small_llama_every_layer())
    split = artifact.num_layers // 2
    hidden = artifact.manifest.dims.hidden_size
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, artifact.manifest.dims.vocab_size, size=args.prompt_length).tolist()
    pad = artifact.manifest.tokenizer["pad_token_id"]
    local = LocalSplit(SessionPool(artifact), split)

    # The raw round trip carries a decode step's request and reply at mid-generation size.
    past = args.prompt_length + args.new_tokens // 2
    request = encode(Step("s", 0, np.ones((1, 1), np.int64), np.array([[past]]),
                          hidden_states=np.zeros((1, 1, hidden), np.float32)))
    request_bytes = [bytes(frame) for frame in request]
    reply = [bytes(frame) for frame in encode(StepResult("s", 0, 0.001, np.zeros(1, np.int64)))]
    spawn = multiprocessing.get_context("spawn")
    receive_address, send_address = spawn.Pipe(duplex=False)
    stop = spawn.Event()
    echoer = spawn.Process(target=echo, args=(send_address, stop, reply), daemon=True)
    echoer.start()
    raw = UeSocket(receive_address.recv(), TransportConfig(timeout_s=10))

    samples = {"in-process": [], "split": [], "raw round trip": [], "raw round trip, paced": []}
    pace_s = 0.008
    parts = {"ue_s": [], "network_s": [], "edge_s": []}
    with open("/dev/null", "w") as quiet, edge_server(artifact.root, log=quiet) as (_, address):
        with EdgeClient(artifact, address) as client:
            for round_index in range(args.rounds + 1):  # the first round warms every path up
                arrivals = []
                for _ in generate(local, [prompt], args.new_tokens, pad):
                    arrivals.append(time.perf_counter())
                in_process = step_durations(arrivals)

                with client.session(split) as session:
                    for _ in session.generate([prompt], args.new_tokens):
                        pass
                split_steps = step_durations(session.stats.arrivals)

                pace_s = session.stats.decode_medians_ms()["ue_s"] / 1e3
                back_to_back = raw_round_trips(raw, request_bytes, args.new_tokens, 0.0)
                paced = raw_round_trips(raw, request_bytes, args.new_tokens, pace_s)

                if round_index == 0:
                    continue
                samples["in-process"].append(median_ms(in_process))
                samples["split"].append(median_ms(split_steps))
                samples["raw round trip"].append(median_ms(back_to_back))
                samples["raw round trip, paced"].append(median_ms(paced))
                for part in parts:
                    parts[part].append(session.stats.decode_medians_ms()[part])
    stop.set()
    echoer.join(timeout=10)
    raw.close()

    median = {name: statistics.median(values) for name, values in samples.items()}
    ratio = statistics.median(s / i for s, i in zip(samples["split"], samples["in-process"]))
    above_raw = {
        name: statistics.median(s - i - r for s, i, r in zip(samples["split"], samples["in-process"], samples[name]))
        for name in ("raw round trip", "raw round trip, paced")
    }
    breakdown = {part: round(statistics.median(values), 3) for part, values in parts.items()}
    print(table(
        ["path", "ms per token (median of rounds)"],
        [[name, f"{value:.3f}"] for name, value in median.items()],
    ))
    print(f"split / in-process: {ratio:.3f}x (target <= 1.15)")
    for name, value in above_raw.items():
        print(f"split - in-process - {name}: {value:.3f} ms per token (target <= 0.3)")
    print("split breakdown (median ms): " + ", ".join(f"{k} {v}" for k, v in breakdown.items()))
    report("split_latency", {
        "model": artifact.manifest.source,
        "split": split,
        "prompt_length": args.prompt_length,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "request_bytes": sum(len(frame) for frame in request_bytes),
        "reply_bytes": sum(len(frame) for frame in reply),
        "ms_per_token": {name: round(value, 3) for name, value in median.items()},
        "split_breakdown_ms": breakdown,
        "split_to_in_process_ratio": round(ratio, 3),
        "target_ratio": 1.15,
        "above_raw_round_trip_ms": {name: round(value, 3) for name, value in above_raw.items()},
        "target_above_raw_ms": 0.3,
    })


if __name__ == "__main__":
    main()
