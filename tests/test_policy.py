"""The UE's link estimate and the split policy: pure functions on synthetic traffic and profiles, then the
cost-model policy driving a real generation against a real edge_server."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from seam.edge_server.process import edge_server
from seam.planning.cost_model import DeviceModel, Link, predict
from seam.planning.schema import save
from seam.runtime.artifact import Artifact
from seam.runtime.errors import SeamError
from seam.runtime.sampling import SamplingParams
from test_cost_model import HIDDEN, device
from test_runtime import NEW_TOKENS, PROMPTS, local_tokens
from seam.ue_client.client import EdgeClient
from seam.planning.link_estimate import LinkEstimator, Sample, harmonic_mean
from seam.planning.policy import (PAYBACK, Constraints, CostModelPolicy, QualityBudget, Scales, calibration,
                              candidate_splits, choose_split, move_s, per_token_s, rebuild_s)

MBIT = 1e6 / 8


def traffic(link: Link, sizes, start_s: float = 0.0, jitter: float = 0.0, seed: int = 0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    samples = []
    for i, (up, down) in enumerate(sizes):
        seconds = link.rtt_s + up / link.up_bytes_per_s + down / link.down_bytes_per_s
        samples.append(Sample(start_s + 0.1 * i, up, down, seconds * (1 + jitter * rng.standard_normal())))
    return samples


def steps_and_probes(n: int) -> list[tuple[int, int]]:
    """Decode steps (3 kB up, 200 B down) with an upload and a download probe of 64 kB every fifth step."""
    sizes = []
    for i in range(n):
        sizes.append((3000, 200))
        if i % 5 == 0:
            sizes += [(64_000, 100), (100, 64_000)]
    return sizes


# --- link estimate ------------------------------------------------------------------------------------------


def test_the_estimate_finds_the_link_from_steps_and_probes():
    truth = Link(0.02, 5 * MBIT, 20 * MBIT)
    estimator = LinkEstimator(prior=Link(0.001, 100 * MBIT, 100 * MBIT))

    for sample in traffic(truth, steps_and_probes(20), jitter=0.02):
        estimator.observe(sample)

    assert estimator.rtt_s == pytest.approx(truth.rtt_s, rel=0.15)
    assert estimator.up_bytes_per_s == pytest.approx(truth.up_bytes_per_s, rel=0.15)
    assert estimator.down_bytes_per_s == pytest.approx(truth.down_bytes_per_s, rel=0.15)


def test_a_bandwidth_drop_shows_within_a_few_samples_and_a_spike_does_not():
    fast, slow = Link(0.02, 20 * MBIT, 20 * MBIT), Link(0.02, 2 * MBIT, 20 * MBIT)
    estimator = LinkEstimator(prior=fast)
    for sample in traffic(fast, [(64_000, 100)] * 5):
        estimator.observe(sample)
    for sample in traffic(slow, [(64_000, 100)] * 2, start_s=1.0):
        estimator.observe(sample)
    assert estimator.up_bytes_per_s < 5 * MBIT  # two slow samples of five pull the harmonic mean down hard

    steady = LinkEstimator(prior=slow)
    for sample in traffic(slow, [(64_000, 100)] * 5):
        steady.observe(sample)
    steady.observe(traffic(Link(0.02, 200 * MBIT, 20 * MBIT), [(64_000, 100)], start_s=1.0)[0])
    assert steady.up_bytes_per_s < 2.5 * MBIT  # one lucky burst barely moves it


def test_stale_directions_and_probe_size():
    estimator = LinkEstimator(prior=Link(0.02, 10 * MBIT, 10 * MBIT), stale_s=2.0)
    assert estimator.stale(0.0) == ["up", "down"]
    for sample in traffic(estimator.prior, [(64_000, 100)]):
        estimator.observe(sample)
    assert estimator.stale(1.0) == ["down"]
    assert estimator.stale(5.0) == ["up", "down"]
    assert estimator.probe_bytes("up") == pytest.approx(4 * 0.02 * 10 * MBIT, rel=0.2)
    estimator.observe(Sample(1.9, 100, 100, 0.02))  # a ping: the round trip
    estimator.observe(Sample(2.0, 20_000, 100, 0.0202))  # crossed a 10 Mbit/s estimate in a fraction of a ms
    assert estimator.probe_bytes("up") >= 160_000  # the link got faster: the next probe is eight times larger


def test_probes_of_a_steady_direction_grow_rarer_and_any_change_starts_over():
    from seam.ue_client.probing import MAX_QUIET, LinkProber

    estimator = LinkEstimator(prior=Link(0.02, 10 * MBIT, 10 * MBIT), stale_s=2.0)
    prober = LinkProber(estimator, HIDDEN, 4)
    assert prober.due("up", 0.0, back_off=True)  # never measured: due at once
    for sample in traffic(estimator.prior, [(64_000, 100)]):
        estimator.observe(sample)
    for _ in range(5):  # each probe finds the same rate
        prober.quiet["up"] = prober.next_quiet("up", 10 * MBIT, 11 * MBIT)
    assert prober.quiet["up"] == MAX_QUIET
    assert not prober.due("up", 10.0, back_off=True) and prober.due("up", 10.0, back_off=False)
    assert prober.due("up", 2.0 * MAX_QUIET + 0.1, back_off=True)
    assert prober.next_quiet("up", 10 * MBIT, 3 * MBIT) == 1  # the rate changed: probe as often as before
    assert prober.next_quiet("up", None, 10 * MBIT) == 1  # outrun or unmeasured before


def test_a_message_that_outruns_the_estimate_makes_its_direction_stale():
    collapsed, recovered = Link(0.02, 0.2 * MBIT, 0.2 * MBIT), Link(0.02, 50 * MBIT, 50 * MBIT)
    estimator = LinkEstimator(prior=Link(0.02, 10 * MBIT, 10 * MBIT))
    for sample in traffic(collapsed, [(100, 100), (64_000, 100), (100, 64_000)] * 3):
        estimator.observe(sample)
    assert estimator.stale(0.9) == [] and estimator.up_bytes_per_s == pytest.approx(0.2 * MBIT, rel=0.05)

    estimator.observe(traffic(recovered, [(3000, 100)], start_s=0.95)[0])  # a step-sized ping, too small to measure

    assert estimator.stale(1.0) == ["up"]
    assert estimator.up_bytes_per_s == estimator.prior.up_bytes_per_s


def test_an_outage_shows_as_a_collapsed_uplink_not_as_a_long_round_trip_at_the_prior():
    good = Link(0.005, 20 * MBIT, 20 * MBIT)
    estimator = LinkEstimator(prior=Link(0.02, 10 * MBIT, 10 * MBIT))
    for sample in traffic(good, [(3000, 200)] * 10 + [(64_000, 100), (100, 64_000)] * 2):
        estimator.observe(sample)
    assert estimator.up_bytes_per_s == pytest.approx(good.up_bytes_per_s, rel=0.1)
    for index in range(40):  # more steps than the window holds, each held up for 0.2 s
        estimator.observe(Sample(2.0 + 0.2 * index, 3000, 200, 0.2))
    assert estimator.rtt_s < 0.01  # the round trip cannot be longer than the quickest message of late
    assert estimator.up_bytes_per_s < 0.2 * MBIT  # 3 kB in about 0.2 s

    for sample in traffic(good, [(3000, 200)] * 3 + [(64_000, 100)] * 3, start_s=11.0):  # the link is back
        estimator.observe(sample)
    assert estimator.up_bytes_per_s == pytest.approx(good.up_bytes_per_s, rel=0.1)


def test_harmonic_mean_weighs_the_slow_samples():
    assert harmonic_mean([1.0, 1.0]) == 1.0
    assert harmonic_mean([1.0, 100.0]) < 2.0


# --- policy -------------------------------------------------------------------------------------------------

KV_PER_LAYER = 2 * 4 * 16 * 4  # bytes per token per layer, as for 4 KV heads of 16 dims in fp32


def models(ue_scale: float = 4.0, edge_scale: float = 0.2) -> tuple[DeviceModel, DeviceModel]:
    return DeviceModel.from_profile(device(ue_scale, name="ue")), DeviceModel.from_profile(device(edge_scale, name="edge"))


def decide(link: Link, current: int, remaining: int = 100, **options):
    ue, edge = models()
    candidates = options.pop("candidates", ue.split_points)
    return choose_split(ue, edge, link, current=current, candidates=candidates, context=64, remaining=remaining,
                        batch=1, kv_bytes_per_token_per_layer=KV_PER_LAYER, **options)


def test_a_fast_link_sends_the_layers_to_the_edge_and_a_slow_one_keeps_them():
    fast, slow = Link.from_mbit(1000, 1), Link.from_mbit(0.05, 200)

    assert decide(fast, current=4).split == 0  # the edge is 20x faster: everything goes there
    assert decide(slow, current=1).split == 4  # a 200 ms round trip costs more than the UE's compute


def test_the_policy_respects_privacy_and_allowed_splits():
    fast = Link.from_mbit(1000, 1)

    assert decide(fast, current=4, candidates=[2, 3, 4]).split == 2


def test_no_move_when_the_gain_is_within_the_margin_or_cannot_pay_for_itself():
    ue, edge = models(ue_scale=1.0, edge_scale=1.0)  # both sides alike: every offloading split costs the same
    link = Link.from_mbit(1000, 1)
    even = choose_split(ue, edge, link, current=2, candidates=[0, 1, 2, 3], context=64, remaining=1000, batch=1,
                        kv_bytes_per_token_per_layer=KV_PER_LAYER)
    assert even.split == 2 and "stays" in even.reason

    slow_move = Link.from_mbit(0.01, 1)  # the KV cache of a move would take seconds to cross
    assert decide(slow_move, current=4, remaining=2).split == 4
    moved = decide(Link.from_mbit(1000, 1), current=4, remaining=100)
    assert moved.split != 4 and "ms/token" in moved.reason and "saves" in moved.reason


def test_a_move_must_pay_for_the_way_back_and_a_multiple_of_its_own_cost():
    ue, edge = models()
    link, boundary = Link.from_mbit(0.5, 100), HIDDEN * 4 + 8  # bad enough to run alone, too slow to come back cheaply
    options = dict(current=1, candidates=[1, 4], context=64, batch=1, kv_bytes_per_token_per_layer=KV_PER_LAYER,
                   boundary_bytes_per_token=boundary, kept=[1])
    costs = choose_split(ue, edge, link, remaining=1, **options).per_token_s
    there = min(move_s(link, 1, 4, KV_PER_LAYER, 1, 64), rebuild_s(ue, edge, link, 1, 4, 1, 64, Scales(), boundary, [1]))
    back = min(move_s(link, 4, 1, KV_PER_LAYER, 1, 64), rebuild_s(ue, edge, link, 4, 1, 1, 64, Scales(), boundary, [1]))
    saving = costs[1] - costs[4]
    paying_there = math.ceil(there / saving) + 1
    paying_both = math.ceil((there + back) / saving) + 1  # a net saving, but less than the payback asks
    paying_back = math.ceil((PAYBACK * there + back) / saving) + 1
    assert paying_there < paying_both < paying_back

    assert choose_split(ue, edge, link, remaining=paying_there, **options).split == 1
    assert choose_split(ue, edge, link, remaining=paying_both, **options).split == 1
    assert choose_split(ue, edge, link, remaining=paying_both, payback=1.0, **options).split == 4
    decision = choose_split(ue, edge, link, remaining=paying_back, **options)
    assert decision.split == 4 and "the way back" in decision.reason


def test_calibration_scales_a_side_by_its_median_and_is_bounded():
    assert calibration([0.02, 0.02, 0.5], 0.01) == pytest.approx(2.0)
    assert calibration([0.02, 0.4], 0.01, (1e-3, 1e3)) == pytest.approx(21.0)  # of two steps, the mean
    assert calibration([10.0], 0.01) == 4.0
    assert calibration([10.0], 0.01, (0.05, 50.0)) == 50.0
    assert calibration([], 0.01) == 1.0


def test_a_speed_up_measured_on_some_layers_is_credited_as_time_saved_not_as_a_rate_for_the_rest():
    ue, edge = models()
    link = Link.from_mbit(10, 20)

    def cost(split: int, scales: Scales = Scales()) -> float:
        return per_token_s(ue, edge, link, split, 64, 1, scales)

    def compute(split: int) -> tuple[float, float]:
        step = predict(ue, edge, link, split, 64, 1).decode
        return step.ue_s, step.edge_s

    # The UE ran split 1 in half its profile's time: split 1 is as measured, and split 4 gains only those
    # milliseconds, not half of its three more layers.
    quick_ue = Scales(ue=0.5, measured_at=1)
    assert cost(1, quick_ue) == pytest.approx(cost(1, Scales(ue=0.5)))
    assert cost(4, quick_ue) == pytest.approx(cost(4) - 0.5 * compute(1)[0])
    assert cost(4, Scales(ue=0.5)) < cost(4, quick_ue)
    # The same for the edge taking layers over, and for slowness: the UE twice as slow on one layer adds that
    # layer's time to split 4, and twice as slow on four layers doubles split 1's own layer, not adds four.
    quick_edge = Scales(edge=0.5, measured_at=3)
    assert cost(1, quick_edge) == pytest.approx(cost(1) - 0.5 * compute(3)[1])
    assert cost(4, Scales(ue=2.0, measured_at=1)) == pytest.approx(cost(4) + compute(1)[0])
    assert cost(4, Scales(ue=2.0, measured_at=1)) < cost(4, Scales(ue=2.0))
    assert cost(1, Scales(ue=2.0, measured_at=4)) == pytest.approx(cost(1, Scales(ue=2.0)))
    assert Scales(ue=0.5, edge=3.0, measured_at=1).unmeasured() == Scales(ue=1.0, edge=3.0, measured_at=1)
    assert Scales(ue=0.5).unmeasured() == Scales(ue=0.5)


def test_a_slow_network_seen_by_the_steps_brings_the_layers_home():
    link = Link.from_mbit(1000, 1)  # what the estimate still says

    assert decide(link, current=1, candidates=[1, 2, 3, 4]).split == 1
    slow_steps = Scales(network=40.0)  # the steps spend 40 ms on the network
    assert decide(link, current=1, candidates=[1, 2, 3, 4], scales=slow_steps).split == 4


def test_the_side_taking_layers_over_recomputes_them_when_that_beats_carrying_the_cache():
    ue, edge = models()
    boundary = HIDDEN * 4 + 8  # hidden states and the mask, per position
    link = Link.from_mbit(2, 1)  # the cache of three layers takes a while to cross this uplink

    carried = decide(link, current=4, candidates=[1, 4], boundary_bytes_per_token=boundary, remaining=300)
    recomputed = decide(link, current=4, candidates=[1, 4], boundary_bytes_per_token=boundary, kept=[1],
                        remaining=300)

    assert carried.split == recomputed.split == 1
    assert not carried.rebuild and recomputed.rebuild and "recomputing the cache there" in recomputed.reason
    assert rebuild_s(ue, edge, link, 4, 1, 1, 64, Scales(), boundary, kept=[]) == math.inf
    # Layers coming back to the UE: from the hidden states it kept at the old split, else from the tokens.
    assert rebuild_s(ue, edge, link, 2, 4, 1, 64, Scales(), boundary, kept=[2]) < \
        rebuild_s(ue, edge, link, 2, 4, 1, 64, Scales(), boundary, kept=[])


def test_a_quality_budget_picks_the_cheapest_codec_it_allows_and_the_cost_model_prices_its_bytes():
    cells = [{"cut": cut, "variant": f"codec:{name}", "increase_pct": pct}
             for cut, name, pct in [(1, "fp16", 0.0), (1, "int8", 0.01), (1, "int4", 0.3), (2, "int8", 0.02),
                                    (2, "int4", 2.0)]] + [{"cut": 1, "variant": "erasure:0.1", "increase_pct": 3.0}]
    budget = QualityBudget.from_analysis(cells, max_increase_pct=0.5)
    offered = ["fp32", "fp16", "bf16", "int8", "int4"]

    assert budget.codec(1, offered) == "int4"
    assert budget.codec(2, offered) == "int8"  # int4 costs more than the budget at this cut
    assert budget.codec(3, offered) == "fp32"  # never analysed: lossless
    assert budget.codec(1, ["fp32", "fp16"]) == "fp16"  # what the edge offers bounds the choice
    with pytest.raises(SeamError, match="no codec results"):
        QualityBudget.from_analysis(cells[-1:], 1.0)

    slow = Link.from_mbit(0.5, 20)
    plain = decide(slow, current=1, candidates=[1, 4], remaining=0)
    coded = decide(slow, current=1, candidates=[1, 4], remaining=0, codecs={1: "int4"})
    assert coded.per_token_s[1] < plain.per_token_s[1] and coded.per_token_s[4] == plain.per_token_s[4]
    assert coded.split == 1 and coded.codec == "int4" and plain.codec is None


def test_candidates_leave_out_what_the_ue_cannot_hold():
    ue, _ = models()
    weights, kv = [1000] * 4, [100] * 4

    assert candidate_splits(ue, Constraints(), kv, 1, 10, weights) == [0, 1, 2, 3, 4]
    assert candidate_splits(ue, Constraints(ue_memory_bytes=4500), kv, 1, 10, weights) == [0, 1, 2]  # 2000 B a block
    assert candidate_splits(ue, Constraints(min_ue_layers=1, allowed=(1, 3)), kv, 1, 10, weights) == [1, 3]
    with pytest.raises(SeamError, match="no split satisfies"):
        candidate_splits(ue, Constraints(min_ue_layers=9), kv, 1, 10, weights)


# --- the policy in a real generation ------------------------------------------------------------------------


def test_the_cost_model_policy_moves_a_local_start_to_the_edge_without_changing_the_tokens(exported):
    artifact = Artifact.open(exported("tiny-llama"))
    manifest = artifact.manifest
    spans = tuple((b.layers.start, b.layers.end) for b in manifest.blocks)
    profile = {
        name: DeviceModel.from_profile(device(scale, spans, manifest.artifact_fingerprint, manifest.dtype, name,
                                              manifest.dims.hidden_size))
        for name, scale in (("ue", 50.0), ("edge", 0.1))  # a hopeless UE and a fast edge
    }
    policy = CostModelPolicy(profile["ue"], profile["edge"])  # split 0 stays out: token upload is not allowed

    def slow_policy(snapshot):  # steps as slow as the hopeless UE's, so that the probes measure the link
        time.sleep(0.05)
        return policy(snapshot)

    params = SamplingParams(temperature=0.8, seed=3)
    with edge_server(artifact.root) as (_, address), EdgeClient(artifact, address) as client:
        with client.session(artifact.num_layers, params) as session:
            tokens = np.stack(list(session.generate(PROMPTS, NEW_TOKENS, slow_policy)), axis=1)

    assert (tokens == local_tokens(artifact, PROMPTS, params)).all()
    moves = [move.to_split for move in session.moves]
    # The first move goes to the edge, never below the privacy floor (one layer stays on the UE). On a loaded
    # machine a step's network time can read slow enough for a move back, which is the policy judging what it
    # measured, not an error.
    assert moves[:1] == [1] and min(moves) == 1
    assert policy.decisions and session.probes >= 2  # it moved once the probes had measured the link


def synthetic_profiles(artifact: Artifact, tmp_path, ue_scale: float, edge_scale: float) -> dict[str, str]:
    manifest = artifact.manifest
    spans = tuple((b.layers.start, b.layers.end) for b in manifest.blocks)
    paths = {}
    for name, scale in (("ue", ue_scale), ("edge", edge_scale)):
        profile = device(scale, spans, manifest.artifact_fingerprint, manifest.dtype, name, manifest.dims.hidden_size)
        paths[name] = str(save(profile, tmp_path / f"{name}.json"))
    return paths


def ue_client(artifact: Artifact, address: str, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "seam.ue_client.cli", str(artifact.root), "--server", address, "--prompt", "hello edge",
         "--max-new-tokens", "6", *options],
        capture_output=True, text=True, timeout=120,
    )


def test_ue_client_moves_the_split_with_the_cost_model_and_says_why(exported, tmp_path):
    artifact = Artifact.open(exported("tiny-llama"))
    paths = synthetic_profiles(artifact, tmp_path, ue_scale=50.0, edge_scale=0.1)
    with edge_server(artifact.root) as (_, address):
        static = ue_client(artifact, address, "--split", "3", "--policy", "static")
        adaptive = ue_client(artifact, address, "--split", "3", "--ue-profile", paths["ue"], "--edge-profile", paths["edge"])
        quality = tmp_path / "quality.json"
        quality.write_text(json.dumps({"cells": [{"cut": 1, "variant": "codec:int4", "increase_pct": 0.4}]}))
        coded = ue_client(artifact, address, "--split", "3", "--ue-profile", paths["ue"], "--edge-profile",
                          paths["edge"], "--quality", str(quality), "--max-ppl-increase", "1")

    assert static.returncode == 0 and adaptive.returncode == 0 and coded.returncode == 0, coded.stderr
    assert adaptive.stdout == static.stdout  # the same text, whichever side ran the layers
    # Nothing is held before the prompt: the policy picks where it starts, and no move is needed.
    assert "started at split 1 (" in adaptive.stderr and "ms/token" in adaptive.stderr
    assert "split 1/4; " in adaptive.stderr and "moves" not in adaptive.stderr
    assert "started at split 1 (" in coded.stderr

    def sent(result) -> int:
        return int(re.search(r"sent (\d+) B", result.stderr).group(1))

    assert sent(coded) < sent(adaptive)  # int4 at split 1 is within the budget, so the steps cross in it


def test_ue_client_refuses_half_a_cost_model(exported, tmp_path):
    artifact = Artifact.open(exported("tiny-llama"))
    paths = synthetic_profiles(artifact, tmp_path, 1.0, 1.0)
    cases = {
        ("--policy", "cost-model", "--ue-profile", paths["ue"]): "needs both device profiles; give --edge-profile",
        ("--ue-profile", paths["ue"], "--edge-profile", paths["edge"], "--min-ue-layers", "0"): "--allow-token-upload",
        ("--ue-profile", paths["ue"], "--edge-profile", str(tmp_path / "none.json")): "cannot read profile",
        ("--ue-profile", paths["ue"], "--edge-profile", paths["edge"], "--quality", paths["ue"]): "go together",
        ("--ue-profile", paths["ue"], "--edge-profile", paths["edge"], "--quality", str(tmp_path / "none.json"),
         "--max-ppl-increase", "1"): "cannot read the quality analysis",
    }
    for options, fragment in cases.items():
        result = ue_client(artifact, "tcp://127.0.0.1:9", "--timeout", "1", *options)
        assert result.returncode == 2, (options, result.stderr)
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("ue_client: error:") and fragment in last, (options, last)
