"""PolicyLearner: the PPO policy and its value model, trained with LLaMA 2's PPO settings.

One learner per data-parallel rank. Each holds

    policy   Transformer from the SFT checkpoint
    value    ScalarHeadModel: the helpfulness RM (ppo.value_init = "reward") or the SFT trunk with a zero head
             ("sft"), so V(s) reads every position
    two AdamW optimizers (beta 0.9 / 0.95, eps 1e-5, weight decay 0.1 from ppo.optim; constant lr by default)

and trains on its shard of the rollouts: for each mini-batch, loss = PPO clipped surrogate + value_coef *
clipped value loss, one optimizer step, gradients clipped to ppo.optim.grad_clip per model. With N > 1 learners
the ranks form a torch.distributed group (gloo on CPU, NCCL on GPU) and work as DDP does: rank 0's weights are
broadcast at setup and every rank's gradients are averaged with one all-reduce per model before each step, so the
replicas stay identical.

Rejection-sampling fine-tuning uses the same class as a policy-only learner: `PolicyLearner(policy_dir, None,
None, sft_optim=cfg.rejection.optim)` holds no value model and no PPO optimizers, and `sft_train(rows)` fine-tunes
the policy with the SFT loss on answer tokens (one learner; `save_sft` / `load_sft` checkpoint it).
"""

from __future__ import annotations

import math
import socket
from collections import defaultdict
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import ray
import torch

from rayllama.checkpoint import load_model, load_train_state, save_model
from rayllama.config import OptimConfig, PPOConfig
from rayllama.generation import SamplingParams, TorchEngine
from rayllama.losses import (
    entropy_from_logits,
    logprobs_from_logits,
    masked_mean,
    ppo_policy_loss,
    value_loss,
)
from rayllama.model import ScalarHeadModel, Transformer
from rayllama.rl.actors_api import LearnerLostError, state_to_numpy, weights_checksum
from rayllama.rl.experience import (
    Experience,
    SequenceBatch,
    action_logits,
    action_values,
    batched_logprobs,
    batched_values,
    micro_batches,
    mini_batches,
    to_device,
)
from rayllama.train.loop import example_order, lm_micro_loss
from rayllama.train.optim import build_optimizer, build_scheduler, lr_factor


def optimizer_steps(ppo: PPOConfig) -> int:
    """Total optimizer steps of a PPO run: iterations x epochs x (rollouts per iteration / mini_batch_size)."""
    rollouts = ppo.prompts_per_iteration * ppo.samples_per_prompt
    return max(1, ppo.iterations * ppo.epochs_per_iteration * (rollouts // ppo.mini_batch_size))


class PolicyLearner:
    """Policy + value model + optimizers of one data-parallel rank (see module docstring)."""

    def __init__(self, policy_dir: str | Path, value_dir: str | Path | None, ppo_cfg: PPOConfig | None, *,
                 seed: int = 0, device: str = "cpu", threads: int | None = None, micro_batch_size: int = 16,
                 max_batch_size: int = 64, sft_optim: OptimConfig | None = None) -> None:
        """ppo_cfg None: a policy-only learner (no value model, no PPO optimizers); sft_optim: the AdamW settings
        of `sft_train` (rejection-sampling fine-tuning)."""
        if threads:
            torch.set_num_threads(threads)
        torch.manual_seed(seed)
        self.ppo, self.device = ppo_cfg, torch.device(device)
        self.micro_batch_size, self.max_batch_size = micro_batch_size, max_batch_size
        policy, self.cfg, _ = load_model(policy_dir, device=self.device)
        if not isinstance(policy, Transformer):
            raise ValueError(f"policy checkpoint {policy_dir} is a reward model; pass the SFT (causal LM) checkpoint")
        self.policy = policy
        if ppo_cfg is not None:
            self.value = self._init_value(value_dir)
            total = optimizer_steps(ppo_cfg)
            self.policy_opt = build_optimizer(self.policy, ppo_cfg.optim)
            self.value_opt = build_optimizer(self.value, ppo_cfg.optim)
            self.policy_sched = build_scheduler(self.policy_opt, ppo_cfg.optim, total)
            self.value_sched = build_scheduler(self.value_opt, ppo_cfg.optim, total)
        self.sft_optim = sft_optim
        self.sft_opt = build_optimizer(self.policy, sft_optim) if sft_optim is not None else None
        self.version = 0  # +1 per train() / sft_train(): the label of the weights `weights()` publishes
        self.rank, self.world = 0, 1
        self.state_lost = False  # True in a Ray restart: refuse work until load()/restore_initial()

    def _require_state(self, what: str) -> None:
        """Refuse `what` on a learner that Ray restarted after a crash: it holds fresh SFT weights, not the run's."""
        if self.state_lost:
            raise LearnerLostError(f"policy-learner rank {self.rank} restarted and lost its training state, so it "
                                   f"refuses {what}; load a checkpoint (load/load_sft) or restore_initial() first")

    def restore_initial(self) -> int:
        """Accept the state this learner was built with (the SFT weights, fresh optimizers) as the state to train
        from: what a loop that has no checkpoint yet restores after a crash. Returns the version (0)."""
        if self.version != 0:
            raise ValueError(f"restore_initial on a learner at version {self.version}; it only undoes a restart")
        self.state_lost = False
        return self.version

    def _init_value(self, value_dir: str | Path | None) -> ScalarHeadModel:
        init = self.ppo.value_init
        if init == "sft":
            return ScalarHeadModel.from_transformer(self.policy)  # SFT trunk, zero head: V = 0 at the start
        if init != "reward":
            raise ValueError(f"ppo.value_init {init!r} is not 'reward' or 'sft'")
        if value_dir is None:
            raise ValueError("ppo.value_init=reward needs the helpfulness reward model; pass its dir or set "
                             "ppo.value_init=sft")
        value, value_cfg, _ = load_model(value_dir, device=self.device)
        if not isinstance(value, ScalarHeadModel):
            raise ValueError(f"value model checkpoint {value_dir} is a causal LM; pass a reward model "
                             f"(or set ppo.value_init=sft)")
        if value_cfg.vocab_size != self.cfg.vocab_size:
            raise ValueError(f"value model {value_dir} has vocab {value_cfg.vocab_size} but the policy "
                             f"{self.cfg.vocab_size}; they must share a tokenizer (or set ppo.value_init=sft)")
        return value

    # ------------------------------------------------------------------------------------------ data parallel

    def setup_distributed(self, init_method: str, rank: int, world_size: int, backend: str | None = None,
                          timeout_s: float = 300.0) -> None:
        """Join the learner group (gloo on CPU, NCCL on GPU) and take rank 0's weights."""
        import torch.distributed as dist

        backend = backend or ("nccl" if self.device.type == "cuda" else "gloo")
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
        self.rank, self.world = rank, world_size
        with torch.no_grad():
            for p in [*self.policy.parameters(), *self.value.parameters()]:
                dist.broadcast(p.data, src=0)

    def _average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """grad <- mean over ranks of grad, in one all-reduce of the flattened gradients."""
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])  # (n_params,)
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p, g in zip(params, grads, strict=True):
            p.grad = flat[offset:offset + g.numel()].view_as(g)
            offset += g.numel()

    # ------------------------------------------------------------------------------------------ read-outs

    def logprobs(self, batch: SequenceBatch) -> torch.Tensor:
        """(B, A) log pi_theta(a_t | s_t) under the current policy (drift monitor: compare with the generator's)."""
        self._require_state("logprobs")
        return batched_logprobs(self.policy, batch, self.micro_batch_size)

    def values(self, batch: SequenceBatch) -> torch.Tensor:
        """(B, A) V(s_t) under the current value model."""
        self._require_state("values")
        return batched_values(self.value, batch, self.micro_batch_size)

    def greedy(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int,
               stop_token_ids: Sequence[int] = (2,)) -> list[list[int]]:
        """The current policy's greedy continuations (a TorchEngine over the live weights)."""
        engine = TorchEngine(self.policy, self.device, self.max_batch_size)
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=tuple(stop_token_ids))
        return [samples[0].token_ids for samples in engine.generate(prompt_ids, params)]

    def weights(self) -> tuple[dict[str, Any], int, float]:
        """(state as numpy arrays, version, weights_checksum(state)) of the policy, for the generators."""
        self._require_state("weights")
        state = state_to_numpy(self.policy.state_dict())
        return state, self.version, weights_checksum(state)

    # ------------------------------------------------------------------------------------------ training

    def train(self, exp: Experience, seed: int = 0) -> dict[str, float]:
        """PPO update on this rank's rollouts: ppo.epochs_per_iteration passes, mini-batches of
        ppo.mini_batch_size / world rows, one optimizer step each. Returns mean stats over the steps."""
        self._require_state("train")
        mini_size = self.ppo.mini_batch_size // self.world
        if mini_size < 1:
            raise ValueError(f"ppo.mini_batch_size {self.ppo.mini_batch_size} is smaller than num_learners "
                             f"{self.world}; make it a multiple of num_learners")
        self.policy.train()
        self.value.train()
        totals: dict[str, float] = defaultdict(float)
        steps = 0
        for mini in mini_batches(exp, mini_size, self.ppo.epochs_per_iteration, seed):
            for key, value in self._step(mini, first=steps == 0).items():
                totals[key] += value
            steps += 1
        self.version += 1
        drift_keys = ("logprob_drift", "logprob_drift_max")
        stats = {k: v / steps for k, v in totals.items() if k not in drift_keys}
        return {**stats, **{k: totals[k] for k in drift_keys}, "optimizer_steps": float(steps),
                "version": float(self.version)}

    def _step(self, mini: Experience, first: bool) -> dict[str, float]:
        """One optimizer step on a mini-batch, accumulated over micro-batches weighted by their token share,
        so the gradient is that of the token mean over the whole mini-batch."""
        ppo = self.ppo
        n_tokens = float(mini.action_mask.sum())
        stats: dict[str, float] = defaultdict(float)
        for micro in micro_batches(mini, self.micro_batch_size):
            micro = to_device(micro, self.device)
            share = float(micro.action_mask.sum()) / n_tokens
            logits = action_logits(self.policy, micro.batch)  # (b, a, V)
            logp = logprobs_from_logits(logits, micro.batch.actions())  # (b, a) log pi_theta
            pg_loss, pg_stats = ppo_policy_loss(logp, micro.logprobs, micro.advantages, micro.action_mask, ppo.clip)
            values = action_values(self.value, micro.batch)  # (b, a) V_phi
            v_loss, v_stats = value_loss(values, micro.values, micro.returns, micro.action_mask, ppo.value_clip)
            ((pg_loss + ppo.value_coef * v_loss) * share).backward()
            with torch.no_grad():
                entropy = masked_mean(entropy_from_logits(logits), micro.action_mask)
                gap = (logp - micro.logprobs).abs() * micro.action_mask  # (b, a) |learner - engine| log-prob
                drift = masked_mean(gap, micro.action_mask)
            for key, value in (("policy_loss", pg_loss), ("value_loss", v_loss), ("entropy", entropy),
                               ("clip_fraction", pg_stats["clip_fraction"]), ("approx_kl", pg_stats["approx_kl"]),
                               ("ratio", pg_stats["ratio"]), ("value_clip_fraction", v_stats["clip_fraction"])):
                stats[key] += share * float(value.detach())
            if first:  # before the first step the learner's weights are the generator's: pure numerical drift
                stats["logprob_drift"] += share * float(drift)
                stats["logprob_drift_max"] = max(stats["logprob_drift_max"], float(gap.max()))
        for model, optimizer, scheduler, name in ((self.policy, self.policy_opt, self.policy_sched, "grad_norm"),
                                                  (self.value, self.value_opt, self.value_sched, "value_grad_norm")):
            params = [p for p in model.parameters() if p.requires_grad]
            if self.world > 1:
                self._average_gradients(params)
            stats[name] = float(torch.nn.utils.clip_grad_norm_(params, ppo.optim.grad_clip))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        stats["lr"] = self.policy_sched.get_last_lr()[0]
        return stats

    # ------------------------------------------------------------------------------------------ SFT (rejection)

    def sft_train(self, rows: dict[str, torch.Tensor], epochs: float = 1.0, batch_size: int = 32,
                  micro_batch_size: int = 16, seed: int = 0) -> dict[str, float]:
        """Fine-tune the policy on `rows` (`rayllama.train.data.sft_rows`: tokens, loss_mask on answer tokens,
        lengths) with the SFT loss -sum_t m_t log pi(x_t | x_<t) / sum_t m_t over each batch (answers only).

        ceil(epochs x N / b) optimizer steps of b = min(batch_size, N) rows in the seeded per-epoch order of
        `example_order`, gradients accumulated over micro-batches, clipped to sft_optim.grad_clip; AdamW moments
        persist across calls, the lr follows sft_optim's schedule within each call (warm-up, then cosine or
        constant). Returns mean loss, grad norm, lr, steps, rows and the new version."""
        self._require_state("sft_train")
        if self.sft_opt is None or self.sft_optim is None:
            raise ValueError("this PolicyLearner was built without sft_optim; pass sft_optim=cfg.rejection.optim")
        if self.world > 1:
            raise ValueError(f"sft_train runs on one learner, but this one is rank {self.rank} of {self.world}")
        n = int(rows["tokens"].shape[0])
        if n < 1 or epochs <= 0 or batch_size < 1 or micro_batch_size < 1:
            raise ValueError(f"sft_train got {n} rows, epochs {epochs}, batch_size {batch_size}, micro_batch_size "
                             f"{micro_batch_size}; pass rows and positive sizes")
        b = min(batch_size, n)
        steps = max(1, math.ceil(epochs * n / b))
        order = example_order(n, b, steps, seed)  # (steps * b,)
        params = [p for p in self.policy.parameters() if p.requires_grad]
        self.policy.train()
        totals: dict[str, float] = defaultdict(float)
        for step in range(steps):
            idx = order[step * b:(step + 1) * b]  # (b,)
            lr = self.sft_optim.lr * lr_factor(step, self.sft_optim, steps)
            for group in self.sft_opt.param_groups:
                group["lr"] = lr
            n_tokens = max(1, int(rows["loss_mask"][idx, 1:].sum()))  # answer tokens predicted in this batch
            loss_sum = 0.0
            for micro in idx.split(micro_batch_size):
                ce_sum, _ = lm_micro_loss(self.policy, rows, micro, self.device)
                (ce_sum / n_tokens).backward()
                loss_sum += float(ce_sum.detach())
            totals["sft_grad_norm"] += float(torch.nn.utils.clip_grad_norm_(params, self.sft_optim.grad_clip))
            self.sft_opt.step()
            self.sft_opt.zero_grad(set_to_none=True)
            totals["sft_loss"] += loss_sum / n_tokens
            totals["lr"] += lr
        self.version += 1
        return {**{k: v / steps for k, v in totals.items()}, "sft_steps": float(steps), "sft_rows": float(n),
                "version": float(self.version)}

    def save_sft(self, path: str | Path) -> str:
        """Write `path/policy` with the SFT optimizer, RNG and version in its train_state (rejection checkpoints)."""
        self._require_state("save_sft")
        if self.sft_opt is None:
            raise ValueError("this PolicyLearner was built without sft_optim; it has no SFT state to save")
        state = {"sft_optimizer": self.sft_opt.state_dict(), "version": self.version,
                 "torch_rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None}
        save_model(Path(path) / "policy", self.policy, self.cfg, meta={"stage": "rejection", "version": self.version},
                   train_state=state)
        return str(path)

    def load_sft(self, path: str | Path) -> int:
        """Restore what `save_sft` wrote (weights, SFT optimizer, RNG, version); returns the version."""
        if self.sft_opt is None:
            raise ValueError("this PolicyLearner was built without sft_optim; pass sft_optim to load SFT state")
        path = Path(path) / "policy"
        loaded, _, _ = load_model(path, device=self.device)
        with torch.no_grad():
            self.policy.load_state_dict(loaded.state_dict())
        state = load_train_state(path)
        if state is None or "sft_optimizer" not in state:
            raise ValueError(f"{path} has no SFT train_state; it is not a rejection-sampling checkpoint")
        self.sft_opt.load_state_dict(state["sft_optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.version = int(state["version"])
        self.state_lost = False
        return self.version

    # ------------------------------------------------------------------------------------------ checkpoints

    def save(self, path: str | Path) -> str:
        """Write `path/policy` (with optimizers, schedulers, RNG, version in its train_state) and `path/value`."""
        self._require_state("save")
        path = Path(path)
        state = {
            "policy_optimizer": self.policy_opt.state_dict(), "value_optimizer": self.value_opt.state_dict(),
            "policy_scheduler": self.policy_sched.state_dict(), "value_scheduler": self.value_sched.state_dict(),
            "version": self.version, "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
        }
        meta = {"stage": "ppo", "version": self.version}
        save_model(path / "policy", self.policy, self.cfg, meta=meta, train_state=state)
        save_model(path / "value", self.value, self.value.cfg, meta=meta)
        return str(path)

    def load(self, path: str | Path) -> int:
        """Restore what `save` wrote (weights, optimizers, schedulers, RNG, version); returns the version."""
        path = Path(path)
        with torch.no_grad():
            for model, sub in ((self.policy, "policy"), (self.value, "value")):
                loaded, _, _ = load_model(path / sub, device=self.device)
                model.load_state_dict(loaded.state_dict())
        state = load_train_state(path / "policy")
        if state is None:
            raise ValueError(f"{path / 'policy'} has no train_state.pt; it is not a PPO checkpoint")
        self.policy_opt.load_state_dict(state["policy_optimizer"])
        self.value_opt.load_state_dict(state["value_optimizer"])
        self.policy_sched.load_state_dict(state["policy_scheduler"])
        self.value_sched.load_state_dict(state["value_scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.version = int(state["version"])
        self.state_lost = False
        return self.version

    def advance_version(self, at_least: int) -> int:
        """version = max(version, at_least): label the next push no older than what generators already hold
        (after a resume from an older checkpoint, or with generators that outlived a learner)."""
        self.version = max(self.version, int(at_least))
        return self.version

    def export_policy(self, path: str | Path, tokenizer_model: str | Path | None = None,
                      meta: dict[str, Any] | None = None) -> str:
        """The policy as a complete HF-layout checkpoint (with tokenizer.model): the PPO stage's output."""
        self._require_state("export_policy")
        return str(save_model(path, self.policy, self.cfg, tokenizer_model=tokenizer_model,
                              meta={"stage": "ppo", "version": self.version, **(meta or {})}))

    def get_version(self) -> int:
        return self.version


@ray.remote
class PolicyLearnerActor(PolicyLearner):
    """Ray shell: the weights go into the object store once, from here; the driver passes the ref on."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # after a crash Ray reruns this constructor (max_restarts): SFT weights, not the run's; refuse work until
        # the loop restores a checkpoint
        self.state_lost = ray.get_runtime_context().was_current_actor_reconstructed

    def weights(self) -> tuple[Any, int, float]:  # type: ignore[override]
        state, version, checksum = super().weights()
        return ray.put(state), version, checksum

    def free_address(self) -> str:
        """A tcp:// init_method on this node (for rank 0 of the learner group)."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"tcp://{ray.util.get_node_ip_address()}:{port}"
