"""DASHF's planner: which server each user trains with, and how band, power, CPU speed, server compute and the
offloading ratio are set, to maximise the users' service-cost ratio (Qian and Zhao, arXiv 2310.17872).

Model. The paper's exact functions are unverified; this follows the structure PAPERS.md gives. User n trains the
adapters of its first layers itself (W_loc FLOPs per round at CPU speed f_n), sends the cut activations and those
adapters (D_n bits) to its server m in a share b_n of the server's band at power p_n, and the server trains a
share rho_n, the offloading ratio, of the later adapter layers (rho_n·W_srv FLOPs) in a share phi_n of its compute F_m:

    delay_n   = W_loc/f_n + D_n/r_nm(b_n, p_n) + rho_n·W_srv/(phi_n·F_m)
    energy_n  = kappa_n·W_loc·f_n^2 + p_n·D_n/r_nm(b_n, p_n)     (the user's battery; the server's is not charged)
    quality_n = alpha_n·(1 + gamma·(2·rho_n - rho_n^2))           (more layers adapted, with diminishing returns)
    SCR       = sum quality_n / sum (w_d·delay_n + w_e·energy_n)

One ratio of sums: Dinkelbach's method solves it exactly given an exact inner solver (a sum of per-user ratios
would need the quadratic transform of the JSAC paper instead).

Algorithm. Dinkelbach: lambda_0 is the SCR of a plain allocation; each iteration maximises
F(lambda) = sum quality - lambda·sum cost and moves lambda to the SCR of the maximiser, until F(lambda) < tol·sum
quality. The previous allocation is always a candidate, so F(lambda) >= 0 and lambda never decreases. Inside:
- association: the Hungarian method (linear_sum_assignment) on users × slots, each server's column repeated once per
  slot of its capacity; an entry is the user's best share of F on that server given an equal slot share of its band
  and compute. The previous association is tried as well and the better kept.
- CPU speed: w_d·W/f + w_e·kappa·W·f^2 is least at f = (w_d/(2·w_e·kappa))^(1/3), capped at the top speed,
  whatever the rest.
- band and power, per server: lambda scales out of the upload cost sum (w_d + w_e·p_n)·D_n/r(b_n, p_n), so they depend
  on the association only. Alternating optimisation: shares given powers are convex (the rate is concave in the
  share; cvxpy, exponential cone); the power given the share has a closed form: with a = g/(b·B·N0) and
  z = a·w_d/w_e - 1, the stationary point is 1 + a·p = z/W0(z/e) (Lambert W), capped at the top power.
- offloading ratios and server compute shares, per server: the server time sum_n rho_n·w_n/phi_n (w_n = W_n/F) is least
  at phi_n ∝ v_n = sqrt(rho_n·w_n), where it equals (sum v)^2. So the block is the QCQP
      max sum alpha·gamma·(2·rho - rho^2) - lambda·w_d·(sum v)^2   subject to  v_n^2 >= rho_n·w_n,  0 <= rho <= 1,
  a concave quadratic objective under reverse-convex quadratic constraints (the objective falls with v, so the
  constraints hold with equality at the optimum): nonconvex, because (sum sqrt(rho_n·w_n))^2 is concave in rho.
  Semidefinite relaxation: lift y = (rho, v) to Y = y·y^T, drop rank Y = 1, keep [[Y, y], [y^T, 1]] PSD, the valid
  cuts sqrt(w)·rho <= v <= sqrt(w) (sqrt(rho) >= rho on [0, 1]) and the products of pairs of them (RLT); solved
  with cvxpy, its optimum bounds the QCQP's from above. Recovery: Gaussian randomisation with mean y and covariance
  Y - y·y^T; each draw gives rho (directly, or as v^2/w), clipped to [0, 1] and given its optimal compute shares;
  the three best are polished by exact coordinate ascent on rho, and the best of those kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.special import lambertw

from seam.finetune.allocation import LN2, checked, positive, rate_bps, users
from seam.finetune.dashf_offload import SOLVER, optimal_cpu_shares, offload_sdr
from seam.runtime.errors import SeamError

PER_USER = ("powers_w", "upload_bits", "local_flop", "server_flop", "top_flops", "energy_coeff", "quality")
PER_SERVER = ("server_flops", "bandwidth_hz", "capacity")


@dataclass(frozen=True)
class DashfSetup:
    """N users, M servers; per-user arrays have shape (N,), per-server arrays (M,)."""

    gains: np.ndarray  # (N, M) channel power gain from each user to each server
    powers_w: np.ndarray  # top transmit power
    upload_bits: np.ndarray  # cut activations and the user's trained adapters, per round
    local_flop: np.ndarray  # FLOPs per round of the user's own adapter layers
    server_flop: np.ndarray  # FLOPs per round of all the later adapter layers (offloading ratio 1)
    top_flops: np.ndarray  # the user's top compute speed, FLOP/s
    energy_coeff: np.ndarray  # kappa: joules per FLOP per (FLOP/s)^2
    quality: np.ndarray  # alpha: the user's service quality with no layer offloaded
    server_flops: np.ndarray  # F_m
    bandwidth_hz: np.ndarray  # B_m
    capacity: np.ndarray  # users each server can take
    noise_w_per_hz: float
    delay_weight: float = 1.0  # w_d, per second
    energy_weight: float = 1.0  # w_e, per joule
    offload_gain: float = 1.0  # gamma

    def __post_init__(self) -> None:
        count = users(self.gains)
        servers = np.shape(self.server_flops)[0] if np.ndim(self.server_flops) == 1 else 0
        if servers == 0:
            raise SeamError("no servers: give at least one server (one server_flops entry per server)")
        object.__setattr__(self, "gains", checked("gains", self.gains, (count, servers)))
        for name in PER_USER:
            object.__setattr__(self, name, checked(name, getattr(self, name), (count,)))
        for name in PER_SERVER:
            object.__setattr__(self, name, checked(name, getattr(self, name), (servers,), integer=name == "capacity"))
        if self.capacity.sum() < count:
            raise SeamError(f"{count} users but the servers take only {self.capacity.sum()}; raise their capacity")
        for name in ("noise_w_per_hz", "delay_weight", "energy_weight", "offload_gain"):
            object.__setattr__(self, name, positive(name, getattr(self, name)))


@dataclass(frozen=True)
class DashfAllocation:
    server: np.ndarray  # (N,) the server each user trains with
    shares: np.ndarray  # (N,) share of its server's band
    powers_w: np.ndarray  # (N,)
    flops: np.ndarray  # (N,) the user's CPU speed
    cpu_shares: np.ndarray  # (N,) share of its server's compute
    offload: np.ndarray  # (N,) offloading ratio rho


@dataclass(frozen=True)
class Outcome:
    quality: np.ndarray
    delay_s: np.ndarray
    energy_j: np.ndarray
    cost: np.ndarray  # w_d·delay + w_e·energy

    @property
    def ratio(self) -> float:
        return float(self.quality.sum() / self.cost.sum())


@dataclass(frozen=True)
class Fixed:
    """What a baseline keeps fixed instead of optimising."""

    association: np.ndarray | None = None
    equal_bandwidth: bool = False
    offload: float | None = None  # one offloading ratio for all users: the fixed-cut baseline


@dataclass(frozen=True)
class DashfResult:
    allocation: DashfAllocation
    ratio: float
    lambdas: tuple[float, ...]  # lambda at each iteration, non-decreasing
    gaps: tuple[float, ...]  # F(lambda) at each iteration
    relaxation_gaps: tuple[float, ...]  # (bound - value)/bound of each semidefinite relaxation solved


def evaluate(setup: DashfSetup, allocation: DashfAllocation) -> Outcome:
    """Quality, delay, energy and cost of every user; refuses an allocation that overbooks a server."""
    server = allocation.server
    if server.shape != (setup.gains.shape[0],) or np.any((server < 0) | (server >= setup.capacity.size)):
        raise SeamError(f"the association must name one server in [0, {setup.capacity.size}) per user")
    for name, shares in (("band", allocation.shares), ("compute", allocation.cpu_shares)):
        if np.any(np.bincount(server, shares, setup.capacity.size) > 1 + 1e-9):
            raise SeamError(f"a server's {name} shares sum to more than 1")
    if np.any(np.bincount(server, minlength=setup.capacity.size) > setup.capacity):
        raise SeamError("a server has more users than its capacity")
    rows = np.arange(server.size)
    k_hz = allocation.powers_w * setup.gains[rows, server] / setup.noise_w_per_hz
    upload_s = setup.upload_bits / rate_bps(allocation.shares, setup.bandwidth_hz[server], k_hz)
    offloaded = allocation.offload > 0
    server_s = np.zeros(server.size)
    server_s[offloaded] = (allocation.offload * setup.server_flop)[offloaded] / (
        allocation.cpu_shares * setup.server_flops[server])[offloaded]
    delay = setup.local_flop / allocation.flops + upload_s + server_s
    energy = setup.energy_coeff * setup.local_flop * allocation.flops ** 2 + allocation.powers_w * upload_s
    quality = setup.quality * (1 + setup.offload_gain * allocation.offload * (2 - allocation.offload))
    return Outcome(quality, delay, energy, setup.delay_weight * delay + setup.energy_weight * energy)


def parametric(setup: DashfSetup, allocation: DashfAllocation, lam: float) -> float:
    """Dinkelbach's F at lambda for one allocation: sum quality - lambda·sum cost."""
    outcome = evaluate(setup, allocation)
    return float(outcome.quality.sum() - lam * outcome.cost.sum())


def cpu_speeds(setup: DashfSetup) -> np.ndarray:
    best = (setup.delay_weight / (2 * setup.energy_weight * setup.energy_coeff)) ** (1 / 3)
    return np.minimum(best, setup.top_flops)


def best_powers(setup: DashfSetup, gains, shares, bandwidth_hz, top_w) -> np.ndarray:
    """The power minimising (w_d + w_e·p)/rate for each user at its band share, capped at its top power."""
    per_watt = np.asarray(gains) / (np.asarray(shares) * bandwidth_hz * setup.noise_w_per_hz)
    z = per_watt * setup.delay_weight / setup.energy_weight - 1
    near_zero = np.abs(z) < 1e-12
    safe = np.where(near_zero, 1.0, z)
    snr = np.where(near_zero, math.e, safe / lambertw(safe / math.e).real) - 1
    return np.minimum(snr / per_watt, top_w)


def _shares_given_powers(weights: np.ndarray, k_hz: np.ndarray, bandwidth_hz: float) -> np.ndarray:
    """Band shares minimising sum weights/rate on one server (convex; weights in joules and seconds per bit/s)."""
    import cvxpy as cp

    if weights.size == 1:
        return np.ones(1)
    shares = cp.Variable(weights.size, nonneg=True)
    per_unit = weights * LN2 / bandwidth_hz
    scale = per_unit.max() / (k_hz / bandwidth_hz).max()  # the cost of the best user with the whole band, roughly
    cost = cp.sum(cp.multiply(per_unit / scale, cp.inv_pos(-cp.rel_entr(shares, shares + k_hz / bandwidth_hz))))
    problem = cp.Problem(cp.Minimize(cost), [cp.sum(shares) <= 1])
    problem.solve(**SOLVER)
    if problem.status != cp.OPTIMAL:
        raise SeamError(f"the conic solver did not find the band shares (status {problem.status})")
    solved = np.clip(shares.value, 1e-12, None)
    return solved / max(1.0, solved.sum())


def upload_allocation(setup: DashfSetup, server: int, members: np.ndarray, equal: bool) -> tuple[np.ndarray, ...]:
    """Band shares and powers of ``members`` on ``server``, alternating the two exact block solutions."""
    gains, bits = setup.gains[members, server], setup.upload_bits[members]
    bandwidth, top = setup.bandwidth_hz[server], setup.powers_w[members]
    shares, powers, previous = np.full(members.size, 1 / members.size), top, math.inf
    for _ in range(50):
        powers = best_powers(setup, gains, shares, bandwidth, top)
        weights = (setup.delay_weight + setup.energy_weight * powers) * bits
        k_hz = powers * gains / setup.noise_w_per_hz
        cost = float((weights / rate_bps(shares, bandwidth, k_hz)).sum())
        if equal or cost > previous * (1 - 1e-7):
            break
        previous = cost
        shares = _shares_given_powers(weights, k_hz, bandwidth)
    return shares, powers


def slot_values(setup: DashfSetup, lam: float, offload: float | None = None) -> np.ndarray:
    """(N, M): each user's best share of F(lambda) on each server with an equal slot share of band and compute."""
    slot = 1 / setup.capacity[None, :]
    powers = best_powers(setup, setup.gains, slot, setup.bandwidth_hz[None, :], setup.powers_w[:, None])
    rate = rate_bps(slot, setup.bandwidth_hz[None, :], powers * setup.gains / setup.noise_w_per_hz)
    upload = (setup.delay_weight + setup.energy_weight * powers) * setup.upload_bits[:, None] / rate
    flops = cpu_speeds(setup)
    local = setup.local_flop * (setup.delay_weight / flops + setup.energy_weight * setup.energy_coeff * flops ** 2)
    gain = (setup.quality * setup.offload_gain)[:, None]
    work_s = setup.server_flop[:, None] / (setup.server_flops[None, :] * slot)
    price = lam * setup.delay_weight
    rho = np.clip(1 - price * work_s / (2 * gain), 0, 1) if offload is None else np.full_like(work_s, offload)
    server = gain * rho * (2 - rho) - price * rho * work_s
    return setup.quality[:, None] + server - lam * (local[:, None] + upload)


def _hungarian(setup: DashfSetup, value: np.ndarray) -> np.ndarray:
    """The association with the largest summed (N, M) ``value``, each server repeated once per slot."""
    slots = np.repeat(np.arange(setup.capacity.size), setup.capacity)
    rows, columns = linear_sum_assignment(-value[:, slots])
    server = np.empty(setup.gains.shape[0], int)
    server[rows] = slots[columns]
    return server


def associate(setup: DashfSetup, lam: float, offload: float | None = None) -> np.ndarray:
    """DASHF's association at lambda: the Hungarian method on the slot values."""
    return _hungarian(setup, slot_values(setup, lam, offload))


def strongest(setup: DashfSetup) -> np.ndarray:
    """Each user with the server it hears best, within capacity."""
    return _hungarian(setup, np.log(setup.gains))


def random_association(setup: DashfSetup, rng: np.random.Generator) -> np.ndarray:
    slots = np.repeat(np.arange(setup.capacity.size), setup.capacity)
    return rng.permutation(slots)[:setup.gains.shape[0]]


def plain(setup: DashfSetup, server: np.ndarray, offload: float = 0.5) -> DashfAllocation:
    """No optimisation: each server's band and compute split evenly, top power and speed, one offloading ratio."""
    load = np.bincount(server, minlength=setup.capacity.size)[server]
    return DashfAllocation(server, 1 / load, setup.powers_w, setup.top_flops, 1 / load,
                           np.full(server.size, float(offload)))


def allocate(setup: DashfSetup, server: np.ndarray, lam: float, fixed: Fixed, rng: np.random.Generator,
             uploads: dict, draws: int = 32) -> tuple[DashfAllocation, list[float]]:
    """The continuous allocation for one association at lambda, and the relative gap of each relaxation solved.

    ``uploads`` memoises band and power per (server, members): they do not depend on lambda.
    """
    count = server.size
    shares, powers, cpu_shares, offload = np.ones(count), setup.powers_w.copy(), np.ones(count), np.zeros(count)
    gaps = []
    for m in range(setup.capacity.size):
        members = np.flatnonzero(server == m)
        if members.size == 0:
            continue
        key = (m, tuple(members), fixed.equal_bandwidth)
        if key not in uploads:
            uploads[key] = upload_allocation(setup, m, members, fixed.equal_bandwidth)
        shares[members], powers[members] = uploads[key]
        gain = setup.quality[members] * setup.offload_gain
        work_s = setup.server_flop[members] / setup.server_flops[m]
        if fixed.offload is None:
            solution = offload_sdr(gain, work_s, lam * setup.delay_weight, rng, draws)
            offload[members], cpu_shares[members] = solution.offload, solution.cpu_shares
            gaps.append((solution.bound - solution.value) / max(solution.bound, 1e-12))
        else:
            offload[members] = fixed.offload
            cpu_shares[members] = optimal_cpu_shares(work_s, offload[members])
    return DashfAllocation(server, shares, powers, cpu_speeds(setup), cpu_shares, offload), gaps


def dinkelbach(setup: DashfSetup, rng: np.random.Generator, fixed: Fixed = Fixed(), tol: float = 1e-6,
               max_iterations: int = 30, draws: int = 32) -> DashfResult:
    """DASHF: Dinkelbach iterations over association (Hungarian) and the continuous allocation."""
    if fixed.association is not None:
        start = checked("association", fixed.association, (setup.gains.shape[0],), positive=False, integer=True)
    else:
        start = strongest(setup)
    allocation = plain(setup, start, 0.5 if fixed.offload is None else fixed.offload)
    lam = evaluate(setup, allocation).ratio
    uploads: dict = {}
    lambdas, gaps, relaxation_gaps = [], [], []
    for _ in range(max_iterations):
        associations = [allocation.server]
        if fixed.association is None:
            hungarian = associate(setup, lam, fixed.offload)
            if not np.array_equal(hungarian, allocation.server):
                associations.append(hungarian)
        candidates = [allocation]
        for server in associations:
            candidate, solved_gaps = allocate(setup, server, lam, fixed, rng, uploads, draws)
            candidates.append(candidate)
            relaxation_gaps += solved_gaps
        values = [parametric(setup, candidate, lam) for candidate in candidates]
        allocation = candidates[int(np.argmax(values))]
        lambdas.append(lam)
        gaps.append(max(values))
        if gaps[-1] <= tol * evaluate(setup, allocation).quality.sum():
            break
        lam = evaluate(setup, allocation).ratio
    return DashfResult(allocation, evaluate(setup, allocation).ratio, tuple(lambdas), tuple(gaps),
                       tuple(relaxation_gaps))
