"""The umbrella ``seam`` command: parses flags, dispatches to a subcommand, and turns errors into one line.

Subcommand modules are imported only when chosen, so a UE without torch can still run the runtime commands.
"""

from __future__ import annotations

import argparse
import signal
import sys

from seam.runtime.errors import SeamError

# Modules of the optional extras, and the extra that installs each.
EXTRA_OF_MODULE = {"torch": "export", "transformers": "export", "onnx": "export", "onnxscript": "export",
                   "stable_baselines3": "rl", "gymnasium": "rl", "matplotlib": "plot", "scipy": "finetune",
                   "cvxpy": "finetune", "peft": "finetune"}


def build_parser() -> argparse.ArgumentParser:
    from seam.export.cli import add_export_parser, add_models_parser, add_validate_parser
    from seam.export.corpus import add_corpus_parser
    from seam.finetune.plan_round import add_plan_round_parser
    from seam.profiler.cli import add_probe_parser, add_profile_parser
    from seam.profiler.plan import add_plan_parser
    from seam.profiler.quality import add_analyze_parser
    from seam.profiler.train_policy import add_train_policy_parser
    from seam.runtime.traces import add_traces_parser
    from seam.demo import add_demo_parser
    from seam.keys import add_keys_parser

    parser = argparse.ArgumentParser(prog="seam", description="Run an LLM split between a device and an edge server.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_export_parser(commands)
    add_validate_parser(commands)
    add_models_parser(commands)
    add_demo_parser(commands)
    add_keys_parser(commands)
    add_profile_parser(commands)
    add_probe_parser(commands)
    add_plan_parser(commands)
    add_analyze_parser(commands)
    add_train_policy_parser(commands)
    add_traces_parser(commands)
    add_corpus_parser(commands)
    add_plan_round_parser(commands)
    return parser


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through the 'finally' blocks that remove partial output


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.handler(args)
    except SeamError as error:
        print(f"seam {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code
    except ModuleNotFoundError as error:
        if error.name not in EXTRA_OF_MODULE:
            raise
        extra = EXTRA_OF_MODULE[error.name]
        print(
            f"seam {args.command}: error: this command needs {error.name}, part of the '{extra}' extra; "
            f"install it with: pip install 'seam[{extra}]'",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(f"seam {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
