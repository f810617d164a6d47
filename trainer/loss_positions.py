"""Logits only where the loss is: the model's decoder runs as usual, its output layer (lm_head)
and the cross-entropy run only at the positions whose next token carries a label.

In chat SFT most positions (system and user turns, template tokens, padding) have no loss, yet a
plain forward projects every one of them onto the whole vocabulary (49k for SmolLM2, a fifth of
the model's FLOPs per position) and the loss takes a softmax over all of them.

How the hidden states are obtained: the model is called the normal way, through every wrapper
around it (peft, DDP, accelerate's autocast), with a forward pre-hook on its output layer. The hook
keeps the final hidden states [B, T, H] the layer was about to receive and hands the layer only
the first position of each row instead, so the model returns [B, 1, V] logits that nobody reads.
The caller gathers the loss positions' rows and applies the same layer module to them (a peft
wrapper included) under the autocast state the hook saw (trainer.linear_ce does it in chunks).

This is right only when the model returns the output layer's result unchanged (no softcapping,
no logit scaling after it) and the layer sees one row per input position. `check_split` verifies
exactly that on a small slice of a real batch before the first use; where it fails, the caller
stays on the full-logits path and says why.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from trainer.objective import MODEL_INPUTS, forward
from trainer.padding_free import unpad, unwrapped


def loss_positions(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: True at t when the label at t + 1 is not -100 (the logits at t predict it)."""
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    return shifted != -100


def next_token_targets(labels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The labels the loss positions predict, in the same (row-major) order as their rows."""
    return torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:][positions]


@dataclass
class AutocastState:
    device_type: str
    enabled: bool
    dtype: torch.dtype

    @classmethod
    def current(cls, device_type: str) -> "AutocastState":
        return cls(device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))

    def __call__(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)


@dataclass
class LossPositionOutputs:
    """What `Task.forward_loss` of a causal LM returns on this path, in place of the model outputs.

    hidden:    [M, H] final hidden states at the loss positions, row-major over (batch, position)
    positions: [B, T] bool, which positions those are (see `loss_positions`)
    head:      the model's output layer (with its adapter wrapper, if any)
    autocast:  the autocast state the model's forward ran under
    padding_free: whether the forward ran on the batch's real tokens only (trainer.padding_free);
               a second forward over the same batch (BA-LoRA's teacher) does the same
    """

    hidden: torch.Tensor
    positions: torch.Tensor
    head: nn.Module
    autocast: AutocastState
    padding_free: bool = False

    def logits(self) -> torch.Tensor:
        """[M, V] logits at the loss positions, with gradients: the rows of the full-logits
        `logits[:, :-1][labels[:, 1:] != -100]`, for methods whose extra losses read logits."""
        with self.autocast():
            return self.head(self.hidden)


def output_layer(model: nn.Module) -> nn.Module | None:
    """The output layer module inside whatever wrappers (DDP, DeepSpeed, peft) surround the model."""
    get = getattr(unwrapped(model), "get_output_embeddings", None)
    return get() if callable(get) else None


@contextmanager
def _capture_head_input(head: nn.Module):
    """Inside the block, the first call of `head` records its input and computes one position per row."""
    box: dict = {}

    def pre_hook(module, args, kwargs):
        if "hidden" in box or not args:  # later calls (ours) run untouched
            return None
        hidden = args[0]
        box["hidden"] = hidden
        box["autocast"] = AutocastState.current(hidden.device.type)
        return (hidden[..., :1, :], *args[1:]), kwargs

    handle = head.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield box
    finally:
        handle.remove()


def forward_at_positions(model: nn.Module, batch: dict, positions: torch.Tensor,
                         head: nn.Module | None = None, padding_free: bool = False,
                         **model_kwargs) -> LossPositionOutputs:
    """Run `model` on the batch's model inputs (and `model_kwargs`, e.g. a KV cache) and return the
    final hidden states at `positions`. `padding_free`: run it on the real tokens only, as one row
    of documents, where the batch allows it (trainer.padding_free; the caller knows the model's
    attention keeps them apart)."""
    head = head if head is not None else output_layer(model)
    flat = unpad(batch) if padding_free else None
    if flat is not None and bool((positions & ~flat[1]).any()):
        flat = None  # a loss position on padding: keep the padded layout, where it exists
    with _capture_head_input(head) as box:
        forward(model, flat[0] if flat else batch, **model_kwargs)
    hidden = box.get("hidden")
    layout = flat[0]["input_ids"] if flat else positions
    if hidden is None or hidden.shape[:2] != layout.shape:
        raise RuntimeError("the output layer did not receive one hidden state per input position")
    # one row of real tokens: the loss positions among them, in the same row-major order
    picked = hidden[0][positions[flat[1]]] if flat else hidden[positions]
    return LossPositionOutputs(picked, positions, head, box["autocast"], padding_free=flat is not None)


def check_split(model: nn.Module, batch: dict, probe_length: int = 16) -> str | None:
    """None when logits at positions computed this way equal the model's own, else the reason.

    Runs on the first row's first `probe_length` positions, in eval mode (no dropout, so no draw
    from the RNG a training step would use) and without gradients; training flags are restored.
    """
    head = output_layer(model)
    if head is None:
        return "the model has no output layer (get_output_embeddings)"
    weight = getattr(head, "weight", None)
    if weight is not None and hasattr(weight, "ds_id"):  # ZeRO-3 partitions it; only its own forward gathers it
        return "DeepSpeed ZeRO-3 partitions the output layer"
    inputs = {k: batch[k][:1, :probe_length] for k in MODEL_INPUTS if k in batch}
    positions = torch.ones_like(inputs["input_ids"], dtype=torch.bool)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            reference = forward(model, inputs).logits
            try:
                out = forward_at_positions(model, inputs, positions, head)
            except RuntimeError as e:
                return str(e)
            ours = out.logits()
    finally:
        for m, training in modes:
            m.training = training
    reference = reference.reshape(-1, reference.shape[-1]) if reference is not None else None
    if reference is None or reference.shape != ours.shape:
        return "the model's logits do not have one row per input position"
    if not torch.allclose(ours.float(), reference.float(), rtol=1e-4, atol=1e-4):
        return "the model transforms the output layer's result (e.g. logit softcapping or scaling)"
    return None
