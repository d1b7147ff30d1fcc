"""Weight sync cost: learner -> 2 rollout generators through Ray's object store, vs a memcpy of the same bytes.

    .venv/bin/python bench/weight_sync.py [--sizes 10 100] [--reps 5] [--generators 2]

For each model size (millions of parameters) a `PolicyLearnerActor` publishes its policy the way the PPO loop does
(`weights()`: numpy views, checksum, one `ray.put` in the learner) and every `RolloutGeneratorActor` takes the ref
(`update_weights`: zero-copy read from the object store, checksum check, copy into its model). Reported per sync:
the publish time, the generators' update time (in parallel), the total, and a single-process `np.copyto` of
the same number of bytes (the floor a copy-based sync cannot beat), and one `weights_checksum` of the state in this
process (each sync computes it twice: once in the learner, once in each generator). Writes bench/results/weight_sync.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "1")

from rayllama.config import PPOConfig  # noqa: E402
from rayllama.model import ModelConfig, Transformer, count_params  # noqa: E402

SHAPES = {  # ~10M and ~100M parameters (count_params below prints the exact numbers)
    10: ModelConfig(dim=512, n_layers=2, n_heads=8, n_kv_heads=8, vocab_size=4000, ffn_dim=1376, max_seq_len=256),
    100: ModelConfig(dim=1024, n_layers=7, n_heads=16, n_kv_heads=16, vocab_size=8000, ffn_dim=2752,
                     max_seq_len=256),
}


def memcpy_seconds(nbytes: int, reps: int) -> float:
    src = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in first
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_size(ray, size: int, reps: int, n_generators: int, root: Path) -> dict:
    from actors.policy import PolicyLearnerActor
    from actors.rollout import RolloutGeneratorActor
    from rayllama.checkpoint import save_model

    cfg = SHAPES[size]
    torch.manual_seed(0)
    model_dir = save_model(root / f"policy-{size}m", Transformer(cfg), cfg)
    learner = PolicyLearnerActor.options(num_cpus=0.5).remote(
        str(model_dir), None, PPOConfig(value_init="sft"), threads=1)
    gens = [RolloutGeneratorActor.options(num_cpus=0.5).remote(str(model_dir), threads=1)
            for _ in range(n_generators)]
    ray.get([a.__ray_ready__.remote() for a in [learner, *gens]])
    publish, update, total = [], [], []
    for _ in range(reps + 1):  # the first sync warms up (object store pages, numpy paths)
        start = time.perf_counter()
        state_ref, version, checksum = ray.get(learner.weights.remote())
        mid = time.perf_counter()
        ray.get([g.update_weights.remote(state_ref, version, checksum) for g in gens])
        end = time.perf_counter()
        publish.append(mid - start)
        update.append(end - mid)
        total.append(end - start)
        del state_ref
    for a in [learner, *gens]:
        ray.kill(a)
    from rayllama.rl.actors_api import state_to_numpy, weights_checksum

    state = state_to_numpy(Transformer(cfg).state_dict())
    nbytes = sum(a.nbytes for a in state.values())
    start = time.perf_counter()
    weights_checksum(state)
    checksum_s = time.perf_counter() - start
    return {"checksum_s": checksum_s, "params": count_params(cfg), "bytes": nbytes, "generators": n_generators,
            "publish_s": statistics.median(publish[1:]), "update_s": statistics.median(update[1:]),
            "sync_s": statistics.median(total[1:]), "memcpy_s": memcpy_seconds(nbytes, reps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 100], choices=sorted(SHAPES))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--generators", type=int, default=2)
    ap.add_argument("--out", default="bench/results/weight_sync.json")
    args = ap.parse_args()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rows = [bench_size(ray, size, args.reps, args.generators, Path(tmp)) for size in args.sizes]
    finally:
        ray.shutdown()
    print(f"\nweight sync, learner -> {args.generators} generators (median of {args.reps})")
    print(f"{'params':>8}{'MiB':>8}{'publish s':>11}{'update s':>10}{'sync s':>9}{'memcpy s':>10}"
          f"{'sync/memcpy':>13}{'checksum s':>12}")
    for r in rows:
        print(f"{r['params'] / 1e6:>7.1f}M{r['bytes'] / 2**20:>8.0f}{r['publish_s']:>11.3f}{r['update_s']:>10.3f}"
              f"{r['sync_s']:>9.3f}{r['memcpy_s']:>10.3f}{r['sync_s'] / r['memcpy_s']:>13.1f}{r['checksum_s']:>12.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
