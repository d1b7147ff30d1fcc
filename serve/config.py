"""Typed config of the chat endpoint (`configs/serve.yaml`), loaded like `rayllama.config`: OmegaConf structured
configs over the YAML file plus `key=value` overrides; every mistake is a one-line `ConfigError` naming the key,
the file (or override) and the fix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from rayllama.config import (
    PIPELINE_RANGES,
    ConfigError,
    RayConfig,
    VLLMSettings,
    check_ranges,
    load_typed,
    validate_vllm,
)

ENGINES = ("torch", "vllm", "auto")
DTYPES = ("float32", "bfloat16", "float16")


INGRESSES = ("auto", "proxy", "haproxy")


@dataclass
class HTTPConfig:
    host: str = "127.0.0.1"  # loopback only unless told otherwise (0.0.0.0 exposes it to the network)
    port: int = 8000
    # what takes the HTTP requests in: "proxy" is Ray Serve's Python proxy actor (every streamed chunk crosses it
    # and a Ray call); "haproxy" is Serve's high-throughput mode (the HAProxy that ships with Ray listens on `port`
    # and forwards to the replicas, which take HTTP themselves: direct ingress). Serve's processes take it from the
    # environment Ray started with, so python -m rayllama.serve sets that up when it starts Ray (serve.app.
    # ingress_env). "auto": haproxy when rayllama.serve starts Ray, else what the running Ray was started with
    ingress: str = "auto"


@dataclass
class ReplicaConfig:
    """Ray Serve replicas of the chat deployment and the Ray resources of each."""

    num_replicas: int = 1  # fixed replica count, unless max_replicas is set
    num_cpus: float = 1.0
    num_gpus: float = 0.0  # > 0 places each replica on a GPU (device cuda)
    max_ongoing_requests: int = 64  # per replica; more wait in Serve's queue
    # Serve autoscaling (on when max_replicas is set): replicas between min and max, scaled to keep about
    # target_ongoing_requests in flight per replica
    min_replicas: int = 1
    max_replicas: int | None = None
    target_ongoing_requests: float = 16.0


@dataclass
class LimitsConfig:
    """What one request may ask for; beyond these it gets a 4xx naming the limit."""

    max_prompt_tokens: int = 384  # chat-template tokens of the whole dialogue (413 beyond)
    max_tokens: int = 128  # the largest `max_tokens` a request may set (400 beyond)
    default_max_tokens: int = 64  # when the request sets none (capped by what the context leaves)
    max_n: int = 4  # choices per request
    max_stop: int = 4  # stop strings per request
    max_request_bytes: int = 1_000_000  # HTTP body size (413 beyond)


@dataclass
class BatchConfig:
    """Continuous batching (rayllama.generation.ContinuousBatcher; vLLM's AsyncLLM with engine vllm): requests
    join and leave the running batch at every decoding step. At most `max_rows` sequences (requests x n) run at
    once (the KV cache's slots); a request that does not fit waits; beyond `max_waiting` waiting requests a new
    one gets 429 with Retry-After `retry_after_s`."""

    max_rows: int = 64
    max_waiting: int = 256
    retry_after_s: int = 1
    # a streamed answer is sent every `stream_interval` tokens (the first token and the last at once), as vLLM's
    # --stream-interval: 1 sends each token as it is made; more means fewer, larger chunks (less work per token
    # in the replica, Ray Serve's proxy and the client: bench/serve_load.py --stream-interval)
    stream_interval: int = 1


@dataclass
class AuthConfig:
    """Bearer-token auth on /v1/*: on when `token` or `token_env` is set (/health stays open)."""

    token: str | None = None
    token_env: str | None = None  # name of an environment variable holding the token (read at startup)


@dataclass
class ServeConfig:
    # any complete checkpoint dir with tokenizer.model (the driver's policy): a path, or a URI (s3://, gs://) of one
    # the pipeline wrote there (its COMPLETE marker): each replica copies it to its node once
    model_dir: str = "runs/tiny/ppo/model"
    tokenizer_path: str | None = None  # default: <model_dir>/tokenizer.model (a path or URI)
    model_name: str = "rayllama-chat"  # the id clients pass as `model` and /v1/models lists
    default_system_prompt: str | None = None  # used when a request has no system message (GAtt's <<SYS>>)
    engine: str = "torch"
    device: str = "cpu"  # cpu | cuda
    dtype: str = "float32"  # the torch engine's; vLLM's is vllm.dtype
    torch_threads: int = 1  # intra-op threads of each replica
    app_name: str = "rayllama"
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    replicas: ReplicaConfig = field(default_factory=ReplicaConfig)
    http: HTTPConfig = field(default_factory=HTTPConfig)
    ray: RayConfig = field(default_factory=lambda: RayConfig(include_dashboard=False))
    vllm: VLLMSettings = field(default_factory=VLLMSettings)  # engine vllm / auto (the pipeline's vllm: section)


# The accepted range of every numeric key (rayllama.config.check_ranges; the ray: and vllm: rules are the
# pipeline's).
SERVE_RANGES: dict[str, str] = {
    "torch_threads": ">= 1",
    "limits.max_stop": ">= 0",
    "limits.*": ">= 1",
    "batch.*": ">= 1",
    "replicas.num_cpus": ">= 0",
    "replicas.num_gpus": ">= 0",
    "replicas.*": ">= 1",
    "http.port": "in [1, 65535]",
    **{k: v for k, v in PIPELINE_RANGES.items() if k.startswith(("ray.", "vllm."))},
}


def load_serve_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> ServeConfig:
    """Load `path` (YAML) over the defaults, apply `key=value` overrides, validate, return a ServeConfig."""
    cfg: ServeConfig = load_typed(ServeConfig, path, overrides)
    validate(cfg)
    return cfg


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(cfg: ServeConfig) -> None:
    """Semantic checks the type system cannot express; each failure names the key and the fix."""
    _check(cfg.engine in ENGINES, f"engine '{cfg.engine}' is not one of {', '.join(ENGINES)}")
    _check(cfg.device in ("cpu", "cuda"), f"device '{cfg.device}' is not cpu or cuda")
    _check(cfg.dtype in DTYPES, f"dtype '{cfg.dtype}' is not one of {', '.join(DTYPES)}")
    validate_vllm(cfg.vllm, cfg.device)
    _check(cfg.torch_threads >= 1, f"torch_threads {cfg.torch_threads} must be >= 1")
    _check(bool(cfg.model_name.strip()), "model_name is empty; set it to the id clients will send, e.g. rayllama-chat")
    lim = cfg.limits
    for name in ("max_prompt_tokens", "max_tokens", "default_max_tokens", "max_n", "max_request_bytes"):
        _check(getattr(lim, name) >= 1, f"limits.{name} {getattr(lim, name)} must be >= 1")
    _check(lim.max_stop >= 0, f"limits.max_stop {lim.max_stop} must be >= 0")
    _check(lim.default_max_tokens <= lim.max_tokens,
           f"limits.default_max_tokens {lim.default_max_tokens} exceeds limits.max_tokens {lim.max_tokens}; "
           f"lower it or raise limits.max_tokens")
    for name in ("max_rows", "max_waiting", "retry_after_s", "stream_interval"):
        _check(getattr(cfg.batch, name) >= 1, f"batch.{name} {getattr(cfg.batch, name)} must be >= 1")
    _check(cfg.limits.max_n <= cfg.batch.max_rows,
           f"limits.max_n {cfg.limits.max_n} exceeds batch.max_rows {cfg.batch.max_rows}; a request of max_n "
           f"choices must fit in the batch")
    r = cfg.replicas
    _check(r.num_replicas >= 1, f"replicas.num_replicas {r.num_replicas} must be >= 1")
    _check(r.num_cpus >= 0 and r.num_gpus >= 0, f"replicas.num_cpus {r.num_cpus} / num_gpus {r.num_gpus} must be >= 0")
    _check(r.max_ongoing_requests >= 1, f"replicas.max_ongoing_requests {r.max_ongoing_requests} must be >= 1")
    if r.max_replicas is not None:
        _check(0 <= r.min_replicas <= r.max_replicas and r.max_replicas >= 1,
               f"replicas.min_replicas {r.min_replicas} / max_replicas {r.max_replicas} need "
               f"0 <= min_replicas <= max_replicas, max_replicas >= 1")
        _check(r.target_ongoing_requests > 0,
               f"replicas.target_ongoing_requests {r.target_ongoing_requests} must be > 0")
    _check(cfg.device == "cpu" or r.num_gpus > 0,
           f"device '{cfg.device}' needs replicas.num_gpus > 0 (it is {r.num_gpus}); set replicas.num_gpus=1")
    _check(1 <= cfg.http.port <= 65535, f"http.port {cfg.http.port} must be in 1..65535")
    _check(bool(cfg.http.host), "http.host is empty; use 127.0.0.1 (local only) or 0.0.0.0 (all interfaces)")
    _check(cfg.http.ingress in INGRESSES, f"http.ingress '{cfg.http.ingress}' is not one of {', '.join(INGRESSES)}")
    if cfg.auth.token is not None:
        _check(bool(cfg.auth.token.strip()), "auth.token is empty; set a non-empty token or remove the key")
    check_ranges(cfg, SERVE_RANGES)


def resolve_auth_token(cfg: ServeConfig) -> str | None:
    """The bearer token requests must carry, or None when auth is off. `auth.token` wins over `auth.token_env`."""
    if cfg.auth.token:
        return cfg.auth.token
    if cfg.auth.token_env:
        value = os.environ.get(cfg.auth.token_env, "").strip()
        if not value:
            raise ConfigError(f"auth.token_env names ${cfg.auth.token_env}, which is unset or empty; export it "
                              f"(export {cfg.auth.token_env}=...) or remove auth.token_env")
        return value
    return None
