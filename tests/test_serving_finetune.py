"""Co-served fine-tuning against the trainer run alone, and what serving sees of it.

The co-served job runs inside an engine that also answers requests, in token chunks spread over
iterations (a fixed cost model makes the chunks small and interleaves them with decode steps).
References: `train.py` (trainer.loop.train) on the same config for the weights; a separate model
with the trainee's weights for what serving answers.
"""
from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from cli_runner import TINY, losses, run_inprocess
from conftest import model_cfg
from serving_harness import COMMON, Harness
from trainer.models import load_model
from trainer.serving import lora
from trainer.serving.cost import CostModel
from trainer.serving.finetune import row_groups
from trainer.serving.request import Finished

def _alone(tmp_path, name, *extra):
    out = tmp_path / name
    assert run_inprocess("--config", TINY, f"train.output_dir={out}", *COMMON, *extra) == 0
    return out


# Chunked and unchunked gradient sums differ in float order (~1e-7 relative). Adam divides each
# coordinate by its own RMS, so on coordinates whose gradient is near zero that noise becomes a
# visible fraction of one step (lr 1e-2 here): 2e-5 was seen on a q_proj of the random tiny model.
# A hundredth of one step still catches any real resume or chunking defect: a lost optimizer state,
# a wrong lr or a skipped micro-batch moves weights by a good part of a step.
ONE_STEP = 1e-2
ATOL = ONE_STEP / 100


def _adapter(run_dir):
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


@pytest.mark.parametrize("with_static_adapter,extra", [(False, ()), (True, ()),
                                                       # micro-batches cut into groups of whole rows
                                                       (False, ("serving.ft_group_tokens=50",))])
def test_coserved_job_equals_trainer_alone(tmp_path, smollm2_tokenizer, with_static_adapter, extra):
    """Same config, seed and data order: the co-served job (in chunks, with requests decoding in the
    same iterations, attached beside another adapter or to the bare model) ends with the weights and
    per-step losses of train.py's run."""
    alone = _alone(tmp_path, "alone")
    static = None
    if with_static_adapter:
        base = load_model(model_cfg(), smollm2_tokenizer)
        torch.manual_seed(5)
        get_peft_model(base, LoraConfig(r=2, init_lora_weights=False)).save_pretrained(tmp_path / "static")
        static = str(tmp_path / "static")
    h = Harness(smollm2_tokenizer, tmp_path / "coserved", *extra, static_adapter=static)
    served = ["tiny-llama"] + (["other"] if static else [])
    iterations, mixed = 0, 0
    while h.job.active:
        if len(h.engine.decoding) + len(h.engine.waiting) < 2:
            h.request(served[iterations % len(served)], f"Request number {iterations} says", max_tokens=5)
        stats = h.engine.step()
        iterations += 1
        mixed += bool(stats.decode_rows and (stats.ft_forward_tokens or stats.ft_backward_tokens))
    assert h.ended and h.job.status == "succeeded" and h.published == [2, 4]
    if extra:  # the rows really went through in several groups per micro-batch
        assert h.job.groups > h.job.step * 2
    assert mixed > 20, "inference and fine-tuning should share iterations"
    want, got = _adapter(alone), _adapter(tmp_path / "coserved")
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=ATOL, rtol=0, msg=k)
    la, lc = losses(alone), losses(tmp_path / "coserved")
    assert sorted(la) == sorted(lc) == [1, 2, 3, 4]
    for step in la:
        assert lc[step] == pytest.approx(la[step], rel=1e-5)
    # the trainee is gone from the served model; its last version serves on
    assert lora.TRAINEE not in lora.adapter_names(h.engine.model)
    assert h.registry.get("ft:tiny-llama:job").version == 2


def _reference_model(tokenizer, trainee_state):
    """A separate peft model (adapter `default`, as a train.py run names it) holding these weights."""
    base = load_model(model_cfg(), tokenizer)
    ref = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM")).eval()
    params = {n: p for n, p in ref.named_parameters() if "lora_" in n}
    assert params.keys() == trainee_state.keys()
    with torch.no_grad():
        for name, value in trainee_state.items():
            params[name].copy_(value)
    return ref


def _reference_logits(tokenizer, trainee_state, ids):
    """What a model holding exactly these trainee weights answers (built apart from the engine)."""
    ref = _reference_model(tokenizer, trainee_state)
    with torch.no_grad():
        return ref(input_ids=ids).logits[0, -1]


def test_serving_changes_only_when_published(tmp_path, smollm2_tokenizer):
    """Steps 1 and 3 change the trainee but not what `ft:` serves; publishing at 2 and 4 makes it
    serve exactly the trainee of that step; a request keeps the version it started with."""
    h = Harness(smollm2_tokenizer, tmp_path / "run")
    probe = torch.tensor([smollm2_tokenizer("The probe prompt")["input_ids"]])
    trainee_at, checked, pinned = h.trainee_at, [], None

    def served_logits():
        adapter = h.registry.get("ft:tiny-llama:job").adapter
        with torch.no_grad():
            return h.engine.model(input_ids=probe, adapter_names=[adapter]).logits[0, -1]

    step = h.job.step
    while h.job.active:
        h.engine.step()
        if h.job.step != step:
            step = h.job.step
            if step == 1:
                assert h.registry.get("ft:tiny-llama:job") is None  # nothing published yet
            else:
                last = 2 if step < 4 else 4
                torch.testing.assert_close(served_logits(), _reference_logits(smollm2_tokenizer, trainee_at[last], probe),
                                           atol=1e-5, rtol=1e-5)
                if step == 3:
                    assert not torch.allclose(served_logits(),
                                              _reference_logits(smollm2_tokenizer, trainee_at[3], probe), atol=1e-4)
                checked.append(step)
            if step == 2:  # starts on version 1 and runs past the publish of version 2
                pinned = h.request("ft:tiny-llama:job", "A long answer please", max_tokens=60)
    assert checked == [2, 3, 4]
    while h.engine.step() is not None:
        pass
    req, events = pinned
    assert isinstance(events[-1], Finished) and events[-1].version == "ft:tiny-llama:job@v1"
    # its tokens are those of version 1 (the trainee at step 2) all the way
    ref = _reference_model(smollm2_tokenizer, trainee_at[2])
    ids = torch.tensor([req.prompt])
    with torch.no_grad():
        out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=60, do_sample=False,
                           pad_token_id=smollm2_tokenizer.pad_token_id)
    assert req.output == out[0, ids.shape[1]:].tolist()[:len(req.output)]


def test_inference_leaves_trainee_gradients_and_optimizer_state_alone(tmp_path, smollm2_tokenizer):
    """Mid-step (gradients accumulated, optimizer state from step 1), iterations that only serve
    change neither the trainee's gradients nor its optimizer state nor its weights, bit for bit."""
    h = Harness(smollm2_tokenizer, tmp_path / "run")
    params = [p for p in h.engine.model.parameters() if p.requires_grad]
    # inside step 2: earlier sequences' gradients accumulated, the current one forwarded part-way
    while (h.job.step < 1 or h.job._current is None or not h.job._current.chunks
           or all(p.grad is None for p in params)):
        assert h.job.active, h.job.error
        h.engine.step()
    before = ([None if p.grad is None else p.grad.clone() for p in params], copy.deepcopy(h.job.job.optimizer.state_dict()),
              [p.detach().clone() for p in params])
    assert any(g is not None for g in before[0])
    h.engine.cost = CostModel.fixed([0.0] * 5, [10.0] * 3, [10.0] * 3)  # fine-tuning never fits now
    h.engine.limits = type(h.engine.limits)(**{**h.engine.limits.__dict__, "ft_max_wait_iters": 0})
    for i in range(3):
        h.request("tiny-llama", f"serve this {i}", max_tokens=10)
    served = 0
    while h.engine.step() is not None and served < 40:
        served += 1
        if not (h.engine.waiting or h.engine.prefilling or h.engine.decoding):
            break
    assert served > 5
    grads, state, weights = before
    for p, g in zip(params, grads):
        assert (p.grad is None) == (g is None) and (g is None or torch.equal(p.grad, g))
    assert all(torch.equal(p, w) for p, w in zip(params, weights))
    after = h.job.job.optimizer.state_dict()
    assert after["state"].keys() == state["state"].keys()
    for k in state["state"]:
        for name, value in state["state"][k].items():
            assert torch.equal(torch.as_tensor(after["state"][k][name]), torch.as_tensor(value))


def test_interrupted_coserved_job_resumes_with_train_py(tmp_path, smollm2_tokenizer):
    """A server stopping mid-step checkpoints the last completed step; `train.py ... train.resume=auto`
    finishes that run directory with the weights of an uninterrupted run: the co-served run
    directory is a trainer run directory."""
    alone = _alone(tmp_path, "alone")
    h = Harness(smollm2_tokenizer, tmp_path / "coserved")
    while h.job.step < 2 or not h.job._in_step or not h.job._current or not h.job._current.chunks:
        assert h.job.active, h.job.error
        h.engine.step()
    h.engine.stop(timeout=0)  # what a shutdown does: the step in progress is dropped
    assert h.ended and h.job.status == "queued"
    assert (tmp_path / "coserved" / "checkpoints" / "step-2").is_dir()
    assert run_inprocess("--config", TINY, f"train.output_dir={tmp_path / 'coserved'}", *COMMON, "train.resume=auto") == 0
    want, got = _adapter(alone), _adapter(tmp_path / "coserved")
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=ATOL, rtol=0, msg=k)
    la, lc = losses(alone), losses(tmp_path / "coserved")
    assert sorted(la) == sorted(lc) == [1, 2, 3, 4]
    for step in la:
        assert lc[step] == pytest.approx(la[step], rel=1e-5)


@pytest.mark.parametrize("lengths,cap", [([30, 5, 20, 12], 40), ([30, 5, 20, 12], 1000), ([50, 3], 10), ([7], 7),
                                         ([9, 9, 9, 9], 18), ([4, 8, 1, 30, 2], None)])
def test_row_groups_cover_every_row_once_within_the_cap(lengths, cap):
    rows = list(range(len(lengths)))
    groups = row_groups(rows, lengths, cap)
    assert sorted(r for g in groups for r in g) == rows  # every row exactly once
    if cap is None:
        assert groups == [rows]
        return
    for g in groups:  # within the cap, or a row longer than the cap on its own
        assert sum(lengths[r] for r in g) <= cap or len(g) == 1
    # greedy by length: no two consecutive groups could have been one
    for a, b in zip(groups, groups[1:]):
        assert sum(lengths[r] for r in a + b) > cap
    order = [lengths[r] for g in groups for r in g]
    assert order == sorted(order)
