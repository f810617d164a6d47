"""The research optimizers (AdaHessian, GaLore, Natural GaLore) driven by the real training loop
on the tiny model: they learn, resume exactly, keep AdaHessian's memory flat, and the validator
refuses the combinations that cannot work. The optimizers' own maths is tested against
references in test_optim_adahessian.py and test_optim_galore.py; this file tests the contract
between them and trainer/loop.py (create_graph on Hessian steps, state in checkpoints)."""
from __future__ import annotations

import weakref
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cli_runner import TINY, losses, run_inprocess

pytestmark = pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")

# A repeated small batch: 4 training examples, batch 4 -> every step sees the same 4 examples.
REPEATED = ["data.max_examples=4", "train.batch_size=4", "data.max_length=32", "train.eval_batches=1",
            "train.lr_schedule=constant", "train.warmup_steps=0"]

# How each optimizer is run on the tiny model. GaLore family: full fine-tuning (adapter.type none),
# rank 4 of the 64/128-wide tiny matrices. AdaHessian: LoRA, Newton-like step so a larger lr.
LEARNS = {
    "adahessian": ("lora", ["optim.lr=0.1"]),
    "galore_adamw": ("full", ["optim.lr=1e-2", "optim.rank=4"]),
    "natural_galore": ("full", ["optim.lr=1e-2", "optim.rank=4", "optim.natural_history=4"]),
}

# Resume settings chosen so the stop at step 5 lands somewhere awkward for each optimizer:
# AdaHessian between Hessian steps (interval 2, so the resumed run's first step must NOT ask for a
# graph), GaLore in the middle of a subspace with a projector refresh after the resume, Natural
# GaLore with its history ring buffer wrapped (history 2 < gap 4).
RESUMES = {
    "adahessian": ("lora", ["optim.lr=0.05", "optim.hessian_interval=2", "adapter.dropout=0.1"]),
    "galore_adamw": ("full", ["optim.lr=1e-2", "optim.rank=4", "optim.update_proj_gap=3"]),
    "natural_galore": ("full", ["optim.lr=1e-2", "optim.rank=4", "optim.update_proj_gap=4",
                                "optim.natural_history=2"]),
}


@pytest.fixture(scope="module")
def tiny_full(tmp_path_factory) -> str:
    """configs/tiny-lora.yaml with the adapter section replaced by full fine-tuning (the LoRA keys
    cannot be removed by a key=value override)."""
    cfg = yaml.safe_load(Path(TINY).read_text())
    cfg["adapter"] = {"type": "none"}
    path = tmp_path_factory.mktemp("cfg") / "tiny-full.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


def _config(kind: str, tiny_full: str) -> str:
    return TINY if kind == "lora" else tiny_full


def _optimizer_state(ckpt: Path) -> dict:
    return torch.load(ckpt / "optimizer.pt", weights_only=True)["optimizer"]


@pytest.mark.parametrize("name", sorted(LEARNS))
def test_optimizer_lowers_loss_on_a_repeated_batch(tmp_path, tiny_full, name):
    kind, opts = LEARNS[name]
    out = tmp_path / "run"
    assert run_inprocess("--config", _config(kind, tiny_full), f"train.output_dir={out}", f"optim.name={name}",
                         *opts, *REPEATED, "train.max_steps=12", "train.save_every=12") == 0
    loss = losses(out)
    assert sorted(loss) == list(range(1, 13))
    first, last = loss[1], loss[12]
    # LoRA on a random model moves slowly (AdamW at lr 1e-2 gains ~0.15 in 12 steps); full
    # fine-tuning of the tiny model memorises 4 examples fast.
    assert last < first - (0.1 if kind == "lora" else 2.0), (first, last)
    assert min(loss.values()) == pytest.approx(min(loss[11], loss[12]), abs=0.02)  # still improving at the end
    state = _optimizer_state(out / "checkpoints" / "step-12")
    if name == "adahessian":  # the loop passed create_graph on every Hessian step (interval 1: all 12)
        assert state["adahessian"]["steps"] == 12
        assert {s["hessian_step"] for s in state["state"].values()} == {12}
    else:  # the targeted matrices really were projected: rank-4 moments, a projector per matrix
        projected = [s for s in state["state"].values() if "projector" in s]
        assert projected and all(4 in s["exp_avg"].shape and s["exp_avg"].numel() <= 4 * 128 for s in projected)
        if name == "natural_galore":
            assert all(s["history"].shape[0] == 4 for s in projected)


@pytest.mark.parametrize("name", sorted(RESUMES))
def test_resume_is_exact_for_optimizer(tmp_path, tiny_full, name):
    """10 straight == 5, stop, resume to 10 (cosine schedule of 10 kept, GA 2, mid-epoch)."""
    kind, opts = RESUMES[name]
    config = _config(kind, tiny_full)
    common = [f"optim.name={name}", *opts, "train.max_steps=10", "train.gradient_accumulation_steps=2",
              "train.batch_size=2", "data.max_length=32", "train.eval_batches=1", "train.lr_schedule=cosine",
              "train.warmup_steps=2", "train.save_every=5"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_inprocess("--config", config, f"train.output_dir={straight}", *common) == 0
    assert run_inprocess("--config", config, f"train.output_dir={resumed}", *common, "train.stop_after_steps=5") == 0
    assert sorted(losses(resumed)) == [1, 2, 3, 4, 5]
    assert run_inprocess("--config", config, f"train.output_dir={resumed}", *common, "train.resume=auto") == 0
    ls, lr = losses(straight), losses(resumed)
    assert sorted(lr) == list(range(1, 11))  # no step logged twice
    for step in range(1, 11):
        assert lr[step] == pytest.approx(ls[step], abs=1e-6), step
    ckpt_a, ckpt_b = straight / "checkpoints" / "step-10", resumed / "checkpoints" / "step-10"
    a, b = load_file(ckpt_a / "trainable.safetensors"), load_file(ckpt_b / "trainable.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-7, rtol=0)
    sa, sb = _optimizer_state(ckpt_a), _optimizer_state(ckpt_b)
    for key, state in sa["state"].items():
        for field, value in state.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(value, sb["state"][key][field], atol=1e-7, rtol=0)
            else:
                assert value == sb["state"][key][field], (key, field)
    if name == "adahessian":  # same probes drawn after the resume
        assert sa["adahessian"]["steps"] == sb["adahessian"]["steps"] == 10
        for dev, rng in sa["adahessian"]["rng"].items():
            assert torch.equal(rng, sb["adahessian"]["rng"][dev])


# ---- AdaHessian memory through the loop --------------------------------------------------------

class _SavedTensorCensus:
    """Counts the tensors autograd keeps for backward (activations), via saved-tensor hooks: each
    saved tensor is wrapped in a holder that dies when autograd frees it."""

    class _Holder:
        __slots__ = ("t", "__weakref__")

        def __init__(self, t):
            self.t = t

    def __init__(self):
        self.live: weakref.WeakSet = weakref.WeakSet()

    def pack(self, t):
        holder = self._Holder(t)
        self.live.add(holder)
        return holder

    @staticmethod
    def unpack(holder):
        return holder.t

    def snapshot(self) -> tuple[int, int]:
        held = list(self.live)
        return len(held), sum(h.t.numel() * h.t.element_size() for h in held)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def _run_with_census(monkeypatch, out: Path, *args: str) -> dict[int, tuple[int, int, float]]:
    """Run the loop with AdaHessian; at every step boundary (when the loop asks the optimizer
    whether the coming backward needs a graph: the previous step is finished, the next forward
    has not begun) record (saved tensors alive, their bytes, current RSS in MB)."""
    from optim.adahessian import AdaHessian

    census, boundary, inside_step = _SavedTensorCensus(), {}, [False]
    original_step, original_wants = AdaHessian.step, AdaHessian.wants_create_graph

    def step(self, *a, **k):
        inside_step[0] = True
        try:
            return original_step(self, *a, **k)
        finally:
            inside_step[0] = False

    def wants_create_graph(self):
        if not inside_step[0]:  # the loop's call, not step()'s own
            boundary[self._steps] = (*census.snapshot(), _rss_mb())
        return original_wants(self)

    monkeypatch.setattr(AdaHessian, "step", step)
    monkeypatch.setattr(AdaHessian, "wants_create_graph", wants_create_graph)
    with torch.autograd.graph.saved_tensors_hooks(census.pack, census.unpack):
        assert run_inprocess("--config", TINY, f"train.output_dir={out}", "optim.name=adahessian",
                             "optim.lr=0.05", "train.batch_size=2", "data.max_length=24", "train.eval_batches=1",
                             *args) == 0
    return boundary


@pytest.mark.parametrize("interval", [1, 3])
def test_adahessian_memory_is_flat_over_100_loop_steps(tmp_path, monkeypatch, interval):
    boundary = _run_with_census(monkeypatch, tmp_path / "run", "train.max_steps=100",
                                f"optim.hessian_interval={interval}")
    assert sorted(boundary) == list(range(100))  # asked once per step, by the loop
    # What autograd keeps alive between steps does not grow: step 99 (or the last step of the same
    # phase of the Hessian interval) holds exactly what step 21 held.
    late = max(s for s in range(90, 100) if s % interval == 21 % interval)
    assert boundary[late][:2] == boundary[21][:2], (boundary[21], boundary[late])
    assert max(boundary[s][0] for s in range(20, 100)) == max(boundary[s][0] for s in range(20, 20 + interval))
    # Nor does the process, coarsely: RSS wanders by +-25 MB from step to step with the allocator
    # (AdamW too), but keeping one step's activations (~9 MB of logits alone at batch 2 x 24) per
    # step would add over 500 MB between the two windows.
    rss = sorted(boundary[s][2] for s in range(10, 40)), sorted(boundary[s][2] for s in range(70, 100))
    early, late_rss = rss[0][15], rss[1][15]
    assert late_rss - early < 64, (early, late_rss)


def test_adahessian_keeps_no_activations_across_steps(tmp_path, monkeypatch):
    boundary = _run_with_census(monkeypatch, tmp_path / "run", "train.max_steps=4")
    assert all(boundary[s][0] == 0 for s in range(1, 4)), boundary


def test_printed_config_keeps_the_optimizer_options(capsys):
    assert run_inprocess("--config", TINY, "--print-config", "optim.name=adahessian", "optim.hessian_interval=3") == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"].get("hessian_interval") == 3, printed["optim"]
    assert printed["adapter"].get("r") == 4, printed["adapter"]


# ---- refusals ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["galore_adamw", "natural_galore"])
def test_galore_family_refuses_an_adapter(tmp_path, capsys, name):
    out = tmp_path / "run"
    assert run_inprocess("--config", TINY, f"train.output_dir={out}", f"optim.name={name}", "adapter.type=lora") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"optim.name={name}" in err[0] and "adapter.type=none" in err[0], err
    assert not out.exists()


def test_adahessian_refuses_sdpa_attention(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_inprocess("--config", TINY, f"train.output_dir={out}", "optim.name=adahessian",
                         "model.attn_implementation=sdpa") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.attn_implementation" in err[0] and "adahessian" in err[0], err
    assert not out.exists()
