"""Handlers of ``seam export``, ``seam validate`` and ``seam models``: map flags to the library and print tables."""

from __future__ import annotations

import argparse
from pathlib import Path

from seam.export.report import blocks_table, validation_table
from seam.runtime.shell import table


def add_export_parser(commands) -> None:
    parser = commands.add_parser("export", help="cut a model into ONNX blocks and validate them")
    parser.add_argument("model", help="preset name (see 'seam models'), model directory, GGUF file, or hub id")
    parser.add_argument("--out", required=True, type=Path, help="artifact directory to write")
    parser.add_argument("--gguf-file", default=None, metavar="NAME",
                        help="the GGUF checkpoint to load from a MODEL directory that holds several")
    parser.add_argument("--cuts", default="all", help="'all' (every layer), 'none', or layer indices like 1,4,8")
    parser.add_argument("--dtype", default="fp32", help="fp32 or fp16")
    parser.add_argument("--quantize-ue", default=None, metavar="int8", help="also write int8 blocks for the UE")
    parser.add_argument("--force", action="store_true", help="replace an existing artifact")
    parser.add_argument("--no-validate", action="store_true", help="skip the parity check against PyTorch")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or tables")
    parser.add_argument("--adapter", type=Path, default=None,
                        help="merge this LoRA adapter (peft format, e.g. from 'ue_client DIR train') into the model")
    parser.add_argument("--kv-layout", default=None, choices=("shared-buffer", "concat"),
                        help="how blocks keep the KV cache: in buffers written in place (the default where the "
                             "family has it) or grown by concatenation every step (every family; CUDA)")
    parser.set_defaults(handler=run_export, extra="export")


def add_validate_parser(commands) -> None:
    parser = commands.add_parser("validate", help="re-check an artifact against its PyTorch model")
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--model", default=None, help="the source model, when it moved since export")
    parser.add_argument("--quiet", action="store_true")
    parser.set_defaults(handler=run_validate, extra="export")


def add_models_parser(commands) -> None:
    parser = commands.add_parser("models", help="list built-in presets and supported model families")
    parser.set_defaults(handler=run_models, extra="export")


def run_export(args: argparse.Namespace) -> int:
    from seam.export.exporter import ExportRequest, export

    outcome = export(
        ExportRequest(
            model=str(Path(args.model) / args.gguf_file) if args.gguf_file else args.model,
            out=args.out,
            cuts=args.cuts,
            dtype=args.dtype,
            quantize_ue=args.quantize_ue,
            force=args.force,
            validate=not args.no_validate,
            quiet=args.quiet,
            adapter=args.adapter,
            kv_layout=args.kv_layout,
        )
    )
    if not args.quiet:
        manifest = outcome.manifest
        if outcome.up_to_date:
            print(f"{args.out} is up to date (same model and arguments); pass --force to export again")
        else:
            print(f"exported {manifest.source} ({manifest.family}, {manifest.dims.num_layers} layers) to {args.out}")
        print(blocks_table(manifest))
        if manifest.validation:
            print(validation_table(manifest.validation))
    return 0


def run_validate(args: argparse.Namespace) -> int:
    from seam.export.exporter import revalidate

    manifest = revalidate(args.artifact, args.model, args.quiet)
    if not args.quiet:
        print(validation_table(manifest.validation))
    return 0


def run_models(args: argparse.Namespace) -> int:
    from seam.export.families.base import registered_families
    from seam.export.packaged import PACKAGED, packaged_file
    from seam.export.presets import DEFAULT_PRESET, PRESETS, preset_dir
    from seam.runtime.errors import SeamError

    def installed(name: str) -> str:
        try:
            return f"yes ({packaged_file(name).name})"
        except SeamError:
            return f"no: {PACKAGED[name].install}"

    named = lambda name: name + (" (default)" if name == DEFAULT_PRESET else "")  # noqa: E731
    rows = [[named(name), "gguf", installed(name), model.purpose] for name, model in PACKAGED.items()]
    rows += [[named(name), preset.model_type, "yes" if (preset_dir(name) / "config.json").is_file() else "no",
              f"{preset.purpose} (random weights)" if preset.training is None else preset.purpose]
             for name, preset in PRESETS.items()]
    print(table(["preset", "model_type", "ready", "purpose"], rows))
    print()
    families = [
        [name, ", ".join(adapter.model_types), adapter.transformers_versions]
        for name, adapter in sorted(registered_families().items())
    ]
    print(table(["family", "model types", "transformers"], families))
    print("\nAny Hugging Face causal LM of these model types loads by hub id, local directory or GGUF file.")
    return 0
