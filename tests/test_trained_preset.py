"""The grammar corpus and the trained presets: seeded text, training that learns it, and export of the result."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from seam.export.byte_tokenizer import build_byte_tokenizer
from seam.export.corpus import add_corpus_parser, generate_corpus
from seam.export.presets import PRESETS, preset_dir
from seam.export.sources import fingerprint, load_model
from seam.export.training import HELD_OUT_SENTENCES, TrainingSpec, encode_corpus, lr_factor, mean_loss, train_model

PRESET = "tiny-trained-llama"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny trained preset, built once into a fresh SEAM_HOME and loaded through ``from_pretrained``."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SEAM_HOME", str(tmp_path_factory.mktemp("seam-home")))
        yield load_model(PRESET)


def test_corpus_is_seeded_ascii_text():
    text = generate_corpus(200, seed=7)
    assert text == generate_corpus(200, seed=7)
    assert text != generate_corpus(200, seed=8)
    assert text.isascii() and text.endswith(".\n")
    assert sum(text.count(end) for end in ".?") >= 200


def test_corpus_command_writes_the_text(tmp_path):
    parser = argparse.ArgumentParser()
    add_corpus_parser(parser.add_subparsers())
    args = parser.parse_args(["corpus", str(tmp_path / "grammar.txt"), "--sentences", "50", "--seed", "3"])
    assert args.handler(args) == 0
    assert (tmp_path / "grammar.txt").read_text() == generate_corpus(50, seed=3)


def test_learning_rate_warms_up_then_decays():
    factors = [lr_factor(step, 100) for step in range(100)]
    peak = factors.index(max(factors))
    assert factors[0] < factors[peak] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[peak:], factors[peak + 1:])) and factors[-1] > 0.09


def test_training_spec_is_part_of_the_preset_hash():
    preset = PRESETS[PRESET]
    longer = replace(preset, training=replace(preset.training, steps=preset.training.steps + 1))
    assert longer.spec_hash != preset.spec_hash != replace(preset, training=None).spec_hash


def test_training_is_deterministic():
    config = AutoConfig.for_model("llama", **PRESETS[PRESET].config)
    spec = TrainingSpec(steps=3, sequence=16, batch=2, corpus_sentences=50)
    first, second = (fingerprint(train_model(config, spec, 0, build_byte_tokenizer(320))) for _ in range(2))
    assert first == second


def test_training_lowers_held_out_loss(trained):
    spec = PRESETS[PRESET].training
    held_out = encode_corpus(build_byte_tokenizer(320), HELD_OUT_SENTENCES, spec.held_out_seed)
    torch.manual_seed(0)
    untrained = AutoModelForCausalLM.from_config(trained.model.config).eval()
    before, after = mean_loss(untrained, held_out, spec.sequence), mean_loss(trained.model, held_out, spec.sequence)
    assert before > math.log(320) - 0.5
    assert after < before - 2.0, f"held-out loss only fell from {before:.3f} to {after:.3f}"
    report = json.loads((preset_dir(PRESET) / "training.json").read_text())
    assert report["held_out_perplexity"] == pytest.approx(math.exp(after), rel=1e-3)


def test_trained_preset_exports_and_validates(trained, tmp_path):
    from seam.export.exporter import ExportRequest, export
    from seam.runtime.artifact import Artifact

    out = tmp_path / PRESET
    export(ExportRequest(model=PRESET, out=out, quiet=True))
    manifest = Artifact.open(out).manifest
    assert manifest.cuts == [1, 2, 3]
    assert manifest.validation and all(record["passed"] for record in manifest.validation)
    assert manifest.fingerprint == fingerprint(trained.model)
