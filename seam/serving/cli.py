"""``ue_client serve DIR --server tcp://EDGE:5555 --port 8000``: this device as an OpenAI-compatible HTTP
endpoint, each request split with the edge as ``ue_client`` splits a prompt. Without ``--api-key`` it listens
on loopback only."""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
from pathlib import Path

from seam.runtime.addresses import reachable_beyond_loopback
from seam.runtime.errors import SeamError
from seam.runtime.shell import CommandParser, add_log_level, configure_logging, number, require_extra, run_cli
from seam.ue_client.cli import add_split_flags


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="ue_client serve",
        description="Serve the model as an OpenAI-compatible HTTP endpoint (/v1/chat/completions, /v1/completions, "
                    "/v1/models, /health) and a chat page at /, the work split with the edge server.")
    parser.add_argument("artifact", type=Path)
    add_split_flags(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    parser.add_argument("--port", type=number(int, 0, 65535), default=8000, help="0 picks a free port")
    parser.add_argument("--api-key", default=os.environ.get("SEAM_API_KEY"),
                        help="the key clients send as 'Authorization: Bearer KEY' (default $SEAM_API_KEY, which "
                             "keeps it out of the process list)")
    parser.add_argument("--allow-without-key", action="store_true",
                        help="listen beyond loopback without --api-key: anyone who reaches the port may use it")
    parser.add_argument("--model-name", default=None,
                        help="the model's name in the API (default: the artifact directory's name)")
    parser.add_argument("--parallel", type=number(int, 1), default=4,
                        help="requests generating at once, each its own edge session (more wait their turn)")
    parser.add_argument("--default-max-tokens", type=number(int, 1), default=512,
                        help="the answer's length when a request gives no max_tokens (default 512)")
    parser.add_argument("--keep-alive", type=number(float, 0, above=True), default=10.0, metavar="SECONDS",
                        help="a comment line on every stream that has been silent this long (default 10)")
    add_log_level(parser, "warning")
    return parser


def listening_socket(host: str, port: int, api_key: str | None, allow_without_key: bool) -> socket.socket:
    """The bound and listening socket, refused beyond loopback without a key unless the user said so."""
    if reachable_beyond_loopback(f"tcp://{host}:{port}") and api_key is None and not allow_without_key:
        raise SeamError(f"--host {host} is reachable beyond this machine and no --api-key is set; give a key "
                        "(or $SEAM_API_KEY), or --allow-without-key to serve anyone who reaches the port")
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
        listener = socket.socket(family, kind)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(128)
    except OSError as error:
        raise SeamError(f"cannot listen on {host}:{port} ({error.strerror or error}); choose another --port or "
                        "--host") from None
    return listener


def run(args: argparse.Namespace) -> int:
    require_extra("serve")
    import uvicorn

    from seam.serving.app import build_app
    from seam.serving.events import EventHub
    from seam.serving.service import Service, model_id

    if not args.artifact.is_dir():
        raise SeamError(f"no artifact at {args.artifact}; export one with 'seam export MODEL --out DIR'")
    listener = listening_socket(args.host, args.port, args.api_key, args.allow_without_key)
    service = Service(args, args.model_name or model_id(args.artifact), EventHub())
    level = args.log_level
    server = uvicorn.Server(uvicorn.Config(build_app(service, args.api_key, args.keep_alive), log_level=level,
                                           access_log=level == "debug", timeout_graceful_shutdown=3, lifespan="off"))

    def stop() -> None:
        server.should_exit = True

    threading.Thread(target=service.load_or_fail, args=(stop,), name="seam-load", daemon=True).start()
    host, port = listener.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"ue_client serve: listening on http://{shown}:{port} (model {service.model_id!r}; loading)",
          file=sys.stderr, flush=True)
    _report_when_ready(service)
    try:
        server.run(sockets=[listener])
    finally:
        service.close()
    if service.failure:
        raise SeamError(service.failure)
    return 0


def _report_when_ready(service) -> None:
    """One line when the model is ready to answer, with what loading had to say."""

    def wait() -> None:
        service.ready.wait()
        for warning in service.warnings:
            print(f"ue_client serve: warning: {warning}", file=sys.stderr, flush=True)
        print(f"ue_client serve: ready (split {service.split}/{service.artifact.num_layers})", file=sys.stderr,
              flush=True)

    threading.Thread(target=wait, name="seam-ready", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, "ue_client serve")
    return run_cli("ue_client serve", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
