"""The GPT-2 family: learned absolute positions added in the embedding, no rotary features."""

from __future__ import annotations

from seam.export.families.base import FamilyAdapter, layer_output, register_family
from seam.runtime.errors import SeamError


@register_family
class GPT2Family(FamilyAdapter):
    name = "gpt2"
    model_types = ("gpt2",)
    transformers_versions = ">=5.0,<6"
    lora_targets = ("c_attn", "attn.c_proj")  # attention only: mlp.c_proj shares the name

    def check_config(self) -> None:
        if getattr(self.config, "add_cross_attention", False):
            raise SeamError("GPT-2 with cross-attention is an encoder-decoder part, not a decoder LLM")

    def layers(self):
        return self.model.transformer.h

    def embed(self, input_ids, position_ids):
        transformer = self.model.transformer
        return transformer.wte(input_ids) + transformer.wpe(position_ids)

    def final_norm(self):
        return self.model.transformer.ln_f

    def lm_head(self):
        return self.model.lm_head

    def num_kv_heads(self) -> int:
        return self.config.n_head

    def head_dim(self) -> int:
        return self.config.n_embd // self.config.n_head

    def run_layer(self, layer, hidden, attention_bias, features, cache, **attention):
        return layer_output(
            layer(hidden_states=hidden, past_key_values=cache, attention_mask=attention_bias, use_cache=True)
        )
