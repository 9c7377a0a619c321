"""GGUF checkpoints as export sources: a tiny llama written to GGUF by the gguf package loads back to the very same
weights and tokens, exports and passes parity at every cut; an architecture that cannot be read is one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="reading GGUF checkpoints needs the export extra (gguf)")

from conftest import run_seam  # noqa: E402
from seam.export.presets import ensure_preset  # noqa: E402
from seam.runtime.artifact import Artifact  # noqa: E402


def permute(weight, heads):  # llama.cpp's rotary layout for q and k
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)

def write_tiny_llama_gguf(path):
    """tiny-llama's weights and tokenizer as a llama GGUF file, q and k in llama.cpp's rotary layout."""
    from transformers import AutoModelForCausalLM

    directory = ensure_preset("tiny-llama")
    model = AutoModelForCausalLM.from_pretrained(directory)
    config = model.config
    tokenizer = json.loads((directory / "tokenizer.json").read_text())
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    vocab = sorted(tokenizer["model"]["vocab"].items(), key=lambda item: item[1])
    specials = {token["content"] for token in tokenizer["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([3 if token in specials else 1 for token, _ in vocab])
    writer.add_token_merges([])
    writer.add_token_scores([0.0] * len(vocab))
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.pad_token_id)
    state = {name: tensor.detach().numpy() for name, tensor in model.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for layer in range(config.num_hidden_layers):
        for hf, gg in parts.items():
            names[f"model.layers.{layer}.{hf}.weight"] = f"blk.{layer}.{gg}.weight"
    for name, array in state.items():
        if ".q_proj." in name:
            array = permute(array, config.num_attention_heads)
        elif ".k_proj." in name:
            array = permute(array, config.num_key_value_heads)
        writer.add_tensor(names[name], np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model



def test_a_gguf_checkpoint_loads_exports_and_validates(tmp_path):
    from seam.export.sources import load_model

    path = tmp_path / "tiny-llama.gguf"
    original = write_tiny_llama_gguf(path)
    loaded = load_model(str(path))
    expected, got = original.state_dict(), loaded.model.state_dict()
    assert set(expected) == set(got) and all((expected[name] == got[name]).all() for name in expected)
    assert loaded.tokenizer.encode("hello wörld") == load_model("tiny-llama").tokenizer.encode("hello wörld")

    result = run_seam("export", str(path), "--out", str(tmp_path / "art"), "--quiet")
    assert result.returncode == 0, result.stderr
    manifest = Artifact.open(tmp_path / "art").manifest
    assert manifest.source == str(path) and len(manifest.export_args["gguf_sha256"]) == 64
    assert [record["cut"] for record in manifest.validation] == [1, 2, 3]
    assert all(record["greedy_match"] and record["max_abs_diff"] <= 1e-4 for record in manifest.validation)
    again = run_seam("export", str(tmp_path), "--gguf-file", path.name, "--out", str(tmp_path / "art"))
    assert again.returncode == 0 and "up to date" in again.stdout, again.stderr


def test_an_unreadable_gguf_architecture_is_one_line(tmp_path):
    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "seamtestarch")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    result = run_seam("export", str(path), "--out", str(tmp_path / "art"))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "cannot read the GGUF checkpoint" in lines[0] and "seamtestarch" in lines[0]
    assert not (tmp_path / "art").exists()
