"""The online cost model the scheduler plans with: seconds of each kind of work, as a linear
function of explicit features, fitted while serving.

Three kinds of work are timed apart, each by its own model:
- `inference`: one iteration's decode step and prefill chunks:
  1, decode rows, decode context (thousands of cached positions), prefill tokens, prefill
  tokens x their context (thousands)
- `ft_forward`: one fine-tuning forward chunk: 1, tokens, tokens x their context (thousands), tokens
  counted over the chunk's rows
- `ft_backward`: the backward of one such chunk: same features
Each is refitted by ridge least squares over its recent observations (so it follows the machine's
load), shrunk toward a prior that errs on the slow side; coefficients are clamped non-negative. Everything is
explicit: `coefficients()` is logged, exported in /metrics and written to the iteration log, and
tests inject fixed models (`learn=False`) so no decision depends on wall time.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

INFERENCE = ("const", "decode_rows", "decode_ctx_k", "prefill_tokens", "prefill_attn_k")
FINETUNE = ("const", "tokens", "attn_k")


def inference_features(decode_rows: int, decode_ctx: int, prefill: list[tuple[int, int]]) -> list[float]:
    """`prefill` holds (tokens, cached positions before them) per prefill chunk."""
    return [1.0, float(decode_rows), decode_ctx / 1000, float(sum(n for n, _ in prefill)),
            sum(n * (past + n / 2) for n, past in prefill) / 1000]


def finetune_features(tokens: int, past: int, rows: int = 1) -> list[float]:
    """A chunk of `tokens` positions after `past` ones, in each of `rows` sequences."""
    return [1.0, float(rows * tokens), rows * tokens * (past + tokens / 2) / 1000]


class LinearCost:
    """seconds ~= coef . features, refitted after each observation by least squares over the last
    `window` observations, with a ridge term pulling toward the prior (so a feature that has not
    varied yet keeps its prior cost instead of an arbitrary one)."""

    def __init__(self, names: tuple[str, ...], prior: list[float], window: int = 256, ridge: float = 1.0,
                 learn: bool = True):
        self.names, self.learn, self.ridge = names, learn, ridge
        self.prior = torch.tensor(prior, dtype=torch.float64)
        self.coef = self.prior.clone()
        self.seen: deque[tuple[list[float], float]] = deque(maxlen=window)
        self.observations = 0

    def predict(self, features: list[float]) -> float:
        return max(0.0, float(self.coef @ torch.tensor(features, dtype=torch.float64)))

    def observe(self, features: list[float], seconds: float) -> None:
        if not self.learn:
            return
        self.seen.append((features, seconds))
        self.observations += 1
        X = torch.tensor([f for f, _ in self.seen], dtype=torch.float64)
        y = torch.tensor([t for _, t in self.seen], dtype=torch.float64)
        eye = torch.eye(len(self.names), dtype=torch.float64)
        coef = torch.linalg.solve(X.T @ X + self.ridge * eye, X.T @ y + self.ridge * self.prior)
        self.coef = coef.clamp(min=0.0)

    def coefficients(self) -> dict[str, float]:
        return {n: float(c) for n, c in zip(self.names, self.coef)}


@dataclass
class CostModel:
    inference: LinearCost
    ft_forward: LinearCost
    ft_backward: LinearCost

    @classmethod
    def default(cls, learn: bool = True) -> "CostModel":
        """A prior that errs slow (a 135M model on two CPU cores is about half of it), so the first
        fine-tuning chunks are small and grow as the model learns the machine."""
        return cls(LinearCost(INFERENCE, [0.02, 0.004, 0.01, 0.002, 0.002], learn=learn),
                   LinearCost(FINETUNE, [0.01, 0.002, 0.002], learn=learn),
                   LinearCost(FINETUNE, [0.02, 0.004, 0.004], learn=learn))

    @classmethod
    def fixed(cls, inference: list[float], ft_forward: list[float], ft_backward: list[float]) -> "CostModel":
        """Known, unchanging costs (tests, simulations)."""
        return cls(LinearCost(INFERENCE, inference, learn=False), LinearCost(FINETUNE, ft_forward, learn=False),
                   LinearCost(FINETUNE, ft_backward, learn=False))

    def coefficients(self) -> dict[str, dict[str, float]]:
        return {"inference": self.inference.coefficients(), "ft_forward": self.ft_forward.coefficients(),
                "ft_backward": self.ft_backward.coefficients()}
