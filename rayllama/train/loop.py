"""The one Ray Train (TorchTrainer) loop shared by pretraining, SFT and the reward models.

Driver side: `run_train_job(job, scaling)` builds a TorchTrainer (a process group over gloo on CPU, NCCL on GPU)
and blocks until it finishes; `run_train_jobs` runs independent jobs (the two reward models) at once when the
cluster holds their worker groups together. Worker side: `train_loop_per_worker` builds the model sharded with FSDP2
(`scaling.strategy: fsdp`, rayllama.dist.fsdp; or DDP replicas), trains `job.objective` ("lm" or "reward") on the
tensors at `job.data_path`, reports a Ray Train checkpoint every `checkpoint_every` steps (each rank's shards of
the model and AdamW state through torch.distributed.checkpoint, plus scheduler, step and RNG; the data position is
the step, because the example order is a pure function of (seed, step)), resumes from the latest one when the
same run directory is trained again (with any number of workers: DCP reshards), and writes the final model as a
complete Hugging Face directory to `job.output`, gathered one parameter at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from rayllama import storage
from rayllama.config import OptimConfig, ScalingSection
from rayllama.losses import margin_ranking_loss
from rayllama.model import ModelConfig
from rayllama.train.data import RATING_INDEX, num_examples
from rayllama.train.optim import build_optimizer, build_scheduler

RATING_NAMES = {v: k for k, v in RATING_INDEX.items()}
UPLOAD_EVERY_S = 30.0  # MetricsWriter on an object store: the longest a row waits for its upload


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
    strategy: str = "fsdp"  # fsdp (FSDP2 shards) | ddp (whole replicas); scaling.strategy
    param_dtype: str = "float32"  # compute dtype (FSDP mixed precision; parameters and AdamW state stay fp32)
    activation_checkpointing: bool = False
    reshard_after_forward: bool = True  # FSDP2: gather each block again in backward (train.reshard_after_forward)
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


def example_widths(data: dict, objective: str) -> torch.Tensor:
    """The padded width each example brings to a micro-batch: its length (lm), or the longer of its chosen and
    rejected responses (reward: both go through one forward, trimmed to the longest row). (N,) long."""
    if objective == "reward":
        return torch.maximum(data["chosen_len"], data["rejected_len"])
    return data["lengths"]


def _contiguous_groups(widths: list[int], groups: int, capacity: int) -> list[int]:
    """Cut `widths` (sorted longest first) into at most `groups` contiguous runs minimising the largest run's padded
    tokens (rows x its first, longest width), each at most `capacity`; returns the runs' sizes. Binary search on
    the bound, filling each run greedily (optimal for contiguous runs of a sorted list)."""

    def fill(bound: int) -> list[int]:
        sizes, i = [], 0
        while i < len(widths):
            take = max(1, min(bound // widths[i], len(widths) - i))
            sizes.append(take)
            i += take
        return sizes

    lo, hi = widths[0], max(capacity, widths[0])
    while lo < hi:
        mid = (lo + hi) // 2
        if len(fill(mid)) <= groups:
            hi = mid
        else:
            lo = mid + 1
    return fill(lo)


def rank_micro_batches(step_idx: torch.Tensor, widths: torch.Tensor, micro_batch_size: int, rank: int,
                       world: int) -> list[torch.Tensor]:
    """This rank's micro-batches of a step's examples `step_idx` (indices into `widths`), balanced by padded tokens
    (a micro-batch is trimmed to its longest row, so its cost is rows x that width).

    Every rank runs the same number of micro-batches as an even split would give (ceil(len(step_idx) / world /
    micro_batch_size): a sharded forward is a collective), but the step's examples are sorted by width and cut so
    that the busiest rank carries as few padded tokens as possible: short rows go many to a micro-batch, long ones
    few. A micro-batch never holds more padded tokens than micro_batch_size full-width rows (the memory an even
    split could need). The loss is normalised by the step's global target count, so the gradient is the same
    however the examples fall (up to float summation order)."""
    per_rank = len(step_idx) // world
    w = widths[step_idx]
    if bool((w == w[0]).all()):  # nothing to balance (pretraining's full rows): contiguous even shares
        return list(step_idx[rank * per_rank : (rank + 1) * per_rank].split(micro_batch_size))
    per_rank_micro = math.ceil(per_rank / micro_batch_size)
    n_groups = world * per_rank_micro
    sorted_w, perm = torch.sort(w, descending=True, stable=True)
    sorted_idx, sorted_w = step_idx[perm], sorted_w.tolist()
    sizes = _contiguous_groups(sorted_w, n_groups, micro_batch_size * int(widths.max()))
    while len(sizes) < n_groups:  # fewer runs than micro-batches: halve the run with the most rows
        i = max(range(len(sizes)), key=lambda j: sizes[j])
        sizes[i : i + 1] = [sizes[i] - sizes[i] // 2, sizes[i] // 2]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    cost = [sizes[i] * sorted_w[starts[i]] for i in range(len(sizes))]
    load, mine = [0] * world, [[] for _ in range(world)]
    for g in sorted(range(len(sizes)), key=lambda j: -cost[j]):  # the costliest first, to the least-loaded rank
        r = min((r for r in range(world) if len(mine[r]) < per_rank_micro), key=lambda r: load[r])
        load[r] += cost[g]
        mine[r].append(sorted_idx[starts[g] : starts[g] + sizes[g]])
    return mine[rank]


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
    if bool(targets_mask.all()):  # pretraining: every position is a target
        logits = model(tokens[:, :-1], attention_mask=attn).flatten(0, 1)  # (B * (T-1), V)
        targets = tokens[:, 1:].flatten()
    else:  # the LM head on the target positions only (SFT: the answers)
        logits = model(tokens[:, :-1], attention_mask=attn, logits_at=targets_mask)  # (N, V)
        targets = tokens[:, 1:][targets_mask]
    return F.cross_entropy(logits.float(), targets, reduction="sum"), int(targets_mask.sum())


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


def _eval_batches(n: int, batch: int) -> list[torch.Tensor]:
    """This rank's evaluation batches: a contiguous 1/world share of the n examples, cut into the same number of
    batches on every rank (a sharded model's forward is a collective, so every rank must run as many)."""
    from rayllama.dist.fsdp import rank, world_size

    world = world_size()
    share = torch.arange(n).tensor_split(world)[rank()]
    count = max(1, math.ceil(math.ceil(n / world) / batch))
    # an empty piece (fewer examples than batches here) runs example 0 and is dropped: forwards stay matched
    return [p if len(p) else torch.zeros(0, dtype=torch.long) for p in share.tensor_split(count)]


def _gather(values: torch.Tensor) -> torch.Tensor:
    """Concatenation of every rank's `values` in rank order (one process: values)."""
    from rayllama.dist.fsdp import world_size

    if world_size() == 1:
        return values
    parts: list = [None] * world_size()
    torch.distributed.all_gather_object(parts, values.cpu())
    return torch.cat(parts)


@torch.no_grad()
def evaluate_lm(model, data: dict, device, batch: int = 32) -> dict:
    """Held-out mean next-token loss and perplexity over loss_mask positions (every rank evaluates its share)."""
    model.eval()
    sums = []
    for idx in _eval_batches(num_examples(data), batch):
        s, c = lm_micro_loss(model, data, idx if len(idx) else torch.zeros(1, dtype=torch.long), device)
        if len(idx):
            sums.append(torch.tensor([float(s), float(c)], dtype=torch.float64))
    model.train()
    total, count = _gather(torch.stack(sums) if sums else torch.zeros(0, 2, dtype=torch.float64)).sum(0).tolist()
    loss = total / max(count, 1)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": int(count)}


@torch.no_grad()
def evaluate_reward(model, data: dict, device, batch: int = 64) -> dict:
    """Held-out accuracy (r_c > r_r) per rating level and overall (LLaMA 2 Table 8 layout), reward mean/std
    (every rank scores its share)."""
    model.eval()
    chosen, rejected = [], []
    for idx in _eval_batches(num_examples(data), batch):
        run = idx if len(idx) else torch.zeros(1, dtype=torch.long)
        tokens = torch.cat([data["chosen"][run], data["rejected"][run]]).to(device)
        lengths = torch.cat([data["chosen_len"][run], data["rejected_len"][run]]).to(device)
        scores = reward_scores(model, tokens, lengths).cpu()
        if len(idx):
            chosen.append(scores[:len(idx)])
            rejected.append(scores[len(idx):])
    model.train()
    rc = _gather(torch.cat(chosen) if chosen else torch.zeros(0))
    rr = _gather(torch.cat(rejected) if rejected else torch.zeros(0))
    correct = (rc > rr).float()
    out = {"accuracy": float(correct.mean()), "n_pairs": len(rc)}
    for idx, name in RATING_NAMES.items():
        sel = data["rating"] == idx
        out[f"accuracy_{name}"] = float(correct[sel].mean()) if sel.any() else float("nan")
        out[f"n_{name}"] = int(sel.sum())
    all_r = torch.cat([rc, rr])
    out["reward_mean"], out["reward_std"] = float(all_r.mean()), float(all_r.std())
    out.update(accuracy_per_source(correct, data))
    return out


def accuracy_per_source(correct: torch.Tensor, data: dict) -> dict:
    """Held-out accuracy per data source (user data with more than one preference source), by name."""
    names = data.get("source_names") or []
    if len(names) < 2:
        return {}
    return {f"accuracy_source/{name}": float(correct[data["source"] == i].mean())
            for i, name in enumerate(names) if (data["source"] == i).any()}


EVALUATORS = {"lm": evaluate_lm, "reward": evaluate_reward}


# ----------------------------------------------------------------------------------------------- the worker loop


class MetricsWriter:
    """Rank 0's metrics, the one place every stage's figures pass through: one JSON object per line in
    metrics.jsonl, and the finite scalars to the run's `report_to` trackers (TensorBoard by default, wandb,
    MLflow) and, while Ray runs, to Ray metrics (rayllama.trackers). `total_steps` makes Ray's progress gauge."""

    def __init__(self, log_dir: str, stage: str, total_steps: int | None = None, jsonl: bool = True):
        from rayllama.trackers import RayMetrics, open_trackers

        # an object-store log_dir: the files are written in this node's scratch copy; metrics.jsonl is uploaded
        # at most every UPLOAD_EVERY_S while rows come (the whole file each time: not on every row), by `sync`
        # (the loops call it before each checkpoint, so the store holds every row before one) and at close;
        # TensorBoard's files at close. A resumed writer starts from the store's copy.
        self.remote = log_dir if storage.is_uri(log_dir) else None
        self.uploaded_at = 0.0
        local = storage.cache_dir("logs") / storage.key_of(log_dir) if self.remote else Path(log_dir)
        local.mkdir(parents=True, exist_ok=True)
        if self.remote and jsonl:
            remote_jsonl = storage.join(self.remote, "metrics.jsonl")
            (local / "metrics.jsonl").write_bytes(storage.read_bytes(remote_jsonl) if storage.exists(remote_jsonl)
                                                  else b"")
        self.stage, self.local = stage, local
        self.jsonl = open(local / "metrics.jsonl", "a") if jsonl else None
        self.trackers = open_trackers(log_dir, stage, local)
        for tracker in self.trackers:
            if isinstance(tracker, RayMetrics):
                tracker.total_steps = total_steps

    def write(self, step: int, metrics: dict) -> None:
        from rayllama.trackers import scalars_of

        if self.jsonl:
            self.jsonl.write(json.dumps({"stage": self.stage, "step": step, "time": time.time(), **metrics}) + "\n")
            self.jsonl.flush()
            if time.monotonic() - self.uploaded_at >= UPLOAD_EVERY_S:
                self.sync()
        scalars = scalars_of(metrics)
        for tracker in self.trackers:
            tracker.log(step, scalars)

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
        self.sync()
        return kept

    def sync(self) -> None:
        """Put metrics.jsonl as it is now in the store (nothing for a local log_dir)."""
        if self.remote and self.jsonl:
            self.jsonl.flush()
            storage.write_bytes(storage.join(self.remote, "metrics.jsonl"), Path(self.jsonl.name).read_bytes())
            self.uploaded_at = time.monotonic()

    def close(self) -> None:
        if self.jsonl:
            self.sync()
            self.jsonl.close()
        for tracker in self.trackers:
            tracker.close()
        tensorboard = self.local / "tensorboard"
        if self.remote and tensorboard.is_dir():
            storage.upload_files(tensorboard, storage.join(self.remote, "tensorboard"))


def _build_model(job: TrainJob, device: torch.device):
    """The job's model, sharded per job.strategy: a fresh init of job.model (seeded per parameter, the same for
    every sharding) or job.init's weights read shard by shard (a reward model from a causal LM gets a zero head)."""
    from rayllama.checkpoint import read_model_config
    from rayllama.dist.fsdp import build_model

    init = storage.local_dir(job.init) if job.init is not None else None  # a URI: this worker's own copy
    cfg = job.model if init is None else read_model_config(init)
    kind = "scalar" if job.objective == "reward" else "causal"
    model = build_model(kind, cfg, device=device, strategy=job.strategy, param_dtype=getattr(torch, job.param_dtype),
                        activation_checkpointing=job.activation_checkpointing,
                        reshard_after_forward=job.reshard_after_forward, init=init, seed=job.seed)
    return model, cfg


def _export(job: TrainJob, model, cfg, step: int, meta: dict) -> None:
    """The final model as a complete HF directory: parameters gathered one at a time, written by rank 0."""
    from rayllama.checkpoint import save_state
    from rayllama.dist.fsdp import iter_full_state, rank

    tensors = iter_full_state(model)
    if rank() != 0:
        for _ in tensors:  # every rank takes part in each gather
            pass
        return
    kind = "scalar" if job.objective == "reward" else "causal"
    tokenizer = storage.local_file(job.tokenizer_model) if job.tokenizer_model else None
    storage.write_complete_dir(job.output, lambda d: save_state(d, tensors, cfg, kind, tokenizer_model=tokenizer,
                                                                meta={"stage": job.stage, "step": step, **meta}))


def load_tensors(path: str) -> dict:
    """The tensors at `path` (rayllama.train.data), local or read from the run's storage."""
    if storage.is_uri(path):
        return torch.load(io.BytesIO(storage.read_bytes(path)))
    return torch.load(path)


def _extra_state(job: TrainJob, scheduler, step: int) -> dict:
    return {"stage": job.stage, "step": step, "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state()}


class _RayInfoFilter:
    """Drops Ray's own records below WARNING (by source file). Ray Train's LoggingConfig filters only loggers
    named ray.train*, but its worker logs "Reporting training result ..." at INFO through a logger named after the
    file (Ray 2.58), so a console handler needs this to keep that chatter out of the driver's console."""

    def __init__(self):
        import ray

        self.ray_dir = str(Path(ray.__file__).parent)

    def filter(self, record) -> bool:
        return record.levelno >= 30 or not record.pathname.startswith(self.ray_dir)


def _quiet_ray_console(job: TrainJob) -> None:
    """Unless the run's log_level is debug: Ray's INFO records stay out of this worker's console handlers (the
    session log files under /tmp/ray/session_latest/logs/train keep them)."""
    import logging

    from rayllama.trackers import run_settings

    settings = run_settings(job.log_dir)
    if settings and settings.config.get("log_level") == "debug":
        return
    for handler in logging.getLogger().handlers:
        if type(handler).__name__ != "SessionFileHandler":
            handler.addFilter(_RayInfoFilter())


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point (runs on every worker)."""
    import ray.train
    import ray.train.torch

    from rayllama.dist import dcp
    from rayllama.dist.fsdp import clip_grad_norm, compute_context, effective_strategy, wrap_ddp

    job: TrainJob = config["job"]
    _quiet_ray_console(job)
    torch.set_num_threads(job.threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if job.device == "cuda" else torch.device("cpu")

    model, model_cfg = _build_model(job, device)
    optimizer = build_optimizer(model, job.optim)
    scheduler = build_scheduler(optimizer, job.optim, job.total_steps)
    start_step = 0
    resume = ray.train.get_checkpoint()
    if resume is not None:  # Ray Train restored this run: continue from its latest (sharded) checkpoint
        with resume.as_directory() as d:
            extra = dcp.load_train_state(d, {"model": (model, optimizer)})
        scheduler.load_state_dict(extra["scheduler"])
        torch.set_rng_state(extra["torch_rng"])
        start_step = extra["step"]
    strategy = effective_strategy(job.strategy)
    train_model = wrap_ddp(model, device) if strategy == "ddp" and world > 1 else model
    params = [p for p in model.parameters() if p.requires_grad]

    from rayllama.data.stream import STREAM, stream_rows

    streamed = stream_rows(job, start_step, world) if job.data_path == STREAM else None  # Ray Data rows per step
    data = None if streamed else load_tensors(job.data_path)
    eval_data = load_tensors(job.eval_path) if job.eval_path else None  # every rank evaluates its share
    order = None if streamed else example_order(num_examples(data), job.batch_size, job.total_steps, job.seed)
    widths = None if streamed else example_widths(data, job.objective)
    tokens_seen = 0  # real (unpadded) tokens of this rank's rows since start_step
    micro_loss = OBJECTIVES[job.objective]
    writer = MetricsWriter(job.log_dir, job.stage, job.total_steps) if rank == 0 else None
    if writer and start_step:
        writer.write(start_step, {"resumed_from_step": start_step})
    compute = compute_context(model, getattr(torch, job.param_dtype), device)
    # rank 0's progress: a line per tenth of the steps. Not a bar: Ray's tqdm_ray drew nothing on a terminal here
    # (Ray 2.58) and, into a file, a line per redraw, twice per step
    progress_every = max(1, job.total_steps // 10) if rank == 0 else 0
    last_eval: dict = {}
    t0, window_items = time.perf_counter(), 0
    started = t0

    for step in range(start_step, job.total_steps):
        if streamed:
            data, micro = next(streamed)
        else:
            micro = rank_micro_batches(order[step * job.batch_size : (step + 1) * job.batch_size], widths,
                                       job.micro_batch_size, rank, world)
        if job.objective == "lm":
            tokens_seen += sum(int(data["lengths"][idx].sum()) for idx in micro)
        # Normalise by the step's global count of targets (tokens or pairs), so that the ranks' gradient average
        # (FSDP's reduce-scatter, DDP's all-reduce) and the micro-batch accumulation give exactly the gradient of
        # the mean over the union batch.
        local_count = torch.tensor(
            [float(data["loss_mask"][idx, 1:].sum()) if job.objective == "lm" else float(len(idx)) for idx in micro]
        ).sum()
        global_count = local_count.clone().to(device)
        if world > 1:
            torch.distributed.all_reduce(global_count)
        loss_total = 0.0
        for i, idx in enumerate(micro):
            last = i == len(micro) - 1
            sync = train_model.no_sync() if (train_model is not model and not last) else contextlib.nullcontext()
            with sync, compute:
                loss_sum, _ = micro_loss(train_model, data, idx, device)
                loss = loss_sum * world / global_count
            loss.backward()
            loss_total += loss_sum.detach().item()
        step_loss = torch.tensor(loss_total, dtype=torch.float64)  # summed over this rank's targets
        if world > 1:
            torch.distributed.all_reduce(step_loss)
        grad_norm = clip_grad_norm(params, job.optim.grad_clip)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window_items += int(local_count) * world
        done = step + 1
        progress_due = progress_every and (done % progress_every == 0 or done == job.total_steps)
        log_due = writer and (done % job.log_every == 0 or done == job.total_steps)
        # the union batch's mean, read only when printed or logged (global_count may live on the GPU: a sync)
        step_mean_loss = float(step_loss) / max(float(global_count), 1.0) if progress_due or log_due else 0.0
        if progress_due:
            print(f"{job.stage}: step {done}/{job.total_steps}, loss {step_mean_loss:.4f}, "
                  f"{(done - start_step) / (time.perf_counter() - started):.2f} steps/s", flush=True)

        if log_due:
            elapsed = time.perf_counter() - t0
            writer.write(
                done,
                {
                    "loss": step_mean_loss,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "items_per_s": window_items / elapsed,
                },
            )
            t0, window_items = time.perf_counter(), 0
        if eval_data is not None and job.eval_every and done % job.eval_every == 0:
            last_eval = EVALUATORS[job.objective](model, eval_data, device)
            if writer:
                writer.write(done, last_eval)
        if job.stop_after is not None and done >= job.stop_after:
            break
        if done % job.checkpoint_every == 0 and done < job.total_steps:
            if writer:
                writer.sync()  # the rows up to this step reach the store before the checkpoint does
            _report_checkpoint(model, job, optimizer, scheduler, done, {"loss": loss_total})

    finished = job.stop_after is None or job.stop_after >= job.total_steps
    seen = torch.tensor(tokens_seen, dtype=torch.float64, device=device)
    if world > 1:
        torch.distributed.all_reduce(seen)
    if finished:
        if eval_data is not None:
            last_eval = EVALUATORS[job.objective](model, eval_data, device)
            if writer:
                writer.write(job.total_steps, last_eval)
        _export(job, model, model_cfg, job.total_steps, {"eval": last_eval, "tokens_seen": int(seen)})
    if writer:
        writer.close()
    ray.train.report({"step": job.total_steps if finished else done, "finished": finished})


def _report_checkpoint(model, job: TrainJob, optimizer, scheduler, step: int, metrics: dict) -> None:
    """Every rank writes its shards (DCP) into its own temp dir; Ray Train merges them into one checkpoint and
    registers it only once every rank has reported, so a kill mid-save leaves the previous one current."""
    import ray.train

    from rayllama.dist import dcp

    with tempfile.TemporaryDirectory() as tmp:
        dcp.save_train_state(tmp, {"model": (model, optimizer)}, _extra_state(job, scheduler, step), marker=False)
        ray.train.report({"step": step, **metrics}, checkpoint=ray.train.Checkpoint.from_directory(tmp))


# ----------------------------------------------------------------------------------------------- driver side


def train_run_name(job: TrainJob) -> str:
    """`<run>-<stage>` (tiny-pretrain, tiny-reward-helpfulness, tiny-gatt-round-1) inside a run dir, else the
    stage: Ray Train's run name in the dashboard and the directory under job.log_dir holding its checkpoints."""
    from rayllama.trackers import run_settings

    settings = run_settings(job.log_dir)
    return settings.run_name if settings else job.stage


def run_train_job(job: TrainJob, scaling: ScalingSection, datasets: dict | None = None) -> dict:
    """Run `job` on Ray Train with `scaling` workers; resume if this stage's run directory has a checkpoint.
    `datasets` (Ray Data, e.g. {"train": ...}) are split over the workers (ray.train.get_dataset_shard)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from rayllama.trackers import run_settings

    settings = run_settings(job.log_dir)
    debug = bool(settings) and settings.config.get("log_level") == "debug"

    resources = {"CPU": scaling.cpus_per_worker}
    if storage.is_uri(job.log_dir):  # Ray Train's checkpoints go to the object store too
        fs, inner = storage.filesystem(storage.join(job.log_dir))
        where = {"storage_path": inner, "storage_filesystem": fs}
    else:
        where = {"storage_path": str(Path(job.log_dir).absolute())}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job},
        datasets=datasets,
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=train_run_name(job),  # the dashboard's name of this Ray Train run; checkpoints go under it
            **where,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=scaling.max_failures),
            # Ray Train's INFO lines (worker group start, "Reporting training result ...") only with log_level
            # debug; its session log files keep every level
            logging_config=LoggingConfig(log_level="INFO" if debug else "WARNING"),
        ),
    )
    import signal
    import threading

    # fit() on the main thread installs Ray Train's SIGINT handler (abort this run) and leaves it installed after
    # the run: a later Ctrl-C would then abort a finished run and be swallowed (Ray 2.58), so the driver's own
    # handler comes back when the run ends
    sigint = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
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
    finally:
        if sigint is not None:
            signal.signal(signal.SIGINT, sigint)
    return dict(result.metrics or {})


def holds_worker_groups(scaling: ScalingSection, groups: int) -> bool:
    """Whether the Ray cluster has `groups` worker groups of `scaling` free at once (CPUs, and GPUs when used).
    Workers of a fraction of a GPU never run beside another group: they could share a GPU, which the memory plan
    (rayllama.plan), counting one stage's processes per GPU, would not see."""
    import ray

    if scaling.use_gpu and scaling.gpus_per_worker < 1:
        return False
    free = ray.available_resources()
    need = {"CPU": groups * scaling.num_workers * scaling.cpus_per_worker}
    if scaling.use_gpu:
        need["GPU"] = groups * scaling.num_workers * scaling.gpus_per_worker
    return all(free.get(k, 0.0) >= v - 1e-9 for k, v in need.items())


def run_train_jobs(jobs: list[TrainJob], scaling: ScalingSection, at_once: bool = True) -> list[dict]:
    """Independent jobs (the two reward models), each its own Ray Train run: at once when `at_once` and the
    cluster has all their worker groups free together (so none waits for placement), else one after the other.
    Run at once, a failed job's error is raised after the others have ended (so those are complete); the threads
    are daemons, so Ctrl-C ends the driver at once (its Ray Train runs die with it and resume from their
    checkpoints on the next run) instead of waiting for the jobs."""
    if not (at_once and len(jobs) > 1 and holds_worker_groups(scaling, len(jobs))):
        return [run_train_job(job, scaling) for job in jobs]
    import threading

    outcomes: list = [None] * len(jobs)

    def run(i: int) -> None:
        try:
            outcomes[i] = run_train_job(jobs[i], scaling)
        except BaseException as e:  # raised on the driver's thread below
            outcomes[i] = e

    threads = [threading.Thread(target=run, args=(i,), name=f"train-{job.stage}", daemon=True)
               for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    return outcomes


def job_summary(job: TrainJob) -> dict:
    return {k: v for k, v in dataclasses.asdict(job).items() if k not in ("optim", "model")}
