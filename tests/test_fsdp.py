"""FSDP2 in the Ray Train loop: 2 sharded ranks (gloo, CPU) equal one plain process on the union batch, for
pretraining, SFT (blocks kept gathered from forward to backward) and reward training; activation checkpointing changes nothing; bf16 stays near fp32; sharded
checkpoints resume on 1 or 2 ranks; the final model is a complete HF directory, sharded past the size limit."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from rayllama.checkpoint import load_model, save_model
from rayllama.config import OptimConfig, ScalingSection
from rayllama.dist.fsdp import init_weights
from rayllama.model import ModelConfig, ScalarHeadModel, Transformer
from rayllama.train.data import save_tensors
from rayllama.train.loop import OBJECTIVES, TrainJob, example_order, run_train_job
from rayllama.train.optim import build_optimizer, build_scheduler

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_dim=64, max_seq_len=32)
STEPS = 20
OPTIM = OptimConfig(lr=3e-3, warmup_steps=3, final_lr_ratio=0.1)


def _lm_data(n: int, width: int, seed: int, answer_only: bool) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(width // 2, width + 1, (n,), generator=g)
    tokens = torch.randint(3, CFG.vocab_size, (n, width), generator=g)
    loss_mask = torch.rand(n, width, generator=g) < (0.4 if answer_only else 1.0)  # SFT: answers only
    for i, n_i in enumerate(lengths.tolist()):
        tokens[i, n_i:] = 0
        loss_mask[i, n_i:] = False
    loss_mask[:, 0] = False
    return {"tokens": tokens, "loss_mask": loss_mask, "lengths": lengths}


def _pref_data(n: int, width: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for side in ("chosen", "rejected"):
        lengths = torch.randint(width // 2, width + 1, (n,), generator=g)
        tokens = torch.randint(3, CFG.vocab_size, (n, width), generator=g)
        for i, n_i in enumerate(lengths.tolist()):
            tokens[i, n_i:] = 0
        out[side], out[f"{side}_len"] = tokens, lengths
    out["rating"] = torch.randint(0, 4, (n,), generator=g)
    out["margin"] = torch.tensor([1.0, 2 / 3, 1 / 3, 0.0])[out["rating"]]
    return out


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    """A causal checkpoint to start SFT and reward training from."""
    path = tmp_path_factory.mktemp("init") / "model"
    model = Transformer(CFG)
    init_weights(model, seed=11)
    save_model(path, model, CFG)
    return path


def _job(tmp_path, objective: str, data: dict, init=None, **kw) -> TrainJob:
    save_tensors(tmp_path / "data.pt", data)
    fields = dict(stage=f"fsdp-{objective}", objective=objective, data_path=str(tmp_path / "data.pt"),
                  output=str(tmp_path / "model"), log_dir=str(tmp_path / "logs"), optim=OPTIM, total_steps=STEPS,
                  batch_size=8, micro_batch_size=2, model=CFG if init is None else None,
                  init=None if init is None else str(init), seed=5, log_every=1, checkpoint_every=1000)
    fields.update(kw)
    return TrainJob(**fields)


def _logged(job: TrainJob) -> list[dict]:
    rows = [json.loads(x) for x in open(f"{job.log_dir}/metrics.jsonl")]
    return [r for r in rows if "grad_norm" in r]


def _plain_run(job: TrainJob, data: dict) -> tuple[list[float], list[float], dict]:
    """The oracle: one process, a plain module, the whole union batch of each step in one forward; mean loss over
    the batch's targets, clip, AdamW, the job's schedule. Returns per-step losses, grad norms, final weights."""
    if job.init is None:
        model = ScalarHeadModel(CFG) if job.objective == "reward" else Transformer(CFG)
        init_weights(model, job.seed)
    else:
        model, _, _ = load_model(job.init)
        if job.objective == "reward":
            model = ScalarHeadModel.from_transformer(model)  # zero head, as the sharded load gives
    opt = build_optimizer(model, job.optim)
    sched = build_scheduler(opt, job.optim, job.total_steps)
    n = len(data["tokens"] if "tokens" in data else data["chosen"])
    order = example_order(n, job.batch_size, job.total_steps, job.seed)
    losses, norms = [], []
    for step in range(job.total_steps):
        idx = order[step * job.batch_size:(step + 1) * job.batch_size]
        loss_sum, count = OBJECTIVES[job.objective](model, data, idx, torch.device("cpu"))
        (loss_sum / count).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), job.optim.grad_clip)))
        losses.append(float(loss_sum.detach()) / count)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return losses, norms, model.state_dict()


def _assert_equal_runs(job: TrainJob, data: dict, rtol: float = 1e-5) -> None:
    losses, norms, state = _plain_run(job, data)
    logged = _logged(job)
    assert [r["step"] for r in logged] == list(range(1, STEPS + 1))
    for step, (row, loss, norm) in enumerate(zip(logged, losses, norms, strict=True), start=1):
        assert row["loss"] == pytest.approx(loss, rel=rtol), f"step {step}: loss {row['loss']} vs {loss}"
        assert row["grad_norm"] == pytest.approx(norm, rel=rtol), f"step {step}: grad norm {row['grad_norm']} vs {norm}"
    trained, _, meta = load_model(job.output)
    assert meta["step"] == STEPS
    for name, value in trained.state_dict().items():
        torch.testing.assert_close(value, state[name], rtol=0, atol=1e-5, msg=f"{name} differs")
    assert losses[-1] < losses[0]  # it learned something: the comparison is not between two frozen models


FSDP2 = ScalingSection(num_workers=2, cpus_per_worker=0.5, strategy="fsdp")


def test_fsdp_pretraining_on_two_ranks_equals_one_process_over_20_steps(ray_session, tmp_path):
    data = _lm_data(48, 12, seed=1, answer_only=False)
    job = _job(tmp_path, "lm", data)
    run_train_job(job, FSDP2)
    _assert_equal_runs(job, data)


def test_fsdp_sft_and_reward_jobs_at_once_each_equal_one_process_over_20_steps(ray_session, tmp_path, init_dir,
                                                                              monkeypatch):
    """SFT from a checkpoint without resharding after forward (tiny.yaml's train.reshard_after_forward: false; the
    other tests reshard) and a reward model, each its own Ray Train run of 2 FSDP2 ranks, trained at once by
    run_train_jobs (the reward stage's two RMs): each equals its one-process oracle."""
    from rayllama.train import loop

    sft_data, rm_data = _lm_data(48, 12, seed=2, answer_only=True), _pref_data(48, 12, seed=3)
    (tmp_path / "sft").mkdir()
    (tmp_path / "rm").mkdir()
    sft = _job(tmp_path / "sft", "lm", sft_data, init=init_dir, reshard_after_forward=False)
    rm = _job(tmp_path / "rm", "reward", rm_data, init=init_dir)
    spans = []  # (start, end) of each run_train_job call

    def timed(job, scaling):
        start = time.monotonic()
        result = run_train_job(job, scaling)
        spans.append((start, time.monotonic()))
        return result

    monkeypatch.setattr(loop, "run_train_job", timed)
    assert loop.holds_worker_groups(FSDP2, 2) and not loop.holds_worker_groups(FSDP2, 3)  # the session's 2 CPUs
    loop.run_train_jobs([sft, rm], FSDP2)
    (a0, a1), (b0, b1) = spans
    assert a0 < b1 and b0 < a1, spans  # the two runs overlapped: not the one-after-the-other fallback
    _assert_equal_runs(sft, sft_data)
    _assert_equal_runs(rm, rm_data)


def test_ddp_strategy_still_equals_one_process(ray_session, tmp_path):
    data = _lm_data(48, 12, seed=1, answer_only=False)
    job = _job(tmp_path, "lm", data, total_steps=STEPS)
    run_train_job(job, ScalingSection(num_workers=2, cpus_per_worker=0.5, strategy="ddp"))
    _assert_equal_runs(job, data)


# ---------------------------------------------------------------------------------------------- compute options


def test_activation_checkpointing_gives_identical_gradients():
    data = _lm_data(8, 16, seed=4, answer_only=False)
    grads = []
    for recompute in (False, True):
        model = Transformer(CFG)
        init_weights(model, seed=2)
        model.model.activation_checkpointing = recompute
        loss_sum, count = OBJECTIVES["lm"](model, data, torch.arange(8), torch.device("cpu"))
        (loss_sum / count).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), f"{name}: recomputed gradient differs"
    assert all(float(g.abs().sum()) > 0 for g in grads[1].values())  # every parameter got a gradient


def test_bf16_sft_stays_within_two_percent_of_fp32(ray_session, tmp_path, init_dir):
    """FSDP mixed precision: parameters and AdamW state fp32, blocks computed in bf16, gradients reduced in fp32.
    Tolerance: every step's loss within 2% of the fp32 run's, the last step's within 1% (bf16 keeps 8 bits of
    mantissa: ~0.4% per rounding)."""
    from rayllama.train.loop import run_train_jobs

    data = _lm_data(48, 12, seed=2, answer_only=True)
    jobs = {dtype: _job(tmp_path / dtype, "lm", data, init=init_dir, param_dtype=dtype, activation_checkpointing=True)
            for dtype in ("float32", "bfloat16")}
    run_train_jobs(list(jobs.values()), FSDP2)  # at once: two runs of their own (bits do not depend on it)
    fp32, bf16 = ([r["loss"] for r in _logged(job)] for job in jobs.values())
    assert len(fp32) == len(bf16) == STEPS
    for step, (a, b) in enumerate(zip(fp32, bf16, strict=True), start=1):
        assert b == pytest.approx(a, rel=0.02), f"step {step}: bf16 loss {b} vs fp32 {a}"
    assert bf16[-1] == pytest.approx(fp32[-1], rel=0.01)
    assert bf16 != fp32  # bf16 really computed in bf16


# ---------------------------------------------------------------------------------------------- sharded checkpoints


def _last_per_step(job: TrainJob) -> dict[int, dict]:
    return {r["step"]: r for r in _logged(job)}  # a resumed run logs again the steps after its checkpoint


def test_checkpoint_of_two_ranks_resumes_on_any_number_of_ranks_with_the_same_losses(ray_session, tmp_path):
    """A run of 2 ranks stops after step 12 (checkpoints at 5 and 10); two copies of its run directory resume at
    once, on 1 rank and on 2 ranks (DCP reshards): each logs the losses of an uninterrupted one-process run and ends
    with its weights."""
    import shutil
    import threading

    data = _lm_data(48, 12, seed=6, answer_only=False)
    straight = _job(tmp_path / "straight", "lm", data)
    losses, norms, state = _plain_run(straight, data)
    stopped = _job(tmp_path / "stopped", "lm", data, checkpoint_every=5, stop_after=12)
    run_train_job(stopped, FSDP2)  # checkpoints at steps 5 and 10 (sharded, 2 ranks), stops after step 12
    assert not (tmp_path / "stopped" / "model").exists()
    jobs = {}
    for workers in (1, 2):
        shutil.copytree(tmp_path / "stopped", tmp_path / f"on-{workers}")
        jobs[workers] = _job(tmp_path / f"on-{workers}", "lm", data, checkpoint_every=5)
    runs = [threading.Thread(target=run_train_job, args=(job, ScalingSection(num_workers=n, cpus_per_worker=0.5)))
            for n, job in jobs.items()]
    for run in runs:
        run.start()
    for run in runs:
        run.join(timeout=600)
    for workers, job in jobs.items():
        rows = [json.loads(x) for x in open(f"{job.log_dir}/metrics.jsonl")]
        assert [r["resumed_from_step"] for r in rows if "resumed_from_step" in r] == [10], workers
        logged = _last_per_step(job)
        assert sorted(logged) == list(range(1, STEPS + 1)), workers
        for step in range(1, STEPS + 1):
            assert logged[step]["loss"] == pytest.approx(losses[step - 1], rel=1e-5), f"{workers} ranks, step {step}"
            assert logged[step]["grad_norm"] == pytest.approx(norms[step - 1], rel=1e-5), f"{workers}: step {step}"
        trained, _, _ = load_model(job.output)
        for name, value in trained.state_dict().items():
            torch.testing.assert_close(value, state[name], rtol=0, atol=1e-5, msg=f"{workers} ranks: {name} differs")


def _train_worker_pids() -> list[int]:
    """PIDs of this machine's live Ray Train workers (Ray titles them `ray::RayTrainWorker...`)."""
    from pathlib import Path

    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if (proc / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return sorted(pids)


def test_a_sigkilled_train_worker_is_replaced_and_resumes_from_the_sharded_checkpoint(ray_session, tmp_path,
                                                                                      init_dir):
    """SFT on 2 FSDP ranks; one Ray Train worker is SIGKILLed after the first checkpoint; Ray Train restarts the
    worker group (scaling.max_failures), which resumes from the DCP checkpoint and ends with the weights of an
    uninterrupted one-process run."""
    import os
    import signal
    import threading
    import time

    data = _lm_data(48, 12, seed=2, answer_only=True)
    job = _job(tmp_path, "lm", data, init=init_dir, total_steps=60, checkpoint_every=10)
    losses, _, state = _plain_run(job, data)
    runner = threading.Thread(target=run_train_job,
                              args=(job, ScalingSection(num_workers=2, cpus_per_worker=0.5, max_failures=1)))
    runner.start()
    killed = None
    deadline = time.time() + 300
    while time.time() < deadline and runner.is_alive() and killed is None:
        steps = [r["step"] for r in _logged(job)] if os.path.exists(f"{job.log_dir}/metrics.jsonl") else []
        if list((tmp_path / "logs").glob("*/checkpoint_*")) and steps and max(steps) >= 15:
            workers = _train_worker_pids()
            if workers:
                killed = workers[-1]
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    runner.join(timeout=600)
    assert killed is not None, "training ended before a worker could be killed"
    assert not runner.is_alive()
    rows = [json.loads(x) for x in open(f"{job.log_dir}/metrics.jsonl")]
    resumed = [r["resumed_from_step"] for r in rows if "resumed_from_step" in r]
    assert len(resumed) == 1 and resumed[0] % 10 == 0 and resumed[0] >= 10, resumed
    logged = _last_per_step(job)
    assert logged[60]["loss"] == pytest.approx(losses[59], rel=1e-5)
    trained, _, meta = load_model(job.output)
    assert meta["step"] == 60
    for name, value in trained.state_dict().items():
        torch.testing.assert_close(value, state[name], rtol=0, atol=1e-5, msg=f"{name} differs")


KILLED_SAVE = """
import os, signal, sys, torch
import torch.distributed.checkpoint as dcp_api
from rayllama.dist import dcp
from rayllama.model import ModelConfig, Transformer
cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_dim=64, max_seq_len=32)
model = Transformer(cfg)
opt = torch.optim.AdamW(model.parameters())
model(torch.ones(1, 4, dtype=torch.long)).sum().backward()
opt.step()
dcp.atomic_save(sys.argv[1], {"model": (model, opt)}, {"step": 1})
real_save = dcp_api.save
def save_then_die(*args, **kwargs):
    real_save(*args, **kwargs)  # the shards are on disk; the marker and the swap are not
    os.kill(os.getpid(), signal.SIGKILL)
dcp_api.save = save_then_die
with torch.no_grad():
    for p in model.parameters():
        p.add_(1.0)
dcp.atomic_save(sys.argv[1], {"model": (model, opt)}, {"step": 2})
"""


def test_a_save_killed_midway_leaves_the_previous_sharded_checkpoint_loadable(tmp_path):
    import subprocess
    import sys

    target = tmp_path / "ckpt"
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(target)], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr  # it really died in the second save
    from rayllama.dist import dcp

    assert dcp.is_complete(target)
    assert not dcp.is_complete(tmp_path / ".ckpt.tmp")  # the torn save is not taken for a checkpoint
    model = Transformer(CFG)
    opt = torch.optim.AdamW(model.parameters())
    extra = dcp.load_train_state(target, {"model": (model, opt)})
    assert extra == {"step": 1}
    assert math.isfinite(float(sum(p.detach().abs().sum() for p in model.parameters())))
    assert all(float(p.abs().max()) < 0.9 for p in model.parameters() if p.ndim == 2)  # not the +1.0 weights
