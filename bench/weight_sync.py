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

Both memcpys run right after every timed update, so each update has its floor measured in the same moment (this
machine's memory bandwidth moves by up to 2x between seconds). Reported (ms): median time per update, the median
memcpy, and each path's ratio to memcpy as the median of the per-update ratios. Writes
bench/results/weight_sync.json.
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


class Memcpy:
    """`np.copyto` of the first `n` bytes of a buffer into another (both faulted in once, up front)."""

    def __init__(self, nbytes: int) -> None:
        self.src = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
        self.dst = np.empty_like(self.src)
        np.copyto(self.dst, self.src)

    def seconds(self, n: int) -> float:
        start = time.perf_counter()
        np.copyto(self.dst[:n], self.src[:n])
        return time.perf_counter() - start


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


def start_actors(ray, size: int, n_generators: int, root: Path) -> Any:
    """A `PolicyLearnerActor` over a random model of `size` M parameters and `n_generators`
    `RolloutGeneratorActor`s (half a CPU and one torch thread each), ready, as the loops' `RLActors`."""
    from actors.policy import PolicyLearnerActor
    from actors.rollout import RolloutGeneratorActor
    from rayllama.checkpoint import save_model
    from rayllama.rl.actors_api import RLActors

    cfg = SHAPES[size]
    torch.manual_seed(0)
    model_dir = save_model(root / f"policy-{size}m", Transformer(cfg), cfg)
    learner = PolicyLearnerActor.options(num_cpus=0.5).remote(
        str(model_dir), None, PPOConfig(value_init="sft"), threads=1)
    gens = [RolloutGeneratorActor.options(num_cpus=0.5).remote(str(model_dir), threads=1)
            for _ in range(n_generators)]
    ray.get([a.__ray_ready__.remote() for a in [learner, *gens]])
    return RLActors(learners=[learner], reference=None, reward_helpfulness=None, reward_safety=None,
                    generators=gens, call_timeout_s=600.0)


def bench_size(ray, size: int, reps: int, n_generators: int, bucket_mb: float, root: Path) -> dict:
    from rayllama.rl.weight_sync import WeightSync

    actors = start_actors(ray, size, n_generators, root)
    learner, gens = actors.learners[0], actors.generators
    cfg = SHAPES[size]
    nbytes = 4 * count_params(cfg)
    memcpy = Memcpy(n_generators * nbytes)
    copies: list[float] = []
    copies_each: list[float] = []
    row: dict[str, Any] = {"params": count_params(cfg), "bytes": nbytes, "generators": n_generators,
                           "bucket_mb": bucket_mb}

    def timed(name: str, fn) -> None:
        """Row `name`_s: median seconds of `fn`; `name`_per_memcpy: the median of each run's ratio to a memcpy
        of its bytes timed right after it (and _per_memcpy_each: to the memcpy of every generator's bytes)."""
        times, ratios, ratios_each = [], [], []
        for rep in range(reps + 1):  # the first run warms up (group formation, object store pages)
            start = time.perf_counter()
            fn()
            took = time.perf_counter() - start
            copy, copy_each = memcpy.seconds(nbytes), memcpy.seconds(n_generators * nbytes)
            if rep:
                times.append(took)
                copies.append(copy)
                copies_each.append(copy_each)
                ratios.append(took / copy)
                ratios_each.append(took / copy_each)
        row.update({f"{name}_s": statistics.median(times), f"{name}_per_memcpy": statistics.median(ratios),
                    f"{name}_per_memcpy_each": statistics.median(ratios_each)})

    for backend in ("gloo", "ipc"):
        for verify in (0, 1):
            sync = WeightSync(backend=backend, bucket_mb=bucket_mb, timeout_s=120.0, verify_every=verify)
            timed(f"{backend}{'_verified' if verify else ''}", lambda sync=sync: sync.push(actors))

    def object_store() -> None:
        ref, _ = ray.get(learner.__ray_call__.remote(_object_store_weights))
        ray.get([g.__ray_call__.remote(_object_store_load, ref) for g in gens])
        del ref

    timed("object_store", object_store)
    for a in [learner, *gens]:
        ray.kill(a)
    return {**row, "memcpy_s": statistics.median(copies), "memcpy_each_s": statistics.median(copies_each)}


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
          f"ms; a ratio is the median of the per-update ratios to a memcpy timed right after the update)")
    print(f"{'params':>8}{'MiB':>6}{'gens':>5}{'gloo':>8}{'+verify':>9}{'ipc':>7}{'+verify':>9}{'obj store':>10}"
          f"{'memcpy':>8}{'ipc/memcpy':>11}{'gloo/memcpy':>12}{'store/memcpy':>13}{'memcpy each':>12}{'ipc/each':>9}")
    for r in rows:
        ms = {k: 1000 * v for k, v in r.items() if k.endswith("_s")}
        print(f"{r['params'] / 1e6:>7.1f}M{r['bytes'] / 2**20:>6.0f}{r['generators']:>5}{ms['gloo_s']:>8.1f}"
              f"{ms['gloo_verified_s']:>9.1f}{ms['ipc_s']:>7.1f}{ms['ipc_verified_s']:>9.1f}"
              f"{ms['object_store_s']:>10.1f}{ms['memcpy_s']:>8.1f}{r['ipc_per_memcpy']:>11.1f}"
              f"{r['gloo_per_memcpy']:>12.1f}{r['object_store_per_memcpy']:>13.1f}{ms['memcpy_each_s']:>12.1f}"
              f"{r['ipc_per_memcpy_each']:>9.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
