"""Split fine-tuning through a real edge_server: the same losses as centralised LoRA training, nothing private on
the wire, adapters that load with peft, and bad input that costs no traffic or leaves the session running."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("peft", reason="split fine-tuning needs the finetune extra (peft)")

from conftest import run_seam  # noqa: E402
from seam.edge_server.process import edge_server  # noqa: E402
from seam.finetune.data import batches, tokenize  # noqa: E402
from seam.finetune.local import LocalTrainer  # noqa: E402
from seam.finetune.ue import SplitTrainer  # noqa: E402
from seam.runtime.artifact import Artifact  # noqa: E402
from seam.runtime.protocol import (CutGradient, Error, Hello, OpenTraining, PROTOCOL_VERSION, TrainBackward,  # noqa: E402
                              TrainForward, TrainForwarded, TrainingOpened, Welcome)
from seam.runtime.text import load_tokenizer  # noqa: E402
from seam.runtime.transport import TransportConfig, UeSocket  # noqa: E402
from seam.ue_client.client import EdgeClient  # noqa: E402

SAMPLES = ["the cat sat on the mat", "a dog ran in the park today", "hello edge, hello device",
           "split learning keeps the data here", "adapters on both sides of the cut", "one more line of text"]
STEPS = 20
LORA = {"rank": 4, "alpha": 8.0, "lr": 1e-2, "weight_decay": 0.0, "seed": 3}


def data(artifact: Artifact):
    sequences = tokenize(SAMPLES, load_tokenizer(artifact), 32)
    return batches(sequences, 2, artifact.manifest.tokenizer["pad_token_id"], seed=5)


def audit(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("preset, mode", [("tiny-llama", "edge-loss"), ("tiny-gpt2", "edge-loss"),
                                          ("tiny-llama", "u-shaped"), ("tiny-gpt2", "u-shaped")])
def test_split_training_follows_centralised_lora_step_for_step(exported, tmp_path, preset, mode):
    artifact = Artifact.open(exported(preset))
    local = LocalTrainer(artifact, LORA["rank"], LORA["alpha"], LORA["lr"], LORA["weight_decay"], LORA["seed"])
    batches_here = data(artifact)
    expected = [local.step(next(batches_here)) for _ in range(STEPS)]

    log = tmp_path / "messages.jsonl"
    with edge_server(artifact.root, "--train", "--log-messages", str(log)) as (_, address), \
            EdgeClient(artifact, address) as client:
        split = SplitTrainer(artifact, client, 2, mode, LORA["rank"], LORA["alpha"], LORA["lr"], LORA["weight_decay"],
                             LORA["seed"])
        batches_split = data(artifact)
        losses = [split.step(next(batches_split)) for _ in range(STEPS)]
        split.edge.close()

    assert expected[-1] < expected[0] - 0.5  # it learns, so agreeing means something
    held_here, whole = (sum(p.numel() for p in trainer.model.parameters()) for trainer in (split, local))
    assert held_here < 0.9 * whole  # the UE keeps only the layers (and head) it runs
    assert np.max(np.abs(np.array(losses) - np.array(expected))) <= 1e-5, (losses, expected)
    received = audit(log)
    forwards = [record for record in received if record["kind"] == "train_forward"]
    assert len(forwards) == STEPS
    assert not any("input_ids" in record for record in received)  # token ids never leave the UE
    assert all(("labels" in record) == (mode == "edge-loss") for record in forwards)  # u-shaped: nor labels


def test_ue_client_train_writes_a_peft_adapter_that_reproduces_the_split_model(exported, tmp_path):
    from peft import PeftModel

    from seam.finetune.parts import load_base

    artifact = Artifact.open(exported("tiny-llama"))
    samples = tmp_path / "data.txt"
    samples.write_text("\n".join(SAMPLES) + "\n")
    out = tmp_path / "adapter"
    with edge_server(artifact.root, "--train") as (_, address):
        result = subprocess.run(
            [sys.executable, "-m", "seam.finetune.cli", str(artifact.root), "--server", address, "--data",
             str(samples), "--steps", "12", "--batch", "2", "--rank", "4", "--lr", "0.01", "--out", str(out),
             "--quiet"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    losses = json.loads((out / "losses.json").read_text())["losses"]
    assert len(losses) == 12 and losses[-1] < losses[0]
    assert (out / "loss.png").stat().st_size > 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-llama" and config["task_type"] == "CAUSAL_LM"

    model = PeftModel.from_pretrained(load_base(artifact).model, out)
    tuned = model.merge_and_unload()
    batch = next(data(artifact))
    import torch

    with torch.no_grad():
        ids, mask, labels = (torch.from_numpy(a) for a in (batch.input_ids, batch.attention_mask, batch.labels))
        tuned_loss = tuned(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
        base_loss = load_base(artifact).model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    assert tuned_loss < base_loss - 0.3  # every layer's trained adapter is in the file, the edge's included

    merged = run_seam("export", "tiny-llama", "--out", str(tmp_path / "merged"), "--adapter", str(out), "--quiet")
    assert merged.returncode == 0, merged.stderr  # the export's own parity check ran against the merged model
    manifest = Artifact.open(tmp_path / "merged").manifest
    assert manifest.export_args["adapter"] and manifest.fingerprint != artifact.manifest.fingerprint
    refused = run_seam("export", "tiny-llama", "--out", str(tmp_path / "none"), "--adapter", str(tmp_path))
    assert refused.returncode == 2 and "holds no peft adapter" in refused.stderr
    assert not (tmp_path / "none").exists()


def test_bad_training_data_fails_before_any_traffic(exported, tmp_path):
    artifact = Artifact.open(exported("tiny-llama"))
    empty, binary = tmp_path / "empty.txt", tmp_path / "binary.txt"
    empty.write_text("\n  \n")
    binary.write_bytes(b"\xff\xfe\x00bad")
    for path, fragment in ((tmp_path / "missing.txt", "does not exist"), (empty, "holds no sample"),
                           (binary, "is not UTF-8")):
        result = subprocess.run(
            [sys.executable, "-m", "seam.finetune.cli", str(artifact.root), "--server", "tcp://127.0.0.1:9",
             "--timeout", "1", "--data", str(path)], capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("ue_client train: error:") and fragment in last, last  # not a timeout: no traffic


def test_malformed_training_requests_get_an_error_and_the_session_survives(exported):
    artifact = Artifact.open(exported("tiny-llama"))
    hidden = artifact.manifest.dims.hidden_size
    with edge_server(artifact.root, "--train") as (_, address):
        socket = UeSocket(address, TransportConfig(timeout_s=30))
        assert isinstance(socket.request(Hello(PROTOCOL_VERSION, artifact.manifest.artifact_fingerprint)), Welcome)
        lora, optimizer = {"rank": 2, "alpha": 4, "seed": 0}, {"lr": 0.01, "weight_decay": 0.0}
        refused = [
            (OpenTraining("t", 0, "edge-loss", lora, optimizer), "the cut must leave layers on both sides"),
            (OpenTraining("t", 2, "sideways", lora, optimizer), "training mode 'sideways'"),
            (OpenTraining("t", 2, "edge-loss", {"rank": 2}, optimizer), "lora options must be exactly"),
            (OpenTraining("t", 2, "edge-loss", {**lora, "rank": 65536}, optimizer), "lora rank must be 1 to"),
            (OpenTraining("t", 2, "edge-loss", lora, {**optimizer, "lr": 1e300}), "0 < lr <= 1"),
        ]
        for message, fragment in refused:
            reply = socket.request(message)
            assert isinstance(reply, Error) and fragment in reply.message, reply
        assert isinstance(socket.request(OpenTraining("t", 2, "u-shaped", lora, optimizer)), TrainingOpened)
        states, mask = np.ones((1, 4, hidden), np.float32), np.ones((1, 4), np.int64)
        bad = [
            (TrainForward("t", 0, np.ones((1, 4, hidden + 1), np.float32), mask), "hidden_states must be float32"),
            (TrainForward("t", 0, states, np.ones((1, 3), np.int64)), "attention_mask must be int64"),
            (TrainForward("t", 0, states, mask, labels=np.ones((1, 4), np.int64)), "labels are refused"),
            (TrainForward("t", 0, np.full_like(states, np.nan), mask), "hidden_states hold NaN"),
            (TrainBackward("t", 0, np.ones((1, 4, hidden), np.float32)), "send the forward of step 0 first"),
        ]
        for message, fragment in bad:
            reply = socket.request(message)
            assert isinstance(reply, Error) and fragment in reply.message, (fragment, reply)
        assert isinstance(socket.request(TrainForward("t", 0, states, mask)), TrainForwarded)
        reply = socket.request(TrainBackward("t", 0, np.ones((1, 3, hidden), np.float32)))
        assert isinstance(reply, Error) and "grad must hold" in reply.message
        reply = socket.request(TrainBackward("t", 0, np.ones((1, 4, hidden), np.float32)))
        assert isinstance(reply, CutGradient) and reply.grad.shape == (1, 4, hidden)  # the session carried on
        socket.close()


def test_a_resumed_run_carries_on_exactly_as_an_uninterrupted_one(exported, tmp_path):
    artifact = Artifact.open(exported("tiny-llama"))
    samples = tmp_path / "data.txt"
    samples.write_text("\n".join(SAMPLES) + "\n")

    def train(out: str, *options: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "seam.finetune.cli", str(artifact.root), "--server", address, "--data",
             str(samples), "--batch", "2", "--rank", "4", "--lr", "0.01", "--out", str(tmp_path / out), "--quiet",
             *options], capture_output=True, text=True, timeout=300)

    with edge_server(artifact.root, "--train") as (_, address):
        whole = train("whole", "--steps", "6")
        first = train("parts", "--steps", "3", "--checkpoint-every", "3")
        rest = train("parts", "--steps", "6", "--resume", "--checkpoint-every", "3")
        changed = train("parts", "--steps", "9", "--resume", "--rank", "8")
        missing = train("elsewhere", "--steps", "6", "--resume")
    for result in (whole, first, rest):
        assert result.returncode == 0, result.stderr
    expected = json.loads((tmp_path / "whole" / "losses.json").read_text())["losses"]
    resumed = json.loads((tmp_path / "parts" / "losses.json").read_text())["losses"]
    assert len(resumed) == 6 and np.max(np.abs(np.array(resumed) - np.array(expected))) <= 1e-5
    assert changed.returncode == 2 and "written with rank 4, this run has 8" in changed.stderr
    assert missing.returncode == 2 and "no checkpoint at" in missing.stderr



def test_training_jobs_share_the_frozen_base_weights(exported):
    from seam.finetune.parts import attach_lora, frozen_copy, load_base
    from seam.runtime.spans import Span

    base = load_base(Artifact.open(exported("tiny-llama")))
    job = frozen_copy(base.model)
    attach_lora(job, type(base.family)(job), Span(2, 4), rank=2, alpha=4.0, seed=0)
    base_storage = {parameter.data_ptr() for parameter in base.model.parameters()}
    frozen = [parameter for parameter in job.parameters() if not parameter.requires_grad]
    assert frozen and all(parameter.data_ptr() in base_storage for parameter in frozen)
    assert not any("lora" in name for name, _ in base.model.named_modules())  # the base itself is unchanged


def test_training_sessions_steps_and_memory_are_bounded(exported):
    artifact = Artifact.open(exported("tiny-llama"))
    hidden = artifact.manifest.dims.hidden_size
    # A step of 8 x 16 tokens keeps about 2 MiB for its backward: 3 MiB holds one such step, never 16 x 16
    with edge_server(artifact.root, "--train", "--max-training-sessions", "2", "--max-length", "16",
                     "--training-memory-mb", "3") as (_, address):
        socket = UeSocket(address, TransportConfig(timeout_s=30))
        assert isinstance(socket.request(Hello(PROTOCOL_VERSION, artifact.manifest.artifact_fingerprint)), Welcome)
        lora, optimizer = {"rank": 2, "alpha": 4, "seed": 0}, {"lr": 0.01, "weight_decay": 0.0}
        for name in ("a", "b"):
            assert isinstance(socket.request(OpenTraining(name, 2, "edge-loss", lora, optimizer)), TrainingOpened)
        reply = socket.request(OpenTraining("c", 2, "edge-loss", lora, optimizer))
        assert isinstance(reply, Error) and "2 sessions at most" in reply.message, reply

        def forward(session: str, batch: int, length: int):
            return socket.request(TrainForward(session, 0, np.ones((batch, length, hidden), np.float32),
                                               np.ones((batch, length), np.int64), np.ones((batch, length), np.int64)))

        reply = forward("a", 1, 17)
        assert isinstance(reply, Error) and "at most 16 positions" in reply.message, reply
        reply = forward("a", 16, 16)
        assert isinstance(reply, Error) and "more than the edge's whole training memory" in reply.message, reply
        assert isinstance(forward("a", 8, 16), TrainForwarded)
        reply = forward("b", 8, 16)  # a's graph waits for its backward: no room for a second one now
        assert isinstance(reply, Error) and reply.code == "busy" and "training memory" in reply.message, reply
        assert isinstance(socket.request(TrainBackward("a", 0, np.ones(1, np.float32))), CutGradient)
        assert isinstance(forward("b", 8, 16), TrainForwarded)  # a's graph is gone
        socket.close()
