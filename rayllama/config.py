"""Typed pipeline configuration.

OmegaConf structured configs (the dataclasses below) + a YAML file + `key=value` overrides from the command line.
`load_config` returns plain dataclass instances; every user mistake is a one-line `ConfigError` naming the key,
where it came from (file or overrides) and what is accepted.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

STAGES = ("tokenizer", "pretrain", "sft", "reward", "rejection", "ppo", "gatt")


class ConfigError(ValueError):
    """A user mistake in a config file or override (one line: the key, the source, the fix)."""


@dataclass
class RayConfig:
    address: Optional[str] = None  # None: start a local Ray; "auto" or "ray://host:10001" joins a cluster
    num_cpus: Optional[int] = None  # local Ray only
    include_dashboard: bool = True  # http://127.0.0.1:8265 while the driver runs
    dashboard_port: int = 8265


@dataclass
class ModelSection:
    """A preset (rayllama.model.PRESETS) plus optional per-field overrides; vocab_size comes from the tokenizer."""

    preset: str = "tiny"
    dim: Optional[int] = None
    n_layers: Optional[int] = None
    n_heads: Optional[int] = None
    n_kv_heads: Optional[int] = None
    ffn_dim: Optional[int] = None
    max_seq_len: Optional[int] = None
    norm_eps: Optional[float] = None
    rope_theta: Optional[float] = None


@dataclass
class TokenizerConfig:
    vocab_size: int = 4000
    model_path: Optional[str] = None  # an existing SentencePiece model to use instead of training one
    max_train_chars: int = 4_000_000  # characters of corpus + world text used to train it


@dataclass
class WorldConfig:
    """Sizes of what the toy assistant world writes (rayllama.data.toyworld)."""

    seed: int = 0
    n_pretrain_texts: int = 20000
    n_sft: int = 1200
    sft_error_rate: float = 0.3
    n_preference: int = 3000  # per kind (helpfulness, safety)
    n_preference_heldout: int = 600
    n_rl_prompts: int = 2000
    n_gatt: int = 400
    n_eval_safe: int = 200
    n_eval_unsafe: int = 100
    n_eval_borderline: int = 100
    n_eval_gatt: int = 40
    gatt_turns: int = 6


@dataclass
class ScalingSection:
    """Ray Train workers for the pretrain / SFT / reward stages."""

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 0.5  # fractional so the driver's actors and the trainer fit on 2 cores
    gpus_per_worker: float = 1.0  # used only when use_gpu
    start_timeout_s: float = 120.0  # fail with a clear message when the workers cannot be placed


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


@dataclass
class SFTConfig:
    epochs: float = 2.0
    batch_size: int = 64
    micro_batch_size: int = 32
    max_seq_len: int = 256
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-5, warmup_ratio=0.03))
    checkpoint_every: int = 50
    log_every: int = 5


@dataclass
class RewardConfig:
    epochs: float = 1.0
    batch_size: int = 32  # preference pairs per optimizer step
    micro_batch_size: int = 16
    max_seq_len: int = 256
    margin: str = "small"  # none | small | large (LLaMA 2, Table 28)
    safety_helpfulness_share: float = 0.1  # share of helpfulness pairs mixed into the safety RM's data
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-5, warmup_ratio=0.03, warmup_steps=5)
    )
    checkpoint_every: int = 50
    log_every: int = 5


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
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)


def _accepted_keys(node_type: Any) -> str:
    if dataclasses.is_dataclass(node_type):
        return ", ".join(f.name for f in dataclasses.fields(node_type))
    return "?"


def _dataclass_at(path: str) -> Any:
    """The dataclass type that holds the keys under a dotted path ('' is the root)."""
    node: Any = PipelineConfig
    for part in [p for p in path.split(".") if p]:
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            return None
        default = fields[part].default_factory() if fields[part].default_factory is not dataclasses.MISSING else None
        node = type(default) if dataclasses.is_dataclass(default) else None
        if node is None:
            return None
    return node


def _translate(err: Exception, source: str) -> ConfigError:
    """Turn an OmegaConf error into one line: the key, the source and the accepted keys or type."""
    from omegaconf.errors import ConfigKeyError, ValidationError

    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, ConfigKeyError):
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        holder = _dataclass_at(parent)
        where = f"under '{parent}'" if parent else "at the top level"
        return ConfigError(
            f"unknown config key '{key}' in {source}; accepted keys {where}: {_accepted_keys(holder)}"
        )
    if isinstance(err, ValidationError):
        msg = str(err).splitlines()[0]
        return ConfigError(f"bad value for config key '{key}' in {source}: {msg}")
    return ConfigError(f"invalid config in {source}: {str(err).splitlines()[0]}")


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Load `path` (YAML) over the defaults, apply `key=value` overrides, validate, return dataclasses."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    merged = OmegaConf.structured(PipelineConfig)
    if path is not None:
        path = Path(path)
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
        try:
            merged = OmegaConf.merge(merged, OmegaConf.create(loaded or {}))
        except OmegaConfBaseException as e:
            raise _translate(e, f"config file '{path}'") from None
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. pretrain.steps=100)")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            raise _translate(e, f"override '{item}'") from None
    try:
        cfg: PipelineConfig = OmegaConf.to_object(merged)  # resolves ${...} interpolations
    except OmegaConfBaseException as e:
        raise _translate(e, f"config '{path}'") from None
    validate(cfg)
    return cfg


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(cfg: PipelineConfig) -> None:
    """Semantic checks the type system cannot express; each failure names the key and the fix."""
    from rayllama.model import PRESETS

    for s in cfg.stages:
        _check(s in STAGES, f"unknown stage '{s}' in stages; accepted stages: {', '.join(STAGES)}")
    order = [STAGES.index(s) for s in cfg.stages if s in STAGES]
    _check(len(set(cfg.stages)) == len(cfg.stages), f"stages {cfg.stages} lists a stage twice; list each once")
    # rejection and ppo may come in either order (rejection -> ppo is LLaMA 2's chain); the rest keep STAGES order
    core = [i for i in order if STAGES[i] not in ("rejection", "ppo")]
    _check(core == sorted(core), f"stages {cfg.stages} are out of order; use the order {', '.join(STAGES)}")
    _check(cfg.model.preset in PRESETS, f"unknown model.preset '{cfg.model.preset}'; accepted: {', '.join(PRESETS)}")
    _check(cfg.device in ("cpu", "cuda"), f"device '{cfg.device}' is not cpu or cuda")
    _check(cfg.scaling.num_workers >= 1, f"scaling.num_workers {cfg.scaling.num_workers} must be >= 1")
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
    _check(0.0 <= cfg.world.sft_error_rate < 1.0, f"world.sft_error_rate {cfg.world.sft_error_rate} must be in [0, 1)")


def model_config(cfg: PipelineConfig, vocab_size: int):
    """The ModelConfig for this pipeline: the preset, then per-field overrides, then the tokenizer's vocab size."""
    from rayllama.model import preset

    base = preset(cfg.model.preset)
    changes = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k != "preset" and v is not None}
    changes["vocab_size"] = vocab_size
    model_cfg = dataclasses.replace(base, **changes)
    model_cfg.validate()
    return model_cfg


def to_yaml(cfg: PipelineConfig) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
