"""Plain-text tables for the export CLIs: blocks of an artifact and per-cut validation results."""

from __future__ import annotations

from seam.runtime.artifact import Manifest


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *[line(row) for row in rows]])


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
