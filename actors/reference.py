"""ReferenceModel: the frozen SFT policy pi_0, whose log-probs give PPO's KL penalty beta * KL(pi || pi_0).

One actor holds the whole model; with `ppo.resources.reference.shards` N > 1, N actors form one FSDP2 group
(rank, world size and rank 0's tcp rendezvous come to the constructor, as for the PPO learners: gloo on CPU, NCCL
on cuda) and each holds 1/N of the parameters, read from the checkpoint row by row (no rank ever holds the whole
model). Every rank is called with the whole batch and reads out its contiguous share of the rows
(`rayllama.rl.experience.rank_rows`); the forwards are collective, so a rank without rows runs idle forwards on
the batch's first row. `rayllama.rl.actors_api.ShardedHandle` calls every rank and concatenates their shares.
"""

from __future__ import annotations

from pathlib import Path

import ray
import torch

from actors.policy import add_action_logits, read_out
from rayllama import storage
from rayllama.checkpoint import load_model, read_model_config
from rayllama.dist.fsdp import build_model, checkpoint_kind, join_group
from rayllama.losses import logprobs_from_logits
from rayllama.model import Transformer
from rayllama.rl.experience import SequenceBatch, rank_rows


class ReferenceModel:
    """A frozen copy of the SFT checkpoint (no gradients, eval mode), its weights in `dtype` (actors.group passes
    `rayllama.config.param_dtype(cfg.train, device)`: bfloat16 on cuda, float32 on the CPU); rank `rank` of a
    `world_size`-rank FSDP2 group when world_size > 1 (every rank constructed at once)."""

    def __init__(self, sft_dir: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 micro_batch_size: int = 16, threads: int | None = None, rank: int = 0, world_size: int = 1,
                 init_method: str | None = None, timeout_s: float = 600.0) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.device, self.dtype, self.rank, self.world = torch.device(device), dtype, rank, world_size
        sft_dir = storage.local_dir(sft_dir)  # a URI: this node's copy of the run's checkpoint
        if world_size > 1:
            join_group("reference", rank, world_size, init_method, self.device, timeout_s)
            if checkpoint_kind(sft_dir) != "causal":
                raise ValueError(f"reference checkpoint {sft_dir} is a reward model; pass the SFT (causal LM) "
                                 f"checkpoint")
            self.cfg = read_model_config(sft_dir)
            model = build_model("causal", self.cfg, device=self.device, param_dtype=dtype, init=sft_dir, frozen=True)
        else:
            model, self.cfg, _ = load_model(sft_dir, device=device, dtype=dtype)
            if not isinstance(model, Transformer):
                raise ValueError(f"reference checkpoint {sft_dir} is a reward model; pass the SFT (causal LM) "
                                 f"checkpoint")
        self.model = add_action_logits(model.eval().requires_grad_(False))
        self.micro_batch_size = micro_batch_size

    def logprobs(self, batch: SequenceBatch) -> torch.Tensor:
        """(b, A) float32 log pi_0(a_t | s_t) of this rank's rows of `batch` (all B of them on one actor), zero on
        padding (the log-softmax in float32 whatever the weights' dtype: rayllama.losses.logprobs_from_logits).
        Collective in a group."""
        share = batch.select(rank_rows(len(batch), self.rank, self.world))
        rows = share if len(share) else batch.select(slice(0, 1))  # no rows: idle forwards, to stay in step
        out = read_out(self.model, rows, lambda micro: logprobs_from_logits(self.model.action_logits(micro),
                                                                            micro.actions()),
                       self.micro_batch_size, self.device, torch.float32)
        return out[:len(share)]


@ray.remote
class ReferenceModelActor(ReferenceModel):
    """Ray shell (one process per rank)."""
