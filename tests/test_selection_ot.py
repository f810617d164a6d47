"""The OT maths of GOT-D against POT: entropic potentials equal POT's log-domain Sinkhorn duals, tend
to the exact LP duals of `ot.emd`, the blockwise/lazy/over-relaxed paths equal the dense one, and the
ranking is the gradient of the OT objective (checked by finite differences)."""
from __future__ import annotations

import numpy as np
import ot as pot
import pytest
import torch

from trainer.selection import ot


def problem(n, m, d, seed, uniform=False):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(n, d)), rng.normal(size=(m, d)) + 0.5
    a = np.full(n, 1 / n) if uniform else rng.uniform(0.5, 1.5, n)
    b = np.full(m, 1 / m) if uniform else rng.uniform(0.5, 1.5, m)
    return x, y, a / a.sum(), b / b.sum()


def same_up_to_constant(f, g, f_ref, g_ref, atol):
    """(f, g) ~ (f_ref + c, g_ref - c) for one constant c."""
    c = float(np.mean(f - f_ref))
    np.testing.assert_allclose(f - c, f_ref, atol=atol)
    np.testing.assert_allclose(g + c, g_ref, atol=atol)


def pot_log_duals(x, y, a, b, eps):
    M = pot.dist(x, y)  # squared Euclidean, as ours
    _, log = pot.sinkhorn(a, b, M, eps, method="sinkhorn_log", log=True, stopThr=1e-13, numItermax=100000)
    # POT's plan is exp(log_u + log_v - M/eps); ours a_i b_j exp((f_i + g_j - C_ij)/eps)
    return eps * (log["log_u"] - np.log(a)), eps * (log["log_v"] - np.log(b)), M


def solve64(x, y, a, b, eps, **kw):
    t = lambda v: torch.as_tensor(v, dtype=torch.float64)  # noqa: E731
    return ot.sinkhorn(t(x), t(y), eps, t(a), t(b), tol=kw.pop("tol", 1e-12), max_iter=kw.pop("max_iter", 20000), **kw)


@pytest.mark.parametrize("eps", [1.0, 0.1])
@pytest.mark.parametrize("mode", ["in_memory", "lazy"])
def test_potentials_equal_pot_log_sinkhorn(eps, mode):
    x, y, a, b = problem(13, 29, 3, seed=1)
    f_ref, g_ref, _ = pot_log_duals(x, y, a, b, eps)
    res = solve64(x, y, a, b, eps, block_size=7, max_kernel_bytes=0 if mode == "lazy" else 2**30)
    assert res.converged and res.kernel_in_memory == (mode == "in_memory")
    same_up_to_constant(res.f.numpy(), res.g.numpy(), f_ref, g_ref, atol=1e-8)


def test_transport_cost_and_objective_match_pots_plan():
    x, y, a, b = problem(11, 17, 4, seed=2)
    eps = 0.3
    M = pot.dist(x, y)
    plan = pot.sinkhorn(a, b, M, eps, method="sinkhorn_log", stopThr=1e-13, numItermax=100000)
    res = solve64(x, y, a, b, eps, block_size=5)
    assert res.transport_cost == pytest.approx(float((plan * M).sum()), rel=1e-8)
    kl = float((plan * np.log(plan / np.outer(a, b))).sum())
    assert res.objective == pytest.approx(float((plan * M).sum()) + eps * kl, rel=1e-8)


def test_small_epsilon_tends_to_the_exact_lp_duals_of_emd():
    # generic weights make the optimal plan a spanning tree, so the LP duals are unique up to a constant
    x, y, a, b = problem(6, 9, 2, seed=3)
    M = pot.dist(x, y)
    _, log = pot.emd(a, b, M, log=True)
    gaps = []
    for eps in (0.1, 0.03, 0.01):
        res = solve64(x, y, a, b, eps, tol=1e-10, max_iter=20000)
        assert res.converged
        c = float(np.mean(res.f.numpy() - log["u"]))
        gaps.append(max(np.abs(res.f.numpy() - c - log["u"]).max(), np.abs(res.g.numpy() + c - log["v"]).max()))
        assert res.transport_cost == pytest.approx(float(log["cost"]), rel=0.05 * eps)
    # the entropic duals approach the LP's at the rate of epsilon (costs here span 0.03 .. 23)
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 0.05 and gaps[2] / gaps[0] < 0.15


def test_over_relaxation_and_float32_blocks_reach_the_same_potentials():
    x, y, a, b = problem(40, 300, 16, seed=4, uniform=True)
    f_ref, g_ref, _ = pot_log_duals(x, y, a, b, 2.0)
    fast = solve64(x, y, a, b, 2.0, momentum=1.5, block_size=64)
    same_up_to_constant(fast.f.numpy(), fast.g.numpy(), f_ref, g_ref, atol=1e-8)
    plain = solve64(x, y, a, b, 2.0, block_size=64)
    assert fast.iterations < plain.iterations  # the point of over-relaxation
    x32, y32 = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    for kernel_bytes in (2**30, 0):  # kernel held vs recomputed per iteration
        r32 = ot.sinkhorn(x32, y32, 2.0, tol=1e-5, block_size=37, max_kernel_bytes=kernel_bytes)
        # Stopping at an L1 marginal error tol leaves a row's mass off by at most tol, i.e. a relative
        # error of tol * n for mass 1/n, so its potential by up to eps * tol * n (2 * 1e-5 * 40 = 8e-4).
        same_up_to_constant(r32.f.numpy(), r32.g.numpy(), f_ref, g_ref, atol=2.0 * 1e-5 * len(x))


def test_far_apart_clouds_need_the_log_domain_and_still_match():
    # exp(-C/eps) underflows for every pair (C/eps ~ 1e4): only the stabilised path can solve this
    x, y, a, b = problem(8, 12, 2, seed=5)
    y = y + 30.0
    f_ref, g_ref, M = pot_log_duals(x, y, a, b, 0.1)
    assert float(np.exp(-M / 0.1).max()) == 0.0
    res = solve64(x, y, a, b, 0.1, block_size=5)
    assert res.converged
    same_up_to_constant(res.f.numpy(), res.g.numpy(), f_ref, g_ref, atol=1e-7)


def test_ranking_is_the_gradient_of_the_ot_objective():
    """GOT-D's score for candidate j is d OT / d b_j with the mass taken evenly from the others
    (LAVA's calibration): compare with a finite difference of POT's regularised objective."""
    x, y, a, b = problem(7, 10, 3, seed=6, uniform=True)
    eps, h = 0.5, 1e-6
    M = pot.dist(x, y)

    def objective(weights):
        plan = pot.sinkhorn(a, weights, M, eps, method="sinkhorn_log", stopThr=1e-14, numItermax=100000)
        return float((plan * M).sum() + eps * (plan * np.log(plan / np.outer(a, weights))).sum())

    res = solve64(x, y, a, b, eps)
    score = ot.calibrated_gradient(res.g).numpy()
    for j in range(len(b)):
        step = np.full(len(b), -h / (len(b) - 1))
        step[j] = h
        numeric = (objective(b + step) - objective(b - step)) / (2 * h)
        assert score[j] == pytest.approx(numeric, abs=1e-4)


def test_ranking_ignores_the_additive_constant_and_the_calibration():
    g = torch.tensor([0.3, -1.2, 0.3, 2.0, -0.5, -1.2], dtype=torch.float64)
    expected = [1, 5, 4, 0, 2, 3]  # ascending, ties by index
    assert ot.gradient_order(g).tolist() == expected
    assert ot.gradient_order(g + 17.5).tolist() == expected
    assert ot.gradient_order(ot.calibrated_gradient(g)).tolist() == expected
    # the calibration removes the constant entirely
    torch.testing.assert_close(ot.calibrated_gradient(g + 17.5), ot.calibrated_gradient(g))
