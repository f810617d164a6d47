"""Ferret's maths against independent references: scipy's truncated normal, the exact second
moment of the estimator derived by hand, Monte Carlo, a full orthonormal basis, a second process."""
from __future__ import annotations

import hashlib
import math
import subprocess
import sys

import mpmath
import pytest
import torch
from scipy.stats import truncnorm

from trainer.federated import ferret
from trainer.federated.ferret import Block


@pytest.mark.parametrize("d", [1, 7, 1_000, 10**5, 10**6, 10**7, 10**9])
def test_entry_variance_is_the_truncated_normals(d):
    # 40-digit arithmetic on the closed form (scipy's own truncnorm.var() loses digits past d ~ 1e6)
    with mpmath.workdps(40):
        a = 1 / mpmath.sqrt(d)
        exact = 1 - 2 * a * mpmath.npdf(a) / mpmath.erf(a / mpmath.sqrt(2))
    assert ferret.entry_variance(d) == pytest.approx(float(exact), rel=1e-9)
    if d <= 10**5:
        assert ferret.entry_variance(d) == pytest.approx(truncnorm(-1 / math.sqrt(d), 1 / math.sqrt(d)).var(), rel=1e-7)
    assert ferret.entry_variance(d) * 3 * d == pytest.approx(1, rel=1 / d + 1e-9)  # ~ 1/(3d), as the paper says


def test_bases_are_fp32_truncated_normal_with_that_variance():
    d = 64
    v = ferret.bases(seed=3, index=0, count=4000, size=d)
    assert v.dtype == torch.float32 and v.shape == (4000, d)
    assert v.abs().max() <= 1 / math.sqrt(d)
    # 256k draws: the sample variance is within a few standard errors of rho
    assert float(v.double().var()) == pytest.approx(ferret.entry_variance(d), rel=0.02)
    # E[v v^T] = rho I: off-diagonal second moments vanish
    second = (v.double().T @ v.double()) / len(v)
    off = second - torch.diag(torch.diagonal(second))
    assert float(off.abs().max()) < 0.15 * ferret.entry_variance(d)


def test_a_basis_is_a_function_of_seed_block_and_shape():
    whole = ferret.bases(7, 3, 50, 1000)
    assert torch.equal(ferret.bases(7, 3, 50, 1000), whole)
    assert not torch.equal(ferret.bases(7, 4, 50, 1000), whole)  # another block, another stream
    assert not torch.equal(ferret.bases(8, 3, 50, 1000), whole)
    # rows are drawn CHUNK_VALUES at a time, and torch's sampler gives other numbers for other
    # chunkings: client and server agree because both use the constant, which this pins
    chunks = list(ferret.basis_chunks(7, 3, 50, ferret.CHUNK_VALUES // 2 + 1))
    assert [len(rows) for _, rows in chunks] == [1] * 50


def _second_moment_ratio(d: int, k: int) -> float:
    """E||Delta_hat - Delta||^2 / ||Delta||^2 for the unbiased estimator with K i.i.d. bases of
    i.i.d. entries (variance rho, fourth moment mu4): (d - 2 + mu4 / rho^2) / K, worked out from
    E[(v.D)^2 ||v||^2] = ||D||^2 (mu4 + (d - 1) rho^2) and E[v v^T] = rho I; moments from scipy."""
    a = 1 / math.sqrt(d)
    dist = truncnorm(-a, a)
    return (d - 2 + dist.moment(4) / dist.var() ** 2) / k


def _monte_carlo(d, k, draws, scaling="unbiased"):
    torch.manual_seed(0)
    delta = torch.randn(d)
    blocks = [Block(0, d)]
    total, sq_err = torch.zeros(d, dtype=torch.float64), 0.0
    for seed in range(draws):
        counts, coeffs = ferret.project(delta, blocks, seed, k, scaling=scaling)
        assert counts == [k] and coeffs.shape == (k,)
        hat = ferret.reconstruct(blocks, seed, counts, coeffs, d).double()
        total += hat
        sq_err += float((hat - delta.double()).square().sum())
    return delta.double(), total / draws, sq_err / draws / float(delta.double().square().sum())


def test_reconstruction_is_unbiased_and_its_error_is_sqrt_d_over_k():
    d, k, draws = 200, 20, 4000
    delta, mean, mse = _monte_carlo(d, k, draws)
    expected = _second_moment_ratio(d, k)  # ~ d/K = 10
    # the mean of N draws has relative error ~ sqrt(expected / N) = 0.05; allow 3 sigma
    assert float((mean - delta).norm() / delta.norm()) < 3 * math.sqrt(expected / draws)
    assert mse == pytest.approx(expected, rel=0.1)
    # four times the bases, a quarter of the squared error (the sqrt(d/K) law)
    _, _, mse4 = _monte_carlo(d, 4 * k, 1000)
    assert mse4 == pytest.approx(_second_moment_ratio(d, 4 * k), rel=0.15)
    assert mse / mse4 == pytest.approx(4, rel=0.2)


def test_the_official_codes_scaling_reconstructs_a_third():
    d, k, draws = 200, 20, 2000
    delta, mean, _ = _monte_carlo(d, k, draws, scaling="code")
    rho = ferret.entry_variance(d)
    # d/K instead of 1/(rho K): the expectation is rho * d * Delta, about Delta / 3
    assert float((mean - rho * d * delta).norm() / delta.norm()) < 3 * math.sqrt(_second_moment_ratio(d, k) / draws) / 3
    assert rho * d == pytest.approx(1 / 3, rel=0.01)


def test_a_full_orthonormal_basis_reproduces_the_update():
    torch.manual_seed(1)
    delta = torch.randn(300)
    blocks = ferret.make_blocks([100, 150, 50], block_size=128)
    counts, coeffs = ferret.project(delta, blocks, seed=11, num_bases=0, scaling="exact")
    assert counts == [b.size for b in blocks]  # K_l = d_l
    hat = ferret.reconstruct(blocks, 11, counts, coeffs, 300, exact=True)
    assert torch.allclose(hat, delta, atol=1e-5)
    q = ferret.orthonormal_basis(11, 0, 100)
    assert torch.allclose(q @ q.T, torch.eye(100), atol=1e-5)


def test_k_l_follows_the_block_norms():
    delta = torch.cat([torch.full((1000,), 1.0), torch.full((1000,), 3.0), torch.zeros(1000)])
    blocks = ferret.make_blocks([1000, 1000, 1000], 1000)
    counts, coeffs = ferret.project(delta, blocks, 0, 42, floor=2)
    # floor 2 each, the other 36 split 1:3:0 by norm
    assert counts == [2 + 9, 2 + 27, 2] and coeffs.numel() == 42


@pytest.mark.parametrize("norms,sizes,total,floor,expected", [
    ([1, 3], [100, 100], 40, 0, [10, 30]),
    ([1, 1, 1], [100, 100, 100], 10, 1, [4, 3, 3]),  # largest remainders, ties to the first
    ([0, 0], [5, 100], 20, 1, [5, 15]),  # no signal: even split, capped at the block size
    ([100, 1], [3, 1000], 30, 1, [3, 27]),  # a block never gets more bases than values
    ([float("nan"), 1], [50, 50], 10, 1, [5, 5]),
])
def test_allocate(norms, sizes, total, floor, expected):
    got = ferret.allocate(norms, sizes, total, floor)
    assert got == expected and sum(got) == min(total, sum(sizes))


def test_allocate_refuses_fewer_bases_than_blocks():
    with pytest.raises(ValueError):
        ferret.allocate([1, 1, 1], [10, 10, 10], 2, 1)


def test_blocks_cover_the_vector_and_never_mix_a_large_tensor():
    numels = [10, 5000, 3, 3, 2000, 1, 999, 7]
    blocks = ferret.make_blocks(numels, 1000)
    assert blocks[0].start == 0 and all(a.stop == b.start for a, b in zip(blocks, blocks[1:]))
    assert blocks[-1].stop == sum(numels) and all(1 <= b.size <= 1000 for b in blocks)
    starts = [0, 10, 5010, 5013, 5016, 7016, 7017, 8016]  # tensor boundaries
    for big_start, big_size in [(10, 5000), (5016, 2000)]:
        inside = [b for b in blocks if big_start <= b.start < big_start + big_size]
        assert sum(b.size for b in inside) == big_size and len(inside) == math.ceil(big_size / 1000)
    assert [b.start for b in blocks if b.start in starts] == [b.start for b in blocks if b.start in starts]


SCRIPT = """
import hashlib, sys, torch
from trainer.federated import ferret
torch.manual_seed(12345)  # the global RNG must not matter
torch.set_num_threads(1)  # nor the thread count
v = ferret.bases(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
print(hashlib.sha256(v.numpy().tobytes()).hexdigest())
"""


def test_bases_regenerate_bit_identically_in_another_process():
    seed, index, count, size = ferret.derive_seed("bases", 42, 3, 1), 5, 33, 4097
    here = hashlib.sha256(ferret.bases(seed, index, count, size).numpy().tobytes()).hexdigest()
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(seed), str(index), str(count), str(size)],
                         capture_output=True, text=True, check=True, env={"PYTHONPATH": ".", "PATH": ""})
    assert out.stdout.strip() == here


def _paper_rho(d: int) -> float:
    """rho_l of the paper's Theorem 1: the variance of N(0, 1) truncated to [-1/sqrt(d), 1/sqrt(d)],
    as scipy (small d) or 40-digit arithmetic on the closed form (large d) computes it."""
    if d <= 10**5:
        return float(truncnorm(-1 / math.sqrt(d), 1 / math.sqrt(d)).var())
    with mpmath.workdps(40):
        a = 1 / mpmath.sqrt(d)
        return float(1 - 2 * a * mpmath.npdf(a) / mpmath.erf(a / mpmath.sqrt(2)))


def test_projection_and_reconstruction_are_the_papers_formula_computed_directly():
    """gamma_l = (rho_l K_l)^-1 V_l Delta_l and Delta_hat_l = V_l^T gamma_l, block by block in
    float64 with rho_l from scipy, K_l split by hand (floor 1, the rest by ||Delta_l||)."""
    torch.manual_seed(3)
    numels = [300, 40, 20, 500]  # blocks of at most 250: [150, 150], [40 + 20], [250, 250]
    blocks = ferret.make_blocks(numels, 250)
    assert [(b.start, b.size) for b in blocks] == [(0, 150), (150, 150), (300, 60), (360, 250), (610, 250)]
    delta = torch.randn(860) * torch.repeat_interleave(torch.tensor([1.0, 1.0, 0.0, 3.0, 3.0]),
                                                       torch.tensor([b.size for b in blocks]))
    counts, coeffs = ferret.project(delta, blocks, seed=5, num_bases=29, floor=1)
    norms = [float(delta[b.start:b.stop].norm()) for b in blocks]
    shares = [24 * n / sum(norms) for n in norms]  # 29 - 5 floors, proportional to the norms
    assert counts[2] == 1 and sum(counts) == 29 and all(abs(k - 1 - s) < 1 for k, s in zip(counts, shares))
    at, hat = 0, torch.zeros(860, dtype=torch.float64)
    for index, (block, k) in enumerate(zip(blocks, counts)):
        v = ferret.bases(5, index, k, block.size).double()
        part = delta[block.start:block.stop].double()
        gamma = v @ part / (_paper_rho(block.size) * k)
        assert torch.allclose(coeffs[at:at + k].double(), gamma, rtol=1e-5, atol=1e-7)
        hat[block.start:block.stop] = v.T @ gamma
        at += k
    got = ferret.reconstruct(blocks, 5, counts, coeffs, 860)
    assert torch.allclose(got.double(), hat, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("d,count", [(1, 40_000), (400, 100)])
def test_bases_entries_follow_the_truncated_normal(d, count):
    from scipy.stats import kstest

    v = ferret.bases(seed=9, index=2, count=count, size=d).double().reshape(-1).numpy()
    a = 1 / math.sqrt(d)
    # 40k draws against scipy's CDF of N(0, 1) truncated to [-1/sqrt(d), 1/sqrt(d)]
    assert kstest(v, truncnorm(-a, a).cdf).pvalue > 1e-3
    if d == 1:  # where the truncated normal is far from flat, the test tells it from a uniform
        assert kstest(v, "uniform", args=(-a, 2 * a)).pvalue < 1e-6
