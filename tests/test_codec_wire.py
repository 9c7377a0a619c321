"""Activation codecs through a real edge_server: negotiated at the handshake, switchable per step, checked on
arrival; and impairments at the cut."""

from __future__ import annotations

import numpy as np
import pytest

from seam.edge_server.process import edge_server
from seam.planning.snapshot import Decision
from seam.runtime.artifact import Artifact
from seam.runtime.codecs import CODECS
from seam.runtime.errors import SeamError
from seam.runtime.impairments import parse as parse_impairment
from seam.runtime.protocol import Step, StepResult
from seam.runtime.sampling import SamplingParams
from test_runtime import NEW_TOKENS, PROMPTS, local_tokens
from seam.ue_client.client import EdgeClient


def generate(client: EdgeClient, codec_by_step: dict[int, str] | None = None, impairment=None):
    with client.session(2) as session:
        session.impairment = impairment

        def switch(snapshot):  # the split stays, the codec changes
            codec = (codec_by_step or {}).get(snapshot.step, snapshot.codec)
            return Decision(snapshot.split, {}, "switch codec", codec=codec)

        tokens = np.stack(list(session.generate(PROMPTS, NEW_TOKENS, switch)), axis=1)
    return tokens, session


def test_every_codec_crosses_and_smaller_codecs_send_fewer_bytes(exported):
    artifact = Artifact.open(exported("tiny-llama"))
    expected = local_tokens(artifact, PROMPTS, SamplingParams())
    sent = {}
    with edge_server(artifact.root) as (_, address):
        for name in CODECS:
            with EdgeClient(artifact, address, codec=name) as client:
                assert client.codec == name and not client.warnings
                tokens, _ = generate(client)
                sent[name] = client.socket.bytes_sent
            if name in ("fp32", "fp16", "bf16"):  # close enough that greedy tokens of a peaked model agree
                assert (tokens == expected).all(), name
            assert tokens.shape == expected.shape
    assert sent["fp32"] > sent["fp16"] > sent["int8"] > sent["int4"]
    assert sent["bf16"] == pytest.approx(sent["fp16"], rel=0.01)  # the same bytes, headers aside


def test_the_codec_may_change_between_steps(exported):
    artifact = Artifact.open(exported("tiny-llama"))
    with edge_server(artifact.root) as (_, address), EdgeClient(artifact, address) as client:
        tokens, session = generate(client, {2: "int8", 4: "fp16", 6: "fp32"})
    assert session.codec == "fp32" and tokens.shape == (len(PROMPTS), NEW_TOKENS)


def test_a_codec_the_edge_does_not_offer_falls_back_with_a_warning(exported):
    artifact = Artifact.open(exported("tiny-llama"))
    with edge_server(artifact.root, "--codecs", "fp16,int8") as (_, address):
        with EdgeClient(artifact, address, codec="int4") as client:
            assert client.codec == "int8"  # the cheapest offered one at least as accurate
            assert "int4 is not supported by the peer; using int8" in client.warnings[0]
            with client.session(2) as session:
                steps = session.generate(PROMPTS, NEW_TOKENS)
                next(steps)
                session.codec = "bf16"
                with pytest.raises(SeamError, match="offered no 'bf16' codec"):
                    next(steps)


def test_a_malformed_coded_step_is_refused_and_the_session_goes_on(exported):
    artifact = Artifact.open(exported("tiny-llama"))
    hidden_size = artifact.manifest.dims.hidden_size
    expected = local_tokens(artifact, PROMPTS, SamplingParams())
    with edge_server(artifact.root) as (_, address), EdgeClient(artifact, address) as client:
        with client.session(2) as session:
            steps = session.generate(PROMPTS, NEW_TOKENS)
            produced = [next(steps)]
            mask = np.concatenate([session.mask, np.ones((len(PROMPTS), 0), np.int64)], axis=1)
            positions = np.zeros((len(PROMPTS), 1), np.int64)
            data = np.zeros((len(PROMPTS), 1, hidden_size), np.int8)
            wrong_scale = np.ones((len(PROMPTS), 2), np.float32)  # one scale per token row, not two
            bad = Step(session.session_id, session.edge_step, mask, positions, hidden_states=data, codec="int8",
                       hidden_scale=wrong_scale)
            with pytest.raises(SeamError, match="int8"):
                session.request(bad, StepResult)
            unknown = Step(session.session_id, session.edge_step, mask, positions, hidden_states=data, codec="zip")
            with pytest.raises(SeamError, match="codec 'zip' is not one this server offered"):
                session.request(unknown, StepResult)
            produced += list(steps)
    assert (np.stack(produced, axis=1) == expected).all()


def test_impairments_at_the_cut_change_what_the_edge_sees(exported):
    artifact = Artifact.open(exported("tiny-llama"))
    expected = local_tokens(artifact, PROMPTS, SamplingParams())
    with edge_server(artifact.root) as (_, address), EdgeClient(artifact, address) as client:
        light, _ = generate(client, impairment=parse_impairment("awgn:60"))
        heavy, _ = generate(client, impairment=parse_impairment("erasure:0.9"))
    assert (light == expected).all()  # 60 dB of SNR changes nothing a greedy step can see
    assert not (heavy == expected).all()  # nine in ten values erased does
