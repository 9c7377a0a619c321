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
  and succeeds only where the residual stream is still mostly the token's own embedding (on SmolLM2 the first
  layer already writes over it, so it recovers next to nothing at any cut).
- **linear-probe**: a linear map, fitted by ridge regression on hidden states of one part of the text, from the
  hidden state to the token's input embedding, decoded by nearest neighbour in the table (``LinearProbe``).

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
from seam.runtime.shell import bar_disabled
from seam.runtime.spans import Span

NEAREST, PROBE = "nearest-neighbour", "linear-probe"
ATTACKS = (NEAREST, PROBE)
NONE = "none"  # the hidden states as the UE computed them
SCORE_BLOCK = 4096  # rows and vocabulary entries scored at once: bounds the score matrix at 64 MB
PENALTY = 1e-2  # ridge penalty, times the training rows, on standardised hidden states


def default_text() -> tuple[str, str]:
    """The pydoc help topics, joined in name order, and a description that says which Python's they are."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name] for name in sorted(topics))
    return text, f"pydoc help topics of Python {platform.python_version()} (pydoc_data.topics)"


def embedding_table(artifact: Artifact) -> np.ndarray:
    """The input embedding [vocab, hidden] float32: of block 0's 2-D initializers ``hidden`` wide with a row per
    token at least, the one the token ids index (a block holding the whole model also has an untied LM head of
    that shape), else the largest; read with onnx alone."""
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
    indexed = {node.input[0] for node in graph.node if node.op_type == "Gather" and node.input[1:] == ["input_ids"]}
    chosen = max(tables, key=lambda tensor: (tensor.name in indexed, tensor.dims[0]))
    return numpy_helper.to_array(chosen, base_dir=str(path.parent)).astype(np.float32)


def unit_rows(table: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(table, axis=1, keepdims=True)
    return table / np.maximum(norms, np.finfo(np.float32).tiny)  # an all-zero row (an unused id) stays zero


def nearest_tokens(rows: np.ndarray, unit_table: np.ndarray, block: int = SCORE_BLOCK) -> np.ndarray:
    """For each row [N, H], the index of the ``unit_table`` row of highest cosine similarity, scoring ``block``
    rows against ``block`` vocabulary entries at a time; a row's own norm does not change its argmax, so rows are
    not normalised."""
    found = []
    for first in range(0, len(rows), block):
        part = np.ascontiguousarray(rows[first:first + block], dtype=np.float32)
        best = np.full(len(part), -np.inf, dtype=np.float32)
        index = np.zeros(len(part), dtype=np.int64)
        for start in range(0, len(unit_table), block):
            scores = part @ unit_table[start:start + block].T
            top = scores.argmax(axis=1)
            value = scores[np.arange(len(part)), top]
            better = value > best
            best[better], index[better] = value[better], top[better] + start
        found.append(index)
    return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)


@dataclass
class LinearProbe:
    """A linear map, fitted by ridge regression, from the standardised hidden state to the unit input embedding of
    the token at that position; the edge decodes its prediction by nearest neighbour in the embedding table.

    Chosen over a classifier onto the tokens (a softmax or a least-squares one): its outputs are the hidden size,
    not the vocabulary, so the fit is one H x H solve whatever the vocabulary, and the embedding's geometry lets
    it name a token it never saw in training, which a classifier cannot (on the real model and the default text,
    a quarter of the held-out tokens are not among the 4096 training ones). Closed form: no learning rate, epochs
    or initialisation to seed, so the same text gives the same figure. Standardising first puts the few massive
    channels of the middle layers on the scale of the rest, so one penalty (``PENALTY``) serves every cut; on the
    real model recovery moved by under a point between 1e-5 and 1e-2.
    """

    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray  # [H, H]
    bias: np.ndarray  # [H]

    @classmethod
    def fit(cls, hidden: np.ndarray, targets: np.ndarray, penalty: float = PENALTY) -> LinearProbe:
        """Fits hidden [N, H] onto ``targets`` [N, E], the unit embeddings of the tokens."""
        mean, scale = hidden.mean(axis=0), hidden.std(axis=0)
        scale = np.where(scale > 0, scale, 1.0)
        features = ((hidden - mean) / scale).astype(np.float64)  # centred, so the bias is the targets' mean
        centre = targets.mean(axis=0, dtype=np.float64)
        gram = features.T @ features + penalty * len(features) * np.eye(features.shape[1])
        weights = np.linalg.solve(gram, features.T @ (targets - centre))
        return cls(mean, scale, weights.astype(np.float32), centre.astype(np.float32))

    def predict(self, hidden: np.ndarray) -> np.ndarray:
        """The embedding each row of hidden [N, H] is predicted to carry, [N, E]."""
        return ((hidden - self.mean) / self.scale).astype(np.float32) @ self.weights + self.bias


@dataclass(frozen=True)
class CutStates:
    """The hidden states at each cut for every position of a text, and the windows they came in: a variant codes
    each window as one message, as a prompt crosses the link in one."""

    tokens: np.ndarray  # [N] the token at each position
    hidden: dict[int, np.ndarray]  # cut -> [N, H] float32
    lengths: tuple[int, ...]  # positions per window, in order


def cut_states(pool: SessionPool, ids: np.ndarray, cuts: Sequence[int], window: int, stride: int,
               progress: Callable[[int], None] = lambda done: None) -> CutStates:
    """Runs the whole model over windows of ``ids`` (``quality.windows``: every position once, each with at least
    ``window - stride`` positions of context but the first) and keeps the hidden states at ``cuts``."""
    whole = pool.runner(Span(0, pool.artifact.num_layers), keep_boundaries=True)
    parts: dict[int, list[np.ndarray]] = {cut: [] for cut in cuts}
    lengths = []
    for begin, end, scored_from in windows(len(ids), window, stride):
        first = 0 if begin == 0 else scored_from - begin  # the text's first position is received too
        length = end - begin
        whole.reset(1)
        whole.run(ids[None, begin:end], np.ones((1, length), dtype=np.int64),
                  np.arange(length, dtype=np.int64)[None, :], logits_to_keep=1)
        for cut in cuts:
            parts[cut].append(whole.boundary(cut)[0, first:].astype(np.float32))
        lengths.append(length - first)
        progress(length - first)
    hidden = {cut: np.concatenate(chunks) for cut, chunks in parts.items()}
    return CutStates(np.asarray(ids, dtype=np.int64), hidden, tuple(lengths))


Transform = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def crossings(chosen: Sequence[Variant]) -> list[tuple[str, Transform]]:
    """``none`` (the hidden states as computed) and each variant's round trip, by label."""
    return [(NONE, lambda hidden, rng: hidden), *((variant.label, variant.transform()) for variant in chosen)]


def received(states: CutStates, cut: int, transform: Transform, rng: np.random.Generator) -> np.ndarray:
    """What the edge receives of ``cut``'s hidden states through ``transform``, one window at a time."""
    pieces = np.split(states.hidden[cut], np.cumsum(states.lengths)[:-1])
    return np.concatenate([transform(piece[None], rng)[0].astype(np.float32, copy=False) for piece in pieces])


def attack_cut(train: CutStates, test: CutStates, cut: int, chosen: Sequence[tuple[str, Transform]],
               unit_table: np.ndarray, rng: np.random.Generator) -> list[dict]:
    """Both attacks on ``cut``'s held-out hidden states through each crossing; the probe is trained on the same
    crossing of the training part (the edge knows the codec it receives)."""
    targets = unit_table[train.tokens]
    rows = []
    for _, transform in chosen:
        heard = received(test, cut, transform, rng)
        probe = LinearProbe.fit(received(train, cut, transform, rng), targets)
        rows += [heard, probe.predict(heard)]
    # Every guess of every crossing in one pass over the table: the vocabulary, not the rows, is what costs.
    guesses = np.split(nearest_tokens(np.concatenate(rows), unit_table), len(rows))
    return [_cell(cut, label, attack, guess, test.tokens)
            for (label, _), pair in zip(chosen, zip(guesses[::2], guesses[1::2]))
            for attack, guess in zip(ATTACKS, pair)]


def _cell(cut: int, label: str, attack: str, guesses: np.ndarray, tokens: np.ndarray) -> dict:
    return {"cut": cut, "variant": label, "attack": attack, "recovered": round(float(np.mean(guesses == tokens)), 6),
            "tokens": len(tokens)}


@dataclass
class PrivacyReport:
    artifact_fingerprint: str
    text: str
    tokens: dict[str, int]  # train, test
    cells: list[dict] = field(default_factory=list)  # cut, variant, attack, recovered, tokens

    def to_dict(self) -> dict:
        return {"kind": "privacy", "artifact_fingerprint": self.artifact_fingerprint, "text": self.text,
                "tokens": dict(self.tokens), "cells": list(self.cells)}

    def table(self) -> tuple[list[str], list[list[str]], list[tuple[str, int]]]:
        """Headers, rows and column groups: per cut, each variant's share recovered by each attack, in %."""
        labels = list(dict.fromkeys(cell["variant"] for cell in self.cells))
        cuts = sorted({cell["cut"] for cell in self.cells})
        share = {(cell["cut"], cell["variant"], cell["attack"]): cell["recovered"] for cell in self.cells}
        headers = ["cut", *(name for _ in labels for name in ("NN", "probe"))]
        rows = [[str(cut), *(f"{100 * share[cut, label, attack]:.1f}" for label in labels for attack in ATTACKS)]
                for cut in cuts]
        return headers, rows, [("", 1), *((label, 2) for label in labels)]


def split_text(ids: np.ndarray, train: int, test: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``train`` tokens to train on and the ``test`` after them to attack; a shorter text is shared
    between the two in the same proportion."""
    if len(ids) < train + test:
        test = max(2, len(ids) * test // (train + test))
        train = len(ids) - test
    if train < 2 or test < 2:
        raise SeamError(f"the text encodes to {len(ids)} tokens, too few to train and test a probe on; "
                        "give a text of at least a few hundred tokens")
    return ids[:train], ids[train:train + test]


def analyze_privacy(artifact: Artifact, train_ids: np.ndarray, test_ids: np.ndarray, cuts: Sequence[int],
                    chosen: Sequence[Variant], window: int = 128, stride: int = 64, seed: int = 0,
                    text: str = "", pool: SessionPool | None = None, progress: Callable[[int], None] = lambda d: None,
                    ) -> PrivacyReport:
    """Both attacks at every cut of ``cuts`` through ``none`` and each of ``chosen``, trained on ``train_ids``
    and scored on ``test_ids``; ``progress`` is told of every position run and of every cut attacked."""
    pool = pool or SessionPool(artifact)
    train = cut_states(pool, np.asarray(train_ids), cuts, window, stride, progress)
    test = cut_states(pool, np.asarray(test_ids), cuts, window, stride, progress)
    unit_table = unit_rows(embedding_table(artifact))
    rng = np.random.default_rng(seed)
    report = PrivacyReport(artifact.manifest.artifact_fingerprint, text,
                           {"train": len(train.tokens), "test": len(test.tokens)})
    crossing = crossings(chosen)
    for cut in cuts:
        report.cells += attack_cut(train, test, cut, crossing, unit_table, rng)
        progress(1)
    return report


def plot_recovery(report: PrivacyReport, path: Path) -> Path:
    figure = recovery_figure(report)
    return write_atomically(path, lambda out: figure.savefig(out, format="png", dpi=110), binary=True)


def recovery_figure(report: PrivacyReport):
    """Share of held-out tokens recovered against the cut, one panel per attack, one line per variant."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = list(dict.fromkeys(cell["variant"] for cell in report.cells))
    figure = Figure(figsize=(12, 4.4), layout="constrained")
    FigureCanvasAgg(figure)
    panels = figure.subplots(1, len(ATTACKS), sharey=True)
    others = [label for label in labels if label != NONE]
    styles = {NONE: {"color": "black", "linewidth": 2.4}}  # what crosses uncoded: the reference line
    styles.update({label: {"color": f"C{index % 10}", "linestyle": "-" if index < 10 else "--", "linewidth": 1.2}
                   for index, label in enumerate(others)})  # ten colours, then dashed ones
    for axes, attack in zip(panels, ATTACKS):
        for label in labels:
            points = sorted((cell["cut"], cell["recovered"]) for cell in report.cells
                            if cell["attack"] == attack and cell["variant"] == label)
            axes.plot(*zip(*points), marker="o", markersize=3, label=label, **styles[label])
        axes.set(title=attack, xlabel="cut (layers on the UE)", ylim=(-0.02, 1.02))
        axes.grid(alpha=0.3)
    panels[0].set_ylabel(f"share of {report.tokens['test']} held-out tokens recovered")
    figure.legend(*panels[0].get_legend_handles_labels(), loc="outside right upper", fontsize="small",
                  title="what the edge receives")
    figure.suptitle(f"What the edge learns at the cut: {report.text}", fontsize="medium")
    return figure


def run_privacy(args: argparse.Namespace, artifact: Artifact, cuts: Sequence[int]) -> int:
    """The ``--privacy`` side of ``seam analyze``, given the opened artifact and the checked cuts (``run_analyze``
    has checked the window and that --plot can be drawn)."""
    from tqdm import tqdm

    from seam.runtime.shell import table
    from seam.runtime.text import load_tokenizer

    chosen = variants(args.codecs, args.erasure, args.awgn)
    text, description = (read_text(args.text), args.text.name) if args.text else default_text()
    ids = np.array(load_tokenizer(artifact).encode(text).ids, dtype=np.int64)
    train_ids, test_ids = split_text(ids, args.privacy_tokens, args.privacy_test_tokens)
    total = len(train_ids) + len(test_ids) + len(cuts)
    with tqdm(total=total, disable=bar_disabled(args.quiet), file=sys.stderr, desc="privacy") as bar:
        report = analyze_privacy(artifact, train_ids, test_ids, cuts, chosen, args.window, args.stride, args.seed,
                                 description, progress=bar.update)
    stem = args.text.stem if args.text else "pydoc-topics"
    out = args.out or artifact.root / "analysis" / f"privacy-{stem}.json"
    write_atomically(out, lambda stream: stream.write(json.dumps(report.to_dict(), indent=1) + "\n"))
    headers, rows, groups = report.table()
    print(f"share of {report.tokens['test']} held-out tokens recovered in % (probe trained on "
          f"{report.tokens['train']}), per cut and what the edge receives:")
    print(table(headers, rows, groups))
    print(f"results: {out}")
    if args.plot:
        print(f"plot: {plot_recovery(report, args.plot)}")
    return 0
