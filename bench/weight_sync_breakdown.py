"""Where one weight update's time goes: timestamps inside the learner and the generator around each step.

    .venv/bin/python bench/weight_sync_breakdown.py [--size 10] [--updates 40] [--backend ipc]

A `PolicyLearnerActor` and one `RolloutGeneratorActor` (as bench/weight_sync.py builds them, fp32, 64 MB buckets)
form the weight-sync group; then each of `--updates` timed `WeightSync.push` calls is followed by a memcpy of the same
bytes. Inside the actors, the functions the update runs are wrapped (for this process only, through `__ray_call__`)
to record wall-clock timestamps, so the driver's, the learner's and the generator's clocks are one (one machine).
Printed (median ms over the updates): when each actor's call starts after the driver sends it, the learner's work
before its first message, how long the generator waits for that message (the preamble), its copy into the engine,
its acknowledgement, and how long each result takes to reach the driver. Writes
bench/results/weight_sync_breakdown.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from weight_sync import SHAPES, Memcpy, start_actors  # noqa: E402

from rayllama.model import count_params  # noqa: E402

STEPS = {  # printed name: (from, to) timestamps: the driver's t0 / t1, the learner's l.*, the generator's g.*
    "generator call starts": ("t0", "g.receive"),
    "learner call starts": ("t0", "l.call"),
    "learner before its send": ("l.call", "l.send"),
    "generator waits for the preamble": ("g.receive", "g.received"),
    "generator copies": ("g.load", "g.loaded"),
    "generator acknowledges": ("g.loaded", "g.finished"),
    "learner sends (preamble to last ack)": ("l.send", "l.sent"),
    "generator result reaches the driver": ("g.finished", "t1"),
    "learner result reaches the driver": ("l.sent", "t1"),
    "whole update": ("t0", "t1"),
}


def _wrap_generator(self: Any) -> None:
    """In the generator: timestamp `receive` (start, preamble and header in), the engine's load, `Incoming.finish`."""
    import actors.rollout as rollout
    import rayllama.rl.weight_sync as weight_sync

    self.stamps = {}
    receive, load, finish = rollout.receive, self.engine.load_weights_stream, weight_sync.Incoming.finish

    def timed_receive(member):
        self.stamps["g.receive"] = time.time()
        incoming = receive(member)
        self.stamps["g.received"] = time.time()
        return incoming

    def timed_load(*args, **kwargs):
        self.stamps["g.load"] = time.time()
        load(*args, **kwargs)
        self.stamps["g.loaded"] = time.time()

    def timed_finish(incoming):
        finish(incoming)
        self.stamps["g.finished"] = time.time()

    rollout.receive, self.engine.load_weights_stream, weight_sync.Incoming.finish = (timed_receive, timed_load,
                                                                                     timed_finish)


def _wrap_learner(self: Any) -> None:
    """In the learner: timestamp the call's start (its first line reads the state) and `send`."""
    import actors.policy as policy

    self.stamps = {}
    iter_state, send = policy.iter_full_state, policy.send

    def timed_iter(model):
        self.stamps["l.call"] = time.time()
        return iter_state(model)

    def timed_send(*args, **kwargs):
        self.stamps["l.send"] = time.time()
        result = send(*args, **kwargs)
        self.stamps["l.sent"] = time.time()
        return result

    policy.iter_full_state, policy.send = timed_iter, timed_send


def _stamps(self: Any) -> dict[str, float]:
    return dict(self.stamps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=10, choices=sorted(SHAPES))
    ap.add_argument("--updates", type=int, default=40)
    ap.add_argument("--backend", default="ipc", choices=("ipc", "gloo"))
    ap.add_argument("--out", default="bench/results/weight_sync_breakdown.json")
    args = ap.parse_args()
    import ray

    from rayllama.rl.weight_sync import WeightSync

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    rows: list[dict[str, float]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = SHAPES[args.size]
            actors = start_actors(ray, args.size, 1, Path(tmp))
            learner, generator = actors.learners[0], actors.generators[0]
            sync = WeightSync(backend=args.backend, bucket_mb=64.0, timeout_s=120.0, verify_every=0)
            for _ in range(2):  # forms the group, maps the buffers
                sync.push(actors)
            ray.get([generator.__ray_call__.remote(_wrap_generator), learner.__ray_call__.remote(_wrap_learner)])
            nbytes = 4 * count_params(cfg)
            memcpy = Memcpy(nbytes)
            for _ in range(args.updates):
                t0 = time.time()
                sync.push(actors)
                t1 = time.time()
                copy = memcpy.seconds(nbytes)
                stamps = {"t0": t0, "t1": t1, **ray.get(generator.__ray_call__.remote(_stamps)),
                          **ray.get(learner.__ray_call__.remote(_stamps))}
                rows.append({**{name: stamps[b] - stamps[a] for name, (a, b) in STEPS.items()}, "memcpy": copy})
    finally:
        ray.shutdown()
    medians = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    ratio = statistics.median(r["whole update"] / r["memcpy"] for r in rows)
    print(f"\none weight update, {count_params(SHAPES[args.size]) / 1e6:.1f}M parameters, fp32, {args.backend}, "
          f"1 generator: median of {args.updates} (ms)")
    for name, seconds in medians.items():
        print(f"  {name:<40}{1000 * seconds:>8.2f}")
    print(f"  {'whole update / memcpy':<40}{ratio:>8.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "median_s": medians, "ratio": ratio}, indent=2) + "\n")


if __name__ == "__main__":
    main()
