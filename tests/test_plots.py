"""The plots Seam draws say what a reader needs: every link of a plan with its best split marked and its time to
first token, heatmap values legible on every cell, and whole training steps."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("matplotlib", reason="plots need the plot extra (matplotlib)")

from matplotlib.colors import to_rgb  # noqa: E402

from seam.planning.cost_model import Link, plan  # noqa: E402
from seam.profiler.plan import plan_figure, plan_table  # noqa: E402
from seam.profiler.quality import QualityReport, heatmap_figure  # noqa: E402
from test_cost_model import device  # noqa: E402


def plans():
    links = {f"{rate:g} Mbit/s": Link.from_mbit(rate, 20) for rate in (0.1, 1, 10, 100)}
    return plan(device(2.0), device(0.5, name="edge"), links, context=128)


def test_the_plan_plot_shows_every_link_its_best_split_and_time_to_first_token():
    decode, prefill, parts, best = plan_figure(plans()).axes[:4]
    for axes in (decode, prefill):
        lines = [line for line in axes.get_lines() if line.get_label() and not line.get_label().startswith("_")]
        assert len(lines) == 4  # one per link, not the middle one alone
        stars = [line for line in axes.get_lines() if line.get_marker() == "*"]
        assert len(stars) == 4
    assert "first token" in prefill.get_title()
    assert any(text.get_text() == "best" for text in parts.texts)


def test_the_plan_table_names_its_column_groups():
    first_line = plan_table(plans()[0]).splitlines()[0]
    assert "per token (decode)" in first_line and "first token (prefill)" in first_line


def test_heatmap_values_are_legible_on_dark_and_light_cells():
    cells = [{"cut": cut, "variant": variant, "increase_pct": value}
             for cut, row in ((1, (0.0, 80.0)), (2, (0.1, 5.0))) for variant, value in zip(("a", "b"), row)]
    axes = heatmap_figure(QualityReport("art", "text", 100, 64, 32, 0, 12.0, cells)).axes[0]
    colors = {text.get_text(): to_rgb(text.get_color()) for text in axes.texts}
    assert colors["+80.0"] == (1.0, 1.0, 1.0) and colors["+0.0"] == (0.0, 0.0, 0.0)


def test_the_loss_curve_counts_whole_steps():
    from seam.finetune.cli import loss_figure

    axes = loss_figure(list(np.linspace(3, 1, 7)), "loss").axes[0]
    ticks = [tick for tick in axes.get_xticks() if 1 <= tick <= 7]
    assert ticks and all(float(tick).is_integer() for tick in ticks)
