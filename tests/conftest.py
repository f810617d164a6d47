"""Shared fixtures. Tests run offline: nothing may reach a model hub or a tracking server."""
from __future__ import annotations

import os

# Set before transformers/wandb/flwr/ray are imported by any test module.
os.environ.update({
    "WANDB_MODE": "offline",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
})

from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from trainer.models import load_model, load_tokenizer  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~20 s (real models, conversions)")


def model_cfg(name_or_path: str = "tiny:llama", **overrides) -> SimpleNamespace:
    """A duck-typed `model` config section with the schema's defaults."""
    fields = {"name_or_path": name_or_path, "task": "causal_lm", "num_labels": 2, "dtype": "float32",
              "attn_implementation": None}
    return SimpleNamespace(**(fields | overrides))


def data_cfg(path: str, **overrides) -> SimpleNamespace:
    """A duck-typed `data` config section with the schema's defaults."""
    fields = {"path": path, "format": None, "eval_path": None, "eval_fraction": 0.05, "max_length": 512,
              "packing": False, "max_examples": None, "labels": None}
    return SimpleNamespace(**(fields | overrides))


@pytest.fixture(scope="session")
def make_model_cfg():
    return model_cfg


@pytest.fixture(scope="session")
def make_data_cfg():
    return data_cfg


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The SmolLM2 tokenizer from the peftforge cache (extracted from the GGUF on first use)."""
    return load_tokenizer(model_cfg("tiny:llama"))


@pytest.fixture(scope="session")
def minilm_tokenizer():
    return load_tokenizer(model_cfg("tiny:bert", task="sequence_classification"))


@pytest.fixture
def tiny_llama(smollm2_tokenizer):
    """A fresh random 2-layer Llama over the SmolLM2 vocabulary, seeded."""
    torch.manual_seed(0)
    return load_model(model_cfg("tiny:llama"), smollm2_tokenizer)


@pytest.fixture
def tiny_bert_classifier(minilm_tokenizer):
    """A fresh random 2-layer BERT with a 2-class head over the MiniLM vocabulary, seeded."""
    torch.manual_seed(0)
    return load_model(model_cfg("tiny:bert", task="sequence_classification"), minilm_tokenizer)
