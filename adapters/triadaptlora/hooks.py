"""TriAdaptLoRA's training-loop side: rank growth, orthogonality penalty, resume state.

Growth (at optimizer step t, counted from 1):
  1. only if R_cur < R_tgt, t > init_warmup and t % incre_interval == 0;
  2. score every matrix: s = ||L+U||_F / n_blocks - (the same quantity at the previous scoring,
     taken after that scoring's growth);
  3. progress p = (t - init_warmup) / (T - init_warmup) in [0, 1];
     n = floor((R_tgt - R_cur) * p) (linear) or floor((R_tgt - R_cur) ** p) (nonlinear),
     clipped to [1, #matrices];
  4. threshold tau = the n-th largest score; matrices with s >= tau grow by incre_rank_num, in
     descending score order, each growth clamped so the total never passes R_tgt (and no
     matrix passes min(d_in, d_out)).
The new block parameters are returned so the loop adds them to its optimizer.
"""
from __future__ import annotations

import math
import torch

from adapters.base import MethodHooks
from adapters.orthogonality import orthogonality_penalty

from .model import TriAdaptLoraModel, frobenius_norms, total_rank


def matrices_to_grow(mode: str, remaining: int, progress: float, n_matrices: int) -> int:
    """How many matrices may grow this step (the dynamic threshold's rank n)."""
    if mode == "linear":
        n = math.floor(remaining * progress)
    elif mode == "nonlinear":
        n = math.floor(remaining ** progress)
    else:
        raise ValueError(f"unknown growth mode {mode!r}")
    return max(1, min(n, n_matrices))


def growth_progress(step: int, warmup: int, total_steps: int) -> float:
    if total_steps <= warmup:
        return 1.0
    return min(1.0, max(0.0, (step - warmup) / (total_steps - warmup)))


def factor_pairs(tuner: TriAdaptLoraModel, adapter_name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) of every adapted matrix, for AdaLoRA's orthogonality penalty (adapters/orthogonality.py)."""
    pairs = []
    for layer in tuner.adapted_layers(adapter_name).values():
        a, _, b = layer.factors(adapter_name)
        pairs.append((a, b))
    return pairs


class TriAdaptLoraHooks(MethodHooks):
    def __init__(self, peft_model, adapter_name: str = "default", seed: int = 0):
        self.peft_model = peft_model
        self.adapter = adapter_name
        self.tuner: TriAdaptLoraModel = peft_model.base_model
        self.config = self.tuner.peft_config[adapter_name]
        self.seed = seed
        cfg = self.config
        self.keys = list(self.tuner.adapted_layers(adapter_name))
        if cfg.target_total_rank is None:
            cfg.target_total_rank = cfg.r * len(self.keys)
        if cfg.incre_rank_num is None:
            cfg.incre_rank_num = max(1, cfg.r // 2)
        if not cfg.total_step:
            raise ValueError("TriAdaptLoRA needs total_step (the run's optimizer steps) for its growth schedule")
        # the "previous scoring" starts at the values of the initial cores (zero for fresh blocks)
        self.prev_normalised = self._normalised_norms()
        # one entry per growth event: the blocks it created, in the order their params were returned
        self.events: list[dict] = []

    # ----- scoring ---------------------------------------------------------------------------
    def _normalised_norms(self) -> dict[str, float]:
        norms = frobenius_norms(self.tuner, self.adapter)
        layers = self.tuner.adapted_layers(self.adapter)
        return {k: norms[k] / len(layers[k].block_sizes(self.adapter)) for k in self.keys}

    def importance_scores(self) -> dict[str, float]:
        """s = normalised norm now - at the previous scoring; updates the remembered value."""
        now = self._normalised_norms()
        scores = {k: now[k] - self.prev_normalised[k] for k in self.keys}
        self.prev_normalised = now
        return scores

    # ----- the loop's hooks ------------------------------------------------------------------
    def after_optimizer_step(self, step: int, model) -> list[torch.nn.Parameter]:
        cfg = self.config
        r_cur = total_rank(self.tuner, self.adapter)
        if r_cur >= cfg.target_total_rank or step <= cfg.init_warmup or step % cfg.incre_interval:
            return []
        scores = self.importance_scores()
        progress = growth_progress(step, cfg.init_warmup, cfg.total_step)
        n = matrices_to_grow(cfg.growth_mode, cfg.target_total_rank - r_cur, progress, len(self.keys))
        ranked = sorted(self.keys, key=lambda k: scores[k], reverse=True)  # stable: ties keep model order
        tau = scores[ranked[n - 1]]
        layers = self.tuner.adapted_layers(self.adapter)
        new_params, grown = [], []
        budget = cfg.target_total_rank - r_cur
        for key in ranked:
            if scores[key] < tau or budget <= 0:
                break
            layer = layers[key]
            room = min(layer.in_features, layer.out_features) - layer.rank(self.adapter)
            k = min(cfg.incre_rank_num, budget, room)
            if k <= 0:
                continue
            gen = torch.Generator().manual_seed(self._growth_seed(step, key))
            new_params += layer.grow(self.adapter, k, generator=gen)
            grown.append([key, len(layer.block_sizes(self.adapter)) - 1, k])
            budget -= k
        if grown:
            self.events.append({"step": step, "blocks": grown})
            self.tuner.sync_rank_pattern(self.adapter)
            # the next score must measure training, not the growth itself: a new block changes the
            # normalised norm (one more block to divide by; an identity core adds I_k), which would
            # favour (identity) or penalise (zero core) the matrices that just grew
            self.prev_normalised.update({k: v for k, v in self._normalised_norms().items()
                                         if k in {key for key, _, _ in grown}})
        return new_params

    def _growth_seed(self, step: int, key: str) -> int:
        # independent of the global RNG (data order, dropout), so a resumed run grows identically
        return (self.seed * 1_000_003 + step * 7919 + self.keys.index(key)) % (2**63)

    def extra_losses(self, batch, outputs, model) -> dict[str, torch.Tensor]:
        if not self.config.orth_reg_weight:
            return {}
        return {"reg/orth": self.config.orth_reg_weight * orthogonality_penalty(factor_pairs(self.tuner, self.adapter))}

    def metrics(self) -> dict[str, float]:
        return {"adapter/total_rank": float(total_rank(self.tuner, self.adapter))}

    # ----- resume ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "rank_pattern": self.tuner.current_rank_pattern(self.adapter),
            "prev_normalised": dict(self.prev_normalised),
            "events": [{"step": e["step"], "blocks": [list(b) for b in e["blocks"]]} for e in self.events],
            "target_total_rank": self.config.target_total_rank,
        }

    def load_state_dict(self, state: dict) -> None:
        """Regrow every layer to the saved block sizes. Call before loading the weights."""
        self.tuner.resize_to_rank_pattern(state["rank_pattern"], self.adapter)
        self.prev_normalised = {k: float(v) for k, v in state["prev_normalised"].items()}
        self.events = [{"step": e["step"], "blocks": [list(b) for b in e["blocks"]]} for e in state["events"]]
        self.config.target_total_rank = state["target_total_rank"]

    def grown_param_groups(self) -> list[list[torch.nn.Parameter]]:
        """The parameters each growth event returned, in order: a resumed loop rebuilds its
        optimizer as (initial params) + one add_param_group per entry, then loads its state."""
        layers = self.tuner.adapted_layers(self.adapter)
        return [[p for key, index, _ in e["blocks"] for p in layers[key].block_params(self.adapter, index)]
                for e in self.events]

    def grown_param_ids(self) -> set[int]:
        """ids of all parameters created by growth (to leave out of the first optimizer group)."""
        return {id(p) for group in self.grown_param_groups() for p in group}
