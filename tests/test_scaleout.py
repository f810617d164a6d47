"""The same tiny run under one process, 2-process DDP, and DeepSpeed ZeRO-2 / ZeRO-3 (CPU, gloo),
chosen only by the shipped accelerate config: the same global batch gives the same losses, and
the ZeRO-3 adapter holds the trained weights."""
from __future__ import annotations

import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_runner import ROOT, TINY, losses, run_inprocess, run_subprocess

pytestmark = pytest.mark.slow
# dropout 0: each process draws its own dropout masks, so only dropout-free runs can match exactly
ARGS = ["train.max_steps=4", "train.gradient_accumulation_steps=2", "adapter.dropout=0.0", "train.eval_batches=2",
        "data.max_length=32", "train.save_every=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    assert run_inprocess("--config", TINY, f"train.output_dir={out}", "train.batch_size=4", *ARGS) == 0
    return out


def launch(profile: str, out: Path, *extra: str, args=ARGS):
    accelerate = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
                  str(ROOT / "configs" / "accelerate" / f"{profile}.yaml"), "--main_process_port", str(free_port())]
    return run_subprocess("--config", TINY, f"train.output_dir={out}", "train.batch_size=2", *args, *extra,
                          launcher=accelerate, timeout=900)


@pytest.mark.parametrize("profile", ["ddp-cpu", "deepspeed-zero2", "deepspeed-zero3"])
def test_two_processes_match_one(profile, reference, tmp_path):
    if shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None:
        pytest.fail("accelerate CLI missing from the environment")
    out = tmp_path / "run"
    proc = launch(profile, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want, got = losses(reference), losses(out)
    assert sorted(got) == [1, 2, 3, 4]
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-5), (step, want, got)
    ref = load_file(reference / "adapter" / "adapter_model.safetensors")
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    assert saved.keys() == ref.keys()
    lora_b = [k for k in saved if "lora_B" in k]
    assert lora_b and all(saved[k].abs().max() > 0 for k in lora_b)  # trained, not empty partitions
    for k in ref:
        torch.testing.assert_close(saved[k], ref[k], atol=1e-5, rtol=1e-3)


class RunsCode:
    """A pickle that, when fully unpickled, creates the file `path`."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


@pytest.mark.parametrize("profile", ["deepspeed-zero2", "deepspeed-zero3"])
def test_zero_resume_continues_exactly_and_never_unpickles_code(reference, tmp_path, profile):
    out = tmp_path / "run"
    first = launch(profile, out, "train.stop_after_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    if profile == "deepspeed-zero2":  # (one launch more; the ZeRO-3 engine files are read the same way)
        _tampered_copy_is_refused(profile, out, tmp_path)
    second = launch(profile, out, "train.resume=auto")
    assert second.returncode == 0, second.stderr[-3000:]
    want, got = losses(reference), losses(out)
    assert sorted(got) == [1, 2, 3, 4]
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-5)


def _tampered_copy_is_refused(profile: str, out: Path, tmp_path: Path) -> None:
    """A copy of the stopped run whose engine files also hold an object that runs code when unpickled."""
    tampered, ran = tmp_path / "tampered", tmp_path / "code-ran"
    shutil.copytree(out, tampered)
    for states in (tampered / "checkpoints" / "step-2" / "engine").glob("*model_states.pt"):  # every rank's
        state = torch.load(states, weights_only=True)  # engine files hold tensors and plain values only
        state["extra"] = RunsCode(ran)
        torch.save(state, states)
    refused = launch(profile, tampered, "train.resume=auto")
    assert refused.returncode != 0 and "exitcode  : 2" in refused.stderr
    assert not ran.exists()
    ours = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1 and "model_states.pt" in ours[0], refused.stderr[-2000:]


def test_deepspeeds_own_load_would_run_the_code_ours_refuses(tmp_path):
    """Why the swap is needed: DeepSpeed's stock engine runs what a checkpoint file holds."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from trainer.deepspeed_load import WeightsOnlyCheckpointEngine
    from trainer.errors import UserError
    path, ran = tmp_path / "states.pt", tmp_path / "code-ran"
    torch.save({"module": {"w": torch.ones(2)}, "extra": RunsCode(ran)}, path)
    with pytest.raises(UserError, match="states.pt"):
        WeightsOnlyCheckpointEngine().load(str(path), map_location="cpu")
    assert not ran.exists()
    TorchCheckpointEngine().load(str(path), map_location="cpu")
    assert ran.exists()


def test_adahessian_refused_on_two_processes(tmp_path):
    proc = launch("ddp-cpu", tmp_path / "run", "optim.name=adahessian", args=[])
    assert proc.returncode != 0 and "exitcode  : 2" in proc.stderr
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1 and "optim.name" in ours[0] and "single.yaml" in ours[0] and "ddp-cpu" not in ours[0], ours
    assert not (tmp_path / "run").exists()


def test_galore_refused_under_zero(tmp_path):
    """Each process exits 2 before loading a model; the launcher then reports the failed
    workers in its own words, so only our line's presence (once) is ours to check."""
    proc = launch("deepspeed-zero2", tmp_path / "run", "adapter.type=none", "optim.name=galore_adamw", args=[])
    assert proc.returncode != 0 and "exitcode  : 2" in proc.stderr
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1 and "optim.name" in ours[0] and "ZeRO" in ours[0]
    assert not (tmp_path / "run").exists()


def test_adalora_refused_under_zero3(tmp_path):
    """peft's rank allocator needs whole weights and gradients; ZeRO-3 partitions both, so the run
    is refused at launch (before it used to fail on its first reallocation)."""
    proc = launch("deepspeed-zero3", tmp_path / "run", "adapter.type=adalora", "adapter.init_r=4",
                  "adapter.target_r=2", args=[])
    assert proc.returncode != 0 and "exitcode  : 2" in proc.stderr
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1 and "adapter.type" in ours[0] and "ZeRO-3" in ours[0], ours
    assert not (tmp_path / "run").exists()
