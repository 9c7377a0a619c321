"""The fleet's registry: edge servers announce themselves in etcd and UEs find them there.

Each edge holds one key, ``/seam/edges/<address>``, under a lease of a few seconds that it renews every second
with its load (``Announcer``): an edge that dies or stalls drops out of the registry within the lease, with no
one to clean up after it. Its value is JSON: the address, the artifact fingerprint, the splits and codecs it
serves, and its load as its ``Welcome`` reports it. A registry that restarts and forgets the key is written
again at the next renewal. The client is etcd3gw, over etcd's HTTP gateway; it is imported on first use.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from seam.runtime.errors import SeamError

PREFIX = "/seam/edges/"
LEASE_TTL_S = 3  # an edge silent this long drops out
RENEW_S = 1.0

log = logging.getLogger("registry")


def check_registry_url(url: str) -> str:
    """``http://HOST:PORT`` of an etcd client endpoint, refused in one line otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise SeamError(f"registry {url!r} must look like http://HOST:2379 (an etcd client URL)")
    try:
        parts.port
    except ValueError:
        raise SeamError(f"registry {url!r} has no valid port; give http://HOST:2379") from None
    return url


class Registry:
    """The edges of one etcd, every request bounded by ``timeout_s``."""

    def __init__(self, url: str, timeout_s: float = 2.0):
        from etcd3gw.client import Etcd3Client

        parts = urlsplit(check_registry_url(url))
        self.url = url
        self.client = Etcd3Client(host=parts.hostname, port=parts.port or 2379, protocol=parts.scheme,
                                  timeout=timeout_s, api_path="/v3/")

    def _call(self, what: str, request: Callable):
        from etcd3gw.exceptions import Etcd3Exception
        from requests import RequestException

        try:
            return request()
        except (Etcd3Exception, RequestException, ValueError) as error:
            raise SeamError(f"the registry at {self.url} did not answer ({what}: {type(error).__name__}); check "
                            "that etcd is running there") from None

    def edges(self, fingerprint: str | None = None) -> list[dict]:
        """Every edge announced now (with ``fingerprint``, only those serving that artifact), by address."""
        found = []
        for value, _ in self._call("listing edges", lambda: self.client.get_prefix(PREFIX)):
            try:
                entry = json.loads(value)
            except ValueError:
                continue  # not an edge's entry: someone else's key under the prefix
            if isinstance(entry, dict) and isinstance(entry.get("address"), str) and (
                    fingerprint is None or entry.get("fingerprint") == fingerprint):
                found.append(entry)
        return sorted(found, key=lambda entry: entry["address"])

    def addresses(self, fingerprint: str) -> list[str]:
        return [entry["address"] for entry in self.edges(fingerprint)]

    def announce(self, entry: dict, lease=None):
        """Writes ``entry`` under its address, held by ``lease`` (a new one when None or expired); returns it."""
        if lease is None or self._call("renewing the lease", lease.refresh) <= 0:
            lease = self._call("granting a lease", lambda: self.client.lease(ttl=LEASE_TTL_S))
        self._call("announcing", lambda: self.client.put(PREFIX + entry["address"], json.dumps(entry), lease=lease))
        return lease

    def withdraw(self, address: str, lease=None) -> None:
        """Removes the edge's key at once (a clean shutdown), rather than waiting for the lease to expire."""
        if lease is not None:
            self._call("revoking the lease", lease.revoke)
        else:
            self._call("withdrawing", lambda: self.client.delete(PREFIX + address))


class Announcer:
    """Keeps an edge's entry in the registry, renewed every second with ``entry()`` (its present load), on a
    thread of its own; a registry that cannot be reached is logged once per outage and tried again."""

    def __init__(self, registry: Registry, entry: Callable[[], dict]):
        self.registry, self.entry = registry, entry
        self.lease = registry.announce(entry())  # at start an unreachable registry is the user's error
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="seam-announcer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        failing = False
        while not self.stopping.wait(RENEW_S):
            try:
                self.lease = self.registry.announce(self.entry(), self.lease)
                if failing:
                    log.info("the registry at %s answers again; announced", self.registry.url)
                failing = False
            except SeamError as error:
                if not failing:
                    log.warning("%s; retrying every %g s", error, RENEW_S)
                failing = True

    def close(self) -> None:
        """Stops renewing and withdraws the entry, so that UEs stop choosing this edge at once."""
        self.stopping.set()
        self.thread.join(timeout=5)
        started = time.monotonic()
        try:
            self.registry.withdraw(self.entry()["address"], self.lease)
        except SeamError as error:
            log.warning("%s; the entry expires within %d s (%.1f s spent)", error, LEASE_TTL_S,
                        time.monotonic() - started)
