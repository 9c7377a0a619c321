"""Export of every tiny family at every cut: manifest contents, fp32 parity, and split generation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import TINY_PRESETS
from seam.export.presets import ensure_preset
from seam.runtime.artifact import Artifact, sha256_file
from seam.runtime.executor import SessionPool
from seam.runtime.generation import LocalSplit, generate


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_manifest_describes_every_cut(exported, preset):
    artifact = Artifact.open(exported(preset))
    manifest = artifact.manifest
    layers = manifest.dims.num_layers
    assert manifest.cuts == list(range(1, layers))
    assert [b.layers.start for b in manifest.blocks] == [0, *manifest.cuts]
    assert [b.layers.end for b in manifest.blocks] == [*manifest.cuts, layers]
    first, last = manifest.blocks[0], manifest.blocks[-1]
    assert first.inputs[0] == "input_ids" and last.outputs[0] == "logits"
    assert "past_key_values.0.key" in first.inputs and "present.0.value" in first.outputs
    for block in manifest.blocks:
        onnx_file = block.variants["fp32"]
        assert sha256_file(artifact.root / onnx_file.file) == onnx_file.sha256
        assert onnx_file.weight_bytes > 0
    assert manifest.activation_bytes_per_token == {str(c): 4 * manifest.dims.hidden_size for c in manifest.cuts}
    assert (artifact.root / "tokenizer.json").is_file() and (artifact.root / "config.json").is_file()


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_fp32_validation_is_identical_at_every_cut(exported, preset):
    records = Artifact.open(exported(preset)).manifest.validation
    assert [r["cut"] for r in records] == Artifact.open(exported(preset)).manifest.cuts
    for record in records:
        assert record["dtype"] == "fp32" and record["batches"] == [1, 2] and record["decode_steps"] == 16
        assert record["greedy_match"] and record["max_abs_diff"] <= 1e-4 and record["passed"]


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_split_generation_matches_transformers_generate(exported, preset):
    """Independent of the export's own validation: HF generate() against the blocks at every split point."""
    artifact = Artifact.open(exported(preset))
    model = AutoModelForCausalLM.from_pretrained(ensure_preset(preset))
    prompts = [[5, 17, 42, 99, 7, 3, 250], [64, 8, 12]]
    pad = artifact.manifest.tokenizer["pad_token_id"]
    ids = torch.tensor([[pad] * 4 + prompts[1], prompts[0]][::-1])
    mask = (torch.arange(7)[None, :] >= torch.tensor([[0], [4]])).long()
    with torch.no_grad():
        expected = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=pad,
            eos_token_id=None,
        )[:, 7:].numpy()
    pool = SessionPool(artifact)
    for split in artifact.split_points:
        produced = np.stack([t for t, _ in generate(LocalSplit(pool, split), prompts, 12, pad)], axis=1)
        assert (produced == expected).all(), f"split {split} diverges from transformers"


def test_reexport_with_same_arguments_is_a_noop(exported):
    out = exported("tiny-llama")
    before = (out / "manifest.json").stat().st_mtime_ns
    from seam.export.exporter import ExportRequest, export

    outcome = export(ExportRequest(model="tiny-llama", out=out, quiet=True))
    assert outcome.up_to_date
    assert (out / "manifest.json").stat().st_mtime_ns == before


def test_selected_cuts_fp16_and_int8(artifacts_root):
    from seam.export.exporter import ExportRequest, export

    out = artifacts_root / "tiny-gpt2-fp16"
    manifest = export(ExportRequest(model="tiny-gpt2", out=out, cuts="1,3", dtype="fp16", quiet=True)).manifest
    assert [str(b.layers) for b in manifest.blocks] == ["[0, 1)", "[1, 3)", "[3, 4)"]
    assert all(r["dtype"] == "fp16" and "top1_agreement" in r and "tolerance" in r for r in manifest.validation)
    assert all(r["top1_agreement"] >= 0.9 for r in manifest.validation)

    out = artifacts_root / "tiny-llama-int8"
    manifest = export(ExportRequest(model="tiny-llama", out=out, cuts="2", quantize_ue="int8", quiet=True)).manifest
    block = manifest.blocks[0]
    assert block.variants["int8"].weight_bytes < block.variants["fp32"].weight_bytes / 2
    assert [r["dtype"] for r in manifest.validation] == ["fp32", "int8-ue"]
    assert 0 < manifest.validation[1]["kl_divergence"] < 1


def test_single_block_export(artifacts_root):
    from seam.export.exporter import ExportRequest, export

    out = artifacts_root / "tiny-llama-single"
    manifest = export(ExportRequest(model="tiny-llama", out=out, cuts="none", quiet=True)).manifest
    assert len(manifest.blocks) == 1 and manifest.validation[0]["cut"] == 4 and manifest.validation[0]["passed"]
    assert json.loads((out / "manifest.json").read_text())["cuts"] == []
