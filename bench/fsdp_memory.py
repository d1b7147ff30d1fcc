"""One FSDP2 training step of a Llama-2-7B-width model with few layers: measured peak GPU memory vs the plan.

    python bench/fsdp_memory.py [--layers 2] [--micro 1] [--seq 4096] [--dtype bfloat16] [--device cuda]

Builds the model through the trainers' own path (rayllama.dist.fsdp.build_model: meta device, fully_shard per
block + root, MixedPrecisionPolicy, activation checkpointing) on a one-rank process group, runs one SFT-shaped step
(right-padded rows, loss on every token, clip, AdamW) and compares torch.cuda.max_memory_allocated with
`rayllama.plan.trainer_role` for the same shapes (the plan's total less its 1 GB CUDA context, which the allocator
does not count). Prints a table and writes bench/results/fsdp_memory.json. On a machine without a GPU,
`--device cpu --dim 512` is a dry run of the plumbing (no memory figure).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from rayllama.config import OptimConfig, PipelineConfig
from rayllama.dist.fsdp import build_model, clip_grad_norm
from rayllama.model import preset
from rayllama.plan import CONTEXT, trainer_role
from rayllama.train.loop import lm_micro_loss
from rayllama.train.optim import build_optimizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dim", type=int, default=None, help="override the 7B width (dry runs)")
    ap.add_argument("--micro", type=int, default=1)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--checkpointing", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="bench/results/fsdp_memory.json")
    args = ap.parse_args()
    m = dataclasses.replace(preset("llama2-7b"), n_layers=args.layers)
    if args.dim:
        m = dataclasses.replace(m, dim=args.dim, ffn_dim=int(args.dim * 2.6875), n_heads=args.dim // 128,
                                n_kv_heads=args.dim // 128)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29571")
    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    model = build_model("causal", m, device=device, strategy="fsdp", param_dtype=getattr(torch, args.dtype),
                        activation_checkpointing=bool(args.checkpointing), seed=0)
    opt = build_optimizer(model, OptimConfig(lr=1e-5))
    g = torch.Generator().manual_seed(0)
    lengths = torch.full((args.micro,), args.seq)
    lengths[0] = args.seq - 7  # a padded row: the SFT shape the plan counts (mask included)
    data = {"tokens": torch.randint(3, m.vocab_size, (args.micro, args.seq), generator=g),
            "loss_mask": torch.ones(args.micro, args.seq, dtype=torch.bool), "lengths": lengths}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    loss_sum, count = lm_micro_loss(model, data, torch.arange(args.micro), device)
    (loss_sum / count).backward()
    norm = clip_grad_norm(list(model.parameters()), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    measured = torch.cuda.max_memory_allocated() if cuda else None

    cfg = PipelineConfig(device=args.device)
    cfg.scaling.num_workers, cfg.scaling.use_gpu, cfg.scaling.strategy = 1, cuda, "fsdp"
    cfg.train.param_dtype, cfg.train.activation_checkpointing = args.dtype, bool(args.checkpointing)
    role = trainer_role(cfg, m, "sft", args.micro, args.seq)
    planned = role.total - (CONTEXT if role.on_gpu else 0)
    n_params = sum(p.numel() for p in model.parameters())
    gb = 1e9
    print(f"model: Llama-2-7B width ({m.dim}), {m.n_layers} layers, vocab {m.vocab_size}: {n_params / 1e9:.3f}B "
          f"params; one FSDP2 rank, {args.dtype}, activation checkpointing {bool(args.checkpointing)}, "
          f"{args.micro} x {args.seq} tokens; step {seconds:.2f} s, grad norm {norm:.3f}")
    print(f"{'':<10}{'params':>8}{'grads':>8}{'optim':>8}{'gather':>8}{'act':>8}{'logits':>8}{'total GB':>10}")
    print(f"{'plan':<10}{role.params / gb:>8.2f}{role.grads / gb:>8.2f}{role.optimizer / gb:>8.2f}"
          f"{role.gathered / gb:>8.2f}{role.activations / gb:>8.2f}{role.logits / gb:>8.2f}{planned / gb:>10.2f}")
    if measured is not None:
        print(f"{'measured':<10}{'':>48}{measured / gb:>10.2f}   (torch.cuda.max_memory_allocated)")
        print(f"measured / plan: {measured / planned:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "args": vars(args), "params": n_params, "seconds": seconds, "planned_bytes": planned,
        "measured_peak_bytes": measured, "ratio": measured / planned if measured else None,
        "plan": {k: getattr(role, k) for k in ("params", "grads", "optimizer", "gathered", "activations", "logits")},
    }, indent=2))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
