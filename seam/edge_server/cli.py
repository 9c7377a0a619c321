"""``edge_server DIR --bind ...``: maps flags into EdgeConfig, registers split fine-tuning with ``--train``,
and serves until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from seam.edge_server.config import EdgeConfig
from seam.edge_server.server import EdgeServer
from seam.runtime.codecs import CODECS
from seam.runtime.protocol import TRAINING_MESSAGES
from seam.runtime.shell import (CommandParser, add_log_level, checked, comma_list, configure_logging, number,
                                require_extra, run_cli)
from seam.runtime.addresses import check_address, reachable_beyond_loopback
from seam.runtime.errors import SeamError
from seam.runtime.registry import check_registry_url
from seam.runtime.transport import TransportConfig


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="edge_server", description="Serve the tail blocks of an artifact to UEs.")
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--bind", default="tcp://127.0.0.1:5555",
                        type=checked(lambda text: check_address(text, bind=True)),
                        help="address to listen on (default loopback only; tcp://0.0.0.0:PORT for every interface)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=number(int, 1), default=None)
    parser.add_argument("--max-sessions", type=number(int, 1), default=64)
    parser.add_argument("--memory-budget-mb", "--kv-budget-mb", type=number(float, 0, above=True), default=4096.0,
                        help="MiB for every session's KV cache at its full length plus the working memory of the "
                             "largest step (default 4096)")
    parser.add_argument("--idle-timeout", type=number(float, 0, above=True), default=300.0, help="seconds")
    parser.add_argument("--drain-s", type=number(float, 0), default=30.0,
                        help="on SIGTERM: seconds to wait for the UEs to move their sessions elsewhere before "
                             "exiting (default 30; a second SIGTERM, or SIGINT, exits at once)")
    parser.add_argument("--max-length", type=number(int, 1), default=4096, help="tokens per sequence")
    parser.add_argument("--prefill-chunk", type=number(int, 1), default=512,
                        help="prefill positions run at a time, bounding a long prompt's memory (default 512)")
    parser.add_argument("--max-batch", type=number(int, 1), default=64,
                        help="sequences per session and per batched decode run")
    parser.add_argument("--no-batching", action="store_true", help="run each session's decode step on its own")
    parser.add_argument("--curve-secret", type=Path, default=None, help="server NAME.key_secret (enables CURVE)")
    parser.add_argument("--allow", type=Path, default=None, help="directory of allowed UE public keys")
    parser.add_argument("--log-messages", type=Path, default=None, help="append received message headers as JSON")
    parser.add_argument("--train", action="store_true",
                        help="also serve split fine-tuning of LoRA adapters (needs the export and finetune extras)")
    parser.add_argument("--max-training-sessions", type=number(int, 1), default=16, help="with --train (default 16)")
    parser.add_argument("--training-memory-mb", type=number(float, 0, above=True), default=2048.0,
                        help="with --train: MiB for every job's adapters and optimizer state and the graphs of steps "
                             "in flight (default 2048)")
    parser.add_argument("--round-timeout", type=number(float, 0, above=True), default=60.0,
                        help="seconds a federated round waits for its UEs' adapters after the first arrives")
    parser.add_argument("--codecs", type=comma_list(choices=list(CODECS)), default=tuple(CODECS),
                        help=f"activation codecs to offer UEs, comma-separated (default all: {','.join(CODECS)})")
    fleet = parser.add_argument_group("a fleet of edge servers")
    fleet.add_argument("--registry", default=None, metavar="http://HOST:2379", type=checked(check_registry_url),
                       help="announce this edge in etcd, with its load, for UEs given the same --registry")
    fleet.add_argument("--advertise", default=None, metavar="tcp://HOST:PORT", type=checked(check_address),
                       help="the address UEs reach this edge at (default: the bound one; needed when bound to "
                            "every interface)")
    stage = parser.add_argument_group("a stage of an inference pipeline over several edge nodes")
    stage.add_argument("--until", type=number(int, 1), default=None, metavar="LAYER",
                       help="run layers up to this cut and hand the hidden states on to --next")
    stage.add_argument("--next", dest="next_stage", default=None, metavar="tcp://HOST:PORT",
                       type=checked(check_address), help="the next stage: an edge_server on the same artifact")
    stage.add_argument("--next-timeout", type=number(float, 0, above=True), default=10.0,
                       help="seconds to wait for the next stage (default 10, below the UE's 30)")
    stage.add_argument("--next-server-key", type=Path, default=None,
                       help="the next stage's public NAME.key, when it uses CURVE (this server's --curve-secret is "
                            "its key there)")
    add_log_level(parser, "info")
    return parser


def parse(argv: list[str] | None) -> tuple[EdgeConfig, bool]:
    """The configuration, and whether to serve split fine-tuning too."""
    args = build_parser().parse_args(argv)
    return EdgeConfig(
        artifact=args.artifact,
        bind=args.bind,
        device=args.device,
        threads=args.threads,
        max_sessions=args.max_sessions,
        memory_budget_mb=args.memory_budget_mb,
        idle_timeout_s=args.idle_timeout,
        drain_s=args.drain_s,
        registry=args.registry,
        advertise=args.advertise,
        max_length=args.max_length,
        prefill_chunk=args.prefill_chunk,
        max_batch=args.max_batch,
        batch_decode=not args.no_batching,
        curve_secret=args.curve_secret,
        allowed_keys=args.allow,
        log_messages=args.log_messages,
        codecs=args.codecs,
        round_timeout_s=args.round_timeout,
        max_training_sessions=args.max_training_sessions,
        training_memory_mb=args.training_memory_mb,
        until=args.until,
        next_stage=args.next_stage,
        next_timeout_s=args.next_timeout,
        next_server_key=args.next_server_key,
        log_level=args.log_level,
        transport=TransportConfig(),
    ), args.train


def serve(config: EdgeConfig, train: bool) -> int:
    server = EdgeServer(config)
    if train:
        register_training(server)
    signal.signal(signal.SIGINT, server.stop)
    signal.signal(signal.SIGTERM, lambda *_: server.drain(config.drain_s))
    manifest = server.manifest
    print(f"edge_server: listening on {server.address} ({manifest.source}, {manifest.family}, "
          f"{manifest.dims.num_layers} layers, {config.device}{_stage(server)})", file=sys.stderr, flush=True)
    if config.curve_secret is None and reachable_beyond_loopback(server.address):
        print(f"edge_server: warning: {server.address} is reachable beyond this machine without keys, unencrypted "
              "and open to any UE; give --curve-secret and --allow to admit only known devices", file=sys.stderr,
              flush=True)
    announcer = announce(server) if config.registry else None
    try:
        server.serve()
    finally:
        if announcer is not None:
            announcer.close()
    return 0


def announce(server: EdgeServer):
    """Starts announcing ``server`` in its registry; an address UEs could not reach is refused in one line."""
    from seam.runtime.registry import Announcer, Registry

    address = server.config.advertise or server.address
    if any(wildcard in address for wildcard in ("://0.0.0.0:", "://*:", "://[::]:")):
        raise SeamError(f"bound to every interface ({server.address}), this edge needs --advertise tcp://HOST:PORT, "
                        "the address UEs reach it at, to announce itself in the registry")

    def entry() -> dict:
        welcome = server.published
        return {"address": address, "fingerprint": welcome.artifact_fingerprint, "splits": welcome.split_points,
                "codecs": server.offered_codecs, "load": welcome.load}

    announcer = Announcer(Registry(server.config.registry), entry)
    print(f"edge_server: announced as {address} in the registry at {server.config.registry}", file=sys.stderr,
          flush=True)
    return announcer


def _stage(server: EdgeServer) -> str:
    if server.next_stage is None:
        return ""
    return f"; a pipeline stage: layers up to {server.end}, then {server.next_stage.address}"


def register_training(server: EdgeServer) -> None:
    """Serves split fine-tuning beside inference: torch, transformers and peft load only here."""
    require_extra("finetune")
    from seam.finetune.edge import TrainingService

    config = server.config
    training = TrainingService(server.artifact, config.threads, config.idle_timeout_s, config.round_timeout_s,
                               max_sessions=config.max_training_sessions, max_length=config.max_length,
                               memory_budget_bytes=int(config.training_memory_mb * 2**20))
    server.register(TRAINING_MESSAGES, training.handle, training.owns)


def main(argv: list[str] | None = None) -> int:
    config, train = parse(argv)
    configure_logging(config.log_level, "edge_server")
    return run_cli("edge_server", lambda: serve(config, train))


if __name__ == "__main__":
    sys.exit(main())
