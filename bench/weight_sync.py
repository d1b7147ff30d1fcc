"""Weight sync cost: learner -> 2 rollout generators over the weight-sync group (gloo broadcast, the product path),
the old object-store path (kept here as a reference implementation), and a memcpy of the same bytes.

    .venv/bin/python bench/weight_sync.py [--sizes 10 100] [--reps 5] [--generators 1 2] [--bucket-mb 64]

For each model size (millions of parameters) and generator count, a `PolicyLearnerActor` and that many
`RolloutGeneratorActor`s:

    gloo          rayllama.rl.weight_sync.WeightSync.push: learner rank 0 gathers the policy, packs it into
                  buckets of --bucket-mb MB and broadcasts each over gloo; the generators copy each bucket into
                  their model in place (no verification: ppo.verify_weights_every 0, and a verified run)
    ipc           the same protocol with each bucket handed over in shared memory (/dev/shm), what `auto` picks
                  on one machine: the learner (one rank) moved its parameters into shared memory when the group
                  formed, so a bucket is a slice of them, never packed, and each generator copies straight out
                  of the learner's parameters (one copy per generator, the floor for N copies of the weights)
    object store  what the loop did before: the learner puts the state as numpy arrays with one `ray.put`, every
                  generator reads the ref (zero-copy) and copies it into its model (no checksums)
    memcpy        a single-process `np.copyto` of the same number of bytes (the floor a copy-based sync cannot beat)
    memcpy each   the same for --generators times the bytes: every generator holds its own copy of the weights,
                  so a sync into N generators writes N copies, whatever carries them

Reported: median seconds per update and the ratios to memcpy. Writes bench/results/weight_sync.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

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


def _object_store_weights(self) -> Any:
    """The old path's sender, run in the learner (reference implementation: numpy views, one ray.put)."""
    import ray

    from rayllama.dist.fsdp import iter_full_state

    return ray.put({name: t.numpy() for name, t in iter_full_state(self.policy)}), self.version


def _object_store_load(self, state: dict) -> int:
    """The old path's receiver, run in a generator: tensors over the received arrays, copied into the model."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        self.engine.load_weights({k: torch.from_numpy(v) for k, v in state.items()}, self.engine.weight_version)
    return self.engine.weight_version


def bench_size(ray, size: int, reps: int, n_generators: int, bucket_mb: float, root: Path) -> dict:
    from actors.policy import PolicyLearnerActor
    from actors.rollout import RolloutGeneratorActor
    from rayllama.checkpoint import save_model
    from rayllama.rl.actors_api import RLActors
    from rayllama.rl.weight_sync import WeightSync

    cfg = SHAPES[size]
    torch.manual_seed(0)
    model_dir = save_model(root / f"policy-{size}m", Transformer(cfg), cfg)
    learner = PolicyLearnerActor.options(num_cpus=0.5).remote(
        str(model_dir), None, PPOConfig(value_init="sft"), threads=1)
    gens = [RolloutGeneratorActor.options(num_cpus=0.5).remote(str(model_dir), threads=1)
            for _ in range(n_generators)]
    ray.get([a.__ray_ready__.remote() for a in [learner, *gens]])
    actors = RLActors(learners=[learner], reference=None, reward_helpfulness=None, reward_safety=None,
                      generators=gens, call_timeout_s=600.0)

    def timed(fn) -> float:
        times = []
        for _ in range(reps + 1):  # the first run warms up (group formation, object store pages)
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:])

    seconds = {}
    for backend in ("gloo", "ipc"):
        for verify in (0, 1):
            sync = WeightSync(backend=backend, bucket_mb=bucket_mb, timeout_s=120.0, verify_every=verify)
            seconds[f"{backend}{'_verified' if verify else ''}_s"] = timed(lambda sync=sync: sync.push(actors))

    def object_store() -> None:
        ref, _ = ray.get(learner.__ray_call__.remote(_object_store_weights))
        ray.get([g.__ray_call__.remote(_object_store_load, ref) for g in gens])
        del ref

    object_store_s = timed(object_store)
    for a in [learner, *gens]:
        ray.kill(a)
    nbytes = 4 * count_params(cfg)
    return {"params": count_params(cfg), "bytes": nbytes, "generators": n_generators, "bucket_mb": bucket_mb,
            **seconds, "object_store_s": object_store_s,
            "memcpy_s": memcpy_seconds(nbytes, reps), "memcpy_each_s": memcpy_seconds(n_generators * nbytes, reps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 100], choices=sorted(SHAPES))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--generators", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--bucket-mb", type=float, default=64.0)
    ap.add_argument("--out", default="bench/results/weight_sync.json")
    args = ap.parse_args()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rows = [bench_size(ray, size, args.reps, n, args.bucket_mb, Path(tmp))
                    for size in args.sizes for n in args.generators]
    finally:
        ray.shutdown()
    print(f"\nweight update, learner -> generators, fp32, {args.bucket_mb:g} MB buckets (median of {args.reps}, "
          f"seconds)")
    print(f"{'params':>8}{'MiB':>8}{'gens':>6}{'gloo':>8}{'+verify':>9}{'ipc':>8}{'+verify':>9}{'obj store':>11}{'memcpy':>9}"
          f"{'ipc/memcpy':>12}{'gloo/memcpy':>13}{'store/memcpy':>14}{'memcpy each':>13}{'ipc/each':>10}")
    for r in rows:
        print(f"{r['params'] / 1e6:>7.1f}M{r['bytes'] / 2**20:>8.0f}{r['generators']:>6}{r['gloo_s']:>8.3f}{r['gloo_verified_s']:>9.3f}"
              f"{r['ipc_s']:>8.3f}{r['ipc_verified_s']:>9.3f}{r['object_store_s']:>11.3f}{r['memcpy_s']:>9.3f}"
              f"{r['ipc_s'] / r['memcpy_s']:>12.1f}{r['gloo_s'] / r['memcpy_s']:>13.1f}"
              f"{r['object_store_s'] / r['memcpy_s']:>14.1f}{r['memcpy_each_s']:>13.3f}"
              f"{r['ipc_s'] / r['memcpy_each_s']:>10.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
