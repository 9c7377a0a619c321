"""A real shaped link for tests: the edge in a network namespace of its own, joined to the test's namespace by a
veth pair whose ends each limit what they send with ``tc tbf``. Needs root; ``available()`` says why not.

tbf shapes bandwidth only (this kernel has no netem), so a trace's round trip is added by the transport's
emulator, with rates high enough to leave the bandwidth to tc.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading

from seam.runtime.traces import LinkState, Trace

EMULATOR_RATE_MBIT = 1e6  # the transport adds only the round trip


def _run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=10)


def available() -> str | None:
    """None when a shaped link can be built here, else why not."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces and shape them with tc"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"needs the '{tool}' command (iproute2)"
    probe = f"seamprobe{os.getpid()}"
    try:
        _run("ip", "netns", "add", probe)
        _run("ip", "netns", "del", probe)
    except (subprocess.SubprocessError, OSError) as error:
        return f"cannot create a network namespace here ({error})"
    return None


class ShapedLink:
    def __init__(self):
        tag = os.getpid() % 100_000
        subnet = 20 + os.getpid() % 200  # two runs at once on one host must not share addresses
        self.namespace = f"seam-edge-{tag}"
        self.ue_device, self.edge_device = f"seu{tag}", f"see{tag}"
        self.ue_address, self.edge_address = f"10.{subnet}.0.1", f"10.{subnet}.0.2"
        self._stop = threading.Event()
        self._follower: threading.Thread | None = None
        _run("ip", "netns", "add", self.namespace)
        try:
            _run("ip", "link", "add", self.ue_device, "type", "veth", "peer", "name", self.edge_device)
            _run("ip", "link", "set", self.edge_device, "netns", self.namespace)
            _run("ip", "addr", "add", f"{self.ue_address}/24", "dev", self.ue_device)
            _run("ip", "link", "set", self.ue_device, "up")
            self._in_namespace("ip", "addr", "add", f"{self.edge_address}/24", "dev", self.edge_device)
            self._in_namespace("ip", "link", "set", self.edge_device, "up")
            self._in_namespace("ip", "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    @property
    def launcher(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.namespace)

    def _in_namespace(self, *command: str) -> None:
        _run(*self.launcher, *command)

    def shape(self, up_mbit: float, down_mbit: float) -> None:
        """Uplink is what the UE's end sends, downlink what the edge's end sends."""
        _run("tc", "qdisc", "replace", "dev", self.ue_device, *self._tbf(up_mbit))
        self._in_namespace("tc", "qdisc", "replace", "dev", self.edge_device, *self._tbf(down_mbit))

    @staticmethod
    def _tbf(mbit: float) -> tuple[str, ...]:
        # The smallest bucket that still passes the rate at a 250 Hz timer: a bigger one lets short transfers
        # through at line rate and makes them look faster than the link.
        burst_bytes = max(2048, int(mbit * 1e6 / 8 / 250))
        return ("root", "tbf", "rate", f"{mbit}mbit", "burst", str(burst_bytes), "latency", "2s")

    def follow(self, trace: Trace) -> Trace:
        """Applies the trace's bandwidths at their times on a thread; returns the round-trip-only trace for the
        transport's emulator to add the delays."""
        self.shape(trace.states[0].up_mbit, trace.states[0].down_mbit)

        def apply() -> None:
            for start, later in zip(trace.times_s, trace.times_s[1:]):
                if self._stop.wait(later - start):
                    return
                state = trace.at(later)
                self.shape(state.up_mbit, state.down_mbit)

        self._follower = threading.Thread(target=apply, daemon=True)
        self._follower.start()
        return Trace(trace.times_s, tuple(LinkState(EMULATOR_RATE_MBIT, EMULATOR_RATE_MBIT, s.rtt_ms) for s in trace.states))

    def close(self) -> None:
        self._stop.set()
        if self._follower is not None:
            self._follower.join(timeout=5)
        # Deleting the namespace removes its end of the pair, and with it the other end.
        subprocess.run(["ip", "netns", "del", self.namespace], capture_output=True, timeout=10)
        subprocess.run(["ip", "link", "del", self.ue_device], capture_output=True, timeout=10)
