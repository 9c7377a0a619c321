"""A learned reward surrogate: predicts the quality term of a (cut, codec or impairment) choice from a few
features, trained on ``seam analyze`` results, so that a policy can be trained or a plan searched without
measuring perplexity at every step.

The target is the log perplexity ratio against the unsplit model (log of 1 + increase), which stays well scaled
from codecs that cost nothing to heavy erasure. Features: where the cut sits (fraction of the layers on the UE),
the bits a codec keeps per value, the erased share and the noise-to-signal power. A small MLP in torch, seeded,
full-batch Adam with early stopping on a validation share of the training cells.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CODEC_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8, "int4": 4}


def features(cut: int, num_layers: int, variant: str) -> list[float]:
    """[cut fraction, log2 bits kept / 5, erased share, noise-to-signal power] of one choice."""
    kind, _, value = variant.partition(":")
    bits = CODEC_BITS[value] if kind == "codec" else 32
    erased = float(value) if kind == "erasure" else 0.0
    noise = 10 ** (-float(value) / 10) if kind == "awgn" else 0.0
    return [cut / num_layers, math.log2(bits) / 5, erased, noise]


def samples(cells: Sequence[dict], num_layers: int) -> tuple[np.ndarray, np.ndarray]:
    """Features and targets (log perplexity ratio) of analysis cells."""
    x = np.array([features(cell["cut"], num_layers, cell["variant"]) for cell in cells], dtype=np.float32)
    y = np.array([math.log1p(cell["increase_pct"] / 100) for cell in cells], dtype=np.float32)
    return x, y


@dataclass
class Surrogate:
    model: object  # torch.nn.Module
    num_layers: int

    def predict_increase_pct(self, cut: int, variant: str) -> float:
        import torch

        with torch.no_grad():
            x = torch.tensor([features(cut, self.num_layers, variant)])
            return float(100 * math.expm1(self.model(x).item()))

    def codec_increase_pct(self, cut: int, codec: str) -> float:
        """The predicted increase of sending the hidden states at ``cut`` in ``codec``."""
        return self.predict_increase_pct(cut, f"codec:{codec}")


def fit(x: np.ndarray, y: np.ndarray, num_layers: int, seed: int = 0, hidden: int = 32, steps: int = 3000,
        validation: float = 0.2) -> Surrogate:
    import torch

    torch.manual_seed(seed)
    order = np.random.default_rng(seed).permutation(len(x))
    held = order[: max(1, int(validation * len(x)))]
    train = order[len(held):]
    model = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, hidden),
                                torch.nn.Tanh(), torch.nn.Linear(hidden, 1), torch.nn.Flatten(0))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    tx, ty, vx, vy = (torch.tensor(a) for a in (x[train], y[train], x[held], y[held]))
    best, best_state = math.inf, None
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(tx), ty)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            checked = torch.nn.functional.mse_loss(model(vx), vy).item()
        if checked < best:  # early stopping: the cells are few, and a net this size can learn them by heart
            best, best_state = checked, {name: value.clone() for name, value in model.state_dict().items()}
    model.load_state_dict(best_state)
    model.eval()
    return Surrogate(model, num_layers)


def held_out_error(cells: Sequence[dict], num_layers: int, share: float = 0.25, seed: int = 0) -> dict:
    """Fits on all but a random ``share`` of the cells and reports the error on those, in percentage points of
    perplexity increase, against the naive guess of the training cells' mean."""
    order = np.random.default_rng(seed + 1).permutation(len(cells))
    test = [cells[i] for i in order[: max(1, int(share * len(cells)))]]
    train = [cells[i] for i in order[len(test):]]
    surrogate = fit(*samples(train, num_layers), num_layers, seed)
    truth = np.array([cell["increase_pct"] for cell in test])
    predicted = np.array([surrogate.predict_increase_pct(cell["cut"], cell["variant"]) for cell in test])
    naive = np.full_like(truth, np.mean([cell["increase_pct"] for cell in train]))
    return {
        "train_cells": len(train),
        "test_cells": len(test),
        "mae_pct_points": float(np.mean(np.abs(predicted - truth))),
        "naive_mae_pct_points": float(np.mean(np.abs(naive - truth))),
        "max_error_pct_points": float(np.max(np.abs(predicted - truth))),
    }
