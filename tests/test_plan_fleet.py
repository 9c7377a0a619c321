"""``seam plan-fleet`` assigns training UEs to a fleet's edges with DASHF, and ``ue_client DIR train --plan`` trains on
the edge the plan names, its link held to the planned rate, comparing its rounds with the predicted delay."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from contextlib import ExitStack

import pytest

pytest.importorskip("cvxpy", reason="fleet planning needs the allocation extra (scipy, cvxpy)")
pytest.importorskip("peft", reason="split fine-tuning needs the finetune extra (peft)")

from conftest import run_seam  # noqa: E402
from seam.edge_server.process import edge_server  # noqa: E402


def fleet_setup(tmp_path, addresses: list[str]) -> str:
    """Two UEs, each near one edge and far from the other; each edge takes one UE."""
    ues = [{"name": name, "gain_db": gains, "power_dbm": 20, "upload_bytes": 2e5, "local_flop": 1e9,
            "server_flop": 4e9, "top_flops": 1e10, "energy_coeff": 1e-28, "quality": 1.0}
           for name, gains in (("by-a", [-80, -120]), ("by-b", [-120, -80]))]
    edges = [{"address": address, "flops": 1e11, "bandwidth_mhz": 1, "capacity": 1} for address in addresses]
    path = tmp_path / "fleet.json"
    path.write_text(json.dumps({"noise_dbm_per_hz": -174, "edges": edges, "ues": ues}))
    return str(path)


def test_plan_fleet_assigns_each_ue_its_edge_and_training_follows_it(exported, tmp_path):
    artifact = exported("tiny-llama")
    samples = tmp_path / "data.txt"
    samples.write_text("the cat sat on the mat\na dog ran in the park\n")
    logs = [io.StringIO(), io.StringIO()]
    with ExitStack() as stack:
        addresses = [stack.enter_context(edge_server(artifact, "--train", "--log-level", "info", log=log))[1]
                     for log in logs]
        plan_path = tmp_path / "plan.json"
        planned = run_seam("plan-fleet", fleet_setup(tmp_path, addresses), "--out", str(plan_path))
        assert planned.returncode == 0, planned.stderr
        plan = json.loads(plan_path.read_text())
        rows = {row["name"]: row for row in plan["ues"]}
        assert rows["by-a"]["server"] == addresses[0] and rows["by-b"]["server"] == addresses[1]
        assert all(row["rate_mbit"] > 0 and row["delay_s"] > 0 and 0 <= row["offload"] <= 1 for row in rows.values())
        assert plan["ratio"] >= plan["strongest_edge_ratio"] - 1e-9

        command = [sys.executable, "-m", "seam.finetune.cli", str(artifact), "--data", str(samples), "--steps", "2",
                   "--batch", "2", "--quiet", "--out", str(tmp_path / "adapter"), "--plan", str(plan_path)]
        trained = subprocess.run([*command, "--name", "by-b", "--cut", "2"], capture_output=True, text=True,
                                 timeout=300)
        assert trained.returncode == 0, trained.stderr
        refused = subprocess.run([*command, "--name", "by-b", "--server", addresses[0]], capture_output=True,
                                 text=True, timeout=120)
    assert "open  training" in logs[1].getvalue() and "open  training" not in logs[0].getvalue()
    held = re.search(r"at cut 2/4 .* link held to ([\d.]+) Mbit/s", trained.stderr)
    assert held and float(held.group(1)) == pytest.approx(rows["by-b"]["rate_mbit"], abs=0.01)
    compared = re.search(rf"a round took ([\d.]+) s .* on {re.escape(addresses[1])}; the plan predicted ([\d.]+) s",
                         trained.stderr)
    assert compared and float(compared.group(2)) == pytest.approx(rows["by-b"]["delay_s"], abs=0.01)
    assert refused.returncode == 2 and f"assigns by-b to {addresses[1]}" in refused.stderr


def test_a_malformed_fleet_setup_is_refused_in_one_line(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"edges": [], "ues": [{"name": "x"}]}')
    refused = run_seam("plan-fleet", str(broken), "--out", str(tmp_path / "none.json"))
    assert refused.returncode == 2 and "is malformed" in refused.stderr and len(refused.stderr.splitlines()) == 1
    assert not (tmp_path / "none.json").exists()
