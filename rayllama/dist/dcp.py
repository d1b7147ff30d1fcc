"""Sharded training state with torch.distributed.checkpoint (DCP): every rank writes its own shards of the model
and optimizer state, and a later load reshards to whatever number of ranks reads it (2 ranks -> 1, 1 -> 2).

    save_train_state(dir, parts, extra)   parts = {"policy": (model, optimizer), ...}; `extra` (step, scheduler,
                                          RNG, version: small, the same on every rank) goes to extra.pt from rank 0
    load_train_state(dir, parts) -> extra restores parts in place (any sharding) and returns `extra`

A directory is complete when its marker (`COMPLETE`, written last by rank 0 after every rank has written) exists;
`is_complete` is what readers trust. Ray Train merges the ranks' directories into one checkpoint; the RL learner
group writes them into a temp dir on shared storage and rank 0 renames it into place (`atomic_save`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from rayllama.dist.fsdp import rank, world_size

EXTRA, MARKER = "extra.pt", "COMPLETE"

Parts = dict[str, tuple[nn.Module, torch.optim.Optimizer | None]]


def _state(parts: Parts) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state: dict[str, Any] = {}
    for name, (model, optimizer) in parts.items():
        state[f"{name}.model"] = get_model_state_dict(model)
        if optimizer is not None:
            state[f"{name}.optim"] = get_optimizer_state_dict(model, optimizer)
    return state


def _barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def save_train_state(directory: str | Path, parts: Parts, extra: dict[str, Any], *, marker: bool = True) -> None:
    """Every rank writes its shards of `parts` into `directory` (which may differ per rank: Ray Train merges
    them); rank 0 writes `extra` and, after all ranks are done, the marker."""
    import torch.distributed.checkpoint as dcp

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dcp.save(_state(parts), checkpoint_id=str(directory))
    if rank() == 0:
        torch.save(extra, directory / EXTRA)
    _barrier()
    if marker and rank() == 0:
        (directory / MARKER).write_text("ok\n")


def is_complete(directory: str | Path) -> bool:
    d = Path(directory)
    return (d / MARKER).is_file() and (d / EXTRA).is_file() and (d / ".metadata").is_file()


def load_train_state(directory: str | Path, parts: Parts) -> dict[str, Any]:
    """Restore `parts` in place from `directory` (written by any number of ranks) and return its `extra`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    directory = Path(directory)
    if not (directory / ".metadata").is_file() or not (directory / EXTRA).is_file():
        raise FileNotFoundError(f"{directory} is not a complete sharded checkpoint (no .metadata / {EXTRA}); "
                                f"resume from an earlier checkpoint or start the stage again")
    state = _state(parts)
    dcp.load(state, checkpoint_id=str(directory))
    for name, (model, optimizer) in parts.items():
        set_model_state_dict(model, state[f"{name}.model"])
        if optimizer is not None:
            set_optimizer_state_dict(model, optimizer, state[f"{name}.optim"])
    return torch.load(directory / EXTRA, map_location="cpu", weights_only=False)


def atomic_save(target: str | Path, parts: Parts, extra: dict[str, Any]) -> Path:
    """save_train_state into `.<name>.tmp` next to `target` (a path every rank sees), then rank 0 swaps it into
    place: a kill at any moment leaves the previous complete checkpoint (or none), never a torn one."""
    target = Path(target).absolute()
    tmp = target.parent / f".{target.name}.tmp"
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    save_train_state(tmp, parts, extra)
    if rank() == 0:
        aside = target.parent / f".{target.name}.old"
        if target.exists():
            shutil.rmtree(aside, ignore_errors=True)
            os.rename(target, aside)
        os.rename(tmp, target)
        shutil.rmtree(aside, ignore_errors=True)
    _barrier()
    return target
