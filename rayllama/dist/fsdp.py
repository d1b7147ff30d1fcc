"""The sharded training core every trainer uses: Ray Train stages (pretrain, SFT, reward, GAtt) and the RL learner.

    build_model(kind, cfg, ...)   meta-device construction -> FSDP2 `fully_shard` per block and root ->
                                  `to_empty` -> each rank fills only its own shard, from a Hugging Face directory
                                  (safetensors slices: no rank ever holds the whole fp32 model) or from a seeded
                                  per-parameter init that is the same for every sharding
    clip_grad_norm(model, max)    global grad norm over sharded (DTensor) or plain gradients, clipped in place
    iter_full_state(model)        (name, full CPU tensor) one parameter at a time (collective on every rank): the
                                  streaming input of `checkpoint.save_state`, so an export never gathers the model
    join_group(...)               an RL actor rank joins its group's process group (the PPO learners, the sharded
                                  reference and reward scorers); max_over_ranks, one all-reduce over it

Strategies (`scaling.strategy`): "fsdp" shards parameters, gradients and AdamW state over the process group
(PyTorch FSDP2, the way torchtitan and torchtune do it; gloo on CPU, NCCL on GPU), with a MixedPrecisionPolicy
(parameters stored fp32, computed in `param_dtype`, gradients reduced in fp32); "ddp" keeps whole replicas
(DistributedDataParallel); without a process group the model is a plain module (autocast for bf16).
Activation checkpointing recomputes each transformer block in backward (`LlamaTrunk.activation_checkpointing`).
`train.reshard_after_forward` false keeps each block's gathered parameters from its forward to its backward
(torchtitan's "never" policy): the same numbers, one all-gather per block per step instead of two (bench/fsdp.py on
2 CPU ranks over gloo: 1.04-1.08x), every block unsharded at the forward/backward turn.

FSDP2 reduce-scatters the mean of the ranks' gradients, as DDP all-reduces it, so a loss normalised by the union
batch's target count and multiplied by the world size gives exactly the union batch's gradient on every rank.
"""

from __future__ import annotations

import contextlib
import json
import zlib
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from rayllama.model import ModelConfig, ScalarHeadModel, Transformer

INIT_STD = 0.02  # HF's initializer_range, as rayllama.model._init_weights


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def join_group(who: str, rank: int, world: int, init_method: str | None, device: torch.device,
               timeout_s: float) -> None:
    """Rank `rank` of `world` joins the default process group at `init_method` (rank 0's tcp:// rendezvous; every
    rank of the group joins at once): gloo on CPU, NCCL on cuda. `who` names the role in the error."""
    if not init_method:
        raise ValueError(f"{who} rank {rank} of {world} needs init_method (rank 0's tcp:// rendezvous address)")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))


def max_over_ranks(value: int, device: torch.device) -> int:
    """The largest `value` over the process group's ranks (the value itself without a group)."""
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def effective_strategy(strategy: str) -> str:
    """"fsdp" / "ddp" when a process group exists (any size: FSDP on one rank still applies mixed precision),
    "none" (a plain module) without one."""
    if strategy not in ("fsdp", "ddp"):
        raise ValueError(f"scaling.strategy '{strategy}' is not fsdp or ddp")
    if not (dist.is_available() and dist.is_initialized()):
        return "none"
    return strategy


def shard(model: Transformer | ScalarHeadModel, param_dtype: torch.dtype = torch.float32,
          reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2 in place: `fully_shard` on every transformer block, then on the root (embedding, final norm, head).
    Parameters become DTensors sharded on dim 0 over the default process group. `reshard_after_forward` False:
    a block keeps its gathered parameters from its forward to its backward (train.reshard_after_forward)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=None if param_dtype == torch.float32 else param_dtype,
                              reduce_dtype=torch.float32)
    for block in model.model.layers:
        fully_shard(block, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mp_policy=mp)  # the root: FSDP2 keeps it gathered from forward to backward either way
    return model


def _local_rows(param: torch.Tensor) -> tuple[int, int]:
    """(first row, row count) of this rank's shard of `param` along dim 0 (the whole tensor when not sharded)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return 0, param.shape[0]
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    if any(o != 0 for o in offset[1:]) or tuple(shape[1:]) != tuple(param.shape[1:]):
        raise ValueError(f"parameter of shape {tuple(param.shape)} is sharded on a dim other than 0; "
                         f"rayllama shards on dim 0 only")
    return int(offset[0]), int(shape[0])


def _local(param: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return param.to_local() if isinstance(param, DTensor) else param


def _name_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


@torch.no_grad()
def init_weights(model: nn.Module, seed: int) -> None:
    """Fresh weights that do not depend on the sharding: parameter `name` is N(0, 0.02^2) drawn from a generator
    seeded by (seed, name) (matrices and embeddings), ones for RMSNorm gains; each rank draws the full tensor once
    and keeps its rows (one parameter at a time, so never the whole model)."""
    for name, param in model.named_parameters():
        if param.ndim == 1:
            _local(param).fill_(1.0)
            continue
        g = torch.Generator().manual_seed(_name_seed(seed, name))
        full = torch.empty(tuple(param.shape)).normal_(0.0, INIT_STD, generator=g)
        first, rows = _local_rows(param)
        _local(param).copy_(full[first:first + rows])


class _SafetensorsSource:
    """Tensors of a checkpoint directory by name, read slice by slice (safetensors) or whole (pytorch_model.bin)."""

    def __init__(self, directory: Path) -> None:
        from safetensors import safe_open

        from rayllama.checkpoint import _weight_files

        self.handles: dict[str, object] = {}
        self.whole: dict[str, torch.Tensor] = {}
        for f in _weight_files(directory):
            if f.suffix == ".safetensors":
                h = safe_open(str(f), framework="pt")
                self.handles.update({k: h for k in h.keys()})
            else:
                self.whole.update(torch.load(f, map_location="cpu", weights_only=True))

    def names(self) -> set[str]:
        return set(self.handles) | set(self.whole)

    def rows(self, name: str, first: int, count: int) -> torch.Tensor:
        if name in self.whole:
            return self.whole[name][first:first + count]
        return self.handles[name].get_slice(name)[first:first + count]


@torch.no_grad()
def load_weights(model: nn.Module, path: str | Path) -> dict:
    """Fill `model` (sharded or plain, already materialised) from the checkpoint at `path`, each rank reading only
    its own rows. A scalar model started from a causal LM takes the trunk and a zero `score` (LLaMA 2's reward
    models start from the chat model); a causal LM whose checkpoint ties the head reads `lm_head` from the
    embedding. Returns the checkpoint's rayllama.json meta."""
    from rayllama.checkpoint import META, CheckpointError, read_model_config, resolve

    d = resolve(path)
    cfg = read_model_config(d)
    if cfg != model.cfg:
        raise CheckpointError(f"{d} holds a model of shape {cfg}, not the expected {model.cfg}; point init at a "
                              f"checkpoint of this model's shape")
    source = _SafetensorsSource(d)
    available = source.names()
    for name, param in model.named_parameters():
        first, rows = _local_rows(param)
        src = name
        if name == "lm_head.weight" and name not in available:
            src = "model.embed_tokens.weight"  # tied there, untied here
        if name == "score.weight" and name not in available:
            _local(param).zero_()  # a fresh reward/value head on a causal trunk: r = 0 for every input
            continue
        if src not in available:
            raise CheckpointError(f"{d} lacks tensor {src}; it does not match config.json, re-export it")
        _local(param).copy_(source.rows(src, first, rows))
    meta_file = d / META
    return json.loads(meta_file.read_text()) if meta_file.is_file() else {}


def checkpoint_kind(path: str | Path) -> str:
    """"causal" or "scalar" from a checkpoint's config.json architectures."""
    from rayllama.checkpoint import ARCHITECTURES, _read_config, resolve

    hf = _read_config(resolve(path))
    return "scalar" if (hf.get("architectures") or [""])[0] == ARCHITECTURES["scalar"] else "causal"


def build_model(kind: str, cfg: ModelConfig, *, device: torch.device | str = "cpu", strategy: str = "fsdp",
                param_dtype: torch.dtype = torch.float32, activation_checkpointing: bool = False,
                reshard_after_forward: bool = True, init: str | Path | None = None, seed: int = 0,
                frozen: bool = False) -> nn.Module:
    """A Transformer ("causal") or ScalarHeadModel ("scalar") built on the meta device, sharded when `strategy`
    resolves to fsdp, materialised on `device` and filled from `init` (a checkpoint dir) or `init_weights(seed)`.
    The returned module is what trainers call and step; for "ddp" wrap it with `wrap_ddp` after the optimizer.
    `frozen`: an inference model (the sharded reference and reward scorers): parameters stored in `param_dtype`
    itself (not fp32), no gradients, eval mode."""
    if kind not in ("causal", "scalar"):
        raise ValueError(f"model kind {kind!r} is not causal or scalar")
    with torch.device("meta"):
        model = ScalarHeadModel(cfg) if kind == "scalar" else Transformer(cfg)
    if frozen:
        model = model.to(param_dtype).eval().requires_grad_(False)
    model.model.activation_checkpointing = activation_checkpointing
    if effective_strategy(strategy) == "fsdp":
        shard(model, param_dtype, reshard_after_forward)
    model.to_empty(device=device)
    if init is not None:
        load_weights(model, init)
    else:
        init_weights(model, seed)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel over the default group (the `ddp` strategy, whole replicas)."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def compute_context(model: nn.Module, param_dtype: torch.dtype, device: torch.device):
    """Autocast to `param_dtype` for a model FSDP does not cast itself (plain or DDP); nothing otherwise."""
    if is_sharded(model) or param_dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=param_dtype)


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """The global L2 norm of the gradients (over every shard), gradients scaled in place to at most max_norm."""
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)


def iter_full_state(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor on CPU) for every entry of the model's state dict, one at a time. With FSDP each
    yield all-gathers one parameter, so every rank must run the iterator to the end, in step."""
    from torch.distributed.tensor import DTensor

    module = getattr(model, "module", model)  # DDP
    for name, value in module.state_dict().items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        yield name, value.detach().cpu()
