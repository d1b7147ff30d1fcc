"""Where the reward models are right and wrong: both RMs of a finished run on fresh preference pairs, per rating
level with standard errors, on held-out tasks (never in any training data: the pipeline's own test) and on
training tasks (new comparisons of prompts the RM was trained on: LLaMA 2's protocol, a held-out share of each
batch of comparisons), plus which kinds of significantly-better pairs the helpfulness RM gets wrong; then both RMs
on pairs of the SFT policy's own samples on held-out prompts, rated by the gold annotator (what PPO asks of them:
the written pairs' candidates are not the policy's kinds of answers).

    .venv/bin/python bench/reward_errors.py RUN_DIR [--pairs 2000] [--policy-prompts 1000] [--seed 1234] [--out FILE]

RUN_DIR is a finished run (`runs/tiny` after `make run`). The pairs come from the run's toy world generator with
another seed; a pair that repeats word for word (in either order) a comparison either RM trained on is dropped (the
safety RM also trains on helpfulness pairs), so every row scores comparisons the RMs have not seen, and the dropped
share is printed (on training tasks it is large: the candidates of a task are few).
Prints the tables and writes FILE (default bench/results/reward_errors.json).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter, defaultdict
from pathlib import Path

SOURCES = {"dev": "dev tasks", "train": "training tasks", "policy": "SFT answers, dev"}


def pair_kind(extra: dict) -> str:
    """What separates a helpfulness pair, from its gold scores (toyworld's scale): a wrong value, no answer at all
    (off-subject, gibberish, refusal: 0.0), an on-topic non-answer (0.1), or a borderline prompt."""
    task, gold = extra["task"], extra["gold"]
    if task["type"] in ("borderline", "unsafe"):
        return task["type"]
    worse = min(gold["chosen"]["helpfulness"], gold["rejected"]["helpfulness"])
    return {0.0: "vs no answer (0.0)", 0.1: "vs on-topic, no answer (0.1)"}.get(worse, "vs wrong value (0.2/0.3)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--pairs", type=int, default=2000, help="fresh pairs per kind and split")
    ap.add_argument("--policy-prompts", type=int, default=1000,
                    help="held-out prompts per kind whose SFT samples are paired (0: skip)")
    ap.add_argument("--seed", type=int, default=1234,
                    help="pair generator seed (the run's world uses world.seed, by default the run's seed)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "reward_errors.json")
    args = ap.parse_args()

    from actors.reward import RewardScorer
    from rayllama.config import load_config
    from rayllama.data import formats, toyworld
    from rayllama.data.formats import RATINGS
    from rayllama.pipeline import sample_policy_pairs

    run = args.run_dir.absolute()
    models = {k: run / "reward" / k / "model" for k in ("helpfulness", "safety")}
    for need in (run / "config.yaml", run / "sft" / "model", *models.values()):
        if not need.exists():
            print(f"reward_errors: {need} is missing; pass a finished run dir (make run writes runs/tiny)",
                  file=sys.stderr)
            return 2
    cfg = load_config(str(run / "config.yaml"))
    if args.seed == cfg.world_seed:
        print(f"reward_errors: --seed {args.seed} is the run's world seed (its training pairs); pick another",
              file=sys.stderr)
        return 2
    sources = {  # where each row's pairs come from: the world's written pairs per split, or the SFT's own answers
        "dev": lambda kind: toyworld.preference_pairs(args.pairs, args.seed, kind, "dev"),
        "train": lambda kind: toyworld.preference_pairs(args.pairs, args.seed, kind, "train"),
        "policy": lambda kind: sample_policy_pairs(cfg, run / "sft" / "model", kind, args.policy_prompts,
                                                   args.seed, "dev"),
    }
    if not args.policy_prompts:
        del sources["policy"]
    seen = set()  # every comparison either RM trained on (the safety RM also trains on helpfulness pairs)
    for path in (run / "data").glob("pref_*.jsonl"):  # the written pairs and every policy's (not the held-out ones)
        if not path.stem.endswith("_heldout"):
            seen |= {p.comparison() for p in formats.read_preferences(path)}
    results: dict = {}
    for kind, model in models.items():
        scorer = RewardScorer(kind, model, threads=cfg.threads_per_worker or None)
        for source, make_pairs in sources.items():
            drawn = make_pairs(kind)
            pairs = [p for p in drawn if p.comparison() not in seen]
            if not pairs:
                print(f"reward_errors: all {len(drawn)} {kind} pairs from {SOURCES[source]} repeat training pairs; "
                      "raise --pairs", file=sys.stderr)
                return 2
            chosen = scorer.score([(p.prompt, p.chosen) for p in pairs])
            rejected = scorer.score([(p.prompt, p.rejected) for p in pairs])
            right = [c > r for c, r in zip(chosen, rejected)]
            by_rating, by_kind = defaultdict(list), defaultdict(list)
            for p, ok in zip(pairs, right):
                by_rating[p.rating].append(ok)
                if p.rating == "significantly_better":
                    by_kind[pair_kind(p.extra)].append(ok)
            results[f"{kind}/{source}"] = {
                "accuracy": {r: sum(v) / len(v) for r, v in by_rating.items()},
                "n": {r: len(v) for r, v in by_rating.items()},
                "overall": sum(right) / len(right),
                "dropped_repeats_of_training_pairs": 1 - len(pairs) / len(drawn),
                "significantly_better_by_pair_kind": {k: [sum(v), len(v)] for k, v in sorted(by_kind.items())},
                "types": dict(Counter(p.extra["task"]["type"] for p in pairs)),
            }

    head = f"{'RM / tasks':<36}" + "".join(f"{r:>24}" for r in RATINGS) + f"{'overall':>9}{'dropped':>9}"
    print(head + "\n" + "-" * len(head))
    for key, res in results.items():
        kind, source = key.split("/")
        cells = ""
        for r in RATINGS:
            acc, n = res["accuracy"].get(r, float("nan")), res["n"].get(r, 0)
            se = math.sqrt(acc * (1 - acc) / n) if n else float("nan")
            cells += f"{acc:.3f} ± {se:.3f} ({n:>3})".rjust(24)
        dropped = res["dropped_repeats_of_training_pairs"]
        print(f"{kind + ' / ' + SOURCES[source]:<36}{cells}{res['overall']:>9.3f}{dropped:>9.2f}")
    print("\nhelpfulness RM, significantly-better pairs by what separates them (right / n):")
    for source in sources:
        parts = results[f"helpfulness/{source}"]["significantly_better_by_pair_kind"]
        print(f"  {SOURCES[source]:<23}" + "   ".join(f"{k}: {a}/{n} = {a / n:.2f}" for k, (a, n) in parts.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"pairs": args.pairs, "policy_prompts": args.policy_prompts, "seed": args.seed,
                                    "run_dir": str(run), **results},
                                   indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
