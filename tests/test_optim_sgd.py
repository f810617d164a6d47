"""optim.name=sgd: torch's SGD behind the registry, with the decay split of AdamW."""
from __future__ import annotations

import pytest
import torch

import optim
from trainer.config import load_config
from trainer.errors import UserError


def test_sgd_follows_the_textbook_update_and_vectors_do_not_decay():
    torch.manual_seed(0)
    w, b = torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(4))
    opts = optim.OPTIMIZERS["sgd"].options(name="sgd", lr=0.1, weight_decay=0.5, momentum=0.9)
    opt = optim.OPTIMIZERS["sgd"].build([("w", w), ("b", b)], opts)
    mw, mb = w.detach().clone(), b.detach().clone()  # the same steps by hand
    buf_w = buf_b = None
    for _ in range(3):
        opt.zero_grad()
        ((w.sum(0) * b).sum() ** 2).backward()
        dw, db = w.grad + 0.5 * mw, b.grad.clone()  # decay on the matrix only
        buf_w = dw if buf_w is None else 0.9 * buf_w + dw
        buf_b = db if buf_b is None else 0.9 * buf_b + db
        mw, mb = mw - 0.1 * buf_w, mb - 0.1 * buf_b
        opt.step()
        assert torch.allclose(w.detach(), mw, atol=1e-6) and torch.allclose(b.detach(), mb, atol=1e-6)


def test_sgd_single_step_matches_p_minus_lr_g():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = optim.OPTIMIZERS["sgd"].build([("p", p)], optim.OPTIMIZERS["sgd"].options(name="sgd", lr=0.25))
    (p ** 2).sum().backward()
    opt.step()
    assert torch.allclose(p.detach(), torch.tensor([1.0, -2.0]) - 0.25 * torch.tensor([2.0, -4.0]))


def test_nesterov_needs_momentum():
    with pytest.raises(UserError, match="nesterov needs momentum"):
        load_config(None, ["optim.name=sgd", "optim.nesterov=true"])
