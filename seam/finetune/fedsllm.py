"""FedsLLM's round planner: the per-UE cut layer and bandwidth share that minimise one synchronous round of
federated split fine-tuning (Zhao et al., arXiv 2407.09250).

Model. UE i trains LoRA adapters on layers [0, K_i); the edge trains [K_i, L) for it. A round is I local iterations,
each over n_i samples: the UE computes [0, K_i), sends the cut activations up, the edge computes [K_i, L) and sends
the gradients at the cut back down (as many bits as the activations); after the last iteration the UE sends its
adapters of [0, K_i) to the aggregator. Up and down share UE i's band share b_i at one rate (a reciprocal TDD
channel at equal power). So

    delay_i(b_i) = c_i + q_i / r_i(b_i),   c_i = I·n_i·(sum ue_i[0:K_i] + sum edge[K_i:L]),
                                           q_i = 2·I·n_i·cut_bits[K_i] + sum adapter_bits[0:K_i],

with r_i the Shannon rate of allocation.py, and the round lasts max_i delay_i. Per-layer times are seconds per
sample, forward and backward; the edge's are those of the share of the edge one UE's work gets, the edge serving
the UEs in parallel.

Iterations. I = a·ln(1/eps) local iterations reach local accuracy eps when the local loss converges linearly, the
assumption of the federated-learning delay models FedsLLM builds on; the paper's constant a is unverified.

Solution. min over b of max_i delay_i, subject to sum b <= 1 and b >= 0, is convex: q_i/r_i(b_i) is convex because
r_i is concave and positive. Two solvers must agree:
- cvxpy, in exponential-cone form: r_i(b) = (B/ln 2)·(-rel_entr(b, b + k_i/B)) is concave and inv_pos of it convex,
  so min T subject to c_i + q_i·inv_pos(r_i(b_i)) <= T is DCP;
- bisection on T with each UE's exact least share at T, r_i(b) = q_i/(T - c_i) solved in closed form with the
  Lambert W function (the role of the paper's lemma): T is feasible iff the least shares sum to at most 1.
Cut layers. At a given T the UEs decouple, so each UE takes the cut that needs the least bandwidth at T, and the
same bisection gives the exact optimum over per-UE cuts (the aggregator then averages each layer's adapter over the
UEs that train that layer). With ``common_cut`` every cut is tried as the one cut of all UEs: the paper's exhaustive
split search, for FedAvg over identical client subnetworks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from seam.finetune.allocation import LN2, checked, min_share, positive, rate_bps, users
from seam.runtime.errors import SeamError


def local_iterations(accuracy: float, constant: float) -> float:
    """a·ln(1/eps): local iterations to reach local accuracy eps (0 < eps < 1) under linear convergence."""
    if not 0 < accuracy < 1:
        raise SeamError(f"the target accuracy must lie strictly between 0 and 1, got {accuracy!r}")
    return positive("the iteration constant", constant) * math.log(1 / accuracy)


@dataclass(frozen=True)
class FedsllmSetup:
    """One round's inputs: N UEs, a model of L layers. Arrays are indexed [UE], [layer] or [UE, layer]."""

    ue_layer_s: np.ndarray  # (N, L) seconds per sample per layer on each UE, forward and backward
    edge_layer_s: np.ndarray  # (L,) the same on the edge, for one UE's work
    cut_bits: np.ndarray  # (L,) bits per sample crossing a cut at layer K (entry K; entry 0 is unused)
    adapter_bits: np.ndarray  # (L,) bits of each layer's LoRA adapter
    samples: np.ndarray  # (N,) samples per local iteration
    gains: np.ndarray  # (N,) channel power gains to the edge
    powers_w: np.ndarray  # (N,) transmit powers
    noise_w_per_hz: float
    bandwidth_hz: float
    iterations: float  # local iterations per round, from local_iterations()
    min_cut: int = 1  # layers every UE keeps, so that raw tokens never leave it

    def __post_init__(self) -> None:
        count = users(self.gains)
        layers = np.shape(self.edge_layer_s)[0] if np.ndim(self.edge_layer_s) == 1 else 0
        if layers < 2:
            raise SeamError("edge_layer_s must list at least two layers, so that there is a cut to choose")
        if not (isinstance(self.min_cut, int) and 1 <= self.min_cut < layers):
            raise SeamError(f"min_cut must be a layer in [1, {layers}), got {self.min_cut!r}")
        shapes = {"ue_layer_s": (count, layers), "edge_layer_s": (layers,), "cut_bits": (layers,),
                  "adapter_bits": (layers,), "samples": (count,), "gains": (count,), "powers_w": (count,)}
        for name, shape in shapes.items():
            object.__setattr__(self, name, checked(name, getattr(self, name), shape))
        for name in ("noise_w_per_hz", "bandwidth_hz", "iterations"):
            object.__setattr__(self, name, positive(name, getattr(self, name)))

    @property
    def users(self) -> int:
        return self.gains.size

    @property
    def cuts(self) -> np.ndarray:
        """The candidate cuts: each leaves at least min_cut layers on the UE and one on the edge."""
        return np.arange(self.min_cut, self.edge_layer_s.size)

    @property
    def k_hz(self) -> np.ndarray:
        return self.powers_w * self.gains / self.noise_w_per_hz


@dataclass(frozen=True)
class FedsllmPlan:
    """What drives a round: each UE's cut and band share, and the delays they give."""

    cuts: np.ndarray  # (N,) layers on each UE
    shares: np.ndarray  # (N,) band shares, summing to at most 1
    delays_s: np.ndarray  # (N,)

    @property
    def round_s(self) -> float:
        return float(self.delays_s.max())


def _terms(setup: FedsllmSetup, cuts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(c, q) of every UE at every cut in ``cuts`` (shape (N, C)): seconds of compute, bits over the air."""
    ue_before = np.concatenate([np.zeros((setup.users, 1)), np.cumsum(setup.ue_layer_s, axis=1)], axis=1)
    edge_after = np.concatenate([np.cumsum(setup.edge_layer_s[::-1])[::-1], [0.0]])
    adapters_before = np.concatenate([[0.0], np.cumsum(setup.adapter_bits)])
    per_iteration = setup.iterations * setup.samples[:, None]
    compute = per_iteration * (ue_before[np.arange(setup.users)[:, None], cuts] + edge_after[cuts])
    bits = 2 * per_iteration * setup.cut_bits[cuts] + adapters_before[cuts]
    return compute, bits


def _cut_per_ue(setup: FedsllmSetup, cuts) -> np.ndarray:
    per_ue = np.broadcast_to(np.asarray(cuts), (setup.users,))
    if not np.all(np.isin(per_ue, setup.cuts)):
        raise SeamError(f"cuts must lie in [{setup.min_cut}, {setup.edge_layer_s.size}), got {per_ue.tolist()}")
    return per_ue.astype(int)


def round_delays(setup: FedsllmSetup, cuts, shares) -> np.ndarray:
    """Each UE's round delay at its cut (one for all, or one per UE) and band share."""
    per_ue = _cut_per_ue(setup, cuts)
    shares = checked("shares", shares, (setup.users,), positive=False)
    if shares.sum() > 1 + 1e-9:
        raise SeamError(f"band shares sum to {shares.sum():.6g}, more than the whole band")
    compute, bits = _terms(setup, per_ue[:, None])
    with np.errstate(divide="ignore"):
        return compute[:, 0] + bits[:, 0] / rate_bps(shares, setup.bandwidth_hz, setup.k_hz)


def equal_shares(setup: FedsllmSetup, cuts) -> FedsllmPlan:
    """The unoptimised allocation: the band split evenly."""
    per_ue = _cut_per_ue(setup, cuts)
    shares = np.full(setup.users, 1 / setup.users)
    return FedsllmPlan(per_ue, shares, round_delays(setup, per_ue, shares))


def _bisect(setup: FedsllmSetup, choices: np.ndarray, rel_tol: float) -> FedsllmPlan:
    """The least round time over the cuts in ``choices`` (shape (N, C), per UE), by bisection on T."""
    compute, bits = _terms(setup, choices)
    k = setup.k_hz[:, None]

    def needs(round_s: float) -> np.ndarray:
        slack = round_s - compute
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(slack > 0, min_share(bits / np.where(slack > 0, slack, 1.0), setup.bandwidth_hz, k), np.inf)

    low = compute.min(axis=1).max()  # below this some UE cannot even finish its compute
    high = (compute + bits / rate_bps(1 / setup.users, setup.bandwidth_hz, k)).min(axis=1).max()  # equal shares
    while high - low > rel_tol * high:
        middle = 0.5 * (low + high)
        if needs(middle).min(axis=1).sum() <= 1:
            high = middle
        else:
            low = middle
    need = needs(high)
    best = need.argmin(axis=1)
    cuts = choices[np.arange(setup.users), best]
    shares = need[np.arange(setup.users), best]
    return FedsllmPlan(cuts, shares, round_delays(setup, cuts, shares))


def plan(setup: FedsllmSetup, cuts=None, common_cut: bool = False, rel_tol: float = 1e-12) -> FedsllmPlan:
    """The optimal plan: band shares for the given cuts (one for all, or one per UE), else the best cut per UE, or
    with ``common_cut`` the best single cut for all UEs."""
    if cuts is not None:
        return _bisect(setup, _cut_per_ue(setup, cuts)[:, None], rel_tol)
    if not common_cut:
        return _bisect(setup, np.broadcast_to(setup.cuts, (setup.users, setup.cuts.size)), rel_tol)
    plans = [_bisect(setup, np.full((setup.users, 1), cut), rel_tol) for cut in setup.cuts]
    return min(plans, key=lambda candidate: candidate.round_s)


def solve_cvxpy(setup: FedsllmSetup, cuts) -> FedsllmPlan:
    """The same shares as plan(setup, cuts) from a conic solver: the independent check of the bisection."""
    import cvxpy as cp

    per_ue = _cut_per_ue(setup, cuts)
    compute, bits = (term[:, 0] for term in _terms(setup, per_ue[:, None]))
    scale = compute.max() + 1.0  # seconds, so that the solver sees numbers near 1
    shares, round_s = cp.Variable(setup.users, nonneg=True), cp.Variable()
    rate = -cp.rel_entr(shares, shares + setup.k_hz / setup.bandwidth_hz)  # in units of B/ln 2
    seconds_per_unit = bits * LN2 / setup.bandwidth_hz / scale
    problem = cp.Problem(cp.Minimize(round_s),
                         [compute / scale + cp.multiply(seconds_per_unit, cp.inv_pos(rate)) <= round_s,
                          cp.sum(shares) <= 1])
    problem.solve(solver=cp.CLARABEL)
    if problem.status != cp.OPTIMAL:
        raise SeamError(f"the conic solver did not find the optimal shares (status {problem.status})")
    solved = np.clip(shares.value, 0, None)
    solved = solved / max(1.0, solved.sum())
    return FedsllmPlan(per_ue, solved, round_delays(setup, per_ue, solved))
