"""``seam demo``: the main job on the built-in default model, start to finish on one machine.

Exports the model (a no-op when already exported), prints the per-cut parity table, then starts a real
edge_server process and runs ue_client against it over loopback, streaming tokens and the per-token breakdown.
The server is stopped on exit, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

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
    from edge_server.process import edge_server
    from export.exporter import ExportRequest, export
    from export.report import blocks_table, validation_table
    from runtime.artifact import Artifact
    from ue_client.cli import main as ue_client_main

    out = args.out or Path("artifacts") / Path(args.model).name
    print(f"== export {args.model} -> {out}")
    outcome = export(ExportRequest(model=args.model, out=out))
    manifest = outcome.manifest
    print(blocks_table(manifest))
    print(f"\n== parity against PyTorch at every cut{' (cached: already exported)' if outcome.up_to_date else ''}")
    print(validation_table(manifest.validation))

    artifact = Artifact.open(out)
    split = args.split if args.split is not None else artifact.default_split
    layers = artifact.num_layers
    print(f"\n== edge_server (layers [{split}, {layers})) and ue_client (layers [0, {split})) over loopback TCP")
    with tempfile.TemporaryFile("w+") as server_log:
        with edge_server(out, log=server_log) as (_, address):
            print(f"edge_server listening on {address}; the prompt's token ids stay on the UE", flush=True)
            print(args.prompt, end="", flush=True)
            status = ue_client_main(
                [str(out), "--server", address, "--split", str(split), "--prompt", args.prompt,
                 "--max-new-tokens", str(args.max_new_tokens)]
            )
        server_log.seek(0)
        print("\n== edge_server log\n" + server_log.read().rstrip())
    return status
