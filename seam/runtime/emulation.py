"""A link that follows a trace, emulated on the UE's end of the transport: for demos, benchmarks and runs without
root (``tc`` on a network namespace shapes a real link, but this kernel has no netem for delay).

``EmulatedSocket`` is a ``UeSocket`` that delays each request as the traced link would: before sending, half the
round trip and the upload at the trace's uplink rate as it changes during it; after the reply, the other half
and the download.
"""

from __future__ import annotations

import time
from pathlib import Path

from seam.runtime.traces import Trace
from seam.runtime.transport import TransportConfig, UeSocket


class EmulatedLink:
    """The delays of a link following ``trace``, counted from its creation."""

    def __init__(self, trace: Trace, clock=time.monotonic):
        self.trace = trace
        self.clock = clock
        self.started = clock()

    def delay_s(self, size: int, direction: str) -> float:
        """Half the round trip and the transfer of ``size`` bytes in ``direction`` ('up' or 'down'), now."""
        now = self.clock() - self.started
        return self.trace.at(now).rtt_ms / 2e3 + self.trace.transfer_s(now, size, direction)


class EmulatedSocket(UeSocket):
    def __init__(self, link: EmulatedLink, address: str, config: TransportConfig, curve_secret: Path | None = None,
                 server_key: Path | None = None):
        self.link = link
        super().__init__(address, config, curve_secret, server_key)

    def exchange(self, frames: list, timeout: float) -> list:
        time.sleep(self.link.delay_s(sum(len(frame) for frame in frames), "up"))
        reply = super().exchange(frames, timeout)
        time.sleep(self.link.delay_s(sum(len(frame) for frame in reply), "down"))
        return reply


def connect(address: str, config: TransportConfig, curve_secret: Path | None = None, server_key: Path | None = None,
            link: EmulatedLink | None = None) -> UeSocket:
    """The UE's socket to ``address``, over ``link`` when one is emulated."""
    if link is None:
        return UeSocket(address, config, curve_secret, server_key)
    return EmulatedSocket(link, address, config, curve_secret, server_key)
