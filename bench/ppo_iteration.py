"""PPO iteration time through real Ray actors: synchronous vs one-step-off-policy rollouts (`ppo.async_rollouts`).

    .venv/bin/python bench/ppo_iteration.py [--iterations 4] [--rounds 2] [--prompts 32] [--new 64] [--generators 1]

Builds a throw-away world (a 2000-piece tokenizer on Shakespeare, the `tiny` preset as SFT policy, reward models
from the same trunk with random heads), starts the RL actors with `create_rl_actors` (1 learner, `--generators`
generators, reference, two reward scorers; 0.25 CPU each, one torch thread each), then runs blocks of
`--iterations` PPO iterations (`ppo_step`, as `run_ppo` does), alternating the synchronous mode (generate, then
score and train) and the async mode (the next iteration's rollouts generated while this one scores and trains),
`--rounds` blocks per mode, so machine noise hits both alike. Same work per iteration in both modes: one batch
generated, scored and trained on, one weight sync. The first iteration of every block is left out (the async mode
has nothing prefetched yet). Reports the mean seconds per phase and per iteration, and the speed-up; writes
bench/results/ppo_iteration.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "1")

from rayllama.checkpoint import save_model  # noqa: E402
from rayllama.config import OptimConfig, PipelineConfig  # noqa: E402
from rayllama.data.corpus import shakespeare_documents  # noqa: E402
from rayllama.data.formats import PromptRecord  # noqa: E402
from rayllama.model import ScalarHeadModel, Transformer, count_params, preset  # noqa: E402
from rayllama.tokenizer import Tokenizer, train_tokenizer  # noqa: E402

PHASES = ("generate", "score", "advantages", "train", "prefetch_wait", "sync", "iteration")
MODES = ("sync", "async")


def build_world(root: Path, n_prompts: int) -> tuple[Tokenizer, Path, Path, Path, list[PromptRecord]]:
    text = "\n".join(shakespeare_documents())[:400_000]
    tok = Tokenizer(train_tokenizer(text.splitlines(), root / "tok", vocab_size=2000))
    cfg = preset("tiny")
    cfg.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    sft = Transformer(cfg)
    sft_dir = save_model(root / "sft", sft, cfg, tokenizer_model=tok.model_path)
    rm_dirs = [save_model(root / f"rm-{kind}", ScalarHeadModel.from_transformer(sft, score_std=0.05), cfg,
                          tokenizer_model=tok.model_path) for kind in ("helpfulness", "safety")]
    rng = random.Random(0)
    lines = [line.strip() for line in text.splitlines() if 20 < len(line.strip()) < 80]
    prompts = [PromptRecord(prompt=[{"role": "user", "content": rng.choice(lines)}], is_safety=i % 4 == 0)
               for i in range(n_prompts)]
    return tok, sft_dir, rm_dirs[0], rm_dirs[1], prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=4, help="per block, the first one a warm-up")
    ap.add_argument("--rounds", type=int, default=2, help="blocks per mode, alternating")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--generators", type=int, default=1)
    ap.add_argument("--out", default="bench/results/ppo_iteration.json")
    args = ap.parse_args()
    import ray

    from actors.group import create_rl_actors, shutdown_rl_actors
    from rayllama.rl.loop import push_weights, start_loop
    from rayllama.rl.ppo import PPOLoop, ppo_step

    cfg = PipelineConfig(seed=0)
    ppo = cfg.ppo
    ppo.iterations, ppo.prompts_per_iteration, ppo.mini_batch_size = 10_000, args.prompts, args.prompts // 2
    ppo.max_new_tokens, ppo.num_generators, ppo.checkpoint_every = args.new, args.generators, 10_000
    ppo.optim = OptimConfig(lr=1e-5, schedule="constant")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    timings: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            tok, sft, rm_h, rm_s, prompts = build_world(root, 4 * args.prompts)
            actors = create_rl_actors(cfg, sft, sft, rm_h, rm_s)
            try:
                loop, _ = start_loop(PPOLoop, cfg, actors, prompts, tok, root / "run")
                assert isinstance(loop, PPOLoop)
                push_weights(loop)
                for block in range(2 * args.rounds):
                    mode = MODES[block % 2]
                    ppo.async_rollouts, loop.pending = mode == "async", None
                    for i in range(args.iterations):
                        start = time.perf_counter()
                        metrics = ppo_step(loop)
                        if i:
                            timings[mode].append({**metrics, "timing/iteration": time.perf_counter() - start})
                    print(f"{mode:>5} block {block // 2 + 1}: "
                          f"{statistics.mean(m['timing/iteration'] for m in timings[mode][-(args.iterations - 1):]):.2f} s/it",
                          flush=True)
                loop.close()
            finally:
                shutdown_rl_actors(actors)
    finally:
        ray.shutdown()
    results = {mode: {p: statistics.mean(m.get(f"timing/{p}", 0.0) for m in its) for p in PHASES}
               for mode, its in timings.items()}
    speedup = results["sync"]["iteration"] / results["async"]["iteration"]
    print(f"\nPPO iteration, tiny preset ({count_params(preset('tiny')) / 1e6:.1f}M params at vocab 2000), "
          f"{args.prompts} prompts x {args.new} new tokens, 1 learner, {args.generators} generator(s), 2 CPUs; "
          f"mean of {args.rounds} x {args.iterations - 1} iterations per mode, alternating blocks, seconds")
    print(f"{'phase':<14}{'sync':>10}{'async':>10}")
    for p in PHASES:
        print(f"{p:<14}{results['sync'][p]:>10.2f}{results['async'][p]:>10.2f}")
    print(f"speed-up (sync / async seconds per iteration): {speedup:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "seconds": results, "speedup": speedup}, indent=2)
                              + "\n")


if __name__ == "__main__":
    main()
