"""Token-level generation over a chain of span runners: left-padded batches, positions, and the decode loop.

Used in-process by the export's validation and the local demo; the networked runtime drives the same runners.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

from seam.runtime.executor import SessionPool
from seam.runtime.spans import Span


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [B, S] and attention mask [B, S], shorter prompts padded on the left."""
    width = max(len(prompt) for prompt in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            ids[row, width - len(prompt):] = prompt
            mask[row, width - len(prompt):] = 1
    return ids, mask


def positions_from_mask(mask: np.ndarray) -> np.ndarray:
    """Position ids [B, S] that count only real tokens; padding gets position 0."""
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0)


class LocalSplit:
    """The UE's span and the edge's span chained in one process, hidden states handed over directly."""

    def __init__(self, pool: SessionPool, split: int, ue_variant: str | None = None):
        self.ue = pool.runner(Span(0, split), ue_variant)
        self.edge = pool.runner(Span(split, pool.artifact.num_layers))

    def reset(self, batch: int) -> None:
        self.ue.reset(batch)
        self.edge.reset(batch)

    def __call__(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Logits of the last position [B, V]."""
        boundary = self.ue.run(ids, mask, positions)
        return self.edge.run(boundary, mask, positions)[:, -1, :]


def greedy(logits: np.ndarray, step: int) -> np.ndarray:
    return logits.argmax(axis=-1)


def generate(
    model: LocalSplit,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    pad_id: int,
    choose: Callable[[np.ndarray, int], np.ndarray] = greedy,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields (tokens [B], logits [B, V]) per step; ``choose(logits, step)`` picks the next tokens."""
    ids, mask = left_pad(prompts, pad_id)
    positions = positions_from_mask(mask)
    model.reset(len(prompts))
    logits = model(ids, mask, positions)
    for step in range(max_new_tokens):
        tokens = np.asarray(choose(logits, step), dtype=np.int64)
        yield tokens, logits
        if step + 1 == max_new_tokens:
            return
        mask = np.concatenate([mask, np.ones((len(prompts), 1), dtype=np.int64)], axis=1)
        positions = positions[:, -1:] + 1
        logits = model(tokens[:, None], mask, positions)
