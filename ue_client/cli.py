"""``ue_client DIR --server ... --split K --prompt ...``: streams generated text to stdout, a summary to stderr."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runtime.errors import SeamError
from runtime.sampling import SamplingParams
from runtime.transport import TransportConfig, TransportTimeout


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ue_client", description="Generate text with the tail on an edge server.")
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--server", default="tcp://127.0.0.1:5555")
    parser.add_argument("--split", type=int, default=None, help="layers run on this device (default: half)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for any reply")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--fallback-local", action="store_true", help="generate on this device if the edge is down")
    parser.add_argument("--allow-token-upload", action="store_true", help="permit --split 0 (sends token ids)")
    parser.add_argument("--curve-secret", type=Path, default=None, help="this UE's NAME.key_secret")
    parser.add_argument("--server-key", type=Path, default=None, help="the server's public NAME.key")
    return parser


def run(args: argparse.Namespace) -> int:
    from runtime.artifact import Artifact
    from runtime.executor import SessionPool
    from runtime.generation import LocalSplit, generate
    from runtime.sampling import Sampler
    from runtime.text import StreamDecoder, load_tokenizer
    from ue_client.client import EdgeClient

    if args.max_new_tokens < 1:
        raise SeamError("--max-new-tokens must be at least 1")
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    artifact = Artifact.open(args.artifact)
    split = args.split if args.split is not None else artifact.default_split
    tokenizer = load_tokenizer(artifact)
    prompt_ids = tokenizer.encode(args.prompt).ids
    if not prompt_ids:
        raise SeamError("--prompt encodes to no tokens; give some text")
    decoder = StreamDecoder(tokenizer)
    eos = artifact.manifest.tokenizer.get("eos_token_id")

    def stream(tokens) -> bool:
        token = int(tokens[0])
        if token == eos:
            return False
        sys.stdout.write(decoder.push(token))
        sys.stdout.flush()
        return True

    transport = TransportConfig(timeout_s=args.timeout)
    try:
        client = EdgeClient(artifact, args.server, transport, args.threads, args.curve_secret, args.server_key)
    except TransportTimeout:
        if not args.fallback_local:
            raise
        print(f"ue_client: edge server at {args.server} unreachable; generating locally", file=sys.stderr)
        local = LocalSplit(SessionPool(artifact, args.threads), artifact.num_layers)
        sampler = Sampler(sampling)
        pad = artifact.manifest.tokenizer["pad_token_id"]
        for tokens, _ in generate(local, [prompt_ids], args.max_new_tokens, pad, lambda logits, _: sampler(logits)):
            if not stream(tokens):
                break
        print()
        return 0
    with client, client.session(split, sampling, args.allow_token_upload) as session:
        for tokens in session.generate([prompt_ids], args.max_new_tokens):
            if not stream(tokens):
                break
        print()
        stats = session.stats
        medians = stats.decode_medians_ms()
        print(
            f"ue_client: split {split}/{artifact.num_layers}; {len(stats.arrivals)} tokens; "
            f"time to first token {1e3 * stats.time_to_first_token_s:.1f} ms; {stats.tokens_per_second:.1f} tokens/s\n"
            f"ue_client: per token (median): UE {medians['ue_s']:.2f} ms, network {medians['network_s']:.2f} ms, "
            f"edge {medians['edge_s']:.2f} ms; sent {client.socket.bytes_sent} B, "
            f"received {client.socket.bytes_received} B",
            file=sys.stderr,
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except SeamError as error:
        print(f"ue_client: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("ue_client: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
