"""The run report (rayllama.report): report.md with every table and plot from a run dir's eval.json and
metrics.jsonl files; each PNG a readable image; and the driver writes it (with the summary table in driver.log)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rayllama.report import main as report_main
from rayllama.report import summary_table

ROOT = Path(__file__).resolve().parents[1]
PLOTS = ("loss.png", "ppo.png", "rm_accuracy.png", "best_of_k.png", "adherence.png")
RATINGS = ("significantly_better", "better", "slightly_better", "negligibly_better")


def jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def gold(helpfulness: float, adherence: list[float] | None = None) -> dict:
    out = {"gold_helpfulness": helpfulness, "gold_helpfulness_sampled": helpfulness - 0.05,
           "refusal_rate_unsafe": 0.8, "over_refusal_borderline": 0.1}
    for t, a in enumerate(adherence or [], 1):
        out[f"adherence_turn_{t}"] = a
    return out


def full_run(root: Path) -> Path:
    """A run dir holding what every stage writes (the shapes the pipeline and the RL loops write)."""
    from rayllama.rl.rejection import write_curve

    run = root / "run"
    run.mkdir()
    (run / "config.yaml").write_text(
        f"name: run\nrun_dir: {run}\nstages: [tokenizer, pretrain, sft, reward, rejection, ppo, gatt]\n")
    for log, n in (("pretrain", 30), ("sft", 12), ("reward/helpfulness", 8), ("reward/safety", 8),
                   ("gatt/round-1", 6), ("gatt/round-2", 6)):
        stage = log.replace("/", "-")
        jsonl(run / log / "metrics.jsonl", [{"stage": stage, "step": s, "loss": 3.0 / s, "lr": 1e-3} for s in
                                             range(1, n + 1)] + [{"stage": stage, "step": n, "eval_loss": 1.0}])
    jsonl(run / "ppo" / "metrics.jsonl", [{"stage": "ppo", "step": 0, "prompts": 64}] + [
        {"stage": "ppo", "step": i, "reward/combined": -1 + 0.1 * i, "kl": 0.02 * i, "response_length": 20 + i}
        for i in range(1, 9)])
    jsonl(run / "rejection" / "metrics.jsonl", [{"stage": "rejection", "step": 1, "reward/chosen": 0.5}])
    write_curve(run / "rejection", [{"ks": [1, 2, 4], "iteration": i, "temperature": 1.0,
                                     "max": [0.3 + i / 10, 0.5, 0.6], "median": [0.3, 0.3, 0.3]} for i in (1, 2)])
    results = {"pretrain": {"heldout_perplexity": 40.0, **gold(0.05)}, "sft": gold(0.15, [0.9, 0.6, 0.4, 0.3]),
               "rejection": gold(0.18), "ppo": {**gold(0.2, [0.9, 0.5, 0.3, 0.2]), "kl": 1.5},
               "gatt": gold(0.21, [0.95, 0.9, 0.85, 0.8])}
    for kind, acc in (("helpfulness", 0.7), ("safety", 0.8)):
        results[f"reward-{kind}"] = {"rm_accuracy": acc, **{f"rm_accuracy_{r}": acc - 0.05 * i
                                                            for i, r in enumerate(RATINGS)}}
    (run / "eval.json").write_text(json.dumps(results, sort_keys=True))
    return run


def assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.stat().st_size > 1000, path
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, (path, image.shape)
    assert image.std() > 0.01, f"{path} is blank"


def test_report_holds_every_table_and_plot(tmp_path, capsys):
    run = full_run(tmp_path)
    assert report_main([str(run)]) == 0
    out = capsys.readouterr().out
    md = (run / "report.md").read_text()
    for name in PLOTS:
        assert f"](report/{name})" in md, name
        assert_png(run / "report" / name)
    assert "Not in this run" not in md
    for title in ("summary", "reward models: held-out accuracy per rating", "adherence by turn"):
        assert title in md and title in out
    # the summary's rows in pipeline order, the same table on stdout as in report.md
    summary = md.split("## summary", 1)[1].split("```")[1]
    assert [line.split()[0] for line in summary.strip().splitlines()[2:]] == [
        "pretrain", "sft", "reward-helpfulness", "reward-safety", "rejection", "ppo", "gatt"]
    assert summary.strip() in out
    assert "sft (before GAtt)" not in md  # GAtt started from the stage before it: ppo
    assert not list(run.rglob("*.tmp-*"))


def test_a_partial_run_says_what_is_missing(tmp_path):
    run = full_run(tmp_path)
    for sub in ("rejection", "gatt"):
        import shutil

        shutil.rmtree(run / sub)
    results = json.loads((run / "eval.json").read_text())
    del results["gatt"], results["rejection"]
    (run / "eval.json").write_text(json.dumps(results))
    assert report_main([str(run)]) == 0
    md = (run / "report.md").read_text()
    assert "best_of_k.png" not in md and "adherence.png" not in md
    assert "- best-of-K (rejection sampling): no rejection sampling in this run" in md
    assert "- adherence by turn, before and after GAtt: no GAtt in this run" in md


def test_not_a_run_dir_is_one_line(tmp_path, capsys):
    assert report_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds no eval.json or metrics.jsonl" in err


def scrape_ray_metrics(proc: subprocess.Popen, lines: list[str], wanted: set[str], stage: str) -> dict[str, float]:
    """While the driver runs: read its output (into `lines`) up to the Ray metrics URL it logs, then poll that
    endpoint until every `wanted` gauge tagged with `stage` has a value (or the driver ends)."""
    import threading
    import urllib.request

    url: list[str] = []

    def pump() -> None:
        for line in proc.stdout:
            lines.append(line)
            if "Ray metrics (Prometheus): " in line:
                url.append(line.split("Ray metrics (Prometheus): ", 1)[1].strip())

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    found: dict[str, float] = {}
    while proc.poll() is None and set(found) != wanted:
        time.sleep(1)
        if not url:
            continue
        try:
            text = urllib.request.urlopen(url[0], timeout=5).read().decode()
        except OSError:
            continue
        for line in text.splitlines():
            name = line.split("{", 1)[0]
            if name in wanted and f'stage="{stage}"' in line:
                found[name] = float(line.rsplit(" ", 1)[1])
    proc.wait(timeout=600)
    reader.join(timeout=10)
    return found


@pytest.mark.slow
def test_driver_writes_the_report_and_logs_the_summary(tmp_path):
    """`python -m rayllama.driver` on a prebuilt run (tests/test_faults.py: stages [ppo], 60 tiny iterations, so
    that PPO outlasts several of Ray's 1 s metric reports: 6 iterations took under a second and the gauges first
    showed after the stage, a race CI lost once): while PPO runs, Ray's metrics endpoint shows the rayllama gauges
    with current values; at the end report.md holds the PPO plot and driver.log the summary table."""
    from test_faults import DRIVER_RUN, prebuild_run

    run = tmp_path / "run"
    prebuild_run(run)
    proc = subprocess.Popen([sys.executable, "-m", "rayllama.driver", str(ROOT / "configs" / "ppo.yaml"),
                             *DRIVER_RUN, "ppo.iterations=60", "ppo.checkpoint_every=30",
                             f"run_dir={run}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT,
                            env={**os.environ, "RAY_metrics_report_interval_ms": "1000"})  # Ray's default: 10 s
    lines: list[str] = []
    wanted = {"ray_rayllama_reward_combined", "ray_rayllama_kl", "ray_rayllama_weight_version",
              "ray_rayllama_timing_generate", "ray_rayllama_step"}
    gauges = scrape_ray_metrics(proc, lines, wanted, "ppo")
    out = "".join(lines)
    assert proc.returncode == 0, out[-3000:]
    assert set(gauges) == wanted, (gauges, out[-2000:])
    ppo_rows = [json.loads(line) for line in (run / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert gauges["ray_rayllama_weight_version"] in {r.get("weight_version") for r in ppo_rows}  # a real value
    assert 1 <= gauges["ray_rayllama_step"] <= 60

    md = (run / "report.md").read_text()
    assert "](report/ppo.png)" in md
    assert_png(run / "report" / "ppo.png")
    log = (run / "driver.log").read_text()
    summary = next(line for line in log.splitlines() if line.startswith("stage ") and "gold_helpfulness" in line)
    assert summary in md and "ppo " in log.split(summary, 1)[1]
    assert f"report: {run / 'report.md'}" in out


@pytest.mark.parametrize("argv", [["-h"], []])
def test_usage(argv, capsys):
    assert report_main(argv) == (0 if argv else 2)
    assert "usage: python -m rayllama.report RUN_DIR" in capsys.readouterr().out


def test_runtime_dependencies_cover_the_report_and_the_rejection_plot(tmp_path):
    """Without the dev extra (its packages blocked from import) the rejection stage's best_of_k.png, a
    MetricsWriter with the default report_to and the run report still work: matplotlib is a runtime dependency
    (pyproject.toml) and wandb / mlflow load only when report_to names them."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(d.startswith("matplotlib") for d in project["dependencies"])
    dev_only = {d.split("=")[0].split(">")[0].split("<")[0].split("[")[0].strip().replace("-", "_")
                for d in project["optional-dependencies"]["dev"]} - {"matplotlib"}
    dev_only = {{"mlflow_skinny": "mlflow"}.get(name, name) for name in dev_only}
    script = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {sorted(dev_only)!r}:
            raise ImportError(f'{{name}} is in the dev extra only')
sys.meta_path.insert(0, Block())
from pathlib import Path
from rayllama.rl.rejection import write_curve
from rayllama.report import main
from rayllama.train.loop import MetricsWriter
run = Path({str(tmp_path / "run")!r})
(run / "rejection").mkdir(parents=True)
(run / "config.yaml").write_text(f"name: run\\nrun_dir: {{run}}\\nstages: [rejection]\\n")
write_curve(run / "rejection", [{{"ks": [1, 2], "iteration": 1, "temperature": 1.0, "max": [0.1, 0.2],
                                  "median": [0.1, 0.1]}}])
writer = MetricsWriter(str(run / "rejection"), "rejection")
writer.write(1, {{"reward/chosen": 0.5, "loss": 1.0}})
writer.close()
assert main([str(run)]) == 0
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_png(tmp_path / "run" / "rejection" / "best_of_k.png")
    assert_png(tmp_path / "run" / "report" / "best_of_k.png")


def test_the_summary_follows_the_pipeline_order_when_a_run_continues_an_earlier_one():
    """A run of stages=[reward,ppo] on a run dir whose SFT stage an earlier driver judged (eval.json holds ppo
    before sft when ppo was judged again): rows and changes in the pipeline's order, sft -> ppo."""
    def judged(h):
        return {"gold_helpfulness": h, "gold_helpfulness_ci95": [h - 0.1, h + 0.1], "scores": {"gold_helpfulness": [h] * 4}}

    results = {"ppo": judged(0.2), "reward-helpfulness": {"rm_accuracy": 0.66}, "sft": judged(0.5)}
    table = summary_table(results, ["reward", "ppo"])
    rows = [line.split()[0] for line in table.splitlines()[2:] if line.strip() and not line.startswith(("-", "changes"))]
    assert rows[:3] == ["sft", "reward-helpfulness", "ppo"], table
    assert "gold_helpfulness: sft -> ppo -0.300" in table and "ppo -> sft" not in table
