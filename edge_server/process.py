"""Runs edge_server as a child process on a free loopback port; used by the demo, the benchmarks and the tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

from runtime.errors import SeamError


@contextmanager
def edge_server(artifact, *flags: str, log=sys.stderr, startup_timeout: float = 60):
    """Yields (process, address) once the server listens; terminates it on exit, also on Ctrl-C.

    The server's log lines go to ``log``, a text stream.
    """
    process = subprocess.Popen(
        [sys.executable, "-m", "edge_server.cli", str(artifact), "--bind", "tcp://127.0.0.1:0", *flags],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    try:
        deadline = time.monotonic() + startup_timeout
        address = None
        while address is None:
            line = process.stderr.readline()
            if not line or time.monotonic() > deadline:
                raise SeamError(f"edge_server did not start: {line.strip() or 'it exited'}")
            found = re.search(r"listening on (tcp://\S+)", line)
            address = found.group(1) if found else None
        # Keep draining the server's log so a full pipe never blocks it; forward it to ours.
        threading.Thread(target=_forward, args=(process.stderr, log), daemon=True).start()
        yield process, address
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _forward(stream, log) -> None:
    for line in stream:
        log.write(line)
        log.flush()
