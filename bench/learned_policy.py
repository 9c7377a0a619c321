"""Training the learned (split, codec) policy against the reward surrogate and against direct evaluation, and how
close each policy, and the model-based planner, comes to the exhaustive optimum.

On the trained preset, profiled as the other benchmarks do (the UE one pinned thread, emulated 30x slower; the
edge two threads): held-out text is analysed at every cut with every codec (``seam analyze``'s code; the
measured table is the truth every choice is scored with), the surrogate is fitted to those cells, and PPO
trains three times: against the surrogate for the full budget and for a small one, and against direct
evaluation (perplexity measured on a short text sample for every decision that sends lossy hidden states) for
the small budget. Each policy and the planner then pick (split, codec) in 500 seeded states (link, loads,
context, quality budget); a pick's reward is divided by the best reward any action reaches in that state.

Direct evaluation at the full budget would take too long to run here; its time is the surrogate run's PPO time
plus that run's quality evaluations at the direct cost per evaluation, measured on the short sample and, as the
paper's direct evaluation does, on the whole analysed text.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict

import numpy as np

from _common import profiled_pair, report, trained_llama

from seam.export.corpus import generate_corpus
from seam.runtime.shell import table
from seam.profiler.quality import Variant, analyze
from seam.profiler.rl import (DirectQuality, against_optimum, evaluation_states, learned_picker, planner_picker,
                         save_policy, surrogate_table, train)
from seam.profiler.surrogate import fit, samples
from seam.runtime.artifact import Artifact
from seam.runtime.codecs import CODECS
from seam.runtime.text import load_tokenizer
from seam.planning.planner import actions
from seam.planning.policy import QualityBudget

ALPHA, BETA = 10.0, 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20000, help="PPO decisions against the surrogate")
    parser.add_argument("--small-steps", type=int, default=1024, help="PPO decisions against direct evaluation")
    parser.add_argument("--tokens", type=int, default=4096, help="held-out tokens analysed (the truth)")
    parser.add_argument("--direct-tokens", type=int, default=256, help="tokens per direct evaluation")
    parser.add_argument("--ue-slowdown", type=float, default=30.0,
                        help="the UE runs this many times slower than this machine (a phone next to an edge box)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    out = trained_llama()
    artifact = Artifact.open(out)
    ue, edge = profiled_pair(out, args.ue_slowdown)
    num_layers = artifact.num_layers
    ids = np.array(load_tokenizer(artifact).encode(generate_corpus(400, seed=7)).ids, dtype=np.int64)
    cuts = [cut for cut in artifact.split_points if 0 < cut < num_layers]
    lossy = [name for name in CODECS if name != "fp32"]
    started = time.perf_counter()
    analysis = analyze(artifact, ids[: args.tokens], cuts, [Variant(f"codec:{name}") for name in lossy], 128, 64)
    full_direct_s = (time.perf_counter() - started) / len(analysis.cells)
    truth = QualityBudget.from_analysis(analysis.cells, math.inf).increase_pct
    (out / "analysis").mkdir(exist_ok=True)
    (out / "analysis" / "held-out.json").write_text(json.dumps(asdict(analysis), indent=1) + "\n")  # for pareto.py

    choices = actions([split for split in ue.split_points if split >= 1], list(CODECS), num_layers)
    surrogate = fit(*samples(analysis.cells, num_layers), num_layers, args.seed)
    table_predicted = surrogate_table(surrogate, choices, num_layers)
    direct = DirectQuality(artifact, ids[-args.direct_tokens:])  # text the truth did not see
    states = evaluation_states(500, args.seed + 1)

    def score(weights) -> dict:
        return against_optimum(learned_picker(weights, choices, table_predicted, num_layers), ue, edge, choices,
                               truth, ALPHA, BETA, states)

    runs = {}
    for name, quality, steps in (("surrogate", surrogate.codec_increase_pct, args.steps),
                                 ("surrogate, small budget", surrogate.codec_increase_pct, args.small_steps),
                                 ("direct, small budget", direct, args.small_steps)):
        weights, training = train(ue, edge, choices, quality, ALPHA, BETA, steps, args.seed)
        runs[name] = {"training": asdict(training), "score": score(weights)}
        print(f"{name}: {steps} decisions in {training.seconds:.1f} s, {training.quality_calls} quality calls",
              flush=True)
        if name == "surrogate":
            policy = save_policy(out / "policies" / "learned", artifact=artifact, choices=choices,
                                 table=table_predicted, alpha=ALPHA, beta=BETA, weights=weights, training=training,
                                 extra={"quality_source": "surrogate", "ue_slowdown": args.ue_slowdown})
    planner = against_optimum(planner_picker(ue, edge, choices, table_predicted, ALPHA, BETA), ue, edge, choices,
                              truth, ALPHA, BETA, states)

    full = runs["surrogate"]["training"]
    small_direct = runs["direct, small budget"]["training"]
    per_call = {"surrogate": full["quality_seconds"] / max(full["quality_calls"], 1),
                "direct sample": small_direct["quality_seconds"] / max(small_direct["quality_calls"], 1),
                "direct whole text": full_direct_s}
    ppo_only_s = full["seconds"] - full["quality_seconds"]
    estimated = {name: ppo_only_s + full["quality_calls"] * seconds for name, seconds in per_call.items()}
    rows = [[name, str(run["training"]["steps"]), f"{run['training']['seconds']:.1f}",
             f"{run['score']['mean_ratio']:.3f}", f"{run['score']['worst_ratio']:.3f}",
             f"{100 * run['score']['within_5pct']:.0f}%"] for name, run in runs.items()]
    rows.append(["planner (surrogate table)", "-", "-", f"{planner['mean_ratio']:.3f}",
                 f"{planner['worst_ratio']:.3f}", f"{100 * planner['within_5pct']:.0f}%"])
    print(table(["trained against", "decisions", "seconds", "reward / optimum", "worst", "within 5%"], rows))
    print("per quality evaluation: " + ", ".join(f"{name} {1e3 * s:.3f} ms" for name, s in per_call.items()))
    print(f"full budget of {args.steps} decisions: surrogate {full['seconds']:.1f} s, direct on the sample "
          f"{estimated['direct sample']:.0f} s (x{estimated['direct sample'] / full['seconds']:.1f}), direct on the "
          f"whole text {estimated['direct whole text']:.0f} s "
          f"(x{estimated['direct whole text'] / full['seconds']:.1f})")
    print(f"policy: {policy}")
    report("learned_policy", {
        "alpha": ALPHA, "beta": BETA, "ue_slowdown": args.ue_slowdown, "actions": len(choices),
        "analysed_tokens": analysis.tokens, "runs": runs, "planner": planner,
        "quality_seconds_per_call": per_call, "estimated_full_budget_seconds": estimated,
        "training_time_ratio": {name: seconds / full["seconds"] for name, seconds in estimated.items()},
    })


if __name__ == "__main__":
    main()
