"""Kill the driver during pretraining (SIGKILL to its whole process group), rerun the same command: the run
continues from the last Ray Train checkpoint instead of step 0, and finishes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rayllama.checkpoint import load_model

ROOT = Path(__file__).resolve().parents[1]

# A very small model and world so that the whole test takes about a minute. A step takes ~0.055 s here (2 ranks,
# a checkpoint every 25 steps) and the kill lands near step 50, so ~150 steps (~8 s) remain: the kill lands
# mid-training even if Ray's workers outlive the driver by a few seconds (with 60 steps they once finished the
# whole run before dying: killed_at == 60).
STEPS = 200
SMALL_RUN = [
    "stages=[tokenizer,pretrain]",
    "ray.include_dashboard=false",
    "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=128",
    "tokenizer.vocab_size=400", "tokenizer.max_train_chars=200000",
    f"pretrain.steps={STEPS}", "pretrain.checkpoint_every=25", "pretrain.log_every=5",
    "pretrain.batch_size=4", "pretrain.micro_batch_size=2", "pretrain.seq_len=32",
    "world.pretrain_world=200", "world.sft=40", "world.pref_helpfulness=40", "world.pref_safety=40",
    "world.pref_helpfulness_heldout=20", "world.pref_safety_heldout=20", "world.prompts=20", "world.gatt=4",
    "world.gatt_turns=2", "world.eval_safe=6", "world.eval_unsafe=2", "world.eval_borderline=2", "world.eval_gatt=1",
]


def _driver(run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "rayllama.driver", str(ROOT / "configs" / "pretrain.yaml"), f"run_dir={run_dir}",
         *SMALL_RUN],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "pretrain" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_killed_pretraining_resumes_from_its_last_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    proc = _driver(run_dir)
    deadline = time.time() + 300
    # wait until Ray Train has persisted a checkpoint and training went past it
    while time.time() < deadline and proc.poll() is None:
        ckpts = list((run_dir / "pretrain").glob("*/checkpoint_*"))  # Ray Train run <run>-pretrain
        steps = [m["step"] for m in _metrics(run_dir) if "loss" in m]
        if ckpts and steps and max(steps) >= 30:
            break
        time.sleep(0.5)
    assert proc.poll() is None, f"the driver ended before it could be killed:\n{proc.stdout.read()}"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started, without warning
    proc.wait()

    rerun = _driver(run_dir)
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out
    # without the dashboard Ray's state API is off, and Ray Train's placement-group cleaner said so once a second
    assert "Failed to query Ray Train Controller actor state" not in out
    metrics = _metrics(run_dir)
    first_resume = next(i for i, m in enumerate(metrics) if "resumed_from_step" in m)
    # the steps the killed run logged (its Ray workers may outlive the driver by a moment: count them too)
    killed_at = max(m["step"] for m in metrics[:first_resume] if "loss" in m)
    assert killed_at < STEPS
    resumed = [m["resumed_from_step"] for m in metrics if "resumed_from_step" in m]
    assert resumed and 25 <= resumed[0] <= killed_at and resumed[0] % 25 == 0, (resumed, killed_at)
    _, _, meta = load_model(run_dir / "pretrain" / "model")
    assert meta["step"] == STEPS
    # the resumed run logged steps after the checkpoint, never again from step 25
    logged_after = [m["step"] for m in _metrics(run_dir) if "loss" in m][-1]
    assert logged_after == STEPS
