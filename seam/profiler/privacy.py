"""``seam analyze DIR --privacy``: what an honest-but-curious edge can learn of the input from the hidden states it
receives at the cut, as the share of input tokens two inversion attacks recover, per cut and per codec or
impairment.

The edge gets the hidden states at the cut for every position of the prompt and of the generation. The model runs
windows of a public text through the runtime's own onnxruntime blocks (the ones a split generation runs), keeping
the hidden states at every cut, and each cut's hidden states pass through each variant's round trip (a codec, or
an impairment such as erasure or Gaussian noise), as the edge would receive them. Two attacks then guess the token
at each position:

- **nearest-neighbour**: the vocabulary token whose input embedding (read from block 0's ONNX initializers, so any
  exported artifact works without torch) is nearest in cosine similarity to the hidden state. It needs no training
  and succeeds where the residual stream still carries the token's own embedding, that is at early cuts.
- **linear-probe**: a ridge-regression classifier from the hidden state to the token, trained on hidden states
  of one part of the text and tested on a held-out part (``LinearProbe``).

Both are scored on the held-out tokens, so the two shares count the same positions. The default text is the
Python standard library's pydoc help topics: real English that every machine with Python has offline.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from seam.profiler.quality import Variant, read_text, variants, windows
from seam.runtime.artifact import Artifact
from seam.runtime.errors import SeamError
from seam.runtime.executor import SessionPool
from seam.runtime.files import write_atomically
from seam.runtime.shell import bar_disabled, require_extra
from seam.runtime.spans import Span

NEAREST, PROBE = "nearest-neighbour", "linear-probe"
ATTACKS = (NEAREST, PROBE)
NONE = "none"  # the hidden states as the UE computed them
DEFAULT_TRAIN_TOKENS, DEFAULT_TEST_TOKENS = 4096, 1024
VOCAB_CHUNK = 4096  # embedding rows scored at once: bounds the score matrix at rows x 4096
RIDGE = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # penalties tried, times the training rows (features are standardised)
VALIDATION_SHARE = 0.2  # of the training rows, held out to pick the penalty


def default_text() -> tuple[str, str]:
    """The pydoc help topics, joined in name order, and a description that says which Python's they are."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name] for name in sorted(topics))
    return text, f"pydoc help topics of Python {platform.python_version()} (pydoc_data.topics)"


def embedding_table(artifact: Artifact) -> np.ndarray:
    """The input embedding [vocab, hidden] float32: the largest 2-D initializer of block 0 whose rows are
    ``hidden`` wide and at least as many as the vocabulary, read with onnx alone."""
    import onnx
    from onnx import numpy_helper

    manifest = artifact.manifest
    block = manifest.blocks[0]
    path = artifact.path(block.variants[manifest.dtype])
    graph = onnx.load(str(path), load_external_data=False).graph
    hidden, vocab = manifest.dims.hidden_size, manifest.dims.vocab_size
    tables = [tensor for tensor in graph.initializer
              if len(tensor.dims) == 2 and tensor.dims[1] == hidden and tensor.dims[0] >= vocab]
    if not tables:
        raise SeamError(f"{path} holds no [vocab, hidden] = [{vocab}, {hidden}] initializer to read the input "
                        "embedding from; re-export the artifact with 'seam export ... --force'")
    largest = max(tables, key=lambda tensor: tensor.dims[0])
    return numpy_helper.to_array(largest, base_dir=str(path.parent)).astype(np.float32)


def unit_rows(table: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(table, axis=1, keepdims=True)
    return table / np.maximum(norms, np.finfo(np.float32).tiny)  # an all-zero row (an unused id) stays zero


def nearest_tokens(rows: np.ndarray, unit_table: np.ndarray, chunk: int = VOCAB_CHUNK) -> np.ndarray:
    """For each row [N, H], the index of the ``unit_table`` row of highest cosine similarity, scoring ``chunk``
    vocabulary rows at a time; a row's own norm does not change its argmax, so rows are not normalised."""
    best = np.full(len(rows), -np.inf, dtype=np.float32)
    found = np.zeros(len(rows), dtype=np.int64)
    for start in range(0, len(unit_table), chunk):
        scores = rows @ unit_table[start:start + chunk].T
        top = scores.argmax(axis=1)
        value = scores[np.arange(len(rows)), top]
        better = value > best
        best[better], found[better] = value[better], top[better] + start
    return found


@dataclass
class LinearProbe:
    """A ridge-regression classifier: standardised hidden states, least squares onto one-hot tokens, argmax.

    Chosen over a softmax classifier trained by gradient descent because it has a closed form: no learning rate,
    epochs or initialisation to tune or seed, so the same text always gives the same figure, and it fits in a few
    hundred milliseconds per cut on two cores. The classes are the tokens seen in training, which bounds the
    weights at hidden x seen; a held-out token never seen in training counts as not recovered (the probe cannot
    name it), which is what an attacker with that much public text could do. The penalty is picked among
    ``RIDGE`` on a validation share of the training rows, from one eigendecomposition of the Gram matrix.
    """

    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray  # [H, classes]
    bias: np.ndarray  # [classes]
    classes: np.ndarray  # token id of each column

    @classmethod
    def fit(cls, hidden: np.ndarray, tokens: np.ndarray) -> LinearProbe:
        classes, labels = np.unique(tokens, return_inverse=True)
        mean, scale = hidden.mean(axis=0), hidden.std(axis=0)
        scale = np.where(scale > 0, scale, 1.0)
        features = ((hidden - mean) / scale).astype(np.float64)
        held = np.arange(len(tokens)) % round(1 / VALIDATION_SHARE) == 0  # spread over the text, deterministic
        penalty = _best_penalty(features[~held], labels[~held], features[held], labels[held], len(classes))
        weights, bias = _ridge(features, labels, len(classes), [penalty])[0]
        return cls(mean, scale, weights.astype(np.float32), bias.astype(np.float32), classes)

    def predict(self, hidden: np.ndarray) -> np.ndarray:
        scores = ((hidden - self.mean) / self.scale).astype(np.float32) @ self.weights + self.bias
        return self.classes[scores.argmax(axis=1)]


def _ridge(features: np.ndarray, labels: np.ndarray, classes: int,
           penalties: Sequence[float]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Weights and bias of ridge regression onto one-hot ``labels`` for each penalty (times the rows)."""
    centre = features.mean(axis=0)
    centred = features - centre
    onehot = np.zeros((len(labels), classes))
    onehot[np.arange(len(labels)), labels] = 1.0
    prior = onehot.mean(axis=0)
    eigenvalues, basis = np.linalg.eigh(centred.T @ centred)
    projected = basis.T @ (centred.T @ (onehot - prior))
    found = []
    for penalty in penalties:
        weights = basis @ (projected / (eigenvalues + penalty * len(labels))[:, None])
        found.append((weights, prior - centre @ weights))
    return found


def _best_penalty(train: np.ndarray, train_labels: np.ndarray, valid: np.ndarray, valid_labels: np.ndarray,
                  classes: int) -> float:
    """The penalty of ``RIDGE`` whose fit on ``train`` labels most of ``valid`` right (the smallest on a tie)."""
    accuracies = [float(np.mean((valid @ weights + bias).argmax(axis=1) == valid_labels))
                  for weights, bias in _ridge(train, train_labels, classes, RIDGE)]
    return RIDGE[int(np.argmax(accuracies))]
