"""``seam plan-round`` writes FedsLLM's round plan, and ``ue_client DIR train --plan`` trains by it: the UE's
planned cut, its link held to the planned rate."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

pytest.importorskip("cvxpy", reason="round planning needs the finetune extra (scipy, cvxpy)")
pytest.importorskip("peft", reason="split fine-tuning needs the finetune extra (peft)")

from conftest import run_seam  # noqa: E402
from seam.edge_server.process import edge_server  # noqa: E402
from seam.runtime.artifact import Artifact  # noqa: E402

LAYERS = 4


def setup_file(tmp_path) -> str:
    ues = [{"name": name, "layer_s": [slow * 0.01] * LAYERS, "samples": 8, "gain_db": gain, "power_dbm": 20}
           for name, slow, gain in (("near", 1.0, -80), ("middle", 2.0, -95), ("far", 1.5, -110))]
    setup = {"bandwidth_mhz": 1, "noise_dbm_per_hz": -174, "iterations": 5, "min_cut": 1,
             "edge_layer_s": [0.001] * LAYERS, "cut_bytes": [128 * 64 * 2] * LAYERS,
             "adapter_bytes": [4096] * LAYERS, "ues": ues}
    path = tmp_path / "setup.json"
    path.write_text(json.dumps(setup))
    return str(path)


def test_plan_round_then_train_by_the_plan(exported, tmp_path):
    artifact = Artifact.open(exported("tiny-llama"))
    plan_path = tmp_path / "plan.json"
    planned = run_seam("plan-round", setup_file(tmp_path), "--out", str(plan_path))
    assert planned.returncode == 0, planned.stderr
    plan = json.loads(plan_path.read_text())
    rows = {row["name"]: row for row in plan["ues"]}
    assert set(rows) == {"near", "middle", "far"}
    assert sum(row["share"] for row in rows.values()) <= 1 + 1e-6
    assert all(1 <= row["cut"] < LAYERS and row["rate_mbit"] > 0 for row in rows.values())
    assert plan["round_s"] <= plan["equal_shares_round_s"] + 1e-9
    assert rows["far"]["share"] > rows["near"]["share"]  # the weak channel needs more band for the same round

    samples = tmp_path / "data.txt"
    samples.write_text("the cat sat on the mat\na dog ran in the park\n")
    command = [sys.executable, "-m", "seam.finetune.cli", str(artifact.root), "--data", str(samples),
               "--steps", "2", "--batch", "2", "--quiet", "--out", str(tmp_path / "adapter"), "--plan", str(plan_path)]
    with edge_server(artifact.root, "--train") as (_, address):
        trained = subprocess.run([*command, "--server", address, "--name", "far"], capture_output=True, text=True,
                                 timeout=300)
    assert trained.returncode == 0, trained.stderr
    held = re.search(r"at cut (\d)/4 .* link held to ([\d.]+) Mbit/s", trained.stderr)
    assert held and int(held.group(1)) == rows["far"]["cut"]
    assert float(held.group(2)) == pytest.approx(rows["far"]["rate_mbit"], abs=0.01)

    for options, fragment in (((), "give --name"), (("--name", "mars"), "has no UE named 'mars'"),
                              (("--name", "far", "--cut", "1"), "not --cut")):
        refused = subprocess.run([*command, "--server", "tcp://127.0.0.1:9", *options], capture_output=True,
                                 text=True, timeout=120)
        assert refused.returncode == 2 and fragment in refused.stderr, refused.stderr
    broken = tmp_path / "broken.json"
    broken.write_text('{"ues": []}')
    refused = run_seam("plan-round", str(broken), "--out", str(tmp_path / "none.json"))
    assert refused.returncode == 2 and "is malformed" in refused.stderr
    assert not (tmp_path / "none.json").exists()
