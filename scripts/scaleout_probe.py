#!/usr/bin/env python
"""Scale-out smoke probe: one explicit training loop that runs unchanged under the four CPU modes
(single process, 2-process DDP/gloo, DeepSpeed ZeRO-2, DeepSpeed ZeRO-3); only the accelerate
config file picks the mode. It demonstrates the pattern the trainer must follow (see
docs/scale-out.md) and records what is needed to prove the modes equivalent.

Run (see docs/scale-out.md for the network-namespace wrapper CI uses):

  accelerate launch --config_file configs/accelerate/<mode>.yaml scripts/scaleout_probe.py \
      --ga 2 --out runs/probe/<mode>-ga2

  python scripts/scaleout_probe.py compare runs/probe/*-ga*   # prints the equivalence table

Each run writes <out>/result.pt (per-step global loss, grad norm, trainable weights gathered
from every rank) and <out>/adapter/ (peft save_pretrained of the gathered LoRA weights), and
checks on every rank that the saved lora_B weights are non-zero and identical across ranks.
With --save-at K it also checkpoints with accelerator.save_state after step K; with
--resume-from DIR it loads that state and continues (step counter from DIR/probe_step.json).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


# ---- environment: must run before accelerate/deepspeed create the process group --------------

def accelerator_kwargs() -> dict:
    """What the trainer must pass to Accelerator() so that the config file alone picks the mode.

    * DeepSpeed (ACCELERATE_USE_DEEPSPEED=true, set by `accelerate launch` for distributed_type
      DEEPSPEED): cpu must be False (cpu=True silently disables DeepSpeed), and without an explicit
      backend accelerate leaves state.backend=None on a CUDA-less host, so every rank believes it
      is process 0 of 1 (is_main_process everywhere, train_batch_size computed for 1 process).
      InitProcessGroupKwargs(backend="gloo") fixes it.
    * DDP on CPU: the multi-process launcher (distributed_type MULTI_GPU, the only one that spawns
      processes without mpirun) does not export ACCELERATE_USE_CPU, so cpu=True must come from the
      code; accelerate then picks DistributedType.MULTI_CPU + gloo.
    """
    from accelerate.utils import InitProcessGroupKwargs

    on_cpu = not torch.cuda.is_available()
    use_ds = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    kw = {"cpu": on_cpu and not use_ds}
    if on_cpu and multi:
        kw["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    return kw


def skip_deepspeed_shm_build() -> None:
    """DeepSpeed's CPU TorchBackend JIT-compiles a shared-memory comm op (deepspeed_shm_comm, g++ +
    ninja, ~1 min on 2 cores, cached in TORCH_EXTENSIONS_DIR) when the process group is created. It
    is used only by inference_all_reduce (AutoTP inference); training collectives go through
    torch.distributed/gloo. Returning None makes DeepSpeed fall back, so no compiler is needed."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true" or torch.cuda.is_available():
        return
    if os.environ.get("PEFTFORGE_DS_SHM_BUILD", "0") == "1":
        return
    import importlib

    # importlib, not `import deepspeed.comm.torch as m`: deepspeed.comm has an attribute `torch`
    # (the real torch module), which the `as` form would bind instead of the submodule.
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    ds_torch_comm.build_shm_op = lambda: None


# ---- model / data ---------------------------------------------------------------------------

def build_model(seed: int, r: int):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=256, max_position_embeddings=128)
    cfg._attn_implementation = "eager"
    base = LlamaForCausalLM(cfg)
    # lora_dropout=0: dropout masks come from each rank's RNG, so with dropout>0 the modes can only
    # agree statistically, not bit-for-bit.
    lcfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                      "gate_proj", "up_proj", "down_proj"], task_type="CAUSAL_LM")
    return get_peft_model(base, lcfg)


def make_dataset(n: int, max_len: int, seed: int):
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(3, 256, (n, max_len), generator=g)
    lens = torch.randint(max_len // 4, max_len + 1, (n,), generator=g)  # ragged: token-count weighting matters
    mask = (torch.arange(max_len)[None, :] < lens[:, None]).long()
    ids = ids * mask  # pad id 0, right padding
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def token_loss_sum(model, ids, mask, labels):
    """Sum (not mean) of next-token CE over real tokens, and the number of those tokens."""
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
    loss_sum = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)),
                                                 shift_labels.reshape(-1), ignore_index=-100, reduction="sum")
    return loss_sum, (shift_labels != -100).sum()


# ---- ZeRO-3 aware read-out -----------------------------------------------------------------

def gathered_trainable(accelerator, model) -> dict[str, torch.Tensor]:
    """Full (unpartitioned) copies of the trainable parameters, on every rank.

    Under ZeRO-3 a parameter's .data is an empty placeholder; GatheredParameters all-gathers it for
    the duration of the block (collective: every rank must enter). Under ZeRO-2/DDP/single the
    tensors are already whole and the context is a no-op."""
    named = [(n, p) for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad]
    ctx = contextlib.nullcontext()
    if getattr(accelerator.state, "deepspeed_plugin", None) is not None and accelerator.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None)
    with ctx:
        return {n: p.detach().clone().float().cpu() for n, p in named}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--global-batch", type=int, default=8, help="sequences per optimizer step, all ranks together")
    ap.add_argument("--ga", type=int, default=1, help="micro-batches per optimizer step per process")
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--n-examples", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--max-grad-norm", type=float, default=0.3, help="<=0 disables clipping")
    ap.add_argument("--rank-r", type=int, default=8)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--zero3-persistence", type=int, default=0,
                    help="stage3_param_persistence_threshold override for the probe (0: partition every "
                         "parameter so the gather path is really exercised); -1 keeps the config file's value")
    ap.add_argument("--save-at", type=int, default=0, help="accelerator.save_state after this many steps")
    ap.add_argument("--resume-from", default=None)
    ap.add_argument("--ds-exclude-frozen", action="store_true",
                    help="DeepSpeed only: save_state(..., exclude_frozen_parameters=True) so checkpoints hold the "
                         "adapter and not the frozen base; load_state(..., load_module_strict=False) to resume")
    ap.add_argument("--naive", action="store_true",
                    help="negative control: accelerator.backward(loss) without the GA*W factor and without "
                         "setting sync_gradients (what a plain loop does); the compare step must flag it")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported (accelerate imports it lazily)
    skip_deepspeed_shm_build()
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    sys.path.insert(0, str(REPO))
    from trainer.sampling import MicroBatchStream
    from trainer.schedule import lr_factor

    t0 = time.perf_counter()
    accelerator = Accelerator(gradient_accumulation_steps=args.ga, **accelerator_kwargs())
    W, rank = accelerator.num_processes, accelerator.process_index
    if args.global_batch % (W * args.ga):
        raise SystemExit(f"--global-batch {args.global_batch} is not divisible by world {W} x ga {args.ga}")
    micro = args.global_batch // (W * args.ga)
    is_ds = accelerator.distributed_type == DistributedType.DEEPSPEED
    zero_stage = accelerator.state.deepspeed_plugin.zero_stage if is_ds else None
    mode = f"zero{zero_stage}" if is_ds else ("ddp" if W > 1 else "single")

    model = build_model(args.seed, args.rank_r)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)

    if is_ds:
        # DeepSpeed "auto" values that accelerate can only infer from a prepared DataLoader (we have
        # none) or whose accelerate default differs from the trainer's: fill them from the trainer config.
        ds_cfg = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_cfg["train_micro_batch_size_per_gpu"] = micro
        ds_cfg["gradient_accumulation_steps"] = args.ga
        ds_cfg["train_batch_size"] = micro * args.ga * W
        # DeepSpeed clips inside engine.step(), which runs inside accelerator.backward() at the
        # boundary: the trainer's max_grad_norm must be in the config (0.0 = off).
        ds_cfg["gradient_clipping"] = args.max_grad_norm if args.max_grad_norm > 0 else 0.0
        if zero_stage == 3 and args.zero3_persistence >= 0:
            ds_cfg["zero_optimization"]["stage3_param_persistence_threshold"] = args.zero3_persistence
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()

    ids, mask, labels = make_dataset(args.n_examples, args.seq_len, args.seed)
    stream = MicroBatchStream(args.n_examples, micro, args.seed, rank=rank, world_size=W)

    start_step = 0
    if args.resume_from:
        if is_ds:  # DeepSpeed's own checkpoint read unpickles anything; read tensors and its own classes only
            from trainer.deepspeed_load import weights_only_loads
            weights_only_loads(model)
        if is_ds and args.ds_exclude_frozen:
            accelerator.load_state(args.resume_from, load_module_strict=False)  # base weights come from the model build
        else:
            accelerator.load_state(args.resume_from)
        start_step = json.loads((Path(args.resume_from) / "probe_step.json").read_text())["step"]
        stream.position = start_step * args.ga

    losses, norms, times = [], [], []
    t_loop = time.perf_counter()
    for step in range(start_step, args.steps):
        ts = time.perf_counter()
        # LR must be written BEFORE the last backward of the step: under DeepSpeed the optimizer
        # step happens inside accelerator.backward().
        lr = args.lr * lr_factor(step, args.steps, args.warmup, "linear")
        for g in optimizer.param_groups:
            g["lr"] = lr

        batches = []
        for _ in range(args.ga):
            idx = stream.next_indices()
            batches.append((ids[idx], mask[idx], labels[idx]))
        # token count of the whole global batch (all ranks, all micro-batches) -> one all-reduce
        n_local = sum(int((b[2][:, 1:] != -100).sum()) for b in batches)
        n_global = accelerator.reduce(torch.tensor(float(n_local)), reduction="sum").item()

        loss_acc = torch.zeros(())
        for k, (b_ids, b_mask, b_labels) in enumerate(batches):
            last = k == args.ga - 1
            if not args.naive:
                accelerator.sync_gradients = last  # DeepSpeed: engine boundary / step; others: optimizer wrapper gate
            with (contextlib.nullcontext() if (last or args.naive) else accelerator.no_sync(model)):
                loss_sum, _ = token_loss_sum(model, b_ids, b_mask, b_labels)
                loss = loss_sum / n_global
                # Every backend rescales: accelerate divides by GA (non-DeepSpeed) or DeepSpeed's
                # engine divides by its GA; DDP / ZeRO average gradients over W processes.
                # Multiplying by GA*W cancels both, so the summed gradient is d(global token mean).
                accelerator.backward(loss if args.naive else loss * (args.ga * W))
            loss_acc += loss.detach()
        norm = None
        if args.max_grad_norm > 0:
            # non-DeepSpeed: clips now; DeepSpeed: already clipped in engine.step(), returns that norm
            norm = accelerator.clip_grad_norm_(params if not is_ds else model.parameters(), args.max_grad_norm)
        optimizer.step()       # no-op wrapper under DeepSpeed
        optimizer.zero_grad()  # idem
        step_loss = accelerator.reduce(loss_acc, reduction="sum").item()
        losses.append(step_loss)
        norms.append(float(norm) if norm is not None else float("nan"))
        times.append(time.perf_counter() - ts)
        accelerator.print(f"[{mode} W={W} ga={args.ga} micro={micro}] step {step} loss {step_loss:.6f} "
                          f"grad_norm {norms[-1]:.6f} lr {lr:.2e}")

        if args.save_at and step + 1 == args.save_at:
            ckpt = Path(args.out) / "state"
            if is_ds and args.ds_exclude_frozen:
                accelerator.save_state(str(ckpt), exclude_frozen_parameters=True)  # collective: every rank calls it
            else:
                accelerator.save_state(str(ckpt))  # collective: every rank calls it
            if accelerator.is_main_process:
                (ckpt / "probe_step.json").write_text(json.dumps({"step": step + 1}))
            accelerator.wait_for_everyone()
            accelerator.print(f"saved state to {ckpt}")
    loop_s = time.perf_counter() - t_loop

    # ---- save the adapter (ZeRO-3: gather first) ----
    trainable = [p for p in accelerator.unwrap_model(model).parameters() if p.requires_grad]
    n_partitioned = sum(1 for p in trainable if p.data.numel() == 0)  # ZeRO-3 placeholders
    from peft import get_peft_model_state_dict

    # what a plain unwrap_model(model).save_pretrained(dir) would write (no gather): empty under ZeRO-3
    ungathered_numel = sum(v.numel() for v in get_peft_model_state_dict(accelerator.unwrap_model(model)).values())
    weights = gathered_trainable(accelerator, model)
    # Alternative: accelerator.get_state_dict(model) (collective; full model incl. frozen base,
    # on rank 0 only; ZeRO-3 needs stage3_gather_16bit_weights_on_model_save=true). Cross-check it.
    full_sd = accelerator.get_state_dict(model)
    sd_diff = float("nan")
    if accelerator.is_main_process:
        sd_diff = max((full_sd[k].float() - weights[k]).abs().max().item() for k in weights)
        assert sd_diff == 0.0, f"get_state_dict disagrees with GatheredParameters: {sd_diff}"
    del full_sd
    out = Path(args.out)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        accelerator.unwrap_model(model).save_pretrained(out / "adapter", state_dict=weights)
    accelerator.wait_for_everyone()

    from safetensors.torch import load_file

    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    b_keys = [k for k in saved if "lora_B" in k]
    assert b_keys, "no lora_B in saved adapter"
    b_abs = max(saved[k].abs().max().item() for k in b_keys)
    assert b_abs > 0, "saved lora_B weights are all zero (ZeRO-3 partitions saved without gathering?)"
    assert all(saved[k].numel() > 0 for k in saved), "empty tensor in saved adapter (un-gathered ZeRO-3 param)"
    # cross-rank check: every rank's gathered copy must be identical
    flat = torch.cat([weights[n].flatten() for n in sorted(weights)])
    gathered = accelerator.gather(flat[None].contiguous())
    cross_rank = (gathered - gathered[0:1]).abs().max().item()
    assert cross_rank == 0.0, f"ranks disagree on trained weights: {cross_rank}"

    total_s = time.perf_counter() - t0
    if accelerator.is_main_process:
        torch.save({"mode": mode, "world": W, "ga": args.ga, "micro": micro, "start_step": start_step,
                    "losses": losses, "norms": norms, "weights": weights, "step_s": times,
                    "loop_s": loop_s, "total_s": total_s, "args": vars(args)}, out / "result.pt")
        print(f"RESULT mode={mode} W={W} ga={args.ga} micro={micro} steps={len(losses)} "
              f"final_loss={losses[-1]:.6f} saved_lora_B_absmax={b_abs:.4e} cross_rank_diff={cross_rank} "
              f"partitioned_before_gather={n_partitioned}/{len(trainable)} ungathered_numel={ungathered_numel} "
              f"gathered_numel={sum(v.numel() for v in weights.values())} get_state_dict_diff={sd_diff} "
              f"loop_s={loop_s:.2f} total_s={total_s:.2f}", flush=True)
    accelerator.end_training()


def compare(dirs: list[str], tol: float = 1e-5):
    """Equivalence table against the first directory."""
    res = [(d, torch.load(Path(d) / "result.pt", weights_only=True)) for d in dirs]
    ref_d, ref = res[0]
    print(f"reference: {ref_d} ({ref['mode']} W={ref['world']} ga={ref['ga']})")
    print(f"{'run':40s} {'mode':7s} W ga micro  max|dloss|   max|dnorm|   max|dweight|  loop_s")
    worst = 0.0
    same = ("steps", "global_batch", "seq_len", "n_examples", "lr", "warmup", "weight_decay", "max_grad_norm", "rank_r", "seed")
    for d, r in res:
        bad = [k for k in same if r["args"][k] != ref["args"][k]]
        if bad:
            print(f"{d}: not comparable with the reference, differs in {bad}")
            return False
        off = r["start_step"] - ref["start_step"]
        ref_l = ref["losses"][off:off + len(r["losses"])]
        dl = max(abs(a - b) for a, b in zip(r["losses"], ref_l))
        rn = ref["norms"][off:off + len(r["norms"])]
        dn = max((abs(a - b) for a, b in zip(r["norms"], rn) if not (math.isnan(a) or math.isnan(b))), default=float("nan"))
        dw = max((r["weights"][k] - ref["weights"][k]).abs().max().item() for k in ref["weights"])
        worst = max(worst, dl, dw)
        print(f"{d:40s} {r['mode']:7s} {r['world']} {r['ga']:2d} {r['micro']:5d}  {dl:.3e}   {dn:.3e}   {dw:.3e}   {r['loop_s']:.2f}")
    ok = worst <= tol
    print(f"{'OK' if ok else 'MISMATCH'}: worst |dloss|/|dweight| = {worst:.3e} (tol {tol:g})")
    return ok


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "compare":
        tol = 1e-5
        rest = sys.argv[2:]
        if rest and rest[0].startswith("--tol="):
            tol, rest = float(rest[0].split("=", 1)[1]), rest[1:]
        sys.exit(0 if compare(rest, tol) else 1)
    main()
