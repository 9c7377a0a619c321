"""Export-time wrappers: the prelude graph and a block of consecutive decoder layers with plain-tensor KV.

A block takes explicit tensors (ids or hidden states, the attention bias and position features built by the
prelude, and its layers' past keys/values) and returns its output plus the present keys/values, named as
optimum does (``past_key_values.N.key`` in, ``present.N.key`` out, N the global layer index).
"""

from __future__ import annotations

import torch
from torch import nn

from seam.export.attention import IMPLEMENTATION, SharedBufferCache
from seam.export.families.base import FamilyAdapter
from seam.runtime.artifact import FINAL_HIDDEN
from seam.runtime.executor import past_names, present_names
from seam.runtime.spans import Span


# What the prelude adds for each KV layout, and every block takes after the position features.
KV_LENGTHS = {"shared-buffer": ("seqlens_k", "total_sequence_length")}


class PlainCache:
    """Duck-typed stand-in for a transformers Cache: concatenates each layer's past with its new keys/values."""

    def __init__(self, past: dict[int, tuple[torch.Tensor, torch.Tensor]]):
        self.past = past
        self.present: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key, value, layer_idx, cache_kwargs=None):
        past_key, past_value = self.past[layer_idx]
        key = torch.cat([past_key, key], dim=-2)  # [B, kv_heads, past + S, head_dim]
        value = torch.cat([past_value, value], dim=-2)
        self.present[layer_idx] = (key, value)
        return key, value


class Prelude(nn.Module):
    """attention_mask [B, T], position_ids [B, S] -> attention_bias [B, 1, S, T] and position features; in the
    shared-buffer KV layout also the positions so far as ``GroupQueryAttention`` takes them."""

    def __init__(self, family: FamilyAdapter, dtype: torch.dtype, kv_layout: str = "concat"):
        super().__init__()
        self.family = family
        self.dtype = dtype
        self.window = family.attention_window()
        self.kv_layout = kv_layout
        self.input_names = ["attention_mask", "position_ids"]
        self.output_names = ["attention_bias", *family.position_features, *KV_LENGTHS.get(kv_layout, ())]

    def forward(self, attention_mask: torch.Tensor, position_ids: torch.Tensor):
        total = attention_mask.shape[1]
        queries = position_ids.shape[1]
        key_index = torch.arange(total, device=attention_mask.device)  # [T]
        if self.kv_layout == "shared-buffer":
            # Each row ends at its last unmasked position: a batch of one session's sequences is left-padded
            # and ends at T, while sessions batched as rows of one arena are left-aligned, each of its own length.
            ends = total - torch.argmax(torch.flip(attention_mask, (1,)), dim=1)  # [B]
        else:
            ends = torch.full((attention_mask.shape[0],), total, device=attention_mask.device)
        query_index = torch.arange(queries, device=attention_mask.device)[None, :] + (ends[:, None] - queries)  # [B, S]
        allowed = key_index[None, None, :] <= query_index[:, :, None]  # [B, S, T], causal by cache index
        if self.window is not None:
            allowed = allowed & (key_index[None, None, :] > query_index[:, :, None] - self.window)
        allowed = allowed[:, None, :, :] & attention_mask[:, None, None, :].bool()  # [B, 1, S, T]
        # The dtype's minimum rather than -inf keeps fully padded query rows finite.
        zero = torch.zeros((), dtype=self.dtype)
        blocked = torch.full((), torch.finfo(self.dtype).min, dtype=self.dtype)
        bias = torch.where(allowed, zero, blocked)
        lengths = ()
        if self.kv_layout == "shared-buffer":  # the operator's convention: positions in the cache, minus one
            lengths = ((ends - 1).to(torch.int32), torch.tensor(total, dtype=torch.int32))
        return (bias, *self.family.position_tensors(position_ids, self.dtype), *lengths)


class Segment(nn.Module):
    """Layers ``span`` of the model; the first segment embeds tokens and the last applies norm and LM head."""

    def __init__(self, family: FamilyAdapter, span: Span, is_first: bool, is_last: bool, kv_layout: str = "concat"):
        super().__init__()
        self.family = family
        self.kv_layout = kv_layout
        self.model = family.model  # registered so tracing sees weights as parameters; unused ones are pruned
        self.span = span
        self.is_first = is_first
        self.is_last = is_last
        self.head = Head(family) if is_last else None
        self.layers = [family.layers()[index] for index in span]  # already registered through self.model
        self.past_input_names = [name for layer in span for name in past_names(layer)]
        self.input_names = [
            "input_ids" if is_first else "hidden_states",
            *(["position_ids"] if is_first else []),
            "attention_bias",
            *family.position_features,
            *KV_LENGTHS.get(kv_layout, ()),
            *self.past_input_names,
            *(["logits_to_keep"] if is_last else []),
        ]
        self.output_names = [
            "logits" if is_last else "hidden_out",
            *[name for layer in span for name in present_names(layer)],
            # The last layer's hidden states before the final norm, which an edge returns instead of the logits
            # when the UE keeps the head (private output); the edge runs the graph without the head then.
            *([FINAL_HIDDEN] if is_last else []),
        ]

    def forward(self, *flat: torch.Tensor):
        named = dict(zip(self.input_names, flat))
        features = tuple(named[name] for name in self.family.position_features)
        past = {
            layer: (named[key], named[value])
            for layer, (key, value) in zip(self.span, zip(*[iter(self.past_input_names)] * 2))
        }
        if self.kv_layout == "shared-buffer":
            cache = SharedBufferCache(past, named["seqlens_k"], named["total_sequence_length"])
            attention = {"seam_cache": cache}
        else:
            cache, attention = PlainCache(past), {}
        if self.is_first:
            hidden = self.family.embed(named["input_ids"], named["position_ids"])  # [B, S, H]
        else:
            hidden = named["hidden_states"]
        config = self.family.model.config
        implementation = config._attn_implementation
        if attention:  # the model's own attention modules call the attention interface by this name
            config._attn_implementation = IMPLEMENTATION
        try:
            for layer in self.layers:
                hidden = self.family.run_layer(layer, hidden, named["attention_bias"], features, cache, **attention)
        finally:
            config._attn_implementation = implementation
        presents = [tensor for layer in self.span for tensor in cache.present[layer]]
        if self.is_last:
            kept = hidden[:, hidden.shape[1] - named["logits_to_keep"]:, :]  # [B, K, H]
            return (self.head(kept), *presents, kept)
        return (hidden, *presents)


class Head(nn.Module):
    """The final norm and the LM head: ``final_hidden`` [B, K, H] -> logits [B, K, V] in fp32. The last block
    ends with it, and the export writes it alone as well, for the UE to run when the edge returns the last
    layer's hidden states instead of a token (private output)."""

    input_names = [FINAL_HIDDEN]
    output_names = ["logits"]

    def __init__(self, family: FamilyAdapter):
        super().__init__()
        self.family = family
        self.model = family.model  # registered so tracing sees the weights; unused ones are pruned

    def forward(self, final_hidden: torch.Tensor) -> torch.Tensor:
        return self.family.lm_head()(self.family.final_norm()(final_hidden)).float()
