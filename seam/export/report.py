"""Plain-text tables for the export CLIs: blocks of an artifact and per-cut validation results."""

from __future__ import annotations

from seam.runtime.artifact import Manifest
from seam.runtime.shell import table


def blocks_table(manifest: Manifest) -> str:
    rows = []
    for block in manifest.blocks:
        rows.append(
            [
                str(block.index),
                str(block.layers),
                *[f"{v.weight_bytes / 2**20:.1f}" for v in block.variants.values()],
                block.variants[manifest.dtype].file,
            ]
        )
    variants = [f"{name} MiB" for name in manifest.blocks[0].variants]
    return table(["block", "layers", *variants, "file"], rows)


def validation_table(records: list[dict]) -> str:
    rows = [
        [
            str(r["cut"]),
            r["dtype"],
            "identical" if r["greedy_match"] else "differ",
            f"{r['max_abs_diff']:.2e}",
            f"{r['top1_agreement']:.3f}",
            f"{r['kl_divergence']:.2e}",
            "ok" if r["passed"] else "OUTSIDE TOLERANCE",
        ]
        for r in records
    ]
    return table(["cut", "dtype", "greedy tokens", "max |dlogit|", "top-1", "KL", "result"], rows)
