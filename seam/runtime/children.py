"""Runs a Seam server as a child process and waits for the line that names its address; the edge server, the
UE's HTTP endpoint, the demo, the benchmarks and the tests start their servers through it.

A child stops with its parent: a parent killed outright (SIGKILL, or SIGTERM to a program that does not catch it)
runs no cleanup, and its server would otherwise hold its port and its memory on until someone finds it. The child
learns who started it from ``STOP_WITH_PARENT`` and asks the kernel for its stop signal when that parent ends.
"""

from __future__ import annotations

import ctypes
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

from seam.runtime.errors import SeamError

STOP_WITH_PARENT = "SEAM_STOP_WITH_PARENT"  # "PID:SIGNAL" of the process that started this one, and how to stop
PR_SET_PDEATHSIG = 1  # prctl(2): the signal this process gets when the thread that started it ends


@contextmanager
def child_server(command: list[str], listening: re.Pattern, log, startup_timeout: float, name: str,
                 stop_signal: int = signal.SIGTERM):
    """Yields (process, address) once the child prints a line ``listening`` matches (its group 1 is the address);
    stops the child with ``stop_signal`` on exit, also on Ctrl-C. The child's standard error after that line
    goes to ``log``."""
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONWARNINGS": "ignore",
                                    STOP_WITH_PARENT: f"{os.getpid()}:{int(stop_signal)}"})
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


def stop_with_parent() -> None:
    """In a child ``child_server`` started, has the kernel send it the stop signal once its parent ends (Linux;
    elsewhere nothing changes). The child is the parent's only while its parent id is the one ``child_server``
    named: under a launcher that forks, or once that parent has gone, it is left as it is."""
    parent, _, signum = os.environ.pop(STOP_WITH_PARENT, "").partition(":")
    if not signum or not parent.isdigit() or os.getppid() != int(parent) or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
    except (OSError, AttributeError, ValueError):
        return  # a libc without prctl: the child outlives a parent killed outright, as before
    if os.getppid() != int(parent):  # the parent ended before the kernel was asked
        os.kill(os.getpid(), int(signum))
