"""Starts a real edge_server process on a free loopback port and stops it by pid."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager


@contextmanager
def edge_server(artifact, *flags: str, startup_timeout: float = 60):
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
                raise RuntimeError(f"edge_server did not start: {line}")
            found = re.search(r"listening on (tcp://\S+)", line)
            address = found.group(1) if found else None
        yield process, address
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        process.stderr.close()
