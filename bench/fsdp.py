"""FSDP2 vs DDP at N ranks (gloo on CPU, NCCL on GPU): per-rank training-state bytes and tokens/s, in one run;
also FSDP2 with every block kept gathered from its forward to its backward (`train.reshard_after_forward: false`).

    .venv/bin/python bench/fsdp.py [--ranks 2] [--layers 4] [--dim 256] [--batch 8] [--seq 128] [--steps 6]

Both strategies build the model through rayllama.dist.fsdp.build_model (the trainers' own path), run the same
AdamW steps on the same data, and report per rank: bytes of parameters, gradients and AdamW state actually held
(local shards for FSDP, whole replicas for DDP; counted from the tensors after a step), and tokens/s over the union
batch (median step time after a warm-up; the two strategies alternate so machine noise hits both). FSDP's expected
state ratio is about 1/N (plus nothing: parameters, gradients and both AdamW moments are all sharded).
Prints a table and writes bench/results/fsdp.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from rayllama.config import OptimConfig
from rayllama.dist.fsdp import build_model, clip_grad_norm, wrap_ddp
from rayllama.model import ModelConfig
from rayllama.train.optim import build_optimizer

STRATEGIES = ("ddp", "fsdp", "fsdp-kept")


def _local_bytes(t: torch.Tensor | None) -> int:
    if t is None:
        return 0
    from torch.distributed.tensor import DTensor

    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    params = list(model.parameters())
    optim = sum(_local_bytes(v) for s in optimizer.state.values() for v in s.values()
                if isinstance(v, torch.Tensor) and v.ndim > 0)
    return {"params": sum(_local_bytes(p) for p in params), "grads": sum(_local_bytes(p.grad) for p in params),
            "optimizer": optim}


def _worker(rank: int, world: int, args: argparse.Namespace, out: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=8, n_kv_heads=2, vocab_size=args.vocab,
                      ffn_dim=int(args.dim * 8 / 3) // 8 * 8, max_seq_len=args.seq + 1)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, cfg.vocab_size, (args.batch, args.seq + 1), generator=g)
    mine = tokens.tensor_split(world)[rank]
    setups = {}
    for strategy in STRATEGIES:  # fsdp-kept: FSDP2 without resharding after forward (train.reshard_after_forward)
        model = build_model("causal", cfg, strategy=strategy.removesuffix("-kept"), seed=0,
                            reshard_after_forward=not strategy.endswith("-kept"))
        opt = build_optimizer(model, OptimConfig(lr=1e-4))
        setups[strategy] = (model, wrap_ddp(model, torch.device("cpu")) if strategy == "ddp" else model, opt)
    times: dict[str, list[float]] = {s: [] for s in setups}
    sizes: dict[str, dict[str, int]] = {}
    for i in range(args.steps + 1):
        for strategy, (model, train_model, opt) in setups.items():
            dist.barrier()
            t = time.perf_counter()
            logits = train_model(mine[:, :-1])
            F.cross_entropy(logits.flatten(0, 1), mine[:, 1:].flatten()).backward()
            clip_grad_norm(list(model.parameters()), 1.0)
            opt.step()
            if i == 0:
                sizes[strategy] = state_bytes(model, opt)  # gradients still held, AdamW state created
            opt.zero_grad(set_to_none=True)
            dist.barrier()
            if i > 0:
                times[strategy].append(time.perf_counter() - t)
    if rank == 0:
        n_params = sum(p.numel() for p in setups["ddp"][0].parameters())
        Path(out).write_text(json.dumps({"sizes": sizes, "times": times, "params": n_params}))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--port", type=int, default=29561)
    ap.add_argument("--out", default="bench/results/fsdp.json")
    args = ap.parse_args()
    raw = Path(args.out).with_suffix(".raw.json")
    raw.parent.mkdir(parents=True, exist_ok=True)
    mp.spawn(_worker, args=(args.ranks, args, str(raw), args.port), nprocs=args.ranks)
    measured = json.loads(raw.read_text())
    raw.unlink()
    rows = []
    for strategy in STRATEGIES:
        size = measured["sizes"][strategy]
        sec = sorted(measured["times"][strategy])[len(measured["times"][strategy]) // 2]
        rows.append({"strategy": strategy, **{f"{k}_bytes": v for k, v in size.items()},
                     "state_bytes": sum(size.values()), "ms_per_step": 1000 * sec,
                     "tokens_per_s": args.batch * args.seq / sec})
    ddp, fsdp, kept = rows
    ratios = {"state_fsdp_over_ddp": fsdp["state_bytes"] / ddp["state_bytes"],
              "tokens_per_s_fsdp_over_ddp": fsdp["tokens_per_s"] / ddp["tokens_per_s"],
              "tokens_per_s_fsdp_kept_over_fsdp": kept["tokens_per_s"] / fsdp["tokens_per_s"]}
    print(f"model: {measured['params'] / 1e6:.2f}M params (layers={args.layers} dim={args.dim} vocab={args.vocab}); "
          f"{args.ranks} ranks (gloo, CPU), union batch {args.batch} x {args.seq} tokens, {args.threads} thread(s)/rank")
    print(f"{'strategy':<11}{'params MiB':>12}{'grads MiB':>11}{'AdamW MiB':>11}{'state MiB':>11}{'ms/step':>10}"
          f"{'tokens/s':>10}")
    for r in rows:
        print(f"{r['strategy']:<11}{r['params_bytes'] / 2**20:>12.2f}{r['grads_bytes'] / 2**20:>11.2f}"
              f"{r['optimizer_bytes'] / 2**20:>11.2f}{r['state_bytes'] / 2**20:>11.2f}{r['ms_per_step']:>10.1f}"
              f"{r['tokens_per_s']:>10.0f}")
    print(f"per-rank state FSDP / DDP: {ratios['state_fsdp_over_ddp']:.3f}x (1/{args.ranks} = {1 / args.ranks:.3f}); "
          f"tokens/s FSDP / DDP: {ratios['tokens_per_s_fsdp_over_ddp']:.2f}x; blocks kept gathered from forward to "
          f"backward / resharded: {ratios['tokens_per_s_fsdp_kept_over_fsdp']:.3f}x")
    Path(args.out).write_text(json.dumps({"args": vars(args), "params": measured["params"], "rows": rows,
                                          "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
