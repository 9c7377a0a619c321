"""The edge is closed by default: it listens on loopback unless told otherwise, says so when it is reachable
without keys, and refuses a half-configured CURVE setup in one line instead of admitting everyone."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import run_seam
from seam.edge_server.cli import parse
from seam.runtime.addresses import reachable_beyond_loopback


def edge_server_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "seam.edge_server.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_the_default_bind_is_loopback():
    config, _ = parse(["artifact"])
    assert config.bind == "tcp://127.0.0.1:5555" and not reachable_beyond_loopback(config.bind)


@pytest.mark.parametrize("address, reachable", [
    ("tcp://127.0.0.1:5555", False), ("tcp://127.0.0.7:1", False), ("tcp://localhost:9", False),
    ("tcp://[::1]:9", False), ("ipc:///tmp/edge", False), ("tcp://0.0.0.0:5555", True), ("tcp://*:5555", True),
    ("tcp://[::]:5555", True), ("tcp://192.0.2.1:5555", True),
])
def test_which_addresses_reach_beyond_this_machine(address, reachable):
    assert reachable_beyond_loopback(address) is reachable


def test_half_configured_curve_is_refused_in_one_line(exported, tmp_path):
    artifact = str(exported("tiny-llama"))
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    assert run_seam("keys", str(tmp_path), "--name", "edge").returncode == 0
    cases = {
        ("--allow", str(allowed)): "needs the server's own: give --curve-secret",
        ("--curve-secret", str(tmp_path / "edge.key_secret"), "--allow", str(tmp_path / "missing")): "not a directory",
        ("--curve-secret", str(tmp_path / "edge.key_secret")): "needs an allow-list",
    }
    for flags, fragment in cases.items():
        result = edge_server_cli(artifact, "--bind", "tcp://127.0.0.1:0", *flags)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1 and fragment in lines[0], (flags, result.stderr)
        assert lines[0].startswith("edge_server: error:")
