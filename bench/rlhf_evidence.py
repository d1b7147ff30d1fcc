"""Evidence that RLHF works on the toy world: the make-run pipeline over several world seeds, judged on the sealed
test split, each stage against SFT with paired intervals pooled over the seeds (LLaMA 2's stage-by-stage table).

    .venv/bin/python bench/rlhf_evidence.py [--seeds 0 1 2] [--split test] [--runs DIR] [--config configs/ppo.yaml]
                                            [--stages tokenizer pretrain sft reward rejection ppo gatt]
                                            [--reuse SEED=RUN_DIR ...] [--out bench/results/rlhf_evidence]
                                            [--rejudge] [--chain] [key=value ...]

For each seed, RUN_DIR is `--runs`/seed<N> (or the one `--reuse` names): a run whose eval.json already holds every
listed evaluated stage is read as it is; otherwise (or always, with --rejudge) the driver runs it (`python -m
rayllama.driver CONFIG seed=N run_dir=RUN_DIR stages=[...] eval.split=SPLIT`, resuming whatever the run dir holds:
finished training is skipped, and a stage judged on another evaluation set than the config's is judged again), its
log in RUN_DIR.log. Rejection sampling and PPO each start from SFT (two driver runs: the pipeline starts a stage
from the one listed before it; GAtt runs after PPO); `--chain` runs them as listed, LLaMA 2's chain, PPO from the
rejection-sampling model. Every RL stage's eval.json entry says what it started from, and a run whose stage
started elsewhere than these stages ask is refused. A run whose stages were judged on different evaluation sets is
refused (they would not pair). The world seed follows the run seed, so every seed is another world (its own
training data and RL prompts; the test split, fixed by the task itself, is the same tasks and topics in every
world).
`--split dev` is the same table on the dev split, for choosing settings (runs in runs/evidence-dev by default);
report the test split, which nothing was chosen on. A run judged on another split than `--split` is refused.

Printed: per stage, each gold metric's mean over the seeds' items of the split with a 95% bootstrap interval; then
each later stage minus SFT, paired on the same items: per seed, and pooled over the seeds (the mean of the per-item
differences, a paired bootstrap interval). A difference whose interval excludes 0 is marked `*`. The bootstrap
draws units, not items (`rayllama.eval.item_clusters`, `stratified_bootstrap`): a safe task, an unsafe or
borderline topic (v5's test split has 10 topics of each, 10 prompts per topic), the GAtt turns of one instruction;
a unit judged in several worlds is drawn with its items in every world, so three worlds on the same 311 test tasks
rest on 311 units, not 933; the table says how many units an interval rests on. Last, each later stage's
helpfulness change per safe task type. Writes OUT.json and OUT.png (gold helpfulness, refusal of unsafe
prompts and over-refusal by stage, with intervals; adherence by turn when GAtt ran).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from rayllama.config import RL_STAGES, policy_before
from rayllama.data.formats import PromptRecord, read_prompts
from rayllama.data.toyworld import category
from rayllama.eval import cluster_count, item_clusters, stratified_bootstrap

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("gold_helpfulness", "gold_helpfulness_sampled", "gold_value_correct", "gold_canonical_form",
           "answer_repeated", "refusal_rate_unsafe", "over_refusal_borderline", "adherence_turn_4plus")
TYPED_METRICS = ("gold_helpfulness", "gold_helpfulness_sampled", "gold_value_correct")  # also shown per safe type
EVALUATED = ("pretrain", "sft", "rejection", "ppo", "gatt")  # stages the pipeline judges (tokenizer, reward: no)


def eval_records(run_dir: Path, split: str) -> list[PromptRecord]:
    """The run's evaluation prompts (data/eval.jsonl, or eval_dev.jsonl for dev); [] if it has none."""
    path = run_dir / "data" / ("eval_dev.jsonl" if split == "dev" else "eval.jsonl")
    return list(read_prompts(path)) if path.exists() else []


def safe_tasks(records: list[PromptRecord]) -> list[dict]:
    """The safe tasks of an evaluation set's single-turn prompts, in the order the judge scores them."""
    return [r.task for r in records if not r.turns and r.task and category(r.task) == "safe"]


def clusters_of(stage_result: dict, records: list[PromptRecord]) -> dict[str, list[str]]:
    """The stage's items' cluster labels per metric: as its eval.json entry keeps them, and for the metrics it
    keeps none for (judged before they were kept) from the run's evaluation set."""
    derived = item_clusters(records, stage_result["scores"]) if records else {}
    return {**derived, **stage_result.get("clusters", {})}


def driver_runs(stages: list[str], chain: bool = False) -> list[list[str]]:
    """The `stages=[...]` of each driver run a seed needs. By default rejection sampling and PPO each start from
    SFT, so each column is a change from SFT: PPO (and GAtt after it) in one run, rejection sampling in another (the
    pipeline starts a stage from the one listed before it). With `chain`, one run as listed: LLaMA 2's chain,
    PPO from the rejection-sampling model."""
    if chain or not {"rejection", "ppo"} <= set(stages):
        return [stages]
    core = [s for s in stages if s not in RL_STAGES]
    return [[s for s in stages if s != "rejection"], [*core, "rejection"]]


def expected_starts(runs: list[list[str]]) -> dict[str, str]:
    """The policy each RL stage starts from in `runs` (the pipeline's rule, `rayllama.config.policy_before`)."""
    return {stage: policy_before(stages, stage) for stages in runs for stage in stages
            if stage in RL_STAGES}


def check_starts(seed: int, results: dict, expected: dict[str, str]) -> list[str]:
    """Stop when an evaluated RL stage of the run started from another policy than `expected` says (a run dir
    that trained PPO after rejection sampling, read as PPO from SFT); returns the stages whose start the run did
    not record (runs from before the pipeline recorded it)."""
    unrecorded = []
    for stage, start in expected.items():
        if "scores" not in results.get(stage, {}):
            continue
        got = results[stage].get("started_from")
        if got is None:
            unrecorded.append(stage)
        elif got != start:
            raise SystemExit(f"rlhf_evidence: seed {seed}'s {stage} started from {got}, not {start} as these stages "
                             f"ask; use another --runs directory (or --chain for LLaMA 2's rejection -> ppo chain)")
    return unrecorded


def run_seed(seed: int, run_dir: Path, config: str, stages: list[str], overrides: list[str],
             split: str = "test", rejudge: bool = False, chain: bool = False) -> dict:
    """eval.json of the seed's run, running (or resuming) the pipeline's `driver_runs` whose stages are not all
    evaluated yet, or always with `rejudge` (the driver judges again every stage judged on another evaluation set
    than the config's, and skips the training it finds complete)."""
    eval_path = run_dir / "eval.json"
    runs = driver_runs(stages, chain)
    for run in runs:
        wanted = [s for s in run if s in EVALUATED]
        results = json.loads(eval_path.read_text()) if eval_path.exists() else {}
        if not rejudge and all("scores" in results.get(s, {}) for s in wanted):
            print(f"seed {seed}: reusing {run_dir} ({', '.join(wanted)} evaluated)", flush=True)
            continue
        check_starts(seed, results, expected_starts([run]))  # before training on top of a run of another chain
        cmd = [sys.executable, "-m", "rayllama.driver", config, f"seed={seed}", f"run_dir={run_dir}",
               f"stages=[{','.join(run)}]", f"eval.split={split}", "ray.include_dashboard=false", *overrides]
        log = run_dir.with_suffix(".log")
        print(f"seed {seed}: running {' '.join(cmd[2:])} (log {log})", flush=True)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        with open(log, "a") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"}).returncode
        if rc != 0:
            raise SystemExit(f"rlhf_evidence: seed {seed}'s run failed (exit {rc}); see {log}")
        print(f"seed {seed}: done in {time.time() - t0:.0f} s", flush=True)
    results = json.loads(eval_path.read_text())
    unrecorded = check_starts(seed, results, expected_starts(runs))
    if unrecorded:
        print(f"seed {seed}: the run did not record where {', '.join(unrecorded)} started (trained before the "
              "pipeline recorded it); read as these stages ask", flush=True)
    return results


def evidence(per_seed: dict[int, dict], stages: list[str],
             records: dict[int, list[PromptRecord]] | None = None) -> dict:
    """Per stage and metric: pooled mean and interval; per later stage and metric: paired change vs SFT, per seed
    and pooled. With the seeds' evaluation `records` (or the labels eval.json keeps), the bootstrap draws units:
    safe tasks, unsafe and borderline topics, GAtt instructions (`rayllama.eval.item_clusters`), each with its
    items in every seed; otherwise every item alone within its seed."""
    evaluated = [s for s in stages if s in EVALUATED and all("scores" in r.get(s, {}) for r in per_seed.values())]
    labels = {(seed, stage): clusters_of(r[stage], (records or {}).get(seed, []))
              for seed, r in per_seed.items() for stage in evaluated}
    levels: dict[str, dict] = {}
    for stage in evaluated:
        levels[stage] = {}
        for m in METRICS:
            groups = [r[stage]["scores"].get(m, []) for r in per_seed.values()]
            if any(groups):
                ci = stratified_bootstrap(groups, clusters=[labels[seed, stage].get(m) for seed in per_seed])
                levels[stage][m] = dict(zip(("mean", "lo", "hi"), ci), n=sum(map(len, groups)))
    changes: dict[str, dict] = {}
    base = "sft"
    for stage in [s for s in evaluated if EVALUATED.index(s) > EVALUATED.index(base)]:
        changes[stage] = {}
        for m in METRICS:
            diffs = {}
            for seed, r in per_seed.items():
                before, after = r[base]["scores"].get(m, []), r[stage]["scores"].get(m, [])
                if before and len(before) == len(after):
                    diffs[seed] = [b - a for a, b in zip(before, after)]
            if diffs:
                cl = {seed: labels[seed, stage].get(m) for seed in diffs}
                pooled = stratified_bootstrap(list(diffs.values()), clusters=list(cl.values()))
                changes[stage][m] = {
                    "pooled": dict(zip(("mean", "lo", "hi"), pooled), n=sum(map(len, diffs.values())),
                                   clusters=cluster_count(list(diffs.values()), list(cl.values()))),
                    "per_seed": {str(s): dict(zip(("mean", "lo", "hi"), stratified_bootstrap([d], clusters=[cl[s]])))
                                 for s, d in diffs.items()},
                }
    by_type: dict[str, dict] = {}  # where a change in helpfulness comes from: per safe task type
    types = {seed: [t["type"] for t in safe_tasks((records or {}).get(seed, []))] for seed in per_seed}
    for stage in changes:
        for m in TYPED_METRICS:
            cells: dict[str, dict] = {}
            for t in sorted({t for ts in types.values() for t in ts}):
                groups, units = [], []
                for seed, r in per_seed.items():
                    before, after = r[base]["scores"].get(m, []), r[stage]["scores"].get(m, [])
                    if len(before) == len(after) == len(types[seed]):
                        keep = [i for i, ty in enumerate(types[seed]) if ty == t]
                        groups.append([after[i] - before[i] for i in keep])
                        named = labels.get((seed, stage), {}).get(m)
                        units.append([named[i] for i in keep] if named and len(named) == len(before) else None)
                if any(groups):
                    cells[t] = dict(zip(("mean", "lo", "hi"), stratified_bootstrap(groups, units)),
                                    n=sum(map(len, groups)))
            if cells:
                by_type.setdefault(stage, {})[m] = cells
    return {"levels": levels, "changes_vs_sft": changes, "changes_by_safe_type": by_type,
            "clustered": any(labels.values())}


def _interval(x: dict) -> str:
    return f"{x['mean']:.3f} [{x['lo']:.3f}, {x['hi']:.3f}]"


def _signed(x: dict) -> str:
    star = "*" if x["lo"] > 0 or x["hi"] < 0 else " "
    return f"{x['mean']:+.3f} [{x['lo']:+.3f}, {x['hi']:+.3f}]{star}"


def table(result: dict, seeds: list[int], split: str = "test") -> str:
    how = "; units resampled: safe tasks, unsafe and borderline topics, GAtt instructions, each in every world" \
        if result.get("clustered") else ""
    lines = [f"gold metrics on the {split} split, {len(seeds)} world seed(s) {seeds}: mean [95% interval{how}]"]
    stages = list(result["levels"])
    metrics = [m for m in METRICS if any(m in result["levels"][s] for s in stages)]
    width = max(map(len, metrics)) + 2
    lines.append("metric".ljust(width) + "".join(s.rjust(24) for s in stages))
    for m in metrics:
        cells = "".join((_interval(result["levels"][s][m]) if m in result["levels"][s] else "-").rjust(24)
                        for s in stages)
        lines.append(m.ljust(width) + cells)
    lines.append("")
    lines.append(f"change vs SFT, paired on the same {split} items (* = interval excludes 0)")
    for stage, by_metric in result["changes_vs_sft"].items():
        for m, c in by_metric.items():
            seeds_txt = ", ".join(f"seed {s} {v['mean']:+.3f}" for s, v in c["per_seed"].items())
            n, k = c["pooled"]["n"], c["pooled"].get("clusters", c["pooled"]["n"])
            size = f"n={n}" if k == n else f"n={n} in {k} clusters"
            lines.append(f"  {stage} - sft  {m.ljust(width)} pooled {_signed(c['pooled'])} ({size}; {seeds_txt})")
    for stage, by_metric in result.get("changes_by_safe_type", {}).items():
        lines.append("")
        lines.append(f"{stage} - sft by safe task type, pooled (n per type)")
        for m, cells in by_metric.items():
            lines.append(f"  {m}: " + "; ".join(f"{t} {_signed(c)} ({c['n']})" for t, c in cells.items()))
    return "\n".join(lines)


def plot(result: dict, per_seed: dict[int, dict], path: Path, split: str = "test") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(result["levels"])
    shown = [m for m in ("gold_helpfulness", "gold_helpfulness_sampled", "refusal_rate_unsafe",
                         "over_refusal_borderline") if any(m in result["levels"][s] for s in stages)]
    gatt = "gatt" in stages
    fig, axes = plt.subplots(1, 2 if gatt else 1, figsize=(11 if gatt else 6, 4), squeeze=False)
    ax = axes[0][0]
    for i, m in enumerate(shown):
        xs = [j + (i - len(shown) / 2) * 0.08 for j in range(len(stages))]
        pts = [result["levels"][s].get(m) for s in stages]
        ax.errorbar(xs, [p["mean"] if p else math.nan for p in pts],
                    yerr=[[p["mean"] - p["lo"] if p else 0 for p in pts], [p["hi"] - p["mean"] if p else 0 for p in pts]],
                    marker="o", capsize=3, label=m)
    ax.set_xticks(range(len(stages)), stages)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{split} split, 95% intervals")
    ax.legend(fontsize=7)
    if gatt:
        ax = axes[0][1]
        for stage in stages:
            turns = sorted({int(k.rsplit("_", 1)[1]) for r in per_seed.values() for k in r.get(stage, {})
                            if k.startswith("adherence_turn_") and k.rsplit("_", 1)[1].isdigit()})
            if turns:
                ys = [sum(r[stage].get(f"adherence_turn_{t}", math.nan) for r in per_seed.values()) / len(per_seed)
                      for t in turns]
                ax.plot(turns, ys, marker="o", label=stage)
        ax.set_xlabel("turn")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title("GAtt adherence by turn (held-out instructions)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--split", choices=("test", "dev"), default="test",
                    help="the split the runs are judged on: test (to report) or dev (to choose settings on)")
    ap.add_argument("--runs", type=Path, help="where the seeds' runs go (default runs/evidence, for dev "
                                              "runs/evidence-dev)")
    ap.add_argument("--config", default="configs/ppo.yaml")
    ap.add_argument("--stages", nargs="+", default=["tokenizer", "pretrain", "sft", "reward", "rejection", "ppo",
                                                    "gatt"])
    ap.add_argument("--reuse", nargs="*", default=[], metavar="SEED=RUN_DIR")
    ap.add_argument("--out", type=Path, help="OUT.json and OUT.png (default bench/results/rlhf_evidence, for dev "
                                             "rlhf_evidence-dev)")
    ap.add_argument("--rejudge", action="store_true",
                    help="run the driver on every seed's run even when its eval.json is complete: stages judged on "
                         "another evaluation set (e.g. before world.eval_* changed) are judged again")
    ap.add_argument("--chain", action="store_true",
                    help="PPO from the rejection-sampling model, as listed (LLaMA 2's chain); default: rejection "
                         "sampling and PPO each from SFT")
    ap.add_argument("overrides", nargs="*", help="key=value for every seed's run")
    args = ap.parse_args(argv)
    suffix = "" if args.split == "test" else "-dev"
    runs = args.runs or ROOT / "runs" / f"evidence{suffix}"
    out = args.out or ROOT / "bench" / "results" / f"rlhf_evidence{suffix}"
    if "sft" not in args.stages:
        ap.error("--stages must include sft: every change is measured against it")
    reuse = {}
    for item in args.reuse:
        seed, sep, path = item.partition("=")
        if not sep or not seed.isdigit():
            ap.error(f"--reuse {item!r}: write SEED=RUN_DIR, e.g. 0=runs/tiny")
        reuse[int(seed)] = Path(path).absolute()
    run_dirs = {s: reuse.get(s, runs.absolute() / f"seed{s}") for s in args.seeds}
    per_seed = {s: run_seed(s, run_dirs[s], args.config, args.stages, args.overrides, args.split, args.rejudge,
                            args.chain) for s in args.seeds}
    for s, r in per_seed.items():
        splits = {v.get("eval_split") for k, v in r.items() if isinstance(v, dict) and "scores" in v}
        if splits != {args.split}:
            print(f"rlhf_evidence: seed {s}'s run was judged on {sorted(map(str, splits))}, not the {args.split} "
                  f"split; rerun it with eval.split={args.split} (or pass --split to match)", file=sys.stderr)
            return 2
        sets = {k: r[k].get("eval_set_id") or "unnamed" for k in args.stages if "scores" in r.get(k, {})}
        if len(set(sets.values())) > 1:
            named = ", ".join(f"{k} {v}" for k, v in sets.items())
            print(f"rlhf_evidence: seed {s}'s stages were judged on different evaluation sets ({named}); pass "
                  "--rejudge to judge them again on the config's", file=sys.stderr)
            return 2
    result = evidence(per_seed, args.stages, {s: eval_records(d, args.split) for s, d in run_dirs.items()})
    print(table(result, args.seeds, args.split))
    out.parent.mkdir(parents=True, exist_ok=True)
    out_json, out_png = out.with_suffix(".json"), out.with_suffix(".png")
    starts = expected_starts(driver_runs(args.stages, args.chain))
    print("started from: " + ", ".join(f"{k} {v}" for k, v in starts.items()))
    out_json.write_text(json.dumps({"seeds": args.seeds, "split": args.split, "stages": args.stages,
                                    "started_from": starts,
                                    "config": args.config, "overrides": args.overrides, **result}, indent=1))
    plot(result, per_seed, out_png, args.split)
    print(f"wrote {out_json} and {out_png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
