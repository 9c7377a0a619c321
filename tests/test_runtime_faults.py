"""Bad input and faults against a real edge_server: errors come back, other sessions keep working, nothing hangs."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seam.edge_server.process import edge_server
from seam.runtime.artifact import Artifact
from seam.runtime.errors import SeamError
from seam.runtime.protocol import (
    PROTOCOL_VERSION, Error, Hello, OpenSession, ProtocolError, SessionOpened, Step, StepResult, Welcome, decode,
    encode,
)
from seam.runtime.sampling import SamplingParams
from seam.runtime.transport import ConnectionLost, HandshakeRefused, TransportConfig, TransportTimeout, UeSocket
from conftest import run_seam
from test_runtime import NEW_TOKENS, PROMPTS, local_tokens
from seam.ue_client.client import EdgeClient


@pytest.fixture(scope="module")
def served(exported):
    artifact = Artifact.open(exported("tiny-llama"))
    with edge_server(artifact.root, "--max-length", "64") as (process, address):
        yield artifact, address, process


def raw_socket(address: str, artifact: Artifact) -> UeSocket:
    socket = UeSocket(address, TransportConfig(timeout_s=10))
    assert isinstance(socket.request(Hello(PROTOCOL_VERSION, artifact.manifest.artifact_fingerprint)), Welcome)
    return socket


def raw_reply(socket: UeSocket, frames: list[bytes]):
    socket.socket.send_multipart(frames)
    assert socket.socket.poll(10_000), "the server did not answer"
    return decode(socket.socket.recv_multipart())


def open_session(socket: UeSocket, session_id: str = "s1"):
    return socket.request(OpenSession(session_id, 2, 1, {}, 32))


def step(session_id="s1", index=0, hidden=None, mask=None, positions=None):
    hidden = np.zeros((1, 3, 64), np.float32) if hidden is None else hidden
    mask = np.ones((1, hidden.shape[1]), np.int64) if mask is None else mask
    positions = np.arange(hidden.shape[1])[None, :] if positions is None else positions
    return Step(session_id, index, mask, positions, hidden_states=hidden)


def assert_still_serving(artifact, address, secret=None, server_key=None):
    with EdgeClient(artifact, address, curve_secret=secret, server_key=server_key) as client, client.session(1) as session:
        assert len(list(session.generate([[4, 5, 6]], 3))) == 3


@pytest.mark.parametrize(
    "frames, fragment",
    [
        ([b"not json"], "not JSON"),
        ([b'{"kind":"launch","fields":{},"tensors":[]}'], "unknown message kind"),
        ([b'{"kind":"ping","fields":{"nonce":"x"},"tensors":[]}'], "must be int"),
        ([b'{"kind":"ping","fields":{"nonce":1,"extra":2},"tensors":[]}'], "no field"),
        ([b'{"kind":"step","fields":{"session_id":"s","step":0},"tensors":[{"name":"attention_mask",'
          b'"dtype":"object","shape":[1]}]}', b"x"], "dtype"),
        ([b'{"kind":"step","fields":{"session_id":"s","step":0},"tensors":[{"name":"attention_mask",'
          b'"dtype":"int64","shape":[1,2]}]}', b"\0" * 8], "needs 16 bytes"),
        # Each of these once ended the serve loop with an exception the decoder did not turn into an Error.
        ([b'{"kind":"step","fields":{"session_id":"s","step":0},"tensors":[{"name":"attention_mask",'
          b'"dtype":["int64"],"shape":[1]}]}', b"\0" * 8], "dtype"),
        ([b"[" * 100_000], "not JSON"),
        ([b'{"kind":"ping","fields":{"nonce":' + b"9" * 5000 + b'},"tensors":[]}'], "not JSON"),
        ([b'{"kind":"step","fields":{"session_id":"s","step":0},"tensors":[{"name":"attention_mask",'
          b'"dtype":"int64","shape":[0,' + b"1" + b"0" * 30 + b']}]}', b""], "invalid shape"),
        ([b'{"kind":"close","fields":{"session_id":"a\\nclose forged"},"tensors":[]}'], "printable"),
    ],
)
def test_malformed_frames_get_an_error_reply(served, frames, fragment):
    artifact, address, _ = served
    socket = raw_socket(address, artifact)
    reply = raw_reply(socket, frames)
    socket.close()
    assert isinstance(reply, Error) and reply.code == "bad_message" and fragment in reply.message
    assert_still_serving(artifact, address)


def test_requests_are_checked_before_touching_the_cache(served):
    artifact, address, _ = served
    socket = raw_socket(address, artifact)
    assert isinstance(open_session(socket), SessionOpened)
    bad = [
        (step(hidden=np.zeros((1, 3, 65), np.float32)), "hidden_states must be float32 of shape [1, 3, 64]"),
        (step(hidden=np.zeros((1, 3, 64), np.float16)), "hidden_states must be float32"),
        (step(mask=np.ones((1, 5), np.int64)), "attention_mask must be int64 of shape [1, 3]"),
        (step(hidden=np.full((1, 3, 64), np.nan, np.float32)), "hidden_states hold NaN or infinite values"),
        (step(mask=np.full((1, 3), 2, np.int64)), "attention_mask entries must be 0 (padding) or 1"),
        (step(positions=np.array([[0, 1, 2**62]])), "position_ids must lie in [0, 32)"),
        (step(index=4), "expected step 0"),
        (step(session_id="nope"), "unknown session 'nope'"),
        (step(hidden=np.zeros((1, 40, 64), np.float32)), "beyond its max_length 32"),
    ]
    for message, fragment in bad:
        reply = socket.request(message)
        assert isinstance(reply, Error) and fragment in reply.message, (fragment, reply)
    assert isinstance(socket.request(step()), StepResult)  # the session survived every bad request
    socket.close()
    assert_still_serving(artifact, address)


def test_steps_send_only_their_own_mask_columns(served):
    artifact, address, _ = served
    socket = raw_socket(address, artifact)
    assert isinstance(open_session(socket), SessionOpened)
    one = np.zeros((1, 1, 64), np.float32)
    assert isinstance(socket.request(step()), StepResult)  # the prefill: 3 positions, their 3 columns
    assert isinstance(socket.request(step(index=1, hidden=one, mask=np.ones((1, 1), np.int64),
                                          positions=np.array([[3]]))), StepResult)  # the edge holds the rest
    # A whole mask is no longer what the field means: refused, and the session goes on.
    reply = socket.request(step(index=2, hidden=one, mask=np.ones((1, 5), np.int64), positions=np.array([[4]])))
    assert isinstance(reply, Error) and "[1, 1]: the mask columns of the step's own positions" in reply.message
    assert isinstance(socket.request(step(index=2, hidden=one, mask=np.ones((1, 1), np.int64),
                                          positions=np.array([[4]]))), StepResult)

    # A session opened mid-sequence gets the mask of its past with the open, and from then on columns only.
    opened = OpenSession("s2", 2, 1, {}, 32, hidden_states=np.zeros((1, 3, 64), np.float32),
                         attention_mask=np.ones((1, 3), np.int64))
    assert isinstance(socket.request(opened), SessionOpened)
    assert isinstance(socket.request(step("s2", hidden=one, mask=np.ones((1, 1), np.int64),
                                          positions=np.array([[3]]))), StepResult)
    # One opened with its KV cache must bring that mask too.
    cache = np.zeros((2 * (artifact.num_layers - 2), 2, 3, 16), np.float32)
    reply = socket.request(OpenSession("s3", 2, 1, {}, 32, kv=cache))
    assert isinstance(reply, Error) and "needs the attention mask of its positions" in reply.message
    socket.close()


def test_handshake_mismatches_are_refused(served):
    artifact, address, _ = served
    socket = UeSocket(address, TransportConfig(timeout_s=10))
    wrong_version = socket.request(Hello(PROTOCOL_VERSION + 1, artifact.manifest.artifact_fingerprint))
    wrong_artifact = socket.request(Hello(PROTOCOL_VERSION, "0" * 64))
    before_hello = socket.request(OpenSession("s", 2, 1, {}, 8))
    socket.close()
    assert wrong_version.code == "version_mismatch"
    assert wrong_artifact.code == "artifact_mismatch" and "different artifacts" in wrong_artifact.message
    assert before_hello.code == "no_handshake"


def test_oversized_and_forbidden_sessions(served):
    artifact, address, _ = served
    socket = raw_socket(address, artifact)
    assert "max_length 999 is outside" in socket.request(OpenSession("a", 2, 1, {}, 999)).message
    assert "raw token ids" in socket.request(OpenSession("b", 0, 1, {}, 8)).message
    assert "not a split point" in socket.request(OpenSession("c", 7, 1, {}, 8)).message
    assert "invalid sampling" in socket.request(OpenSession("d", 2, 1, {"top_p": 0}, 8)).message
    for sampling, name in (({"temperature": "hot"}, "temperature"), ({"top_k": 1.5}, "top_k"),
                           ({"seed": 10**30}, "seed")):
        reply = socket.request(OpenSession("e", 2, 1, sampling, 8))
        assert reply.code == "rejected" and f"sampling parameter {name} must be" in reply.message, reply
    tokens = OpenSession("f", 0, 1, {}, 8, allow_token_upload=True)
    assert isinstance(socket.request(tokens), SessionOpened)
    out_of_vocabulary = Step("f", 0, np.ones((1, 1), np.int64), np.zeros((1, 1), np.int64),
                             input_ids=np.array([[artifact.manifest.dims.vocab_size]]))
    assert "input_ids must lie in [0, " in socket.request(out_of_vocabulary).message
    huge = UeSocket(address, TransportConfig(timeout_s=10, max_message_bytes=1 << 30))
    huge.request(Hello(PROTOCOL_VERSION, artifact.manifest.artifact_fingerprint))
    huge.request(OpenSession("big", 2, 1, {}, 64))
    with pytest.raises(TransportTimeout):  # the server drops a frame over its size limit unread
        huge.request(step("big", hidden=np.zeros((1, 64, 300_000), np.float32)), timeout_s=3)
    huge.close()
    socket.close()
    assert_still_serving(artifact, address)


def test_vanished_ue_does_not_disturb_others(served):
    artifact, address, _ = served
    socket = raw_socket(address, artifact)
    open_session(socket, "abandoned")
    socket.request(step("abandoned"))
    socket.close()  # gone mid-session without a close
    assert_still_serving(artifact, address)


def test_killed_edge_gives_a_clear_error_within_the_timeout(exported):
    artifact = Artifact.open(exported("tiny-llama"))
    with edge_server(artifact.root) as (process, address):
        client = EdgeClient(artifact, address, TransportConfig(timeout_s=2))
        session = client.session(2)
        tokens = session.generate([[4, 5, 6]], 50)
        next(tokens)
        process.kill()
        process.wait()
        started = time.monotonic()
        with pytest.raises(ConnectionLost, match="closed the connection"):
            list(tokens)
        # The closed connection is noticed at once, not after the timeout (2 s), and no close waits one out.
        assert time.monotonic() - started < 1.5
        client.close()


PARENT = """
import sys, time
from seam.edge_server.process import edge_server
with edge_server(sys.argv[1]) as (process, address):
    print(process.pid, flush=True)
    time.sleep(300)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a child asks Linux's prctl to stop with its parent")
def test_an_edge_started_by_a_program_killed_outright_stops_with_it(exported):
    """A program killed by SIGKILL runs no cleanup: the edge_server it started must not live on without it."""
    import psutil

    artifact = Artifact.open(exported("tiny-llama"))
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(artifact.root)], stdout=subprocess.PIPE, text=True)
    child = None
    try:
        child = psutil.Process(int(parent.stdout.readline()))
        assert child.is_running() and child.ppid() == parent.pid
        parent.kill()
        parent.wait(10)
        child.wait(15)  # raises psutil.TimeoutExpired while it still runs
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if child is not None and child.is_running():
            child.kill()  # the edge this test started, through its parent


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.8, seed=5)], ids=["greedy", "seeded"])
def test_a_killed_edge_with_fallback_finishes_on_the_ue_with_the_same_tokens(exported, params):
    artifact = Artifact.open(exported("tiny-llama"))
    with edge_server(artifact.root) as (process, address):
        with EdgeClient(artifact, address, TransportConfig(timeout_s=1)) as client:
            session = client.session(2, params, fallback_local=True)
            steps = session.generate(PROMPTS, NEW_TOKENS)
            produced = [next(steps), next(steps), next(steps)]
            process.kill()
            process.wait()
            started = time.monotonic()
            produced += list(steps)
            assert time.monotonic() - started < 10

    assert (np.stack(produced, axis=1) == local_tokens(artifact, PROMPTS, params)).all()
    (move,) = session.moves
    assert (move.before_step, move.from_split, move.to_split) == (3, 2, artifact.num_layers)
    assert "the edge was lost" in move.reason and session.split == artifact.num_layers


def test_an_edge_restarted_under_a_session_engages_the_fallback(exported):
    """An edge restarted on the same address holds none of the session's state: the UE sees the old connection
    close (or the new edge answer 'send hello first') and finishes locally, before its timeout runs out."""
    import socket as sockets

    artifact = Artifact.open(exported("tiny-llama"))
    with sockets.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    with edge_server(artifact.root, bind=address) as (process, _):
        client = EdgeClient(artifact, address, TransportConfig(timeout_s=60))
        session = client.session(2, fallback_local=True)
        steps = session.generate(PROMPTS, NEW_TOKENS)
        produced = [next(steps), next(steps)]
    with edge_server(artifact.root, bind=address):
        produced += list(steps)
    client.close()
    assert (np.stack(produced, axis=1) == local_tokens(artifact, PROMPTS, SamplingParams())).all()
    (move,) = session.moves
    assert "the edge was lost" in move.reason, move.reason
    assert "send hello" in move.reason or "closed the connection" in move.reason, move.reason


def test_ue_client_without_server(exported):
    artifact = exported("tiny-llama")
    command = [sys.executable, "-m", "seam.ue_client.cli", str(artifact), "--server", "tcp://127.0.0.1:9",
               "--prompt", "hi", "--max-new-tokens", "4", "--timeout", "1"]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith("ue_client: error: no reply from the edge server")
    local = subprocess.run([*command, "--fallback-local"], capture_output=True, text=True, timeout=120)
    assert local.returncode == 0, local.stderr
    assert "generating locally" in local.stderr and local.stdout.strip()


def test_client_refuses_token_upload_by_default(served):
    artifact, address, _ = served
    with EdgeClient(artifact, address) as client:
        with pytest.raises(SeamError, match="allow-token-upload"):
            client.session(0, SamplingParams())


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.binary(max_size=64), min_size=1, max_size=4)
    | st.builds(
        lambda kind, fields, tensors, tail: [
            f'{{"kind":"{kind}","fields":{fields},"tensors":{tensors}}}'.encode(), *tail
        ],
        st.sampled_from(["hello", "step", "result", "ping", "open", "bogus"]),
        st.sampled_from(["{}", '{"session_id":"s","step":0}', '{"nonce":1}', '{"nonce":1.5}', "[]"]),
        st.sampled_from(["[]", '[{"name":"attention_mask","dtype":"int64","shape":[1]}]',
                         '[{"name":"tokens","dtype":"float16","shape":[-1]}]', '[{"name":1}]']),
        st.lists(st.binary(max_size=16), max_size=2),
    )
)
def test_decoder_fuzz_raises_only_protocol_errors(frames):
    try:
        message = decode(frames, max_bytes=1024)
    except ProtocolError:
        return
    assert decode([bytes(f) for f in encode(message)]) == message or message.kind in {"step", "result"}


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["hello", "step", "open", "ping", "close", "resplit", "train_forward", "bogus"]) | JSON,
    JSON,
    st.lists(st.dictionaries(st.sampled_from(["name", "dtype", "shape", "x"]), JSON | st.sampled_from(
        ["attention_mask", "hidden_states", "int64", "float32"]), max_size=4), max_size=3),
    st.lists(st.binary(max_size=32), max_size=3),
)
def test_decoder_takes_any_json_header_without_another_exception(kind, fields, tensors, tail):
    import json

    header = json.dumps({"kind": kind, "fields": fields, "tensors": tensors}).encode()
    try:
        message = decode([header, *tail], max_bytes=1 << 16)
    except ProtocolError:
        return
    assert message.kind == kind


def test_curve_admits_only_allow_listed_ues(exported, tmp_path):
    artifact = Artifact.open(exported("tiny-llama"))
    allowed, keys = tmp_path / "allowed", tmp_path / "keys"
    for directory, name in ((keys, "edge"), (allowed, "ue-known"), (keys, "ue-stranger")):
        made = run_seam("keys", str(directory), "--name", name)
        assert made.returncode == 0, made.stderr
    assert (keys / "edge.key_secret").stat().st_mode & 0o077 == 0
    again = run_seam("keys", str(keys), "--name", "edge")
    assert again.returncode == 2 and "already exists" in again.stderr

    flags = ("--curve-secret", str(keys / "edge.key_secret"), "--allow", str(allowed))
    with edge_server(artifact.root, *flags) as (_, address):
        transport = TransportConfig(timeout_s=2)
        with pytest.raises(HandshakeRefused, match="refused this UE's key"):
            EdgeClient(artifact, address, transport, curve_secret=keys / "ue-stranger.key_secret",
                       server_key=keys / "edge.key")
        with pytest.raises(HandshakeRefused, match="handshake failed"):
            EdgeClient(artifact, address, transport)  # plain text to a CURVE server
        assert_still_serving(artifact, address, secret=allowed / "ue-known.key_secret", server_key=keys / "edge.key")
