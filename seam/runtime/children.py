"""Runs a Seam server as a child process and waits for the line that names its address; the edge server, the
UE's HTTP endpoint, the demo, the benchmarks and the tests start their servers through it."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import threading
import time
from contextlib import contextmanager

from seam.runtime.errors import SeamError


@contextmanager
def child_server(command: list[str], listening: re.Pattern, log, startup_timeout: float, name: str,
                 stop_signal: int = signal.SIGTERM):
    """Yields (process, address) once the child prints a line ``listening`` matches (its group 1 is the address);
    stops the child with ``stop_signal`` on exit, also on Ctrl-C. The child's standard error after that line
    goes to ``log``."""
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        address = _wait_for_address(process, log, startup_timeout, listening, name)
        yield process, address
    finally:
        if process.poll() is None:
            process.send_signal(stop_signal)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_for_address(process, log, timeout: float, listening: re.Pattern, name: str) -> str:
    """Reads the child's log on a thread (so a full pipe never blocks it) until it names its address."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_forward, args=(process.stderr, log, lines, listening), daemon=True).start()
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        try:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0))
        except queue.Empty:
            raise SeamError(f"{name} did not start within {timeout:g} s: {last or 'no output'}") from None
        if line is None:
            raise SeamError(f"{name} did not start: {last or 'it exited'}")
        found = listening.search(line)
        if found:
            return found.group(1)
        last = line.strip()


def _forward(stream, log, startup: queue.Queue, listening: re.Pattern) -> None:
    """Hands lines to ``startup`` until the address shows up, then forwards the rest of the log to ``log``."""
    started = False
    for line in stream:
        if started:
            log.write(line)
            log.flush()
        else:
            startup.put(line)
            started = listening.search(line) is not None
    if not started:
        startup.put(None)
