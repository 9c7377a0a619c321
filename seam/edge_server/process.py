"""Runs edge_server as a child process on a free port; used by the demo, the benchmarks and the tests."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

from seam.runtime.errors import SeamError

LISTENING = re.compile(r"listening on (tcp://\S+)")  # the line edge_server.cli prints once bound


@contextmanager
def edge_server(artifact, *flags: str, log=sys.stderr, startup_timeout: float = 60, bind: str = "tcp://127.0.0.1:0",
                launcher: tuple[str, ...] = ()):
    """Yields (process, address) once the server listens; terminates it on exit, also on Ctrl-C.

    The server's log lines go to ``log``, a text stream. ``launcher`` prefixes the command, e.g. to run the
    server in another network namespace.
    """
    process = subprocess.Popen(
        [*launcher, sys.executable, "-m", "seam.edge_server.cli", str(artifact), "--bind", bind, *flags],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    try:
        address = _wait_for_address(process, log, startup_timeout)
        yield process, address
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_for_address(process, log, timeout: float) -> str:
    """Reads the server's log on a thread (so a full pipe never blocks it) until it names its address."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_forward, args=(process.stderr, log, lines), daemon=True).start()
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        try:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0))
        except queue.Empty:
            raise SeamError(f"edge_server did not start within {timeout:g} s: {last or 'no output'}") from None
        if line is None:
            raise SeamError(f"edge_server did not start: {last or 'it exited'}")
        found = LISTENING.search(line)
        if found:
            return found.group(1)
        last = line.strip()


def _forward(stream, log, startup: queue.Queue) -> None:
    """Hands lines to ``startup`` until the address shows up, then forwards the rest of the log to ``log``."""
    started = False
    for line in stream:
        if started:
            log.write(line)
            log.flush()
        else:
            startup.put(line)
            started = LISTENING.search(line) is not None
    if not started:
        startup.put(None)
