"""ZeroMQ addresses as a user types them: checked before anything starts, host names resolved within the wait
the user allowed, and whether a bound address reaches beyond this machine."""

from __future__ import annotations

import socket
import threading
from collections.abc import Sequence

from seam.runtime.errors import SeamError

SCHEMES = ("tcp", "ipc", "inproc")


def _split_tcp(address: str) -> tuple[str, str]:
    host, colon, port = address[len("tcp://"):].rpartition(":")
    if not colon or not host:
        raise SeamError(f"address {address!r} needs a host and a port: tcp://HOST:PORT")
    return host.strip("[]"), port


def check_address(address: str, bind: bool = False) -> str:
    """Refuses an address that cannot work: an unknown scheme, or a TCP port outside 1-65535 (a bound one may
    also be 0 or * for any free port)."""
    scheme, separator, rest = address.partition("://")
    if not separator or scheme not in SCHEMES or not rest:
        raise SeamError(f"address {address!r} must look like tcp://HOST:PORT (or ipc://PATH)")
    if scheme == "tcp":
        _, port = _split_tcp(address)
        free = bind and port in ("0", "*")
        if not free and not (port.isdigit() and 1 <= int(port) <= 65535):
            raise SeamError(f"port {port!r} of {address} is no TCP port: give 1 to 65535"
                            f"{' (or 0 or * for any free one)' if bind else ''}")
    return address


def split_servers(servers: str | Sequence[str]) -> list[str]:
    """The edge addresses of ``--server A,B,...`` (or a list of them), each checked, in order, none twice."""
    listed = servers.split(",") if isinstance(servers, str) else list(servers)
    addresses = list(dict.fromkeys(check_address(address.strip()) for address in listed if address.strip()))
    if not addresses:
        raise SeamError("give at least one edge server address: tcp://HOST:PORT")
    return addresses


def check_servers(servers: str) -> str:
    """``--server``'s value: one address or several, comma-separated, each checked."""
    split_servers(servers)
    return servers


def resolve(address: str, timeout_s: float) -> None:
    """Resolves the host of a ``tcp://`` address, refusing a name that does not resolve in one line instead of
    letting it pass for a server that does not answer; waits at most ``timeout_s``."""
    if not address.startswith("tcp://"):
        return
    host, port = _split_tcp(address)
    outcome: list[BaseException | None] = []

    def lookup() -> None:
        try:
            socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
            outcome.append(None)
        except (OSError, ValueError) as error:
            outcome.append(error)

    worker = threading.Thread(target=lookup, name="seam-resolve", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if not outcome:
        raise SeamError(f"looking up the host {host!r} took longer than {timeout_s:g} s; check the name or the "
                        "resolver, or give an IP address")
    if outcome[0] is not None:
        raise SeamError(f"the host {host!r} of {address} does not resolve ({outcome[0]}); check the name")


def reachable_beyond_loopback(address: str) -> bool:
    """Whether a bound ``tcp://HOST:PORT`` accepts connections from other machines (ipc and inproc do not)."""
    if not address.startswith("tcp://"):
        return False
    host = _split_tcp(address)[0]
    return not (host == "localhost" or host == "::1" or host.startswith("127."))
