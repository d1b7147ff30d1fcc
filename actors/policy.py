"""PolicyLearner: the PPO policy and its value model, trained with LLaMA 2's PPO settings as one FSDP2 group.

`ppo.num_learners` ranks form the learner group. Each rank holds

    policy   Transformer from the SFT checkpoint
    value    ScalarHeadModel: the helpfulness RM (ppo.value_init = "reward") or the SFT trunk with a zero head
             ("sft"), so V(s) reads every position
    two AdamW optimizers (beta 0.9 / 0.95, eps 1e-5, weight decay 0.1 from ppo.optim; constant lr by default)

built with `rayllama.dist.fsdp.build_model` after the group's process group exists (rank, world size and a tcp
rendezvous come to the constructor; gloo on CPU, NCCL on GPU): with N > 1 ranks both models are FSDP2-sharded over
the group, so a rank reads only its own rows of the checkpoints and holds 1/N of the parameters, gradients and
AdamW state; one learner has no process group and plain modules. Compute dtype `train.param_dtype`, activation
checkpointing `train.activation_checkpointing` (rayllama.config).

Training (`train`): every rank gets the whole iteration's rollouts. Each mini-batch (ppo.mini_batch_size rows of
one seeded permutation) is cut into N contiguous shares, one per rank, and each micro-batch's loss is weighted by
its share of the mini-batch's response tokens over all ranks (one all-reduce of the count) times N: FSDP
reduce-scatters the mean of the ranks' gradients, so every step is exactly one learner's step on the whole
mini-batch (the token mean), gradients clipped to ppo.optim.grad_clip per model by their global norm. The stats
are all-reduced too: every rank returns the whole mini-batch's token means. PPO-ptx (`ppo.ptx_coef` > 0, InstructGPT's
replay against forgetting): every step also draws mini_batch_size replayed SFT dialogues, shared among the ranks
the same way, and adds ptx_coef times their SFT loss (the draw's token mean) to the policy's loss.

Collectives: `train`, `logprobs`, `values`, `send_weights`, `greedy`, `save`, `load` and `export_policy` run
forwards or gather parameters, so the loop calls each on every rank of the group (rayllama.rl.ppo does). The
read-outs take each rank's share of the rows (ranks with fewer micro-batches run idle forwards to stay in step);
`greedy` and `export_policy` return rank 0's result (other ranks take part in the gathers and return None).

Weight sync (rayllama.rl.weight_sync): rank 0 is also rank 0 of the weight-sync group with the generators (a
process group of its own, over a TCPStore rank 0 serves); `send_weights` gathers the policy one parameter at a time
on every rank and rank 0 broadcasts it in buckets. A failed broadcast (a generator died or stalled) still runs
the gathers to the end, so the learner group stays in step, and drops rank 0's end of the sync group.

Checkpoints (`save` / `load`): torch.distributed.checkpoint under `<path>/train_state` (each rank writes its shards
of both models and both optimizers; schedulers, version and RNG in extra.pt; complete once its COMPLETE marker
exists), which reshards on load: a checkpoint written by 2 ranks loads into 1 and vice versa. `export_policy`
writes the complete HF directory (the stage's output), one gathered parameter at a time.

Faults: a lone learner that Ray restarts holds fresh SFT weights and refuses work (`LearnerLostError`) until the
loop restores a checkpoint. Ranks of a group are never restarted one by one (a new process cannot join the old
process group): when one is lost the loop kills the group and starts a new one (actors.group, rayllama.rl.ppo).

Rejection-sampling fine-tuning uses the same class as a policy-only learner: `PolicyLearner(policy_dir, None,
None, sft_optim=cfg.rejection.optim)` holds no value model and no PPO optimizers, and `sft_train(rows)` fine-tunes
the policy with the SFT loss on answer tokens (`rejection.num_learners` ranks, each on its share of every batch;
`save_sft` / `load_sft` checkpoint its shards with DCP as `save` / `load` do).
"""

from __future__ import annotations

import contextlib
import math
import socket
import types
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import ray
import torch

from rayllama import storage
from rayllama.checkpoint import TOKENIZER, read_model_config, save_state
from rayllama.config import OptimConfig, PPOConfig
from rayllama.dist import dcp
from rayllama.dist.fsdp import (
    build_model,
    checkpoint_kind,
    clip_grad_norm,
    compute_context,
    is_sharded,
    iter_full_state,
    join_group,
    max_over_ranks,
)
from rayllama.generation import SamplingParams, TorchEngine
from rayllama.losses import (
    entropy_from_logits,
    logprobs_from_logits,
    masked_mean,
    ppo_policy_loss,
    value_loss,
)
from rayllama.model import Transformer
from rayllama.rl.actors_api import TRAIN_STATE, LearnerLostError
from rayllama.rl.experience import (
    Experience,
    SequenceBatch,
    action_logits,
    action_values,
    micro_batches,
    mini_batches,
    to_device,
)
from rayllama.rl.weight_sync import SyncMember, open_store, place_of, send, stream_state, wire_dtype
from rayllama.train.loop import example_order, lm_micro_loss, rank_micro_batches
from rayllama.train.optim import build_optimizer, build_scheduler, lr_factor


def optimizer_steps(ppo: PPOConfig) -> int:
    """Total optimizer steps of a PPO run: iterations x epochs x (rollouts per iteration / mini_batch_size)."""
    rollouts = ppo.prompts_per_iteration * ppo.samples_per_prompt
    return max(1, ppo.iterations * ppo.epochs_per_iteration * (rollouts // ppo.mini_batch_size))


def ptx_draw(rows: dict[str, torch.Tensor], size: int, seed: int, world: int = 1
             ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """PPO-ptx's replay for one optimizer step: `rows` with min(size, N) of their indices, less the remainder over
    `world` (every rank takes an equal share, so the ranks run as many backward passes), drawn without replacement
    by `seed` (the same on every rank, so each takes its share of one draw)."""
    n = int(rows["tokens"].shape[0])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = min(size, n)
    return rows, order[:k - k % world]


def free_address() -> str:
    """A tcp:// init_method on a free port of this node (rank 0's rendezvous; run on rank 0's node)."""
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return f"tcp://{ray.util.get_node_ip_address()}:{port}"


def _action_logits(self: Transformer, batch: SequenceBatch) -> torch.Tensor:
    """(B, A, V) logits that predict each response token (rayllama.rl.experience.action_logits: lm_head on the
    hidden states at positions P - 1 .. S - 2 only). Bound to a model and registered as an FSDP forward method,
    so one call gathers the root's parameters (embedding, final norm, lm_head) for both the trunk and the head."""
    return action_logits(self, batch)


def add_action_logits(model: torch.nn.Module) -> torch.nn.Module:
    """`model.action_logits(batch)`, one FSDP forward of a sharded Transformer (a plain method of a plain one)."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    model.action_logits = types.MethodType(_action_logits, model)
    register_fsdp_forward_method(model, "action_logits")  # a no-op on a plain module
    return model


@torch.no_grad()
def read_out(model: torch.nn.Module, batch: SequenceBatch, fn: Callable[[SequenceBatch], torch.Tensor],
             micro_batch_size: int, device: torch.device, param_dtype: torch.dtype) -> torch.Tensor:
    """(B, A) fn(micro-batch) * action_mask over trimmed micro-batches of `batch` (this rank's rows), zero on
    padding, computed in `param_dtype`. Collective in a process group: every rank runs as many forwards as the
    rank with the most micro-batches (idle ones on its first micro-batch, discarded), then frees the root's
    gathered parameters (FSDP keeps the root unsharded after a forward)."""
    out = torch.zeros(len(batch), batch.num_actions)  # (B, A)
    micros = list(micro_batches(batch, micro_batch_size))
    count = max_over_ranks(len(micros), device)
    start = 0
    with compute_context(model, param_dtype, device):
        for micro in micros:
            micro = to_device(micro, device)
            values = fn(micro)  # (b, a)
            out[start:start + len(micro), :micro.num_actions] = (values * micro.action_mask).float().cpu()
            start += len(micro)
        for _ in range(count - len(micros)):
            fn(to_device(micros[0], device))
    if is_sharded(model):
        model.reshard()
    return out


@contextlib.contextmanager
def _single_process_dcp() -> Iterator[None]:
    """Silence DCP's warning that one learner (no process group) saves and loads in a single process: it does."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


class PolicyLearner:
    """Policy + value model + optimizers of one rank of the learner group (see module docstring)."""

    def __init__(self, policy_dir: str | Path, value_dir: str | Path | None, ppo_cfg: PPOConfig | None, *,
                 seed: int = 0, device: str = "cpu", threads: int | None = None, micro_batch_size: int = 16,
                 max_batch_size: int = 64, sft_optim: OptimConfig | None = None, rank: int = 0, world_size: int = 1,
                 init_method: str | None = None, param_dtype: torch.dtype | None = None,
                 activation_checkpointing: bool = False, reshard_after_forward: bool = True,
                 timeout_s: float = 600.0) -> None:
        """ppo_cfg None: a policy-only learner (no value model, no PPO optimizers); sft_optim: the AdamW settings
        of `sft_train` (rejection-sampling fine-tuning). world_size > 1: join the process group at `init_method`
        as `rank` (every rank of the group is constructed at once) before the sharded models are built."""
        if threads:
            torch.set_num_threads(threads)
        torch.manual_seed(seed)
        self.ppo, self.device, self.seed = ppo_cfg, torch.device(device), seed
        self.micro_batch_size, self.max_batch_size = micro_batch_size, max_batch_size
        self.param_dtype = param_dtype or torch.float32
        self.activation_checkpointing = activation_checkpointing
        self.reshard_after_forward = reshard_after_forward
        self.rank, self.world = rank, world_size
        if world_size > 1:
            join_group("policy-learner", rank, world_size, init_method, self.device, timeout_s)
        policy_dir = storage.local_dir(policy_dir)  # a URI: this node's copy of the run's checkpoint
        value_dir = storage.local_dir(value_dir) if value_dir is not None else None
        self.policy_dir = policy_dir
        if checkpoint_kind(policy_dir) != "causal":
            raise ValueError(f"policy checkpoint {policy_dir} is a reward model; pass the SFT (causal LM) checkpoint")
        self.cfg = read_model_config(policy_dir)
        self.policy = add_action_logits(self._build("causal", self.cfg, policy_dir))
        if ppo_cfg is not None:
            self.value = self._init_value(policy_dir, value_dir)
            total = optimizer_steps(ppo_cfg)
            self.policy_opt = build_optimizer(self.policy, ppo_cfg.optim)
            self.value_opt = build_optimizer(self.value, ppo_cfg.optim)
            self.policy_sched = build_scheduler(self.policy_opt, ppo_cfg.optim, total)
            self.value_sched = build_scheduler(self.value_opt, ppo_cfg.optim, total)
        self.sft_optim = sft_optim
        self.sft_opt = build_optimizer(self.policy, sft_optim) if sft_optim is not None else None
        self.version = 0  # +1 per train() / sft_train(): the label of the weights `weights()` publishes
        self.state_lost = False  # True in a Ray restart: refuse work until load()/restore_initial()
        self._weight_sync: SyncMember | None = None  # rank 0's end of the weight-sync group
        self._sync_store: Any = None  # rank 0 serves the group's TCPStore
        self._sync_address = ""

    def _build(self, kind: str, cfg: Any, init: str | Path) -> torch.nn.Module:
        """`kind` model of shape `cfg` from checkpoint `init`, FSDP2-sharded over the group (plain without one)."""
        return build_model(kind, cfg, device=self.device, strategy="fsdp", param_dtype=self.param_dtype,
                           activation_checkpointing=self.activation_checkpointing,
                           reshard_after_forward=self.reshard_after_forward, init=init, seed=self.seed)

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

    def _init_value(self, policy_dir: str | Path, value_dir: str | Path | None) -> torch.nn.Module:
        init = self.ppo.value_init
        if init == "sft":
            return self._build("scalar", self.cfg, policy_dir)  # SFT trunk, zero head: V = 0 at the start
        if init != "reward":
            raise ValueError(f"ppo.value_init {init!r} is not 'reward' or 'sft'")
        if value_dir is None:
            raise ValueError("ppo.value_init=reward needs the helpfulness reward model; pass its dir or set "
                             "ppo.value_init=sft")
        if checkpoint_kind(value_dir) != "scalar":
            raise ValueError(f"value model checkpoint {value_dir} is a causal LM; pass a reward model "
                             f"(or set ppo.value_init=sft)")
        value_cfg = read_model_config(value_dir)
        if value_cfg.vocab_size != self.cfg.vocab_size:
            raise ValueError(f"value model {value_dir} has vocab {value_cfg.vocab_size} but the policy "
                             f"{self.cfg.vocab_size}; they must share a tokenizer (or set ppo.value_init=sft)")
        return self._build("scalar", value_cfg, value_dir)

    # ------------------------------------------------------------------------------------------ collectives

    def _sum_over_ranks(self, values: list[float]) -> list[float]:
        """Elementwise sum of `values` over the group's ranks (float64; the values themselves on one rank)."""
        if self.world == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def _compute(self, model: torch.nn.Module) -> Any:
        """Autocast to the compute dtype for a plain module (FSDP casts a sharded one itself)."""
        return compute_context(model, self.param_dtype, self.device)

    def _gathered(self, model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]] | None:
        """`iter_full_state(model)` for rank 0; on other ranks it is drained here (each step is a collective) and
        None is returned."""
        tensors = iter_full_state(model)
        if self.rank == 0:
            return tensors
        for _ in tensors:
            pass
        return None

    # ------------------------------------------------------------------------------------------ read-outs

    def logprobs(self, batch: SequenceBatch) -> torch.Tensor:
        """(B, A) log pi_theta(a_t | s_t) of this rank's rows under the current policy (collective)."""
        self._require_state("logprobs")
        return read_out(self.policy, batch, lambda micro: logprobs_from_logits(self.policy.action_logits(micro),
                                                                               micro.actions()),
                        self.micro_batch_size, self.device, self.param_dtype)

    def values(self, batch: SequenceBatch) -> torch.Tensor:
        """(B, A) V(s_t) of this rank's rows under the current value model (collective)."""
        self._require_state("values")
        return read_out(self.value, batch, lambda micro: action_values(self.value, micro), self.micro_batch_size,
                        self.device, self.param_dtype)

    def greedy(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int,
               stop_token_ids: Sequence[int] = (2,)) -> list[list[int]] | None:
        """The current policy's greedy continuations: a TorchEngine over the live weights, or, in a group, over a
        copy gathered on rank 0 (collective; other ranks return None)."""
        model = self.policy
        if is_sharded(self.policy):
            tensors = self._gathered(self.policy)
            if tensors is None:
                return None
            with torch.device("meta"):
                model = Transformer(self.cfg)
            model.load_state_dict({k: v.to(self.device) for k, v in tensors}, strict=True, assign=True)
        engine = TorchEngine(model, self.device, self.max_batch_size)
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=tuple(stop_token_ids))
        return [samples[0].token_ids for samples in engine.generate(prompt_ids, params)]

    # ------------------------------------------------------------------------------------------ weight sync

    def open_weight_sync(self, timeout_s: float) -> str:
        """Rank 0: serve the weight-sync group's store on a free port of this node (once); returns host:port."""
        if self._sync_store is None:
            self._sync_store, self._sync_address = open_store(timeout_s)
        return self._sync_address

    def join_weight_sync(self, address: Any, rank: int, size: int, backend: Any, timeout_s: float,
                         generation: int) -> int:
        """Rank 0 joins weight-sync group `generation` as its sender (blocks until every generator joined)."""
        if self.rank != 0 or rank != 0:
            raise ValueError(f"only policy-learner rank 0 sends weights (sync rank 0); this is rank {self.rank}")
        if self._weight_sync is not None:
            self._weight_sync.close()
        self._weight_sync = None
        store = self._sync_store if backend != "local" else None
        self._weight_sync = SyncMember(address, 0, size, backend, timeout_s, generation, device=self.device,
                                       store=store)
        if not is_sharded(self.policy):  # one rank: the generators that map its memory copy straight from it
            self._weight_sync.share_params(self.policy)
        return generation

    def weight_sync_generation(self) -> int:
        return self._weight_sync.generation if self._weight_sync is not None else 0

    def weight_sync_places(self) -> list[dict[str, Any]]:
        """Where the sender (this rank) lives (rayllama.rl.weight_sync.place_of)."""
        return [place_of(self.device)]

    def send_weights(self, generation: int, bucket_mb: float, dtype: str, verify: bool) -> dict[str, Any]:
        """The policy to the generators (rayllama.rl.weight_sync.send). Collective over the learner group: every
        rank gathers the parameters one at a time; rank 0 packs and broadcasts them. Returns rank 0's report
        ({"ok", "version", ...}); other ranks {"ok": True, "version"}."""
        self._require_state("send_weights")
        tensors = iter_full_state(self.policy)
        if self.rank != 0:
            for _ in tensors:
                pass
            return {"ok": True, "version": self.version}
        try:
            member = self._weight_sync
            if member is None or member.generation != generation:
                result = {"ok": False, "version": self.version, "step": 0, "behind": [],
                          "error": f"policy-learner-0 is not in weight-sync group {generation} (restarted?)"}
            else:
                names, shapes = stream_state(self.policy)
                result = send(member, names, shapes, tensors, self.version, wire_dtype(dtype),
                              max(1, int(bucket_mb * 2**20)), verify)
        finally:
            for _ in tensors:  # the other ranks gather with this one to the end, whatever happened to the send
                pass
        if not result["ok"] and self._weight_sync is not None:
            self._weight_sync.close()  # the healthy receivers fail at once; the loop forms a new group
            self._weight_sync = None
        return result

    # ------------------------------------------------------------------------------------------ training

    def train(self, exp: Experience, seed: int = 0, ptx_rows: dict[str, torch.Tensor] | None = None
              ) -> dict[str, float]:
        """PPO update on the iteration's rollouts (every rank gets all of them): ppo.epochs_per_iteration passes,
        mini-batches of ppo.mini_batch_size rows (this rank trains on its 1/world share of each), one optimizer
        step each. With ppo.ptx_coef > 0 every step also draws ppo.mini_batch_size rows of `ptx_rows` (replayed
        SFT dialogues, `rayllama.train.data.sft_rows`; seeded by (seed, step)) and adds ptx_coef times their SFT
        loss (token mean over the draw) to the policy's loss. Returns the mean stats over the steps (the whole
        mini-batches', the same on every rank)."""
        self._require_state("train")
        size = self.ppo.mini_batch_size
        if size % self.world:
            raise ValueError(f"ppo.mini_batch_size {size} is not a multiple of num_learners {self.world}; make it "
                             f"one")
        if self.ppo.ptx_coef > 0 and (not ptx_rows or int(ptx_rows["tokens"].shape[0]) < self.world):
            raise ValueError(f"ppo.ptx_coef {self.ppo.ptx_coef} needs at least {self.world} SFT rows to replay (one "
                             f"per learner); pass ptx_rows or set it to 0")
        share = size // self.world
        self.policy.train()
        self.value.train()
        totals: dict[str, float] = defaultdict(float)
        steps = 0
        for mini in mini_batches(exp, size, self.ppo.epochs_per_iteration, seed):
            mine = mini.select(slice(self.rank * share, (self.rank + 1) * share))
            ptx = ptx_draw(ptx_rows, size, seed * 1_000 + steps, self.world) if self.ppo.ptx_coef > 0 else None
            for key, value in self._step(mine, first=steps == 0, ptx=ptx).items():
                totals[key] += value
            steps += 1
        self.version += 1
        drift_keys = ("logprob_drift", "logprob_drift_max")
        stats = {k: v / steps for k, v in totals.items() if k not in drift_keys}
        return {**stats, **{k: totals[k] for k in drift_keys}, "optimizer_steps": float(steps),
                "version": float(self.version)}

    def _step(self, mine: Experience, first: bool,
              ptx: tuple[dict[str, torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
        """One optimizer step on a mini-batch whose share `mine` is this rank's: micro-batch losses weighted by their
        share of the mini-batch's response tokens (summed over ranks) times the world size, so FSDP's mean of the
        ranks' gradients is the gradient of the token mean over the whole mini-batch. `ptx` (rows, drawn indices):
        ppo.ptx_coef times the SFT loss of the drawn rows joins the policy's gradient, each rank taking its
        contiguous share of the draw, normalised by the draw's answer tokens."""
        ppo = self.ppo
        n_tokens = self._sum_over_ranks([float(mine.action_mask.sum())])[0]
        sums: dict[str, float] = defaultdict(float)
        drift_max = 0.0
        for micro in micro_batches(mine, self.micro_batch_size):
            micro = to_device(micro, self.device)
            share = float(micro.action_mask.sum()) / n_tokens
            with self._compute(self.policy):
                logits = self.policy.action_logits(micro.batch)  # (b, a, V)
                logp = logprobs_from_logits(logits, micro.batch.actions())  # (b, a) log pi_theta
                pg_loss, pg_stats = ppo_policy_loss(logp, micro.logprobs, micro.advantages, micro.action_mask,
                                                    ppo.clip)
                values = action_values(self.value, micro.batch)  # (b, a) V_phi
                v_loss, v_stats = value_loss(values, micro.values, micro.returns, micro.action_mask, ppo.value_clip)
            ((pg_loss + ppo.value_coef * v_loss) * (share * self.world)).backward()
            with torch.no_grad():
                entropy = masked_mean(entropy_from_logits(logits), micro.action_mask)
                gap = (logp - micro.logprobs).abs() * micro.action_mask  # (b, a) |learner - engine| log-prob
                drift = masked_mean(gap, micro.action_mask)
            for key, value in (("policy_loss", pg_loss), ("value_loss", v_loss), ("entropy", entropy),
                               ("clip_fraction", pg_stats["clip_fraction"]), ("approx_kl", pg_stats["approx_kl"]),
                               ("ratio", pg_stats["ratio"]), ("value_clip_fraction", v_stats["clip_fraction"])):
                sums[key] += share * float(value.detach())
            if first:  # before the first step the learner's weights are the generator's: pure numerical drift
                sums["logprob_drift"] += share * float(drift)
                drift_max = max(drift_max, float(gap.max()))
        if ptx is not None:
            rows, idx = ptx
            n_answer = max(1, int(rows["loss_mask"][idx, 1:].sum()))  # answer tokens predicted in the whole draw
            for micro in idx.tensor_split(self.world)[self.rank].split(self.micro_batch_size):  # this rank's share
                with self._compute(self.policy):
                    ce_sum, _ = lm_micro_loss(self.policy, rows, micro, self.device)
                (ppo.ptx_coef * ce_sum / n_answer * self.world).backward()
                sums["ptx_loss"] += float(ce_sum.detach()) / n_answer
        stats = dict(zip(sums, self._sum_over_ranks(list(sums.values())), strict=True))
        if first:
            stats["logprob_drift_max"] = drift_max  # this rank's; the loop takes the max over ranks
        for model, optimizer, scheduler, name in ((self.policy, self.policy_opt, self.policy_sched, "grad_norm"),
                                                  (self.value, self.value_opt, self.value_sched, "value_grad_norm")):
            params = [p for p in model.parameters() if p.requires_grad]
            stats[name] = clip_grad_norm(params, ppo.optim.grad_clip)
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
        constant). Returns mean loss, grad norm, lr, steps, rows and the new version.

        Collective over a learner group: every rank gets all rows and trains on its share of each batch (as many
        micro-batches on every rank, balanced by padded tokens: `rank_micro_batches`), its loss normalised by the
        whole batch's answer tokens and scaled by the world size, so FSDP's mean
        of the ranks' gradients is the one learner's gradient."""
        self._require_state("sft_train")
        if self.sft_opt is None or self.sft_optim is None:
            raise ValueError("this PolicyLearner was built without sft_optim; pass sft_optim=cfg.rejection.optim")
        n = int(rows["tokens"].shape[0])
        if n < 1 or epochs <= 0 or batch_size < 1 or micro_batch_size < 1:
            raise ValueError(f"sft_train got {n} rows, epochs {epochs}, batch_size {batch_size}, micro_batch_size "
                             f"{micro_batch_size}; pass rows and positive sizes")
        b = min(batch_size, n)
        if b < self.world:  # a rank without rows would skip the backward, and FSDP's gradient reduction with it
            raise ValueError(f"a fine-tuning batch of {b} rows cannot give each of the {self.world} learners a row; "
                             f"make rejection.batch_size and prompts_per_iteration at least num_learners")
        b -= b % self.world  # equal shares: every rank runs as many backward passes (each one is a collective)
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
            for micro in rank_micro_batches(idx, rows["lengths"], micro_batch_size, self.rank, self.world):
                with self._compute(self.policy):
                    ce_sum, _ = lm_micro_loss(self.policy, rows, micro, self.device)
                (ce_sum / n_tokens * self.world).backward()
                loss_sum += float(ce_sum.detach())
            loss_sum = self._sum_over_ranks([loss_sum])[0]
            totals["sft_grad_norm"] += clip_grad_norm(params, self.sft_optim.grad_clip)
            self.sft_opt.step()
            self.sft_opt.zero_grad(set_to_none=True)
            totals["sft_loss"] += loss_sum / n_tokens
            totals["lr"] += lr
        self.version += 1
        return {**{k: v / steps for k, v in totals.items()}, "sft_steps": float(steps), "sft_rows": float(n),
                "version": float(self.version)}

    def save_sft(self, path: str | Path) -> str:
        """Write `path/train_state` (collective, as `save`): the policy's and the SFT optimizer's shards through
        torch.distributed.checkpoint, version and RNG in extra.pt, COMPLETE last (rejection checkpoints)."""
        self._require_state("save_sft")
        if self.sft_opt is None:
            raise ValueError("this PolicyLearner was built without sft_optim; it has no SFT state to save")
        extra = {"stage": "rejection", "version": self.version, "torch_rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None}
        with _single_process_dcp():
            _save_train_state(path, {"policy": (self.policy, self.sft_opt)}, extra)
        return str(path)

    def load_sft(self, path: str | Path) -> int:
        """Restore what `save_sft` wrote, by any number of ranks (collective; DCP reshards): weights, SFT
        optimizer, RNG, version. Returns the version."""
        if self.sft_opt is None:
            raise ValueError("this PolicyLearner was built without sft_optim; pass sft_optim to load SFT state")
        state_dir = _train_state_dir(path)
        if not dcp.is_complete(state_dir):
            raise ValueError(f"{state_dir} is not a complete sharded SFT train state; it is not a rejection-sampling "
                             f"checkpoint of this version (resume from another one or start the stage again)")
        with _single_process_dcp():
            extra = dcp.load_train_state(state_dir, {"policy": (self.policy, self.sft_opt)})
        if extra.get("stage") != "rejection":
            raise ValueError(f"{state_dir} holds a {extra.get('stage')!r} train state, not a rejection-sampling one")
        return self._resumed(extra)

    # ------------------------------------------------------------------------------------------ checkpoints

    def _resumed(self, extra: dict[str, Any]) -> int:
        """The RNG and version of a loaded train state's extra.pt; this learner holds the run's state again."""
        torch.set_rng_state(extra["torch_rng"])
        if extra.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(extra["cuda_rng"])
        self.version = int(extra["version"])
        self.state_lost = False
        return self.version

    def _parts(self) -> dcp.Parts:
        return {"policy": (self.policy, self.policy_opt), "value": (self.value, self.value_opt)}

    def save(self, path: str | Path) -> str:
        """Write `path/train_state` (collective): every rank's shards of policy, value and both optimizers through
        torch.distributed.checkpoint, schedulers, version and RNG in its extra.pt (rank 0's), COMPLETE last."""
        self._require_state("save")
        extra = {"stage": "ppo", "version": self.version,
                 "policy_scheduler": self.policy_sched.state_dict(), "value_scheduler": self.value_sched.state_dict(),
                 "torch_rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None}
        with _single_process_dcp():
            _save_train_state(path, self._parts(), extra)
        return str(path)

    def load(self, path: str | Path) -> int:
        """Restore what `save` wrote, by any number of ranks (collective; DCP reshards): weights, optimizers,
        schedulers, RNG, version. Returns the version."""
        state_dir = _train_state_dir(path)
        if not dcp.is_complete(state_dir):
            raise ValueError(f"{state_dir} is not a complete sharded PPO train state; it is not a PPO checkpoint "
                             f"of this version (resume from another one or start the stage again)")
        with _single_process_dcp():
            extra = dcp.load_train_state(state_dir, self._parts())
        self.policy_sched.load_state_dict(extra["policy_scheduler"])
        self.value_sched.load_state_dict(extra["value_scheduler"])
        return self._resumed(extra)

    def advance_version(self, at_least: int) -> int:
        """version = max(version, at_least): label the next push no older than what generators already hold
        (after a resume from an older checkpoint, or with generators that outlived a learner)."""
        self.version = max(self.version, int(at_least))
        return self.version

    def export_policy(self, path: str | Path, tokenizer_model: str | Path | None = None,
                      meta: dict[str, Any] | None = None) -> str | None:
        """The policy as a complete HF-layout checkpoint (with tokenizer.model: `tokenizer_model`, or None: the one
        of the checkpoint this learner started from) at `path` (a URI: written here, uploaded with its marker
        last): the stage's output. Collective: parameters are gathered one at a time and streamed into the files
        by rank 0 (other ranks return None)."""
        self._require_state("export_policy")
        if tokenizer_model is None and (self.policy_dir / TOKENIZER).is_file():
            tokenizer_model = self.policy_dir / TOKENIZER
        if tokenizer_model is not None and not Path(tokenizer_model).is_file():  # before any rank starts gathering
            raise ValueError(f"tokenizer_model {tokenizer_model} does not exist; pass the .model file or None")
        tensors = self._gathered(self.policy)
        if tensors is None:
            return None
        storage.write_complete_dir(path, lambda d: save_state(d, tensors, self.cfg, "causal",
                                                              tokenizer_model=tokenizer_model,
                                                              meta={"stage": "ppo", "version": self.version,
                                                                    **(meta or {})}))
        return str(path)

    def get_version(self) -> int:
        return self.version


def _save_train_state(path: str | Path, parts: dcp.Parts, extra: dict[str, Any]) -> None:
    """Every rank writes `path/train_state` (collective). Locally: dcp.atomic_save into a directory every rank
    sees. On an object store: each rank writes its shards into its own scratch dir and uploads them (rank 0 also
    extra.pt); the RL loop's COMPLETE marker, written once every rank returned, makes the checkpoint whole."""
    if storage.is_uri(path):
        with storage.writing_dir(storage.join(path, TRAIN_STATE)) as scratch:
            dcp.save_train_state(scratch, parts, extra)
    else:
        dcp.atomic_save(Path(path) / TRAIN_STATE, parts, extra)


def _train_state_dir(path: str | Path) -> Path:
    """`path/train_state` to read: a URI's through this node's copy of the complete checkpoint."""
    return storage.local_dir(path) / TRAIN_STATE


@ray.remote
class PolicyLearnerActor(PolicyLearner):
    """Ray shell (one process per rank)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # after a crash Ray reruns this constructor (max_restarts, lone learners only): SFT weights, not the run's;
        # refuse work until the loop restores a checkpoint
        self.state_lost = ray.get_runtime_context().was_current_actor_reconstructed
