"""``seam analyze``: sliding-window perplexity of the split model per cut, codec and impairment."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import run_seam
from seam.profiler.quality import analyze, nll, variants, windows
from seam.runtime.artifact import Artifact
from seam.runtime.errors import SeamError

TEXT = "The device keeps the first layers and the edge server runs the rest of the model. " * 6


@pytest.mark.parametrize("tokens, window, stride", [(10, 4, 2), (100, 32, 16), (33, 32, 32), (5, 8, 3)])
def test_windows_score_every_token_but_the_first_once(tokens, window, stride):
    spans = windows(tokens, window, stride)
    scored = [t for _, end, start in spans for t in range(start, end)]
    assert scored == list(range(1, tokens))
    assert all(end - begin <= window and begin < start for begin, end, start in spans)


def test_nll_is_the_negative_log_softmax_of_the_targets():
    rng = np.random.default_rng(0)
    logits, ids = rng.normal(size=(6, 11)), rng.integers(0, 11, 7)
    expected = 0.0
    for position in range(3, 7):  # window from 0: row position - 1 predicts ids[position]
        row = logits[position - 1]
        expected -= row[ids[position]] - math.log(np.exp(row).sum())
    assert nll(logits, ids, 0, 3, 7) == pytest.approx(expected)


def test_a_lossless_crossing_keeps_the_unsplit_perplexity_and_a_lossy_one_moves_it(exported):
    artifact = Artifact.open(exported("tiny-llama"))
    ids = np.random.default_rng(1).integers(3, artifact.manifest.dims.vocab_size, 150)
    chosen = variants(["fp32", "fp16", "int4"], [0.5], [])
    report = analyze(artifact, ids, [1, 3], chosen, window=48, stride=24)
    change = {(cell["cut"], cell["variant"]): cell["increase_pct"] for cell in report.cells}
    assert report.tokens == 149 and report.baseline_ppl > 1
    for cut in (1, 3):
        assert abs(change[cut, "codec:fp32"]) < 1e-3
        assert abs(change[cut, "codec:fp16"]) < abs(change[cut, "codec:int4"]) < abs(change[cut, "erasure:0.5"])


def test_bad_variants_are_refused_before_any_work():
    with pytest.raises(SeamError, match="unknown activation codec"):
        variants(["zip"], [], [])
    with pytest.raises(SeamError):
        variants([], [1.5], [])


def test_seam_analyze_writes_results_and_refuses_bad_input(exported, tmp_path):
    directory = exported("tiny-llama")
    text, empty = tmp_path / "text.txt", tmp_path / "empty.txt"
    text.write_text(TEXT)
    empty.write_text("  \n")
    out, plot = tmp_path / "quality.json", tmp_path / "quality.png"

    result = run_seam("analyze", str(directory), "--text", str(text), "--cuts", "2", "--codecs", "int8",
                      "--erasure", "0.1", "--awgn", "", "--out", str(out), "--plot", str(plot), "--quiet")

    assert result.returncode == 0, result.stderr
    saved = json.loads(out.read_text())
    assert [(cell["cut"], cell["variant"]) for cell in saved["cells"]] == [(2, "codec:int8"), (2, "erasure:0.1")]
    assert "codec:int8" in result.stdout and plot.stat().st_size > 0
    for args, message in [(["--text", str(empty)], "is empty"), (["--text", str(tmp_path / "missing.txt")], "cannot read"),
                          (["--text", str(text), "--erasure", "1.2"], "erasure"),
                          (["--text", str(text), "--cuts", "7"], "inner cuts")]:
        failed = run_seam("analyze", str(directory), *args, "--quiet")
        assert failed.returncode == 2 and message in failed.stderr and failed.stderr.count("\n") == 1, failed.stderr
