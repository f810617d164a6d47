"""The loop on the tiny model: accumulation invariance, exact resume, run-dir safety, export."""
from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from cli_runner import TINY, losses, metrics, run_inprocess

FAST = ["train.max_steps=6", "train.eval_batches=1", "data.max_length=48"]


def test_metrics_and_run_dir_layout(tmp_path):
    out = tmp_path / "run"
    assert run_inprocess("--config", TINY, f"train.output_dir={out}", *FAST, "train.save_every=3",
                         "train.keep_last=1") == 0
    rows = metrics(out)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 7))
    assert all({"loss", "lr", "grad_norm", "tokens_per_s", "peak_rss_mb"} <= set(r) for r in rows if "loss" in r)
    assert any("eval/loss" in r for r in rows)
    assert (out / "config.yaml").exists() and (out / "adapter" / "adapter_config.json").exists()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-6"]  # keep_last=1


def test_loss_does_not_depend_on_accumulation_split(tmp_path):
    """bs 8 x GA 1 and bs 4 x GA 2 see the same examples per update: same losses, same weights."""
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["train.max_steps=4", "train.eval_batches=1", "data.max_length=48", "train.lr_schedule=linear"]
    assert run_inprocess("--config", TINY, f"train.output_dir={a}", "train.batch_size=8", *common) == 0
    assert run_inprocess("--config", TINY, f"train.output_dir={b}", "train.batch_size=4",
                         "train.gradient_accumulation_steps=2", *common) == 0
    la, lb = losses(a), losses(b)
    assert la.keys() == lb.keys()
    for step in la:
        assert la[step] == pytest.approx(lb[step], abs=1e-5)
    wa = load_file(a / "adapter" / "adapter_model.safetensors")
    wb = load_file(b / "adapter" / "adapter_model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_resume_is_exact_mid_epoch_with_accumulation(tmp_path, schedule):
    """10 steps, stop, resume to 20 == 20 straight (dropout on, GA 2, mid-epoch: 111 examples
    make 27 micro-batches of 4 per epoch, so step 10 ends inside the first epoch)."""
    common = ["train.gradient_accumulation_steps=2", "adapter.dropout=0.1", "train.eval_batches=1",
              "data.max_length=32", "train.batch_size=4", f"train.lr_schedule={schedule}", "train.save_every=5"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_inprocess("--config", TINY, f"train.output_dir={straight}", "train.max_steps=20", *common) == 0
    if schedule == "constant":  # a run that ended at 10 and is extended
        first = ["train.max_steps=10"]
    else:  # a 20-step run cut at step 10 (as a kill would), keeping the schedule of 20
        first = ["train.max_steps=20", "train.stop_after_steps=10"]
    assert run_inprocess("--config", TINY, f"train.output_dir={resumed}", *first, *common) == 0
    assert run_inprocess("--config", TINY, f"train.output_dir={resumed}", "train.max_steps=20",
                         "train.resume=auto", *common) == 0
    ls, lr = losses(straight), losses(resumed)
    assert sorted(lr) == list(range(1, 21))  # no step logged twice
    for step in range(1, 21):
        assert lr[step] == pytest.approx(ls[step], abs=1e-6), step
    a = load_file(straight / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed / "adapter" / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-7, rtol=0)


def test_existing_run_is_refused_and_untouched(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_inprocess("--config", TINY, f"train.output_dir={out}", "train.max_steps=2", "train.eval_batches=1") == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert run_inprocess("--config", TINY, f"train.output_dir={out}", "train.max_steps=2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a run" in err[0] and "train.resume=auto" in err[0]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_export_merge_gives_base_plus_adapter_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    from trainer.config import load_config
    from trainer.models import load_model, load_tokenizer
    out, merged = tmp_path / "run", tmp_path / "merged"
    assert run_inprocess("--config", TINY, f"train.output_dir={out}", *FAST) == 0
    assert run_inprocess("export", "--run", str(out), "--merge", "--out", str(merged)) == 0
    cfg = load_config(out / "config.yaml")
    tok = load_tokenizer(cfg.model)
    ids = tok("To be, or not to be, that is the question", return_tensors="pt")["input_ids"]
    reference = PeftModel.from_pretrained(load_model(cfg.model, tok), str(out / "adapter")).eval()
    exported = AutoModelForCausalLM.from_pretrained(merged).eval()
    with torch.no_grad():
        want, got = reference(ids).logits, exported(ids).logits
    base = load_model(cfg.model, tok).eval()
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, want, atol=1e-4)  # the adapter changed something
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
