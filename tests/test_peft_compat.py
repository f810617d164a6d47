"""peft's standard behaviours for every custom tuner, with peft's own LoRA as the reference: what
LoRA does, ours must do too.

  * saved keys hold no adapter name, so an adapter loads under any name (`from_pretrained(...,
    adapter_name=)`, `load_adapter(path, name)`) with its trained weights;
  * two adapters on one model: `set_adapter` switches between their outputs, `disable_adapter`
    gives the base model, `delete_adapter` removes one and keeps the other;
  * `low_cpu_mem_usage=True` loads the weights (nothing left on the meta device);
  * `layers_to_transform` adapts exactly the layers LoRA adapts, and with a regex `target_modules`
    it is refused as LoRA refuses it;
  * IAA, whose pathway gradient checkpointing breaks, is refused with it before it is built.
"BA-LoRA is a LoRA adapter in peft terms (peft's own LoraConfig, PiSSA init): it is checked through
its export, which is what users load. The tiny Llama has two layers."""
from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer

import adapters
from adapters.balora import BaLoraOptions, build_balora, save_adapter
from adapters.bottleneck import BottleneckConfig
from adapters.iaa import IAAConfig
from adapters.triadaptlora import TriAdaptLoraConfig
from conftest import model_cfg
from trainer.config import load_config
from trainer.errors import UserError
from trainer.models import load_model

CLM = TaskType.CAUSAL_LM
CONFIGS = {  # each tuner's peft config; targets None = the tuner's default placement
    "lora": lambda **kw: LoraConfig(r=4, lora_alpha=8, task_type=CLM, **kw),
    "triadaptlora": lambda **kw: TriAdaptLoraConfig(r=4, init_rank=2, total_step=10, task_type=CLM, **kw),
    "bottleneck": lambda **kw: BottleneckConfig(r=4, task_type=CLM, **kw),
    "iaa": lambda **kw: IAAConfig(r=4, task_type=CLM, **kw),
}
DEFAULT_TARGETS = {"lora": ["q_proj", "v_proj"], "triadaptlora": ["q_proj", "v_proj"],
                   "bottleneck": ["o_proj", "down_proj"], "iaa": ["o_proj", "down_proj"]}
SAVED = [*CONFIGS, "balora"]
IDS = torch.tensor([[1, 5, 9, 200, 31, 7, 64, 2], [4, 8, 15, 16, 23, 42, 108, 3]])


@pytest.fixture(scope="module")
def base_factory(smollm2_tokenizer):
    def fresh():
        torch.manual_seed(0)
        return load_model(model_cfg("tiny:llama"), smollm2_tokenizer).eval()
    return fresh


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _train(model, seed: int) -> None:
    """Random values in every trainable adapter tensor (fresh adapters start as the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def _trained(name: str, base, seed: int, adapter_name: str = "default"):
    if name == "balora":
        model, _ = build_balora(base, BaLoraOptions(r=4, alpha=4), adapters.BuildContext("causal_lm", 10, 0))
    else:
        model = get_peft_model(base, CONFIGS[name](), adapter_name=adapter_name)
    _train(model, seed)
    return model.eval()


def _save(name: str, model, path) -> str:
    if name == "balora":
        return save_adapter(model, str(path))  # the export users load: a plain LoRA for the original base
    model.save_pretrained(str(path), selected_adapters=list(model.peft_config))
    return str(path)


@pytest.fixture(scope="module")
def saved(base_factory, tmp_path_factory):
    """(tuner, seed) -> (saved adapter dir, the trained model's logits); each made once."""
    cache = {}

    def get(name: str, seed: int = 1):
        if (name, seed) not in cache:
            model = _trained(name, base_factory(), seed)
            path = _save(name, model, tmp_path_factory.mktemp(f"{name}-{seed}"))
            cache[(name, seed)] = (path, _logits(model))
        return cache[(name, seed)]
    return get


def _load_quietly(fn):
    """Run a peft load; return its result and the texts of its warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in caught]


# ----- keys and names -------------------------------------------------------------------------

@pytest.mark.parametrize("name", SAVED)
def test_saved_keys_hold_no_adapter_name(name, saved, tmp_path, base_factory):
    from safetensors.torch import load_file
    path, _ = saved(name)
    keys = set(load_file(f"{path}/adapter_model.safetensors"))
    assert keys and not [k for k in keys if "default" in k.split(".")]
    if name != "balora":  # the same adapter trained under another name saves the same keys
        other = _save(name, _trained(name, base_factory(), 1, adapter_name="other"), tmp_path / "other")
        assert set(load_file(f"{other}/other/adapter_model.safetensors")) == keys


@pytest.mark.parametrize("name", SAVED)
def test_loads_under_another_name_with_the_trained_weights(name, saved, base_factory):
    path, trained = saved(name)
    model, said = _load_quietly(lambda: PeftModel.from_pretrained(base_factory(), path, adapter_name="other"))
    assert not [w for w in said if "missing" in w.lower()], said
    torch.testing.assert_close(_logits(model), trained)
    # load_adapter under a third name, next to the first
    _, said = _load_quietly(lambda: model.load_adapter(path, adapter_name="third"))
    assert not [w for w in said if "missing" in w.lower()], said
    model.set_adapter("third")
    torch.testing.assert_close(_logits(model), trained)


@pytest.mark.parametrize("name", SAVED)
def test_two_adapters_switch_disable_and_delete(name, saved, base_factory):
    (path1, one), (path2, two) = saved(name, 1), saved(name, 2)
    base = _logits(base_factory())
    model = PeftModel.from_pretrained(base_factory(), path1, adapter_name="one")
    model.load_adapter(path2, adapter_name="two")
    assert not torch.allclose(one, two, atol=1e-3) and not torch.allclose(one, base, atol=1e-3)
    model.set_adapter("two")
    torch.testing.assert_close(_logits(model), two)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model), base)
    model.set_adapter("one")
    torch.testing.assert_close(_logits(model), one)
    model.delete_adapter("two")
    assert list(model.peft_config) == ["one"]
    assert not [n for n, _ in model.named_parameters() if "two" in n.split(".")]
    torch.testing.assert_close(_logits(model), one)


@pytest.mark.parametrize("name", SAVED)
def test_low_cpu_mem_usage_load_leaves_nothing_on_meta(name, saved, base_factory):
    path, trained = saved(name)
    model = PeftModel.from_pretrained(base_factory(), path, adapter_name="other", low_cpu_mem_usage=True)
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert on_meta == []
    torch.testing.assert_close(_logits(model), trained)


def test_only_the_active_adapter_trains(base_factory):
    for name in CONFIGS:
        model = get_peft_model(base_factory(), CONFIGS[name](), adapter_name="one")
        model.add_adapter("two", CONFIGS[name]())
        model.base_model.set_adapter("two")
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all("two" in n.split(".") for n in trainable), (name, trainable)


# ----- layer indexing ---------------------------------------------------------------------------

def _adapted(model) -> set[str]:
    return {n.split("base_model.model.", 1)[1] for n, m in model.named_modules()
            if isinstance(m, BaseTunerLayer) and "base_layer" not in n}


@pytest.mark.parametrize("name", [n for n in CONFIGS if n != "lora"])
@pytest.mark.parametrize("targets", ["named", "default"])
def test_layers_to_transform_adapts_the_layers_lora_adapts(name, targets, base_factory):
    names = DEFAULT_TARGETS[name]
    ours = get_peft_model(base_factory(), CONFIGS[name](
        layers_to_transform=[1], target_modules=names if targets == "named" else None))
    reference = get_peft_model(base_factory(), CONFIGS["lora"](layers_to_transform=[1], target_modules=names))
    assert _adapted(ours) == _adapted(reference)
    assert _adapted(ours) and all(".layers.1." in n for n in _adapted(ours))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_regex_targets_with_layer_indices_are_refused_as_lora_refuses_them(name):
    with pytest.raises(ValueError, match="layers_to_transform"):
        CONFIGS[name](target_modules=r".*\.(o_proj|down_proj)", layers_to_transform=[1])
    with pytest.raises(ValueError, match="layers_pattern"):
        CONFIGS[name](target_modules=r".*\.(o_proj|down_proj)", layers_pattern="layers")


# ----- gradient checkpointing -------------------------------------------------------------------

def test_iaa_refuses_gradient_checkpointing_enabled_through_peft_or_the_config(base_factory, tmp_path):
    model = base_factory()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(ValueError, match="gradient checkpointing"):
        get_peft_model(model, CONFIGS["iaa"]())
    for method in ("iaa", "prefix"):
        with pytest.raises(UserError, match="train.gradient_checkpointing"):
            load_config(None, [f"adapter.type={method}", "train.gradient_checkpointing=true",
                               "model.name_or_path=tiny:llama", f"train.output_dir={tmp_path}"])
