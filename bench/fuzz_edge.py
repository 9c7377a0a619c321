"""A hostile UE against a live edge_server on loopback: seeded fuzz inputs of every kind, then the legitimate
sessions that must come through unchanged.

Inputs: random bytes; JSON headers of any shape (nested, huge numbers, wrong types, control characters);
mutated valid messages (a byte flipped, frames dropped or duplicated); and valid messages with hostile values
(NaN hidden states, masks of 2, positions of 2**62, unknown sessions, sampling parameters of the wrong type).
Reports the inputs sent, the replies that were not a message (0 expected), whether the server survived, its RSS
before and after, and how long it took; the baseline is the same legitimate generation before the fuzz, whose
tokens must be identical after it.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import numpy as np
import psutil

from _common import report, work_export

from seam.edge_server.process import edge_server
from seam.runtime.artifact import Artifact
from seam.runtime.protocol import (PROTOCOL_VERSION, Hello, OpenSession, ProtocolError, Step, Welcome, decode,
                                   encode)
from seam.runtime.shell import table
from seam.runtime.transport import TransportConfig, UeSocket
from seam.ue_client.client import EdgeClient

KINDS = ["hello", "open", "step", "resplit", "close", "ping", "train_forward", "bogus"]


def json_value(rng: random.Random, depth: int = 0):
    pick = rng.random()
    if depth > 3 or pick < 0.5:
        return rng.choice([None, True, -1, 0, 1, 2**62, 10**30, 1.5, float("1e308"), "", "s", "a\nb", "int64",
                           "float32", [], {}])
    if pick < 0.75:
        return [json_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(["session_id", "step", "split", "nonce", "name", "dtype", "shape", "x"]):
            json_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def hostile_valid(rng: random.Random, session: str) -> list[bytes]:
    """A well-formed message with a value that must be refused."""
    hidden = np.zeros((1, 1, 64), np.float32)
    choice = rng.randrange(5)
    if choice == 0:
        hidden[0, 0, rng.randrange(64)] = np.nan
    mask = np.full((1, 1), 2 if choice == 1 else 1, np.int64)
    positions = np.full((1, 1), 2**62 if choice == 2 else 3, np.int64)
    target = session if choice != 3 else "nobody"
    if choice == 4:
        return [bytes(f) for f in encode(OpenSession("x", 2, 1, {"temperature": "hot"}, 8))]
    return [bytes(f) for f in encode(Step(target, rng.randrange(3), mask, positions, hidden_states=hidden))]


def fuzz_input(rng: random.Random, valid: list[list[bytes]], session: str) -> list[bytes]:
    kind = rng.randrange(4)
    if kind == 0:
        return [rng.randbytes(rng.randint(0, 64)) for _ in range(rng.randint(1, 3))]
    if kind == 1:
        header = {"kind": rng.choice(KINDS + [json_value(rng)]), "fields": json_value(rng),
                  "tensors": [json_value(rng) for _ in range(rng.randint(0, 2))]}
        if rng.random() < 0.05:
            return [b"[" * rng.randint(1000, 100_000)]
        return [json.dumps(header).encode(), *[rng.randbytes(rng.randint(0, 16)) for _ in range(rng.randint(0, 2))]]
    if kind == 2:
        frames = [bytearray(frame) for frame in rng.choice(valid)]
        frame = rng.choice(frames)
        if frame:
            frame[rng.randrange(len(frame))] = rng.randrange(256)
        if rng.random() < 0.3:
            frames = frames[:-1] if len(frames) > 1 else frames * 2
        return [bytes(frame) for frame in frames]
    return hostile_valid(rng, session)


def generate(artifact: Artifact, address: str) -> list[list[int]]:
    with EdgeClient(artifact, address) as client, client.session(2) as session:
        return [tokens.tolist() for tokens in session.generate([[5, 6, 7], [8, 9]], 12)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--inputs", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    artifact = Artifact.open(work_export("tiny-llama", "tiny-llama"))
    rng = random.Random(args.seed)
    with open("/dev/null", "w") as quiet, edge_server(out, "--max-length", "64", log=quiet) as (process, address):
        before_tokens = generate(artifact, address)
        server = psutil.Process(process.pid)
        rss_before = server.memory_info().rss
        socket = UeSocket(address, TransportConfig(timeout_s=10))
        assert isinstance(socket.request(Hello(PROTOCOL_VERSION, artifact.manifest.artifact_fingerprint)), Welcome)
        socket.request(OpenSession("fuzz", 2, 1, {}, 64))
        valid = [[bytes(f) for f in encode(message)] for message in (
            Hello(PROTOCOL_VERSION, artifact.manifest.artifact_fingerprint), OpenSession("v", 2, 1, {}, 8),
            Step("fuzz", 0, np.ones((1, 3), np.int64), np.arange(3)[None], hidden_states=np.zeros((1, 3, 64),
                                                                                                  np.float32)))]
        not_a_message, started = 0, time.perf_counter()
        for _ in range(args.inputs):
            reply = socket.exchange(fuzz_input(rng, valid, "fuzz"), 10)
            try:
                decode(reply)
            except ProtocolError:
                not_a_message += 1
        seconds = time.perf_counter() - started
        survived = process.poll() is None
        rss_after = server.memory_info().rss if survived else 0
        after_tokens = generate(artifact, address) if survived else None
        socket.close()
    unchanged = after_tokens == before_tokens
    print(table(["inputs", "replies not a message", "server survived", "RSS before MiB", "RSS after MiB",
                 "inputs/s", "legitimate tokens unchanged"],
                [[str(args.inputs), str(not_a_message), str(survived), f"{rss_before / 2**20:.1f}",
                  f"{rss_after / 2**20:.1f}", f"{args.inputs / seconds:.0f}", str(unchanged)]]))
    report("fuzz_edge", {"inputs": args.inputs, "seed": args.seed, "replies_not_a_message": not_a_message,
                         "server_survived": survived, "rss_before_mib": round(rss_before / 2**20, 1),
                         "rss_after_mib": round(rss_after / 2**20, 1), "seconds": round(seconds, 1),
                         "legitimate_tokens_unchanged": unchanged})


if __name__ == "__main__":
    main()
