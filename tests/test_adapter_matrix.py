"""Every registered adapter type through the real CLI on the tiny models: it trains, reloads, merges.

For each `adapters.ADAPTERS` entry and each task it fits (causal LM on tiny:llama, sequence
classification on tiny:bert), one short run on a small repeated dataset, then:
  * the training loss falls;
  * the trained model is rebuilt without the run's own save path: a fresh seeded base, the
    method's `build`, the method state and the trainable weights of the final checkpoint
    (loaded by name). It reproduces the eval/loss the run logged after its last step, so its
    logits are the trained model's;
  * the saved adapter, loaded with `PeftModel.from_pretrained` onto a fresh base (full
    fine-tuning: the saved model folder), gives those logits;
  * `merge_and_unload` gives them too, for methods that merge.
An adapter registered later is picked up automatically. One whose `AdapterSpec` declares
`tasks` (e.g. a retrieval-only method) runs only on the tasks it lists.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from safetensors.torch import load_file

import adapters
from adapters import NotMergeableError
from cli_runner import losses, metrics, run_inprocess
from trainer import checkpoint
from trainer.config import load_config
from trainer.data import Collator, build_datasets
from trainer.models import load_model, load_tokenizer

warnings.filterwarnings("ignore", category=UserWarning)

# every run: constant LR, a final checkpoint (save_every = max_steps), one eval batch
COMMON = ["train.lr_schedule=constant", "train.warmup_steps=0", "train.eval_batches=1", "train.log_every=1",
          "optim.lr=5e-2", "optim.weight_decay=0.0"]
# per task: model, a small dataset seen for several epochs, steps, and how far (nats) the mean
# loss of the last three steps must lie below that of the first three
TASKS = {
    # 4 Hamlet chunks of 16 tokens, 2 per batch: 6 epochs
    "causal_lm": {"steps": 12, "drop": 0.05, "args": [
        "model.name_or_path=tiny:llama", "model.task=causal_lm", "data.path=packaged:hamlet", "data.format=text",
        "data.max_length=16", "data.max_examples=4", "data.eval_fraction=0.05", "train.batch_size=2"]},
    # the 8 sentences below (written by the fixture; also the eval set), 4 per batch: 15 epochs.
    # A random tiny BERT's [CLS] features hardly differ between inputs, so the words are repeated
    # to give the encoder a signal, and the run needs more (cheap) steps to leave the plateau.
    "sequence_classification": {"steps": 30, "drop": 0.2, "args": [
        "model.name_or_path=tiny:bert", "model.task=sequence_classification", "model.num_labels=2",
        "data.format=classification", "data.max_length=16", "train.batch_size=4"]},
}
POSITIVE = ["great great great film", "great great acting great", "loved it great great", "great fun great great"]
NEGATIVE = ["awful awful awful film", "awful awful acting awful", "hated it awful awful", "awful bore awful awful"]
# Small ranks, no adapter dropout, and for the rank-changing methods a schedule that really
# prunes (AdaLoRA) or grows (TriAdaptLoRA) within the run. An adapter not listed runs with its defaults.
OPTIONS = {
    "lora": ["adapter.r=4", "adapter.alpha=8", "adapter.dropout=0.0"],
    "dora": ["adapter.r=4", "adapter.alpha=8", "adapter.dropout=0.0"],
    "adalora": ["adapter.init_r=4", "adapter.target_r=2", "adapter.alpha=8", "adapter.dropout=0.0",
                "adapter.tinit=2", "adapter.tfinal=3", "adapter.orth_reg_weight=0.1"],
    "triadaptlora": ["adapter.r=4", "adapter.init_rank=2", "adapter.alpha=8", "adapter.dropout=0.0",
                     "adapter.incre_interval=2", "adapter.orth_reg_weight=0.1"],
    "balora": ["adapter.r=4", "adapter.alpha=4"],
}
TASK_OPTIONS = {
    ("none", "causal_lm"): ["optim.lr=1e-2"],
    ("none", "sequence_classification"): ["optim.lr=1e-3"],
    # (IA)^3 only rescales activations: on the near-constant features above it needs large steps
    ("ia3", "sequence_classification"): ["optim.lr=0.3"],
}
# cases whose loss stays on the tiny BERT's plateau (tried up to 80 steps and lr 2e-2..2e-1);
# their checkpoint, reload and merge are still checked
PLATEAU = {
    ("bitfit", "sequence_classification"): "biases alone cannot separate the near-identical [CLS] features of the "
                                           "random tiny BERT (on the pretrained MiniLM they lower the retrieval loss: "
                                           "test_retrieval.py::test_bitfit_and_prefix_lower_the_retrieval_loss...)",
}


def _fits(spec, task: str) -> bool:
    tasks = getattr(spec, "tasks", None)
    return tasks is None or task in tasks


CASES = [pytest.param(name, task, id=f"{name}-{task}")
         for name, spec in adapters.ADAPTERS.items() for task in TASKS if _fits(spec, task)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(adapter, task) -> a finished run and its independently rebuilt model; each run happens once."""
    root = tmp_path_factory.mktemp("matrix")
    sentiment = root / "sentiment.jsonl"
    sentiment.write_text("".join(json.dumps({"text": t, "label": label}) + "\n"
                                 for pair in zip(POSITIVE, NEGATIVE) for t, label in zip(pair, (1, 0))))
    cache: dict = {}

    def get(name: str, task: str) -> dict:
        if (name, task) not in cache:
            out = root / f"{name}-{task}"
            data = [f"data.path={sentiment}", f"data.eval_path={sentiment}"] if task != "causal_lm" else []
            assert run_inprocess(*_args(out, name, task, data)) == 0, f"{name} on {task} failed"
            cache[(name, task)] = _rebuild(out)
        return cache[(name, task)]

    return get


def _args(out: Path, name: str, task: str, data: list[str]) -> list[str]:
    steps = TASKS[task]["steps"]
    return [f"train.output_dir={out}", f"adapter.type={name}", f"train.max_steps={steps}", f"train.save_every={steps}",
            *COMMON, *TASKS[task]["args"], *data, *OPTIONS.get(name, []), *TASK_OPTIONS.get((name, task), [])]


def _fresh_base(cfg, tokenizer):
    set_seed(cfg.train.seed)  # the loop seeds right before it loads the (random, for tiny:*) base
    return load_model(cfg.model, tokenizer)


def _rebuild(run_dir: Path) -> dict:
    """The trained model from the final checkpoint: the run's saved config.yaml, a fresh base, the
    method's build, the method state and the trainable weights by name."""
    cfg = load_config(run_dir / "config.yaml")
    tokenizer = load_tokenizer(cfg.model)
    spec = adapters.ADAPTERS[cfg.adapter.type]
    model, hooks = spec.build(_fresh_base(cfg, tokenizer), cfg.adapter,
                              adapters.BuildContext(cfg.model.task, cfg.train.max_steps, cfg.train.seed))
    ckpt = checkpoint.latest_checkpoint(run_dir)
    assert ckpt is not None and ckpt.name == f"step-{cfg.train.max_steps}"
    _, method_state = checkpoint.read_state(ckpt)
    hooks.load_state_dict(method_state)  # regrown ranks, PiSSA's initial factors, ...
    weights = load_file(str(ckpt / "trainable.safetensors"))
    params = dict(model.named_parameters())
    assert set(weights) == {n for n, p in params.items() if p.requires_grad}
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    model.eval()

    _, eval_set = build_datasets(cfg.data, tokenizer, cfg.model.task, cfg.train.seed)
    collate = Collator(tokenizer.pad_token_id, cfg.model.task, packed=cfg.data.packing)
    probe = collate(eval_set[:cfg.train.batch_size])  # the run's single eval batch (eval_batches=1)
    logits = _logits(model, probe)
    return {"run_dir": run_dir, "cfg": cfg, "tokenizer": tokenizer, "spec": spec, "probe": probe,
            "logits": logits, "eval_loss": _mean_loss(logits, probe)}


def _logits(model, batch) -> torch.Tensor:
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    with torch.no_grad():
        return model.eval()(**inputs).logits


def _mean_loss(logits: torch.Tensor, batch: dict) -> float:
    """Mean cross-entropy per loss token (causal LM, labels shifted) or per example."""
    if "label" in batch:
        return float(F.cross_entropy(logits.float(), batch["label"]))
    return float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                                 ignore_index=-100))


def _reload(run: dict):
    """The run's saved result on a fresh base, loaded the way a user would."""
    cfg, spec = run["cfg"], run["spec"]
    if spec.kind == "full":
        auto = type(_fresh_base(cfg, run["tokenizer"]))
        return auto.from_pretrained(run["run_dir"] / "model")
    return PeftModel.from_pretrained(_fresh_base(cfg, run["tokenizer"]), str(run["run_dir"] / "adapter"))


# methods whose adapters are no weight update: their merge is refused with NotMergeableError, and
# that refusal (not any NotImplementedError) is the only reason to skip the merge check
NOT_MERGEABLE = {"iaa", "bottleneck"}


def test_every_adapter_is_in_the_matrix():
    """Every registered method runs here on at least one task, so a method whose declared tasks
    leave it out of the matrix (a retrieval-only one, say) must be added a task here first."""
    covered = {case.values[0] for case in CASES}
    assert set(adapters.ADAPTERS) - covered == set()
    assert NOT_MERGEABLE <= covered


@pytest.mark.parametrize(("name", "task"), CASES)
def test_trains_and_the_checkpoint_is_the_trained_model(trained, name, task):
    run = trained(name, task)
    logged = [m["eval/loss"] for m in metrics(run["run_dir"]) if "eval/loss" in m]
    # the rebuilt model reproduces the run's own final evaluation: it is the trained model
    assert run["eval_loss"] == pytest.approx(logged[-1], rel=1e-5, abs=1e-5)
    if getattr(run["spec"], "adds_parameters", False):  # the reload tests must rebuild grown shapes
        ranks = [m["adapter/total_rank"] for m in metrics(run["run_dir"]) if "adapter/total_rank" in m]
        assert ranks[-1] > ranks[0]
    steps = TASKS[task]["steps"]
    curve = losses(run["run_dir"])
    assert sorted(curve) == list(range(1, steps + 1))
    first, last = [sum(curve[s] for s in window) / 3 for window in ((1, 2, 3), (steps - 2, steps - 1, steps))]
    fell = last < first - TASKS[task]["drop"]
    if not fell and (name, task) in PLATEAU:
        pytest.xfail(PLATEAU[(name, task)])
    assert fell, curve


@pytest.mark.parametrize(("name", "task"), CASES)
def test_saved_adapter_reloads_with_the_trained_logits(trained, name, task):
    run = trained(name, task)
    reloaded = _reload(run)
    torch.testing.assert_close(_logits(reloaded, run["probe"]), run["logits"], atol=1e-4, rtol=1e-4)
    base = _fresh_base(run["cfg"], run["tokenizer"])
    assert not torch.allclose(_logits(base, run["probe"]), run["logits"], atol=1e-3)  # training changed the model


@pytest.mark.parametrize(("name", "task"), CASES)
def test_merge_and_unload_keeps_the_trained_logits(trained, name, task):
    run = trained(name, task)
    if run["spec"].kind == "full":
        pytest.skip("full fine-tuning saves a whole model: nothing to merge")
    reloaded = _reload(run)
    if not isinstance(reloaded.base_model, BaseTuner):
        pytest.skip(f"{name} is a prompt-learning method: it has no weights to merge")
    if name in NOT_MERGEABLE:
        with pytest.raises(NotMergeableError):
            reloaded.merge_and_unload()
        return  # refused as declared: nothing merged to compare
    merged = reloaded.merge_and_unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())  # really unloaded
    torch.testing.assert_close(_logits(merged, run["probe"]), run["logits"], atol=1e-4, rtol=1e-4)
