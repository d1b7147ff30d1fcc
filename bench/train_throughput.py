"""Training throughput: our Transformer vs transformers' LlamaForCausalLM on the same config, batch and threads.

    .venv/bin/python bench/train_throughput.py [--threads 2] [--batch 16] [--seq 128] [--steps 6] [--device cpu]

Prints a table (tokens/s, ms/step, achieved FLOP/s and its share of a measured matmul peak) and writes
bench/results/train_throughput.json. FLOPs per token: 6 * N (weights) + 12 * n_layers * T * dim (attention),
the usual estimate (Kaplan et al.; PaLM appendix B). The two models run alternately so machine noise hits both.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rayllama.model import Transformer, preset  # noqa: E402


def matmul_peak(device: torch.device, n: int = 1024, reps: int = 20, dtype=torch.float32) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def hf_model(cfg):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, attn_implementation="sdpa",
    )
    return LlamaForCausalLM(hf_cfg)


def step_time(model, tokens, is_hf: bool, device, dtype) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ctx = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else torch.autocast("cpu", enabled=False)
    _sync(device)
    t = time.perf_counter()
    with ctx:
        logits = model(tokens[:, :-1]).logits if is_hf else model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    _sync(device)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2000)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--out", default="bench/results/train_throughput.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cfg = dataclasses.replace(preset(args.preset), n_layers=args.layers, vocab_size=args.vocab)
    torch.manual_seed(0)
    ours = Transformer(cfg).to(device)
    theirs = hf_model(cfg).to(device)
    theirs.load_state_dict(ours.state_dict())
    tokens = torch.randint(3, cfg.vocab_size, (args.batch, args.seq + 1), device=device)
    times = {"rayllama": [], "transformers": []}
    for i in range(args.steps + 1):  # step 0 is a warm-up, then alternate
        for name, model in (("rayllama", ours), ("transformers", theirs)):
            dt = step_time(model, tokens, name == "transformers", device, dtype)
            if i > 0:
                times[name].append(dt)
    n_params = sum(p.numel() for p in ours.parameters())
    flops_per_token = 6 * n_params + 12 * cfg.n_layers * args.seq * cfg.dim
    peak = matmul_peak(device, dtype=dtype)
    rows = []
    for name, ts in times.items():
        sec = sorted(ts)[len(ts) // 2]  # median
        tok_s = args.batch * args.seq / sec
        rows.append({"model": name, "ms_per_step": 1000 * sec, "tokens_per_s": tok_s,
                     "tflops": tok_s * flops_per_token / 1e12, "share_of_matmul_peak": tok_s * flops_per_token / peak})
    ratio = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    print(f"config: {args.preset} layers={cfg.n_layers} dim={cfg.dim} heads={cfg.n_heads}/{cfg.n_kv_heads} "
          f"vocab={cfg.vocab_size} params={n_params / 1e6:.2f}M batch={args.batch} seq={args.seq} "
          f"threads={args.threads} device={device} dtype={args.dtype}")
    print(f"measured matmul peak: {peak / 1e12:.3f} TFLOP/s ({args.dtype}, 1024^3)")
    print(f"{'model':<14}{'ms/step':>10}{'tokens/s':>12}{'TFLOP/s':>10}{'of peak':>9}")
    for r in rows:
        print(f"{r['model']:<14}{r['ms_per_step']:>10.1f}{r['tokens_per_s']:>12.0f}{r['tflops']:>10.3f}"
              f"{r['share_of_matmul_peak']:>9.1%}")
    print(f"rayllama / transformers tokens/s: {ratio:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "params": n_params, "matmul_peak_flops": peak,
                                          "rows": rows, "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
