"""What every Seam command shares: ``run_cli``, which turns a failure into one line on stderr and an exit code,
the table of which extra installs each optional module, comma-separated list arguments, and plain-text tables.

Used by ``seam``, ``edge_server``, ``ue_client`` and ``ue_client DIR train`` alike, so each says what went wrong
the same way: a user's mistake (``SeamError``) exits 2, a missing optional package names the extra to install,
Ctrl-C exits 130, and SIGTERM unwinds through the ``finally`` blocks that remove partial output.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import signal
import sys
from collections.abc import Callable, Sequence

from seam.runtime.children import stop_with_parent
from seam.runtime.errors import SeamError
from seam.runtime.version import DISTRIBUTION, VERSION

# The optional extras (pyproject.toml) and the modules each installs: the one table every hint is made from.
EXTRAS = {
    "export": ("torch", "transformers", "onnx", "onnxscript"),  # seam export, validate, demo
    "finetune": ("torch", "transformers", "peft"),  # ue_client DIR train, edge_server --train
    "rl": ("torch", "stable_baselines3", "gymnasium"),  # seam train-policy
    "allocation": ("scipy", "cvxpy"),  # seam plan-round, ue_client DIR train --plan (FedsLLM, DASHF)
    "plot": ("matplotlib",),  # --plot, loss curves
    "serve": ("starlette", "uvicorn"),  # ue_client serve (the OpenAI-compatible HTTP endpoint)
    "fleet": ("etcd3gw",),  # --registry of edge_server and ue_client, seam fleet
}


class CommandParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, like every other error of a Seam command, and which
    answers ``--version``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--version", action="version", version=f"%(prog)s {VERSION} ({DISTRIBUTION})")

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def _hint(module: str, extra: str) -> str:
    return f"this needs {module}, part of the '{extra}' extra; install it with: pip install '{DISTRIBUTION}[{extra}]'"


def missing_extra(module: str) -> str | None:
    """What to install for a missing ``module`` when no command said which extra it needs: the first extra that
    holds it, or None when none does."""
    extra = next((name for name, modules in EXTRAS.items() if module.split(".")[0] in modules), None)
    return None if extra is None else _hint(module, extra)


def require_extra(extra: str) -> None:
    """Refuses to start a command whose ``extra`` is not wholly installed, naming that extra."""
    for module in EXTRAS[extra]:
        if not has(module):
            raise SeamError(_hint(module, extra))


def has(module: str) -> bool:
    """Whether an optional ``module`` is installed, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a finder that refuses it outright
        return False


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def run_cli(prog: str, body: Callable[[], int]) -> int:
    """Runs a command's ``body`` and returns its exit code, reporting failures as one line prefixed ``prog``."""
    signal.signal(signal.SIGTERM, _terminate)
    stop_with_parent()
    try:
        return body()
    except SeamError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return error.exit_code
    except ModuleNotFoundError as error:
        hint = missing_extra(error.name or "")
        if hint is None:
            raise
        print(f"{prog}: error: {hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def comma_list(convert: Callable = str, positive: bool = False, choices: Sequence[str] | None = None,
               allow_empty: bool = False, signed: bool = False):
    """An argparse type for comma-separated values: names (among ``choices`` when given), or numbers each at
    least 0 (above 0 when ``positive``, any with ``signed``)."""
    kind = getattr(convert, "__name__", "value")

    def parse(text: str) -> tuple:
        try:
            values = tuple(convert(part.strip()) for part in text.split(",") if part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind}s, got {text!r}") from None
        if not values and not allow_empty:
            raise argparse.ArgumentTypeError(f"expected at least one {kind}, got {text!r}")
        if choices is not None:
            unknown = [value for value in values if value not in choices]
            if unknown:
                raise argparse.ArgumentTypeError(f"unknown {unknown[0]!r}; known: {', '.join(choices)}")
        elif convert is not str and not signed and any(value < 0 or (positive and value == 0) for value in values):
            raise argparse.ArgumentTypeError(f"expected {'positive' if positive else 'non-negative'} numbers, "
                                             f"got {text!r}")
        return values

    return parse


def number(kind: type = int, low: float | None = None, high: float | None = None, above: bool = False):
    """An argparse type for one finite number of ``kind`` in ``[low, high]`` (``(low, high]`` with ``above``);
    every numeric flag of every command takes one, so that nonsense is refused before anything starts."""
    bounds = (f"{'above' if above else 'at least'} {low:g}" if low is not None else "",
              f"at most {high:g}" if high is not None else "")
    wanted = f"{'an integer' if kind is int else 'a number'}{' ' if any(bounds) else ''}" + \
        " and ".join(bound for bound in bounds if bound)

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        if value != value or value in (float("inf"), float("-inf")) or (low is not None and (
                value < low or (above and value == low))) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


def checked(check: Callable[[str], object]) -> Callable[[str], str]:
    """An argparse type from a ``check`` that raises SeamError, so that the flag is refused before anything
    starts."""

    def parse(text: str) -> str:
        try:
            check(text)
        except SeamError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return text

    return parse


def bar_disabled(quiet: bool) -> bool | None:
    """tqdm's ``disable`` for a command's progress bar: off when asked, and off unless stderr is a terminal (None
    is tqdm's own "only on a TTY"), so that logs never fill with carriage returns."""
    return True if quiet else None


LOG_LEVELS = ("debug", "info", "warning", "error")


def add_log_level(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--log-level", choices=LOG_LEVELS, default=default, help=f"what to log (default {default})")


def configure_logging(level: str, name: str) -> None:
    logging.basicConfig(level=level.upper(), format=f"%(asctime)s {name} %(message)s", stream=sys.stderr)


def table(headers: list[str], rows: list[list[str]], groups: list[tuple[str, int]] | None = None) -> str:
    """A plain-text table, right-aligned columns under a dashed rule; ``groups`` (label, columns spanned) adds a
    line above the headers naming runs of columns."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    lines = [line(headers).rstrip(), line(["-" * w for w in widths]), *[line(row).rstrip() for row in rows]]
    if groups:
        spans, first = [], 0
        for label, count in groups:
            width = sum(widths[first:first + count]) + 2 * (count - 1)
            spans.append(label.center(width, "-" if label else " ") if label else " " * width)
            first += count
        lines.insert(0, "  ".join(spans).rstrip())
    return "\n".join(lines)
