"""Online split selection against every static split and the hindsight oracle, on each shipped link trace.

A model (small-llama by default, or ``--model smollm2-135m-instruct``, the real one) cut at a few layers; the edge_server runs with two threads, the UE in this process pinned to one CPU
with one thread and slowed down ``--slowdown`` times (a phone next to an edge box; on one machine the two would
otherwise be equally fast and offloading could never pay), and the link follows
each trace through the transport's emulator, the trace's time compressed so that each run takes ``--seconds``.
Every run generates as fast as it can until the trace ends: the adaptive policy (``--policy``: the cost model's,
the planner's or a learned one, starting from the UE's default split) and each static split, all in one process,
one after another (each repeat and each trace starting one place further along the list), and all of them again
``--repeats`` times; ratios are taken within a repeat and the median reported, since this shared machine drifts
by ten percent between runs.

The oracle picks the best split for each interval of the trace in hindsight from the same run's measurements:
the tokens each static run produced in that interval, less those it would lose to a move when it changes
split (carrying the cache or recomputing it, whichever is quicker at that interval's link, as the profiles
predict). Reports mean and p95 per-token latency and the number of moves,
and draws, per trace, the split and bandwidth over time and the per-token latency over time.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import psutil

from _common import RESULTS, profiled_pair, report, work_export

from seam.edge_server.process import edge_server
from seam.runtime.shell import table
from seam.planning.cost_model import DeviceModel, Link
from seam.planning.wire_sizes import ID_BYTES
from seam.runtime.artifact import Artifact
from seam.runtime.spans import Span
from seam.runtime.traces import Trace, load_trace
from seam.runtime.emulation import EmulatedLink
from seam.runtime.transport import TransportConfig
from seam.ue_client.client import EdgeClient
from seam.planning.learned import LearnedPolicy, PolicyFile
from seam.planning.planner import LOSSLESS, actions
from seam.planning.policy import Constraints, CostModelPolicy, Scales, move_s, rebuild_s

TRACES = RESULTS.parent.parent / "traces"
PROMPT_LENGTH = 32


@dataclass
class Run:
    name: str
    arrivals: list[float] = field(default_factory=list)  # seconds since the trace started
    splits: list[int] = field(default_factory=list)  # the split each token was produced at
    moves: list = field(default_factory=list)  # (at_s, from, to, seconds, reason)

    @property
    def gaps(self) -> list[float]:
        return list(np.diff(self.arrivals))

    @property
    def mean_ms(self) -> float:
        return 1e3 * (self.arrivals[-1] - self.arrivals[0]) / (len(self.arrivals) - 1)

    @property
    def p95_ms(self) -> float:
        return 1e3 * float(np.percentile(self.gaps, 95))


def compressed(trace: Trace, seconds: float) -> Trace:
    scale = seconds / trace.duration_s
    return Trace(tuple(t * scale for t in trace.times_s), trace.states)


def run_once(name: str, artifact: Artifact, address: str, trace: Trace, seconds: float, split: int, slowdown: float,
             policy=None, join_first: bool = False) -> Run:
    """One generation over ``trace`` from ``split``; with ``join_first`` every span [0, cut) the UE may run is
    joined into one graph before the prompt, as a long-lived process would hold them."""
    prompt = list(np.random.default_rng(0).integers(0, artifact.manifest.dims.vocab_size, PROMPT_LENGTH))
    emulated = EmulatedLink(trace)
    run = Run(name)
    with EdgeClient(artifact, address, TransportConfig(timeout_s=60), threads=1, emulated=emulated,
                    ue_slowdown=slowdown) as client:
        client.pool.preload(Span(0, artifact.num_layers))  # every run starts with every block loaded
        for cut in artifact.split_points if join_first else ():
            if len(artifact.blocks_for(Span(0, cut))) > 1:  # a single block runs as it is
                client.pool.merged_session(Span(0, cut), client.variant, True, wait=True)
        with client.session(split) as session:
            emulated.started = time.monotonic()  # the trace starts with the generation
            for _ in session.generate([prompt], 3000, policy):
                run.arrivals.append(time.monotonic() - emulated.started)
                run.splits.append(session.split)
                if run.arrivals[-1] >= seconds:
                    break
            run.moves = [(round(run.arrivals[m.before_step - 1], 2), m.from_split, m.to_split, round(m.seconds, 3),
                          m.reason) for m in session.moves]
    return run


def warm_edge(artifact: Artifact, address: str) -> None:
    """A short generation at every split the edge serves, so that no run pays for the edge's first session at
    a split (loading and joining that span's blocks took it 1.7-2.1 s), as a long-running edge would have."""
    prompt = list(range(1, PROMPT_LENGTH + 1))
    with EdgeClient(artifact, address, TransportConfig(timeout_s=60), threads=1) as client:
        for split in (split for split in artifact.split_points if 0 < split < artifact.num_layers):
            with client.session(split) as session:
                for _ in session.generate([prompt], 2):
                    pass


def interval_rate(run: Run, start: float, end: float) -> float:
    """Tokens per second ``run`` produced in [start, end)."""
    return sum(start <= arrival < end for arrival in run.arrivals[1:]) / (end - start)


def oracle(statics: dict[int, Run], trace: Trace, seconds: float, ue: DeviceModel, edge: DeviceModel,
           kv_bytes_per_token_per_layer: int, boundary_bytes_per_token: int) -> tuple[float, list[int]]:
    """The most tokens any schedule of static splits over the trace's intervals could produce, moves included
    (the cache carried over the interval's link, or recomputed by the side taking layers over, whichever the
    profiles say is quicker): returns its mean per-token latency from its first token on (the prefill at the
    split it starts with), as the runs' are taken, and its split per interval."""
    bounds = list(trace.times_s)
    splits = sorted(statics)
    best: dict[int, tuple[float, list[int]]] = {s: (0.0, []) for s in splits}  # tokens so far, path
    for index, (start, end) in enumerate(zip(bounds, bounds[1:])):
        state = trace.states[index]
        link = Link.from_mbit(state.down_mbit, state.rtt_ms, state.up_mbit)
        context = PROMPT_LENGTH + int(max(tokens for tokens, _ in best.values()))
        step: dict[int, tuple[float, list[int]]] = {}
        for split in splits:
            rate = interval_rate(statics[split], start, end)
            options = []
            for previous, (tokens, path) in best.items():
                moving = 0.0
                if path and previous != split:
                    moving = min(move_s(link, previous, split, kv_bytes_per_token_per_layer, 1, context),
                                 rebuild_s(ue, edge, link, previous, split, 1, context, Scales(),
                                           boundary_bytes_per_token, kept=splits))
                options.append((tokens + max(end - start - moving, 0.0) * rate, path + [split]))
            step[split] = max(options, key=lambda option: option[0])
        best = step
    tokens, path = max(best.values(), key=lambda option: option[0])
    # Per token from the first token on, as every run's mean is taken: the prefill before it is not a decode step.
    first = statics[path[0]].arrivals[0]
    return 1e3 * (seconds - first) / tokens, path


def plot(name: str, trace: Trace, runs: list[Run], oracle_ms: float, path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 6), layout="constrained")
    FigureCanvasAgg(figure)
    top, bottom = figure.subplots(2, 1, sharex=True)
    for label, values in (("up", [s.up_mbit for s in trace.states]), ("down", [s.down_mbit for s in trace.states])):
        top.step(trace.times_s, values, where="post", label=f"{label} Mbit/s", alpha=0.6)
    top.set(ylabel="Mbit/s", yscale="log", title=f"{name}: bandwidth and the adaptive split")
    split_axis = top.twinx()
    adaptive = runs[0]
    split_axis.step(adaptive.arrivals, adaptive.splits, where="post", color="black", label="split")
    split_axis.set_ylabel("split (layers on the UE)")
    top.legend(loc="upper left", fontsize="small")
    for run in runs:
        bottom.plot(run.arrivals[1:], [1e3 * g for g in run.gaps], label=run.name, lw=1 if run is adaptive else 0.6)
    bottom.axhline(oracle_ms, color="black", ls="--", label="oracle mean")
    bottom.set(xlabel="seconds", ylabel="ms per token", yscale="log")
    bottom.legend(fontsize="small", ncols=3)
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--traces", default="step,random-walk,4g,wifi")
    parser.add_argument("--families", default=None,
                        help="instead of --traces: --count generated traces of each of these families (e.g. "
                             "markov-fades,handovers,starved-uplink,congestion,random-walk,4g,wifi), one run each, "
                             "reported as the median and worst ratio per family")
    parser.add_argument("--count", type=int, default=4, help="traces per family")
    parser.add_argument("--seed", type=int, default=1000,
                        help="the first seed of the generated traces (tune on one seed set, report on another)")
    parser.add_argument("--seconds", type=float, default=20.0, help="wall time of each run (the trace is compressed)")
    parser.add_argument("--model", default="small-llama", help="a preset: small-llama, or smollm2-135m-instruct")
    parser.add_argument("--cuts", default=None, help="the cuts to export (default 1,4,8; 5,15,25 for a 30-layer model)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of every policy per trace; ratios are taken within a repeat, then the median")
    parser.add_argument("--slowdown", type=float, default=4.0,
                        help="the UE runs this many times slower than this machine (a phone next to an edge box)")
    parser.add_argument("--policy", choices=("cost-model", "planner", "learned"), default="cost-model",
                        help="the adaptive policy: the cost model's, the planner's or a PPO-trained one (trained "
                             "here over the lossless actions unless --policy-file names a 'seam train-policy' result)")
    parser.add_argument("--policy-file", type=Path, default=None)
    args = parser.parse_args()

    suffix = "" if args.model == "small-llama" else f"-{args.model}"  # the small model's results keep their names
    suffix += "" if args.policy == "cost-model" else f"-{args.policy}"
    args.cuts = args.cuts or ("1,4,8" if args.model == "small-llama" else "5,15,25")
    out = work_export(f"{args.model}-cuts-{args.cuts.replace(',', '_')}", args.model, cuts=args.cuts)
    artifact = Artifact.open(out)
    ue, edge = profiled_pair(out, args.slowdown)
    bench = Bench(artifact, ue, edge, args.seconds, args.slowdown,
                  policies(artifact, ue, edge, args.policy, args.policy_file))
    with open("/dev/null", "w") as quiet, edge_server(out, "--threads", "2", log=quiet) as (_, bench.address):
        psutil.Process().cpu_affinity([0])  # after the server started: it keeps both CPUs
        warm_edge(artifact, bench.address)
        if args.families:
            families(bench, args, suffix)
        else:
            shipped(bench, args, suffix)


@dataclass
class Bench:
    """What every run shares: the artifact, both sides' cost models, the run length, the UE's slowdown and the
    edge's address."""

    artifact: Artifact
    ue: DeviceModel
    edge: DeviceModel
    seconds: float
    slowdown: float
    new_policy: Callable[[], CostModelPolicy]  # a fresh adaptive policy for each run
    address: str = ""

    def play(self, trace: Trace, repeats: int, fixed_horizon: bool = False, rotation: int = 0) -> list[Round]:
        """Every policy over ``trace``, ``repeats`` times: the adaptive run and each static split; with
        ``fixed_horizon`` also the adaptive policy blind to the link's dynamics and to what moves cost (as it
        was before it learned them), kept apart from the statics. Each repeat starts its runs ``rotation`` plus
        its index places further along, so that none always goes first after the edge sat idle or always
        follows the same neighbour: on this machine a run's place in the order moves it by a few percent."""
        artifact, manifest = self.artifact, self.artifact.manifest
        statics = [split for split in artifact.split_points if split > 0]
        plays = [("adaptive", artifact.default_split, self.new_policy)]
        plays += [(f"static {s}", s, lambda: None) for s in statics]
        if fixed_horizon:
            plays.append(("fixed horizon", artifact.default_split, lambda: Blind(self.new_policy())))
        rounds = []
        for repeat in range(repeats):
            start = (rotation + repeat) % len(plays)
            done = {name: run_once(name, artifact, self.address, trace, self.seconds, split, self.slowdown, make())
                    for name, split, make in plays[start:] + plays[:start]}
            runs = [done[name] for name, _, _ in plays if name != "fixed horizon"]
            oracle_ms, oracle_path = oracle(dict(zip(statics, runs[1:])), trace, self.seconds, self.ue, self.edge,
                                            manifest.kv_bytes_per_token_per_layer,
                                            manifest.dims.hidden_size * 4 + ID_BYTES)
            rounds.append(Round(runs, oracle_ms, oracle_path, min(runs[1:], key=lambda run: run.mean_ms),
                                done.get("fixed horizon")))
        return rounds


def policies(artifact: Artifact, ue: DeviceModel, edge: DeviceModel, kind: str,
             policy_file: Path | None) -> Callable[[], CostModelPolicy]:
    """What makes each run's adaptive policy. The planner and the learned policy name the split to go to, and
    the cost-model policy's test (the link's dynamics, what moves cost) decides whether and when to move, so
    all three are scored on the same runs the same way. Without a policy file the actions are every split from
    the privacy floor on with the hidden states as they are (no quality table is needed), and the learned
    policy trains here, a minute of PPO."""
    constraints = Constraints(min_ue_layers=1)
    if kind == "cost-model":
        return lambda: CostModelPolicy(ue, edge, constraints)
    if policy_file is not None:
        loaded = PolicyFile.load(policy_file)
    else:
        choices = actions([split for split in artifact.split_points if split >= 1], [LOSSLESS], artifact.num_layers)
        weights = {}
        if kind == "learned":
            from seam.profiler.rl import train

            weights, training = train(ue, edge, choices, lambda cut, codec: 0.0, 10.0, 1.0, 20000)
            print(f"trained the learned policy in {training.seconds:.0f} s")
        loaded = PolicyFile(RESULTS, artifact.manifest.artifact_fingerprint, artifact.num_layers, choices, {},
                            10.0, 1.0, weights)
    return lambda: LearnedPolicy(ue, edge, loaded, planner=kind == "planner", constraints=constraints)


class Blind:
    """A policy that decides without the session's link history and move costs: a fixed horizon of tokens and
    the profiles' move predictions, the baseline of the link-dynamics model."""

    def __init__(self, policy: CostModelPolicy):
        self.policy = policy
        self.candidates = policy.candidates

    def __call__(self, snapshot):
        return self.policy(replace(snapshot, link_history=(), move_costs=()))


def shipped(bench: Bench, args, suffix: str) -> None:
    """The shipped traces, each ``--repeats`` times: a table of every policy, the moves, and a plot per trace."""
    rows, results = [], {}
    for name in args.traces.split(","):
        trace = compressed(load_trace(TRACES / f"{name}.csv"), args.seconds)
        rounds = bench.play(trace, args.repeats, rotation=len(results))
        results[name] = summary(rounds)
        typical = rounds[median_index([r.runs[0].mean_ms / r.oracle_ms for r in rounds])]
        for position, run in enumerate(typical.runs):
            rows.append([name, run.name, f"{median(r.runs[position].mean_ms for r in rounds):.1f}",
                         f"{median(r.runs[position].p95_ms for r in rounds):.1f}",
                         "/".join(str(len(r.runs[position].moves)) for r in rounds)])
        rows.append([name, "oracle", f"{median(r.oracle_ms for r in rounds):.1f}", "-",
                     "/".join(str(sum(a != b for a, b in zip(r.oracle_path, r.oracle_path[1:]))) for r in rounds)])
        plot(name, trace, typical.runs, typical.oracle_ms, RESULTS / f"adaptive{suffix}-{name}.png")
    print(table(["trace", "policy", "mean ms/token", "p95 ms", "moves per repeat"], rows))
    for name, result in results.items():
        for at, old, new, seconds, reason in result["moves"]:
            print(f"{name} at {at:.2f} s: split {old} -> {new} in {1e3 * seconds:.0f} ms ({reason})")
        print(f"{name}: adaptive / oracle {result['adaptive_vs_oracle']:.3f} (target <= 1.10), "
              f"adaptive / best static ({result['best_static']}) {result['adaptive_vs_best_static']:.3f} "
              f"(medians of {args.repeats} repeats: {result['adaptive_vs_oracle_each']}, "
              f"{result['adaptive_vs_best_static_each']})")
    report(f"adaptive{suffix}", {"model": args.model, "policy": args.policy, "cuts": args.cuts,
                                 "seconds": args.seconds, "repeats": args.repeats, "traces": results})


def families(bench: Bench, args, suffix: str) -> None:
    """``--count`` generated traces of each family, one run of every policy each: per family the median and
    worst adaptive / oracle and adaptive / best-static ratios, and every trace's moves."""
    from seam.runtime.trace_families import family_trace

    rows, results = [], {}
    for family in args.families.split(","):
        per_trace = {}
        for seed in range(args.seed, args.seed + args.count):
            (round_,) = bench.play(compressed(family_trace(family, seed), args.seconds), 1, fixed_horizon=True,
                                   rotation=seed)
            adaptive, blind = round_.runs[0], round_.fixed_horizon
            per_trace[seed] = {"vs_oracle": round(adaptive.mean_ms / round_.oracle_ms, 3),
                               "vs_best_static": round(adaptive.mean_ms / round_.best_static.mean_ms, 3),
                               "fixed_horizon_vs_oracle": round(blind.mean_ms / round_.oracle_ms, 3),
                               "fixed_horizon_vs_best_static": round(blind.mean_ms / round_.best_static.mean_ms, 3),
                               "best_static": round_.best_static.name, "first_split": adaptive.splits[0],
                               "moves": adaptive.moves,
                               "fixed_horizon_moves": len(blind.moves)}
            for at, old, new, seconds, reason in adaptive.moves:
                print(f"{family}-{seed} at {at:.2f} s: split {old} -> {new} in {1e3 * seconds:.0f} ms ({reason})")
        results[family] = {"traces": per_trace}
        row = [family, str(args.count)]
        for key in ("vs_oracle", "vs_best_static", "fixed_horizon_vs_oracle", "fixed_horizon_vs_best_static"):
            ratios = [t[key] for t in per_trace.values()]
            results[family][f"{key}_median"], results[family][f"{key}_worst"] = median(ratios), max(ratios)
            row += [f"{median(ratios):.3f}", f"{max(ratios):.3f}"]
        rows.append(row + [f"{median(len(t['moves']) for t in per_trace.values()):.0f}",
                           f"{median(t['fixed_horizon_moves'] for t in per_trace.values()):.0f}"])
    print(table(["family", "traces", "median", "worst", "median", "worst", "median", "worst", "median", "worst",
                 "moves", "moves"], rows,
                groups=[("", 2), ("adaptive / oracle", 2), ("adaptive / best static", 2),
                        ("fixed horizon / oracle", 2), ("fixed horizon / best static", 2), ("", 2)]))
    report(f"adaptive-families{suffix}-seed{args.seed}", {
        "model": args.model, "policy": args.policy, "cuts": args.cuts, "seconds": args.seconds, "seed": args.seed,
        "count": args.count, "families": results})


@dataclass
class Round:
    """One repeat on one trace: the adaptive run first, then each static split (listed so, whatever order they
    ran in), and the oracle from them."""

    runs: list[Run]
    oracle_ms: float
    oracle_path: list[int]
    best_static: Run
    fixed_horizon: Run | None = None


def median(values) -> float:
    return float(np.median(list(values)))


def median_index(values: list[float]) -> int:
    return int(np.argsort(values)[len(values) // 2])


def summary(rounds: list[Round]) -> dict:
    """Medians over the repeats (each ratio taken within its repeat, so that drift between repeats cancels), and
    the moves of the repeat whose adaptive / oracle ratio is the median one."""
    versus_oracle = [r.runs[0].mean_ms / r.oracle_ms for r in rounds]
    versus_static = [r.runs[0].mean_ms / r.best_static.mean_ms for r in rounds]
    typical = rounds[median_index(versus_oracle)]
    names = [run.name for run in rounds[0].runs[1:]]
    return {
        "adaptive_ms": round(median(r.runs[0].mean_ms for r in rounds), 2),
        "adaptive_p95_ms": round(median(r.runs[0].p95_ms for r in rounds), 2),
        "moves": typical.runs[0].moves,
        "oracle_ms": round(median(r.oracle_ms for r in rounds), 2),
        "oracle_splits": typical.oracle_path,
        "best_static": typical.best_static.name,
        "best_static_ms": round(median(r.best_static.mean_ms for r in rounds), 2),
        "statics_ms": {name: round(median(r.runs[1 + i].mean_ms for r in rounds), 2) for i, name in enumerate(names)},
        "adaptive_vs_oracle": round(median(versus_oracle), 3),
        "adaptive_vs_best_static": round(median(versus_static), 3),
        "adaptive_vs_oracle_each": [round(v, 3) for v in versus_oracle],
        "adaptive_vs_best_static_each": [round(v, 3) for v in versus_static],
    }


if __name__ == "__main__":
    main()
