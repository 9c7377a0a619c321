"""Private output (U-shaped inference): the UE keeps the final norm, the LM head and sampling; the edge returns the
last layer's hidden states. Tokens equal the normal path's, and nothing on the wire or in the edge's audit log
carries a token id, a logit, a sampling setting or text."""

from __future__ import annotations

import json
import shutil
import socket
import struct
import subprocess
import sys
import threading

import numpy as np
import pytest

from seam.edge_server.process import edge_server
from seam.edge_server.validation import Limits, check_open, private_output_refusal
from seam.runtime.artifact import Artifact
from seam.runtime.errors import SeamError
from seam.runtime.executor import SessionPool
from seam.runtime.protocol import OpenSession, ProtocolError, Resplitted, StepResult, decode
from seam.runtime.sampling import SamplingParams
from seam.runtime.spans import Span
from seam.ue_client.client import EdgeClient
from seam.planning.cost_model import DeviceModel, Link, predict
from seam.planning.wire_sizes import downlink_bytes
from test_cost_model import HIDDEN, block, decode_s, device
from test_runtime import PROMPTS, concurrent_ues, local_tokens, remote_tokens

GREEDY, SEEDED = SamplingParams(), SamplingParams(temperature=0.8, top_k=20, seed=11)


class WireTap:
    """A TCP proxy on loopback between the UE and the edge that keeps every byte each way, per connection."""

    def __init__(self, edge_address: str):
        self.target = int(edge_address.rsplit(":", 1)[1])
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.streams: list[tuple[str, bytearray]] = []  # ("up" or "down", bytes)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                ue, _ = self.listener.accept()
            except OSError:
                return
            try:
                edge = socket.create_connection(("127.0.0.1", self.target), timeout=10)
            except OSError:  # the edge is gone: the UE finds its connection closed, as it would without the tap
                ue.close()
                continue
            edge.settimeout(None)  # the edge may be silent for long (joining a span's graphs): that is no close
            for source, sink, direction in ((ue, edge, "up"), (edge, ue, "down")):
                buffer = bytearray()
                self.streams.append((direction, buffer))
                threading.Thread(target=self._pump, args=(source, sink, buffer), daemon=True).start()

    @staticmethod
    def _pump(source, sink, buffer: bytearray) -> None:
        while chunk := _read(source):
            buffer.extend(chunk)
            try:
                sink.sendall(chunk)
            except OSError:
                return
        sink.close()

    def messages(self) -> list[tuple[str, list[bytes]]]:
        """Every multipart message that crossed, as ZMTP 3 frames it, with its direction."""
        found = []
        for direction, data in self.streams:
            found += [(direction, frames) for frames in zmtp_messages(bytes(data))]
        return found

    def close(self) -> None:
        self.listener.close()


def _read(connection) -> bytes:
    try:
        return connection.recv(1 << 16)
    except OSError:
        return b""


def zmtp_messages(data: bytes) -> list[list[bytes]]:
    """The messages of one direction of a ZMTP 3 (NULL mechanism) connection: after the 64-byte greeting, each
    frame is a flags byte (1 more, 2 long, 4 command), its size (1 or 8 bytes) and its body."""
    messages, frames, at = [], [], 64
    while at < len(data):
        flags = data[at]
        if flags & 2:
            (size,), at = struct.unpack(">Q", data[at + 1: at + 9]), at + 9
        else:
            size, at = data[at + 1], at + 2
        body, at = data[at: at + size], at + size
        if flags & 4:
            continue  # READY, PING and the like
        frames.append(body)
        if not flags & 1:
            messages.append(frames)
            frames = []
    return messages


def decoded(tap: WireTap) -> list[tuple[str, object]]:
    """Every message on the wire through the protocol's own decoder (ZeroMQ's empty delimiter frames dropped)."""
    found = []
    for direction, frames in tap.messages():
        frames = [frame for frame in frames if frame] if frames and frames[0] == b"" else frames
        try:
            found.append((direction, decode(frames)))
        except ProtocolError:
            found.append((direction, frames))  # kept, so that the checks below see its bytes too
    return found


def assert_nothing_private(tap: WireTap, texts: list[str], hidden_size: int) -> None:
    """No message carries a token id, a logit, a sampling setting or any of ``texts``, in either direction."""
    messages = decoded(tap)
    assert messages and all(not isinstance(message, list) for _, message in messages), "undecodable traffic"
    results = [message for _, message in messages if isinstance(message, StepResult)]
    assert results and all(result.tokens is None for result in results)
    assert all(result.hidden_states.shape[1:] == (1, hidden_size) for result in results)
    for _, message in messages:
        assert getattr(message, "input_ids", None) is None
        assert not getattr(message, "sampling", {}) and not getattr(message, "sampler_state", {})
    wire = b"".join(bytes(data) for _, data in tap.streams)
    for text in texts:
        assert text.encode() not in wire, f"{text!r} crossed the link"


@pytest.fixture(scope="module")
def artifact(exported) -> Artifact:
    return Artifact.open(exported("tiny-llama"))


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_every_split_gives_the_normal_path_s_tokens(artifact, sampling):
    expected = local_tokens(artifact, PROMPTS, sampling)
    with edge_server(artifact.root) as (_, address), EdgeClient(artifact, address) as client:
        for split in artifact.split_points[1:-1]:
            private = remote_tokens(client, split, PROMPTS, sampling, private_output=True)
            assert (private == expected).all(), f"split {split}"


def test_moves_carry_the_session_and_the_tokens_stay(artifact):
    expected = local_tokens(artifact, PROMPTS, SEEDED)
    last = artifact.num_layers
    plan = {1: (3, False), 3: (last, False), 5: (2, False), 6: (last, True), 8: (1, True)}  # step: (split, rebuild)
    with edge_server(artifact.root) as (_, address), EdgeClient(artifact, address) as client:
        with client.session(1, SEEDED, private_output=True) as session:
            tokens = []
            for step, token in enumerate(session.generate(PROMPTS, expected.shape[1])):
                tokens.append(token)
                if step in plan:
                    session.move_split(*plan[step])
    assert (np.stack(tokens, axis=1) == expected).all()
    assert [(move.from_split, move.to_split) for move in session.moves] == [(1, 3), (3, last), (last, 2), (2, last),
                                                                            (last, 1)]


def test_the_edge_sees_no_token_logit_or_text_in_a_whole_chat(real_model, tmp_path):
    """Two turns of a chat with the real model, the split moving onto the device and back, then the edge killed
    and the answer finished here."""
    artifact = Artifact.open(real_model)
    audit = tmp_path / "messages.jsonl"
    question, follow_up = "the secret plans of the rebels", "and where are they hidden"
    hidden_size, last = artifact.manifest.dims.hidden_size, artifact.num_layers
    with edge_server(artifact.root, "--log-messages", str(audit)) as (process, address):
        tap = WireTap(address)
        try:
            with EdgeClient(artifact, tap.address) as client:
                session = client.session(5, SEEDED, fallback_local=True, private_output=True)
                first = []
                for step, token in enumerate(session.chat([{"role": "user", "content": question}], 8)):
                    first.append(token)
                    if step == 2:
                        session.move_split(last)
                    if step == 4:
                        session.move_split(5)  # back where it opened: its graph without the head is built
                answer = client.tokenizer.decode(first)
                turn = [{"role": "user", "content": question}, {"role": "assistant", "content": answer},
                        {"role": "user", "content": follow_up}]
                second = []
                for step, token in enumerate(session.chat(turn, 6)):
                    second.append(token)
                    if step == 2:
                        process.kill()  # the rest is finished on this device
                session.close()
        finally:
            tap.close()
    assert any("finishing on this device" in move.reason for move in session.moves)
    texts = [question, follow_up] + [word for word in answer.split() if len(word) >= 4]
    assert_nothing_private(tap, texts, hidden_size)
    for record in map(json.loads, audit.read_text().splitlines()):
        assert not {"tokens", "input_ids", "logits", "text"} & set(record)
        assert not record.get("sampling") and not record.get("sampler_state")
        assert not any(text in line for line in [json.dumps(record)] for text in texts)


def test_the_tap_sees_the_tokens_of_the_normal_path(artifact):
    """The wire check's positive control: without private output the edge's tokens cross as they are."""
    with edge_server(artifact.root) as (_, address):
        tap = WireTap(address)
        try:
            with EdgeClient(artifact, tap.address) as client:
                tokens = remote_tokens(client, 2, PROMPTS, GREEDY)
        finally:
            tap.close()
    sent = [message.tokens for _, message in decoded(tap) if isinstance(message, StepResult)]
    assert (np.stack(sent, axis=1) == tokens).all()
    with pytest.raises(AssertionError):
        assert_nothing_private(tap, [], artifact.manifest.dims.hidden_size)


def test_private_sessions_batch_together_with_their_solo_tokens(artifact):
    expected = local_tokens(artifact, PROMPTS, SEEDED)
    with edge_server(artifact.root) as (_, address):
        results, batched = concurrent_ues(artifact, address, [{"split": 2, "sampling": SEEDED, "private_output": True}]
                                          * 4, [PROMPTS] * 4, expected.shape[1])
    assert len(results) == 4 and all((tokens == expected).all() for tokens in results.values())
    assert batched > 0, "no decode steps were batched"


def test_the_head_graph_gives_the_last_block_s_logits(artifact):
    pool = SessionPool(artifact)
    whole, headless = pool.runner(Span(0, artifact.num_layers)), pool.runner(Span(0, artifact.num_layers), head=False)
    headless.join_blocks(wait=True)
    assert headless.blocks[0].output == "final_hidden" and len(headless.blocks) == 1
    ids = np.array([[5, 9, 2, 7]])
    mask, positions = np.ones_like(ids), np.arange(4)[None]
    for runner in (whole, headless):
        runner.reset(1)
    logits, final = whole.run(ids, mask, positions), headless.run(ids, mask, positions)
    assert final.shape == (1, 1, artifact.manifest.dims.hidden_size)
    assert np.abs(pool.head_logits(final) - logits).max() < 1e-5


def test_an_artifact_without_a_head_graph_is_refused_in_one_line(artifact, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(artifact.root, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["head"] = None
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SeamError, match="re-export"):
        Artifact.open(old).check_private_output()
    result = subprocess.run([sys.executable, "-m", "seam.ue_client.cli", str(old), "--private-output", "--prompt",
                             "hi", "--server", "tcp://127.0.0.1:9"], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "re-export" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    manifest, last = artifact.manifest, artifact.num_layers
    assert "before private output" in private_output_refusal(Artifact.open(old).manifest, last)
    assert "pipeline" in private_output_refusal(manifest, last - 1) and private_output_refusal(manifest, last) == ""


def test_an_open_asking_for_private_output_of_an_edge_that_cannot_is_refused(artifact):
    request = OpenSession("s", 2, 1, {}, 16, private_output=True)
    limits = Limits(artifact.num_layers, 64, 320, np.dtype(np.float32), 8, 64, ("fp32",), artifact.check_split,
                    private_output_refusal(artifact.manifest, 2))
    with pytest.raises(SeamError, match="cannot keep the output private"):
        check_open(request, limits)
    assert Resplitted("s", 4).sampler_state == {}


def test_the_cost_model_prices_the_head_on_the_ue_and_the_hidden_states_coming_back():
    link = Link.from_mbit(10, 20)
    plain_ue, plain_edge = DeviceModel.from_profile(device(4.0)), DeviceModel.from_profile(device(1.0, name="edge"))
    normal, private = (predict(plain_ue, plain_edge, link, 2, 128, private_output=flag).decode
                       for flag in (False, True))
    assert private.downlink_bytes - normal.downlink_bytes >= HIDDEN * 4
    assert private.downlink_bytes == downlink_bytes(1, HIDDEN * 4)
    # Unmeasured, the head costs the UE what its last block's step does; the edge's time stays as measured.
    assert private.ue_s == pytest.approx(normal.ue_s + decode_s(4.0, 1))
    assert private.edge_s == normal.edge_s and private.total_s > normal.total_s

    def with_head(scale: float, name: str) -> DeviceModel:
        profile = device(scale, name=name)
        profile.head = block(-2, (4, 4), scale / 10)
        return DeviceModel.from_profile(profile)

    ue, edge = with_head(4.0, "ue"), with_head(1.0, "edge")
    normal, private = (predict(ue, edge, link, 2, 128, private_output=flag).decode for flag in (False, True))
    assert private.ue_s == pytest.approx(normal.ue_s + decode_s(0.4, 1))  # the head runs at past 1 here
    assert private.edge_s == pytest.approx(normal.edge_s - decode_s(0.1, 1))  # and no longer there


def privacy_report(artifact: Artifact, path, recovered: dict[int, float]):
    cells = [{"cut": cut, "variant": "none", "attack": attack, "recovered": share * scale, "tokens": 100}
             for cut, share in recovered.items() for attack, scale in (("nearest-neighbour", 1.0),
                                                                         ("linear-probe", 0.5))]
    path.write_text(json.dumps({"kind": "privacy", "artifact_fingerprint": artifact.manifest.artifact_fingerprint,
                                "text": "synthetic", "tokens": {"train": 100, "test": 100}, "cells": cells}))
    return path


def test_max_token_recovery_bounds_the_split_given_and_the_policy_s(artifact, tmp_path):
    from seam.ue_client.cli import build_parser, checked_split, private_splits

    report = privacy_report(artifact, tmp_path / "privacy.json", {1: 0.9, 2: 0.3, 3: 0.05})
    base = [str(artifact.root), "--privacy-report", str(report), "--max-token-recovery", "0.1"]
    assert private_splits(build_parser().parse_args(base), artifact) == (3, artifact.num_layers)
    assert checked_split(build_parser().parse_args(base), artifact) == 3  # the middle split 2 is not allowed
    with pytest.raises(SeamError, match=r"recovers more than 0.1 of the input tokens; choose one of \[3, 4\]"):
        checked_split(build_parser().parse_args([*base, "--split", "1"]), artifact)
    result = subprocess.run([sys.executable, "-m", "seam.ue_client.cli", *base, "--split", "2", "--prompt", "hi"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1 and "choose one of" in result.stderr
    lenient = [str(artifact.root), "--privacy-report", str(report), "--max-token-recovery", "0.5"]
    assert private_splits(build_parser().parse_args(lenient), artifact) == (2, 3, artifact.num_layers)
    (artifact.root / "analysis").mkdir(exist_ok=True)
    privacy_report(artifact, artifact.root / "analysis" / "privacy-synthetic.json", {1: 0.9, 2: 0.3, 3: 0.05})
    found = [str(artifact.root), "--max-token-recovery", "0.1"]
    assert private_splits(build_parser().parse_args(found), artifact) == (3, artifact.num_layers)
    (artifact.root / "analysis" / "privacy-synthetic.json").unlink()
    with pytest.raises(SeamError, match="no privacy analyses; name the one"):
        private_splits(build_parser().parse_args(found), artifact)
    with pytest.raises(SeamError, match="goes with --max-token-recovery"):
        private_splits(build_parser().parse_args([str(artifact.root), "--privacy-report", str(report)]), artifact)
