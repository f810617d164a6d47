"""AdaLoRA in the loop: the orthogonality penalty is peft's own, and a resumed run continues its
budget schedule exactly, from inside the reallocation phase and from inside the final phase."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import adapters
from adapters.adalora import AdaLoraOptions, build_adalora
from cli_runner import TINY, losses, run_inprocess

# 12 steps: warm-up to step 2, ranks reallocated at steps 3..7 (step < 12 - 4), fixed at step 8,
# the final phase masks with the fixed pattern at steps 9..12. Dropout on, accumulation 2.
STEPS = ["train.max_steps=12", "train.save_every=3", "train.gradient_accumulation_steps=2", "train.batch_size=2",
         "data.max_length=32", "train.eval_batches=1", "train.lr_schedule=cosine", "train.warmup_steps=2"]
ADALORA = ["adapter.type=adalora", "adapter.init_r=4", "adapter.target_r=2", "adapter.alpha=8", "adapter.dropout=0.1",
           "adapter.tinit=2", "adapter.tfinal=4", "adapter.orth_reg_weight=0.1", "optim.lr=2e-2"]


def test_orthogonality_penalty_is_the_one_peft_adds_to_its_loss(tiny_llama):
    """peft's AdaLoraModel adds orth_reg_weight * R to `outputs.loss` when the model computes its
    loss; our hook's reg/orth must be exactly that difference."""
    peft_model, hooks = build_adalora(tiny_llama, AdaLoraOptions(init_r=4, target_r=2, orth_reg_weight=0.3),
                                      adapters.BuildContext("causal_lm", 10, 0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)  # away from the near-orthogonal init
    ids = torch.randint(0, 1000, (2, 12), generator=g)
    peft_model.eval()
    out = peft_model(input_ids=ids, labels=ids)
    plain = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    ours = hooks.extra_losses({}, out, peft_model)["reg/orth"]
    assert float(ours) > 0.01
    assert float(ours) == pytest.approx(float(out.loss - plain), rel=1e-4)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("adalora") / "straight"
    assert run_inprocess("--config", TINY, f"train.output_dir={out}", *STEPS, *ADALORA) == 0
    return out


@pytest.mark.parametrize("stop", [5, 10], ids=["in-reallocation", "in-final-phase"])
def test_resume_is_exact(straight, tmp_path, stop):
    out = tmp_path / "resumed"
    assert run_inprocess("--config", TINY, f"train.output_dir={out}", *STEPS, *ADALORA, f"train.stop_after_steps={stop}") == 0
    assert run_inprocess("--config", TINY, f"train.output_dir={out}", *STEPS, *ADALORA, "train.resume=auto") == 0
    want, got = losses(straight), losses(out)
    assert sorted(got) == list(range(1, 13))
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-6), (step, want, got)
    a = load_file(straight / "adapter" / "adapter_model.safetensors")
    b = load_file(out / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:  # the same ranks pruned: the saved (rank-pattern-resized) adapters match
        torch.testing.assert_close(a[k], b[k], atol=1e-7, rtol=0)

