"""`python -m rayllama.plan CONFIG [key=value ...]`: the memory plan of a run, before Ray starts.

For every process of the configured stages (a Ray Train trainer rank of pretrain / sft / reward / GAtt's fine-tune,
a PPO learner rank holding policy + value, the reference, each reward scorer, each rollout generator) it prints
the bytes of parameters, gradients, optimizer state, FSDP's gathered copies, activations (with and without
activation checkpointing), logits and KV cache, then places the processes on cluster.nodes x
cluster.gpus_per_node GPUs of cluster.gpu_memory_gb each and checks that every GPU holds what is placed on it.
`check_plan(cfg)` raises a one-line `PlanError` when one does not; the driver calls it on cuda. It never starts
Ray and imports neither ray, vllm nor actors/. GB = 10^9 bytes (an "80 GB" A100 / H100 holds 85e9).

Per process (b micro-batch rows, s tokens per row, h = E model dim, L layers, F ffn dim, V vocabulary,
c bytes per compute element: 2 in bfloat16, 4 in float32; train.param_dtype, auto = bfloat16 on cuda):

  params, grads, optimizer  exact, from the parameter shapes (`param_shapes`: the tensors of rayllama.model's
      Transformer / ScalarHeadModel). Trainers store parameters in fp32 (FSDP2's MixedPrecisionPolicy casts them
      to the compute dtype), sharded on dim 0 over R ranks (each holds ceil(rows / R) rows of every tensor, FSDP2's
      padded shard): 4 B parameter + 4 B gradient + 8 B AdamW (exp_avg, exp_avg_sq) per local element; DDP
      (scaling.strategy ddp) keeps whole replicas (R = 1). Frozen roles hold their model in c bytes: the
      reference and each reward scorer sharded on dim 0 over their `<section>.resources.<role>.shards` N processes
      (FSDP2, parameters stored in rayllama.config.param_dtype: ceil(rows / N) rows of every tensor each; N = 1:
      the whole model), the generators whole (they load float32 today: planned in c bytes all the same).
  gathered  FSDP2 all-gathers a unit's parameters in c bytes to compute with it: the root unit (embedding, final
      norm, head), which is not resharded between forward and backward, with its unsharded gradients (c bytes)
      through backward, and two blocks (the one computing, the one prefetched) plus one block's unsharded gradient
      in c bytes and its fp32 reduce-scatter copy: root * 2c + block * (3c + 4) (every model's root, the largest
      block); with train.reshard_after_forward false every block stays gathered from its forward to its backward:
      root * 2c + L * block * c + block * (c + 4) (every model's blocks). DDP: its gradient buckets, 4 B per
      parameter. A sharded frozen role (no backward): root * c + 2 * block * c.
  activations  Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models" (eq. 1,
      t = 1): a layer keeps s*b*h*(34 + 5*a*s/h) bytes in 16-bit for backward. The 5*a*s^2*b term is the s x s
      attention scores, which SDPA's flash / memory-efficient kernels never materialise: dropped, so 34*s*b*h per
      layer, 17*s*b*h*c in general. Full activation checkpointing (their section 4) keeps each layer's input,
      s*b*h*c, and backward recomputes one layer at a time: L*s*b*h*c + 17*s*b*h*c. Padded rows (all but
      pretraining's packed ones) add the boolean SDPA mask b*s*s and its c-byte additive form, once per layer
      that keeps it (every layer without checkpointing). A no-grad forward (reference, reward scorers, generator
      prefill) keeps nothing; its peak is one block's MLP: x and its norm (2h) plus gate, up and their product (3F)
      per token, b*s*(2h + 3F)*c, plus the mask.
  logits  the head's output in c bytes plus two fp32 (rows, V) tensors at once (the upcast copy and the
      log-softmax or softmax computed from it): rows*V*(c + 8), rows = b*s; PPO's learner and reference run the LM
      head on the A = ppo.max_new_tokens response positions only (rayllama.rl.experience.action_logits): rows =
      b*A. Scalar heads: b*s*4.
  kv  generators: 2 * L * n_kv_heads * head_dim * c bytes per token, for the rows decoded at once (min(64, the
      generator's share of prompts x samples); 64 = the engines' max_batch_size) x max_seq_len tokens (prompts
      are cut to max_seq_len - max_new_tokens). The torch engine preallocates all of it. vLLM (engine vllm or auto
      on cuda) takes vllm.gpu_memory_utilization of its GPU and pages its KV cache in what its
      weights leave of that: it needs room for one max_seq_len row, and the plan reports how many rows run at once.
  context  1 GB per process on a GPU (CUDA context, cuBLAS and NCCL workspaces).

Micro-batches: pretrain/sft/gatt.micro_batch_size rows, reward 2 x reward.micro_batch_size (chosen and rejected in
one forward), counted as full-width rows (rayllama.train.loop.rank_micro_batches puts more short rows in one
micro-batch, never more padded tokens than that); the PPO learner min(ppo.micro_batch_size, ppo.mini_batch_size /
ppo.num_learners) rows of max_seq_len tokens (actors.policy.PolicyLearner's micro-batch within its share of a
mini-batch; policy and value both forward before one backward, so both keep activations), the reference 16, a
reward scorer 32 rows.

Placement: stages run one after another, so each stage's processes get the cluster to themselves (GAtt: its
sampling actors, then its fine-tune); the two reward models train at once only on whole free GPUs of their own
(rayllama.train.loop.holds_worker_groups), so each is planned as if alone. Processes are placed in role order (learners, reference, reward scorers,
generators, as actors.group creates them), first fit node by node as Ray's PACK placement group packs bundles:
num_gpus >= 1 takes that many whole GPUs on one node and uses the first (its torch device), a fraction shares a
GPU whose fractions sum to <= 1, 0 runs on the CPU. Ray places by GPU fractions only; the plan checks the bytes.
A sharded reference or reward scorer is N processes (`reference-<i>`, `reward-helpfulness-<i>`, ...), placed one by
one. A tensor-parallel vLLM generator (vllm.tensor_parallel_size T, num_gpus >= T) holds its per-GPU bytes on each
of its first T GPUs (`rollout-<i>/tp<j>`). A generator that needs more than a whole GPU even so fits no layout of
these GPUs: the stage's first problem and the verdict say so.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

from rayllama.config import (
    ActorResources,
    ConfigError,
    FrozenResources,
    PipelineConfig,
    load_config,
    model_config,
)
from rayllama.model_config import ModelConfig

GB = 1e9
CONTEXT = int(1e9)  # per process on a GPU
ENGINE_ROWS = 64  # rows a generation engine decodes at once (TorchEngine / VLLMEngine max_batch_size)
REFERENCE_MICRO = 16  # actors.reference.ReferenceModel micro_batch_size
SCORER_BATCH = 32  # actors.reward.RewardScorer batch_size
WHOLE_MODEL = ("tensor-parallel vLLM (vllm.tensor_parallel_size, with the rollout's num_gpus >= it: the model and KV "
               "cache split over that many GPUs) or GPUs with more memory (cluster.gpu_memory_gb)")


class PlanError(ValueError):
    """A stage's processes do not fit the cluster (one line: the role, bytes needed vs available, the fix)."""


# ------------------------------------------------------------------------------------------ exact model state


def param_shapes(cfg: ModelConfig, head: str = "lm") -> dict[str, tuple[int, ...]]:
    """Every parameter's shape, named and ordered as rayllama.model's Transformer (head "lm": lm_head) or
    ScalarHeadModel (head "scalar": score) registers it (Hugging Face Llama names)."""
    e, f, v, qd, kvd = cfg.dim, cfg.ffn_dim, cfg.vocab_size, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, e)}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (qd, e), p + "self_attn.k_proj.weight": (kvd, e),
                       p + "self_attn.v_proj.weight": (kvd, e), p + "self_attn.o_proj.weight": (e, qd),
                       p + "mlp.gate_proj.weight": (f, e), p + "mlp.up_proj.weight": (f, e),
                       p + "mlp.down_proj.weight": (e, f), p + "input_layernorm.weight": (e,),
                       p + "post_attention_layernorm.weight": (e,)})
    shapes["model.norm.weight"] = (e,)
    shapes.update({"lm_head.weight": (v, e)} if head == "lm" else {"score.weight": (1, e)})
    return shapes


def numel(shapes: dict[str, tuple[int, ...]], ranks: int = 1) -> int:
    """Elements one rank holds when every tensor is sharded on dim 0 over `ranks` (ceil(rows / ranks) rows each)."""
    return sum(math.ceil(s[0] / ranks) * math.prod(s[1:]) for s in shapes.values())


@dataclass(frozen=True)
class StateBytes:
    params: int
    grads: int
    optimizer: int


def state_bytes(cfg: ModelConfig, head: str = "lm", ranks: int = 1) -> StateBytes:
    """Training state per rank: fp32 parameters (4 B), fp32 gradients (4 B), AdamW exp_avg + exp_avg_sq (8 B) per
    element of the rank's dim-0 shard (ranks = 1: the whole model, what a meta-device model's tensors sum to)."""
    n = numel(param_shapes(cfg, head), ranks)
    return StateBytes(params=4 * n, grads=4 * n, optimizer=8 * n)


def _units(cfg: ModelConfig, head: str) -> tuple[int, int]:
    """(root unit elements: embedding + final norm + head, one block's elements): FSDP2's units."""
    shapes = param_shapes(cfg, head)
    block = sum(math.prod(s) for k, s in shapes.items() if k.startswith("model.layers.0."))
    return numel(shapes) - cfg.n_layers * block, block


# ------------------------------------------------------------------------------------------ roles


@dataclass
class Role:
    """One kind of process of a stage: `procs` of them, `num_gpus` each; bytes are per process."""

    stage: str
    name: str
    procs: int
    num_gpus: float
    shards: int = 1
    params: int = 0
    grads: int = 0
    optimizer: int = 0
    gathered: int = 0
    act_ckpt: int = 0
    act_full: int = 0
    logits: int = 0
    kv: int = 0
    checkpointing: bool = False
    kv_full: int = 0  # generators: KV cache of every row at once
    kv_row: int = 0  # generators: KV cache of one max_seq_len row
    rows: int = 0  # generators: rows decoded at once
    paged: bool = False  # vLLM: pages its KV cache in `share` bytes of its GPU
    share: int = 0
    batch: str = ""  # rows x tokens per forward
    fixes: str = ""
    whole_model: bool = False  # generators: the model on `tp` devices, no sharding beyond
    tp: int = 1  # tensor-parallel generators: GPUs the process's bytes are split over (each holds the figures here)

    @property
    def alone(self) -> int:
        """Bytes one process needs on a GPU by itself (vLLM: its weights and one row of KV cache)."""
        return self.total - self.kv + self.kv_row if self.paged else self.total

    @property
    def on_gpu(self) -> bool:
        return self.num_gpus > 0

    @property
    def activations(self) -> int:
        return self.act_ckpt if self.checkpointing else self.act_full

    @property
    def total(self) -> int:
        return (self.params + self.grads + self.optimizer + self.gathered + self.activations + self.logits + self.kv
                + (CONTEXT if self.on_gpu else 0))


def _compute_bytes(cfg: PipelineConfig) -> int:
    """c: bytes per compute element (train.param_dtype; auto = bfloat16 on cuda, float32 on cpu)."""
    name = cfg.train.param_dtype
    if name == "auto":
        name = "bfloat16" if cfg.device == "cuda" else "float32"
    return 2 if name == "bfloat16" else 4


def _gpus(cfg: PipelineConfig, num_gpus: float) -> float:
    """GPUs a process holds memory on: none on cpu."""
    return num_gpus if cfg.device == "cuda" else 0.0


def _mask(b: int, s: int, c: int, layers: int = 1) -> int:
    """A padded batch's boolean SDPA mask (b, 1, s, s) and its c-byte additive form in `layers` layers at once."""
    return b * s * s * (1 + layers * c)


def _train_activations(m: ModelConfig, b: int, s: int, c: int, models: int, padded: bool) -> tuple[int, int]:
    """(with checkpointing, without) for `models` models that all forward before one backward (Korthikanti)."""
    layer = 17 * s * b * m.dim * c  # 34*s*b*h bytes at c = 2
    ckpt = models * m.n_layers * s * b * m.dim * c + layer + (_mask(b, s, c) if padded else 0)
    full = models * m.n_layers * layer + (_mask(b, s, c, models * m.n_layers) if padded else 0)
    return ckpt, full


def _forward_peak(m: ModelConfig, b: int, s: int, c: int, padded: bool) -> int:
    """A no-grad forward's peak: one block's MLP, b*s*(2h + 3F)*c, and the padding mask."""
    return b * s * (2 * m.dim + 3 * m.ffn_dim) * c + (_mask(b, s, c) if padded else 0)


def _logits(m: ModelConfig, rows: int, c: int, head: str = "lm") -> int:
    """The LM head's output (c bytes) plus two fp32 copies at a time (upcast, log-softmax); a scalar head: 4 B."""
    return rows * (m.vocab_size * (c + 8) if head == "lm" else 4)


def _gathered(cfg: PipelineConfig, m: ModelConfig, heads: tuple[str, ...], c: int) -> int:
    """FSDP2 (the roots of every model, the largest block): roots * 2c + block * (3c + 4), or without resharding
    after forward roots * 2c + (every model's blocks) * c + block * (c + 4); DDP: 4 B/param."""
    if cfg.scaling.strategy == "ddp":
        return sum(4 * numel(param_shapes(m, h)) for h in heads)
    units = [_units(m, h) for h in heads]
    roots, block = sum(root for root, _ in units), max(block for _, block in units)
    if cfg.train.reshard_after_forward:
        return roots * 2 * c + block * (3 * c + 4)
    return roots * 2 * c + m.n_layers * sum(b for _, b in units) * c + block * (c + 4)


def _fixes(cfg: PipelineConfig, more: str, micro_key: str) -> str:
    """The fixes of a training process: `more` (shard wider), bf16, activation checkpointing, a smaller micro-batch."""
    out = [more]
    if _compute_bytes(cfg) == 4:
        out.append("train.param_dtype=bfloat16")
    if not cfg.train.activation_checkpointing:
        out.append("train.activation_checkpointing=true")
    if not cfg.train.reshard_after_forward and cfg.scaling.strategy == "fsdp":
        out.append("train.reshard_after_forward=true")
    return ", ".join(out) + f" or a smaller micro-batch ({micro_key})"


def training_role(cfg: PipelineConfig, m: ModelConfig, stage: str, name: str, procs: int, num_gpus: float,
                  ranks: int, b: int, s: int, heads: tuple[str, ...], logit_tokens: int, padded: bool,
                  fixes: str) -> Role:
    """A process training one model per head ("lm" / "scalar"; all forward before one backward) on b rows of s
    tokens: fp32 state sharded over `ranks` with AdamW, gathered copies, activations, the logits of the LM head on
    logit_tokens positions per row."""
    c = _compute_bytes(cfg)
    states = [state_bytes(m, h, ranks) for h in heads]
    ckpt, full = _train_activations(m, b, s, c, len(heads), padded)
    logits = _logits(m, b * logit_tokens, c) if "lm" in heads else _logits(m, b * s, c, "scalar")
    return Role(stage, name, procs, _gpus(cfg, num_gpus), ranks, sum(x.params for x in states),
                sum(x.grads for x in states), sum(x.optimizer for x in states), _gathered(cfg, m, heads, c), ckpt,
                full, logits, checkpointing=cfg.train.activation_checkpointing, batch=f"{b}x{s}", fixes=fixes)


def trainer_role(cfg: PipelineConfig, m: ModelConfig, stage: str, micro: int, seq: int, head: str = "lm") -> Role:
    """One Ray Train worker of a training stage (FSDP over scaling.num_workers, or DDP replicas). Pretraining packs
    its rows (no padding mask); SFT, reward and GAtt rows are right-padded."""
    sc = cfg.scaling
    b = 2 * micro if head == "scalar" else micro  # a reward micro-batch forwards chosen and rejected together
    return training_role(cfg, m, stage, "trainer", sc.num_workers, sc.gpus_per_worker if sc.use_gpu else 0.0,
                         sc.num_workers if sc.strategy == "fsdp" else 1, b, seq, (head,), seq, stage != "pretrain",
                         _fixes(cfg, "more GPUs to shard over (scaling.num_workers, cluster.nodes)",
                                f"{stage.removesuffix('-finetune')}.micro_batch_size"))


def learner_role(cfg: PipelineConfig, m: ModelConfig) -> Role:
    """A PPO learner rank: policy (Transformer) + value (ScalarHeadModel), each with AdamW, FSDP over
    ppo.num_learners; logits on the ppo.max_new_tokens response positions."""
    p = cfg.ppo
    b = max(1, min(p.micro_batch_size, p.mini_batch_size // p.num_learners))
    # validate: ppo.num_learners divides ppo.mini_batch_size (every learner trains on an equal share of each)
    larger = [d for d in range(p.num_learners + 1, p.mini_batch_size + 1) if p.mini_batch_size % d == 0]
    more = (f"more learners to shard over (ppo.num_learners: a divisor of ppo.mini_batch_size {p.mini_batch_size}, "
            f"e.g. {larger[0]}; at most {p.mini_batch_size})" if larger else
            f"more learners, which takes a larger ppo.mini_batch_size ({p.num_learners} learners is the most "
            f"ppo.mini_batch_size {p.mini_batch_size} allows: ppo.num_learners must divide it)")
    role = training_role(cfg, m, "ppo", "policy-learner", p.num_learners, p.resources.learner.num_gpus,
                         p.num_learners if cfg.scaling.strategy == "fsdp" else 1, b, m.max_seq_len, ("lm", "scalar"),
                         p.max_new_tokens, True, _fixes(cfg, more, "ppo.micro_batch_size"))
    return role


def rejection_learner_role(cfg: PipelineConfig, m: ModelConfig) -> Role:
    """A rank of rejection sampling's policy-only learner group (AdamW, FSDP over rejection.num_learners),
    fine-tuning on best-of-K answers."""
    r = cfg.rejection
    n = r.num_learners
    return training_role(cfg, m, "rejection", "policy-learner", n, r.resources.learner.num_gpus,
                         n if cfg.scaling.strategy == "fsdp" else 1, max(1, min(r.micro_batch_size, r.batch_size // n)),
                         m.max_seq_len, ("lm",), m.max_seq_len, True,
                         _fixes(cfg, "more learners to shard over (rejection.num_learners)",
                                "rejection.micro_batch_size"))


def frozen_role(cfg: PipelineConfig, m: ModelConfig, stage: str, name: str, res: FrozenResources, head: str,
                b: int, logit_tokens: int, key: str) -> Role:
    """The reference (head lm) or a reward scorer (head scalar), `res.shards` processes: each its 1/shards of the
    model in the compute dtype (sharded: plus the gathered root and two blocks), no grad, padded rows of up to
    max_seq_len tokens. `key`: its resources key (ppo.resources.reference, ...)."""
    c, s, n = _compute_bytes(cfg), m.max_seq_len, res.shards
    peak = _forward_peak(m, b, s, c, padded=True)
    root, block = _units(m, head)
    return Role(stage, name, n, _gpus(cfg, res.num_gpus), n, params=c * numel(param_shapes(m, head), n),
                gathered=(root + 2 * block) * c if n > 1 else 0, act_ckpt=peak, act_full=peak,
                logits=_logits(m, b * (logit_tokens if head == "lm" else s), c, head), batch=f"{b}x{s}",
                fixes=f"more shards ({key}.shards, now {n}: each process holds 1/shards of the model) or GPUs with "
                      f"more memory (cluster.gpu_memory_gb)")


def _scorers(cfg: PipelineConfig, m: ModelConfig, stage: str, res: FrozenResources, section: str) -> list[Role]:
    return [frozen_role(cfg, m, stage, f"reward-{kind}", res, "scalar", SCORER_BATCH, m.max_seq_len,
                        f"{section}.resources.reward") for kind in ("helpfulness", "safety")]


def vllm_utilization(cfg: PipelineConfig) -> float:
    """The share of its GPU's memory a vLLM generator takes: the config's vllm.gpu_memory_utilization (what every
    rollout actor's VLLMEngine is built with)."""
    return float(cfg.vllm.gpu_memory_utilization)


def generator_role(cfg: PipelineConfig, m: ModelConfig, stage: str, res: ActorResources, count: int, engine: str,
                   rows_wanted: int) -> Role:
    """Rollout generators: the whole model in the compute dtype, a KV cache, a no-grad prefill (vLLM: one row at a
    time; the torch engine: every row, left-padded), the last position's logits. vLLM (engine vllm or auto on
    cuda) takes gpu_memory_utilization of its GPU and pages its KV cache in what its weights leave of that; with
    vllm.tensor_parallel_size T each of its T GPUs holds 1/T of the weights and of the KV heads (at least one:
    heads are replicated when T > n_kv_heads), while the prefill peak and the logits are counted whole."""
    c, s = _compute_bytes(cfg), m.max_seq_len
    rows = max(1, min(ENGINE_ROWS, rows_wanted))
    vllm = engine in ("vllm", "auto") and _gpus(cfg, res.num_gpus) > 0
    tp = cfg.vllm.tensor_parallel_size if vllm else 1
    kv_row = 2 * m.n_layers * math.ceil(m.n_kv_heads / tp) * m.head_dim * c * s
    role = Role(stage, "rollout", count, _gpus(cfg, res.num_gpus), params=math.ceil(c * numel(param_shapes(m)) / tp),
                logits=_logits(m, rows, c), kv=rows * kv_row, kv_full=rows * kv_row, kv_row=kv_row, rows=rows,
                batch=f"{rows}x{s}", shards=tp, fixes=WHOLE_MODEL, whole_model=True, tp=tp)
    role.act_ckpt = role.act_full = _forward_peak(m, rows, s, c, True)
    if vllm:
        role.paged, role.share = True, int(vllm_utilization(cfg) * cfg.cluster.gpu_memory_gb * GB)
        role.act_ckpt = role.act_full = _forward_peak(m, 1, s, c, False)
        role.kv = max(kv_row, role.share - (role.total - role.kv))
    return role


def stage_roles(cfg: PipelineConfig, m: ModelConfig) -> list[list[Role]]:
    """The roles of each planned stage of cfg.stages, in order (the tokenizer needs no plan; GAtt is two)."""
    out: list[list[Role]] = []
    for stage in cfg.stages:
        if stage == "pretrain":
            out.append([trainer_role(cfg, m, stage, cfg.pretrain.micro_batch_size, cfg.pretrain.seq_len)])
        elif stage == "sft":
            out.append([trainer_role(cfg, m, stage, cfg.sft.micro_batch_size, cfg.sft.max_seq_len)])
        elif stage == "reward":
            out.append([trainer_role(cfg, m, stage, cfg.reward.micro_batch_size, cfg.reward.max_seq_len, "scalar")])
        elif stage == "ppo":
            p, res = cfg.ppo, cfg.ppo.resources
            rollouts = math.ceil(p.prompts_per_iteration * p.samples_per_prompt / p.num_generators)
            out.append([learner_role(cfg, m),
                        frozen_role(cfg, m, stage, "reference", res.reference, "lm", REFERENCE_MICRO, p.max_new_tokens,
                                    "ppo.resources.reference"),
                        *_scorers(cfg, m, stage, res.reward, "ppo"),
                        generator_role(cfg, m, stage, res.rollout, p.num_generators, p.engine, rollouts)])
        elif stage == "rejection":
            r = cfg.rejection
            rollouts = math.ceil(r.prompts_per_iteration * r.samples_per_prompt / r.num_generators)
            out.append([rejection_learner_role(cfg, m), *_scorers(cfg, m, stage, r.resources.reward, "rejection"),
                        generator_role(cfg, m, stage, r.resources.rollout, r.num_generators, r.engine, rollouts)])
        elif stage == "gatt":
            g = cfg.gatt
            rollouts = math.ceil(g.dialogues * g.samples_per_turn / g.num_generators)
            out.append([*_scorers(cfg, m, "gatt-sampling", g.resources.reward, "gatt"),
                        generator_role(cfg, m, "gatt-sampling", g.resources.rollout, g.num_generators, g.engine,
                                       rollouts)])
            out.append([trainer_role(cfg, m, "gatt-finetune", g.micro_batch_size, g.max_seq_len)])
    return out


# ------------------------------------------------------------------------------------------ placement


@dataclass
class Gpu:
    node: int
    index: int
    capacity: int
    free: float = 1.0  # Ray's GPU fraction still unclaimed
    procs: list[tuple[str, Role]] = field(default_factory=list)

    @property
    def used(self) -> int:
        return sum(r.total for _, r in self.procs)

    @property
    def label(self) -> str:
        return f"node {self.node} gpu {self.index}"


@dataclass
class StagePlan:
    stage: str
    roles: list[Role]
    gpus: list[Gpu]
    cpu: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problems: list[tuple[int, int, str]] = field(default_factory=list)  # (role index, bytes free (< 0), line)

    def _worst(self) -> dict[int, str]:
        first: dict[int, str] = {}
        for index, _, line in sorted(self.problems):
            first.setdefault(index, line)
        return first

    @property
    def role_problems(self) -> list[str]:
        """One problem per role that has any (its worst), in role order (learners, reference, scorers, generators)."""
        return list(self._worst().values())

    @property
    def blockers(self) -> list[Role]:
        """Whole-model roles (generators) that need more than a whole GPU by themselves: no layout of these GPUs
        fits the stage."""
        cap = self.gpus[0].capacity if self.gpus else 0
        return [r for r in self.roles if r.whole_model and r.on_gpu and r.alone > cap]

    @property
    def problem(self) -> str | None:
        """The stage's first problem: a blocker's, else the first role's in role order."""
        worst = self._worst()
        for role in self.blockers:
            if self.roles.index(role) in worst:
                return worst[self.roles.index(role)]
        return next(iter(worst.values()), None)

    @property
    def used_gpus(self) -> list[Gpu]:
        return [g for g in self.gpus if g.procs]


EPS = 1e-6


def _take(gpus: list[Gpu], per_node: int, num_gpus: float) -> list[Gpu]:
    """First fit: whole GPUs on one node for num_gpus >= 1, else a GPU with that fraction; [] if none."""
    if num_gpus >= 1 - EPS:
        k = math.ceil(num_gpus - EPS)
        for node in range(len(gpus) // per_node):
            whole = [g for g in gpus[node * per_node:(node + 1) * per_node] if g.free >= 1 - EPS]
            if len(whole) >= k:
                for g in whole[:k]:
                    g.free = 0.0
                return whole[:k]
        return []
    for g in gpus:
        if g.free >= num_gpus - EPS:
            g.free -= num_gpus
            return [g]
    return []


def _proc_name(role: Role, k: int) -> str:
    return f"{role.name}-{k}" if role.name in ("trainer", "policy-learner", "rollout") or role.procs > 1 else role.name


def place(cfg: PipelineConfig, roles: list[Role]) -> StagePlan:
    """Place one stage's processes on the cluster and check every GPU's bytes (see the module docstring)."""
    cl = cfg.cluster
    cap = int(cl.gpu_memory_gb * GB)
    plan = StagePlan(roles[0].stage, roles,
                     [Gpu(n, i, cap) for n in range(cl.nodes) for i in range(cl.gpus_per_node)])
    for role in roles:
        for k in range(role.procs):
            name = _proc_name(role, k)
            if not role.on_gpu:
                plan.cpu.append(name)
                continue
            taken = _take(plan.gpus, cl.gpus_per_node, role.num_gpus)
            if not taken:
                asked = sum(r.procs * r.num_gpus for r in roles if r.on_gpu)
                plan.problems.append((roles.index(role), 0, (
                    f"{plan.stage}: {name} asks for {role.num_gpus:g} GPU but the cluster's {cl.nodes} x "
                    f"{cl.gpus_per_node} GPUs are taken (the stage asks for {asked:g}); fix: more GPUs "
                    f"(cluster.nodes) or smaller asks (num_gpus, num_workers, num_learners, num_generators)")))
                return plan
            for j, gpu in enumerate(taken[:role.tp]):  # memory on the first, or on each tensor-parallel GPU
                gpu.procs.append((name if role.tp == 1 else f"{name}/tp{j}", role))
    _vllm_notes(plan, vllm_utilization(cfg))
    over = [g for g in plan.gpus if g.used > g.capacity]
    for gpu in over:
        plan.problems.append(_over_message(plan.stage, roles, gpu))
    return plan


def _vllm_notes(plan: StagePlan, utilization: float) -> None:
    """What each vLLM generator role gets: its KV rows at once, or a problem when its share cannot hold one."""
    for role in plan.roles:
        if not role.paged:
            continue
        floor = role.total - role.kv + role.kv_row
        if floor > role.share:
            plan.problems.append((plan.roles.index(role), role.share - floor, (
                f"{plan.stage}: rollout (vLLM) needs {floor / GB:.1f} GB for its weights and one row of KV cache but "
                f"gpu_memory_utilization {utilization:g} of its GPU's {plan.gpus[0].capacity / GB:.0f} GB gives "
                f"it {role.share / GB:.1f} GB; fix: {WHOLE_MODEL}")))
            continue
        at_once = min(role.rows, role.kv // role.kv_row)
        plan.notes.append(f"rollout (vLLM) takes gpu_memory_utilization {utilization:g} of its GPU "
                          f"({role.share / GB:.1f} GB): KV cache for {at_once} of its {role.rows} rows at once (all "
                          f"{role.rows}: {role.kv_full / GB:.1f} GB)")


def _over_message(stage: str, roles: list[Role], gpu: Gpu) -> tuple[int, int, str]:
    """One line: the biggest process on the GPU, what shares it, the bytes needed vs available, the fix."""
    name, role = max(gpu.procs, key=lambda p: p[1].total)
    others = [f"{n} {r.total / GB:.1f} GB" for n, r in gpu.procs if n != name]
    where = f" next to {', '.join(others)} ({gpu.used / GB:.1f} GB in all)" if others else ""
    fix = role.fixes
    if others and all(r.total <= gpu.capacity for _, r in gpu.procs):
        fix = f"fewer processes per GPU (larger num_gpus fractions, more GPUs: cluster.nodes), or shrink {name}: {fix}"
    line = (f"{stage}: {name} needs {role.total / GB:.1f} GB on {gpu.label}{where} but the GPU has "
            f"{gpu.capacity / GB:.0f} GB; fix: {fix}")
    return roles.index(role), gpu.capacity - gpu.used, line


# ------------------------------------------------------------------------------------------ the plan


@dataclass
class Plan:
    cfg: PipelineConfig
    model: ModelConfig
    source: str
    stages: list[StagePlan]

    @property
    def problems(self) -> list[str]:
        return [s.problem for s in self.stages if s.problem]

    @property
    def fits(self) -> bool:
        return not self.problems

    def table(self) -> str:
        return format_plan(self)


def build_plan(cfg: PipelineConfig, source: str = "") -> Plan:
    """Every stage's roles, placed; `Plan.problems` lists what does not fit (nothing raised)."""
    m = model_config(cfg, cfg.tokenizer.vocab_size)
    return Plan(cfg, m, source, [place(cfg, roles) for roles in stage_roles(cfg, m)])


def check_plan(cfg: PipelineConfig, source: str = "") -> Plan:
    """The plan, or a one-line PlanError naming the first stage's role that does not fit and the fix."""
    plan = build_plan(cfg, source)
    if plan.problems:
        raise PlanError(plan.problems[0])
    return plan


def _gb(n: int) -> str:
    return f"{n / GB:.1f}" if n else "-"


COLUMNS = ("stage", "role", "x", "GPUs", "shards", "batch", "params", "grads", "optim", "gather", "act ckpt", "act full",
           "logits", "kv", "total")


def format_plan(plan: Plan) -> str:
    """The table (GB per process; total counts the configured activations and 1 GB of CUDA context on a GPU),
    then each stage's placement and the verdict."""
    cfg, m = plan.cfg, plan.model
    n_params = numel(param_shapes(m))
    dtype = "bfloat16" if _compute_bytes(cfg) == 2 else "float32"
    ckpt = "on" if cfg.train.activation_checkpointing else "off"
    cl = cfg.cluster
    lines = [f"memory plan{': ' + plan.source if plan.source else ''}",
             f"model {cfg.model.preset}: {n_params / 1e9:.2f}B parameters (vocab {m.vocab_size}, max_seq_len "
             f"{m.max_seq_len}); compute {dtype}; activation checkpointing {ckpt}; scaling.strategy "
             f"{cfg.scaling.strategy}; device {cfg.device}",
             f"cluster: {cl.nodes} node(s) x {cl.gpus_per_node} GPUs x {cl.gpu_memory_gb:g} GB; sizes in GB (1e9 "
             f"bytes) per process; policy-learner = policy + value; act ckpt / act full = with / without activation "
             f"checkpointing (total counts the configured one, plus 1 GB of CUDA context on a GPU)", ""]
    rows = [COLUMNS]
    for sp in plan.stages:
        for r in sp.roles:
            rows.append((r.stage, r.name, str(r.procs), f"{r.num_gpus:g}" if r.on_gpu else "cpu",
                         f"/{r.shards}" if r.optimizer or r.shards > 1 else "-", r.batch, _gb(r.params), _gb(r.grads),
                         _gb(r.optimizer), _gb(r.gathered), _gb(r.act_ckpt), _gb(r.act_full), _gb(r.logits), _gb(r.kv), _gb(r.total)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    for row in rows:
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    lines.append("")
    for sp in plan.stages:
        lines.extend(_placement_lines(sp))
    lines.append("")
    bad = [s.stage for s in plan.stages if s.problem]
    why = [f"; no layout of {cl.gpu_memory_gb:g} GB GPUs fits {s.stage}: {', '.join(r.name for r in s.blockers)} "
           f"{'holds' if len(s.blockers) == 1 else 'each hold'} the whole model "
           f"({max(r.params for r in s.blockers) / GB:.1f} GB in {dtype} per GPU at vllm.tensor_parallel_size "
           f"{max(r.tp for r in s.blockers)}; raise it)" for s in plan.stages if s.blockers]
    lines.append(f"does not fit: {', '.join(bad)} (above){''.join(why)}" if bad else "fits")
    return "\n".join(lines)


def _placement_lines(sp: StagePlan) -> list[str]:
    used = sp.used_gpus
    head = f"{sp.stage}: "
    if used:
        peak = max(used, key=lambda g: g.used)
        nodes = len({g.node for g in used})
        head += (f"{sum(len(g.procs) for g in used)} processes on {len(used)} GPUs of {nodes} node(s), peak "
                 f"{peak.used / GB:.1f} of {peak.capacity / GB:.0f} GB on {peak.label}")
    if sp.cpu:
        head += f"{'; ' if used else ''}on CPU: {', '.join(sp.cpu)}"
    out = [head]
    if len({r.name for _, r in (p for g in used for p in g.procs)}) > 1:  # a shared layout: show every GPU
        for g in used:
            parts = " + ".join(f"{n} {r.total / GB:.1f}" for n, r in g.procs)
            out.append(f"  {g.label}: {parts} = {g.used / GB:.1f} GB")
    out.extend(f"  {note}" for note in sp.notes)
    out.extend(f"  does not fit: {line}" for line in sp.role_problems)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    try:
        cfg = load_config(argv[0], argv[1:])
    except ConfigError as e:
        print(f"rayllama.plan: error: {e}", file=sys.stderr)
        return 2
    print(build_plan(cfg, " ".join(argv)).table())  # the last line is the verdict; the driver enforces it
    return 0


if __name__ == "__main__":
    sys.exit(main())
