"""``seam demo``: the main job on the built-in default model, start to finish on one machine.

Exports the model (a no-op when already exported), prints the per-cut parity table, then generates text with
the UE's blocks and the edge's blocks chained in this process, streaming tokens as they come.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

DEFAULT_PROMPT = "The device keeps the first layers, and the edge server"


def add_demo_parser(commands) -> None:
    from export.presets import DEFAULT_PRESET

    parser = commands.add_parser("demo", help="export the default model, validate it, and generate text split")
    parser.add_argument("--model", default=DEFAULT_PRESET, help=f"preset, directory or hub id (default {DEFAULT_PRESET})")
    parser.add_argument("--out", type=Path, default=None, help="artifact directory (default artifacts/MODEL)")
    parser.add_argument("--split", type=int, default=None, help="layers kept on the UE (default: half)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from export.exporter import ExportRequest, export
    from export.report import blocks_table, validation_table
    from runtime.artifact import Artifact
    from runtime.errors import SeamError
    from runtime.executor import SessionPool
    from runtime.generation import LocalSplit, generate
    from runtime.text import StreamDecoder, load_tokenizer

    out = args.out or Path("artifacts") / Path(args.model).name
    print(f"== export {args.model} -> {out}")
    outcome = export(ExportRequest(model=args.model, out=out))
    manifest = outcome.manifest
    print(blocks_table(manifest))
    print(f"\n== parity against PyTorch at every cut{' (cached: already exported)' if outcome.up_to_date else ''}")
    print(validation_table(manifest.validation))

    artifact = Artifact.open(out)
    split = args.split if args.split is not None else artifact.split_points[len(artifact.split_points) // 2]
    if split not in artifact.split_points:
        raise SeamError(f"--split {split} is not a split point of {out}; choose one of {artifact.split_points}")
    tokenizer = load_tokenizer(artifact)
    prompt_ids = tokenizer.encode(args.prompt).ids
    if not prompt_ids:
        raise SeamError("--prompt encodes to no tokens; give some text")
    layers = artifact.num_layers
    print(f"\n== generate: layers [0, {split}) on the UE, [{split}, {layers}) on the edge (in this process)")
    model = LocalSplit(SessionPool(artifact), split)
    decoder = StreamDecoder(tokenizer)
    eos = manifest.tokenizer.get("eos_token_id")
    print(args.prompt, end="", flush=True)
    started = time.perf_counter()
    arrivals = []
    for tokens, _ in generate(model, [prompt_ids], args.max_new_tokens, manifest.tokenizer["pad_token_id"]):
        arrivals.append(time.perf_counter())
        token = int(tokens[0])
        if token == eos:
            break
        print(decoder.push(token), end="", flush=True)
    print()
    ue_ms, edge_ms = (1e3 * np.median(times[1:] or times) for times in (model.ue_seconds, model.edge_seconds))
    decode_rate = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0]) if len(arrivals) > 1 else float("nan")
    boundary = manifest.activation_bytes_per_token.get(str(split), 0)
    print(
        f"\n{len(arrivals)} tokens; time to first token {1e3 * (arrivals[0] - started):.1f} ms; "
        f"{decode_rate:.1f} tokens/s; per token: UE {ue_ms:.2f} ms, edge {edge_ms:.2f} ms (median); "
        f"{boundary} bytes of hidden state cross the cut per token"
    )
    return 0
