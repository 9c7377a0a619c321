"""What an adaptive run carries beside its steps, on one generated link trace: a static split, the same split with
the background prober running (a policy that never decides), with the policy deciding before every step but its
decisions dropped, the adaptive policy, and the adaptive policy with every span it may run joined before the
prompt (as a long-lived process holds them). All in one process, interleaved per repeat; ratios to the static run
are taken within a repeat and the median reported.

The setting is ``bench/adaptive.py``'s: small-llama cut at 1, 4 and 8, the edge on two threads, the UE on one
pinned CPU and 4x slower, the trace compressed to ``--seconds``.
"""

from __future__ import annotations

import argparse
import statistics

import psutil

from _common import profiled_pair, report, work_export
from adaptive import compressed, run_once

from seam.edge_server.process import edge_server
from seam.planning.policy import Constraints, CostModelPolicy
from seam.runtime.artifact import Artifact
from seam.runtime.shell import table
from seam.runtime.trace_families import family_trace


class Undecided:
    """A policy whose decisions never move the split: with ``inner`` it still decides before every step."""

    def __init__(self, candidates, inner: CostModelPolicy | None = None):
        self.candidates, self.inner = candidates, inner

    def __call__(self, snapshot):
        if self.inner is not None:
            self.inner(snapshot)
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--family", default="wifi")
    parser.add_argument("--seed", type=int, default=3000)
    parser.add_argument("--split", type=int, default=1, help="the static split (the family's best, for a fair ratio)")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()

    out = work_export("small-llama-cuts-1_4_8", "small-llama", cuts="1,4,8")
    artifact = Artifact.open(out)
    ue, edge = profiled_pair(out, 4.0)
    trace = compressed(family_trace(args.family, args.seed), args.seconds)

    def policy() -> CostModelPolicy:
        return CostModelPolicy(ue, edge, Constraints(min_ue_layers=1))

    kinds = {
        "static": lambda: (None, False),
        "prober only": lambda: (Undecided(policy().candidates), False),
        "policy, decisions dropped": lambda: (Undecided(policy().candidates, policy()), False),
        "adaptive": lambda: (policy(), False),
        "adaptive, spans joined first": lambda: (policy(), True),
    }
    means = {kind: [] for kind in kinds}
    moves = {kind: [] for kind in kinds}
    with open("/dev/null", "w") as quiet, edge_server(out, "--threads", "2", log=quiet) as (_, address):
        psutil.Process().cpu_affinity([0])  # after the server started: it keeps both CPUs
        for _ in range(args.repeats):
            for kind, make in kinds.items():
                chosen, join_first = make()
                run = run_once(kind, artifact, address, trace, args.seconds, args.split, 4.0, chosen, join_first)
                means[kind].append(run.mean_ms)
                moves[kind].append(len(run.moves))
    rows, result = [], {}
    for kind, values in means.items():
        ratios = [value / static for value, static in zip(values, means["static"])]
        result[kind] = {"ms_per_token": round(statistics.median(values), 2),
                        "vs_static": round(statistics.median(ratios), 3), "each": [round(r, 3) for r in ratios],
                        "moves": moves[kind]}
        rows.append([kind, f"{statistics.median(values):.1f}", f"{statistics.median(ratios):.3f}",
                     " ".join(f"{r:.3f}" for r in ratios), "/".join(map(str, moves[kind]))])
    print(table(["run", "ms/token", "/ static", "each repeat", "moves"], rows))
    report(f"policy_overhead-{args.family}-{args.seed}", {"family": args.family, "seed": args.seed,
                                                          "split": args.split, "seconds": args.seconds,
                                                          "repeats": args.repeats, "runs": result})


if __name__ == "__main__":
    main()
