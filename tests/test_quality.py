"""Quality on the real packaged models (slow): training must actually help."""
from __future__ import annotations

from pathlib import Path

import pytest

from cli_runner import ROOT, metrics, run_inprocess

pytestmark = pytest.mark.slow


def eval_rows(run_dir: Path) -> list[dict]:
    return [m for m in metrics(run_dir) if "eval/loss" in m]


def test_lora_on_smollm2_lowers_held_out_chat_loss(tmp_path):
    """train.eval_at_start evaluates the base model (LoRA starts as the identity) on the same
    held-out conversations as the final evaluation."""
    tuned = tmp_path / "tuned"
    assert run_inprocess("--config", str(ROOT / "configs/smollm2-lora.yaml"), "train.max_steps=12", "train.batch_size=4",
                         "data.max_length=128", "data.max_examples=400", "train.eval_batches=6", "train.eval_every=0",
                         "train.eval_at_start=true", "train.save_every=0", "train.sample_prompts=[]",
                         "train.warmup_steps=2", f"train.output_dir={tuned}") == 0
    evals = {m["step"]: m["eval/loss"] for m in eval_rows(tuned)}
    before, after = evals[0], evals[12]
    assert after < before - 0.05, (before, after)


def test_lora_on_minilm_rotten_tomatoes_reaches_75_percent(tmp_path):
    out = tmp_path / "run"
    assert run_inprocess("--config", str(ROOT / "configs/minilm-sentiment-lora.yaml"), f"train.output_dir={out}",
                         "train.eval_every=0") == 0
    acc = eval_rows(out)[-1]["eval/accuracy"]
    assert acc >= 0.75, acc  # majority class is 57.7%
