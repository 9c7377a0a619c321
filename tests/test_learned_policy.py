"""The reward, the model-based planner and the PPO-trained policy: pure functions on synthetic profiles, training
against a known quality table, and ``seam train-policy`` then ``ue_client --policy learned`` end to end."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from conftest import run_seam
from seam.edge_server.process import edge_server
from seam.planning.cost_model import DeviceModel, Link
from seam.runtime.artifact import Artifact
from test_cost_model import device
from test_policy import synthetic_profiles, ue_client
from seam.planning.learned import PolicyFile, actor_logits, allowed_actions, best_actions
from seam.planning.planner import Objective, actions, evaluate, increase_of, observation, plan
from seam.planning.policy import Scales

CODECS = ["fp32", "fp16", "bf16", "int8", "int4"]
HIDDEN = 4096  # wide enough that the bytes on the link matter
TABLE = {(cut, codec): pct for cut in (1, 2, 3) for codec, pct in
         (("fp16", 0.01), ("bf16", 0.05), ("int8", 0.2), ("int4", 1.5 * cut))}  # deeper cuts suffer more from int4


def models(ue_scale: float = 20.0, edge_scale: float = 1.0) -> tuple[DeviceModel, DeviceModel]:
    return (DeviceModel.from_profile(device(ue_scale, hidden=HIDDEN, name="ue")),
            DeviceModel.from_profile(device(edge_scale, hidden=HIDDEN, name="edge")))


def test_the_reward_weighs_quality_against_speed_and_zeroes_what_breaks_the_budget():
    objective = Objective(alpha=10, beta=1, max_increase_pct=1.0)
    assert objective.reward(0.0, 0.01, 0.01) == pytest.approx(1.0)  # running alone scores beta
    assert objective.reward(0.0, 0.005, 0.01) == pytest.approx(2.0)  # twice as fast
    assert objective.reward(0.5, 0.005, 0.01) == pytest.approx(2.0 - 10 * 0.005)
    assert objective.reward(1.5, 0.001, 0.01) == 0.0  # beyond the budget: worse than staying alone


def test_the_planner_trades_bytes_for_quality_as_the_link_and_budget_change():
    ue, edge = models()
    choices = actions([1, 2, 3, 4], CODECS, 4)
    assert len(choices) == 3 * len(CODECS) + 1  # at split 4 nothing crosses: one action

    def planned(mbit: float, budget: float = math.inf):
        return plan(ue, edge, Link.from_mbit(mbit, 5), choices, TABLE, Objective(10, 1, budget), context=128)

    slow = planned(2)
    assert (slow.split, slow.codec) == (1, "int4")  # the bytes dominate: the fewest, at the cheapest cut
    assert planned(2, budget=1.0).codec == "int8"  # int4 costs 1.5% at cut 1: out of the budget
    assert planned(20).codec == "int8"  # a faster link: int4 saves too little for what it costs
    fast = planned(1e5)
    assert fast.split < 4 and fast.codec == "fp32"  # bytes are free: nothing lost
    assert planned(0.1).split == 4  # no link worth using
    for mbit in (0.01, 1, 20, 1e5):  # the planner is the exhaustive search
        scored = evaluate(ue, edge, Link.from_mbit(mbit, 5), choices, TABLE, Objective(), 128)
        assert planned(mbit).reward == max(choice.reward for choice in scored)


def test_actions_beyond_the_budget_or_the_edge_are_never_picked():
    choices = actions([1, 2, 4], CODECS, 4)
    allowed = allowed_actions(choices, TABLE, 0.1, [1, 4], ["fp32", "fp16", "int4"], 4)
    picked = {choice for choice, ok in zip(choices, allowed) if ok}
    assert picked == {(1, "fp32"), (1, "fp16"), (4, "fp32")}
    assert increase_of(TABLE, 2, "int4", 4) == 3.0 and increase_of({}, 2, "int4", 4) == math.inf
    scores = np.arange(len(choices), dtype=float)  # later actions score higher
    assert list(best_actions(scores, choices, allowed).items()) == [(4, "fp32"), (1, "fp16")]


def test_the_observation_folds_the_measured_network_scale_into_the_link():
    link = Link.from_mbit(10, 20)
    seen = observation(link, Scales(network=10), 128, math.inf)
    assert seen == pytest.approx(observation(Link.from_mbit(1, 200), Scales(), 128, math.inf))
    assert seen[0] == pytest.approx(0.0) and seen[2] == pytest.approx(math.log10(200))


def test_ppo_learns_to_pick_what_the_exhaustive_search_picks(tmp_path):
    pytest.importorskip("stable_baselines3", reason="the rl extra (stable-baselines3, gymnasium) is not installed")
    from seam.profiler.rl import against_optimum, evaluation_states, learned_picker, planner_picker, train

    ue, edge = models()
    choices = actions([1, 2, 3, 4], CODECS, 4)
    weights, training = train(ue, edge, choices, lambda cut, codec: TABLE[cut, codec], 10, 1, steps=4096, seed=0)
    states = evaluation_states(200, seed=1)
    learned = against_optimum(learned_picker(weights, choices, TABLE, 4), ue, edge, choices, TABLE, 10, 1, states)
    planner = against_optimum(planner_picker(ue, edge, choices, TABLE, 10, 1), ue, edge, choices, TABLE, 10, 1, states)

    assert training.steps == 4096 and 0 < training.quality_calls <= 4096
    assert planner == {"mean_ratio": 1.0, "worst_ratio": 1.0, "within_5pct": 1.0}  # same table: the optimum
    assert learned["mean_ratio"] > 0.95, learned
    untrained = {name: np.zeros_like(value) for name, value in weights.items()}  # picks the first allowed action
    blind = against_optimum(learned_picker(untrained, choices, TABLE, 4), ue, edge, choices, TABLE, 10, 1, states)
    assert blind["mean_ratio"] < learned["mean_ratio"] - 0.1


def quality_file(tmp_path, cuts) -> str:
    cells = [{"cut": cut, "variant": f"codec:{codec}", "kind": "codec", "increase_pct": TABLE[min(cut, 3), codec]}
             for cut in cuts for codec in CODECS[1:]]
    path = tmp_path / "quality.json"
    path.write_text(json.dumps({"cells": cells}))
    return str(path)


def test_a_trained_policy_file_drives_ue_client_within_the_budget(exported, tmp_path):
    pytest.importorskip("stable_baselines3", reason="the rl extra (stable-baselines3, gymnasium) is not installed")
    artifact = Artifact.open(exported("tiny-llama"))
    paths = synthetic_profiles(artifact, tmp_path, ue_scale=50.0, edge_scale=0.1)
    quality = quality_file(tmp_path, [cut for cut in artifact.split_points if 0 < cut < artifact.num_layers])
    policy = tmp_path / "policy"
    trained = run_seam("train-policy", str(artifact.root), "--quality", quality, "--ue-profile", paths["ue"],
                       "--edge-profile", paths["edge"], "--steps", "1024", "--out", str(policy))
    assert trained.returncode == 0, trained.stderr
    assert re.search(r"learned: reward \d\.\d+ of the exhaustive optimum", trained.stdout), trained.stdout
    loaded = PolicyFile.load(policy)
    assert loaded.artifact_fingerprint == artifact.manifest.artifact_fingerprint
    assert actor_logits(loaded.weights, np.zeros(7, np.float32)).shape == (len(loaded.actions),)

    # More tokens than the other policy tests: a step slowed by a busy machine can hold a move back a few steps.
    profiles = ("--ue-profile", paths["ue"], "--edge-profile", paths["edge"], "--policy-file", str(policy),
                "--max-new-tokens", "16")
    with edge_server(artifact.root) as (_, address):
        static = ue_client(artifact, address, "--split", "3", "--policy", "static", "--max-new-tokens", "16")
        lossless = ue_client(artifact, address, "--split", "3", "--policy", "learned", *profiles, "--quality",
                             quality, "--max-ppl-increase", "0")
        coded = ue_client(artifact, address, "--split", "3", "--policy", "learned", *profiles,
                          "--max-ppl-increase", "1")
        planned = ue_client(artifact, address, "--split", "3", "--policy", "planner", *profiles)

    for result in (static, lossless, coded, planned):
        assert result.returncode == 0, result.stderr
    assert lossless.stdout == static.stdout, lossless.stderr  # a budget of 0 leaves only lossless choices
    # A slow UE, a fast edge: layers go there, from the start or in a move.
    assert re.search(r"started at split 1 |moves, ended at split 1", lossless.stderr), lossless.stderr

    def sent(result) -> int:
        return int(re.search(r"sent (\d+) B", result.stderr).group(1))

    assert sent(coded) < sent(lossless), (coded.stderr, lossless.stderr)  # within 1% fewer bytes pay


def test_ue_client_and_train_policy_refuse_bad_policy_input(exported, tmp_path):
    artifact = Artifact.open(exported("tiny-llama"))
    paths = synthetic_profiles(artifact, tmp_path, 1.0, 1.0)
    profiles = ("--ue-profile", paths["ue"], "--edge-profile", paths["edge"])
    cases = {
        ("--policy", "learned", *profiles, "--policy-file", str(tmp_path / "none")): "cannot read the policy",
        ("--policy", "planner", "--ue-profile", paths["ue"]): "needs both device profiles",
    }
    for options, fragment in cases.items():
        result = ue_client(artifact, "tcp://127.0.0.1:9", "--timeout", "1", *options)
        assert result.returncode == 2, (options, result.stderr)
        assert fragment in result.stderr.strip().splitlines()[-1], (options, result.stderr)

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    quality = quality_file(tmp_path, [1, 2, 3])
    for options, fragment in {
        ("--quality", str(tmp_path / "none.json")): "cannot read the quality analysis",
        ("--quality", quality, "--direct-text", str(empty)): "is empty",
        ("--quality", quality, "--steps", "0"): "argument --steps: expected an integer at least 1",
    }.items():
        result = run_seam("train-policy", str(artifact.root), *options, *profiles, "--out", str(tmp_path / "p"))
        assert result.returncode == 2, (options, result.stderr)
        assert fragment in result.stderr, (options, result.stderr)
        assert not (tmp_path / "p").exists()
