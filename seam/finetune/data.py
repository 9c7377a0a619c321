"""Training data for split fine-tuning: a UTF-8 text file, one sample per non-empty line (or a JSON Lines file of
``{"text": ...}`` objects), tokenized with the artifact's tokenizer and cut into right-padded batches.

Everything here runs before the UE contacts the edge, so a missing, empty or undecodable file costs no traffic.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seam.finetune.parts import IGNORE_INDEX
from seam.runtime.errors import SeamError


@dataclass(frozen=True)
class Batch:
    input_ids: np.ndarray  # [B, S] int64, right-padded
    attention_mask: np.ndarray  # [B, S] int64
    labels: np.ndarray  # [B, S] int64, IGNORE_INDEX on padding


def read_samples(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SeamError(f"--data {path} does not exist; give a UTF-8 text file, one training sample per line") from None
    except UnicodeDecodeError as error:
        raise SeamError(f"--data {path} is not UTF-8 text ({error.reason} at byte {error.start}); convert it") from None
    except OSError as error:
        raise SeamError(f"cannot read --data {path}: {error.strerror or error}") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        try:
            lines = [json.loads(line)["text"] for line in lines]
        except (ValueError, KeyError, TypeError):
            raise SeamError(f"--data {path}: every line of a .jsonl file must be an object with a \"text\" string") \
                from None
        if not all(isinstance(line, str) for line in lines):
            raise SeamError(f"--data {path}: every \"text\" must be a string")
        lines = [line for line in lines if line.strip()]
    if not lines:
        raise SeamError(f"--data {path} holds no sample; give at least one non-empty line")
    return lines


def tokenize(samples: list[str], tokenizer, max_length: int) -> list[list[int]]:
    """Token ids of each sample, at most ``max_length``; samples of fewer than two tokens teach nothing."""
    encoded = [tokenizer.encode(sample).ids[:max_length] for sample in samples]
    kept = [ids for ids in encoded if len(ids) >= 2]
    if not kept:
        raise SeamError("no sample encodes to two tokens or more; give longer lines")
    return kept


def batches(sequences: list[list[int]], batch_size: int, pad_id: int, seed: int) -> Iterator[Batch]:
    """Endless batches: each pass over the data in a fresh seeded order, the last partial batch dropped unless it
    is the only one."""
    if batch_size < 1:
        raise SeamError(f"the batch size must be at least 1, got {batch_size}")
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(sequences))
        stop = max(len(order) - len(order) % batch_size, min(batch_size, len(order)))
        for start in range(0, stop, batch_size):
            chosen = [sequences[i] for i in order[start:start + batch_size]]
            yield pad(chosen, pad_id)


def pad(chosen: list[list[int]], pad_id: int) -> Batch:
    length = max(len(ids) for ids in chosen)
    input_ids = np.full((len(chosen), length), pad_id, np.int64)
    mask = np.zeros((len(chosen), length), np.int64)
    for row, ids in enumerate(chosen):
        input_ids[row, : len(ids)] = ids
        mask[row, : len(ids)] = 1
    return Batch(input_ids, mask, np.where(mask == 1, input_ids, IGNORE_INDEX))
