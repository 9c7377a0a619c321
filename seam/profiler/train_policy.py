"""``seam train-policy DIR --quality ANALYSIS --edge-profile P``: fits the reward surrogate to a ``seam analyze``
result, trains a PPO policy over (split, codec) against it (or, with ``--direct-text``, against perplexity
measured at every step), scores it and the planner against the exhaustive optimum, and saves the policy file
``ue_client --policy learned`` runs.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from seam.runtime.errors import SeamError
from seam.runtime.shell import number


def add_train_policy_parser(commands) -> None:
    parser = commands.add_parser("train-policy", help="train the learned (split, codec) policy with PPO")
    parser.add_argument("directory", type=Path, help="an exported artifact")
    parser.add_argument("--quality", type=Path, required=True, help="a 'seam analyze' result of the artifact")
    parser.add_argument("--edge-profile", type=Path, required=True, help="the edge's profile")
    parser.add_argument("--ue-profile", type=Path, default=None,
                        help="the UE's profile (default: this device's cached 'seam profile')")
    parser.add_argument("--ue-slowdown", type=number(float, 0, above=True), default=1.0,
                        help="scale the UE profile this many times slower")
    parser.add_argument("--alpha", type=number(float, 0), default=10.0, help="weight of the quality term (default 10)")
    parser.add_argument("--beta", type=number(float, 0, above=True), default=1.0, help="weight of the speed-up term (default 1)")
    parser.add_argument("--steps", type=number(int, 1), default=20000, help="decisions to train on (default 20000)")
    parser.add_argument("--direct-text", type=Path, default=None,
                        help="train against perplexity measured on this text at every step instead of the surrogate")
    parser.add_argument("--direct-tokens", type=number(int, 2), default=256,
                        help="tokens of --direct-text per measurement")
    parser.add_argument("--seed", type=number(int, 0), default=0)
    parser.add_argument("--out", type=Path, default=None, help="the policy directory (default DIR/policies/learned)")
    parser.set_defaults(handler=run_train_policy, extra="rl")


def run_train_policy(args: argparse.Namespace) -> int:
    from seam.profiler.rl import (DirectQuality, against_optimum, evaluation_states, learned_picker, planner_picker,
                             save_policy, surrogate_table, train)
    from seam.profiler.surrogate import fit, samples
    from seam.runtime.artifact import Artifact
    from seam.runtime.codecs import CODECS
    from seam.planning.loading import cached_profile, device_models, read_cells
    from seam.planning.planner import actions
    from seam.planning.policy import QualityBudget

    artifact = Artifact.open(args.directory)
    cells = read_cells(args.quality)
    measured = QualityBudget.from_analysis(cells, math.inf).increase_pct
    ue_path = args.ue_profile or cached_profile(artifact, None)
    if ue_path is None:
        raise SeamError("no UE profile: give --ue-profile, or run 'seam profile' on this device first")
    ue, edge = device_models(artifact, ue_path, args.edge_profile, args.ue_slowdown)
    num_layers = artifact.num_layers
    choices = actions([split for split in ue.split_points if split >= 1], list(CODECS), num_layers)
    if len(choices) < 2:
        raise SeamError(f"{artifact.root} has no inner cut to choose; export it with --cuts")
    surrogate = fit(*samples(cells, num_layers), num_layers, args.seed)
    table = surrogate_table(surrogate, choices, num_layers)
    if args.direct_text is None:
        quality, source = surrogate.codec_increase_pct, "surrogate"
    else:
        from seam.profiler.quality import read_text
        from seam.runtime.text import load_tokenizer

        ids = load_tokenizer(artifact).encode(read_text(args.direct_text)).ids[: args.direct_tokens]
        if len(ids) < 2:
            raise SeamError(f"--direct-text {args.direct_text} encodes to fewer than two tokens; give a longer text")
        quality, source = DirectQuality(artifact, np.array(ids, dtype=np.int64)), "direct"
    print(f"training PPO on {len(choices)} (split, codec) actions for {args.steps} decisions against the {source} ...")
    weights, training = train(ue, edge, choices, quality, args.alpha, args.beta, args.steps, args.seed)
    states = evaluation_states(500, args.seed + 1)
    scores = {
        "learned": against_optimum(learned_picker(weights, choices, table, num_layers), ue, edge, choices, measured,
                                   args.alpha, args.beta, states),
        "planner": against_optimum(planner_picker(ue, edge, choices, table, args.alpha, args.beta), ue, edge,
                                   choices, measured, args.alpha, args.beta, states),
    }
    out = save_policy(args.out or artifact.root / "policies" / "learned", artifact=artifact, choices=choices,
                      table=table, alpha=args.alpha, beta=args.beta, weights=weights, training=training,
                      extra={"quality_source": source, "scores": scores})
    per_call = training.quality_seconds / max(training.quality_calls, 1)
    print(f"trained in {training.seconds:.1f} s ({training.quality_calls} quality evaluations, "
          f"{1e3 * per_call:.2f} ms each)")
    for name, score in scores.items():
        print(f"{name}: reward {score['mean_ratio']:.3f} of the exhaustive optimum on average "
              f"(worst {score['worst_ratio']:.3f}, {100 * score['within_5pct']:.0f}% of states within 5%), "
              "scored with the measured analysis")
    print(f"policy: {out}")
    return 0
