"""A fleet of edge servers: how long a session stalls when its edge dies, and throughput over one to three edges.

Recovery (small-llama, every cut, split 2, a UE emulated 4x slower, greedy): a session generates with three
edges listed; its edge is killed (SIGKILL) after ``--kill-after`` tokens. Side by side in the same run, for the
same prompt and the same kill:
- failover: the session goes on at the next best edge, which rebuilds its cache from the hidden states the UE
  kept (one pass) and continues; tokens unchanged;
- replay: what a client without kept state does: the generation started again on another edge from the prompt,
  until it is back at the lost token;
- fallback: the UE alone rebuilds every layer from the tokens and finishes on the device.
Reported per way, the median stall (from the last token before the kill to the next) over the median per-token
time before it, and failover's ratio to each baseline.

Throughput: ``--ues`` UE threads, each choosing its edge with the fleet's own choice (``greet_best`` over the
edges' reported load), send decode steps of prepared hidden states as fast as their edge answers, so that the
edges alone are measured; one, two and three edges of one thread each, interleaved per round. On a machine with
fewer cores than edges the edges share them, which bounds what more edges can add.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import uuid
from contextlib import ExitStack

import numpy as np
from _common import report, small_llama_every_layer

from seam.edge_server.process import edge_server
from seam.runtime.artifact import Artifact
from seam.runtime.emulation import connect
from seam.runtime.protocol import PROTOCOL_VERSION, Close, Hello, OpenSession, SessionOpened, Step, StepResult
from seam.runtime.replies import expect
from seam.runtime.sampling import SamplingParams
from seam.runtime.shell import table
from seam.runtime.transport import TransportConfig
from seam.ue_client.client import EdgeClient
from seam.ue_client.fleet import greet_best

SPLIT = 2
SLOWDOWN = 4.0


def fleet(stack: ExitStack, artifact: Artifact, count: int) -> dict:
    quiet = stack.enter_context(open("/dev/null", "w"))
    started = [stack.enter_context(edge_server(artifact.root, "--threads", "1", log=quiet)) for _ in range(count)]
    return {address: process for process, address in started}


def stall(arrivals: list[float], before: int) -> tuple[float, float]:
    """(the gap after token ``before``, the median gap before it), seconds."""
    gaps = np.diff(arrivals)
    return float(gaps[before - 1]), float(np.median(gaps[: before - 1]))


def recover(artifact: Artifact, prompt: list[int], tokens: int, kill_after: int, edges: int, fallback: bool):
    """One generation whose edge is killed after ``kill_after`` tokens: (stall s, per-token s, tokens)."""
    with ExitStack() as stack:
        processes = fleet(stack, artifact, edges)
        client = stack.enter_context(EdgeClient(artifact, ",".join(processes), TransportConfig(timeout_s=10),
                                                threads=1, ue_slowdown=SLOWDOWN))
        session = client.session(SPLIT, SamplingParams(), fallback_local=fallback)
        produced = []
        for step_tokens in session.generate([prompt], tokens):
            produced.append(int(step_tokens[0]))
            if len(produced) == kill_after:
                processes[client.server].kill()
                processes[client.server].wait()
        gap, per_token = stall(session.stats.arrivals, kill_after)
    return gap, per_token, produced


def replay(artifact: Artifact, prompt: list[int], kill_after: int) -> float:
    """Seconds for a fresh session on a running edge to be back at the token after ``kill_after``."""
    with ExitStack() as stack:
        (address,) = fleet(stack, artifact, 1)
        client = stack.enter_context(EdgeClient(artifact, address, threads=1, ue_slowdown=SLOWDOWN))
        with client.session(SPLIT) as session:
            started = time.perf_counter()
            for _ in session.generate([prompt], kill_after + 1):
                pass
            return session.stats.arrivals[-1] - started


def one_ue(index: int, addresses: list[str], artifact: Artifact, steps: int, start: threading.Barrier,
           done: list, errors: list) -> None:
    try:
        hello = Hello(PROTOCOL_VERSION, artifact.manifest.artifact_fingerprint)
        greeted = greet_best(addresses, lambda a: connect(a, TransportConfig(timeout_s=120)), hello, 30,
                             chooser=str(index))
        socket, session, hidden = greeted.socket, uuid.uuid4().hex, artifact.manifest.dims.hidden_size
        rng, prompt_length = np.random.default_rng(index), 32
        expect(socket.request(OpenSession(session, SPLIT, 1, {}, prompt_length + steps + 1)), SessionOpened)
        prompt = rng.standard_normal((1, prompt_length, hidden)).astype(np.float32)
        ones = np.ones((1, prompt_length), np.int64)
        expect(socket.request(Step(session, 0, ones, np.arange(prompt_length)[None], hidden_states=prompt)),
               StepResult)
        start.wait(timeout=120)
        for step in range(1, steps + 1):
            state = rng.standard_normal((1, 1, hidden)).astype(np.float32)
            position = np.array([[prompt_length + step - 1]])
            expect(socket.request(Step(session, step, np.ones((1, 1), np.int64), position, hidden_states=state)),
                   StepResult)
        done.append((time.perf_counter(), greeted.offer.address))
        socket.request(Close(session))
        socket.close()
    except BaseException as error:  # reported by the main thread
        errors.append(error)
        start.abort()


def throughput(artifact: Artifact, addresses: list[str], ues: int, steps: int) -> tuple[float, list[int]]:
    """Decode tokens per second of ``ues`` UEs over the edges at ``addresses``, and the UEs per edge."""
    start, done, errors = threading.Barrier(ues + 1), [], []
    threads = []
    for index in range(ues):  # one after another, as UEs arrive: each sees the sessions opened before it
        thread = threading.Thread(target=one_ue, args=(index, addresses, artifact, steps, start, done, errors))
        thread.start()
        threads.append(thread)
        time.sleep(0.05)
    start.wait(timeout=120)
    began = time.perf_counter()
    for thread in threads:
        thread.join(timeout=600)
    if errors:
        raise errors[0]
    spread = [sum(address == edge for _, address in done) for edge in addresses]
    return ues * steps / (max(at for at, _ in done) - began), spread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompt-length", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--kill-after", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ues", type=int, default=12)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    artifact = Artifact.open(small_llama_every_layer())
    prompt = [int(t) for t in np.random.default_rng(0).integers(5, artifact.manifest.dims.vocab_size, args.prompt_length)]

    ways = {"failover": [], "replay": [], "fallback": []}
    per_token, outputs = [], []
    for _ in range(args.repeats):
        gap, token_s, produced = recover(artifact, prompt, args.tokens, args.kill_after, 3, fallback=False)
        ways["failover"].append(gap)
        per_token.append(token_s)
        outputs.append(produced)
        ways["replay"].append(replay(artifact, prompt, args.kill_after))
        gap, _, produced = recover(artifact, prompt, args.tokens, args.kill_after, 1, fallback=True)
        ways["fallback"].append(gap)
        outputs.append(produced)
    assert all(output == outputs[0] for output in outputs), "a recovered generation changed its tokens"
    token_ms = 1e3 * statistics.median(per_token)
    medians = {way: 1e3 * statistics.median(values) for way, values in ways.items()}
    print(table(["recovery", "stall ms", "in per-token times", "failover vs this"],
                [[way, f"{ms:.1f}", f"{ms / token_ms:.1f}", f"{medians['failover'] / ms:.3f}"]
                 for way, ms in medians.items()]))
    print(f"per-token time before the kill: {token_ms:.2f} ms (context {args.prompt_length}, kill after "
          f"{args.kill_after} tokens)")

    rates: dict[int, list[float]] = {1: [], 2: [], 3: []}
    spreads: dict[int, list[int]] = {}
    with ExitStack() as stack:
        addresses = list(fleet(stack, artifact, 3))
        for _ in range(args.rounds):
            for count in rates:
                rate, spreads[count] = throughput(artifact, addresses[:count], args.ues, args.steps)
                rates[count].append(rate)
    tokens_s = {count: statistics.median(values) for count, values in rates.items()}
    print(table(["edges", "tokens/s", "vs one edge", "UEs per edge"],
                [[str(c), f"{r:.1f}", f"{r / tokens_s[1]:.2f}", "/".join(map(str, spreads[c]))]
                 for c, r in tokens_s.items()]))
    report("fleet", {
        "prompt_length": args.prompt_length, "kill_after": args.kill_after, "repeats": args.repeats,
        "per_token_ms": round(token_ms, 3), "stall_ms": {w: round(m, 1) for w, m in medians.items()},
        "stall_in_tokens": {w: round(m / token_ms, 2) for w, m in medians.items()},
        "failover_vs": {w: round(medians["failover"] / m, 3) for w, m in medians.items()},
        "ues": args.ues, "steps": args.steps, "tokens_per_s": {str(c): round(r, 1) for c, r in tokens_s.items()},
        "vs_one_edge": {str(c): round(r / tokens_s[1], 3) for c, r in tokens_s.items()},
        "ues_per_edge": {str(c): s for c, s in spreads.items()}})


if __name__ == "__main__":
    main()
