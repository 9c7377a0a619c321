"""Total edge throughput (decode tokens per second) with 1 to 64 concurrent UEs, with and without batching, in
both KV layouts, against what these cores compute for the same batch in one process.

UEs are threads that send prepared hidden states for small-llama's tail (split in the middle), so the edge alone
is measured: the UEs do no compute. Each UE prefills a prompt, then sends decode steps as fast as the edge
answers. The servers (batching on and off, for each layout) run side by side and the configurations are
interleaved per round. The ceiling is the same tail stepping the same number of sequences as one batch in this
process, with no sockets, no messages and no sessions: what the graphs cost at that batch.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import threading
import time
import uuid

import numpy as np

from _common import report, small_llama_every_layer

from seam.edge_server.process import edge_server
from seam.runtime.shell import table
from seam.runtime.artifact import NUMPY_DTYPES, Artifact
from seam.runtime.batching import run_together
from seam.runtime.executor import SessionPool
from seam.runtime.protocol import PROTOCOL_VERSION, Close, Hello, OpenSession, SessionOpened, Step, StepResult, Welcome
from seam.runtime.spans import Span
from seam.runtime.transport import TransportConfig, UeSocket
from seam.runtime.replies import expect


def one_ue(index: int, address: str, artifact: Artifact, split: int, prompt_length: int, steps: int,
           start: threading.Barrier, finished: list[float], errors: list[BaseException]) -> None:
    try:
        socket = UeSocket(address, TransportConfig(timeout_s=120))
        hidden, dtype = artifact.manifest.dims.hidden_size, NUMPY_DTYPES[artifact.manifest.dtype]
        rng = np.random.default_rng(index)
        expect(socket.request(Hello(PROTOCOL_VERSION, artifact.manifest.artifact_fingerprint)), Welcome)
        session = uuid.uuid4().hex
        expect(socket.request(OpenSession(session, split, 1, {}, prompt_length + steps + 1)), SessionOpened)
        mask = np.ones((1, prompt_length), np.int64)
        prompt = rng.standard_normal((1, prompt_length, hidden)).astype(dtype)
        expect(socket.request(Step(session, 0, mask, np.arange(prompt_length)[None], hidden_states=prompt)), StepResult)
        start.wait(timeout=120)
        for step in range(1, steps + 1):
            mask = np.ones((1, 1), np.int64)  # the new position's column: the edge holds the rest
            position = np.array([[prompt_length + step - 1]])
            state = rng.standard_normal((1, 1, hidden)).astype(dtype)
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


def ceiling(artifact: Artifact, split: int, ues: int, prompt_length: int, steps: int, device: str) -> float:
    """Tokens per second of ``ues`` sequences decoding as one batch in this process (rows of one arena in the
    shared-buffer layout) on ``device``, each after a prompt of ``prompt_length``."""
    pool = SessionPool(artifact, device=device, shared_rows=True)
    span, hidden = Span(split, artifact.num_layers), artifact.manifest.dims.hidden_size
    dtype = NUMPY_DTYPES[artifact.manifest.dtype]
    rng = np.random.default_rng(0)
    runners = []
    for _ in range(ues):
        runner = pool.runner(span)
        runner.reset(1)
        runner.run(rng.standard_normal((1, prompt_length, hidden)).astype(dtype),
                   np.ones((1, prompt_length), np.int64), np.arange(prompt_length)[None])
        runners.append(runner)
    began = time.perf_counter()
    for step in range(steps):
        past = prompt_length + step
        run_together(runners, [rng.standard_normal((1, 1, hidden)).astype(dtype) for _ in runners],
                     [np.ones((1, past + 1), np.int64)] * ues, [np.array([[past]])] * ues)
    return ues * steps / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ues", default="1,4,16,32,64")
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=24, help="decode steps per UE")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--layouts", default="shared-buffer,concat", help="KV layouts to serve, side by side")
    parser.add_argument("--dtype", default=None, choices=["fp32", "fp16"],
                        help="the export's dtype (default fp16 on CUDA, whose GroupQueryAttention takes no fp32)")
    args = parser.parse_args()
    args.dtype = args.dtype or ("fp16" if args.device == "cuda" else "fp32")
    counts = [int(count) for count in args.ues.split(",")]

    layouts = args.layouts.split(",")
    artifacts = {layout: Artifact.open(small_llama_every_layer(layout, args.dtype)) for layout in layouts}
    split = artifacts[layouts[0]].num_layers // 2
    modes = [(layout, batching) for layout in layouts for batching in ("batched", "one at a time")]
    samples = {(mode, count): [] for mode in modes for count in counts}
    ceilings = {count: [] for count in counts}
    with contextlib.ExitStack() as servers:
        quiet = servers.enter_context(open("/dev/null", "w"))
        addresses = {}
        for layout, batching in modes:
            options = ("--device", args.device, *(("--no-batching",) if batching == "one at a time" else ()))
            addresses[layout, batching] = servers.enter_context(edge_server(artifacts[layout].root, *options,
                                                                            log=quiet))[1]
        for (layout, _), address in addresses.items():  # warm-up
            tokens_per_second(address, artifacts[layout], split, 2, args.prompt_length, 4)
        for _ in range(args.rounds):
            for count in counts:
                for (layout, batching), address in addresses.items():
                    rate = tokens_per_second(address, artifacts[layout], split, count, args.prompt_length, args.steps)
                    samples[((layout, batching), count)].append(rate)
                ceilings[count].append(ceiling(artifacts[layouts[0]], split, count, args.prompt_length, args.steps,
                                               args.device))

    rows, result = [], {"model": artifacts[layouts[0]].manifest.source, "split": split, "device": args.device,
                        "dtype": args.dtype, "prompt_length": args.prompt_length, "steps_per_ue": args.steps, "rounds": args.rounds,
                        "tokens_per_second": {}}
    for count in counts:
        result["tokens_per_second"][str(count)] = entry = {"ceiling": round(statistics.median(ceilings[count]), 1)}
        row = [str(count)]
        for layout in layouts:
            batched, single = samples[((layout, "batched"), count)], samples[((layout, "one at a time"), count)]
            gain = statistics.median(b / s for b, s in zip(batched, single))
            of_ceiling = statistics.median(b / c for b, c in zip(batched, ceilings[count]))
            entry[layout] = {"batched": round(statistics.median(batched), 1),
                             "one_at_a_time": round(statistics.median(single), 1), "batched_ratio": round(gain, 3),
                             "of_ceiling": round(of_ceiling, 3)}
            row += [f"{statistics.median(batched):.1f}", f"{statistics.median(single):.1f}", f"{gain:.2f}x",
                    f"{of_ceiling:.2f}"]
        rows.append(row + [f"{statistics.median(ceilings[count]):.1f}"])
    headers = ["UEs"] + [f"{layout}: {column}" for layout in layouts
                         for column in ("batched tok/s", "one at a time", "ratio", "of ceiling")]
    print(table(headers + [f"ceiling tok/s ({layouts[0]})"], rows))
    report(f"edge_throughput_{args.device}" + ("" if args.dtype == "fp32" else f"_{args.dtype}"), result)


if __name__ == "__main__":
    main()
