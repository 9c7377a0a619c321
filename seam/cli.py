"""The umbrella ``seam`` command (parses flags and dispatches to a subcommand) and the ``ue_client`` entry point.

Subcommand modules are imported only when chosen, so a UE without torch can still run the runtime commands.
"""

from __future__ import annotations

import argparse
import sys

from seam.runtime.shell import CommandParser, require_extra, run_cli

def build_parser() -> argparse.ArgumentParser:
    from seam.export.cli import add_export_parser, add_models_parser, add_validate_parser
    from seam.export.corpus import add_corpus_parser
    from seam.finetune.pipeline_cli import add_train_pipeline_parser
    from seam.finetune.plan_fleet import add_plan_fleet_parser
    from seam.finetune.plan_round import add_plan_round_parser
    from seam.profiler.cli import add_probe_parser, add_profile_parser, add_traces_parser
    from seam.profiler.pipeline_plan import add_plan_pipeline_parser
    from seam.profiler.plan import add_plan_parser
    from seam.profiler.quality import add_analyze_parser
    from seam.profiler.train_policy import add_train_policy_parser
    from seam.demo import add_demo_parser
    from seam.fleet import add_fleet_parser
    from seam.keys import add_keys_parser

    parser = CommandParser(prog="seam", description="Run an LLM split between a device and an edge server.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_export_parser(commands)
    add_validate_parser(commands)
    add_models_parser(commands)
    add_demo_parser(commands)
    add_keys_parser(commands)
    add_profile_parser(commands)
    add_probe_parser(commands)
    add_plan_parser(commands)
    add_plan_pipeline_parser(commands)
    add_analyze_parser(commands)
    add_train_policy_parser(commands)
    add_traces_parser(commands)
    add_corpus_parser(commands)
    add_plan_round_parser(commands)
    add_plan_fleet_parser(commands)
    add_train_pipeline_parser(commands)
    add_fleet_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def command() -> int:
        if getattr(args, "extra", None):
            require_extra(args.extra)
        return args.handler(args)

    return run_cli(f"seam {args.command}", command)


def ue_client(argv: list[str] | None = None) -> int:
    """The ``ue_client`` command: ``ue_client DIR train ...`` fine-tunes, ``ue_client serve DIR ...`` serves
    the HTTP API, anything else generates; the choice lives here so that the client never imports the rooms that
    build on it."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        from seam.serving.cli import main as serve

        return serve(argv[1:])
    if argv[1:2] == ["train"]:
        from seam.finetune.cli import main as train

        return train([argv[0], *argv[2:]])
    from seam.ue_client.cli import main as generate

    return generate(argv)


if __name__ == "__main__":
    sys.exit(main())
