"""BA-LoRA's training-loop side: the three weighted regularisers and the resume state.

extra_losses returns {"reg/consistency", "reg/diversity", "reg/svd"}, each already multiplied
by its scheduled lambda (a zero tensor, not computed, while the weight is 0). Which rows enter:
  * NLG: the valid tokens of the micro-batch (labels != -100; for causal LMs the logits at t are
    paired with the label at t+1, as in the LM loss); without labels, the attention mask.
  * NLU: the batch's (N x classes) logits.
The consistency teacher is the original model (W, not W_res) computed through the frozen
initial adapter; it gets the batch's model inputs (MODEL_INPUTS), never its labels.
When the causal LM's loss runs at the loss positions only (trainer.loss_positions), the outputs
carry the hidden states of those rows; student and teacher logits are then computed for them
alone, which gives the same rows as the full logits (tests/test_lm_loss.py checks it).
"""
from __future__ import annotations

import torch

from adapters.base import MethodHooks
from trainer.loss_positions import LossPositionOutputs, forward_at_positions

from . import regularizers as R
from .config import ResolvedSettings
from .initial import InitialAdapter

# what the teacher forward receives from a batch: exactly the keys the trainer's student forward
# passes (trainer.objective.forward), so teacher and student see the same inputs; no labels
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


class BaLoraHooks(MethodHooks):
    def __init__(self, settings: ResolvedSettings, initial: InitialAdapter, total_steps: int):
        self.settings = settings
        self.initial = initial
        self.total_steps = total_steps
        self.step = 0  # optimizer steps completed; the schedules are evaluated at this value

    def weights(self, step: int) -> dict[str, float]:
        s = self.settings
        focus = dict(step=step, total_steps=self.total_steps, schedule=s.focus_schedule,
                     delay=s.focus_delay, ramp=s.focus_ramp)
        return {
            "reg/consistency": R.consistency_weight(s.lambda_consistency, step, self.total_steps,
                                                    s.consistency_schedule, s.consistency_final_ratio),
            "reg/diversity": R.focus_weight(s.lambda_diversity, **focus),
            "reg/svd": R.focus_weight(s.lambda_svd, **focus),
        }

    def _rows(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """The logit rows the regularisers see: (M valid tokens x V) for NLG, (N x D) for NLU."""
        if self.settings.form == "nlu":
            return logits
        mask = batch.get("labels")
        mask = (mask != -100) if mask is not None else batch.get("attention_mask")
        if self.settings.shift_labels:
            logits = logits[:, :-1]
            mask = mask[:, 1:] if mask is not None else None
        if mask is None:
            return logits.reshape(-1, logits.shape[-1])
        return logits[mask.bool()]

    def _teacher_rows(self, batch: dict, outputs) -> torch.Tensor:
        """The original model's logits on the rows the student's come from."""
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        if not isinstance(outputs, LossPositionOutputs):
            return self._rows(self.initial.original_forward(**inputs).logits, batch)
        with self.initial.original() as original:  # its output layer, too, only at those positions
            return forward_at_positions(original, inputs, outputs.positions,
                                        padding_free=outputs.padding_free).logits()

    def extra_losses(self, batch, outputs, model) -> dict[str, torch.Tensor]:
        s = self.settings
        weights = self.weights(self.step)
        # on the causal LM's loss-positions path the outputs hold the hidden states of exactly the
        # rows `_rows` would keep, in the same order: the logits are computed for those rows only
        student = outputs.logits() if isinstance(outputs, LossPositionOutputs) else self._rows(outputs.logits, batch)
        zero = student.new_zeros((), dtype=torch.float32)
        if student.shape[0] == 0:
            return {name: zero for name in weights}
        losses = {}
        if weights["reg/consistency"] > 0:
            teacher = self._teacher_rows(batch, outputs)
            losses["reg/consistency"] = weights["reg/consistency"] * R.consistency(student, teacher, s.temperature)
        if weights["reg/diversity"] > 0:
            term = (R.covariance_diversity(student) if s.form == "nlu"
                    else R.topk_entropy_diversity(student, s.entropy_top_k))
            losses["reg/diversity"] = weights["reg/diversity"] * term
        if weights["reg/svd"] > 0:
            above = s.randomized_svd_above if s.form == "nlg" else None
            losses["reg/svd"] = weights["reg/svd"] * R.svd_ratio(student, s.svd_top_k, s.svd_normalizer, above)
        return {name: losses.get(name, zero) for name in weights}

    def after_optimizer_step(self, step: int, model) -> list[torch.nn.Parameter]:
        self.step = step
        return []

    def metrics(self) -> dict[str, float]:
        return {name.replace("reg/", "balora/lambda_"): w for name, w in self.weights(self.step).items()}

    def state_dict(self) -> dict:
        return {"step": self.step, "initial": self.initial.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the step and the frozen (A0, B0); call before loading the trained weights."""
        self.step = int(state["step"])
        self.initial.load_state_dict(state["initial"])
