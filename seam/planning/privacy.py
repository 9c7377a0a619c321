"""Deciding from a ``seam analyze --privacy`` result: reading it, checked (``read_privacy``), and the splits whose
hidden states give an edge at most a given share of the input tokens (``splits_within_recovery``). Pure but for
the one file read; the UE's CLI calls them to bound the splits a session may use."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from seam.runtime.errors import SeamError

CELL_FIELDS = {"cut": int, "variant": str, "attack": str, "recovered": (int, float), "tokens": int}


def read_privacy(path: Path, fingerprint: str | None = None) -> dict:
    """The report a ``seam analyze --privacy`` wrote at ``path``, checked field by field; with ``fingerprint``,
    also refused unless it was measured on that artifact."""
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise SeamError(f"cannot read the privacy analysis {path} ({type(error).__name__}: {error}); "
                        "write it with seam analyze DIR --privacy") from None
    problem = _problem(report)
    if problem:
        raise SeamError(f"{path} is not a privacy analysis: {problem}; write it with seam analyze DIR --privacy")
    if fingerprint is not None and report["artifact_fingerprint"] != fingerprint:
        raise SeamError(f"{path} was measured on another artifact; analyse this one with seam analyze DIR --privacy")
    return report


def _problem(report) -> str | None:
    """What makes ``report`` no privacy analysis, or None."""
    if not isinstance(report, dict) or report.get("kind") != "privacy":
        return "its kind is not 'privacy'"
    for key in ("artifact_fingerprint", "text"):
        if not isinstance(report.get(key), str):
            return f"{key!r} must be a string"
    tokens = report.get("tokens")
    if not isinstance(tokens, dict) or not all(_count(tokens.get(part)) for part in ("train", "test")):
        return "'tokens' must hold the counts 'train' and 'test'"
    cells = report.get("cells")
    if not isinstance(cells, list) or not cells:
        return "'cells' must be a non-empty list"
    return next((f"cell {index} {problem}" for index, cell in enumerate(cells)
                 if (problem := _cell_problem(cell))), None)


def _cell_problem(cell) -> str | None:
    if not isinstance(cell, dict):
        return "is not an object"
    for key, kind in CELL_FIELDS.items():
        value = cell.get(key)
        if isinstance(value, bool) or not isinstance(value, kind):
            return f"needs {key!r} ({kind.__name__ if isinstance(kind, type) else 'a number'})"
    if not (math.isfinite(cell["recovered"]) and 0 <= cell["recovered"] <= 1):
        return f"has 'recovered' {cell['recovered']!r} outside [0, 1]"
    if cell["cut"] < 0 or cell["tokens"] < 0:
        return "has a negative 'cut' or 'tokens'"
    return None


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def splits_within_recovery(cells: Sequence[dict], max_recovery: float, variant: str = "none", *,
                           num_layers: int) -> tuple[int, ...]:
    """The splits, ascending, at which the worst attack (the most recovered over the attacks) on the hidden states
    crossing in ``variant`` recovers at most ``max_recovery`` of the tokens; ``num_layers`` (all on the UE, nothing
    crosses) always, and 0 (the token ids themselves cross) only when ``max_recovery`` is 1. A cut the cells do
    not measure is not allowed: unmeasured is not shown to be private."""
    if isinstance(max_recovery, bool) or not isinstance(max_recovery, (int, float)) \
            or not 0 <= max_recovery <= 1:
        raise SeamError(f"the most token recovery allowed must be a share in [0, 1], got {max_recovery!r}")
    worst: dict[int, float] = {}
    for cell in cells:
        if cell["variant"] == variant:
            if not 0 < cell["cut"] < num_layers:
                raise SeamError(f"the privacy analysis measures cut {cell['cut']}, which is no inner cut of a "
                                f"{num_layers}-layer model; analyse this artifact with seam analyze DIR --privacy")
            worst[cell["cut"]] = max(worst.get(cell["cut"], 0.0), cell["recovered"])
    if not worst:
        known = ", ".join(sorted({cell["variant"] for cell in cells})) or "none at all"
        raise SeamError(f"the privacy analysis has no cells for {variant!r}, only for {known}; analyse that "
                        "codec with seam analyze DIR --privacy --codecs ...")
    allowed = {cut for cut, recovered in worst.items() if recovered <= max_recovery}
    return tuple(sorted(allowed | {num_layers} | ({0} if max_recovery >= 1 else set())))
