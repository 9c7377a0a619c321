"""``seam demo``: the main job on the built-in default model, start to finish on one machine.

Exports the model (a no-op when already exported), prints the per-cut parity table, then starts a real
edge_server process and runs ue_client against it over loopback, streaming tokens and the per-token breakdown.
Then it profiles the blocks (once; the profile is cached) and generates again over an emulated link whose
bandwidth drops and recovers, with the cost-model policy moving the split as it goes and saying why. The UE is
emulated a few times slower than this machine, as a phone is next to an edge box; on one machine offloading
could otherwise never pay. The server is stopped on exit, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from seam.runtime.shell import number

DEFAULT_PROMPT = "What is the capital of France?"
# Long enough an answer for the link to drop and recover while it streams.
ADAPTIVE_PROMPT = "Write a long story about a robot who learns to paint."
DEMO_LINK_MBIT, DEMO_DROP_MBIT = 50.0, 0.1  # the adaptive run's link, and what it drops to for a while


def add_demo_parser(commands) -> None:
    from seam.export.presets import DEFAULT_PRESET

    parser = commands.add_parser("demo", help="export the default model, validate it, and generate text split")
    parser.add_argument("--model", default=DEFAULT_PRESET, help=f"preset, directory or hub id (default {DEFAULT_PRESET})")
    parser.add_argument("--out", type=Path, default=None, help="artifact directory (default artifacts/MODEL)")
    parser.add_argument("--split", type=number(int, 0), default=None, help="layers kept on the UE (default: half)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"the first run's question (default {DEFAULT_PROMPT!r})")
    parser.add_argument("--adaptive-prompt", default=ADAPTIVE_PROMPT,
                        help="the question of the run whose link drops and recovers")
    parser.add_argument("--max-new-tokens", type=number(int, 1), default=32)
    parser.add_argument("--adaptive-tokens", type=number(int, 0), default=160,
                        help="tokens of the run over a link that drops and recovers (0 skips it)")
    parser.add_argument("--ue-slowdown", type=number(float, 1), default=4.0,
                        help="how many times slower than this machine the emulated UE runs in that run")
    parser.set_defaults(handler=run_demo, extra="export")


def run_demo(args: argparse.Namespace) -> int:
    from seam.edge_server.process import edge_server
    from seam.export.exporter import ExportRequest, export
    from seam.export.report import blocks_table, validation_table
    from seam.runtime.artifact import Artifact
    from seam.ue_client.cli import main as ue_client_main

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
            print(f"> {args.prompt}", flush=True)
            status = ue_client_main(
                [str(out), "--server", address, "--split", str(split), "--prompt", args.prompt,
                 "--max-new-tokens", str(args.max_new_tokens)]
            )
            if status == 0 and args.adaptive_tokens > 0:
                status = adaptive_run(artifact, address, split, args)
        server_log.seek(0)
        print("\n== edge_server log\n" + server_log.read().rstrip())
    return status


def adaptive_run(artifact, address: str, split: int, args: argparse.Namespace) -> int:
    """The same split generation over an emulated link that drops to 0.1 Mbit/s and recovers, the split moving."""
    from seam.planning.loading import cached_profile
    from seam.runtime.traces import step_trace
    from seam.cli import main as seam_main
    from seam.ue_client.cli import main as ue_client_main

    print(f"\n\n== profile the blocks on this machine (cached in {artifact.root / 'profiles'})", flush=True)
    if seam_main(["profile", str(artifact.root), "--quiet"]) != 0:
        return 1
    profile = cached_profile(artifact, None)
    trace = step_trace(DEMO_LINK_MBIT, DEMO_DROP_MBIT, rtt_ms=20, drop_s=4, recover_s=10, end_s=30)
    print(f"== the split follows the link: {DEMO_LINK_MBIT:g} Mbit/s, {DEMO_DROP_MBIT:g} Mbit/s from 4 s to 10 s, "
          f"then {DEMO_LINK_MBIT:g} again (20 ms round trip); the UE runs {args.ue_slowdown:g}x slower than this "
          "machine", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        trace_file = trace.save(Path(scratch) / "drop-and-recover.csv")
        print(f"> {args.adaptive_prompt}", flush=True)
        return ue_client_main(
            [str(artifact.root), "--server", address, "--split", str(split), "--prompt", args.adaptive_prompt,
             "--max-new-tokens", str(args.adaptive_tokens), "--policy", "cost-model", "--ue-profile", str(profile),
             "--edge-profile", str(profile), "--link-trace", str(trace_file), "--ue-slowdown", str(args.ue_slowdown)]
        )

