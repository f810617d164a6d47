"""Models: spec resolution, tiny random models, packaged models, the GGUF conversion cache."""
from __future__ import annotations

import os
import shutil
import time

import pytest
import torch

from trainer import models
from trainer.errors import UserError
from trainer.models import load_model, load_tokenizer, resolve_model


def test_unknown_packaged_model_lists_valid_names():
    with pytest.raises(UserError) as err:
        resolve_model("packaged:gpt2")
    line = err.value.line()
    assert err.value.where == "model.name_or_path"
    assert "packaged:smollm2-135m-instruct" in line and "packaged:all-minilm-l6-v2" in line


def test_unknown_tiny_model():
    with pytest.raises(UserError, match="tiny:llama"):
        resolve_model("tiny:gpt")


def test_local_folder_hub_id_and_missing_path(tmp_path):
    assert resolve_model(str(tmp_path)) == str(tmp_path.resolve())
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    missing = tmp_path / "models" / "mine"
    for spec in (str(missing), "./mine", "a/b/c"):
        with pytest.raises(UserError) as err:
            resolve_model(spec)
        assert err.value.where == "model.name_or_path" and "no such model folder" in err.value.line()
    with pytest.raises(UserError, match=str(missing)):
        resolve_model(str(missing))


def test_folder_without_config_is_a_user_error(tmp_path, make_model_cfg, smollm2_tokenizer):
    with pytest.raises(UserError) as err:
        load_model(make_model_cfg(str(tmp_path)), smollm2_tokenizer)
    assert err.value.where == "model.name_or_path" and str(tmp_path) in err.value.line()


def test_tiny_llama_shape_and_determinism(tiny_llama, smollm2_tokenizer, make_model_cfg):
    cfg = tiny_llama.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size) == (64, 2, 4, 2, 128)
    assert cfg.vocab_size == len(smollm2_tokenizer) == 49_152
    assert cfg.pad_token_id == smollm2_tokenizer.pad_token_id
    torch.manual_seed(0)
    again = load_model(make_model_cfg("tiny:llama"), smollm2_tokenizer)
    for (name, a), (_, b) in zip(tiny_llama.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_tiny_bert_classifier(tiny_bert_classifier, minilm_tokenizer, make_model_cfg):
    cfg = tiny_bert_classifier.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (
        64, 2, 4, 128)
    assert cfg.vocab_size == len(minilm_tokenizer) and cfg.pad_token_id == minilm_tokenizer.pad_token_id
    batch = minilm_tokenizer(["a fine film", "dull"], padding=True, return_tensors="pt")
    assert tiny_bert_classifier(**batch).logits.shape == (2, 2)
    cfg3 = make_model_cfg("tiny:bert", task="sequence_classification", num_labels=3)
    three = load_model(cfg3, minilm_tokenizer)
    assert three(**batch).logits.shape == (2, 3)


def test_encoder_refused_for_causal_lm(minilm_tokenizer, make_model_cfg):
    with pytest.raises(UserError, match="sequence_classification"):
        load_model(make_model_cfg("tiny:bert"), minilm_tokenizer)


def test_dtype_and_padding_side(smollm2_tokenizer, make_model_cfg):
    assert smollm2_tokenizer.padding_side == "right" and smollm2_tokenizer.pad_token is not None
    model = load_model(make_model_cfg("tiny:llama", dtype="bfloat16"), smollm2_tokenizer)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_packaged_minilm_classifier(make_model_cfg):
    cfg = make_model_cfg("packaged:all-minilm-l6-v2", task="sequence_classification", num_labels=2)
    folder = resolve_model(cfg.name_or_path)
    assert os.path.isfile(os.path.join(folder, "config.json"))
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, tokenizer)
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    assert model.num_labels == 2


def test_cache_build_is_atomic(tmp_path):
    final = tmp_path / "models" / "thing"

    def failing(tmp):
        (tmp / "half-written").write_text("x")
        raise RuntimeError("killed mid-conversion")

    with pytest.raises(RuntimeError):
        models._atomic_build(final, failing)
    assert not final.exists()
    assert not [p for p in final.parent.iterdir() if p.is_dir()]  # no half-written temp folder left

    calls = []
    models._atomic_build(final, lambda tmp: calls.append((tmp / "ok").write_text("y")))
    models._atomic_build(final, lambda tmp: calls.append("rebuilt"))
    assert (final / "ok").read_text() == "y" and len(calls) == 1


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty PEFTFORGE_CACHE, deleted afterwards: the converted model is 0.5 GB."""
    monkeypatch.setenv("PEFTFORGE_CACHE", str(tmp_path / "cache"))
    yield tmp_path / "cache"
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)


@pytest.mark.slow
def test_smollm2_conversion_is_cached_and_answers(fresh_cache, make_model_cfg):
    folder = resolve_model("packaged:smollm2-135m-instruct")
    weights = os.path.join(folder, "model.safetensors")
    first_mtime = os.stat(weights).st_mtime_ns

    start = time.perf_counter()
    assert resolve_model("packaged:smollm2-135m-instruct") == folder
    cfg = make_model_cfg("packaged:smollm2-135m-instruct")
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, tokenizer).eval()
    assert time.perf_counter() - start < 10  # measured ~1 s; generous for a loaded CI machine
    assert os.stat(weights).st_mtime_ns == first_mtime  # not converted again

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=16, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])
