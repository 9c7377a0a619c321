"""The HTTP endpoint's cost: time to first token and tokens/s through ``ue_client serve`` (the official openai
client, streaming) against Seam's Python API (``EdgeClient`` sessions in this process) for the same requests,
1 and 8 at once, on the real model split at layer 15 over loopback.

Both paths run against one edge_server, in turn within each repeat, so the machine's drift falls on both alike;
every request is a greedy text completion of the same prompt and length, so both generate the same tokens.
Reports medians over the repeats and the endpoint's overhead per token.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

from _common import real_model_every_layer, report

from seam.edge_server.process import edge_server
from seam.runtime.artifact import Artifact
from seam.runtime.executor import SessionPool
from seam.runtime.shell import table
from seam.runtime.text import load_tokenizer
from seam.serving.process import http_endpoint, wait_ready
from seam.ue_client.client import EdgeClient

SPLIT, TOKENS, PROMPT = 15, 48, "The history of the printing press begins"


def together(count: int, request) -> list[tuple[float, float, int]]:
    """Runs ``request()`` ``count`` times at once; each returns (first token s, total s, tokens)."""
    results: list = [None] * count

    def run(index: int) -> None:
        results[index] = request()

    threads = [threading.Thread(target=run, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    return results


def api_request(clients: list[EdgeClient], prompt_ids: list[int]):
    """A request through the Python API, on a connection of its own (as the endpoint gives each request)."""
    lock = threading.Lock()

    def request() -> tuple[float, float, int]:
        with lock:
            client = clients.pop()
        try:
            started = time.perf_counter()
            first, count = None, 0
            with client.session(SPLIT) as session:
                for _ in session.generate([prompt_ids], TOKENS):
                    first = first or time.perf_counter() - started
                    count += 1
            return first, time.perf_counter() - started, count
        finally:
            with lock:
                clients.append(client)
    return request


def http_request(url: str, model: str):
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)

    def request() -> tuple[float, float, int]:
        started = time.perf_counter()
        first, count = None, 0
        stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=TOKENS, temperature=0, stream=True,
                                           stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                first = first or time.perf_counter() - started
            if chunk.usage:
                count = chunk.usage.completion_tokens
        return first, time.perf_counter() - started, count
    return request


def figures(results: list[tuple[float, float, int]]) -> tuple[float, float]:
    """Median time to first token (ms) and the aggregate rate (tokens/s) of one round."""
    ttft = statistics.median(first for first, _, _ in results)
    rate = sum(count for _, _, count in results) / max(total for _, total, _ in results)
    return 1e3 * ttft, rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    out = real_model_every_layer()
    artifact = Artifact.open(out)
    prompt_ids = load_tokenizer(artifact).encode(PROMPT).ids
    rows, result = [], {}
    with open("/dev/null", "w") as quiet, edge_server(out, "--threads", "1", log=quiet) as (_, address), \
            http_endpoint(out, address, "--split", str(SPLIT), "--parallel", "8", "--threads", "1",
                          log=quiet) as (_, url):
        wait_ready(url)
        pool = SessionPool(artifact, 1)
        clients = [EdgeClient(artifact, address, threads=1, pool=pool) for _ in range(8)]
        paths = {"python API": api_request(clients, prompt_ids), "HTTP endpoint": http_request(url, out.name)}
        for path in paths.values():
            together(1, path)  # warm both: blocks loaded, connections made
        for concurrent in (1, 8):
            measured = {name: [figures(together(concurrent, path)) for _ in range(args.repeats)]
                        for name, path in paths.items()}
            medians = {name: (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
                       for name, runs in measured.items()}
            api, http = medians["python API"], medians["HTTP endpoint"]
            overhead_ms = 1e3 * (1 / http[1] - 1 / api[1]) * concurrent
            rows.append([str(concurrent), f"{api[0]:.0f}", f"{http[0]:.0f}", f"{api[1]:.1f}", f"{http[1]:.1f}",
                         f"{http[1] / api[1]:.2f}", f"{overhead_ms:+.2f}"])
            result[str(concurrent)] = {"api_ttft_ms": round(api[0], 1), "http_ttft_ms": round(http[0], 1),
                                       "api_tokens_per_s": round(api[1], 2), "http_tokens_per_s": round(http[1], 2),
                                       "http_over_api_rate": round(http[1] / api[1], 3),
                                       "overhead_ms_per_token": round(overhead_ms, 2)}
        for client in clients:
            client.close()
    print(table(["concurrent", "TTFT API ms", "TTFT HTTP ms", "API tokens/s", "HTTP tokens/s", "HTTP / API",
                 "overhead ms/token"], rows))
    report("http_endpoint", {"model": "smollm2-135m-instruct", "split": SPLIT, "tokens": TOKENS,
                             "repeats": args.repeats, "concurrency": result})


if __name__ == "__main__":
    main()
