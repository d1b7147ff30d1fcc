"""The Ray Train stages: pretrain, SFT and the two reward models. Each builds its tensors once (reused while what
they are built from is unchanged), describes a TrainJob and runs it on the shared loop (rayllama.train.loop)."""

from __future__ import annotations

import hashlib
import json
import math
import random
from pathlib import Path

import torch

from rayllama.config import PipelineConfig, model_config, param_dtype
from rayllama.losses import MARGINS
from rayllama.run_dir import RunDir
from rayllama.tokenizer import Tokenizer
from rayllama.train.data import (
    num_examples,
    pack_texts,
    preference_rows,
    safety_mix,
    save_tensors,
    sft_rows,
)
from rayllama.train.loop import TrainJob, run_train_job

HELDOUT_ROWS = 64  # held-out perplexity over 64 x seq_len tokens: a stable estimate in seconds


def sharding(cfg: PipelineConfig) -> dict:
    """The TrainJob fields that say how the trainer holds the model (scaling.strategy, train.*)."""
    return {"strategy": cfg.scaling.strategy, "param_dtype": str(param_dtype(cfg.train, cfg.device)).removeprefix("torch."),
            "activation_checkpointing": cfg.train.activation_checkpointing,
            "reshard_after_forward": cfg.train.reshard_after_forward}


def _tensors(run: RunDir, name: str, tok: Tokenizer, build, *inputs) -> Path:
    """run.data/<name>-<key>.pt holding build(*inputs), built once (and put in the run's store). The key hashes the
    inputs (texts or pairs plus lengths) and the tokenizer's bytes, so a run dir reused with another world,
    max_seq_len or tokenizer builds new tensors instead of training on stale ones."""
    h = hashlib.sha1(tok.model_path.read_bytes())
    h.update(repr(inputs).encode())
    path = run.data / f"{name}-{h.hexdigest()[:12]}.pt"
    if not path.exists():
        save_tensors(path, build(*inputs))
    run.push(path, only_if_missing=True)
    return path


def _paths(run: RunDir, tok: Tokenizer, stage_dir: Path, init) -> dict:
    """The TrainJob fields that name files, as the workers open them (URIs for a run on an object store)."""
    return {"output": run.remote(stage_dir / "model"), "log_dir": run.remote(stage_dir),
            "tokenizer_model": run.remote(tok.model_path), "init": run.remote(init) if init else None}


def as_run(run_dir: Path | RunDir) -> RunDir:
    return run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)


def mix_pretrain_texts(corpus: list[str], world: list[str], world_share: float, seed: int) -> list[str]:
    """Corpus documents plus toy-world texts, the world repeated or cut so that it makes about `world_share` of
    the characters, shuffled deterministically."""
    corpus_chars = sum(len(t) for t in corpus)
    world_chars = max(1, sum(len(t) for t in world))
    target = world_share / max(1e-9, 1.0 - world_share) * corpus_chars
    reps = target / world_chars
    texts = list(corpus) + list(world) * int(reps)
    texts += world[: int((reps - int(reps)) * len(world))]
    random.Random(seed).shuffle(texts)
    return texts


def run_pretrain(cfg: PipelineConfig, run_dir: Path | RunDir, tok: Tokenizer, corpus_train: list[str],
                 corpus_heldout: list[str], world_train: list[str], world_heldout: list[str],
                 init: Path | str | None = None) -> dict:
    p, run = cfg.pretrain, as_run(run_dir)
    train = _tensors(
        run, "pretrain", tok,
        lambda corpus, world, share, seed, n: pack_texts(mix_pretrain_texts(corpus, world, share, seed), tok, n),
        corpus_train, world_train, p.world_text_share, cfg.seed, p.seq_len,
    )
    heldout = _tensors(
        run, "pretrain_heldout", tok,
        lambda texts, n, rows: {k: v[:rows] for k, v in pack_texts(texts, tok, n).items()},
        corpus_heldout + world_heldout, p.seq_len, HELDOUT_ROWS,
    )
    job = TrainJob(
        stage="pretrain", objective="lm", data_path=run.remote(train), eval_path=run.remote(heldout),
        optim=p.optim, total_steps=p.steps, batch_size=p.batch_size, micro_batch_size=p.micro_batch_size,
        model=model_config(cfg, tok.vocab_size), **_paths(run, tok, run.root / "pretrain", init),
        checkpoint_every=p.checkpoint_every, eval_every=p.eval_every, log_every=p.log_every,
        seed=cfg.seed, threads=cfg.threads_per_worker, device=cfg.device, **sharding(cfg),
    )
    return run_train_job(job, cfg.scaling)


def run_sft(cfg: PipelineConfig, run_dir: Path | RunDir, tok: Tokenizer, dialogues: list[list[dict]],
            init: Path | str) -> dict:
    s, run = cfg.sft, as_run(run_dir)
    path = _tensors(run, "sft", tok, lambda d, n: sft_rows(d, tok, n)[0], dialogues, s.max_seq_len)
    n = num_examples(torch.load(path))
    job = TrainJob(
        stage="sft", objective="lm", data_path=run.remote(path), optim=s.optim,
        total_steps=max(1, math.ceil(s.epochs * n / s.batch_size)), batch_size=s.batch_size,
        micro_batch_size=s.micro_batch_size, **_paths(run, tok, run.root / "sft", init), checkpoint_every=s.checkpoint_every, log_every=s.log_every,
        seed=cfg.seed, threads=cfg.threads_per_worker, device=cfg.device, **sharding(cfg),
    )
    return run_train_job(job, cfg.scaling)


def run_reward(cfg: PipelineConfig, run_dir: Path | RunDir, tok: Tokenizer, kind: str, pairs: list,
               heldout_pairs: list, helpful_pairs: list, init: Path | str) -> dict:
    """One reward model (kind = helpfulness | safety) on Ray Train."""
    return run_train_job(reward_job(cfg, run_dir, tok, kind, pairs, heldout_pairs, helpful_pairs, init), cfg.scaling)


def reward_job(cfg: PipelineConfig, run_dir: Path | RunDir, tok: Tokenizer, kind: str, pairs: list,
               heldout_pairs: list, helpful_pairs: list, init: Path | str) -> TrainJob:
    """The TrainJob of one reward model, its tensors built. The safety RM's data mixes in helpfulness pairs
    (reward.safety_helpfulness_share, LLaMA 2's 90/10)."""
    r, run = cfg.reward, as_run(run_dir)
    margins = MARGINS[r.margin]
    tag = f"reward_{kind}_{r.margin}"
    train_pairs = pairs if kind == "helpfulness" else safety_mix(pairs, helpful_pairs, r.safety_helpfulness_share, cfg.seed)

    def rows(ps, n, m):
        return preference_rows(ps, tok, n, m)[0]

    train = _tensors(run, tag, tok, rows, train_pairs, r.max_seq_len, margins)
    heldout = _tensors(run, f"{tag}_heldout", tok, rows, heldout_pairs, r.max_seq_len, margins)
    n = num_examples(torch.load(train))
    return TrainJob(
        stage=f"reward-{kind}", objective="reward", data_path=run.remote(train), eval_path=run.remote(heldout),
        optim=r.optim, total_steps=max(1, math.ceil(r.epochs * n / r.batch_size)),
        batch_size=r.batch_size, micro_batch_size=r.micro_batch_size,
        **_paths(run, tok, run.root / "reward" / kind, init), checkpoint_every=r.checkpoint_every, log_every=r.log_every,
        seed=cfg.seed, threads=cfg.threads_per_worker, device=cfg.device, **sharding(cfg),
    )


def run_pretrain_stream(cfg: PipelineConfig, run_dir: Path | RunDir, tok: Tokenizer, dataset,
                        heldout_texts: list[str], init: Path | str | None = None) -> dict:
    """Pretraining on a Ray Data dataset of packed rows (rayllama.data.stream): each worker reads its shard step by
    step, nothing is tokenized up front; held-out perplexity over `heldout_texts` (a bounded sample)."""
    from rayllama.data.stream import STREAM

    p, run = cfg.pretrain, as_run(run_dir)
    heldout = _tensors(
        run, "pretrain_heldout", tok,
        lambda texts, n, rows: {k: v[:rows] for k, v in pack_texts(texts, tok, n).items()},
        heldout_texts, p.seq_len, HELDOUT_ROWS,
    ) if heldout_texts else None
    job = TrainJob(
        stage="pretrain", objective="lm", data_path=STREAM, eval_path=run.remote(heldout) if heldout else None,
        optim=p.optim, total_steps=p.steps, batch_size=p.batch_size, micro_batch_size=p.micro_batch_size,
        model=model_config(cfg, tok.vocab_size), **_paths(run, tok, run.root / "pretrain", init),
        checkpoint_every=p.checkpoint_every, eval_every=p.eval_every, log_every=p.log_every,
        seed=cfg.seed, threads=cfg.threads_per_worker, device=cfg.device, **sharding(cfg),
    )
    result = run_train_job(job, cfg.scaling, datasets={"train": dataset})
    meta = json.loads((run.pull(run.root / "pretrain" / "model") / "rayllama.json").read_text())
    return {**result, "tokens_seen": meta.get("tokens_seen", 0)}  # every rank's real tokens, summed
