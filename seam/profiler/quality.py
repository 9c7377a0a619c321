"""``seam analyze DIR --text FILE``: what each cut costs in quality when the hidden states crossing it are coded
or corrupted, as sliding-window perplexity of the split model against the unsplit one.

For every window of the text the whole model runs once, keeping the hidden states at every cut; then, for each
cut and each variant (a codec's round trip, or an impairment such as erasure or Gaussian noise), the layers past
the cut run again from the altered hidden states. All of it runs through the runtime's own onnxruntime sessions,
the same blocks a split generation runs. Windows overlap by ``window - stride`` tokens and score each token once,
with at least ``window - stride`` tokens of context except at the start, as the usual sliding-window perplexity
does. Works on any exported artifact; on random weights perplexity means little, so the trained preset exists.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from seam.runtime.artifact import Artifact
from seam.runtime.codecs import CODECS
from seam.runtime.codecs import codec as find_codec
from seam.runtime.errors import SeamError
from seam.runtime.executor import SessionPool
from seam.runtime.files import write_atomically
from seam.runtime.impairments import parse as parse_impairment
from seam.runtime.shell import bar_disabled, comma_list, number, require_extra
from seam.runtime.spans import Span

DEFAULT_CODECS = ("fp16", "bf16", "int8", "int4")
DEFAULT_ERASURE = (0.01, 0.05, 0.1)
DEFAULT_AWGN_DB = (30.0, 20.0, 10.0)


@dataclass(frozen=True)
class Variant:
    """One way the hidden states cross a cut: ``codec:NAME``, ``erasure:P`` or ``awgn:SNR_DB``."""

    label: str

    @property
    def kind(self) -> str:
        return self.label.split(":", 1)[0]

    def transform(self) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
        if self.label.startswith("codec:"):
            chosen = find_codec(self.label.split(":", 1)[1])
            return lambda hidden, rng: chosen.decode(chosen.encode(hidden))
        impairment = parse_impairment(self.label)
        return impairment.apply


def variants(codecs: Sequence[str], erasure: Sequence[float], awgn_db: Sequence[float]) -> list[Variant]:
    found = [Variant(f"codec:{name}") for name in codecs]
    found += [Variant(f"erasure:{p:g}") for p in erasure]
    found += [Variant(f"awgn:{db:g}") for db in awgn_db]
    for variant in found:
        variant.transform()  # refuses unknown codecs and out-of-range impairments before any work
    return found


def windows(tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, scored_from): each window [begin, end) scores the tokens [scored_from, end) it predicts; every
    token after the first is scored exactly once."""
    context = max(window - stride, 1)  # a window's first token has nothing to predict it
    found, scored = [], 1
    while scored < tokens:
        begin = max(scored - context, 0)
        end = min(begin + window, tokens)
        found.append((begin, end, scored))
        scored = end
    return found


def nll(logits: np.ndarray, ids: np.ndarray, begin: int, scored_from: int, end: int) -> float:
    """Summed negative log-likelihood of ids[scored_from:end] under ``logits`` [S, V] of the window at ``begin``."""
    rows = logits[scored_from - 1 - begin: end - 1 - begin].astype(np.float64)
    peak = rows.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(rows - peak).sum(axis=1)) + peak[:, 0]
    return float((log_norm - rows[np.arange(len(rows)), ids[scored_from:end]]).sum())


@dataclass
class QualityReport:
    artifact: str
    text: str
    tokens: int  # scored
    window: int
    stride: int
    seed: int
    baseline_ppl: float  # the unsplit model
    cells: list[dict] = field(default_factory=list)  # cut, variant, kind, ppl, increase_pct

    def table(self) -> tuple[list[str], list[list[str]]]:
        labels = list(dict.fromkeys(cell["variant"] for cell in self.cells))
        cuts = sorted({cell["cut"] for cell in self.cells})
        by_key = {(cell["cut"], cell["variant"]): cell["increase_pct"] for cell in self.cells}
        rows = [[str(cut), *(f"{by_key[cut, label]:+.2f}" for label in labels)] for cut in cuts]
        return ["cut", *labels], rows


def analyze(artifact: Artifact, ids: np.ndarray, cuts: Sequence[int], chosen: Sequence[Variant], window: int,
            stride: int, seed: int = 0, progress: Callable[[int], None] = lambda done: None,
            text_name: str = "", pool: SessionPool | None = None) -> QualityReport:
    last = artifact.num_layers
    pool = pool or SessionPool(artifact)
    whole = pool.runner(Span(0, last), keep_boundaries=True)
    tails = {cut: pool.runner(Span(cut, last)) for cut in cuts}
    transforms = [(variant, variant.transform()) for variant in chosen]
    baseline = 0.0
    totals = {(cut, variant.label): 0.0 for cut in cuts for variant in chosen}
    rng = np.random.default_rng(seed)
    for begin, end, scored_from in windows(len(ids), window, stride):
        length = end - begin
        first = ids[None, begin:end]
        mask = np.ones((1, length), dtype=np.int64)
        positions = np.arange(length, dtype=np.int64)[None, :]
        whole.reset(1)
        baseline += nll(whole.run(first, mask, positions, logits_to_keep=length)[0], ids, begin, scored_from, end)
        for cut, tail in tails.items():
            hidden = whole.boundary(cut).astype(np.float32)
            for variant, transform in transforms:
                tail.reset(1)
                altered = transform(hidden, rng).astype(hidden.dtype, copy=False)
                logits = tail.run(altered, mask, positions, logits_to_keep=length)[0]
                totals[cut, variant.label] += nll(logits, ids, begin, scored_from, end)
        progress(end - scored_from)
    scored = len(ids) - 1
    baseline_ppl = math.exp(baseline / scored)
    report = QualityReport(str(artifact.root), text_name, scored, window, stride, seed, round(baseline_ppl, 6))
    for variant in chosen:
        for cut in cuts:
            ppl = math.exp(totals[cut, variant.label] / scored)
            report.cells.append({"cut": cut, "variant": variant.label, "kind": variant.kind, "ppl": round(ppl, 6),
                                 "increase_pct": round(100 * (ppl / baseline_ppl - 1), 4)})
    return report


def plot_heatmap(report: QualityReport, path: Path) -> Path:
    figure = heatmap_figure(report)
    return write_atomically(path, lambda out: figure.savefig(out, format="png", dpi=110), binary=True)


def heatmap_figure(report: QualityReport):
    """Each cut's perplexity increase per codec or impairment, its value written in every cell."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    headers, rows = report.table()
    values = np.array([[float(value) for value in row[1:]] for row in rows])
    figure = Figure(figsize=(1.2 + 0.9 * len(headers), 1.2 + 0.45 * len(rows)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    image = axes.imshow(np.log10(1 + np.clip(values, 0, None)), cmap="magma_r", aspect="auto")
    axes.set(xticks=range(len(headers) - 1), xticklabels=headers[1:], yticks=range(len(rows)),
             yticklabels=[row[0] for row in rows], xlabel="codec or impairment at the cut",
             ylabel="cut (layers on the UE)",
             title=f"perplexity increase in % (the unsplit model: {report.baseline_ppl:.4g})")
    axes.tick_params(axis="x", rotation=45)
    for (row, column), value in np.ndenumerate(values):  # light text on dark cells, dark on light
        shade = image.norm(np.log10(1 + max(value, 0)))
        axes.text(column, row, f"{value:+.1f}", ha="center", va="center", fontsize="small",
                  color="white" if shade > 0.5 else "black")
    figure.colorbar(image, label="log10(1 + increase %)")
    return figure


def read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise SeamError(f"cannot read --text {path}: {error}; give a UTF-8 text file") from None
    if not text.strip():
        raise SeamError(f"--text {path} is empty; give a text of at least a few hundred tokens")
    return text


def add_analyze_parser(commands) -> None:
    parser = commands.add_parser("analyze", help="perplexity of the split model per cut, codec and impairment; "
                                 "with --privacy, the input tokens an edge recovers from the hidden states")
    parser.add_argument("directory", type=Path, help="an exported artifact")
    parser.add_argument("--text", type=Path, default=None,
                        help="UTF-8 text to measure perplexity on (with --privacy: default the pydoc help topics)")
    parser.add_argument("--privacy", action="store_true",
                        help="measure instead the share of input tokens two inversion attacks recover at each cut")
    parser.add_argument("--privacy-tokens", type=number(int, 2), default=4096,
                        help="with --privacy: tokens of the text the probe trains on (default 4096)")
    parser.add_argument("--privacy-test-tokens", type=number(int, 1), default=1024,
                        help="with --privacy: held-out tokens after them that both attacks guess (default 1024)")
    parser.add_argument("--cuts", type=comma_list(allow_empty=True), default=None,
                        help="cuts to analyse (default: every inner cut)")
    parser.add_argument("--codecs", type=comma_list(allow_empty=True), default=DEFAULT_CODECS,
                        help=f"codecs at the cut (default {','.join(DEFAULT_CODECS)}; known: {','.join(CODECS)})")
    parser.add_argument("--erasure", type=comma_list(float, allow_empty=True), default=DEFAULT_ERASURE,
                        metavar="P[,P...]",
                        help="element erasure probabilities at the cut (empty for none)")
    parser.add_argument("--awgn", type=comma_list(float, allow_empty=True, signed=True), default=DEFAULT_AWGN_DB,
                        metavar="DB[,DB...]",
                        help="Gaussian noise at these SNRs in dB at the cut (empty for none)")
    parser.add_argument("--window", type=number(int, 2), default=128, help="tokens per window (default 128)")
    parser.add_argument("--stride", type=number(int, 1), default=64, help="tokens between window starts (default 64)")
    parser.add_argument("--max-tokens", type=number(int, 2), default=8192,
                        help="analyse at most this many tokens of the text")
    parser.add_argument("--seed", type=number(int, 0), default=0, help="seeds the impairments")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON results (default DIR/analysis/TEXT.json; with --privacy, privacy-TEXT.json)")
    parser.add_argument("--plot", type=Path, default=None, metavar="PNG",
                        help="also draw the heatmap (with --privacy, recovery per cut) here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run_analyze)


def run_analyze(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    if args.plot:
        require_extra("plot")
    from seam.runtime.shell import table
    from seam.runtime.text import load_tokenizer

    if not 2 <= args.window or not 1 <= args.stride <= args.window:
        raise SeamError("--window must be at least 2 and --stride between 1 and --window")
    artifact = Artifact.open(args.directory)
    inner = [cut for cut in artifact.split_points if 0 < cut < artifact.num_layers]
    try:
        cuts = [int(cut) for cut in args.cuts] if args.cuts is not None else inner
    except ValueError:
        raise SeamError(f"--cuts must be integers; this artifact has {inner}") from None
    if not cuts or any(cut not in inner for cut in cuts):
        raise SeamError(f"--cuts must be among this artifact's inner cuts {inner}")
    if args.privacy:
        from seam.profiler.privacy import run_privacy
        return run_privacy(args, artifact, cuts)
    if args.text is None:
        raise SeamError("--text is required: give a UTF-8 text to measure perplexity on")
    chosen = variants(args.codecs, args.erasure, args.awgn)
    if not chosen:
        raise SeamError("nothing to analyse: give at least one of --codecs, --erasure, --awgn")
    ids = np.array(load_tokenizer(artifact).encode(read_text(args.text)).ids[: args.max_tokens], dtype=np.int64)
    if len(ids) < 2:
        raise SeamError(f"--text {args.text} encodes to fewer than two tokens; give a longer text")
    with tqdm(total=len(ids) - 1, unit="tok", disable=bar_disabled(args.quiet), file=sys.stderr, desc="analyze") as bar:
        report = analyze(artifact, ids, cuts, chosen, args.window, args.stride, args.seed, bar.update,
                         args.text.name)
    out = args.out or artifact.root / "analysis" / f"{args.text.stem}.json"
    write_atomically(out, lambda stream: stream.write(json.dumps(asdict(report), indent=1) + "\n"))
    headers, rows = report.table()
    print(f"perplexity of the unsplit model: {report.baseline_ppl:.4f} over {report.tokens} tokens; "
          "increase in % per cut (rows) and codec or impairment (columns):")
    print(table(headers, rows))
    print(f"results: {out}")
    if args.plot:
        print(f"heatmap: {plot_heatmap(report, args.plot)}")
    return 0
