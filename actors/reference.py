"""ReferenceModel: the frozen SFT policy pi_0, whose log-probs give PPO's KL penalty beta * KL(pi || pi_0)."""

from __future__ import annotations

from pathlib import Path

import ray
import torch

from rayllama.checkpoint import load_model
from rayllama.model import Transformer
from rayllama.rl.experience import SequenceBatch, batched_logprobs


class ReferenceModel:
    """A frozen copy of the SFT checkpoint (no gradients, eval mode), its weights in `dtype` (actors.group passes
    `rayllama.config.param_dtype(cfg.train, device)`: bfloat16 on cuda, float32 on the CPU)."""

    def __init__(self, sft_dir: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 micro_batch_size: int = 16, threads: int | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        model, self.cfg, _ = load_model(sft_dir, device=device, dtype=dtype)
        if not isinstance(model, Transformer):
            raise ValueError(f"reference checkpoint {sft_dir} is a reward model; pass the SFT (causal LM) checkpoint")
        self.model = model.eval().requires_grad_(False)
        self.micro_batch_size = micro_batch_size

    @torch.no_grad()
    def logprobs(self, batch: SequenceBatch) -> torch.Tensor:
        """(B, A) float32 log pi_0(a_t | s_t), zero on padding (the log-softmax in float32 whatever the weights'
        dtype: rayllama.losses.logprobs_from_logits)."""
        return batched_logprobs(self.model, batch, self.micro_batch_size)


@ray.remote
class ReferenceModelActor(ReferenceModel):
    """Ray shell (one process)."""
