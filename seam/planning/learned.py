"""``--policy learned`` and ``--policy planner``: the split and codec chosen online by a trained policy file
(``seam train-policy``) or by the model-based planner, under the user's quality budget.

Both see the link as the session estimates it and the compute scales it measures, as the cost-model policy
does, and differ only in how they score the (split, codec) actions: the learned policy by its actor network's
logits (numpy; the UE needs no torch), the planner by the reward ``seam.planning.planner`` computes from the cost
model and the policy file's quality table. Actions the budget rules out, by the table or by a measured
``seam analyze`` when one is given, and codecs the edge does not decode are never picked. The best action
names the split to move to; whether the move pays for itself, and when, is the cost-model policy's test.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seam.planning.cost_model import DeviceModel, Link
from seam.runtime.errors import SeamError
from seam.planning.planner import Objective, evaluate, increase_of, observation
from seam.planning.policy import Constraints, CostModelPolicy, Scales
from seam.planning.snapshot import SessionSnapshot

POLICY_VERSION = 1


@dataclass(frozen=True)
class PolicyFile:
    """A ``seam train-policy`` result: the actions, the quality table, the objective and the actor's weights."""

    root: Path
    artifact_fingerprint: str
    num_layers: int
    actions: list[tuple[int, str]]
    table: dict[tuple[int, str], float]
    alpha: float
    beta: float
    weights: dict[str, np.ndarray]

    @classmethod
    def load(cls, root: Path) -> PolicyFile:
        try:
            meta = json.loads((root / "policy.json").read_text())
            with np.load(root / "actor.npz") as stored:
                weights = {name: stored[name] for name in stored.files}
            if meta["version"] != POLICY_VERSION:
                raise ValueError(f"version {meta['version']}, this Seam reads {POLICY_VERSION}")
            return cls(root, meta["artifact_fingerprint"], meta["num_layers"],
                       [(int(split), str(codec)) for split, codec in meta["actions"]],
                       {(int(cut), str(codec)): float(pct) for cut, codec, pct in meta["quality"]},
                       float(meta["alpha"]), float(meta["beta"]), weights)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise SeamError(f"cannot read the policy {root} ({type(error).__name__}: {error}); "
                            "train one with seam train-policy") from None


def actor_logits(weights: dict[str, np.ndarray], state: np.ndarray) -> np.ndarray:
    """The actor network: linear layers with tanh between them, the last one giving one logit per action."""
    layers = len(weights) // 2
    hidden = state
    for index in range(layers):
        hidden = hidden @ weights[f"w{index}"].T + weights[f"b{index}"]
        if index < layers - 1:
            hidden = np.tanh(hidden)
    return hidden


def allowed_actions(actions: list[tuple[int, str]], table: dict[tuple[int, str], float], max_increase_pct: float,
                    splits: list[int], offered: list[str], num_layers: int) -> np.ndarray:
    """Which actions may be picked: a split the constraints allow, a codec the edge decodes, within the budget."""
    return np.array([
        split in splits and (split >= num_layers or codec in offered)
        and increase_of(table, split, codec, num_layers) <= max_increase_pct
        for split, codec in actions
    ], dtype=bool)


def best_actions(scores: np.ndarray, actions: list[tuple[int, str]], allowed: np.ndarray) -> dict[int, str]:
    """The best allowed codec of each split, the best split first."""
    order = sorted((i for i in range(len(actions)) if allowed[i]), key=lambda i: -scores[i])
    best: dict[int, str] = {}
    for index in order:
        best.setdefault(*actions[index])
    return best


class LearnedPolicy(CostModelPolicy):
    def __init__(self, ue: DeviceModel, edge: DeviceModel, policy: PolicyFile, planner: bool = False,
                 constraints: Constraints = Constraints(), max_increase_pct: float = math.inf,
                 measured: dict[tuple[int, str], float] | None = None):
        super().__init__(ue, edge, constraints)
        self.policy, self.planner = policy, planner
        self.objective = Objective(policy.alpha, policy.beta, max_increase_pct)
        self.table = measured if measured is not None else policy.table  # what the budget is checked against

    def scores(self, snapshot: SessionSnapshot, scales: Scales, link: Link) -> np.ndarray:
        if self.planner:
            scored = evaluate(self.ue, self.edge, link, self.policy.actions, self.table, self.objective,
                              snapshot.past, max(snapshot.batch, 1), scales)
            return np.array([choice.reward for choice in scored])
        state = observation(link, scales, snapshot.past, self.objective.max_increase_pct)
        return actor_logits(self.policy.weights, state)

    def targets(self, snapshot: SessionSnapshot, scales: Scales, candidates: list[int],
                link: Link) -> tuple[list[int], dict[int, str]]:
        """The best allowed action's split, and each split's best allowed codec, scored on ``link``: the link
        the move test prices the move on (its downlink cut as the link's state fell)."""
        num_layers = snapshot.artifact.num_layers
        allowed = allowed_actions(self.policy.actions, self.table, self.objective.max_increase_pct, candidates,
                                  list(snapshot.offered_codecs), num_layers)
        if not allowed.any():
            return [snapshot.split], {}
        best = best_actions(self.scores(snapshot, scales, link), self.policy.actions, allowed)
        return [next(iter(best))], {split: codec for split, codec in best.items() if split < num_layers}
