"""`train.py pipeline` end to end on the tiny models: select -> warm-up on the selection -> merge ->
fine-tune from the warmed-up weights, each stage in its own folder, each resumable."""
from __future__ import annotations

import json

import torch
import yaml
from safetensors.torch import load_file

from cli_runner import ROOT, losses, run_inprocess

CONFIG = str(ROOT / "configs" / "select-tiny.yaml")


def test_pipeline_runs_every_stage_resumes_a_stopped_one_and_skips_finished_ones(tmp_path, capsys):
    root = tmp_path / "p"
    common = ["pipeline", "--config", CONFIG, f"train.output_dir={root}", f"selection.cache_dir={tmp_path / 'cache'}",
              "selection.budget=16", "train.max_steps=3"]
    # first run: the warm-up (16 rows / batch 4 = 4 steps) stops resumably after step 2
    assert run_inprocess(*common, "selection.warmup.overrides=[train.stop_after_steps=2,train.save_every=2]") == 0
    assert "warmup stopped before its last step" in capsys.readouterr().out
    assert (root / "select" / "selected.jsonl").exists() and not (root / "warmup" / "adapter").exists()
    assert not (root / "finetune").exists()

    # second run: selection reused, warm-up continues from its checkpoint, then merge and fine-tune
    assert run_inprocess(*common) == 0
    stages = json.loads((root / "pipeline.json").read_text())["stages"]
    assert stages["select"]["status"].startswith("skipped") and stages["warmup"]["status"] == "done"
    assert stages["merge"]["status"] == "done" and stages["finetune"]["status"] == "done"
    assert sorted(losses(root / "warmup")) == [1, 2, 3, 4]  # one epoch over the selection, each step once
    warm_cfg = yaml.safe_load((root / "warmup" / "config.yaml").read_text())
    assert warm_cfg["data"]["path"] == str(root / "select" / "selected.jsonl") and warm_cfg["data"]["format"] == "text"
    tune_cfg = yaml.safe_load((root / "finetune" / "config.yaml").read_text())
    assert tune_cfg["model"]["name_or_path"] == str(root / "warmed-model") and tune_cfg["data"]["path"] == "packaged:hamlet"
    assert sorted(losses(root / "finetune")) == [1, 2, 3]

    # the fine-tune started from the warmed-up weights: base + the warm-up's LoRA delta
    from transformers import AutoModelForCausalLM

    from trainer.models import load_model, load_tokenizer
    from conftest import model_cfg
    base = load_model(model_cfg("tiny:llama"), load_tokenizer(model_cfg("tiny:llama")))
    warmed = AutoModelForCausalLM.from_pretrained(root / "warmed-model")
    lora = load_file(str(root / "warmup" / "adapter" / "adapter_model.safetensors"))
    name = next(k for k in lora if k.endswith("q_proj.lora_A.weight"))
    layer = name.split("base_model.model.", 1)[1].rsplit(".lora_A.weight", 1)[0]
    delta = lora[name.replace("lora_A", "lora_B")] @ lora[name] * (8 / 4)  # alpha / r
    expected = dict(base.named_parameters())[layer + ".weight"] + delta
    torch.testing.assert_close(dict(warmed.named_parameters())[layer + ".weight"], expected, atol=1e-5, rtol=1e-5)

    # third run: everything is done, nothing retrains
    assert run_inprocess(*common) == 0
    stages = json.loads((root / "pipeline.json").read_text())["stages"]
    assert all(s["status"].startswith("skipped") for s in stages.values())
