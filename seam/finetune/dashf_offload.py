"""DASHF's offloading block (``seam.finetune.dashf``): the offloading ratios and compute shares of one server's
users, a nonconvex QCQP solved by semidefinite relaxation with Gaussian randomisation and polished by exact
coordinate ascent (the derivation is in ``dashf``'s docstring)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from seam.runtime.errors import SeamError

# A little looser than Clarabel's defaults (1e-8): at those, its last steps sometimes lose accuracy on these problems.
SOLVER = {"solver": "CLARABEL", "tol_gap_abs": 1e-7, "tol_gap_rel": 1e-7, "tol_feas": 1e-7}


@dataclass(frozen=True)
class OffloadSolution:
    bound: float  # the relaxation's optimum: no allocation of this server does better
    value: float  # the recovered allocation's objective
    offload: np.ndarray
    cpu_shares: np.ndarray


def optimal_cpu_shares(work_s: np.ndarray, offload: np.ndarray) -> np.ndarray:
    """The compute shares that minimise the summed server time: proportional to sqrt(rho·W)."""
    root = np.sqrt(offload * work_s)
    return root / root.sum() if root.sum() > 0 else np.full(work_s.size, 1 / work_s.size)


def _offload_value(gain, work_s, price, offload, cpu_shares) -> float:
    with np.errstate(divide="ignore", invalid="ignore"):
        server_s = np.where(offload > 0, offload * work_s / cpu_shares, 0.0)
    return float((gain * offload * (2 - offload)).sum() - price * server_s.sum())


def _ascend(gain, work_s, price, offload) -> tuple[np.ndarray, np.ndarray]:
    """Exact coordinate ascent on rho, the compute shares kept optimal: each step can only improve.

    With u = sqrt(rho), r = sqrt(w) and S the other users' sum of r·u, user n's objective
    gain·(2u^2 - u^4) - price·(S + r·u)^2 is a quartic on [0, 1] whose stationary points are a cubic's roots.
    Unlike alternating the two closed forms, this can bring back a user whose rho is 0.
    """
    u, root = np.sqrt(offload), np.sqrt(work_s)
    for _ in range(100):
        moved = 0.0
        for n in range(u.size):
            others = root @ u - root[n] * u[n]
            linear = 4 * gain[n] - 2 * price * root[n] ** 2
            stationary = np.roots([-4 * gain[n], 0, linear, -2 * price * root[n] * others])
            options = np.concatenate([[0.0, 1.0, u[n]], stationary.real[np.abs(stationary.imag) < 1e-12]])
            options = options[(options >= 0) & (options <= 1)]
            values = gain[n] * (2 * options ** 2 - options ** 4) - price * (others + root[n] * options) ** 2
            best = options[int(np.argmax(values))]
            moved, u[n] = max(moved, abs(best - u[n])), best
        if moved < 1e-12:
            break
    return u ** 2, optimal_cpu_shares(work_s, u ** 2)


def offload_sdr(gain, work_s, price: float, rng: np.random.Generator, draws: int = 32) -> OffloadSolution:
    """One server's offloading ratios and compute shares, by semidefinite relaxation and Gaussian randomisation.

    ``gain``: alpha·gamma per user; ``work_s``: W_srv/F, seconds on the whole server; ``price``: lambda·w_d.
    """
    import cvxpy as cp

    gain, work_s = np.asarray(gain, float), np.asarray(work_s, float)
    n, root = gain.size, np.sqrt(work_s)
    lifted = cp.Variable((2 * n + 1, 2 * n + 1), PSD=True)
    y, square = lifted[:2 * n, 2 * n], lifted[:2 * n, :2 * n]
    rho, v = y[:n], y[n:]
    rho_rho, v_v, rho_v = square[:n, :n], square[n:, n:], square[:n, n:]  # rho_v[i, j] stands for rho_i·v_j
    v_row, rho_row = cp.reshape(v, (1, n), order="C"), cp.reshape(rho, (1, n), order="C")
    outer_root = np.outer(root, root)
    constraints = [
        lifted[2 * n, 2 * n] == 1, rho >= 0, rho <= 1,
        v >= cp.multiply(root, rho), v <= root,  # sqrt(rho) >= rho on [0, 1]
        cp.diag(v_v) >= cp.multiply(work_s, rho),
        cp.diag(rho_rho) <= rho,
        rho_rho >= 0, v_v >= 0, rho_v >= 0,
        # products of pairs of the cuts above (RLT): without them the bound gives every user the whole server
        v_v - cp.multiply(root[:, None], rho_v) - cp.multiply(root[None, :], rho_v.T)
        + cp.multiply(outer_root, rho_rho) >= 0,
        outer_root - root[:, None] @ v_row - cp.reshape(v, (n, 1), order="C") @ root[None, :] + v_v >= 0,
        root[:, None] @ v_row - cp.multiply(outer_root, np.ones((n, 1)) @ rho_row) - v_v
        + cp.multiply(root[None, :], rho_v.T) >= 0,
    ]
    problem = cp.Problem(cp.Maximize(gain @ (2 * rho - cp.diag(rho_rho)) - price * cp.sum(v_v)), constraints)
    problem.solve(**SOLVER)
    if problem.status != cp.OPTIMAL:
        raise SeamError(f"the semidefinite relaxation did not solve (status {problem.status})")
    mean = y.value
    eigenvalues, vectors = np.linalg.eigh(square.value - np.outer(mean, mean))
    draws_y = mean + rng.standard_normal((draws, 2 * n)) @ (vectors * np.sqrt(np.clip(eigenvalues, 0, None))).T
    candidates = [np.zeros(n), *np.clip(np.vstack([mean[:n], draws_y[:, :n]]), 0, 1),
                  *np.clip(np.vstack([mean[n:], draws_y[:, n:]]) ** 2 / work_s, 0, 1)]
    scores = [_offload_value(gain, work_s, price, rho, optimal_cpu_shares(work_s, rho)) for rho in candidates]
    polished = [_ascend(gain, work_s, price, candidates[i]) for i in np.argsort(scores)[-3:]]
    offload, cpu_shares = max(polished, key=lambda option: _offload_value(gain, work_s, price, *option))
    return OffloadSolution(float(problem.value), _offload_value(gain, work_s, price, offload, cpu_shares), offload,
                           cpu_shares)
