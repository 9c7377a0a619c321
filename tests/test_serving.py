"""``ue_client serve`` through the clients apps use: the official ``openai`` package and raw HTTP, against a real
edge server, on the real instruct model where its package is installed (else a tiny preset)."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import threading
import time

import httpx
import pytest

from seam.edge_server.process import edge_server
from seam.runtime.artifact import Artifact
from seam.serving.process import http_endpoint, wait_ready

openai = pytest.importorskip("openai")
KEY = "test-key"
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def model(served_model):
    return served_model


class Log(io.StringIO):
    """An edge's log, readable while it is written (from the server's forwarding thread)."""

    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()

    def write(self, text: str) -> int:
        with self.lock:
            return super().write(text)

    def text(self) -> str:
        with self.lock:
            return self.getvalue()


@pytest.fixture(scope="module")
def served(model):
    """(base URL, edge log, edge address): one edge and one endpoint with a key for the module."""
    log = Log()
    with edge_server(model, "--log-level", "info", log=log) as (_, address):
        with http_endpoint(model, address, "--api-key", KEY, "--parallel", "4") as (_, url):
            wait_ready(url)
            yield url, log, address


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def name(model):
    return model.name


def chat(client, name, **options):
    return client.chat.completions.create(model=name, messages=[{"role": "user", "content": QUESTION}],
                                          **{"temperature": 0, "max_tokens": 16, **options})


def test_health_and_models(served, client, name):
    assert httpx.get(served[0] + "/health").json() == {"status": "ok"}
    models = client.models.list()
    assert [model.id for model in models.data] == [name] and models.data[0].owned_by == "seam"


def test_greedy_chat_equals_ue_client_prompt(served, client, model, name):
    reply = chat(client, name, max_tokens=20)
    command = [sys.executable, "-m", "seam.ue_client.cli", str(model), "--server", served[2], "--prompt", QUESTION, "--max-new-tokens", "20"]
    printed = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    assert reply.choices[0].message.content == printed.removesuffix("\n")
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.completion_tokens <= 20 and reply.usage.prompt_tokens > 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    layers = Artifact.open(model).num_layers
    seam = reply.usage.model_extra["seam"]
    assert 0 < seam["split"] < layers and seam["layers"] == layers and set(seam["per_token_ms"]) == {
        "ue", "network", "edge"}
    if model.name.startswith("smollm2"):
        assert "Paris" in reply.choices[0].message.content


def test_streamed_chat_equals_the_whole_reply(client, name):
    whole = chat(client, name)
    chunks = list(chat(client, name, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)


def test_the_stream_is_server_sent_events_ending_with_done(served, name):
    body = {"model": name, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", served[0] + "/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith(("data: ", ":")) for line in lines)


def test_max_tokens_counts_every_token_generated(client, name):
    reply = client.completions.create(model=name, prompt="The history of the city", max_tokens=5, temperature=0)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 5
    streamed = list(client.completions.create(model=name, prompt="The history of the city", max_tokens=5,
                                              temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == reply.choices[0].text
    assert streamed[-1].usage.completion_tokens == 5


def test_a_stop_string_ends_the_answer_before_it(client, name):
    whole = client.completions.create(model=name, prompt="Once upon a time", max_tokens=12, temperature=0)
    text = whole.choices[0].text
    stop = text[len(text) // 2:][:3]
    assert stop.strip(), text
    stopped = client.completions.create(model=name, prompt="Once upon a time", max_tokens=12, temperature=0,
                                        stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[:text.index(stop)]


def test_a_seed_gives_the_same_sampled_text(client, name):
    def sampled(seed: int) -> str:
        return chat(client, name, temperature=1.0, top_p=0.95, seed=seed, max_tokens=12).choices[0].message.content

    assert sampled(7) == sampled(7)
    assert len({sampled(7), sampled(8), sampled(9)}) > 1


def test_four_concurrent_streams_each_get_their_answer(client, name):
    expected = chat(client, name, max_tokens=24).choices[0].message.content
    spans, answers = [], []

    def stream() -> None:
        started = time.monotonic()
        pieces = [c.choices[0].delta.content or "" for c in chat(client, name, max_tokens=24, stream=True)
                  if c.choices]
        spans.append((started, time.monotonic()))
        answers.append("".join(pieces))

    threads = [threading.Thread(target=stream) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert answers == [expected] * 4
    assert max(start for start, _ in spans) < min(end for _, end in spans)  # they ran at the same time


def test_a_client_leaving_mid_stream_ends_its_edge_session(served, name):
    url, log, _ = served
    body = {"model": name, "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "stream": True,
            "stop": None}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        lines = response.iter_lines()
        first = json.loads(next(line for line in lines if line.startswith("data: "))[6:])
        request_opened = len(log.text().split(" open "))
    deadline = time.monotonic() + 10
    closed = None
    while closed is None and time.monotonic() < deadline:
        closed = re.findall(r"close \S+ .*\(closed by UE\) steps=(\d+)", log.text()[-2000:])
        closed = closed or None
        time.sleep(0.1)
    assert first["object"] == "text_completion" and request_opened > 1
    assert closed is not None and int(closed[-1]) < 400  # closed by the UE long before its 400 tokens


@pytest.mark.parametrize("body, status, param, code", [
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model", "invalid_value"),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 400, "model", "model_not_found"),
    ({"model": "NAME", "messages": "hi"}, 400, "messages", "invalid_value"),
    ({"model": "NAME", "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0]", "invalid_value"),
    ({"model": "NAME", "messages": [{"role": "user", "content": "hi"}], "temperature": 5}, 400, "temperature",
     "invalid_value"),
    ({"model": "NAME", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n", "unsupported_parameter"),
    ({"model": "NAME", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, 400, "max_tokens",
     "context_length_exceeded"),
    ({"model": "NAME", "messages": [{"role": "user", "content": "hi"}], "stop": [1]}, 400, "stop", "invalid_value"),
])
def test_bad_requests_are_answered_in_openai_shape(served, name, body, status, param, code):
    body = json.loads(json.dumps(body).replace('"NAME"', json.dumps(name)))
    response = httpx.post(served[0] + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    error = response.json()["error"]
    assert response.status_code == status and error["param"] == param and error["code"] == code
    assert error["type"] == "invalid_request_error" and param.split("[")[0] in error["message"]


def test_a_context_too_long_says_how_long_it_may_be(client, name, model):
    context = Artifact.open(model).context_length
    with pytest.raises(openai.BadRequestError) as raised:
        chat(client, name, max_tokens=context)
    assert raised.value.status_code == 400 and f"context is {context} tokens" in raised.value.message
    assert re.search(r"at most \d+", raised.value.message)


def test_not_json_an_unknown_path_and_a_wrong_key(served, name):
    url, headers = served[0], {"Authorization": f"Bearer {KEY}"}
    broken = httpx.post(url + "/v1/chat/completions", content=b"{not json", headers=headers)
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_json"
    assert httpx.get(url + "/v1/engines", headers=headers).json()["error"]["code"] == "not_found"
    wrong = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert httpx.get(url + "/v1/models").status_code == 401  # no key at all
    assert httpx.get(url + "/health").status_code == 200  # health needs none, for load balancers


def test_private_output_through_the_endpoint_gives_the_same_answer(served, client, model, name):
    """``ue_client serve --private-output``: the head on this device, the same greedy answer as the edge's."""
    with http_endpoint(model, served[2], "--private-output") as (_, url):
        wait_ready(url)
        private = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        reply = chat(private, name, seed=5, temperature=0.7)
    expected = chat(client, name, seed=5, temperature=0.7)
    assert reply.choices[0].message.content == expected.choices[0].message.content
    assert reply.usage.model_extra["seam"]["private_output"] is True
    assert expected.usage.model_extra["seam"]["private_output"] is False


def test_keep_alive_comments_while_a_slow_prefill_runs(model, name):
    with edge_server(model) as (_, address):
        with http_endpoint(model, address, "--keep-alive", "0.05", "--ue-slowdown", "60") as (_, url):
            wait_ready(url)
            body = {"model": name, "prompt": "Once upon a time " * 20, "max_tokens": 2, "stream": True}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
                lines = [line for line in response.iter_lines() if line]
    first_data = next(index for index, line in enumerate(lines) if line.startswith("data: "))
    assert lines[:first_data] and all(line == ": keep-alive" for line in lines[:first_data])


def test_an_unreachable_edge_is_a_503_or_an_answer_from_this_device(model, name):
    with edge_server(model) as (edge, address):
        with http_endpoint(model, address, "--timeout", "2") as (_, url), \
                http_endpoint(model, address, "--timeout", "2", "--fallback-local") as (_, fallback_url):
            wait_ready(url)
            wait_ready(fallback_url)
            edge.terminate()
            edge.wait(10)
            body = {"model": name, "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}
            lost = httpx.post(url + "/v1/completions", json=body, timeout=60)
            local = httpx.post(fallback_url + "/v1/completions", json=body, timeout=60)
    assert lost.status_code == 503 and lost.json()["error"]["code"] == "edge_unavailable"
    assert local.status_code == 200 and local.json()["usage"]["completion_tokens"] == 4


def test_health_is_503_while_loading_and_a_failed_load_exits_with_one_line(model):
    command = [sys.executable, "-m", "seam.serving.cli", str(model), "--server", "tcp://127.0.0.1:9", "--port", "0",
               "--timeout", "3"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    first = process.stderr.readline()
    url = re.search(r"listening on (http://\S+)", first).group(1)
    loading = httpx.get(url + "/health", timeout=5)
    _, rest = process.communicate(timeout=60)
    assert loading.status_code == 503 and loading.json()["status"] == "loading"
    assert process.returncode != 0 and rest.strip().splitlines()[-1].startswith("ue_client serve: error: ")


def test_listening_beyond_loopback_needs_a_key(model):
    refused = subprocess.run([sys.executable, "-m", "seam.serving.cli", str(model), "--host", "0.0.0.0"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "--api-key" in refused.stderr and len(refused.stderr.splitlines()) == 1
