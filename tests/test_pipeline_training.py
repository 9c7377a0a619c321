"""Pipeline-parallel split fine-tuning: three real processes (the UE and two edge nodes) over gloo on loopback,
each holding its own span of layers, against one process training the whole model the same way."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from seam.finetune.data import batches, read_samples, tokenize
from seam.finetune.pipeline import PipelineJob, fixed_batches, reference_run
from seam.runtime.artifact import Artifact
from seam.runtime.text import load_tokenizer

SAMPLES = [f"sample {i}: the quick brown fox number {i} jumps over {i % 3} lazy dogs" for i in range(24)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(artifact, ranks, flags, data, out) -> list[subprocess.Popen]:
    port = free_port()
    return [subprocess.Popen(
        [sys.executable, "-m", "seam.cli", "train-pipeline", str(artifact.root), "--rank", str(rank),
         "--rendezvous", f"tcp://127.0.0.1:{port}", *flags, *(("--data", str(data), "--out", str(out)) if rank == 0
                                                                 else ())],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        for rank in ranks]


def finish(processes, timeout: float = 240) -> list[tuple[int, str, str]]:
    results = []
    for process in processes:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            raise
        results.append((process.returncode, out, err))
    return results


@pytest.mark.parametrize("schedule, batch, microbatches, mode", [("gpipe", 4, 2, "edge-loss"),
                                                                  ("1f1b", 6, 3, "edge-loss"),
                                                                  ("1f1b", 6, 3, "u-shaped")])
def test_three_stages_train_as_one_process_does(exported, tmp_path, schedule, batch, microbatches, mode):
    artifact = Artifact.open(exported("tiny-llama"))
    data = tmp_path / "data.txt"
    data.write_text("\n".join(SAMPLES) + "\n")
    job = PipelineJob((1, 3), artifact.num_layers, schedule, microbatches, batch, seq_len=16, steps=3, rank=4, seed=7)
    flags = ["--stages", "1,3", "--schedule", schedule, "--microbatches", str(microbatches), "--batch", str(batch),
             "--seq-len", "16", "--mode", mode,
             "--steps", "3", "--lora-rank", "4", "--seed", "7", "--timeout", "60"]
    results = finish(launch(artifact, range(3), flags, data, tmp_path / "adapter"))
    assert all(code == 0 for code, _, _ in results), [err[-2000:] for _, _, err in results]
    losses = [float(x) for x in re.findall(r"loss ([\d.]+)", results[0][1])]
    shares = [float(x) for x in re.findall(r"^\s*\d+\s+\d+-\d+\s+([\d.]+)$", results[0][1], re.M)]
    assert len(shares) == 3 and all(0 < share < 1 for share in shares), results[0][1]

    pad_id = artifact.manifest.tokenizer["pad_token_id"]
    sequences = tokenize(read_samples(data), load_tokenizer(artifact), 16)
    stream = fixed_batches(batches(sequences, batch, pad_id, 7), 16, pad_id)
    expected, weights = reference_run(artifact, job, [next(stream) for _ in range(3)])
    assert len(losses) == 3 and losses == pytest.approx(expected, abs=1e-5), (losses, expected)

    from safetensors.numpy import load_file

    written = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert len(written) == len(weights) > 0
    for name, value in weights.items():
        stored = next(array for key, array in written.items() if name.removesuffix(".default.weight") in key)
        # Adam divides by the root of tiny second moments: sums taken in another order move a weight by ~1e-5.
        assert np.abs(stored - value).max() < 1e-4, (name, float(np.abs(stored - value).max()))


def test_a_missing_stage_is_one_line_within_the_timeout(exported, tmp_path):
    artifact = Artifact.open(exported("tiny-llama"))
    data = tmp_path / "data.txt"
    data.write_text("\n".join(SAMPLES) + "\n")
    started = time.monotonic()
    results = finish(launch(artifact, [0, 1], ["--stages", "1,3", "--timeout", "5", "--batch", "4"], data,
                            tmp_path / "adapter"), timeout=120)
    assert all(code != 0 for code, _, _ in results)
    assert time.monotonic() - started < 90
    assert all(err.strip().splitlines()[-1].startswith("seam train-pipeline: error:") for _, _, err in results), \
        [err[-1000:] for _, _, err in results]
    assert not (tmp_path / "adapter").exists()


def test_bad_stages_and_a_remote_rendezvous_are_refused(exported, tmp_path):
    from conftest import run_seam

    artifact = exported("tiny-llama")
    uneven = run_seam("train-pipeline", str(artifact), "--stages", "3,2", "--rank", "1", "--rendezvous",
                      "tcp://127.0.0.1:1")
    starved = run_seam("train-pipeline", str(artifact), "--stages", "1,3", "--rank", "1", "--rendezvous",
                       "tcp://127.0.0.1:1", "--microbatches", "2", "--batch", "4")
    remote = run_seam("train-pipeline", str(artifact), "--stages", "2", "--rank", "1", "--rendezvous",
                      "tcp://10.1.2.3:29500")
    assert uneven.returncode != 0 and "must rise strictly" in uneven.stderr
    assert starved.returncode != 0 and "--microbatches 3 or more" in starved.stderr
    assert remote.returncode != 0 and "--allow-network" in remote.stderr


def test_a_run_resumed_from_its_checkpoints_goes_on_as_one_uninterrupted(exported, tmp_path):
    artifact = Artifact.open(exported("tiny-llama"))
    data = tmp_path / "data.txt"
    data.write_text("\n".join(SAMPLES) + "\n")

    def run(name: str, steps: int, *extra: str) -> list[float]:
        checkpoints = [("--checkpoint", str(tmp_path / f"{name}-{rank}")) for rank in range(2)]
        port = free_port()
        processes = [subprocess.Popen(
            [sys.executable, "-m", "seam.cli", "train-pipeline", str(artifact.root), "--rank", str(rank),
             "--rendezvous", f"tcp://127.0.0.1:{port}", "--stages", "2", "--schedule", "gpipe", "--batch", "4",
             "--microbatches", "2", "--seq-len", "16", "--steps", str(steps), *checkpoints[rank], *extra,
             *(("--data", str(data), "--out", str(tmp_path / name)) if rank == 0 else ())],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
        results = finish(processes)
        assert all(code == 0 for code, _, _ in results), [err[-1500:] for _, _, err in results]
        return [float(x) for x in re.findall(r"loss ([\d.]+)", results[0][1])]

    whole = run("whole", 4)
    first = run("cut", 2, "--checkpoint-every", "2")
    rest = run("cut", 4, "--resume")
    assert first + rest == pytest.approx(whole, abs=1e-6) and len(rest) == 2


@pytest.mark.parametrize("ranks, microbatches", [(2, 1), (2, 4), (3, 3), (4, 6)])
def test_the_u_shaped_order_runs_every_action_once_after_what_it_needs(ranks, microbatches):
    from seam.finetune.pipeline import u_shaped_order

    for backward_first in (True, False):
        order = u_shaped_order(ranks, microbatches, backward_first)
        assert len({len(actions) for actions in order}) == 1  # a rank posts its receives at every step
        at = {action: step for actions in order for step, action in enumerate(actions) if action is not None}
        stages = ranks + 1
        assert sorted(at) == sorted((s, k, m) for s in range(stages) for k in "FB" for m in range(microbatches))
        assert all(action[0] % ranks == rank for rank, actions in enumerate(order) for action in actions if action)
        for (stage, kind, micro), step in at.items():
            before = ((stage - 1, "F", micro) if stage else None) if kind == "F" else \
                (stage + 1, "B", micro) if stage < stages - 1 else (stage, "F", micro)
            assert before is None or at[before] < step
    # 1F1B starts a micro-batch's backward before the last forward when there is room: GPipe never does.
    gpipe, one_f_one_b = (u_shaped_order(3, 6, first) for first in (False, True))
    last_forward = lambda order: max(s for a in order for s, x in enumerate(a) if x and x[1] == "F")
    first_backward = lambda order: min(s for a in order for s, x in enumerate(a) if x and x[1] == "B")
    assert first_backward(one_f_one_b) < last_forward(one_f_one_b)
    assert first_backward(gpipe) > last_forward(gpipe)


def test_in_u_shaped_mode_the_head_stays_on_the_ue(exported):
    from torch import nn

    from seam.finetune.pipeline import build_stages

    artifact = Artifact.open(exported("tiny-llama"))
    job = PipelineJob((1, 3), artifact.num_layers, "1f1b", 3, 6, mode="u-shaped")
    ue, _ = build_stages(artifact, job, 0)
    edge, peft_model = build_stages(artifact, job, 2)
    assert [index for index, _ in ue] == [0, 3] and ue[1][1].part.head and ue[1][1].last
    assert [index for index, _ in edge] == [2] and not edge[0][1].part.head and not edge[0][1].last
    assert isinstance(peft_model.get_output_embeddings(), nn.Identity)  # the last node holds no head at all
