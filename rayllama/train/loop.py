"""The one Ray Train (TorchTrainer) loop shared by pretraining, SFT and the reward models.

Driver side: `run_train_job(job, scaling)` builds a TorchTrainer (DDP over gloo on CPU, NCCL on GPU) and blocks
until it finishes. Worker side: `train_loop_per_worker` trains `job.objective` ("lm" or "reward") on the tensors at
`job.data_path`, reports a Ray Train checkpoint every `checkpoint_every` steps (model, optimizer, scheduler, step,
RNG; the data position is the step, because the example order is a pure function of (seed, step)), resumes from the
latest one when the same run directory is trained again, and rank 0 writes the final model atomically to
`job.output`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from rayllama.config import OptimConfig, ScalingSection
from rayllama.losses import margin_ranking_loss
from rayllama.model import ModelConfig
from rayllama.train.data import RATING_INDEX, num_examples
from rayllama.train.optim import build_optimizer, build_scheduler

RATING_NAMES = {v: k for k, v in RATING_INDEX.items()}


class TrainJobError(RuntimeError):
    """A training stage failed; the message says which stage and why."""


@dataclass
class TrainJob:
    stage: str  # names the run ("pretrain", "sft", "reward-helpfulness", ...)
    objective: str  # "lm" (next-token loss on loss_mask) | "reward" (margin ranking loss)
    data_path: str  # tensors from rayllama.train.data
    output: str  # final model directory, written atomically by rank 0
    log_dir: str  # metrics.jsonl + tensorboard/ + Ray Train checkpoints
    optim: OptimConfig
    total_steps: int
    batch_size: int  # examples per optimizer step over all workers
    micro_batch_size: int  # examples per worker forward pass
    eval_path: str | None = None  # held-out tensors of the same kind
    init: str | None = None  # checkpoint to start from; None = fresh model of shape `model`
    model: ModelConfig | None = None
    tokenizer_model: str | None = None  # copied into the output checkpoint
    checkpoint_every: int = 100
    eval_every: int = 0  # 0: evaluate at the end only
    log_every: int = 10
    seed: int = 0
    threads: int = 1
    device: str = "cpu"
    stop_after: int | None = None  # stop (without the final save) after this many steps: fault-injection tests


# ----------------------------------------------------------------------------------------------- data order


def example_order(n: int, batch_size: int, total_steps: int, seed: int) -> torch.Tensor:
    """Indices of the examples each step uses: one fresh permutation per epoch (seeded by seed + epoch),
    concatenated. Step s uses order[s * batch_size : (s + 1) * batch_size]; so the step *is* the data position."""
    needed = total_steps * batch_size
    perms = []
    for epoch in range(math.ceil(needed / n)):
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        perms.append(torch.randperm(n, generator=g))
    return torch.cat(perms)[:needed]


def rank_micro_batches(order: torch.Tensor, step: int, job: TrainJob, rank: int, world: int) -> list[torch.Tensor]:
    """This rank's contiguous 1/world share of the step's examples, cut into micro-batches."""
    step_idx = order[step * job.batch_size : (step + 1) * job.batch_size]
    per_rank = job.batch_size // world
    mine = step_idx[rank * per_rank : (rank + 1) * per_rank]
    return list(mine.split(job.micro_batch_size))


# ----------------------------------------------------------------------------------------------- objectives


def _mask_from_lengths(lengths: torch.Tensor, width: int) -> torch.Tensor:
    return (torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]).long()  # (B, T)


def lm_micro_loss(model, data: dict, idx: torch.Tensor, device) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over loss_mask positions, and the number of those positions."""
    lengths = data["lengths"][idx].to(device)
    width = int(lengths.max())
    tokens = data["tokens"][idx, :width].to(device)  # (B, T)
    targets_mask = data["loss_mask"][idx, 1:width].to(device)  # (B, T-1)
    attn = _mask_from_lengths(lengths, width)[:, :-1]
    logits = model(tokens[:, :-1], attention_mask=attn)  # (B, T-1, V)
    ce = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
    ce = ce.view_as(targets_mask) * targets_mask
    return ce.sum(), int(targets_mask.sum())


def reward_scores(model, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """r(x, y): the scalar head at the last real token of each right-padded row. (B,)"""
    width = int(lengths.max())
    values = model(tokens[:, :width], attention_mask=_mask_from_lengths(lengths, width))  # (B, T)
    return values.float().gather(1, (lengths - 1)[:, None]).squeeze(1)


def reward_micro_loss(model, data: dict, idx: torch.Tensor, device) -> tuple[torch.Tensor, int]:
    """Summed margin ranking loss -log(sigmoid(r_c - r_r - m)) over the micro-batch's pairs, and its size.
    Chosen and rejected go through one forward pass (concatenated) so DDP sees a single forward."""
    b = len(idx)
    tokens = torch.cat([data["chosen"][idx], data["rejected"][idx]]).to(device)  # (2B, T)
    lengths = torch.cat([data["chosen_len"][idx], data["rejected_len"][idx]]).to(device)
    scores = reward_scores(model, tokens, lengths)
    loss = margin_ranking_loss(scores[:b], scores[b:], data["margin"][idx].to(device))
    return loss * b, b


OBJECTIVES = {"lm": lm_micro_loss, "reward": reward_micro_loss}


# ----------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_lm(model, data: dict, device, batch: int = 32) -> dict:
    """Held-out mean next-token loss and perplexity over loss_mask positions."""
    model.eval()
    total, count = 0.0, 0
    for idx in torch.arange(num_examples(data)).split(batch):
        s, c = lm_micro_loss(model, data, idx, device)
        total, count = total + float(s), count + c
    model.train()
    loss = total / max(count, 1)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": count}


@torch.no_grad()
def evaluate_reward(model, data: dict, device, batch: int = 64) -> dict:
    """Held-out accuracy (r_c > r_r) per rating level and overall (LLaMA 2 Table 8 layout), reward mean/std."""
    model.eval()
    chosen, rejected = [], []
    for idx in torch.arange(num_examples(data)).split(batch):
        chosen.append(reward_scores(model, data["chosen"][idx].to(device), data["chosen_len"][idx].to(device)))
        rejected.append(reward_scores(model, data["rejected"][idx].to(device), data["rejected_len"][idx].to(device)))
    model.train()
    rc, rr = torch.cat(chosen).cpu(), torch.cat(rejected).cpu()
    correct = (rc > rr).float()
    out = {"accuracy": float(correct.mean()), "n_pairs": len(rc)}
    for idx, name in RATING_NAMES.items():
        sel = data["rating"] == idx
        out[f"accuracy_{name}"] = float(correct[sel].mean()) if sel.any() else float("nan")
        out[f"n_{name}"] = int(sel.sum())
    all_r = torch.cat([rc, rr])
    out["reward_mean"], out["reward_std"] = float(all_r.mean()), float(all_r.std())
    return out


EVALUATORS = {"lm": evaluate_lm, "reward": evaluate_reward}


# ----------------------------------------------------------------------------------------------- the worker loop


class MetricsWriter:
    """Rank 0's metrics: one JSON object per line in metrics.jsonl and the same scalars in TensorBoard."""

    def __init__(self, log_dir: str, stage: str):
        from torch.utils.tensorboard import SummaryWriter

        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self.stage = stage
        self.jsonl = open(Path(log_dir) / "metrics.jsonl", "a")
        self.tb = SummaryWriter(str(Path(log_dir) / "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        self.jsonl.write(json.dumps({"stage": self.stage, "step": step, "time": time.time(), **metrics}) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            if isinstance(v, int | float) and math.isfinite(v):
                self.tb.add_scalar(f"{self.stage}/{k}", v, step)
        self.tb.flush()

    def rewind(self, step: int) -> list[dict]:
        """Drop the rows whose step is > `step` (iterations a restored checkpoint does not hold: they are redone)
        and a torn last line (a kill mid-write); returns the rows kept. TensorBoard keeps its points."""
        self.jsonl.flush()
        path = Path(self.jsonl.name)
        kept: list[dict] = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and row.get("step", 0) <= step:
                kept.append(row)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
        self.jsonl.close()
        os.replace(tmp, path)  # atomic: a kill now leaves the old file or the new one
        self.jsonl = open(path, "a")
        return kept

    def close(self) -> None:
        self.jsonl.close()
        self.tb.close()


def _build_model(job: TrainJob):
    from rayllama.checkpoint import load_model
    from rayllama.model import ScalarHeadModel, Transformer

    if job.init is None:
        torch.manual_seed(job.seed)
        return (ScalarHeadModel if job.objective == "reward" else Transformer)(job.model), job.model
    model, cfg, meta = load_model(job.init)
    if job.objective == "reward" and not isinstance(model, ScalarHeadModel):
        torch.manual_seed(job.seed)
        model = ScalarHeadModel.from_transformer(model)
    return model, cfg


def _save_state(path: str, model, cfg, job: TrainJob, optimizer, scheduler, step: int, extra_meta: dict) -> None:
    from rayllama.checkpoint import save_model

    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": step,
        "torch_rng": torch.get_rng_state(),
    }
    meta = {"stage": job.stage, "step": step, **extra_meta}
    save_model(path, model, cfg, tokenizer_model=job.tokenizer_model, meta=meta, train_state=state)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point (runs on every worker)."""
    import ray.train
    import ray.train.torch
    from ray.experimental.tqdm_ray import tqdm

    from rayllama.checkpoint import load_train_state

    job: TrainJob = config["job"]
    torch.set_num_threads(job.threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if job.device == "cuda" else torch.device("cpu")

    model, model_cfg = _build_model(job)
    start_step = 0
    resume = ray.train.get_checkpoint()
    if resume is not None:  # Ray Train restored this run: continue from its latest checkpoint
        from rayllama.checkpoint import load_model

        with resume.as_directory() as d:
            restored, _, _ = load_model(d)
            model.load_state_dict(restored.state_dict())
            train_state = load_train_state(d)
    model = model.to(device)
    optimizer = build_optimizer(model, job.optim)
    scheduler = build_scheduler(optimizer, job.optim, job.total_steps)
    if resume is not None:
        optimizer.load_state_dict(train_state["optimizer"])
        scheduler.load_state_dict(train_state["scheduler"])
        torch.set_rng_state(train_state["torch_rng"])
        start_step = train_state["step"]
    ddp_model = ray.train.torch.prepare_model(model, move_to_device=False) if world > 1 else model
    plain = model  # the unwrapped module: what we save and evaluate

    data = torch.load(job.data_path)
    eval_data = torch.load(job.eval_path) if (job.eval_path and rank == 0) else None
    order = example_order(num_examples(data), job.batch_size, job.total_steps, job.seed)
    micro_loss = OBJECTIVES[job.objective]
    writer = MetricsWriter(job.log_dir, job.stage) if rank == 0 else None
    if writer and start_step:
        writer.write(start_step, {"resumed_from_step": start_step})
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    )
    bar = tqdm(total=job.total_steps, desc=job.stage, position=0) if rank == 0 else None
    if bar:
        bar.update(start_step)
    last_eval: dict = {}
    t0, window_items = time.perf_counter(), 0

    for step in range(start_step, job.total_steps):
        micro = rank_micro_batches(order, step, job, rank, world)
        # Normalise by the step's global count of targets (tokens or pairs), so that DDP's gradient average over
        # ranks and the micro-batch accumulation give exactly the gradient of the mean over the union batch.
        local_count = torch.tensor(
            [float(data["loss_mask"][idx, 1:].sum()) if job.objective == "lm" else float(len(idx)) for idx in micro]
        ).sum()
        global_count = local_count.clone().to(device)
        if world > 1:
            torch.distributed.all_reduce(global_count)
        loss_total = 0.0
        for i, idx in enumerate(micro):
            sync = contextlib.nullcontext() if (world == 1 or i == len(micro) - 1) else ddp_model.no_sync()
            with sync, autocast:
                loss_sum, _ = micro_loss(ddp_model, data, idx, device)
                loss = loss_sum * world / global_count
            loss.backward()
            loss_total += loss_sum.detach().item()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), job.optim.grad_clip)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window_items += int(local_count) * world
        done = step + 1
        if bar:
            bar.update(1)

        if writer and (done % job.log_every == 0 or done == job.total_steps):
            elapsed = time.perf_counter() - t0
            writer.write(
                done,
                {
                    "loss": loss_total / max(float(local_count), 1.0),
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "items_per_s": window_items / elapsed,
                },
            )
            t0, window_items = time.perf_counter(), 0
        if writer and eval_data is not None and job.eval_every and done % job.eval_every == 0:
            last_eval = EVALUATORS[job.objective](plain, eval_data, device)
            writer.write(done, last_eval)
        if job.stop_after is not None and done >= job.stop_after:
            break
        if done % job.checkpoint_every == 0 and done < job.total_steps:
            _report_checkpoint(plain, model_cfg, job, optimizer, scheduler, done, rank, {"loss": loss_total})

    finished = job.stop_after is None or job.stop_after >= job.total_steps
    if rank == 0 and finished:
        if eval_data is not None:
            last_eval = EVALUATORS[job.objective](plain, eval_data, device)
            writer.write(job.total_steps, last_eval)
        _save_state(job.output, plain.cpu(), model_cfg, job, optimizer, scheduler, job.total_steps, {"eval": last_eval})
    if writer:
        writer.close()
    if bar:
        bar.close()
    ray.train.report({"step": job.total_steps if finished else done, "finished": finished})


def _report_checkpoint(model, cfg, job, optimizer, scheduler, step: int, rank: int, metrics: dict) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            _save_state(os.path.join(tmp, "ckpt"), model, cfg, job, optimizer, scheduler, step, {})
            checkpoint = ray.train.Checkpoint.from_directory(os.path.join(tmp, "ckpt"))
        ray.train.report({"step": step, **metrics}, checkpoint=checkpoint)


# ----------------------------------------------------------------------------------------------- driver side


def run_train_job(job: TrainJob, scaling: ScalingSection) -> dict:
    """Run `job` on Ray Train with `scaling` workers; resume if this stage's run directory has a checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name="ray_train",
            storage_path=str(Path(job.log_dir).absolute()),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=0),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # Ray wraps worker errors; keep the first line and name the stage
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "WorkerGroupStartupTimeout" in type(e).__name__ or "start" in first.lower() and "timeout" in first.lower():
            raise TrainJobError(
                f"{job.stage}: could not place {scaling.num_workers} Ray Train workers x {resources}; "
                f"lower scaling.num_workers or scaling.cpus_per_worker"
            ) from e
        raise TrainJobError(f"{job.stage} failed: {first}") from e
    return dict(result.metrics or {})


def job_summary(job: TrainJob) -> dict:
    return {k: v for k, v in dataclasses.asdict(job).items() if k not in ("optim", "model")}
