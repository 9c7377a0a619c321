"""Runs ``ue_client serve`` as a child process on a free port; used by the tests and the benchmarks."""

from __future__ import annotations

import re
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

from seam.runtime.children import child_server
from seam.runtime.errors import SeamError

LISTENING = re.compile(r"listening on (http://\S+)")  # the line serving.cli prints once bound


@contextmanager
def http_endpoint(artifact, server: str, *flags: str, log=sys.stderr, startup_timeout: float = 60):
    """Yields (process, base URL) once the endpoint listens (it may still be loading: see ``/health``)."""
    command = [sys.executable, "-m", "seam.serving.cli", str(artifact), "--server", server, "--port", "0", *flags]
    with child_server(command, LISTENING, log, startup_timeout, "ue_client serve") as started:
        yield started


def wait_ready(url: str, timeout: float = 120) -> None:
    """Returns once ``url``'s /health answers 200 (the model loaded and the edge reached)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5):
                return
        except (urllib.error.URLError, OSError):  # 503 while loading, or not listening yet
            if time.monotonic() > deadline:
                raise SeamError(f"{url} was not ready within {timeout:g} s") from None
            time.sleep(0.2)
