"""Resource allocation for split fine-tuning, in simulation over seeded random drops of users: FedsLLM's band
shares and cut layers against equal bandwidth and a fixed cut, and DASHF's association and allocation against
random association, equal bandwidth and a fixed offloading ratio. No model runs; the workloads are those of the
model sizes below, the radio a cell with log-distance path loss and shadowing.

FedsLLM (the paper's setup is unverified): 10 UEs in a disc of 500 m around the edge, 20 MHz, 23 dBm, a 12-layer
model of hidden size 768 (about GPT-2 small) fine-tuned with rank-8 LoRA on the query and value projections,
8 samples of 128 tokens per local iteration, fp16 activations at the cut, I = 10·ln(1/0.1) local iterations.
UEs compute at 0.05-2 TFLOP/s (log-uniform, phones to laptops), the edge at 10 TFLOP/s shared by the UEs.
Compared at the same drop: equal shares at a fixed cut (half the layers on the UE), optimal shares at that cut
(the paper's comparison: 47.63% less delay on average), the optimal common cut, and a cut per UE; and equal
against optimal shares at the planned cuts.

DASHF (the paper's setup: 10 users, 2 servers; the rest is unverified): servers 500 m apart, 10 MHz and
20 TFLOP/s each, room for 6 users each; a 32-layer model of hidden size 4096 (about Llama-2-7B), each user training
the adapters of 2 layers and its server a share of the 30 others, on 4-16 samples of 128 tokens per round.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from _common import RESULTS, report

from seam.runtime.shell import table
from seam.finetune.dashf import DashfSetup, Fixed, dinkelbach, evaluate, plain, random_association
from seam.finetune.fedsllm import FedsllmSetup, equal_shares, local_iterations, plan, solve_cvxpy

NOISE_W_PER_HZ = 10 ** (-174 / 10) / 1e3  # -174 dBm/Hz
TOKENS = 128
FP16_BITS = 16


def layer_flop(hidden: int) -> float:
    """FLOPs of one decoder layer per sample, forward and backward with frozen weights: 4 x parameters x tokens
    (the backward pass computes activation gradients, not weight gradients; LoRA's own share is negligible)."""
    return 4 * 12 * hidden ** 2 * TOKENS


def lora_bits(hidden: int, rank: int = 8) -> float:
    """One layer's rank-r LoRA adapters on the query and value projections, in fp16."""
    return 2 * 2 * hidden * rank * FP16_BITS


def path_gains(rng: np.random.Generator, distance_m: np.ndarray) -> np.ndarray:
    """128.1 + 37.6·log10(d/km) dB path loss with 8 dB log-normal shadowing."""
    loss_db = 128.1 + 37.6 * np.log10(np.maximum(distance_m, 20) / 1e3) + rng.normal(0, 8, distance_m.shape)
    return 10 ** (-loss_db / 10)


def fedsllm_drop(rng: np.random.Generator, users: int = 10, layers: int = 12, hidden: int = 768) -> FedsllmSetup:
    distance = 500 * np.sqrt(rng.uniform(0, 1, users))  # uniform over the disc
    ue_flops = 10 ** rng.uniform(np.log10(5e10), np.log10(2e12), users)
    edge_flops_per_ue = 10e12 / users
    return FedsllmSetup(
        ue_layer_s=np.outer(layer_flop(hidden) / ue_flops, np.ones(layers)),
        edge_layer_s=np.full(layers, layer_flop(hidden) / edge_flops_per_ue),
        cut_bits=np.full(layers, TOKENS * hidden * FP16_BITS),
        adapter_bits=np.full(layers, lora_bits(hidden)),
        samples=np.full(users, 8.0),
        gains=path_gains(rng, distance),
        powers_w=np.full(users, 0.2),
        noise_w_per_hz=NOISE_W_PER_HZ,
        bandwidth_hz=20e6,
        iterations=local_iterations(0.1, 10),
    )


def dashf_drop(rng: np.random.Generator, users: int = 10, hidden: int = 4096) -> DashfSetup:
    where = np.c_[rng.uniform(-500, 500, users), rng.uniform(-250, 250, users)]
    servers = np.array([[-250.0, 0.0], [250.0, 0.0]])
    samples = rng.integers(4, 17, users)
    return DashfSetup(
        gains=path_gains(rng, np.linalg.norm(where[:, None] - servers[None], axis=2)),
        powers_w=np.full(users, 0.2),
        upload_bits=samples * TOKENS * hidden * FP16_BITS + 2 * lora_bits(hidden),
        local_flop=samples * 2 * layer_flop(hidden),
        server_flop=samples * 30 * layer_flop(hidden),
        top_flops=10 ** rng.uniform(np.log10(2e11), np.log10(2e12), users),
        energy_coeff=np.full(users, 1e-36),
        quality=rng.uniform(1, 2, users),
        server_flops=np.full(2, 20e12),
        bandwidth_hz=np.full(2, 10e6),
        capacity=np.full(2, 6),
        noise_w_per_hz=NOISE_W_PER_HZ,
    )


def summary(values) -> dict:
    return {"mean": round(float(np.mean(values)), 4), "median": round(float(np.median(values)), 4),
            "min": round(float(np.min(values)), 4), "max": round(float(np.max(values)), 4)}


def run_fedsllm(drops: int, seed: int) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    rounds = {name: [] for name in ("unoptimised", "optimal shares, fixed cut", "optimal common cut", "cut per UE",
                                    "equal shares, planned cuts")}
    disagreement, example = 0.0, None
    for _ in range(drops):
        setup = fedsllm_drop(rng)
        fixed_cut = setup.edge_layer_s.size // 2
        equal = equal_shares(setup, fixed_cut)
        shares_only = plan(setup, fixed_cut)
        common = plan(setup, common_cut=True)
        per_ue = plan(setup)
        for name, result in zip(rounds, (equal, shares_only, common, per_ue, equal_shares(setup, per_ue.cuts))):
            rounds[name].append(result.round_s)
        for checked_plan in (shares_only, per_ue):
            conic = solve_cvxpy(setup, checked_plan.cuts)
            disagreement = max(disagreement, abs(conic.round_s - checked_plan.round_s) / checked_plan.round_s)
        if example is None:
            example = {"gains_db": 10 * np.log10(setup.gains), "equal": equal, "optimal": shares_only}
    as_array = {name: np.array(values) for name, values in rounds.items()}
    base = as_array["unoptimised"]
    reductions = {
        "bandwidth_vs_equal_at_fixed_cut": 1 - as_array["optimal shares, fixed cut"] / base,
        "cut_vs_fixed_cut_at_optimal_shares":
            1 - as_array["optimal common cut"] / as_array["optimal shares, fixed cut"],
        "cut_per_ue_vs_common_cut": 1 - as_array["cut per UE"] / as_array["optimal common cut"],
        "full_plan_vs_unoptimised": 1 - as_array["cut per UE"] / base,
        "bandwidth_vs_equal_at_planned_cuts": 1 - as_array["cut per UE"] / as_array["equal shares, planned cuts"],
    }
    result = {
        "drops": drops, "users": 10,
        "round_s": {name: summary(values) for name, values in as_array.items()},
        "delay_reduction": {name: summary(values) for name, values in reductions.items()},
        "cvxpy_vs_bisection_max_relative_difference": float(f"{disagreement:.3g}"),
    }
    return result, {"reductions": reductions, "example": example}


def run_dashf(drops: int, seed: int) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    schemes = ("DASHF", "random association", "equal bandwidth", "fixed offloading 0.5", "unoptimised")
    ratios = {name: [] for name in schemes}
    iterations, relaxation_gaps, traces = [], [], []
    for _ in range(drops):
        setup = dashf_drop(rng)
        randomly = random_association(setup, rng)
        best = dinkelbach(setup, rng)
        ratios["DASHF"].append(best.ratio)
        ratios["random association"].append(dinkelbach(setup, rng, Fixed(association=randomly)).ratio)
        ratios["equal bandwidth"].append(dinkelbach(setup, rng, Fixed(equal_bandwidth=True)).ratio)
        ratios["fixed offloading 0.5"].append(dinkelbach(setup, rng, Fixed(offload=0.5)).ratio)
        ratios["unoptimised"].append(evaluate(setup, plain(setup, randomly)).ratio)
        iterations.append(len(best.lambdas))
        relaxation_gaps += best.relaxation_gaps
        traces.append((np.array(best.lambdas) / best.ratio, np.array(best.gaps)))
    as_array = {name: np.array(values) for name, values in ratios.items()}
    result = {
        "drops": drops, "users": 10, "servers": 2,
        "service_cost_ratio": {name: summary(values) for name, values in as_array.items()},
        "dashf_gain_over": {name: summary(as_array["DASHF"] / values - 1) for name, values in as_array.items()
                            if name != "DASHF"},
        "dinkelbach_iterations": {"mean": round(statistics.mean(iterations), 2), "max": max(iterations)},
        "relaxation_gap": summary(relaxation_gaps),
    }
    return result, {"ratios": as_array, "traces": traces}


def plot_fedsllm(data: dict, path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    for name, values in data["reductions"].items():
        ordered = np.sort(100 * values)
        left.plot(ordered, np.arange(1, ordered.size + 1) / ordered.size, label=name.replace("_", " "))
    left.axvline(47.63, color="black", ls="--", lw=0.8, label="FedsLLM paper: 47.63% (mean)")
    left.set(xlabel="round delay reduction, %", ylabel="fraction of drops", title="FedsLLM: delay reduction per drop")
    left.legend(fontsize="x-small")
    example = data["example"]
    order = np.argsort(example["gains_db"])
    ues = np.arange(order.size)
    right.bar(ues, example["optimal"].shares[order], color="lightgrey", label="optimal band share")
    right.axhline(1 / order.size, color="grey", ls=":", label="equal band share")
    right.set(xlabel="UE, by channel gain (dB)", ylabel="band share", title="one drop at the fixed cut")
    right.set_xticks(ues, [f"{gain:.0f}" for gain in example["gains_db"][order]], fontsize="small")
    delays = right.twinx()
    delays.plot(ues, example["equal"].delays_s[order], "o-", color="tab:blue", label="delay, equal shares")
    delays.plot(ues, example["optimal"].delays_s[order], "s-", color="tab:orange", label="delay, optimal shares")
    delays.set_ylabel("round delay, s")
    right.legend(loc="upper left", fontsize="x-small")
    delays.legend(loc="upper right", fontsize="x-small")
    figure.savefig(path, dpi=110)


def plot_dashf(data: dict, path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(13, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    bars, ratio, gap = figure.subplots(1, 3)
    names = list(data["ratios"])
    values = [data["ratios"][name] for name in names]
    bars.bar(range(len(names)), [v.mean() for v in values], yerr=[v.std() for v in values], capsize=3)
    bars.set_xticks(range(len(names)), [name.replace(" ", "\n") for name in names], fontsize="small")
    bars.set(ylabel="service-cost ratio (mean ± sd)", title="DASHF against baselines, 10 users, 2 servers")
    for lambdas, gaps in data["traces"]:
        ratio.plot(range(lambdas.size), lambdas, "o-", lw=0.8, ms=3, alpha=0.6)
        gap.semilogy(range(gaps.size), np.maximum(gaps, 1e-12), "o-", lw=0.8, ms=3, alpha=0.6)
    for axis in (ratio, gap):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    ratio.set(xlabel="Dinkelbach iteration", ylabel="lambda / final ratio", title="lambda per iteration, each drop")
    gap.set(xlabel="Dinkelbach iteration", ylabel="F(lambda)", title="F(lambda) per iteration (floored at 1e-12)")
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fedsllm-drops", type=int, default=200)
    parser.add_argument("--dashf-drops", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    started = time.perf_counter()
    fedsllm, fedsllm_data = run_fedsllm(args.fedsllm_drops, args.seed)
    dashf, dashf_data = run_dashf(args.dashf_drops, args.seed)
    RESULTS.mkdir(exist_ok=True)
    plot_fedsllm(fedsllm_data, RESULTS / "allocation-fedsllm.png")
    plot_dashf(dashf_data, RESULTS / "allocation-dashf.png")

    print(table(["FedsLLM, round delay reduction", "mean", "median"],
                [[name.replace("_", " "), f"{100 * v['mean']:.1f}%", f"{100 * v['median']:.1f}%"]
                 for name, v in fedsllm["delay_reduction"].items()]))
    print(f"cvxpy against bisection: largest relative difference "
          f"{fedsllm['cvxpy_vs_bisection_max_relative_difference']:.1e}\n")
    gains = {name: f"{100 * v['mean']:+.1f}%" for name, v in dashf["dashf_gain_over"].items()}
    print(table(["DASHF scheme", "mean SCR", "DASHF gain (mean)"],
                [[name, f"{v['mean']:.4f}", gains.get(name, "-")] for name, v in dashf["service_cost_ratio"].items()]))
    print(f"Dinkelbach iterations: mean {dashf['dinkelbach_iterations']['mean']}, "
          f"max {dashf['dinkelbach_iterations']['max']}; relaxation gap: mean {dashf['relaxation_gap']['mean']:.3f}")
    report("allocation", {
        "seed": args.seed,
        "seconds": round(time.perf_counter() - started, 1),
        "fedsllm": fedsllm,
        "dashf": dashf,
    })


if __name__ == "__main__":
    main()
