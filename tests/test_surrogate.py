"""The reward surrogate: features of a choice, and a fit that generalises to choices it never saw."""

from __future__ import annotations

import math

import pytest

from seam.profiler.surrogate import features, held_out_error

NUM_LAYERS = 6


def synthetic_cells() -> list[dict]:
    """Cells whose perplexity increase follows a smooth law in the features, as the analyses show."""
    cells = []
    for cut in range(1, NUM_LAYERS):
        depth = 1 + 0.5 * math.sin(math.pi * cut / NUM_LAYERS)  # middle cuts suffer most
        for variant in ["codec:fp16", "codec:int8", "codec:int4", *(f"erasure:{p}" for p in (0.01, 0.05, 0.1, 0.2)),
                        *(f"awgn:{db}" for db in (30, 20, 15, 10, 5))]:
            _, bits, erased, noise = features(cut, NUM_LAYERS, variant)
            increase = depth * (25 * erased + 60 * noise + 2 ** (-8 * bits + 8))
            cells.append({"cut": cut, "variant": variant, "increase_pct": increase})
    return cells


def test_features_describe_codecs_and_impairments():
    assert features(3, 6, "codec:int4") == [0.5, pytest.approx(0.4), 0.0, 0.0]
    assert features(3, 6, "erasure:0.05")[2:] == [0.05, 0.0]
    assert features(3, 6, "awgn:20")[3] == pytest.approx(0.01)


def test_the_surrogate_predicts_cells_it_never_saw_far_better_than_the_mean():
    errors = held_out_error(synthetic_cells(), NUM_LAYERS)

    assert errors["test_cells"] >= 10
    assert errors["mae_pct_points"] < errors["naive_mae_pct_points"] / 3
