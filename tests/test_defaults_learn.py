"""Every adapter recipe's method learns within a few dozen steps (issue 11).

A user who picks `configs/smollm2-<method>.yaml` must see the training loss fall. Each recipe
keeps its adapter section and its optimizer (learning rate included), and runs on the tiny
random Llama and packaged Hamlet for 30 steps on the same seeded batches.

The reference is an independent measurement, not the method's own output: the LoRA recipe at
a vanishing learning rate, i.e. the loss of the unchanged model on exactly those batches. The
gain of a run is how far its mean loss over the last 10 steps lies below the reference's over
the same steps (batches differ in difficulty; comparing step by step removes that).

The margin: a run that learns nothing gains 0.000-0.002 nats here (AdaLoRA's and TriAdaptLoRA's
recipes before issue 11's fix: 0.0001 and 0.0016), peft's own LoRA through `smollm2-lora.yaml`
about 0.13. A method must gain more than 0.01 nats and at least a tenth of LoRA's gain, several
times what a run that does not learn shows, so that "learns slower than LoRA" passes and
"does not learn" fails.
"""
from __future__ import annotations

import statistics
import warnings

import pytest

from cli_runner import ROOT, losses, run_inprocess

warnings.filterwarnings("ignore", category=UserWarning)

STEPS, WINDOW = 30, 10
TINY = ["model.name_or_path=tiny:llama", "data.path=packaged:hamlet", "data.format=text", "data.max_length=32",
        "data.eval_fraction=0.1", "train.batch_size=4", f"train.max_steps={STEPS}", "train.log_every=1",
        "train.save_every=0", "train.eval_every=0", "train.eval_batches=1", "train.sample_prompts=[]"]
# AdaLoRA's recipe at lr 1e-3 gained 0.001 nats here (its singular values E start at zero between
# factors of std 0.02); its recipe now runs at 5e-3 (configs/smollm2-adalora.yaml says why)
METHODS = ["dora", "adalora", "triadaptlora", "balora"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    cache: dict = {}

    def get(method: str, *extra: str) -> dict[int, float]:
        name = "-".join((method, *extra))
        if name not in cache:
            out = root / name.replace("=", "_")
            assert run_inprocess("--config", str(ROOT / "configs" / f"smollm2-{method}.yaml"), *TINY,
                                 f"train.output_dir={out}", *extra) == 0
            cache[name] = losses(out)
        return cache[name]

    return get


def gain(curve: dict[int, float], reference: dict[int, float]) -> float:
    return statistics.mean(reference[s] - curve[s] for s in range(STEPS - WINDOW + 1, STEPS + 1))


@pytest.fixture(scope="module")
def reference(run) -> dict[int, float]:
    return run("lora", "optim.lr=1e-12")


@pytest.fixture(scope="module")
def lora_gain(run, reference) -> float:
    return gain(run("lora"), reference)


def test_lora_recipe_learns(lora_gain):
    assert lora_gain > 0.05, lora_gain


@pytest.mark.parametrize("method", METHODS)
def test_recipe_method_lowers_the_training_loss(run, reference, lora_gain, method):
    got = gain(run(method), reference)
    assert got > 0.01 and got >= 0.1 * lora_gain, \
        f"{method} gained {got:.4f} nats over the last {WINDOW} steps; LoRA {lora_gain:.4f}"
