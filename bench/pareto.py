"""Latency against quality of every (split, codec) of the trained preset at several link bandwidths, and how close
the learned policy's and the planner's choices come to the best reward any of them reaches.

For each bandwidth, each split 1..L-1 and each activation codec, and once for split L (every layer on the UE,
where no codec is used), one greedy generation of ``--tokens`` tokens from a fixed prompt of 32 runs through a
real edge_server (two threads) and ue_client over the transport's emulated link: a constant trace at that
bandwidth both ways and ``--rtt-ms`` of round trip. The UE runs in this process pinned to one CPU with one thread
and slowed down ``--ue-slowdown`` times, as in bench/adaptive.py. Per point: the median and p95 of the gaps
between consecutive tokens (decode steps only; the prefill's first token is left out), the UE / network / edge
medians of those steps, and the bytes each decode step sent and received.

The quality of a point is the perplexity increase ``seam analyze`` measured for its codec at its cut, and the
policy is the one bench/learned_policy.py trained (run it first: it writes both). At each bandwidth and quality
budget the learned policy and the planner pick a (split, codec) from the link alone, as they would online; each
pick's reward (the policy's objective, with the measured latency and increase) is divided by the best reward of
any measured point within that budget. The plot shows, per bandwidth, every point, the Pareto front of
(latency, increase) as a step line, and the picks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import psutil

from _common import RESULTS, profiled_pair, report, trained_llama

from seam.edge_server.process import edge_server
from seam.runtime.shell import table
from seam.planning.cost_model import Link
from seam.profiler.rl import State, learned_picker, planner_picker
from seam.runtime.artifact import Artifact
from seam.runtime.codecs import CODECS
from seam.runtime.errors import SeamError
from seam.runtime.spans import Span
from seam.runtime.traces import LinkState, Trace
from seam.runtime.emulation import EmulatedLink
from seam.runtime.transport import TransportConfig
from seam.ue_client.client import EdgeClient
from seam.planning.learned import PolicyFile
from seam.planning.planner import Objective, increase_of
from seam.planning.policy import QualityBudget, Scales

PROMPT_LENGTH = 32
BUDGETS_PCT = (math.inf, 0.1)
MARKERS = ("*", "X", "P", "D", "^", "v", "s")


def measure_grid(artifact_dir: Path, address: str, bandwidths_mbit: Sequence[float], codecs: Sequence[str],
                 tokens: int, ue_slowdown: float, rtt_ms: float, repeats: int = 1) -> list[dict]:
    """One point per bandwidth and (split, codec), split L once with fp32; with ``repeats``, every point is run
    that many times, a whole grid after another so that drift hits every point alike, and the steps pooled."""
    artifact = Artifact.open(artifact_dir)
    last = artifact.num_layers
    choices = [(split, codec) for split in range(1, last) for codec in codecs] + [(last, "fp32")]
    prompt = [int(i) for i in np.random.default_rng(0).integers(0, artifact.manifest.dims.vocab_size, PROMPT_LENGTH)]
    steps: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for _ in range(repeats):
        for bandwidth in bandwidths_mbit:
            trace = Trace((0.0,), (LinkState(bandwidth, bandwidth, rtt_ms),))
            for split, codec in choices:
                for name, values in run_once(artifact, address, trace, split, codec, prompt, tokens,
                                             ue_slowdown).items():
                    steps[bandwidth, split, codec][name] += values
    points = []
    for (bandwidth, split, codec), measured in steps.items():
        milliseconds = 1e3 * np.array(measured["gaps"])
        points.append({
            "bandwidth_mbit": bandwidth, "split": split, "codec": codec,
            "per_token_ms": round(float(np.median(milliseconds)), 2),
            "p95_ms": round(float(np.percentile(milliseconds, 95)), 2),
            **{f"{part}_ms": round(1e3 * float(np.median(measured[part])), 2) for part in ("ue", "network", "edge")},
            "up_bytes": int(np.median(measured["up"])), "down_bytes": int(np.median(measured["down"])),
            "steps": len(milliseconds),
        })
    return points


def run_once(artifact: Artifact, address: str, trace: Trace, split: int, codec: str, prompt: list[int], tokens: int,
             ue_slowdown: float) -> dict[str, list[float]]:
    """The decode steps of one static generation: gaps between tokens (s), their UE, network and edge parts (s),
    and the bytes each sent up and down."""
    with EdgeClient(artifact, address, TransportConfig(timeout_s=60), threads=1, emulated=EmulatedLink(trace),
                    ue_slowdown=ue_slowdown, codec=codec) as client:
        if client.codec != codec:
            raise SystemExit(client.warnings[0])
        client.pool.preload(Span(0, artifact.num_layers))  # loading blocks belongs to no step
        sent, received = [], []
        with client.session(split) as session:
            for _ in session.generate([prompt], tokens):
                sent.append(client.socket.bytes_sent)
                received.append(client.socket.bytes_received)
        decode = session.stats.timings[1:]
        return {"gaps": list(np.diff(session.stats.arrivals)), "ue": [t.ue_s for t in decode],
                "network": [t.network_s for t in decode], "edge": [t.edge_s for t in decode],
                "up": list(np.diff(sent)), "down": list(np.diff(received))}


def with_increase(points: Sequence[dict], increase_pct: dict[tuple[int, str], float], num_layers: int) -> list[dict]:
    """The points with their quality cost; fp32 and the all-local split lose nothing."""
    return [{**point, "increase_pct": increase_of(increase_pct, point["split"], point["codec"], num_layers)}
            for point in points]


def pareto_front(points: Sequence[dict]) -> list[dict]:
    """The points no other point beats on both per-token latency and perplexity increase, from the least
    increase (and most latency) to the most."""
    front: list[dict] = []
    for point in sorted(points, key=lambda p: (p["increase_pct"], p["per_token_ms"])):
        if not front or point["per_token_ms"] < front[-1]["per_token_ms"]:
            front.append(point)
    return front


def plot_pareto(points: Sequence[dict], marked: dict[float, list[tuple[str, int, str]]], path: Path) -> None:
    """``points`` with their increase; ``marked``: per bandwidth, (label, split, codec) picks to overlay."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    bandwidths = sorted({point["bandwidth_mbit"] for point in points})
    colours = {codec: f"C{index}" for index, codec in enumerate(CODECS)}
    labels = list(dict.fromkeys(label for choices in marked.values() for label, _, _ in choices))
    figure = Figure(figsize=(4 * len(bandwidths), 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(bandwidths), squeeze=False)[0]
    for axis, bandwidth in zip(axes, bandwidths):
        here = [point for point in points if point["bandwidth_mbit"] == bandwidth]
        for codec in dict.fromkeys(point["codec"] for point in here):
            mine = [point for point in here if point["codec"] == codec]
            axis.scatter([p["increase_pct"] for p in mine], [p["per_token_ms"] for p in mine], s=18,
                         color=colours[codec], label=codec, zorder=3)
        for point in here:
            axis.annotate(str(point["split"]), (point["increase_pct"], point["per_token_ms"]), fontsize=6,
                          xytext=(3, 2), textcoords="offset points")
        front = pareto_front(here)
        axis.step([p["increase_pct"] for p in front], [p["per_token_ms"] for p in front], where="post",
                  color="black", lw=0.8, label="Pareto front", zorder=2)
        by_choice = {(point["split"], point["codec"]): point for point in here}
        for label, split, codec in marked.get(bandwidth, []):
            point = by_choice[split, codec]
            marker = MARKERS[labels.index(label) % len(MARKERS)]
            axis.scatter(point["increase_pct"], point["per_token_ms"], s=110, marker=marker, facecolors="none",
                         edgecolors="black", label=label, zorder=4)
        # Increases run from 0 to about 0.3%: linear near zero keeps the nearly lossless codecs apart.
        axis.set_xscale("symlog", linthresh=0.01)
        axis.set(title=f"{bandwidth:g} Mbit/s", xlabel="perplexity increase %", ylabel="ms per token")
        axis.grid(alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    for axis in axes[1:]:  # a marked choice may show at some bandwidths only
        for handle, name in zip(*axis.get_legend_handles_labels()):
            if name not in names:
                handles.append(handle)
                names.append(name)
    figure.legend(handles, names, loc="outside right center", fontsize="small")
    figure.savefig(path, dpi=110)


def pooled_ue(points: Sequence[dict]) -> list[dict]:
    """Each point's latency with its UE part replaced by the median UE part of every codec at its bandwidth and
    split: the UE runs the same layers whatever the codec (encoding costs tens of microseconds, bench/codecs.py),
    and its part, emulated ``--ue-slowdown`` times slower, carries most of the run-to-run noise."""
    ue_ms = defaultdict(list)
    for point in points:
        ue_ms[point["bandwidth_mbit"], point["split"]].append(point["ue_ms"])
    return [{**point, "per_token_ms": point["per_token_ms"] - point["ue_ms"]
             + float(np.median(ue_ms[point["bandwidth_mbit"], point["split"]]))} for point in points]


def picks(policy: PolicyFile, ue, edge, points: Sequence[dict], bandwidths: Sequence[float], rtt_ms: float,
          context: int) -> tuple[dict[float, list[tuple[str, int, str]]], list[dict]]:
    """What the learned policy and the planner pick at each bandwidth and budget, and each pick's reward over the
    best reward within that budget, with the measured latencies and with the UE part pooled per split."""
    num_layers = policy.num_layers
    pickers = {"learned": learned_picker(policy.weights, policy.actions, policy.table, num_layers),
               "planner": planner_picker(ue, edge, policy.actions, policy.table, policy.alpha, policy.beta)}
    marked: dict[float, list[tuple[str, int, str]]] = defaultdict(list)
    scores = []
    for bandwidth in bandwidths:
        for budget in BUDGETS_PCT:
            objective = Objective(policy.alpha, policy.beta, budget)
            rewards = {}
            for latency, measured in (("measured", points), ("ue pooled", pooled_ue(points))):
                here = {(p["split"], p["codec"]): p for p in measured if p["bandwidth_mbit"] == bandwidth}
                local_ms = here[num_layers, "fp32"]["per_token_ms"]
                rewards[latency] = {key: objective.reward(p["increase_pct"], p["per_token_ms"], local_ms)
                                    for key, p in here.items()}
            state = State(Link.from_mbit(bandwidth, rtt_ms), Scales(), context, budget)
            for name, pick in pickers.items():
                split, codec = pick(state)
                label = name if math.isinf(budget) else f"{name}, budget {budget:g}%"
                marked[bandwidth].append((label, split, codec))
                score = {"bandwidth_mbit": bandwidth, "budget_pct": budget, "picker": name, "split": split,
                         "codec": codec}
                for latency, reward in rewards.items():
                    best = max(reward, key=reward.get)
                    score[latency] = {"ratio": reward[split, codec] / reward[best], "optimum": list(best)}
                scores.append(score)
    return marked, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bandwidths", default="0.1,0.5,2,20", help="Mbit/s, both ways")
    parser.add_argument("--codecs", default=",".join(CODECS))
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per generation")
    parser.add_argument("--ue-slowdown", type=float, default=30.0,
                        help="the UE runs this many times slower than this machine (a phone next to an edge box)")
    parser.add_argument("--rtt-ms", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=2, help="generations per point, their steps pooled")
    args = parser.parse_args()

    out = trained_llama()
    try:
        policy = PolicyFile.load(out / "policies" / "learned")
        cells = json.loads((out / "analysis" / "held-out.json").read_text())["cells"]
    except (OSError, SeamError) as error:
        raise SystemExit(f"{error}: run bench/learned_policy.py first, it trains the policy and analyses the text")
    trained_at = json.loads((policy.root / "policy.json").read_text()).get("ue_slowdown")
    if trained_at != args.ue_slowdown:
        raise SystemExit(f"the policy was trained for a UE {trained_at}x slower, not {args.ue_slowdown}x: run "
                         f"bench/learned_policy.py --ue-slowdown {args.ue_slowdown:g}")
    ue, edge = profiled_pair(out, args.ue_slowdown)
    bandwidths = [float(value) for value in args.bandwidths.split(",")]
    started = time.perf_counter()
    with open(os.devnull, "w") as quiet, edge_server(out, "--threads", "2", log=quiet) as (_, address):
        psutil.Process().cpu_affinity([0])  # after the server started: it keeps both CPUs
        points = measure_grid(out, address, bandwidths, args.codecs.split(","), args.tokens,
                              args.ue_slowdown, args.rtt_ms, args.repeats)
    seconds = time.perf_counter() - started
    points = with_increase(points, QualityBudget.from_analysis(cells, math.inf).increase_pct, policy.num_layers)
    fronts = {bandwidth: pareto_front([p for p in points if p["bandwidth_mbit"] == bandwidth])
              for bandwidth in bandwidths}
    rows = [[f"{p['bandwidth_mbit']:g}", str(p["split"]), p["codec"], f"{p['per_token_ms']:.1f}", f"{p['p95_ms']:.1f}",
             f"{p['ue_ms']:.1f}", f"{p['network_ms']:.1f}", f"{p['edge_ms']:.1f}", str(p["up_bytes"]),
             f"{p['increase_pct']:+.3f}", "*" if p in fronts[p["bandwidth_mbit"]] else ""] for p in points]
    print(table(["Mbit/s", "split", "codec", "ms/token", "p95 ms", "UE ms", "net ms", "edge ms", "up B/step",
                 "ppl +%", "front"], rows))
    print(f"grid of {len(points)} points in {seconds:.0f} s")
    marked, scores = picks(policy, ue, edge, points, bandwidths, args.rtt_ms, PROMPT_LENGTH + args.tokens // 2)
    print(table(["Mbit/s", "budget %", "policy", "pick", "best measured", "reward / best", "best, UE pooled",
                 "reward / best"],
                [[f"{s['bandwidth_mbit']:g}", f"{s['budget_pct']:g}", s["picker"], f"{s['split']} {s['codec']}",
                  *(cell for latency in ("measured", "ue pooled")
                    for cell in (" ".join(map(str, s[latency]["optimum"])), f"{s[latency]['ratio']:.3f}"))]
                 for s in scores]))
    summary = {name: {latency: {"mean_ratio": float(np.mean([s[latency]["ratio"] for s in scores
                                                             if s["picker"] == name])),
                                "worst_ratio": float(np.min([s[latency]["ratio"] for s in scores
                                                             if s["picker"] == name]))}
                      for latency in ("measured", "ue pooled")}
               for name in ("learned", "planner")}
    for name, by_latency in summary.items():
        print(f"{name}: reward " + "; ".join(f"{score['mean_ratio']:.3f} of the best {latency} on average, worst "
                                            f"{score['worst_ratio']:.3f}" for latency, score in by_latency.items()))
    plot_pareto(points, marked, RESULTS / "pareto.png")
    report("pareto", {"model": "trained-llama", "bandwidths_mbit": bandwidths, "rtt_ms": args.rtt_ms,
                      "ue_slowdown": args.ue_slowdown, "tokens": args.tokens, "prompt_length": PROMPT_LENGTH,
                      "repeats": args.repeats, "seconds": round(seconds, 1), "summary": summary, "picks": scores,
                      "points": points,
                      "fronts": {f"{bandwidth:g}": [[p["split"], p["codec"]] for p in front]
                                 for bandwidth, front in fronts.items()}})


if __name__ == "__main__":
    main()
