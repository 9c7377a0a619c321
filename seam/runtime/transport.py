"""ZeroMQ transport: the only module that imports zmq.

The edge binds a ROUTER socket and the UE connects a DEALER. Every receive waits at most the configured timeout.
A UE that cannot reach the edge retries with capped exponential backoff; a request that times out closes the
socket with LINGER 0 (so nothing stale is delivered later) and raises, since replaying a step would append to
the edge's KV cache twice. Optional CURVE authentication encrypts the link and admits only allow-listed UE keys.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
import zmq.utils.monitor
from zmq.auth.thread import ThreadAuthenticator

from seam.runtime.addresses import check_address, resolve
from seam.runtime.errors import SeamError
from seam.runtime.protocol import DEFAULT_MAX_MESSAGE_BYTES, Message, ProtocolError, decode, encode


class TransportTimeout(SeamError):
    """The peer did not answer within the timeout."""


class ConnectionLost(TransportTimeout):
    """The peer's end of the connection closed while a reply was awaited (it stopped, crashed or restarted):
    known at once, where a silent peer takes the whole timeout."""


class HandshakeRefused(SeamError):
    """The CURVE handshake failed: an unknown key, or security configured on one side only."""


HANDSHAKE_FAILURES = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


@dataclass
class TransportConfig:
    timeout_s: float = 30.0  # longest wait for any reply, seconds
    backoff_initial_s: float = 0.2  # first retry delay, doubled per attempt
    backoff_max_s: float = 2.0  # cap on the retry delay
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # larger messages are refused unread


def generate_keypair(directory: Path, name: str) -> tuple[Path, Path]:
    """Writes NAME.key (public) and NAME.key_secret (secret, mode 0600) in ZeroMQ's certificate format.

    Both files are written in a private scratch directory and renamed into place, so an existing key is never
    overwritten and an interrupted run leaves no half-written key behind.
    """
    if not name or Path(name).name != name or name.startswith("."):
        raise SeamError(f"key name {name!r} must be a plain file name such as 'edge' or 'ue1'")
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise SeamError(f"{path} already exists; choose another --name or remove the old key first")
    directory.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=directory))
    try:
        made_public, made_secret = (Path(p) for p in zmq.auth.create_certificates(str(scratch), name))
        made_secret.chmod(0o600)
        made_secret.rename(secret)
        made_public.rename(public)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return public, secret


def _load_secret(path: Path) -> tuple[bytes, bytes]:
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as error:
        raise SeamError(f"cannot read CURVE key {path}: {error}; create one with 'seam keys'") from None
    if secret is None:
        raise SeamError(f"{path} holds no secret key; pass the NAME.key_secret file")
    return public, secret


def _load_public(path: Path) -> bytes:
    try:
        return zmq.auth.load_certificate(str(path))[0]
    except (OSError, ValueError) as error:
        raise SeamError(f"cannot read CURVE public key {path}: {error}") from None


def check_security(curve_secret: Path | None, allowed_keys: Path | None) -> None:
    """Refuses a half-configured CURVE server: keys without an allow-list, an allow-list without keys (which
    would admit everyone unencrypted), or an allow-list directory that is not there."""
    if curve_secret is not None and allowed_keys is None:
        raise SeamError("CURVE needs an allow-list of UE public keys (--allow DIR)")
    if allowed_keys is not None and curve_secret is None:
        raise SeamError("--allow admits UEs by their CURVE keys, which needs the server's own: give --curve-secret "
                        "(create one with 'seam keys')")
    if allowed_keys is not None and not Path(allowed_keys).is_dir():
        raise SeamError(f"the allow-list {allowed_keys} is not a directory; give the directory of UE public keys")


def _socket(context, kind: int, config: TransportConfig):
    socket = context.socket(kind)
    socket.setsockopt(zmq.LINGER, 0)
    # zmq drops a larger message unread; the slack covers the header frame.
    socket.setsockopt(zmq.MAXMSGSIZE, config.max_message_bytes + (1 << 16))
    return socket


class EdgeSocket:
    """The server end: receives (peer, message) pairs and replies to a peer."""

    def __init__(
        self,
        address: str,
        config: TransportConfig,
        curve_secret: Path | None = None,
        allowed_keys: Path | None = None,
    ):
        check_security(curve_secret, allowed_keys)
        check_address(address, bind=True)
        self.config = config
        self.context = zmq.Context()
        self.authenticator = None
        self.socket = _socket(self.context, zmq.ROUTER, config)
        if curve_secret is not None:
            self.authenticator = ThreadAuthenticator(self.context)
            self.authenticator.start()
            self.authenticator.configure_curve(domain="*", location=str(allowed_keys))
            public, secret = _load_secret(curve_secret)
            self.socket.curve_server = True
            self.socket.curve_publickey = public
            self.socket.curve_secretkey = secret
        try:
            self.socket.bind(address)
        except zmq.ZMQError as error:
            self.close()
            raise SeamError(f"cannot listen on {address}: {error}; choose another --bind address") from None
        self.address = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def receive(self, timeout_s: float) -> tuple[bytes, Message | ProtocolError] | None:
        """(peer identity, its message, or the ProtocolError that decoding it raised for the server to answer),
        or None when nothing arrived within ``timeout_s``."""
        if not self.socket.poll(int(timeout_s * 1000)):
            return None
        frames = self.socket.recv_multipart(copy=False)
        try:
            message = decode([frame.buffer for frame in frames[1:]], self.config.max_message_bytes)
        except ProtocolError as error:
            message = error
        except Exception as error:  # a decoder bug must cost this message, never the server
            message = ProtocolError(f"the message could not be decoded ({type(error).__name__})")
        return frames[0].bytes, message

    def send(self, peer: bytes, message: Message) -> None:
        self.socket.send_multipart([peer, *encode(message)], copy=False)

    def close(self) -> None:
        self.socket.close(linger=0)
        if self.authenticator is not None:
            self.authenticator.stop()
        self.context.term()


class UeSocket:
    """The UE end: one request, one reply, each bounded by the timeout."""

    def __init__(
        self,
        address: str,
        config: TransportConfig,
        curve_secret: Path | None = None,
        server_key: Path | None = None,
    ):
        self.address = check_address(address)
        self.config = config
        resolve(address, config.timeout_s)
        self.curve = (_load_secret(curve_secret), _load_public(server_key)) if curve_secret else None
        self.context = zmq.Context()
        self.socket = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self._open()

    def _open(self) -> None:
        self._close_sockets()
        self.socket = _socket(self.context, zmq.DEALER, self.config)
        if self.curve:
            (public, secret), server_public = self.curve
            self.socket.curve_publickey = public
            self.socket.curve_secretkey = secret
            self.socket.curve_serverkey = server_public
        # Handshake events tell a refused key apart from a server that is simply not there.
        self.monitor = self.socket.get_monitor_socket(HANDSHAKE_FAILURES | zmq.EVENT_DISCONNECTED)
        self.poller = zmq.Poller()
        self.poller.register(self.socket, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)
        try:
            self.socket.connect(self.address)
        except zmq.ZMQError as error:
            raise SeamError(f"invalid server address {self.address!r}: {error}; use tcp://HOST:PORT") from None

    def _handshake_failure(self) -> str | None:
        """Why the connection failed, from the monitor's events so far: a refused handshake, or the peer gone."""
        while self.monitor.poll(0):
            event = zmq.utils.monitor.recv_monitor_message(self.monitor)["event"]
            if event == zmq.EVENT_DISCONNECTED:
                return "disconnected"
            if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                return "the edge server refused this UE's key; add its public NAME.key to the server's --allow directory"
            if event & HANDSHAKE_FAILURES:
                return ("the security handshake failed; with CURVE both sides need keys (--curve-secret, and "
                        "--server-key on the UE), without it neither side may use them")
        return None

    def request(self, message: Message, timeout_s: float | None = None) -> Message:
        """Sends ``message`` and returns the decoded reply; raises TransportTimeout, HandshakeRefused, or
        ProtocolError for a malformed reply."""
        reply = self.exchange(encode(message), self.config.timeout_s if timeout_s is None else timeout_s)
        return decode(reply, self.config.max_message_bytes)

    def request_all(self, messages: list[Message], timeout_s: float | None = None) -> list[Message]:
        """Sends every message before waiting for any reply, so that the peer may take them as one burst, and
        returns the decoded replies in the order they came, all within one timeout."""
        deadline = time.monotonic() + (self.config.timeout_s if timeout_s is None else timeout_s)
        for message in messages:
            self._send(encode(message))
        return [decode(self._receive(deadline - time.monotonic()), self.config.max_message_bytes) for _ in messages]

    def exchange(self, frames: list, timeout: float) -> list:
        """Sends encoded frames and returns the reply's raw frames, waiting at most ``timeout`` seconds."""
        self._send(frames)
        return self._receive(timeout)

    def _send(self, frames: list) -> None:
        self.socket.send_multipart(frames, copy=False)
        self.bytes_sent += sum(len(frame) for frame in frames)

    def _receive(self, timeout: float) -> list:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            ready = dict(self.poller.poll(int(remaining * 1000))) if remaining > 0 else {}
            if self.socket in ready:
                break
            failure = self._handshake_failure() if self.monitor in ready or remaining <= 0 else None
            if failure is None and remaining > 0:
                continue  # an event the failures do not include
            self._open()  # drop whatever the late reply would bring
            if failure == "disconnected":
                raise ConnectionLost(f"the edge server at {self.address} closed the connection (it stopped, "
                                     "crashed or restarted)")
            if failure:
                raise HandshakeRefused(f"cannot talk to the edge server at {self.address}: {failure}")
            raise TransportTimeout(
                f"no reply from the edge server at {self.address} within {timeout:g} s; "
                "check that edge_server is running and reachable, or raise --timeout"
            )
        reply = [frame.buffer for frame in self.socket.recv_multipart(copy=False)]
        self.bytes_received += sum(len(frame) for frame in reply)
        return reply

    def request_with_retries(self, message: Message) -> Message:
        """For the idempotent handshake: retries with capped exponential backoff while the edge is not up, all
        within the timeout, which is the whole wait."""
        deadline = time.monotonic() + self.config.timeout_s
        delay = self.config.backoff_initial_s
        while True:
            remaining = deadline - time.monotonic()
            try:
                return self.request(message, timeout_s=min(remaining, max(delay * 4, 1.0)))
            except TransportTimeout:
                if deadline - time.monotonic() <= delay:
                    raise TransportTimeout(
                        f"no reply from the edge server at {self.address} within {self.config.timeout_s:g} s; "
                        "check that edge_server is running and reachable, or raise --timeout") from None
                time.sleep(delay)
                delay = min(delay * 2, self.config.backoff_max_s)

    def _close_sockets(self) -> None:
        if self.socket is not None:
            self.socket.disable_monitor()
            self.monitor.close(linger=0)
            self.socket.close(linger=0)

    def close(self) -> None:
        self._close_sockets()
        self.context.term()
