"""Ferret's projection and reconstruction (Shu et al., ICML 2025, §3.2, eqs. 6-8), in plain torch.

A client's update Delta (old minus new weights, one flat fp32 vector over the parameters that
travel) is cut into blocks. Block l gets K_l random bases V_l (K_l x d_l, every entry N(0, 1)
truncated to [-1/sqrt(d_l), 1/sqrt(d_l)]) regenerated from a seed, and travels as the K_l
coefficients gamma_l = (rho_l K_l)^-1 V_l Delta_l. The receiver rebuilds Delta_hat_l = V_l^T gamma_l,
which is unbiased because E[v v^T] = rho_l I, rho_l being the exact variance of one entry
(Theorem 1). K_l is proportional to ||Delta_l|| with a floor (Prop. 2, Fig. 4), and sums to K.

Bases come from a CPU `torch.Generator` in fp32, seeded per (seed, block), so client and server
regenerate them bit for bit on any machine, whatever device or dtype the model trains in. (The
official code draws them with `torch.manual_seed` on the parameters' device in their dtype, i.e.
the CUDA RNG in fp16, which a CPU process cannot reproduce; and it scales by d_l/K_l, i.e.
rho_l = 1/d_l, a reconstruction about 1/3 of the unbiased one that its server lr of 10 absorbs.
That scaling is available here as `scaling="code"`.)

Nothing here knows about Flower: these are the functions the client and the server call.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

Scaling = Literal["unbiased", "code", "exact"]
# Bases are generated this many values at a time: bounds memory whatever K_l * d_l is. Client and
# server generate identically because they share this constant and the code, not by luck.
CHUNK_VALUES = 1 << 22


@dataclass(frozen=True)
class Block:
    """A contiguous range [start, start + size) of the flat parameter vector."""

    start: int
    size: int

    @property
    def stop(self) -> int:
        return self.start + self.size


def make_blocks(numels: Sequence[int], block_size: int) -> list[Block]:
    """Blocks over the concatenation of tensors with these element counts, in order.

    A tensor of at least `block_size` elements is cut into near-equal blocks of at most
    `block_size`; smaller tensors (norms, biases, small adapter matrices) are packed with their
    neighbours up to `block_size`. A block never mixes a large tensor with others, so its norm
    (and with it K_l) follows one weight matrix.
    """
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    blocks: list[Block] = []
    offset, group_start, group_size = 0, 0, 0
    for n in numels:
        if n >= block_size:
            if group_size:
                blocks.append(Block(group_start, group_size))
                group_size = 0
            pieces = math.ceil(n / block_size)
            base, extra = divmod(n, pieces)
            start = offset
            for i in range(pieces):
                size = base + (1 if i < extra else 0)
                blocks.append(Block(start, size))
                start += size
        else:
            if group_size and group_size + n > block_size:
                blocks.append(Block(group_start, group_size))
                group_size = 0
            if not group_size:
                group_start = offset
            group_size += n
        offset += n
    if group_size:
        blocks.append(Block(group_start, group_size))
    return blocks


def entry_variance(d: int) -> float:
    """rho(d): the variance of N(0, 1) truncated to [-a, a] with a = 1/sqrt(d),
    1 - 2 a phi(a) / (2 Phi(a) - 1), which is about 1/(3d)."""
    a = 1.0 / math.sqrt(d)
    if a < 1e-3:
        # the closed form loses digits to cancellation here; the series of the ratio of
        # moments, int x^2 e^(-x^2/2) / int e^(-x^2/2) over [-a, a], is exact to O(a^8)
        a2 = a * a
        return a2 / 3 * (1 - 3 * a2 / 10 + 3 * a2 * a2 / 56) / (1 - a2 / 6 + a2 * a2 / 40)
    phi = math.exp(-a * a / 2) / math.sqrt(2 * math.pi)
    return 1 - 2 * a * phi / math.erf(a / math.sqrt(2))


def derive_seed(*parts) -> int:
    """A seed that is a hash of `parts`: stable across processes and machines (unlike `hash()`),
    and unrelated for neighbouring inputs (unlike seed + index)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # torch seeds are < 2**63


def block_seed(seed: int, index: int) -> int:
    """The generator seed of block `index` under `seed`."""
    return derive_seed("ferret", seed, index)


def _rows_per_chunk(size: int) -> int:
    return max(1, CHUNK_VALUES // size)


def basis_chunks(seed: int, index: int, count: int, size: int):
    """Yield (first_row, rows) of the `count` x `size` basis of block `index`: fp32 entries
    N(0, 1) truncated to [-1/sqrt(size), 1/sqrt(size)], from a CPU generator, drawn in chunks of
    rows. torch's CPU sampler does not consume its stream element by element (drawing 50 rows at
    once or 3 at a time gives different numbers), so the chunking is part of the definition of a
    basis: it depends only on `size` and CHUNK_VALUES, never on the caller."""
    g = torch.Generator(device="cpu").manual_seed(block_seed(seed, index))
    bound = 1.0 / math.sqrt(size)
    step = _rows_per_chunk(size)
    for first in range(0, count, step):
        rows = torch.empty(min(step, count - first), size, dtype=torch.float32)
        torch.nn.init.trunc_normal_(rows, mean=0.0, std=1.0, a=-bound, b=bound, generator=g)
        yield first, rows


def bases(seed: int, index: int, count: int, size: int) -> torch.Tensor:
    """The whole `count` x `size` basis of block `index` (tests and small blocks)."""
    out = torch.empty(count, size, dtype=torch.float32)
    for first, rows in basis_chunks(seed, index, count, size):
        out[first:first + len(rows)] = rows
    return out


def orthonormal_basis(seed: int, index: int, size: int) -> torch.Tensor:
    """A full orthonormal basis of block `index` (rows), from the random one by QR: with it the
    projection is exact. For verification (scaling="exact"), at size^2 cost."""
    q, r = torch.linalg.qr(bases(seed, index, size, size).double().T)
    q = q * torch.sign(torch.diagonal(r))  # a unique Q: the one with a positive-diagonal R
    return q.T.float().contiguous()


def allocate(norms: Sequence[float], sizes: Sequence[int], total: int, floor: int) -> list[int]:
    """K_l per block: `floor` each, the rest of `total` in proportion to the block norms
    (largest remainders, so they sum to `total`), never more than the block size."""
    if floor * len(sizes) > total:
        raise ValueError(f"{total} bases cannot give {len(sizes)} blocks {floor} each")
    counts = [min(floor, s) for s in sizes]
    left = total - sum(counts)
    open_ = [i for i, s in enumerate(sizes) if counts[i] < s]
    while left > 0 and open_:
        weights = [max(float(norms[i]), 0.0) for i in open_]
        if not math.isfinite(sum(weights)) or sum(weights) <= 0:
            weights = [1.0] * len(open_)
        norm = sum(weights)
        shares = [left * w / norm for w in weights]
        add = [min(int(s), sizes[i] - counts[i]) for s, i in zip(shares, open_)]
        rest = left - sum(add)
        for j in sorted(range(len(open_)), key=lambda j: shares[j] - int(shares[j]), reverse=True):
            if rest == 0:
                break
            if counts[open_[j]] + add[j] < sizes[open_[j]]:
                add[j] += 1
                rest -= 1
        for j, i in enumerate(open_):
            counts[i] += add[j]
        left = total - sum(counts)
        open_ = [i for i in open_ if counts[i] < sizes[i]]
    return counts


def _scale(size: int, count: int, scaling: Scaling) -> float:
    if scaling == "unbiased":
        return 1.0 / (entry_variance(size) * count)
    if scaling == "code":  # the official code's <Delta, v> * d / K
        return size / count
    return 1.0


def project(delta: torch.Tensor, blocks: Sequence[Block], seed: int, num_bases: int, floor: int = 1,
            scaling: Scaling = "unbiased") -> tuple[list[int], torch.Tensor]:
    """Ferret's client side: (K_l per block, the coefficients of every block concatenated, fp32).
    With scaling="exact" every block gets a full orthonormal basis (K_l = d_l) and `num_bases`
    is ignored."""
    delta = delta.detach().to("cpu", torch.float32)
    if scaling == "exact":
        counts = [b.size for b in blocks]
    else:
        norms = [float(delta[b.start:b.stop].norm()) for b in blocks]
        counts = allocate(norms, [b.size for b in blocks], num_bases, floor)
    coeffs = torch.zeros(sum(counts), dtype=torch.float32)
    at = 0
    for index, (block, count) in enumerate(zip(blocks, counts)):
        part = delta[block.start:block.stop]
        if scaling == "exact":
            coeffs[at:at + count] = orthonormal_basis(seed, index, block.size) @ part
        else:
            for first, rows in basis_chunks(seed, index, count, block.size):
                coeffs[at + first:at + first + len(rows)] = rows @ part
            coeffs[at:at + count] *= _scale(block.size, count, scaling)
        at += count
    return counts, coeffs


def reconstruct_into(out: torch.Tensor, blocks: Sequence[Block], seed: int, counts: Sequence[int],
                     coeffs: torch.Tensor, exact: bool = False) -> torch.Tensor:
    """Ferret's server side: add V^T gamma of every block to the flat fp32 vector `out`.
    The coefficients already carry the scaling (and any weight a sender multiplied in)."""
    if len(counts) != len(blocks) or sum(counts) != coeffs.numel():
        raise ValueError(f"{len(counts)} block counts summing to {sum(counts)} for {len(blocks)} blocks "
                         f"and {coeffs.numel()} coefficients")
    coeffs = coeffs.to(torch.float32)
    at = 0
    for index, (block, count) in enumerate(zip(blocks, counts)):
        part = out[block.start:block.stop]
        if exact:
            part.addmv_(orthonormal_basis(seed, index, block.size).T, coeffs[at:at + count])
        else:
            for first, rows in basis_chunks(seed, index, count, block.size):
                part.addmv_(rows.T, coeffs[at + first:at + first + len(rows)])
        at += count
    return out


def reconstruct(blocks: Sequence[Block], seed: int, counts: Sequence[int], coeffs: torch.Tensor,
                dim: int, exact: bool = False) -> torch.Tensor:
    """Delta_hat as a new flat fp32 vector of length `dim`."""
    return reconstruct_into(torch.zeros(dim, dtype=torch.float32), blocks, seed, counts, coeffs, exact)


@dataclass(frozen=True)
class Coded:
    """One client's update as it travels: its seed, K_l per block, and the coefficients (fp32)."""

    seed: int
    counts: tuple[int, ...]
    coeffs: torch.Tensor


def apply_coded(theta: torch.Tensor, updates: Sequence[Coded], blocks: Sequence[Block], exact: bool = False) -> torch.Tensor:
    """theta -= sum_i V_i^T gamma_i, in place. The sum is formed first, in the given order, so the
    server and every client that applies the same round get the same bits."""
    total = torch.zeros_like(theta)
    for u in updates:
        reconstruct_into(total, blocks, u.seed, u.counts, u.coeffs, exact)
    return theta.sub_(total)
