"""Federated split fine-tuning with real processes: three ue_client trainers in one job against an edge_server,
their own adapters averaged every round, one of them killed mid-round and the round finished without it."""

from __future__ import annotations

import queue
import subprocess
import sys
import threading

import numpy as np
import pytest

pytest.importorskip("peft", reason="split fine-tuning needs the finetune extra (peft)")

from seam.edge_server.process import edge_server  # noqa: E402
from seam.finetune.federation import Federation, fedavg  # noqa: E402
from seam.runtime.artifact import Artifact  # noqa: E402
from seam.runtime.errors import SeamError  # noqa: E402

DATA = {
    "ue-a": ["the cat sat on the mat", "a cat and a hat", "the mat was flat"],
    "ue-b": ["a dog ran in the park", "the dog barked twice", "parks have dogs"],
    "ue-c": ["split learning keeps data home", "adapters move, data stays", "edge and device"],
}


def test_fedavg_weighs_each_upload_by_its_samples():
    uploads = {"a": (1, {"w": np.array([0.0, 3.0])}), "b": (3, {"w": np.array([4.0, 3.0])})}
    assert np.allclose(fedavg(uploads)["w"], [3.0, 3.0])


def test_a_round_closes_when_all_upload_or_its_time_runs_out():
    federation = Federation(round_timeout_s=5.0)
    weights = {"w": np.ones(2, np.float32)}
    federation.upload("job", "a", 0, 2, weights, now=0.0)
    assert not federation.fetch("job", 0, ["a", "b"], now=1.0).done
    federation.upload("job", "b", 0, 2, {"w": np.zeros(2, np.float32)}, now=2.0)
    closed = federation.fetch("job", 0, ["a", "b"], now=2.0)
    assert closed.done and closed.averaged == ["a", "b"] and closed.dropped == []
    assert np.allclose(closed.average["w"], 0.5)

    federation.upload("job", "a", 1, 2, weights, now=10.0)
    assert not federation.fetch("job", 1, ["a", "b"], now=14.0).done
    late = federation.fetch("job", 1, ["a", "b"], now=15.5)
    assert late.done and late.averaged == ["a"] and late.dropped == ["b"]
    federation.upload("job", "b", 1, 2, {"w": np.zeros(2, np.float32)}, now=16.0)  # late: takes the average
    after = federation.fetch("job", 1, ["a", "b"], now=16.0)
    assert after.averaged == ["a"] and np.allclose(after.average["w"], 1.0)
    federation.upload("job", "b", 2, 2, weights, now=20.0)
    with pytest.raises(SeamError, match="differ from the other UEs"):
        federation.upload("job", "a", 2, 2, {"w": np.ones(3, np.float32)}, now=20.0)
    with pytest.raises(SeamError, match="not finite"):
        federation.upload("job", "c", 3, 2, {"w": np.array([np.nan], np.float32)}, now=20.0)


def test_a_round_of_a_sized_job_waits_for_ues_that_have_not_joined_yet():
    federation = Federation(round_timeout_s=5.0)
    federation.upload("job", "a", 0, 1, {"w": np.ones(1, np.float32)}, now=0.0)
    assert not federation.fetch("job", 0, ["a"], now=1.0, size=2).done  # b is still loading its model
    federation.upload("job", "b", 0, 1, {"w": np.ones(1, np.float32)}, now=2.0)
    assert federation.fetch("job", 0, ["a", "b"], now=2.0, size=2).averaged == ["a", "b"]


def trainer(artifact: Artifact, address: str, name: str, tmp_path) -> subprocess.Popen:
    data = tmp_path / f"{name}.txt"
    data.write_text("\n".join(DATA[name]) + "\n")
    return subprocess.Popen(
        [sys.executable, "-m", "seam.finetune.cli", str(artifact.root), "--server", address, "--data", str(data),
         "--job", "fed", "--job-size", "3", "--rounds", "3", "--steps", "4", "--batch", "2", "--rank", "4", "--lr", "0.01",
         "--name", name, "--out", str(tmp_path / f"adapter-{name}"), "--quiet", "--timeout", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def lines_of(process: subprocess.Popen) -> queue.Queue:
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True).start()
    return lines


def test_three_ues_federate_and_one_killed_mid_round_is_left_out(exported, tmp_path):
    from safetensors.numpy import load_file

    artifact = Artifact.open(exported("tiny-llama"))
    log = tmp_path / "edge.log"
    with open(log, "w") as edge_log, \
            edge_server(artifact.root, "--train", "--round-timeout", "15", log=edge_log) as (_, address):
        processes = {name: trainer(artifact, address, name, tmp_path) for name in DATA}
        victim = lines_of(processes["ue-c"])
        while "round 1/3" not in (line := victim.get(timeout=240)):
            pass
        assert "averaged with 3 UEs" in line, line
        processes["ue-c"].kill()  # in round 2
        processes["ue-c"].wait(timeout=30)
        outputs = {name: processes[name].communicate(timeout=300) for name in ("ue-a", "ue-b")}

    for name, (_, stderr) in outputs.items():
        assert processes[name].returncode == 0, stderr
        rounds = [line for line in stderr.splitlines() if ": round " in line]
        assert len(rounds) == 3 and "averaged with 3 UEs" in rounds[0], stderr
        # ue-c may have uploaded round 2 before the kill landed; round 3 it can only miss.
        assert "averaged with 3 UEs" in rounds[1] or "dropped out: ue-c" in rounds[1], stderr
        assert "averaged with 2 UEs (ue-a, ue-b); dropped out: ue-c" in rounds[2], stderr
    assert "dropped out: ue-c" in log.read_text()
    # Both ended with the last round's average on their own layers and the job's shared edge-side adapters.
    first, second = (load_file(tmp_path / f"adapter-{name}" / "adapter_model.safetensors") for name in ("ue-a", "ue-b"))
    assert first.keys() == second.keys() and all(np.array_equal(first[key], second[key]) for key in first)
