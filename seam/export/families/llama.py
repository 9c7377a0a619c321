"""The Llama family: llama, mistral, qwen2 and qwen3 share embedding, rotary features and layer calls."""

from __future__ import annotations

import torch

from seam.export.families.base import FamilyAdapter, layer_output, register_family
from seam.runtime.errors import SeamError


@register_family
class LlamaFamily(FamilyAdapter):
    name = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    transformers_versions = ">=5.0,<6"
    position_features = ("rope_cos", "rope_sin")
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    kv_layouts = ("shared-buffer", "concat")

    def check_config(self) -> None:
        # qwen2/qwen3 windows apply only to some layers; one prelude mask per step cannot express that.
        if self.config.model_type != "mistral" and getattr(self.config, "use_sliding_window", False):
            raise SeamError(
                f"{self.config.model_type} with use_sliding_window=True (per-layer windows) is not supported yet"
            )

    def layers(self):
        return self.model.model.layers

    def embed(self, input_ids, position_ids):
        return self.model.model.embed_tokens(input_ids)

    def final_norm(self):
        return self.model.model.norm

    def lm_head(self):
        return self.model.lm_head

    def num_kv_heads(self) -> int:
        return self.config.num_key_value_heads

    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads

    def attention_window(self) -> int | None:
        return getattr(self.config, "sliding_window", None) if self.config.model_type == "mistral" else None

    def position_tensors(self, position_ids, dtype):
        probe = torch.zeros((), dtype=dtype)  # rotary_emb reads only the dtype of its first argument
        return self.model.model.rotary_emb(probe, position_ids)

    def run_layer(self, layer, hidden, attention_bias, features, cache, **attention):
        return layer_output(
            layer(
                hidden_states=hidden,
                attention_mask=attention_bias,
                position_embeddings=features,
                past_key_values=cache,
                use_cache=True,
                **attention,
            )
        )
