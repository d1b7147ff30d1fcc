"""`python -m rayllama.report RUN_DIR`: the run report, runs/<name>/report.md with PNG plots in runs/<name>/report/.

Written from what the run left on disk (eval.json and every stage's metrics.jsonl), so it can be redrawn for any
run, finished or not; the driver writes it at the end of every run. Contents: the summary table (gold metrics per
stage), the reward models' accuracy per rating (LLaMA 2 Table 8 layout) and adherence by turn before and after
GAtt, as tables; plots of the loss curves per stage, reward / KL / response length per PPO iteration, reward-model
accuracy per rating, best-of-K (rejection sampling) and adherence by turn before and after GAtt. A plot whose
stage did not run is left out and the report says so. Every file is written to a temp name and renamed.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

RATINGS = ("significantly_better", "better", "slightly_better", "negligibly_better")
LOSS_KEYS = ("loss", "eval_loss")  # per Ray Train stage (pretrain, sft, reward-*, gatt rounds)
PPO_KEYS = (("reward/combined", "reward (logit R_c)"), ("kl", "KL(policy || reference) per response"),
            ("response_length", "response length (tokens)"))


@dataclass
class Report:
    tables: dict[str, str] = field(default_factory=dict)  # title -> fixed-width table
    plots: dict[str, Path] = field(default_factory=dict)  # title -> PNG
    missing: list[str] = field(default_factory=list)  # plots left out, with why


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; a torn last line (a run killed mid-write) is skipped."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def stage_logs(run: Path) -> dict[str, list[dict]]:
    """log name (pretrain, sft, reward-helpfulness, gatt-round-1, ppo, rejection) -> its metrics rows."""
    out = {}
    for path in sorted(run.glob("**/metrics.jsonl"), key=lambda p: p.stat().st_mtime):
        name = "-".join(path.parent.relative_to(run).parts)
        rows = read_jsonl(path)
        if rows:
            out[name] = rows
    return out


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` over the rows holding a finite number for it, the last row per step kept (a
    resumed stage rewrote them)."""
    by_step: dict[int, float] = {}
    for row in rows:
        v = row.get(key)
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            by_step[int(row.get("step", 0))] = float(v)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format="png", dpi=100)
    _pyplot().close(fig)
    os.replace(tmp, path)
    return path


def plot_losses(logs: dict[str, list[dict]], out: Path) -> Path | None:
    """One panel per Ray Train stage: training loss (and held-out loss where evaluated) against the step."""
    stages = [name for name, rows in logs.items() if series(rows, "loss")[0]]
    if not stages:
        return None
    plt = _pyplot()
    cols = min(3, len(stages))
    rows_n = math.ceil(len(stages) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.5 * cols, 3.2 * rows_n), squeeze=False)
    for ax, name in zip(axes.flat, stages):
        for key in LOSS_KEYS:
            x, y = series(logs[name], key)
            if x:
                ax.plot(x, y, "-" if key == "loss" else "o--", label=key)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(stages):]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, out)


def plot_ppo(rows: list[dict], out: Path) -> Path | None:
    """Reward, KL and response length per PPO iteration (three panels)."""
    if not series(rows, "reward/combined")[0]:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(PPO_KEYS), figsize=(13, 3.4))
    for ax, (key, label) in zip(axes, PPO_KEYS):
        x, y = series(rows, key)
        ax.plot(x, y, "-o", markersize=3)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("PPO iteration")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, out)


def plot_rm_accuracy(results: dict, out: Path) -> Path | None:
    """Held-out accuracy per rating level, one bar group per reward model (LLaMA 2 Table 8)."""
    kinds = [k for k in ("helpfulness", "safety") if f"rm_accuracy_{RATINGS[0]}" in results.get(f"reward-{k}", {})]
    if not kinds:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        r = results[f"reward-{kind}"]
        values = [r.get(f"rm_accuracy_{c}", float("nan")) for c in RATINGS] + [r.get("rm_accuracy", float("nan"))]
        ax.bar([j + i * width for j in range(len(values))], values, width, label=kind)
    ax.set_xticks([j + width * (len(kinds) - 1) / 2 for j in range(len(RATINGS) + 1)],
                  [c.replace("_", "\n") for c in RATINGS] + ["overall"], fontsize=8)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_ylim(0, 1)
    ax.set_ylabel("held-out accuracy")
    ax.set_title("reward models: accuracy per rating")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out)


def plot_best_of_k(curve_json: Path, out: Path) -> Path | None:
    """Max (solid) and median (dashed) composed reward against K, one colour per rejection iteration."""
    if not curve_json.exists():
        return None
    curves = json.loads(curve_json.read_text())
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    colours = plt.get_cmap("viridis")
    its = curves["iterations"]
    for n, c in enumerate(its):
        colour = colours(n / max(1, len(its) - 1))
        ax.plot(curves["ks"], c["max"], "-o", color=colour, label=f"iter {c['iteration']} max (T={c['temperature']:g})")
        ax.plot(curves["ks"], c["median"], "--", color=colour, label=f"iter {c['iteration']} median")
    ax.set_xscale("log", base=2)
    ax.set_xticks(curves["ks"], [str(k) for k in curves["ks"]])
    ax.set_xlabel("K (samples per prompt)")
    ax.set_ylabel("composed reward R_c")
    ax.set_title("best-of-K (LLaMA 2 Figure 7)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out)


def adherence(results: dict, stage: str) -> tuple[list[int], list[float]]:
    turns = sorted(int(k.rsplit("_", 1)[1]) for k in results.get(stage, {})
                   if k.startswith("adherence_turn_") and k.rsplit("_", 1)[1].isdigit())
    return turns, [results[stage][f"adherence_turn_{t}"] for t in turns]


def gatt_before(run: Path, results: dict) -> str | None:
    """The stage GAtt started from: the one before gatt in the run's stages that has adherence by turn."""
    stages = run_stages(run)
    before = stages[:stages.index("gatt")] if "gatt" in stages else [s for s in results if s != "gatt"]
    return next((s for s in reversed(before) if adherence(results, s)[0]), None)


def plot_adherence(results: dict, before: str | None, out: Path) -> Path | None:
    """Instruction adherence by turn, the policy before GAtt against after (LLaMA 2 Figure 9's question)."""
    if not adherence(results, "gatt")[0]:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for stage, style in ((before, "--o"), ("gatt", "-o")):
        if stage:
            ax.plot(*adherence(results, stage), style, label=f"{stage}" + (" (before GAtt)" if stage == before else ""))
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("dialogue turn")
    ax.set_ylabel("adherence to the system instruction")
    ax.set_title("adherence by turn, before and after GAtt")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out)


def run_stages(run: Path) -> list[str]:
    import yaml

    config = run / "config.yaml"
    return list((yaml.safe_load(config.read_text()) or {}).get("stages", [])) if config.exists() else []


def _with_interval(value, ci95) -> object:
    """A gold metric as "mean [lo, hi]" (its 95% bootstrap interval) when eval.json has one, else the value."""
    if ci95 and isinstance(value, float) and all(isinstance(x, float) and x == x for x in ci95):
        return f"{value:.3f} [{ci95[0]:.2f}, {ci95[1]:.2f}]"
    return value


def summary_table(results: dict, stages: list[str]) -> str:
    """The gold judge's and the reward models' headline metrics (pipeline.SUMMARY_KEYS, in that order), one row
    per stage of `stages` (reward: both models) and of earlier runs of the run dir, in the pipeline's order
    (config.STAGES), each gold metric with its 95% bootstrap interval; then each stage-to-stage change with its
    paired bootstrap interval (rayllama.eval.change_lines), so a run that continues an earlier one's SFT model
    (stages=[reward,ppo]) shows sft -> ppo."""
    from rayllama.config import STAGES
    from rayllama.eval import change_lines, format_table
    from rayllama.pipeline import SUMMARY_KEYS

    order = [x for s in stages for x in (("reward-helpfulness", "reward-safety") if s == "reward" else (s,))]
    order += [s for s in results if s not in order]
    order.sort(key=lambda s: STAGES.index(s.split("-")[0]) if s.split("-")[0] in STAGES else len(STAGES))
    rows = {s: {k: _with_interval(v, results[s].get(f"{k}_ci95")) for k, v in results.get(s, {}).items()
                if k in SUMMARY_KEYS} for s in order}
    rows = {s: r for s, r in rows.items() if r}
    if not rows:
        return ""
    table = format_table(rows, [k for k in SUMMARY_KEYS if any(k in r for r in rows.values())])
    changes = change_lines(results, order)
    return table + ("\n\nchanges between stages, paired 95% bootstrap intervals over the same prompts:\n"
                    + "\n".join(changes) if changes else "")


def summary_tables(run: Path, results: dict) -> dict[str, str]:
    """The tables the driver prints (and logs): the summary, the reward models per rating, adherence by turn."""
    from rayllama.gatt import adherence_table
    from rayllama.pipeline import reward_table

    tables = {}
    summary = summary_table(results, run_stages(run))
    if summary:
        tables["summary (gold judge and reward models, per stage)"] = summary
    if any(s.startswith("reward-") for s in results):
        tables["reward models: held-out accuracy per rating"] = reward_table(results)
    if adherence(results, "gatt")[0]:
        tables["adherence by turn, before and after GAtt"] = adherence_table(
            results, [s for s in (gatt_before(run, results), "gatt") if s])
    return tables


def build_report(run: str | Path) -> Report:
    """The tables and plots of the run at `run` (plots under run/report/)."""
    run = Path(run)
    results = json.loads((run / "eval.json").read_text()) if (run / "eval.json").exists() else {}
    logs = stage_logs(run)
    out = run / "report"
    report = Report(tables=summary_tables(run, results))
    plots = {
        "loss curves per stage": (lambda p: plot_losses(logs, p), "loss.png", "no Ray Train stage logged a loss"),
        "PPO: reward, KL and response length per iteration": (lambda p: plot_ppo(logs.get("ppo", []), p), "ppo.png",
                                                              "no PPO iterations in this run"),
        "reward models: accuracy per rating": (lambda p: plot_rm_accuracy(results, p), "rm_accuracy.png",
                                               "no reward-model evaluation in this run"),
        "best-of-K (rejection sampling)": (lambda p: plot_best_of_k(run / "rejection" / "best_of_k.json", p),
                                           "best_of_k.png", "no rejection sampling in this run"),
        "adherence by turn, before and after GAtt": (
            lambda p: plot_adherence(results, gatt_before(run, results), p), "adherence.png",
            "no GAtt in this run"),
    }
    for title, (draw, name, why) in plots.items():
        path = draw(out / name)
        if path is None:
            report.missing.append(f"{title}: {why}")
        else:
            report.plots[title] = path
    return report


def markdown(run: Path, report: Report) -> str:
    lines = [f"# Run report: {run.name}", "", f"Written from `{run}` (eval.json and every stage's metrics.jsonl) by "
             f"`python -m rayllama.report {run}`.", ""]
    for title, table in report.tables.items():
        lines += [f"## {title}", "", "```", table, "```", ""]
    for title, path in report.plots.items():
        lines += [f"## {title}", "", f"![{title}]({path.relative_to(run).as_posix()})", ""]
    if report.missing:
        lines += ["## Not in this run", "", *[f"- {m}" for m in report.missing], ""]
    return "\n".join(lines)


def write_report(run: str | Path) -> tuple[Path, Report]:
    """runs/<name>/report.md and its plots; returns the path and what it holds."""
    run = Path(run)
    report = build_report(run)
    path = run / "report.md"
    tmp = path.with_name(f".report.md.tmp-{os.getpid()}")
    tmp.write_text(markdown(run, report))
    os.replace(tmp, path)
    return path, report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: python -m rayllama.report RUN_DIR   (e.g. runs/tiny): writes RUN_DIR/report.md and its plots")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    run = Path(argv[0])
    if not (run / "eval.json").exists() and not list(run.glob("**/metrics.jsonl")):
        print(f"rayllama.report: error: {run} holds no eval.json or metrics.jsonl; pass a run directory such as "
              f"runs/tiny", file=sys.stderr)
        return 2
    path, report = write_report(run)
    for title, table in report.tables.items():
        print(f"{title}\n{table}\n")
    print(f"report: {path} ({len(report.plots)} plots in {run / 'report'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
