"""What one engine iteration does: pure decisions from the queue state and the cost model.

Policy, in priority order:
1. Every decoding request advances by one token (its TPOT is what the target protects).
2. Chunked prefill, first come first served (partly prefilled requests first, then new ones while
   fewer than `max_running` hold a slot): each chunk as large as the iteration's time budget
   allows by the cost model, at most `prefill_chunk` tokens; the first chunk of an iteration
   always advances by at least `prefill_min_chunk` tokens, so prompts progress under any load.
3. Fine-tuning gets what is left of the time budget, one unit at a time (`choose_ft_unit`): a
   forward chunk (the same positions of every row of a micro-batch) sized so that both it fits
   now and its backward fits a whole iteration's fine-tuning share, but never a cut of a rest that
   a later iteration of this kind can run whole (a small second chunk costs 2-3x per token); a
   backward chunk when it fits; the optimizer step whenever it is due.
   When nothing fits for `ft_max_wait_iters` iterations in a row (if set), one unit runs anyway.
The time budget of an iteration is `(1 - slo_margin) * tpot_slo_ms` when requests are in the
engine (an iteration is one output token for each decoding request), else `ft_idle_budget_ms` (how
long a new request may wait for the iteration in progress).
The bank: what decode iterations leave of their budget is banked (up to `bank_s`, tpot_window - 1
budgets) and fine-tuning may spend it in a later iteration. A forward call has a large fixed cost
on a CPU (every weight is read once), so the few milliseconds one decode iteration leaves fit no
useful chunk, while a bank of several fits one; the time of any run of n decode iterations stays
within n budgets plus the bank, so a request's TPOT holds on average (tests/test_serving_scheduler.py). Tokens of one iteration (decode rows, prefill,
fine-tuning forward) never exceed `max_batch_tokens`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Hashable

from trainer.serving.cost import CostModel, finetune_features, inference_features


@dataclass(frozen=True)
class Limits:
    budget_s: float
    idle_budget_s: float
    max_batch_tokens: int
    prefill_chunk: int
    prefill_min_chunk: int
    max_running: int
    ft_chunk_tokens: int
    ft_min_chunk: int
    ft_max_wait_iters: int

    bank_s: float = 0.0  # the most unused decode budget fine-tuning may bank for a later unit

    @classmethod
    def from_config(cls, s) -> "Limits":
        budget = s.tpot_slo_ms * (1 - s.slo_margin) / 1000
        return cls(budget_s=budget, idle_budget_s=s.ft_idle_budget_ms / 1000, bank_s=budget * (s.tpot_window - 1),
                   max_batch_tokens=s.max_batch_tokens, prefill_chunk=s.prefill_chunk,
                   prefill_min_chunk=min(16, s.prefill_chunk), max_running=s.max_running,
                   ft_chunk_tokens=s.ft_chunk_tokens, ft_min_chunk=s.ft_min_chunk,
                   ft_max_wait_iters=s.ft_max_wait_iters)


@dataclass
class InferencePlan:
    decode_rows: int
    decode_ctx: int  # cached positions the decode step attends to (padding included)
    prefill: list[tuple[Hashable, int, int]] = field(default_factory=list)  # (request, tokens, past)
    admit: list[Hashable] = field(default_factory=list)  # waiting requests that start now
    time_budget: float = 0.0
    predicted: float = 0.0
    idle: bool = False  # no request in the engine: the iteration belongs to fine-tuning

    @property
    def tokens(self) -> int:
        return self.decode_rows + sum(n for _, n, _ in self.prefill)

    def features(self) -> list[float]:
        return inference_features(self.decode_rows, self.decode_ctx, [(n, past) for _, n, past in self.prefill])


@dataclass(frozen=True)
class Pending:
    """The fine-tuning job's next unit of work: "forward" (positions left in the sequences),
    "backward" (positions of the chunk), or "step" (the optimizer step is due); `past` is how many
    positions come before them; `rows`: sequences that go through those positions together (a
    unit of n positions is rows x n tokens)."""
    kind: str
    tokens: int = 0
    past: int = 0
    rows: int = 1


def largest(fits: Callable[[int], bool], cap: int) -> int:
    """The largest n in [0, cap] with fits(n), for fits monotone (true up to some n)."""
    lo, hi = 0, cap
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def plan_inference(decode_rows: int, decode_ctx: int, prefilling: list[tuple[Hashable, int, int]],
                   waiting: list[tuple[Hashable, int]], cost: CostModel, limits: Limits) -> InferencePlan:
    """`prefilling`: (request, prompt tokens left, tokens prefilled) of requests holding a slot;
    `waiting`: (request, prompt tokens) in arrival order."""
    plan = InferencePlan(decode_rows, decode_ctx)
    # a prompt in the engine waits for its first token: only an empty engine gives fine-tuning the idle budget
    plan.idle = not (decode_rows or prefilling or waiting)
    plan.time_budget = limits.idle_budget_s if plan.idle else limits.budget_s
    free_slots = limits.max_running - decode_rows - len(prefilling)
    candidates = list(prefilling) + [(key, n, 0) for key, n in waiting[:max(free_slots, 0)]]
    started = {key for key, _, _ in prefilling}
    for key, left, past in candidates:
        room = min(left, limits.prefill_chunk, limits.max_batch_tokens - plan.tokens)
        if room <= 0:
            break

        def fits(n: int) -> bool:
            feats = inference_features(decode_rows, decode_ctx,
                                       [(m, p) for _, m, p in plan.prefill] + [(n, past)])
            return cost.inference.predict(feats) <= plan.time_budget

        n = largest(fits, room)
        if not plan.prefill:  # the iteration's first prefill chunk always advances
            n = max(n, min(room, limits.prefill_min_chunk))
        if n == 0:
            break
        plan.prefill.append((key, n, past))
        if key not in started:
            plan.admit.append(key)
    plan.predicted = cost.inference.predict(plan.features()) if plan.tokens else 0.0
    return plan


def choose_ft_unit(pending: Pending, time_left: float, tokens_left: int, ft_share: float, cost: CostModel,
                   limits: Limits, forced: bool, idle: bool = False) -> tuple[str, int] | None:
    """The next fine-tuning unit to run now, or None. `time_left`: seconds of this iteration's
    budget still free; `ft_share`: the most fine-tuning time an iteration like this one can give
    (a forward chunk is only as large as its later backward can fit); `forced`: run a unit even if
    nothing fits (starvation bound). A unit that no iteration can fit (the cost model has grown
    since its forward was sized, or the smallest chunk is too big for the budget) runs first thing
    in an `idle` iteration (no request in the engine, `time_left >= ft_share`): otherwise the job
    would wait for ever; with requests in the engine the TPOT target comes first."""
    if pending.kind == "step":
        return "step", 0
    rows = pending.rows
    whole_share_free = idle and time_left >= ft_share
    if pending.kind == "forward":  # sizes in positions; limits in tokens (rows x positions)
        cap = min(pending.tokens, max(limits.ft_chunk_tokens // rows, 1), max(tokens_left, 0) // rows)

        def fits(n: int) -> bool:
            feats = finetune_features(n, pending.past, rows)
            return cost.ft_forward.predict(feats) <= time_left and cost.ft_backward.predict(feats) <= ft_share

        n = largest(fits, cap)
        if n < pending.tokens and not forced and _fits_a_fresh_iteration(pending, ft_share, cost, limits):
            # cutting now leaves the rest as a second, small chunk that pays a forward call's fixed
            # cost again and goes through the chunk machinery (2-3x the time per token of a whole
            # group on this CPU): the next iteration, or a fuller bank, runs it all in one unit
            return None
        need = min(-(-limits.ft_min_chunk // rows), pending.tokens)
        if n >= need:
            return "forward", n
        feats = finetune_features(need, pending.past, rows)
        never_fits = max(cost.ft_forward.predict(feats), cost.ft_backward.predict(feats)) > ft_share
        return ("forward", need) if forced or (never_fits and whole_share_free) else None
    seconds = cost.ft_backward.predict(finetune_features(pending.tokens, pending.past, rows))
    runs = seconds <= time_left or forced or (seconds > ft_share and whole_share_free)
    return ("backward", pending.tokens) if runs else None


def _fits_a_fresh_iteration(pending: Pending, ft_share: float, cost: CostModel, limits: Limits) -> bool:
    """Whether the rest of the sequences' forward, and its backward, each fit the fine-tuning share
    of an iteration like this one, within the chunk token limit."""
    feats = finetune_features(pending.tokens, pending.past, pending.rows)
    return (pending.rows * pending.tokens <= max(limits.ft_chunk_tokens, pending.rows)
            and max(cost.ft_forward.predict(feats), cost.ft_backward.predict(feats)) <= ft_share)
