"""BA-LoRA options (`type: balora`) and their task-dependent defaults.

Fields left null take the paper's value for the form in use (ICLR 2026 version, see
docs/methods/balora.md):
  NLG (causal LM):           lambda = 0.025 / 0.005 / 0.005, svd k = 10, Frobenius normaliser
  NLU (classification):      lambda = 0.15  / 0.03  / 0.03,  svd k = 5,  sum-of-sigma normaliser
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from pydantic import Field

from adapters.base import AdapterOptions

NLG_DEFAULTS = {"lambda_consistency": 0.025, "lambda_diversity": 0.005, "lambda_svd": 0.005,
                "svd_top_k": 10, "svd_normalizer": "frobenius"}
NLU_DEFAULTS = {"lambda_consistency": 0.15, "lambda_diversity": 0.03, "lambda_svd": 0.03,
                "svd_top_k": 5, "svd_normalizer": "sum"}


class BaLoraOptions(AdapterOptions):
    """The `adapter:` section for `type: balora`."""

    type: Literal["balora"] = "balora"
    r: int = Field(8, ge=1, description="LoRA rank (the paper uses 128 on 7B models)")
    alpha: float = Field(8.0, gt=0, description="scale numerator alpha/r; the paper sets alpha = r")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout (PiSSA recipes use 0)")
    target_modules: Optional[list[str]] = Field(
        None, description="module name suffixes; null = q_proj,v_proj for Llama, query,value for BERT (peft's LoRA table)"
    )
    pissa_niter: Optional[int] = Field(
        None, ge=1, description="null = exact SVD for PiSSA; n = randomized SVD with n subspace iterations (pissa_niter_n)"
    )
    form: Literal["auto", "nlg", "nlu"] = Field(
        "auto", description="regulariser form; auto = nlu for sequence_classification, nlg otherwise"
    )
    lambda_consistency: Optional[float] = Field(None, ge=0, description="weight of reg/consistency; null = form default")
    lambda_diversity: Optional[float] = Field(None, ge=0, description="weight of reg/diversity; null = form default")
    lambda_svd: Optional[float] = Field(None, ge=0, description="weight of reg/svd; null = form default")
    temperature: float = Field(2.0, gt=0, description="softmax temperature T of the consistency KL (scaled by T^2)")
    entropy_top_k: int = Field(20, ge=0, description="NLG diversity: entropy over the top-K logits per token; 0 = full vocabulary")
    svd_top_k: Optional[int] = Field(None, ge=1, description="number of leading singular values in reg/svd; null = form default")
    svd_normalizer: Optional[Literal["frobenius", "sum"]] = Field(
        None, description="divide the top-k singular-value sum by ||Z||_F or by the sum of all singular values"
    )
    randomized_svd_above: int = Field(
        4096, ge=1, description="NLG: use torch.svd_lowrank(q=k+5, niter=2) when the vocabulary is larger than this"
    )
    consistency_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="cosine: lambda_consistency decays to consistency_final_ratio x its value over training"
    )
    consistency_final_ratio: float = Field(0.1, ge=0, le=1, description="end value of the cosine decay, as a fraction")
    focus_schedule: Literal["constant", "two_phase"] = Field(
        "constant", description="two_phase: diversity and svd weights are 0, then ramp linearly, then stay full"
    )
    focus_delay: float = Field(0.2, ge=0, le=1, description="two_phase: fraction of steps with zero weight")
    focus_ramp: float = Field(0.05, ge=0, le=1, description="two_phase: fraction of steps of the linear ramp")


@dataclass(frozen=True)
class ResolvedSettings:
    """The options with the form chosen and every null replaced by its default."""

    form: str
    lambda_consistency: float
    lambda_diversity: float
    lambda_svd: float
    temperature: float
    entropy_top_k: int
    svd_top_k: int
    svd_normalizer: str
    randomized_svd_above: int
    consistency_schedule: str
    consistency_final_ratio: float
    focus_schedule: str
    focus_delay: float
    focus_ramp: float
    shift_labels: bool  # causal LMs: logits at t predict the label at t+1


def resolve(opts: BaLoraOptions, task: str) -> ResolvedSettings:
    form = opts.form if opts.form != "auto" else ("nlu" if task == "sequence_classification" else "nlg")
    defaults = NLU_DEFAULTS if form == "nlu" else NLG_DEFAULTS

    def pick(name):
        value = getattr(opts, name)
        return defaults[name] if value is None else value

    return ResolvedSettings(
        form=form, lambda_consistency=pick("lambda_consistency"), lambda_diversity=pick("lambda_diversity"),
        lambda_svd=pick("lambda_svd"), temperature=opts.temperature, entropy_top_k=opts.entropy_top_k,
        svd_top_k=pick("svd_top_k"), svd_normalizer=pick("svd_normalizer"),
        randomized_svd_above=opts.randomized_svd_above, consistency_schedule=opts.consistency_schedule,
        consistency_final_ratio=opts.consistency_final_ratio, focus_schedule=opts.focus_schedule,
        focus_delay=opts.focus_delay, focus_ramp=opts.focus_ramp, shift_labels=task == "causal_lm",
    )
