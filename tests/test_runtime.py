"""edge_server and ue_client as real processes over loopback TCP: parity, concurrency, privacy."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import pytest

from conftest import TINY_PRESETS
from seam.edge_server.process import edge_server
from seam.runtime.artifact import Artifact
from seam.runtime.errors import SeamError
from seam.runtime.executor import SessionPool
from seam.runtime.generation import LocalSplit, generate
from seam.runtime.sampling import Sampler, SamplingParams
from seam.ue_client.client import EdgeClient

PROMPTS = [[5, 17, 42, 99, 7, 3, 250], [64, 8, 12]]
NEW_TOKENS = 10


def local_tokens(artifact: Artifact, prompts, sampling: SamplingParams) -> np.ndarray:
    sampler = Sampler(sampling)
    model = LocalSplit(SessionPool(artifact), artifact.num_layers)
    pad = artifact.manifest.tokenizer["pad_token_id"]
    steps = generate(model, prompts, NEW_TOKENS, pad, lambda logits, _: sampler(logits))
    return np.stack([tokens for tokens, _ in steps], axis=1)


def remote_tokens(client: EdgeClient, split: int, prompts, sampling: SamplingParams, **options) -> np.ndarray:
    with client.session(split, sampling, **options) as session:
        return np.stack(list(session.generate(prompts, NEW_TOKENS)), axis=1)


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_every_split_matches_local_generation(exported, preset):
    artifact = Artifact.open(exported(preset))
    greedy, sampled = SamplingParams(), SamplingParams(temperature=0.9, top_k=40, top_p=0.9, seed=11)
    expected = {params: local_tokens(artifact, PROMPTS, params) for params in (greedy, sampled)}
    with edge_server(artifact.root) as (_, address), EdgeClient(artifact, address) as client:
        for split in artifact.split_points[:-1]:  # the last keeps every layer on the UE
            options = {"allow_token_upload": True} if split == 0 else {}
            for params in (greedy, sampled):
                produced = remote_tokens(client, split, PROMPTS, params, **options)
                assert (produced == expected[params]).all(), f"split {split}, {params}"


def concurrent_ues(artifact: Artifact, address: str, sessions: list[dict], prompts: list, new_tokens: int = NEW_TOKENS):
    """Each of ``sessions`` (``client.session``'s arguments) generating from its ``prompts`` entry on a client of
    its own, all starting together: their tokens and how many of their steps the edge batched."""
    results: dict[int, np.ndarray] = {}
    batched: dict[int, int] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(sessions))

    def ue(index: int) -> None:
        try:
            with EdgeClient(artifact, address) as client:
                barrier.wait(timeout=30)
                with client.session(**sessions[index]) as session:
                    results[index] = np.stack(list(session.generate(prompts[index], new_tokens)), axis=1)
                batched[index] = session.edge_stats["batched_steps"]
        except BaseException as error:  # surfaced in the main thread
            errors.append(error)

    threads = [threading.Thread(target=ue, args=(index,)) for index in range(len(sessions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    return results, sum(batched.values())


def test_eight_concurrent_ues_get_their_solo_tokens(exported):
    artifact = Artifact.open(exported("tiny-llama"))
    prompts = [[[3 + ue, 40 + 2 * ue, 7, 100 + ue][: 1 + ue % 4]] for ue in range(8)]  # batched steps need padding
    params = [SamplingParams(temperature=0.7, seed=ue) if ue % 2 else SamplingParams() for ue in range(8)]
    solo = [local_tokens(artifact, prompts[ue], params[ue]) for ue in range(8)]
    with edge_server(artifact.root) as (_, address):
        results, batched = concurrent_ues(artifact, address, [{"split": 1 + ue % 3, "sampling": params[ue]}
                                                              for ue in range(8)], prompts)
    for index in range(8):
        assert (results[index] == solo[index]).all(), f"UE {index}"
    assert batched > 0, "no decode steps were batched"


def test_edge_never_receives_token_ids(exported, tmp_path):
    artifact = Artifact.open(exported("tiny-qwen2"))
    audit = tmp_path / "messages.jsonl"
    with edge_server(artifact.root, "--log-messages", str(audit)) as (_, address):
        with EdgeClient(artifact, address) as client:
            remote_tokens(client, 1, PROMPTS, SamplingParams())
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    assert len(steps) == NEW_TOKENS
    assert all("input_ids" not in r and r["hidden_states"]["dtype"] == "float32" for r in steps)
    assert {r["kind"] for r in records} == {"hello", "open", "step", "close"}


def test_ue_client_cli_streams_and_reports(exported):
    artifact = exported("tiny-llama")
    with edge_server(artifact) as (_, address):
        result = subprocess.run(
            [sys.executable, "-m", "seam.ue_client.cli", str(artifact), "--server", address, "--split", "2",
             "--prompt", "hello edge", "--max-new-tokens", "6"],
            capture_output=True, text=True, timeout=120,
        )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "6 tokens; time to first token" in result.stderr and "network" in result.stderr


def test_a_prefill_run_in_chunks_gives_the_tokens_of_one_run(exported):
    """The edge runs a long prefill a few positions at a time to bound its memory (bench/prefill_memory.py);
    chunks of 2 positions, so a 7-token prompt takes four runs, give the tokens of one run, sampled too."""
    artifact = Artifact.open(exported("tiny-llama"))
    sampling = SamplingParams(temperature=0.8, top_k=20, seed=5)
    with edge_server(artifact.root, "--prefill-chunk", "2") as (_, address), EdgeClient(artifact, address) as client:
        assert (remote_tokens(client, 1, PROMPTS, sampling) == local_tokens(artifact, PROMPTS, sampling)).all()


def test_the_ue_runs_its_int8_blocks_when_asked(exported, tmp_path):
    from seam.export.exporter import ExportRequest, export

    out = tmp_path / "int8"
    export(ExportRequest(model="tiny-llama", out=out, cuts="2", quantize_ue="int8", quiet=True))
    artifact = Artifact.open(out)
    greedy = SamplingParams()
    model = LocalSplit(SessionPool(artifact), 2, "int8")  # the same int8 UE blocks chained in one process
    pad = artifact.manifest.tokenizer["pad_token_id"]
    expected = np.stack([tokens for tokens, _ in generate(model, PROMPTS, NEW_TOKENS, pad,
                                                          lambda logits, _: Sampler(greedy)(logits))], axis=1)
    with edge_server(artifact.root) as (_, address), EdgeClient(artifact, address, variant="int8") as client:
        with client.session(2, greedy) as session:
            assert session.head.variant == "int8"
            tokens = np.stack(list(session.generate(PROMPTS, NEW_TOKENS)), axis=1)
    assert (tokens == expected).all()
    with pytest.raises(SeamError, match="no 'int8' blocks"):
        EdgeClient(exported("tiny-llama"), "tcp://127.0.0.1:9", variant="int8")
