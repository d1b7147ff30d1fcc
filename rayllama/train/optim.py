"""AdamW with LLaMA 2's settings and the warm-up + cosine schedule (decay to a fraction of the peak)."""

from __future__ import annotations

import math

import torch

from rayllama.config import OptimConfig


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW(beta1, beta2, eps); weight decay on matrices only (not on RMSNorm gains), as is standard."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    return max(cfg.warmup_steps, int(round(cfg.warmup_ratio * total_steps)))


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier on the peak lr at optimizer step `step` (0-based).

    Linear warm-up over `warmup_steps` to 1, then cosine from 1 down to `final_lr_ratio` at `total_steps`
    (LLaMA 2: "cosine learning rate schedule, with warmup of 2000 steps, and decay final learning rate down to
    10% of the peak"). `constant` keeps the warm-up and then stays at 1.
    """
    warm = warmup_steps(cfg, total_steps)
    if warm > 0 and step < warm:
        return (step + 1) / warm
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, total_steps - warm)
    progress = min(1.0, (step - warm) / span)
    return cfg.final_lr_ratio + (1.0 - cfg.final_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, total_steps))
