"""What a span's step holds in memory beyond the caches it starts from: the edge reserves it before admitting a
session, so that the sessions it admits can always run.

Pure arithmetic over the artifact's dimensions. onnxruntime writes each layer's grown cache beside the one it
read, a batched step first copies its sessions' caches into one left-padded array, and attention materialises
its scores for every head; these dominate, and they are what ``bench/prefill_memory.py`` checks against the
edge's measured peak.
"""

from __future__ import annotations

from seam.runtime.artifact import Dimensions

FLOAT_BYTES = 4  # attention scores and the bias are float32 whatever the cache's dtype
# Per head and scored position, float32 tensors alive at once: the scores, the masked scores and the probabilities
# (small-llama's measured peak fits 2.5 of them).
ATTENTION_COPIES = 3
# Per position, in hidden sizes: the MLP's gate, up and product at about 4x hidden, and the residual stream.
MLP_WIDTHS = 16


def step_working_bytes(dims: Dimensions, kv_bytes_per_token_per_layer: int, dtype_bytes: int, layers: int, rows: int,
                       new: int, past: int, stacked: bool = False) -> int:
    """Bytes a step of ``rows`` sequences holds while it runs ``layers`` layers over ``new`` positions each after
    ``past``, beyond the caches it starts from; ``stacked`` for a batched step that copies its caches first."""
    per_layer_cache = rows * kv_bytes_per_token_per_layer
    grown = per_layer_cache * (past + new) * layers
    copied = per_layer_cache * past * layers if stacked else 0
    # One layer's transients at a time: every block draws from the process's one arena (runtime.ort_options).
    scores = ATTENTION_COPIES * rows * dims.num_attention_heads * new * (past + new) * FLOAT_BYTES
    expanded = 2 * rows * dims.num_attention_heads * (past + new) * dims.head_dim * dtype_bytes  # KV heads repeated
    mlp = rows * new * dims.hidden_size * MLP_WIDTHS * dtype_bytes
    return grown + copied + scores + expanded + mlp


# Per token and layer, in hidden sizes: what autograd keeps for the backward of a decoder layer (its inputs, the
# attention projections and output, the MLP's gate, up and product at about 4x hidden, and the norms).
TRAINING_WIDTHS = 24


def training_step_bytes(dims: Dimensions, layers: int, batch: int, length: int, head: bool) -> int:
    """Bytes a split fine-tuning forward of ``batch`` sequences of ``length`` through ``layers`` float32 layers
    keeps for its backward; ``head`` when it also computes the logits and the loss."""
    tokens = batch * length
    per_layer = tokens * dims.hidden_size * TRAINING_WIDTHS + batch * dims.num_attention_heads * length * length
    logits = 3 * tokens * dims.vocab_size if head else 0  # the logits, their log-softmax and its gradient
    return FLOAT_BYTES * (layers * per_layer + logits)
