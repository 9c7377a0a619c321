"""``seam analyze --privacy``: the share of input tokens an edge recovers from the hidden states at each cut, and
the planning side that reads it and bounds the splits."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_seam
from seam.planning.privacy import read_privacy, splits_within_recovery
from seam.profiler.privacy import (NEAREST, PROBE, CutStates, LinearProbe, analyze_privacy, attack_cut, crossings,
                                   embedding_table, nearest_tokens, split_text, unit_rows)
from seam.profiler.quality import variants
from seam.runtime.artifact import Artifact
from seam.runtime.errors import SeamError
from seam.runtime.text import load_tokenizer

TEXT = ("The device keeps the first layers of the model and sends the hidden states at the cut to the edge "
        "server, which runs the rest and answers with the next token. ") * 12


def test_nearest_tokens_scores_the_table_in_chunks_by_cosine():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(50, 8)).astype(np.float32)
    table[7] = 0  # an unused id: never nearest, and no division by zero
    wanted = rng.integers(0, 50, 40)
    wanted[wanted == 7] = 8
    rows = table[wanted] * rng.uniform(0.1, 30, (40, 1)).astype(np.float32)  # a row's norm must not matter

    found = nearest_tokens(rows, unit_rows(table), block=3)

    assert found.tolist() == wanted.tolist()


def test_the_probe_learns_the_map_back_to_the_embedding_and_names_tokens_it_never_saw():
    rng = np.random.default_rng(1)
    table = unit_rows(rng.normal(size=(40, 12)).astype(np.float32))
    mixing = rng.normal(size=(12, 20)).astype(np.float32)  # what the layers did: a map the probe must undo
    received = lambda tokens: (table[tokens] @ mixing * 5 + rng.normal(size=(len(tokens), 20)) * 0.1
                               + 3).astype(np.float32)
    train_tokens = rng.integers(0, 25, 600)  # 25..39 never appear in training
    test_tokens = np.arange(40).repeat(5)

    probe = LinearProbe.fit(received(train_tokens), table[train_tokens])
    guessed = nearest_tokens(probe.predict(received(test_tokens)), table)

    assert np.mean(guessed == test_tokens) > 0.95
    assert np.mean(guessed[test_tokens >= 25] == test_tokens[test_tokens >= 25]) > 0.9


def test_split_text_trains_on_the_start_and_shares_a_short_text_alike():
    ids = np.arange(100)
    train, test = split_text(ids, 60, 20)
    assert (train.tolist(), test.tolist()) == (list(range(60)), list(range(60, 80)))
    train, test = split_text(ids, 300, 100)
    assert (len(train), len(test)) == (75, 25)
    with pytest.raises(SeamError, match="too few"):
        split_text(np.arange(2), 300, 100)


@pytest.fixture(scope="module")
def tiny(exported):
    artifact = Artifact.open(exported("tiny-llama"))
    ids = np.array(load_tokenizer(artifact).encode(TEXT).ids, dtype=np.int64)
    return artifact, ids


def test_the_embedding_table_read_from_block_zero_is_the_models_input_embedding(tiny):
    from seam.export.sources import load_model

    artifact, _ = tiny
    table = embedding_table(artifact)
    expected = load_model("tiny-llama").model.get_input_embeddings().weight.detach().numpy()
    assert table.dtype == np.float32 and table.shape == (artifact.manifest.dims.vocab_size, 64)
    assert np.array_equal(table, expected)


def test_each_attack_is_scored_under_its_own_name():
    rng = np.random.default_rng(2)
    table = unit_rows(rng.normal(size=(30, 10)).astype(np.float32))
    mixing = rng.normal(size=(10, 10)).astype(np.float32)
    train_tokens, test_tokens = rng.integers(0, 30, 400), rng.integers(0, 30, 100)
    states = lambda tokens, hidden: CutStates(tokens, {1: hidden[tokens], 2: (hidden @ mixing)[tokens]},
                                              (len(tokens),))
    embedded = table * 3  # cut 1 carries the embedding itself, cut 2 a mix of it

    cells = [attack_cut(states(train_tokens, embedded), states(test_tokens, embedded), cut, crossings([]), table,
                        rng) for cut in (1, 2)]

    share = {(cell["cut"], cell["attack"]): cell["recovered"] for found in cells for cell in found}
    assert share == {(1, NEAREST): 1.0, (1, PROBE): 1.0, (2, NEAREST): share[2, NEAREST], (2, PROBE): 1.0}
    assert share[2, NEAREST] < 0.5
    assert {cell["variant"] for found in cells for cell in found} == {"none"}


def test_random_layers_hide_the_embedding_from_nearest_neighbour_but_not_from_the_probe(tiny):
    artifact, ids = tiny
    train, test = split_text(ids, 1200, 400)
    chosen = variants(["fp32", "int4"], [0.9], [])

    report = analyze_privacy(artifact, train, test, [1, 3], chosen, window=64, stride=32, seed=0)
    again = analyze_privacy(artifact, train, test, [1, 3], chosen, window=64, stride=32, seed=0)

    share = {(cell["cut"], cell["variant"], cell["attack"]): cell["recovered"] for cell in report.cells}
    assert report.cells == again.cells  # seeded and closed-form: the same text gives the same figures
    assert report.tokens == {"train": 1200, "test": 400}
    assert len(report.cells) == 2 * 4 * 2 and all(cell["tokens"] == 400 for cell in report.cells)
    assert all(0 <= value <= 1 for value in share.values())
    # tiny-llama's weights (initializer range 0.2) make layer 0's output twenty times the embedding's norm:
    # cosine finds nothing (about 1%), the probe undoes the layer (about 96%)
    assert share[1, "none", NEAREST] < 0.1 and share[1, "none", PROBE] > 0.85
    for cut in (1, 3):
        assert share[cut, "codec:fp32", PROBE] == share[cut, "none", PROBE]
        assert abs(share[cut, "codec:int4", PROBE] - share[cut, "none", PROBE]) < 0.05
        assert share[cut, "erasure:0.9", PROBE] < share[cut, "none", PROBE] - 0.3


def test_seam_analyze_privacy_writes_the_report_and_the_plot(exported, tmp_path):
    text, out, plot = tmp_path / "notes.txt", tmp_path / "privacy.json", tmp_path / "privacy.png"
    text.write_text(TEXT)

    result = run_seam("analyze", str(exported("tiny-llama")), "--privacy", "--text", str(text), "--cuts", "1,3",
                      "--codecs", "int8", "--erasure", "", "--awgn", "20", "--privacy-tokens", "600",
                      "--privacy-test-tokens", "200", "--out", str(out), "--plot", str(plot), "--quiet")

    assert result.returncode == 0, result.stderr
    saved = json.loads(out.read_text())
    assert list(saved) == ["kind", "artifact_fingerprint", "text", "tokens", "cells"]
    assert saved["kind"] == "privacy" and saved["text"] == "notes.txt"
    assert saved["tokens"] == {"train": 600, "test": 200}
    assert {(cell["cut"], cell["variant"], cell["attack"]) for cell in saved["cells"]} == {
        (cut, variant, attack) for cut in (1, 3) for variant in ("none", "codec:int8", "awgn:20")
        for attack in (NEAREST, PROBE)}
    assert all(set(cell) == {"cut", "variant", "attack", "recovered", "tokens"} for cell in saved["cells"])
    assert read_privacy(out)["cells"] == saved["cells"]
    assert "codec:int8" in result.stdout and plot.stat().st_size > 0


def test_seam_analyze_privacy_refuses_bad_input_in_one_line(exported, tmp_path):
    directory = str(exported("tiny-llama"))
    for args, message in [((str(tmp_path / "missing"), "--privacy"), "does not exist"),
                          ((directory, "--privacy", "--cuts", "9"), "inner cuts"),
                          ((directory, "--privacy", "--text", str(tmp_path / "none.txt")), "cannot read"),
                          ((directory, "--privacy", "--codecs", "zip"), "unknown activation codec")]:
        failed = run_seam("analyze", *args, "--quiet")
        assert failed.returncode == 2 and message in failed.stderr and failed.stderr.count("\n") == 1, failed.stderr


def cells_for(recovery: dict[tuple[int, str], tuple[float, float]]) -> list[dict]:
    return [{"cut": cut, "variant": variant, "attack": attack, "recovered": share, "tokens": 100}
            for (cut, variant), shares in recovery.items() for attack, share in zip((NEAREST, PROBE), shares)]


def test_splits_within_recovery_takes_the_worst_attack_per_cut():
    cells = cells_for({(1, "none"): (0.9, 0.95), (2, "none"): (0.05, 0.3), (3, "none"): (0.01, 0.08),
                       (1, "codec:int4"): (0.1, 0.2), (2, "codec:int4"): (0.01, 0.02)})

    assert splits_within_recovery(cells, 0.1, num_layers=4) == (3, 4)
    assert splits_within_recovery(cells, 0.3, num_layers=4) == (2, 3, 4)
    assert splits_within_recovery(cells, 0.0, num_layers=4) == (4,)  # all on the UE is always allowed
    assert splits_within_recovery(cells, 0.2, "codec:int4", num_layers=4) == (1, 2, 4)  # cut 3 unmeasured
    assert splits_within_recovery(cells, 1.0, num_layers=4) == (0, 1, 2, 3, 4)


def test_splits_within_recovery_refuses_what_it_cannot_decide():
    cells = cells_for({(1, "none"): (0.5, 0.5)})
    with pytest.raises(SeamError, match="no cells for 'codec:int8'"):
        splits_within_recovery(cells, 0.1, "codec:int8", num_layers=4)
    with pytest.raises(SeamError, match=r"\[0, 1\]"):
        splits_within_recovery(cells, 1.5, num_layers=4)
    with pytest.raises(SeamError, match="no inner cut"):
        splits_within_recovery(cells, 0.1, num_layers=1)


def good_report() -> dict:
    return {"kind": "privacy", "artifact_fingerprint": "abc", "text": "notes.txt", "tokens": {"train": 9, "test": 3},
            "cells": cells_for({(1, "none"): (0.5, 0.25)})}


@pytest.mark.parametrize("spoil, message", [
    (lambda report: report.update(kind="quality"), "kind"),
    (lambda report: report.pop("tokens"), "tokens"),
    (lambda report: report.update(cells=[]), "non-empty"),
    (lambda report: report["cells"][1].update(recovered=1.5), "outside"),
    (lambda report: report["cells"][0].pop("attack"), "'attack'"),
    (lambda report: report["cells"][0].update(cut="1"), "'cut'"),
])
def test_read_privacy_refuses_a_malformed_report_in_one_line(tmp_path, spoil, message):
    path = tmp_path / "privacy.json"
    report = good_report()
    spoil(report)
    path.write_text(json.dumps(report))

    with pytest.raises(SeamError, match=message) as refused:
        read_privacy(path)

    assert "\n" not in str(refused.value)


def test_read_privacy_reads_a_good_report_and_checks_its_artifact(tmp_path):
    path, broken = tmp_path / "privacy.json", tmp_path / "broken.json"
    path.write_text(json.dumps(good_report()))
    broken.write_text("{not json")

    assert read_privacy(path, fingerprint="abc") == good_report()
    with pytest.raises(SeamError, match="another artifact"):
        read_privacy(path, fingerprint="xyz")
    with pytest.raises(SeamError, match="cannot read"):
        read_privacy(broken)
    with pytest.raises(SeamError, match="cannot read"):
        read_privacy(tmp_path / "missing.json")
