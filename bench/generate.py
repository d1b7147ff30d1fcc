"""Generation throughput: rayllama's TorchEngine vs transformers' `generate` (KV cache), same weights.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/generate.py [--preset tiny] [--batch 32] [--new 128] [--prompt 32]
                                                         [--threads 2] [--reps 3] [--device cpu]

Greedy decoding of `--new` tokens for `--batch` prompts of `--prompt` random tokens, no early stop, both engines
over the same random-weight model (our state dict loads into LlamaForCausalLM unchanged). Runs alternate so
machine noise hits both; the best of `--reps` counts. Prints a table and writes bench/results/generate.json,
including whether the two engines' greedy tokens agree.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rayllama.checkpoint import hf_config_dict  # noqa: E402
from rayllama.generation import SamplingParams, TorchEngine  # noqa: E402
from rayllama.model import Transformer, count_params, preset  # noqa: E402


def hf_twin(model: Transformer):
    """LlamaForCausalLM with exactly `model`'s weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaForCausalLM(LlamaConfig(**hf_config_dict(model.cfg), attn_implementation="sdpa"))
    hf.load_state_dict(model.state_dict(), strict=True)
    return hf.to(next(model.parameters()).device).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_ours(engine: TorchEngine, prompts: list[list[int]], new: int) -> tuple[float, list[list[int]]]:
    params = SamplingParams(max_new_tokens=new, temperature=0.0, stop_token_ids=())
    sync(engine.device)
    start = time.perf_counter()
    out = engine.generate(prompts, params)
    sync(engine.device)
    return time.perf_counter() - start, [c[0].token_ids for c in out]


@torch.inference_mode()
def run_hf(hf, prompts: list[list[int]], new: int, device: torch.device) -> tuple[float, list[list[int]]]:
    ids = torch.tensor(prompts, device=device)  # (B, P): equal lengths, no padding
    sync(device)
    start = time.perf_counter()
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                      do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None)
    sync(device)
    return time.perf_counter() - start, out[:, ids.shape[1]:].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="bench/results/generate.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = preset(args.preset)
    torch.manual_seed(0)
    model = Transformer(cfg).to(device).eval()
    hf = hf_twin(model)
    prompts = torch.randint(3, cfg.vocab_size, (args.batch, args.prompt)).tolist()
    engine = TorchEngine(model, device=device, max_batch_size=args.batch)
    run_ours(engine, prompts[:2], 4), run_hf(hf, prompts[:2], 4, device)  # warm-up
    times: dict[str, list[float]] = {"rayllama TorchEngine": [], "transformers generate": []}
    for _ in range(args.reps):
        t_ours, ours = run_ours(engine, prompts, args.new)
        t_hf, theirs = run_hf(hf, prompts, args.new, device)
        times["rayllama TorchEngine"].append(t_ours)
        times["transformers generate"].append(t_hf)
    agree = sum(a == b for a, b in zip(ours, theirs)) / len(ours)
    tokens = args.batch * args.new
    rows = {name: {"best_s": min(ts), "tokens_per_s": tokens / min(ts), "all_s": ts} for name, ts in times.items()}

    print(f"\n{args.preset}: {count_params(cfg) / 1e6:.1f}M params, {device}, {args.threads} threads, batch "
          f"{args.batch}, prompt {args.prompt}, {args.new} new tokens, greedy, best of {args.reps}")
    print(f"{'engine':<24}{'seconds':>10}{'tokens/s':>12}")
    for name, row in rows.items():
        print(f"{name:<24}{row['best_s']:>10.2f}{row['tokens_per_s']:>12.0f}")
    print(f"greedy sequences identical: {agree:.0%}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "params": count_params(cfg), "results": rows,
                                          "greedy_identical_share": agree}, indent=2) + "\n")


if __name__ == "__main__":
    main()
