"""Runs edge_server as a child process on a free port; used by the demo, the benchmarks and the tests."""

from __future__ import annotations

import re
import signal
import sys
from contextlib import contextmanager

from seam.runtime.children import child_server

LISTENING = re.compile(r"listening on (tcp://\S+)")  # the line edge_server.cli prints once bound


@contextmanager
def edge_server(artifact, *flags: str, log=sys.stderr, startup_timeout: float = 60, bind: str = "tcp://127.0.0.1:0",
                launcher: tuple[str, ...] = ()):
    """Yields (process, address) once the server listens; stops it on exit, also on Ctrl-C, at once (SIGINT:
    SIGTERM would drain it, waiting for its UEs to move).

    The server's log lines go to ``log``, a text stream. ``launcher`` prefixes the command, e.g. to run the
    server in another network namespace.
    """
    command = [*launcher, sys.executable, "-m", "seam.edge_server.cli", str(artifact), "--bind", bind, *flags]
    with child_server(command, LISTENING, log, startup_timeout, "edge_server", signal.SIGINT) as started:
        yield started
