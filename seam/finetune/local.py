"""Centralised LoRA training of the whole model on one device (transformers' own forward and loss), with the same
adapters, initialisation and optimizer as split training: the baseline split training is measured against, step
for step and loss for loss."""

from __future__ import annotations

import torch

from seam.finetune.data import Batch
from seam.finetune.parts import attach_lora, load_base, trainable
from seam.runtime.spans import Span


class LocalTrainer:
    def __init__(self, artifact, rank: int = 8, alpha: float = 16.0, lr: float = 1e-3, weight_decay: float = 0.0,
                 seed: int = 0):
        base = load_base(artifact)
        layers = Span(0, len(base.family.layers()))
        self.model = attach_lora(base.model, base.family, layers, rank, alpha, seed)
        self.optimizer = torch.optim.AdamW(trainable(self.model), lr, weight_decay=weight_decay)

    def step(self, batch: Batch) -> float:
        ids, mask, labels = (torch.from_numpy(array) for array in (batch.input_ids, batch.attention_mask,
                                                                    batch.labels))
        loss = self.model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return float(loss.item())
