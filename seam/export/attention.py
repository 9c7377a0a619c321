"""Attention over a KV cache that stays in one preallocated buffer: the ``shared-buffer`` KV layout.

In the ``concat`` layout a block takes each layer's past keys and values and returns them grown by the new
positions, so every step copies the whole cache (and the grouped-query heads are repeated, and the bias spans the
whole context). In this layout a block's attention is onnxruntime's ``GroupQueryAttention``: it takes a buffer
[B, kv_heads, capacity, head_dim] per layer as its past and returns the same buffer as its present, with the new
positions' keys and values written in place at ``total_sequence_length - S``. The runtime binds one
``OrtValue`` to both (``seam.runtime.kv_buffers``), so a step moves only its hidden states; the heads are shared
inside the operator and the bias covers the positions so far (``[B, 1, S, total]``).

The model's own attention modules run unchanged up to the attention itself (projections, norms, rotary
features): the cache's ``update`` returns the new keys and values as they are, and ``shared_buffer_attention``,
registered with transformers' attention interface, attends. In PyTorch it computes what the operator computes, so
the export's tracing run sees the true shapes; in the graph it is the operator.
"""

from __future__ import annotations

import math

import torch
from transformers import AttentionInterface

IMPLEMENTATION = "seam_shared_buffer"


class SharedBufferCache:
    """The past of a block's layers as buffers, for ``shared_buffer_attention``; ``present`` collects each
    layer's buffer as the graph returns it."""

    def __init__(self, past: dict[int, tuple[torch.Tensor, torch.Tensor]], seqlens_k: torch.Tensor,
                 total_sequence_length: torch.Tensor):
        self.past = past
        self.seqlens_k = seqlens_k  # [B] int32: positions so far minus one, the operator's convention
        self.total_sequence_length = total_sequence_length  # [] int32
        self.present: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key, value, layer_idx, cache_kwargs=None):
        return key, value  # the new positions only: the attention writes them into the buffer

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


class GroupQueryAttention(torch.autograd.Function):
    """onnxruntime's ``com.microsoft::GroupQueryAttention`` with the past and present buffers shared."""

    @staticmethod
    def forward(ctx, query, key, value, past_key, past_value, seqlens_k, total, bias, num_heads: int,
                kv_num_heads: int, scale: float):
        batch, new, _ = query.shape
        head_dim = past_key.shape[-1]
        start = int(total) - new
        present_key, present_value = past_key.clone(), past_value.clone()
        present_key[:, :, start:start + new] = key.view(batch, new, kv_num_heads, head_dim).transpose(1, 2)
        present_value[:, :, start:start + new] = value.view(batch, new, kv_num_heads, head_dim).transpose(1, 2)
        keys = present_key[:, :, : int(total)].repeat_interleave(num_heads // kv_num_heads, dim=1)
        values = present_value[:, :, : int(total)].repeat_interleave(num_heads // kv_num_heads, dim=1)
        queries = query.view(batch, new, num_heads, head_dim).transpose(1, 2)
        scores = queries @ keys.transpose(2, 3) * scale + bias
        causal = torch.arange(int(total))[None, :] <= torch.arange(start, start + new)[:, None]
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
        output = torch.softmax(scores.float(), dim=-1).to(query.dtype) @ values
        return output.transpose(1, 2).reshape(batch, new, num_heads * head_dim), present_key, present_value

    @staticmethod
    def symbolic(g, query, key, value, past_key, past_value, seqlens_k, total, bias, num_heads, kv_num_heads, scale):
        absent = g.op("prim::Constant").setType(torch._C.OptionalType.ofTensor())
        outputs = g.op("com.microsoft::GroupQueryAttention", query, key, value, past_key, past_value, seqlens_k,
                       total, absent, absent, absent, bias, num_heads_i=num_heads, kv_num_heads_i=kv_num_heads,
                       scale_f=scale, outputs=3)
        for output, like in zip(outputs, (query, past_key, past_value)):  # the exporter cannot infer them
            output.setType(like.type())
        return outputs


def shared_buffer_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            seam_cache: SharedBufferCache | None = None, **kwargs):
    """The attention interface transformers calls: query [B, H, S, D], key and value [B, kv_heads, S, D] of the
    new positions, ``attention_mask`` the prelude's bias [B, 1, S, total]. Returns [B, S, H, D] as eager does."""
    batch, _, new, _ = query.shape
    # The operator's attributes: plain ints from the module, not sizes the tracer records.
    heads, kv_heads, head_dim = module.config.num_attention_heads, module.config.num_key_value_heads, module.head_dim
    past_key, past_value = seam_cache.past[module.layer_idx]
    output, present_key, present_value = GroupQueryAttention.apply(
        query.transpose(1, 2).reshape(batch, new, heads * head_dim),
        key.transpose(1, 2).reshape(batch, new, kv_heads * head_dim),
        value.transpose(1, 2).reshape(batch, new, kv_heads * head_dim),
        past_key, past_value, seam_cache.seqlens_k, seam_cache.total_sequence_length, attention_mask,
        heads, kv_heads, float(scaling if scaling is not None else 1 / math.sqrt(head_dim)),
    )
    seam_cache.present[module.layer_idx] = (present_key, present_value)
    return output.view(batch, new, heads, head_dim), None


AttentionInterface.register(IMPLEMENTATION, shared_buffer_attention)
