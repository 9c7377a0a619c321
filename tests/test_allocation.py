"""Resource allocation for split fine-tuning: FedsLLM's bandwidth shares and cuts (a conic solver against an exact
bisection) and DASHF's association, relaxation and Dinkelbach iterations, on small seeded instances."""

from __future__ import annotations

import importlib.util
import itertools
import math

import numpy as np
import pytest

pytest.importorskip("scipy", reason="finetune needs scipy")

from seam.finetune.allocation import min_share, rate_bps  # noqa: E402  (after the skip)
from seam.finetune.dashf_offload import _ascend, _offload_value, offload_sdr  # noqa: E402
from seam.finetune.dashf import (  # noqa: E402
    DashfAllocation,
    DashfSetup,
    Fixed,
    associate,
    best_powers,
    dinkelbach,
    evaluate,
    plain,
    random_association,
    slot_values,
    upload_allocation,
)
from seam.finetune.fedsllm import FedsllmSetup, equal_shares, local_iterations, plan, round_delays, solve_cvxpy  # noqa: E402
from seam.runtime.errors import SeamError  # noqa: E402

needs_cvxpy = pytest.mark.skipif(importlib.util.find_spec("cvxpy") is None, reason="cvxpy is not installed")
NOISE = 10 ** (-174 / 10) / 1e3


def gains(rng: np.random.Generator, shape) -> np.ndarray:
    distance_km = rng.uniform(0.03, 0.5, shape)
    return 10 ** (-(128.1 + 37.6 * np.log10(distance_km) + rng.normal(0, 8, shape)) / 10)


def feds(seed: int, users: int = 6, layers: int = 8, **changes) -> FedsllmSetup:
    """UEs from much slower to somewhat faster than their share of the edge, so that cuts differ."""
    rng = np.random.default_rng(seed)
    fields = dict(
        ue_layer_s=np.outer(10 ** rng.uniform(-3, -1, users), np.ones(layers)),
        edge_layer_s=np.full(layers, 0.01),
        cut_bits=np.full(layers, 128 * 768 * 16.0),
        adapter_bits=np.full(layers, 4e5),
        samples=rng.integers(2, 9, users).astype(float),
        gains=gains(rng, users),
        powers_w=np.full(users, 0.2),
        noise_w_per_hz=NOISE,
        bandwidth_hz=20e6,
        iterations=local_iterations(0.1, 5),
    )
    return FedsllmSetup(**{**fields, **changes})


def dashf_setup(seed: int, users: int = 6, servers: int = 2, capacity: int = 4, **changes) -> DashfSetup:
    rng = np.random.default_rng(seed)
    samples = rng.integers(4, 17, users)
    fields = dict(
        gains=gains(rng, (users, servers)),
        powers_w=np.full(users, 0.2),
        upload_bits=samples * 128 * 4096 * 16.0,
        local_flop=samples * 2e11,
        server_flop=samples * 3e12,
        top_flops=10 ** rng.uniform(11.3, 12.3, users),
        energy_coeff=np.full(users, 1e-36),
        quality=rng.uniform(1, 2, users),
        server_flops=np.full(servers, 20e12),
        bandwidth_hz=np.full(servers, 10e6),
        capacity=np.full(servers, capacity),
        noise_w_per_hz=NOISE,
    )
    return DashfSetup(**{**fields, **changes})


# --- the radio -----------------------------------------------------------------------------------------------


def test_min_share_inverts_the_shannon_rate():
    k_hz = np.array([1e5, 1e7, 1e9])[:, None]
    rates = np.logspace(3, 8, 11)[None, :]
    shares = min_share(rates, 20e6, k_hz)
    finite = np.isfinite(shares)
    assert finite.sum() > 20
    assert np.allclose(rate_bps(shares[finite], 20e6, np.broadcast_to(k_hz, shares.shape)[finite]),
                       np.broadcast_to(rates, shares.shape)[finite], rtol=1e-9)
    assert np.array_equal(~finite, rates * math.log(2) >= k_hz)  # no share reaches the power-limited ceiling k/ln 2
    assert min_share(0.0, 20e6, 1e7) == 0


# --- FedsLLM -------------------------------------------------------------------------------------------------


def test_local_iterations_follow_the_log_of_the_accuracy():
    assert local_iterations(0.1, 10) == pytest.approx(10 * math.log(10))
    assert local_iterations(0.01, 10) == pytest.approx(2 * local_iterations(0.1, 10))
    for accuracy in (0, 1, 1.5, -0.1):
        with pytest.raises(SeamError, match="accuracy"):
            local_iterations(accuracy, 10)


@needs_cvxpy
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cvxpy_and_bisection_agree(seed):
    setup = feds(seed)
    for cuts in (1, 4, plan(setup).cuts):
        exact, conic = plan(setup, cuts), solve_cvxpy(setup, cuts)
        assert conic.round_s == pytest.approx(exact.round_s, rel=1e-6)
        assert np.allclose(conic.shares, exact.shares, atol=1e-4)


@pytest.mark.parametrize("seed", range(5))
def test_optimal_shares_are_feasible_equalise_delays_and_beat_equal_shares(seed):
    setup = feds(seed)
    for cut in setup.cuts:
        optimal, equal = plan(setup, int(cut)), equal_shares(setup, int(cut))
        assert np.all(optimal.shares >= 0) and optimal.shares.sum() <= 1 + 1e-12
        assert optimal.round_s <= equal.round_s
        # a UE finishing early could give band to the last one, so at the optimum all finish together
        assert np.ptp(optimal.delays_s) <= 1e-9 * optimal.round_s
        assert np.allclose(round_delays(setup, optimal.cuts, optimal.shares), optimal.delays_s)


@pytest.mark.parametrize("seed", range(5))
def test_cut_per_ue_beats_the_best_common_cut_which_beats_every_fixed_one(seed):
    setup = feds(seed)
    fixed = [plan(setup, int(cut)).round_s for cut in setup.cuts]
    common = plan(setup, common_cut=True)
    assert common.round_s == pytest.approx(min(fixed), rel=1e-12)
    assert len(set(common.cuts)) == 1
    per_ue = plan(setup)
    assert per_ue.round_s <= common.round_s * (1 + 1e-12)
    assert per_ue.cuts.min() >= setup.min_cut and per_ue.cuts.max() < setup.edge_layer_s.size


def test_cuts_differ_when_some_ues_outpace_their_share_of_the_edge():
    setup = feds(0, ue_layer_s=np.outer([1e-3, 1e-3, 1.0, 1.0], np.ones(8)), samples=np.full(4, 8.0),
                 gains=np.full(4, 1e-11), powers_w=np.full(4, 0.2))
    cuts = plan(setup).cuts
    assert cuts[:2].tolist() == [7, 7] and cuts[2:].tolist() == [1, 1]


@pytest.mark.parametrize("change, message", [
    ({"bandwidth_hz": -20e6}, "bandwidth_hz must be a positive number"),
    ({"gains": np.array([])}, "no users"),
    ({"powers_w": np.full(5, 0.2)}, "powers_w has shape"),
    ({"ue_layer_s": np.ones((6, 7))}, "ue_layer_s has shape"),
    ({"samples": np.array([1.0, 2, 3, 4, 5, -6])}, "samples must be positive"),
    ({"edge_layer_s": np.array([0.01])}, "at least two layers"),
    ({"min_cut": 8}, "min_cut"),
])
def test_bad_fedsllm_inputs_are_refused_with_a_clear_message(change, message):
    with pytest.raises(SeamError, match=message):
        feds(0, **change)


def test_bad_fedsllm_requests_are_refused():
    setup = feds(0)
    with pytest.raises(SeamError, match="cuts must lie"):
        plan(setup, 8)
    with pytest.raises(SeamError, match="more than the whole band"):
        round_delays(setup, 2, np.full(6, 0.2))
    with pytest.raises(SeamError, match="shares has shape"):
        round_delays(setup, 2, np.full(5, 0.1))


# --- DASHF ---------------------------------------------------------------------------------------------------


def test_hungarian_association_is_the_best_slot_assignment():
    setup = dashf_setup(3, users=5, capacity=3)
    values = slot_values(setup, lam=0.2)
    chosen = associate(setup, lam=0.2)
    best = max(values[np.arange(5), list(servers)].sum() for servers in itertools.product(range(2), repeat=5)
               if max(np.bincount(servers, minlength=2)) <= 3)
    assert values[np.arange(5), chosen].sum() == pytest.approx(best, rel=1e-12)
    assert np.bincount(chosen, minlength=2).max() <= 3


@needs_cvxpy
def test_dashf_beats_random_association_and_the_plain_allocation():
    setup = dashf_setup(4, users=8, capacity=5)
    rng = np.random.default_rng(0)
    best = dinkelbach(setup, rng)
    for _ in range(3):
        randomly = random_association(setup, rng)
        assert best.ratio >= dinkelbach(setup, rng, Fixed(association=randomly)).ratio
        assert best.ratio > evaluate(setup, plain(setup, randomly)).ratio
    assert best.ratio >= dinkelbach(setup, rng, Fixed(offload=0.5)).ratio


@needs_cvxpy
@pytest.mark.parametrize("seed", [0, 1])
def test_dinkelbach_converges_with_lambda_never_falling(seed):
    setup = dashf_setup(seed)
    result = dinkelbach(setup, np.random.default_rng(seed), tol=1e-7)
    quality = evaluate(setup, result.allocation).quality.sum()
    assert np.all(np.diff(result.lambdas) >= 0)
    assert result.ratio >= result.lambdas[-1]
    assert result.gaps[-1] <= 1e-7 * quality < result.gaps[0]
    assert all(gap >= 0 for gap in result.gaps)
    allocation = result.allocation
    assert np.all((allocation.offload >= 0) & (allocation.offload <= 1))
    assert np.all(allocation.flops <= setup.top_flops) and np.all(allocation.powers_w <= setup.powers_w)
    for server in range(2):
        mine = allocation.server == server
        assert allocation.shares[mine].sum() <= 1 + 1e-9 and allocation.cpu_shares[mine].sum() <= 1 + 1e-9


@needs_cvxpy
@pytest.mark.parametrize("seed", range(6))
def test_relaxation_bounds_the_recovered_allocation_and_any_other(seed):
    rng = np.random.default_rng(seed)
    users = int(rng.integers(1, 7))
    gain, work_s, price = rng.uniform(1, 2, users), rng.uniform(0.05, 2, users), rng.uniform(0.1, 2)
    solution = offload_sdr(gain, work_s, price, rng)
    assert solution.bound >= solution.value - 1e-6
    assert solution.value >= 0  # offloading nothing is always possible
    assert np.all((solution.offload >= 0) & (solution.offload <= 1)) and solution.cpu_shares.sum() <= 1 + 1e-12
    assert solution.value == pytest.approx(_offload_value(gain, work_s, price, solution.offload,
                                                          solution.cpu_shares))
    for _ in range(50):  # the bound holds for every feasible allocation, not only the recovered one
        start = rng.uniform(0, 1, users)
        assert solution.bound >= _offload_value(gain, work_s, price, *_ascend(gain, work_s, price, start)) - 1e-6


def test_best_power_minimises_the_upload_cost():
    setup = dashf_setup(0)
    for gain, share in ((1e-12, 0.3), (1e-10, 0.05), (1e-14, 1.0)):
        power = best_powers(setup, gain, share, 10e6, 0.2)
        grid = np.linspace(1e-4, 0.2, 20001)
        cost = (1 + grid) / rate_bps(share, 10e6, grid * gain / NOISE)
        ours = (1 + power) / rate_bps(share, 10e6, power * gain / NOISE)
        assert 0 < power <= 0.2 and ours <= cost.min() * (1 + 1e-9)


@needs_cvxpy
def test_optimal_band_shares_cost_no_more_than_equal_ones():
    setup = dashf_setup(2)
    members = np.arange(setup.gains.shape[0])[:4]
    results = {}
    for equal in (False, True):
        shares, powers = upload_allocation(setup, 0, members, equal)
        assert np.all(shares > 0) and shares.sum() <= 1 + 1e-9
        rate = rate_bps(shares, setup.bandwidth_hz[0], powers * setup.gains[members, 0] / setup.noise_w_per_hz)
        results[equal] = ((1 + powers) * setup.upload_bits[members] / rate).sum()
    assert results[False] <= results[True]


@pytest.mark.parametrize("change, message", [
    ({"bandwidth_hz": np.array([10e6, -1.0])}, "bandwidth_hz must be positive"),
    ({"gains": np.zeros((0, 2))}, "no users"),
    ({"quality": np.ones(5)}, "quality has shape"),
    ({"capacity": np.array([2, 2])}, "servers take only 4"),
    ({"capacity": np.array([2.5, 4])}, "whole numbers"),
    ({"server_flops": np.array([])}, "no servers"),
    ({"delay_weight": 0.0}, "delay_weight must be a positive number"),
])
def test_bad_dashf_inputs_are_refused_with_a_clear_message(change, message):
    with pytest.raises(SeamError, match=message):
        dashf_setup(0, **change)


def test_an_overbooked_allocation_is_refused():
    setup = dashf_setup(0)
    ones = np.ones(6)
    with pytest.raises(SeamError, match="more users than its capacity"):
        evaluate(setup, DashfAllocation(np.zeros(6, int), ones / 6, ones * 0.2, ones * 1e12, ones / 6, ones / 2))
    with pytest.raises(SeamError, match="band shares sum to more than 1"):
        evaluate(setup, DashfAllocation(np.arange(6) % 2, ones / 2, ones * 0.2, ones * 1e12, ones / 3, ones / 2))
