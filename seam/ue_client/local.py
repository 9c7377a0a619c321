"""Generation with every layer on this device, for when the edge cannot be reached and the user allowed it
(``--fallback-local``): the same blocks and sampler as a split generation, no network."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from seam.runtime.executor import SessionPool
from seam.runtime.generation import LocalSplit, generate
from seam.runtime.sampling import Sampler, SamplingParams


def local_tokens(pool: SessionPool, variant: str, prompt_ids: Sequence[int], max_new_tokens: int,
                 sampling: SamplingParams) -> Iterator[np.ndarray]:
    """Yields the next token [1] of ``prompt_ids`` step by step, every layer run from ``pool``'s blocks."""
    artifact = pool.artifact
    local = LocalSplit(pool, artifact.num_layers, variant)
    sampler = Sampler(sampling)
    pad = artifact.manifest.tokenizer["pad_token_id"]
    for tokens, _ in generate(local, [list(prompt_ids)], max_new_tokens, pad, lambda logits, _: sampler(logits)):
        yield tokens
