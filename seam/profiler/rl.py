"""Training a split policy with PPO (stable-baselines3 on a gymnasium environment; the ``rl`` extra), and
saving it as a policy file the UE runs without torch.

The environment is the paper's, in Seam's terms: a state is the link as the steps see it, how loaded each side
is, the context length and the user's quality budget; an action is a (split, codec); the reward is the
planner's (``seam.planning.planner.Objective``), latency from the cost model over the two device profiles and
quality from a quality function. That function is either the reward surrogate, microseconds a call, or a
direct evaluation that runs the split model's perplexity on a text sample for every action, which is what
training without a surrogate costs. The runtime prices and gates every move itself, so a decision does not
change the next state and each episode is one decision (a contextual bandit, which PPO learns like any task).

The policy file is a directory: ``policy.json`` (the actions, the quality table the surrogate predicts for
them, the objective and how training went) and ``actor.npz``, the weights of the actor network, which the UE
evaluates in numpy (``seam.planning.learned``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from seam.planning.cost_model import DeviceModel, Link
from seam.runtime.artifact import Artifact
from seam.runtime.executor import SessionPool
from seam.runtime.files import write_directory_atomically
from seam.planning.learned import POLICY_VERSION, actor_logits, allowed_actions, best_actions
from seam.planning.planner import LOSSLESS, OBSERVATION_SIZE, Objective, evaluate, observation, plan
from seam.planning.policy import Scales

HIDDEN = (64, 64)
QualityFunction = Callable[[int, str], float]  # (cut, codec) -> perplexity increase in %


@dataclass(frozen=True)
class State:
    link: Link
    scales: Scales
    context: int
    max_increase_pct: float


@dataclass(frozen=True)
class StateRanges:
    """Where training states are drawn from: rates and the edge's load log-uniformly, since a policy must be as
    right at 0.1 Mbit/s as at 100."""

    up_mbit: tuple[float, float] = (0.02, 200.0)
    down_over_up: tuple[float, float] = (1.0, 4.0)
    rtt_ms: tuple[float, float] = (1.0, 100.0)
    edge_scale: tuple[float, float] = (1.0, 8.0)  # an edge serving other UEs runs each step slower
    ue_scale: tuple[float, float] = (0.7, 1.5)
    context: tuple[int, int] = (16, 512)
    budgets_pct: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 100.0)

    def sample(self, rng: np.random.Generator) -> State:
        def log_uniform(bounds: tuple[float, float]) -> float:
            return float(math.exp(rng.uniform(math.log(bounds[0]), math.log(bounds[1]))))

        up = log_uniform(self.up_mbit)
        link = Link.from_mbit(up * rng.uniform(*self.down_over_up), log_uniform(self.rtt_ms), up)
        scales = Scales(ue=float(rng.uniform(*self.ue_scale)), edge=log_uniform(self.edge_scale))
        return State(link, scales, int(rng.integers(*self.context, endpoint=True)), float(rng.choice(self.budgets_pct)))


def make_env(ue: DeviceModel, edge: DeviceModel, choices: Sequence[tuple[int, str]], quality: QualityFunction,
             alpha: float, beta: float, ranges: StateRanges = StateRanges(), seed: int = 0):
    """The training environment (a ``gymnasium.Env``); gymnasium is imported here so the module loads without it."""
    import gymnasium

    num_layers = ue.split_points[-1]

    class SplitEnv(gymnasium.Env):
        observation_space = gymnasium.spaces.Box(-10.0, 10.0, (OBSERVATION_SIZE,), np.float32)
        action_space = gymnasium.spaces.Discrete(len(choices))

        def __init__(self):
            self.rng = np.random.default_rng(seed)
            self.state = ranges.sample(self.rng)

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            if seed is not None:
                self.rng = np.random.default_rng(seed)
            self.state = ranges.sample(self.rng)
            return observation(self.state.link, self.state.scales, self.state.context,
                               self.state.max_increase_pct), {}

        def step(self, action):
            split, codec = choices[int(action)]
            lossy = split < num_layers and codec != LOSSLESS
            table = {(split, codec): quality(split, codec)} if lossy else {}
            objective = Objective(alpha, beta, self.state.max_increase_pct)
            chosen, = evaluate(ue, edge, self.state.link, [(split, codec)], table, objective, self.state.context,
                               scales=self.state.scales)
            return self.reset()[0], chosen.reward, True, False, {}

    return SplitEnv()


class DirectQuality:
    """The quality function without a surrogate: every call measures the perplexity increase of ``codec`` at
    ``cut`` on a text sample through the runtime's blocks, the unsplit baseline included."""

    def __init__(self, artifact: Artifact, ids: np.ndarray, window: int = 128, stride: int = 64):
        self.artifact, self.ids, self.window, self.stride = artifact, ids, window, stride
        self.pool = SessionPool(artifact)

    def __call__(self, cut: int, codec: str) -> float:
        from seam.profiler.quality import Variant, analyze

        report = analyze(self.artifact, self.ids, [cut], [Variant(f"codec:{codec}")], self.window, self.stride,
                         pool=self.pool)
        return report.cells[0]["increase_pct"]


@dataclass
class Training:
    steps: int
    seconds: float
    quality_calls: int
    quality_seconds: float


def train_ppo(env, steps: int, seed: int = 0) -> tuple[object, Training]:
    """PPO on ``env`` for ``steps`` decisions; returns the model and what training took."""
    import torch
    from stable_baselines3 import PPO

    torch.set_num_threads(1)  # networks this small only lose time to threads
    model = PPO("MlpPolicy", env, n_steps=256, batch_size=64, n_epochs=10, learning_rate=1e-3, gamma=0.0,
                ent_coef=0.01, seed=seed, device="cpu", verbose=0,
                policy_kwargs={"net_arch": {"pi": list(HIDDEN), "vf": list(HIDDEN)}})
    began = time.perf_counter()
    model.learn(total_timesteps=steps)
    return model, Training(steps, time.perf_counter() - began, 0, 0.0)


def actor_weights(model) -> dict[str, np.ndarray]:
    """The actor's layers as arrays: the policy net's linear layers (tanh between) and the action head."""
    import torch

    linears = [m for m in model.policy.mlp_extractor.policy_net if isinstance(m, torch.nn.Linear)]
    linears.append(model.policy.action_net)
    weights = {}
    for index, layer in enumerate(linears):
        weights[f"w{index}"] = layer.weight.detach().numpy().astype(np.float32)
        weights[f"b{index}"] = layer.bias.detach().numpy().astype(np.float32)
    return weights


class Counted:
    """Counts a quality function's calls and the time they take, to split training time into its parts."""

    def __init__(self, quality: QualityFunction):
        self.quality, self.calls, self.seconds = quality, 0, 0.0

    def __call__(self, cut: int, codec: str) -> float:
        began = time.perf_counter()
        try:
            return self.quality(cut, codec)
        finally:
            self.calls += 1
            self.seconds += time.perf_counter() - began


def train(ue: DeviceModel, edge: DeviceModel, choices: Sequence[tuple[int, str]], quality: QualityFunction,
          alpha: float, beta: float, steps: int, seed: int = 0,
          ranges: StateRanges = StateRanges()) -> tuple[dict[str, np.ndarray], Training]:
    counted = Counted(quality)
    model, training = train_ppo(make_env(ue, edge, choices, counted, alpha, beta, ranges, seed), steps, seed)
    training.quality_calls, training.quality_seconds = counted.calls, counted.seconds
    return actor_weights(model), training


def save_policy(out: Path, *, artifact: Artifact, choices: Sequence[tuple[int, str]],
                table: dict[tuple[int, str], float], alpha: float, beta: float, weights: dict[str, np.ndarray],
                training: Training, extra: dict | None = None) -> Path:
    """Writes the policy directory whole or not at all."""

    def write(staging: Path) -> None:
        np.savez(staging / "actor.npz", **weights)
        (staging / "policy.json").write_text(json.dumps({
            "version": POLICY_VERSION,
            "artifact_fingerprint": artifact.manifest.artifact_fingerprint,
            "num_layers": artifact.num_layers,
            "actions": [list(choice) for choice in choices],
            "quality": [[cut, codec, pct] for (cut, codec), pct in sorted(table.items())],
            "alpha": alpha,
            "beta": beta,
            "training": asdict(training),
            **(extra or {}),
        }, indent=1) + "\n")

    return write_directory_atomically(out, write)


def surrogate_table(surrogate, choices: Sequence[tuple[int, str]], num_layers: int) -> dict[tuple[int, str], float]:
    """The surrogate's predicted increase for every lossy choice (the lossless ones cost exactly nothing)."""
    return {(cut, codec): max(surrogate.codec_increase_pct(cut, codec), 0.0)
            for cut, codec in choices if cut < num_layers and codec != LOSSLESS}


Picker = Callable[[State], tuple[int, str]]


def learned_picker(weights: dict[str, np.ndarray], choices: Sequence[tuple[int, str]],
                   table: dict[tuple[int, str], float], num_layers: int) -> Picker:
    """What ``--policy learned`` picks in a state (every split allowed, every codec offered)."""
    splits, codecs = sorted({split for split, _ in choices}), sorted({codec for _, codec in choices})

    def pick(state: State) -> tuple[int, str]:
        allowed = allowed_actions(list(choices), table, state.max_increase_pct, splits, codecs, num_layers)
        logits = actor_logits(weights, observation(state.link, state.scales, state.context, state.max_increase_pct))
        return next(iter(best_actions(logits, list(choices), allowed).items()))

    return pick


def planner_picker(ue: DeviceModel, edge: DeviceModel, choices: Sequence[tuple[int, str]],
                   table: dict[tuple[int, str], float], alpha: float, beta: float) -> Picker:
    """What ``--policy planner`` picks in a state, with ``table`` for quality."""
    def pick(state: State) -> tuple[int, str]:
        chosen = plan(ue, edge, state.link, choices, table, Objective(alpha, beta, state.max_increase_pct),
                      state.context, scales=state.scales)
        return chosen.split, chosen.codec

    return pick


def against_optimum(pick: Picker, ue: DeviceModel, edge: DeviceModel, choices: Sequence[tuple[int, str]],
                    truth: dict[tuple[int, str], float], alpha: float, beta: float,
                    states: Sequence[State]) -> dict[str, float]:
    """The reward of ``pick``'s choices over the exhaustive optimum's, both scored with the ``truth`` table (a
    measured analysis) and the cost model, over ``states``: the mean and worst ratio and the share within 5%."""
    ratios = []
    for state in states:
        scored = evaluate(ue, edge, state.link, choices, truth, Objective(alpha, beta, state.max_increase_pct),
                          state.context, scales=state.scales)
        picked = scored[list(choices).index(pick(state))]
        ratios.append(picked.reward / max(choice.reward for choice in scored))
    return {"mean_ratio": float(np.mean(ratios)), "worst_ratio": float(np.min(ratios)),
            "within_5pct": float(np.mean(np.array(ratios) >= 0.95))}


def evaluation_states(count: int, seed: int, ranges: StateRanges = StateRanges()) -> list[State]:
    rng = np.random.default_rng(seed)
    return [ranges.sample(rng) for _ in range(count)]
