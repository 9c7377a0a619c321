"""Training of the trained presets: a causal LM learns the grammar corpus byte by byte, seeded and reproducible.

Random weights make perplexity meaningless, so the presets that analyses measure are trained here, on the CPU,
in minutes: AdamW with a linear warmup and a cosine decay, on random windows of the corpus. Held-out
perplexity is measured on text from another seed of the same grammar.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from seam.export.corpus import generate_corpus

# Part of every trained preset's hash: bump it whenever the grammar or the training loop changes.
VERSION = "grammar-v1"
HELD_OUT_SENTENCES = 1000
_WARMUP_FRACTION = 0.05
_FINAL_LR_FRACTION = 0.1


@dataclass(frozen=True)
class TrainingSpec:
    steps: int
    sequence: int = 128
    batch: int = 32
    learning_rate: float = 3e-3
    corpus_sentences: int = 20000
    corpus_seed: int = 0

    @property
    def held_out_seed(self) -> int:
        """The seed of the held-out text: any seed but the training one gives text the model never saw."""
        return self.corpus_seed + 1


def lr_factor(step: int, steps: int) -> float:
    """The learning rate's multiplier at ``step``: a linear warmup, then a cosine decay to a tenth."""
    warmup = max(1, round(steps * _WARMUP_FRACTION))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return _FINAL_LR_FRACTION + (1 - _FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))


def encode_corpus(tokenizer, sentences: int, seed: int):
    """The corpus as a 1-D tensor of token ids; ``tokenizer`` is a ``tokenizers.Tokenizer`` adding no specials."""
    import torch

    return torch.tensor(tokenizer.encode(generate_corpus(sentences, seed)).ids, dtype=torch.long)


def _windows(ids, sequence: int, batch: int, generator):
    import torch

    starts = torch.randint(0, len(ids) - sequence, (batch, 1), generator=generator)
    return ids[starts + torch.arange(sequence)]


def _optimizer(model, learning_rate: float):
    """AdamW that decays matrices only: decaying norms' gains and biases just fights the loss."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95))


def train_model(config, spec: TrainingSpec, seed: int, tokenizer, name: str = "train"):
    """A causal LM built from ``config`` with weights seeded by ``seed``, trained by ``spec``, in eval mode."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    ids = encode_corpus(tokenizer, spec.corpus_sentences, spec.corpus_seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = _optimizer(model, spec.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, spec.steps))
    model.train()
    with tqdm(range(spec.steps), desc=name, unit="step", disable=None, leave=False) as bar:
        for _ in bar:
            window = _windows(ids, spec.sequence, spec.batch, generator)
            loss = model(input_ids=window, labels=window).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model.eval()


def mean_loss(model, ids, sequence: int, batch: int = 16) -> float:
    """Mean next-token cross-entropy (nats) over ``ids`` cut into non-overlapping windows of ``sequence``."""
    import torch

    windows = ids[: len(ids) // sequence * sequence].reshape(-1, sequence)
    total = 0.0
    with torch.no_grad():
        for chunk in windows.split(batch):
            total += model(input_ids=chunk, labels=chunk).loss.item() * chunk.shape[0]
    return total / windows.shape[0]


def held_out_perplexity(model, spec: TrainingSpec, tokenizer) -> float:
    """Per-token (per-byte) perplexity on text the model never saw, from another seed of the grammar."""
    ids = encode_corpus(tokenizer, HELD_OUT_SENTENCES, spec.held_out_seed)
    return math.exp(mean_loss(model, ids, spec.sequence))
