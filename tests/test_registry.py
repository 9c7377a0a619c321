"""The fleet's registry: a real etcd on loopback, edge servers announcing themselves with their load, UEs
finding them there and failing over when one dies, and the registry restarted under running sessions."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager

import numpy as np
import pytest

from seam.edge_server.process import edge_server
from seam.runtime.artifact import Artifact
from seam.runtime.errors import SeamError
from seam.runtime.transport import TransportConfig
from seam.ue_client.client import EdgeClient
from conftest import run_seam
from test_fleet import LONG, SEEDED, expected_tokens
from test_runtime import PROMPTS

pytest.importorskip("etcd3gw", reason="the registry's client is the 'fleet' extra: pip install -e '.[fleet]'")
if shutil.which("etcd") is None:
    pytest.skip("etcd is not installed (Debian: apt-get install etcd-server; make test installs it as root)",
                allow_module_level=True)

from seam.runtime.registry import LEASE_TTL_S, Registry  # noqa: E402


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Etcd:
    """A single-node etcd on loopback with its data in ``data_dir``, which a test may stop and start again on the
    same port."""

    def __init__(self, data_dir):
        self.data_dir, self.ports = data_dir, (free_port(), free_port())
        self.url = f"http://127.0.0.1:{self.ports[0]}"
        self.process: subprocess.Popen | None = None

    def start(self) -> Etcd:
        peer = f"http://127.0.0.1:{self.ports[1]}"
        self.process = subprocess.Popen(
            ["etcd", "--data-dir", str(self.data_dir), "--listen-client-urls", self.url, "--advertise-client-urls",
             self.url, "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer, "--initial-cluster",
             f"default={peer}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: self._answers(), 20, "etcd started")
        return self

    def _answers(self) -> bool:
        assert self.process.poll() is None, "etcd exited"
        try:
            Registry(self.url, 1.0).edges()
            return True
        except SeamError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=20)


@contextmanager
def etcd(data_dir):
    server = Etcd(data_dir)
    try:
        yield server.start()
    finally:
        server.stop()


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not (found := condition()):
        assert time.monotonic() < deadline, f"{what} within {timeout_s} s"
        time.sleep(0.1)
    return found


def test_edges_announce_their_load_and_a_dead_one_drops_out(exported, tmp_path):
    artifact = Artifact.open(exported("tiny-llama"))
    with etcd(tmp_path / "etcd") as store, ExitStack() as stack:
        url = store.url
        started = [stack.enter_context(edge_server(artifact.root, "--registry", url)) for _ in range(2)]
        registry = Registry(url)
        entries = wait_for(lambda: len(registry.edges()) == 2 and registry.edges(), 10, "both edges announced")
        assert {entry["address"] for entry in entries} == {address for _, address in started}
        assert all(entry["fingerprint"] == artifact.manifest.artifact_fingerprint and entry["load"]["sessions"] == 0
                   for entry in entries)
        listed = run_seam("fleet", "--registry", url)
        assert listed.returncode == 0 and all(address in listed.stdout for _, address in started)
        assert registry.addresses("another artifact") == []

        started[0][0].kill()
        started[0][0].wait()
        killed = time.monotonic()
        wait_for(lambda: registry.addresses(artifact.manifest.artifact_fingerprint) == [started[1][1]],
                 LEASE_TTL_S + 3, "the killed edge's key expired")
        assert time.monotonic() - killed < LEASE_TTL_S + 3

        started[1][0].send_signal(signal.SIGINT)  # a clean exit withdraws the key at once
        started[1][0].wait(timeout=20)
        assert registry.edges() == []


def test_a_ue_finds_its_edges_in_the_registry_and_survives_a_registry_restart_and_a_kill(exported, tmp_path):
    artifact = Artifact.open(exported("tiny-llama"))
    expected = expected_tokens(artifact, SEEDED, LONG)
    with etcd(tmp_path / "etcd") as store, ExitStack() as stack:
        fleet = {address: process for process, address in
                 (stack.enter_context(edge_server(artifact.root, "--registry", store.url)) for _ in range(2))}
        registry = Registry(store.url)
        wait_for(lambda: len(registry.edges()) == 2, 10, "both edges announced")
        with EdgeClient(artifact, "tcp://127.0.0.1:9", TransportConfig(timeout_s=2), registry=store.url) as client:
            first = client.server
            assert first in fleet and client.servers == sorted(fleet)
            session = client.session(2, SEEDED)
            steps = session.generate(PROMPTS, LONG)
            produced = [next(steps) for _ in range(6)]
            store.stop()  # the registry goes down under the running session, which goes on
            produced += [next(steps) for _ in range(4)]
            store.start()
            wait_for(lambda: len(registry.edges()) == 2, 10, "both edges announced again")
            fleet[first].kill()
            fleet[first].wait()
            produced += list(steps)
    assert (np.stack(produced, axis=1) == expected).all()
    (failover,) = session.moves
    assert failover.edge != first and failover.edge in fleet


def test_an_edge_refuses_a_registry_it_cannot_reach_in_one_line(exported):
    artifact = exported("tiny-llama")
    result = subprocess.run([sys.executable, "-m", "seam.edge_server.cli", str(artifact), "--bind", "tcp://127.0.0.1:0",
                             "--registry", "http://127.0.0.1:9"], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("edge_server: error: the registry at http://127.0.0.1:9")
    bad = subprocess.run([sys.executable, "-m", "seam.edge_server.cli", str(artifact), "--registry", "etcd:2379"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "http://HOST:2379" in bad.stderr
