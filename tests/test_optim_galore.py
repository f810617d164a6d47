"""GaLoreAdamW and NaturalGaLore against independent references: subspaces known by
construction, torch.optim.AdamW, an explicit k x k solve, and a second, loop-style
implementation of both methods written from the update rules."""
from __future__ import annotations

import io

import pytest
import torch
from pydantic import ValidationError

from optim import OPTIMIZERS, GaLoreAdamW, NaturalGaLore
from optim.galore import GaLoreOptions, make_projector, project, project_back, projection_side
from optim.natural_galore import NaturalGaLoreOptions, natural_gradient

F64 = torch.float64


def orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    return q


def known_svd_matrix(m: int, n: int, seed: int = 0):
    """G = U diag(s) V^T with known orthonormal U, V and distinct singular values."""
    gen = torch.Generator().manual_seed(seed)
    u, v = orthogonal(m, gen), orthogonal(n, gen)
    k = min(m, n)
    s = torch.linspace(5.0, 1.0, k, dtype=F64)
    return u[:, :k] @ torch.diag(s) @ v[:, :k].T, u, v


# ---------------------------------------------------------------------------------------------
# Natural-gradient solve
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("damping", [1e-3, 1.0])
@pytest.mark.parametrize("filled,current", [(1, 0), (5, 0), (5, 3)])
def test_woodbury_solve_equals_the_explicit_solve(damping, filled, current):
    gen = torch.Generator().manual_seed(filled + current)
    history = torch.randn(filled, 12, generator=gen, dtype=F64)
    g = history[current]
    fisher = damping * torch.eye(12, dtype=F64) + history.T @ history  # lambda I + G G^T, G = [g_1 .. g_s]
    expected = torch.linalg.solve(fisher, g)
    torch.testing.assert_close(natural_gradient(history, current, damping), expected, rtol=1e-9, atol=1e-12)
    if filled == 1:  # a history of one: F^-1 g = g / (lambda + |g|^2)
        torch.testing.assert_close(expected, g / (damping + g @ g))


# ---------------------------------------------------------------------------------------------
# Projector
# ---------------------------------------------------------------------------------------------

SIDES = {  # (shape kind, proj_type) -> side, from the definitions
    ("tall", "std"): "right", ("tall", "reverse_std"): "left", ("tall", "left"): "left", ("tall", "right"): "right",
    ("wide", "std"): "left", ("wide", "reverse_std"): "right", ("wide", "left"): "left", ("wide", "right"): "right",
}


@pytest.mark.parametrize("kind,proj_type", list(SIDES))
def test_projection_round_trip_reproduces_a_gradient_in_the_subspace(kind, proj_type):
    m, n, r = (7, 5, 2) if kind == "tall" else (5, 7, 2)
    g0, u, v = known_svd_matrix(m, n)
    side = projection_side(torch.Size((m, n)), proj_type)
    assert side == SIDES[kind, proj_type]
    projector = make_projector(g0, r, side)
    gen = torch.Generator().manual_seed(5)
    if side == "left":
        torch.testing.assert_close(projector @ projector.T, u[:, :r] @ u[:, :r].T)  # the top-r left subspace
        in_subspace = u[:, :r] @ torch.randn(r, n, generator=gen, dtype=F64)
        orthogonal_part = u[:, r:] @ torch.randn(m - r, n, generator=gen, dtype=F64)
        assert project(in_subspace, projector, side).shape == (r, n)
    else:
        torch.testing.assert_close(projector.T @ projector, v[:, :r] @ v[:, :r].T)
        in_subspace = torch.randn(m, r, generator=gen, dtype=F64) @ v[:, :r].T
        orthogonal_part = torch.randn(m, n - r, generator=gen, dtype=F64) @ v[:, r:].T
        assert project(in_subspace, projector, side).shape == (m, r)
    round_trip = project_back(project(in_subspace, projector, side), projector, side)
    torch.testing.assert_close(round_trip, in_subspace, rtol=0, atol=1e-12)
    assert project(orthogonal_part, projector, side).abs().max() < 1e-12


def test_rank_above_the_matrix_size_is_clipped():
    g0, _, _ = known_svd_matrix(6, 4)
    assert make_projector(g0, 100, "right").shape == (4, 4)
    assert make_projector(g0, 100, "left").shape == (6, 4)


# ---------------------------------------------------------------------------------------------
# Full rank equals AdamW
# ---------------------------------------------------------------------------------------------

def test_full_rank_galore_equals_torch_adamw():
    # Adam is coordinate-wise, so in a rotated basis it differs from AdamW; full-rank GaLore
    # equals AdamW when the singular basis is the coordinate basis (up to sign and order). The
    # first gradients below have orthogonal columns (tall) / rows (wide) of decreasing norm, so
    # the projector is a signed identity and every later step must match AdamW exactly.
    gen = torch.Generator().manual_seed(0)
    tall = torch.nn.Parameter(torch.randn(6, 4, generator=gen, dtype=F64))
    wide = torch.nn.Parameter(torch.randn(4, 6, generator=gen, dtype=F64))
    bias = torch.nn.Parameter(torch.randn(4, generator=gen, dtype=F64))
    first = {
        "tall": torch.cat([torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=F64)), torch.zeros(2, 4, dtype=F64)]),
        "wide": torch.cat([torch.diag(torch.tensor([4.0, -3.0, 2.0, -1.0], dtype=F64)), torch.zeros(4, 2, dtype=F64)], 1),
    }
    grads = [[first["tall"], first["wide"], torch.randn(4, generator=gen, dtype=F64)]]
    grads += [[torch.randn(p.shape, generator=gen, dtype=F64) for p in (tall, wide, bias)] for _ in range(5)]
    settings = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-8)

    ref_params = [p.detach().clone().requires_grad_() for p in (tall, wide, bias)]
    reference = torch.optim.AdamW(
        [{"params": ref_params[:2], "weight_decay": 0.1}, {"params": ref_params[2:], "weight_decay": 0.0}],
        foreach=False, **settings,
    )
    galore = GaLoreAdamW(
        [{"params": [tall, wide], "weight_decay": 0.1, "rank": 4, "scale": 1.0, "update_proj_gap": 1000},
         {"params": [bias], "weight_decay": 0.0}],
        **settings,
    )
    for step_grads in grads:
        for params, opt in ((ref_params, reference), ((tall, wide, bias), galore)):
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
    assert galore.state[tall]["projector"].shape == (4, 4)  # really projected, on the right
    assert galore.state[wide]["projector"].shape == (4, 4)
    for ours, ref in zip((tall, wide, bias), ref_params):
        torch.testing.assert_close(ours.detach(), ref.detach(), rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# A second implementation of both methods, step by step
# ---------------------------------------------------------------------------------------------

def reference_run(w0, grads, rank, gap, scale, lr, betas, eps, wd, history=None, damping=None):
    """Left-projected GaLore (history=None) or Natural GaLore written out plainly: the projector
    from the SVD every `gap` steps, an explicit (lambda I + G G^T)^-1 g over the last `history`
    low-rank gradients (cleared at each new projector), Adam, back-projection, decay on W."""
    w, m, v, past = w0.clone(), None, None, []
    for t, g in enumerate(grads, start=1):
        if (t - 1) % gap == 0:
            p = torch.linalg.svd(g, full_matrices=False)[0][:, :rank]
            past = []
        low = p.T @ g
        if history is not None:
            past = (past + [low.reshape(-1)])[-history:]
            stack = torch.stack(past, 1)  # k x s
            fisher = damping * torch.eye(len(stack), dtype=F64) + stack @ stack.T
            low = torch.linalg.solve(fisher, low.reshape(-1)).view_as(low)
        m = (1 - betas[0]) * low if m is None else betas[0] * m + (1 - betas[0]) * low
        v = (1 - betas[1]) * low**2 if v is None else betas[1] * v + (1 - betas[1]) * low**2
        n = (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)
        w = w - lr * wd * w - lr * scale * (p @ n)
    return w


@pytest.mark.parametrize("natural", [False, True])
def test_low_rank_steps_match_a_second_implementation(natural):
    gen = torch.Generator().manual_seed(2)
    w0 = torch.randn(5, 8, generator=gen, dtype=F64)  # wide: 'std' projects on the left
    grads = [torch.randn(5, 8, generator=gen, dtype=F64) for _ in range(9)]
    hp = dict(rank=2, gap=4, scale=0.5, lr=0.02, betas=(0.9, 0.99), eps=1e-8, wd=0.05)
    w = torch.nn.Parameter(w0.clone())
    group = dict(params=[w], rank=2, update_proj_gap=4, scale=0.5, weight_decay=0.05, proj_type="std")
    if natural:
        opt = NaturalGaLore([group], lr=0.02, betas=(0.9, 0.99), eps=1e-8, natural_history=3, damping=1e-2)
        expected = reference_run(w0, grads, history=3, damping=1e-2, **hp)
    else:
        opt = GaLoreAdamW([group], lr=0.02, betas=(0.9, 0.99), eps=1e-8)
        expected = reference_run(w0, grads, **hp)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-10)
    if natural:  # 9 steps, projector rebuilt at steps 1, 5 and 9: one gradient since the reset
        assert opt.state[w]["history_count"] == 1


# ---------------------------------------------------------------------------------------------
# Weight decay, by hand
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("natural", [False, True])
def test_weight_decay_is_decoupled_one_step_by_hand(natural):
    g, u, _ = known_svd_matrix(4, 6, seed=1)  # wide, 'std': left projector onto u[:, :2]
    gen = torch.Generator().manual_seed(4)
    w0 = torch.randn(4, 6, generator=gen, dtype=F64)
    lr, wd, scale, eps, damping = 0.1, 0.2, 0.5, 1e-8, 1e-3
    w = torch.nn.Parameter(w0.clone())
    group = dict(params=[w], rank=2, scale=scale, weight_decay=wd)
    if natural:
        opt = NaturalGaLore([group], lr=lr, eps=eps, damping=damping)
    else:
        opt = GaLoreAdamW([group], lr=lr, eps=eps)
    w.grad = g.clone()
    opt.step()
    basis = u[:, :2]
    low = basis.T @ g
    if natural:  # a history of one gradient: F^-1 g = g / (lambda + |g|^2)
        low = low / (damping + (low**2).sum())
    adam_first_step = low / (low.abs() + eps)  # m_hat = g, sqrt(v_hat) = |g|
    # The decay acts on all of W, not on its projection; the sign of the SVD basis cancels.
    expected = w0 - lr * wd * w0 - lr * scale * basis @ adam_first_step
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Resume, registration
# ---------------------------------------------------------------------------------------------

class TinyBlock(torch.nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.q_proj = torch.nn.Linear(6, 5)
        self.up_proj = torch.nn.Linear(5, 9)
        self.head = torch.nn.Linear(9, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.up_proj(torch.tanh(self.q_proj(x)))))


def train(model, opt, batches):
    for inputs, targets in batches:
        ((model(inputs) - targets) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("name", ["galore_adamw", "natural_galore"])
def test_resume_is_exact(name):
    spec = OPTIMIZERS[name]
    extra = {"natural_history": 3} if name == "natural_galore" else {}
    opts = spec.options(rank=2, update_proj_gap=2, lr=0.01, weight_decay=0.01, **extra)
    gen = torch.Generator().manual_seed(7)
    batches = [(torch.randn(8, 6, generator=gen), torch.randn(8, 2, generator=gen)) for _ in range(7)]

    straight = TinyBlock(0)
    train(straight, spec.build(straight.named_parameters(), opts), batches)

    first = TinyBlock(0)
    opt = spec.build(first.named_parameters(), opts)
    train(first, opt, batches[:3])  # stops inside a subspace (refreshes at steps 1, 3, 5, 7)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = TinyBlock(1)
    resumed.load_state_dict(saved["model"])
    opt = spec.build(resumed.named_parameters(), opts)
    opt.load_state_dict(saved["optim"])
    train(resumed, opt, batches[3:])
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name,cls,options", [
    ("galore_adamw", GaLoreAdamW, GaLoreOptions), ("natural_galore", NaturalGaLore, NaturalGaLoreOptions),
])
def test_registration_groups_and_options(name, cls, options):
    spec = OPTIMIZERS[name]
    assert spec.full_parameter_only and not spec.supports_zero and not spec.double_backward
    for field_name, field in options.model_fields.items():
        assert field_name == "name" or field.description, f"option {field_name} is undocumented"
    with pytest.raises(ValidationError):
        options(rnak=4)

    model = TinyBlock(0)
    opt = spec.build(model.named_parameters(), options(weight_decay=0.1))
    assert type(opt) is cls
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert by_param[id(model.q_proj.weight)]["rank"] == 8 and by_param[id(model.up_proj.weight)]["rank"] == 8
    assert by_param[id(model.head.weight)]["rank"] is None  # not a target: plain AdamW
    assert by_param[id(model.head.weight)]["weight_decay"] == 0.1
    assert by_param[id(model.q_proj.bias)]["rank"] is None and by_param[id(model.q_proj.bias)]["weight_decay"] == 0.0
    if cls is NaturalGaLore:
        assert by_param[id(model.q_proj.weight)]["natural_history"] == 20
        assert by_param[id(model.q_proj.weight)]["damping"] == 1e-3

    with pytest.raises(ValueError, match="target_modules"):
        spec.build(model.named_parameters(), options(target_modules=["no_such_layer"]))
    with pytest.raises(ValueError, match="proj_type"):
        cls([{"params": [model.q_proj.weight], "rank": 2, "proj_type": "full"}])


def test_std_projects_the_smaller_dimension_as_documented():
    """The paper's rule (and its code): m >= n projects on the right, so the n side becomes r."""
    for m, n in ((8, 5), (5, 8)):
        g = torch.randn(m, n, dtype=F64)
        side = projection_side(g.shape, "std")
        low = project(g, make_projector(g, 2, side), side)
        assert sorted(low.shape) == [2, max(m, n)]  # the smaller of m, n went to r = 2
    for text in (projection_side.__doc__, GaLoreOptions.model_fields["proj_type"].description):
        assert "std projects the smaller dimension" in " ".join(text.replace("'", "").split())
