"""Margin ablation (LLaMA 2 Table 28): the helpfulness reward model trained with margin none / small / large on
the same SFT trunk and the same pairs, held-out accuracy per rating level.

    .venv/bin/python bench/reward_margin.py RUN_DIR [key=value ...] [--margins none small] [--out DIR]

RUN_DIR is a finished run (`runs/tiny` after `make run`): its config.yaml, tokenizer, sft/model and data/ are
read (the world's pairs plus the SFT policy's pairs, data/pref_helpfulness_policy-sft-<id>.jsonl, when
reward.policy_pairs wrote them); each margin's RM is trained with the run's reward settings into OUT/<margin>/
(default bench/results/reward_margin; data tensors there too; a complete model there is reused), then the table is
printed and OUT.json written. key=value overrides apply to the config (give them before --margins).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--margins", nargs="+", default=["none", "small", "large"], choices=["none", "small", "large"])
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "reward_margin")
    args = ap.parse_args()

    import ray

    from rayllama.checkpoint import is_complete, load_model
    from rayllama.config import load_config
    from rayllama.data import formats
    from rayllama.data.formats import RATINGS
    from rayllama.pipeline import sft_pairs_file
    from rayllama.tokenizer import Tokenizer
    from rayllama.train.stages import run_reward

    run = args.run_dir.absolute()
    for need in ("config.yaml", "tokenizer/tokenizer.model", "sft/model", "data/pref_helpfulness.jsonl"):
        if not (run / need).exists():
            print(f"reward_margin: {run / need} is missing; pass a finished run dir (make run writes runs/tiny)",
                  file=sys.stderr)
            return 2
    tok = Tokenizer(run / "tokenizer" / "tokenizer.model")
    pairs = formats.read_preferences(run / "data" / "pref_helpfulness.jsonl")
    policy = sft_pairs_file(run / "data", "helpfulness", run / "sft" / "model", load_config(str(run / "config.yaml")))
    if policy.exists():
        pairs += formats.read_preferences(policy)
    heldout = formats.read_preferences(run / "data" / "pref_helpfulness_heldout.jsonl")
    out_root = args.out.absolute()
    ray.init(include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"),
             runtime_env={"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}})
    results = {}
    for margin in args.margins:
        cfg = load_config(str(run / "config.yaml"), [f"reward.margin={margin}", *args.overrides])
        out = out_root / margin
        t0 = time.time()
        if not is_complete(out / "reward" / "helpfulness" / "model"):
            run_reward(cfg, out, tok, "helpfulness", pairs, heldout, pairs, run / "sft" / "model")
        ev = load_model(out / "reward" / "helpfulness" / "model")[2].get("eval", {})
        results[margin] = {"seconds": round(time.time() - t0, 1), "pairs": len(pairs), **ev}
    ray.shutdown()

    head = f"{'margin':<8}" + "".join(f"{r:>22}" for r in RATINGS) + f"{'overall':>10}"
    print(head + "\n" + "-" * len(head))
    for margin, ev in results.items():
        cells = "".join(f"{ev.get(f'accuracy_{r}', float('nan')):>22.3f}" for r in RATINGS)
        print(f"{margin:<8}{cells}{ev.get('accuracy', float('nan')):>10.3f}")
    out_root.with_suffix(".json").write_text(json.dumps(results, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
