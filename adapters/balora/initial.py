"""The frozen PiSSA initial adapter (A0, B0) and the exact original-model forward it allows.

PiSSA replaces every adapted weight W by the residual W_res = W - s * B0 A0 and starts the
trainable adapter at (A0, B0). Disabling the adapter therefore gives W_res, not W. Keeping a
frozen copy of (A0, B0) — r * (d_in + d_out) numbers per layer, the size of the adapter, not of
the model — recovers W exactly: W_res + s * B0 A0 = W.

`original_forward` swaps the *modules* holding A and B in each LoRA layer's ModuleDict for
frozen ones holding A0 and B0, runs the model under no_grad in eval mode, and swaps back. It
never touches the trainable parameters or their storage, so an autograd graph built by the
student forward before this call stays valid for the backward that follows.

The copies live in a plain Python object (not submodules or buffers), so they are neither
trainable nor part of the model's or the adapter's state dict; `state_dict()` exposes them for
the trainer's resume state.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from peft.tuners.lora import LoraLayer


def _frozen_copy(linear: nn.Linear) -> nn.Linear:
    copy = nn.Linear(linear.in_features, linear.out_features, bias=False,
                     device=linear.weight.device, dtype=linear.weight.dtype)
    copy.weight.data.copy_(linear.weight.data)
    copy.requires_grad_(False)
    return copy


class InitialAdapter:
    def __init__(self, peft_model, adapter_name: str = "default"):
        self.peft_model = peft_model
        self.adapter = adapter_name
        self.layers: dict[str, LoraLayer] = {
            name: m for name, m in peft_model.named_modules()
            if isinstance(m, LoraLayer) and adapter_name in m.lora_A
        }
        if not self.layers:
            raise ValueError(f"no LoRA layers with adapter {adapter_name!r} found")
        # frozen (A0, B0) modules per layer, taken right after PiSSA initialised the adapter
        self.frozen = {name: (_frozen_copy(layer.lora_A[adapter_name]), _frozen_copy(layer.lora_B[adapter_name]))
                       for name, layer in self.layers.items()}

    @contextmanager
    def swapped(self):
        """Inside the block every LoRA layer computes with (A0, B0) instead of (A, B)."""
        live = {}
        try:
            for name, layer in self.layers.items():
                a0, b0 = self.frozen[name]
                a, b = layer.lora_A[self.adapter], layer.lora_B[self.adapter]
                if a0.weight.device != a.weight.device or a0.weight.dtype != a.weight.dtype:
                    a0.to(device=a.weight.device, dtype=a.weight.dtype)
                    b0.to(device=b.weight.device, dtype=b.weight.dtype)
                live[name] = (a, b)
                layer.lora_A[self.adapter], layer.lora_B[self.adapter] = a0, b0
            yield
        finally:
            for name, (a, b) in live.items():
                self.layers[name].lora_A[self.adapter], self.layers[name].lora_B[self.adapter] = a, b

    @contextmanager
    def original(self):
        """Inside the block the peft model computes the original (pre-PiSSA) model: eval mode,
        no dropout, no grad; yields the model."""
        model = self.peft_model
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            with torch.no_grad(), self.swapped():
                yield model
        finally:
            for m, training in modes:
                m.training = training

    def original_forward(self, **inputs):
        """Outputs of the original (pre-PiSSA) model on `inputs`: eval mode, no dropout, no grad."""
        with self.original() as model:
            return model(**inputs)

    # ----- resume ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {name: {"A": a0.weight.detach().cpu().clone(), "B": b0.weight.detach().cpu().clone()}
                for name, (a0, b0) in self.frozen.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Adopt saved (A0, B0) and move each residual weight so W_res + s * B0 A0 is unchanged.

        A rebuilt model re-runs PiSSA; its SVD can differ in the last bits (another device,
        randomized SVD), so the saved factors are re-anchored: W_res += s * (B0' A0' - B0 A0),
        where ' marks the factors of the rebuild. Call before loading the trained A and B.
        """
        if set(state) != set(self.frozen):
            raise KeyError("saved BA-LoRA initial adapter names other layers than this model")
        for name, saved in state.items():
            a0, b0 = self.frozen[name]
            new_a, new_b = saved["A"].to(a0.weight), saved["B"].to(b0.weight)
            if torch.equal(new_a, a0.weight) and torch.equal(new_b, b0.weight):
                continue
            layer = self.layers[name]
            base = layer.get_base_layer().weight
            s = layer.scaling[self.adapter]
            shift = s * (b0.weight.float() @ a0.weight.float() - new_b.float() @ new_a.float())
            if getattr(layer, "fan_in_fan_out", False):  # Conv1D stores W as (in, out)
                shift = shift.T
            base.data = (base.data.float() + shift).to(base.dtype)
            a0.weight.data.copy_(new_a)
            b0.weight.data.copy_(new_b)
