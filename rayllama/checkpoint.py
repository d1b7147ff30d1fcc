"""Checkpoints as Hugging Face Llama directories, written atomically.

One on-disk format for every stage (pretrain, SFT, reward, PPO) and for import/export:

    config.json          HF LlamaConfig (LlamaForCausalLM, or LlamaForSequenceClassification, num_labels 1)
    model.safetensors    the state dict, whose keys already are HF's (over 5 GB: model-0000i-of-0000n.safetensors
                         and model.safetensors.index.json, HF's sharded layout)
    tokenizer.model      SentencePiece model (copied, if given)
    tokenizer_config.json, special_tokens_map.json
                         with a tokenizer: transformers' LlamaTokenizer over tokenizer.model, its special tokens and
                         our chat template (rayllama.tokenizer.hf_tokenizer_files), so `AutoTokenizer`,
                         `apply_chat_template` and vLLM's chat API work on the directory as it is
    generation_config.json  with a tokenizer, causal only: bos / eos / pad ids, greedy by default in transformers
    rayllama.json        our meta: kind ("causal" | "scalar"), step, whatever the caller passes
    train_state.pt       optimizer / scheduler / RNG / data position (torch.save), if given

Atomicity: everything is written into a sibling temp dir `.<name>.tmp-<pid>`, each file and the dir fsynced,
then renamed into place. An existing target is first renamed aside to `.<name>.old-<pid>` and removed only
after the new one is in place. A kill at any moment therefore leaves a complete old or new checkpoint: if
it lands between the two renames, the loaders here find the complete `.old-` copy (`resolve`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rayllama.model import ModelConfig, ScalarHeadModel, Transformer
from rayllama.tokenizer import Tokenizer, hf_tokenizer_files

CONFIG, WEIGHTS, TOKENIZER, META, TRAIN_STATE = (
    "config.json", "model.safetensors", "tokenizer.model", "rayllama.json", "train_state.pt")
SAFETENSORS_INDEX, TORCH_BIN, TORCH_BIN_INDEX = (
    "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
ARCHITECTURES = {"causal": "LlamaForCausalLM", "scalar": "LlamaForSequenceClassification"}
GENERATION_CONFIG = "generation_config.json"
MAX_SHARD_BYTES = 5 * 1024**3  # HF's default shard size: a bigger model is written as sharded safetensors


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete or inconsistent with its config."""


# ---------------------------------------------------------------------------------------------- config


def hf_config_dict(cfg: ModelConfig, kind: str = "causal",
                   dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The HF LlamaConfig for `cfg` (what `LlamaConfig.to_dict()` would hold for our fields)."""
    if kind not in ARCHITECTURES:
        raise ValueError(f"checkpoint kind {kind!r} is not one of {sorted(ARCHITECTURES)}")
    dtype_name = str(dtype).removeprefix("torch.")
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURES[kind]],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "max_position_embeddings": cfg.max_seq_len,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "use_cache": True,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    if kind == "scalar":
        out.update(num_labels=1, pad_token_id=0, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    return out


def hf_generation_config(tok: Tokenizer) -> dict[str, Any]:
    """generation_config.json of a causal checkpoint with `tok`: its special ids; no sampling settings (the project
    has no chat defaults), so transformers' generate is greedy and vLLM keeps its own defaults."""
    return {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id, "do_sample": False}


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """ModelConfig from an HF Llama config.json dict; CheckpointError for what rayllama cannot run."""
    if hf.get("model_type", "llama") != "llama":
        raise CheckpointError(f"config model_type {hf.get('model_type')!r} is not 'llama'; "
                              f"only Llama is supported")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if key not in hf:
            raise CheckpointError(f"config.json lacks {key!r}; it is not a Llama config (re-export it)")
    unsupported = [k for k in ("attention_bias", "mlp_bias") if hf.get(k)]
    if unsupported or hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"config uses {unsupported or hf.get('hidden_act')}; rayllama supports "
                              f"bias-free Llama with silu only")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise CheckpointError(f"config rope_type {rope_type!r} is not supported; "
                              f"rayllama implements plain RoPE")
    cfg = ModelConfig(
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        vocab_size=hf["vocab_size"],
        ffn_dim=hf["intermediate_size"],
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        max_seq_len=hf.get("max_position_embeddings", 4096),
    )
    try:
        cfg.validate()
    except ValueError as e:
        raise CheckpointError(f"config.json: {e}") from None
    if hf.get("head_dim") not in (None, cfg.head_dim):
        raise CheckpointError(f"config head_dim {hf['head_dim']} != hidden_size / num_attention_heads "
                              f"({cfg.head_dim}); rayllama needs the standard head_dim")
    return cfg


# ---------------------------------------------------------------------------------------------- save


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _siblings(target: Path, tag: str) -> list[Path]:
    """`.<name>.<tag>-<pid>` dirs next to target, newest first."""
    found = [p for p in target.parent.glob(f".{target.name}.{tag}-*") if p.is_dir()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def _remove_stale(target: Path) -> None:
    """Remove temp/aside dirs left by dead writers (never those of a live process)."""
    for tag in ("tmp", "old"):
        for p in _siblings(target, tag):
            pid = p.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or int(pid) == os.getpid() or not _pid_alive(int(pid)):
                if tag == "old" and not target.exists():
                    continue  # the only complete copy: resolve() loads it, the next save replaces it
                shutil.rmtree(p, ignore_errors=True)


def save_model(path: str | Path, model: Transformer | ScalarHeadModel, cfg: ModelConfig, *,
               tokenizer_model: str | Path | None = None, meta: dict[str, Any] | None = None,
               train_state: dict[str, Any] | None = None, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write `model` as an HF Llama directory at `path`, atomically (see module docstring). Returns path."""
    while isinstance(getattr(model, "module", None) or getattr(model, "_orig_mod", None), nn.Module):
        model = getattr(model, "module", None) or model._orig_mod  # unwrap DDP / torch.compile
    if not isinstance(model, Transformer | ScalarHeadModel):
        raise TypeError(f"save_model wants a Transformer or ScalarHeadModel, got {type(model).__name__}")
    if model.cfg != cfg:
        raise ValueError(f"save_model cfg {cfg} differs from the model's own cfg {model.cfg}; pass model.cfg")
    kind = "scalar" if isinstance(model, ScalarHeadModel) else "causal"
    return save_state(path, model.state_dict().items(), cfg, kind, tokenizer_model=tokenizer_model, meta=meta,
                      train_state=train_state, max_shard_bytes=max_shard_bytes)


class _ShardWriter:
    """Tensors in arrival order into safetensors files of at most `max_bytes` each (one file if it all fits:
    model.safetensors; else model-0000i-of-0000n.safetensors + model.safetensors.index.json, as HF writes)."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory, self.max_bytes = directory, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes, self.total_bytes = 0, 0
        self.files: list[tuple[Path, list[str]]] = []
        self.dtype: torch.dtype | None = None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.dtype = self.dtype or tensor.dtype
        self.pending[name] = tensor.detach().contiguous().cpu()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        file = self.directory / f".part-{len(self.files) + 1:05d}.safetensors"
        save_file(self.pending, file, metadata={"format": "pt"})
        self.files.append((file, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending or not self.files:
            self._flush()
        if len(self.files) == 1:
            os.rename(self.files[0][0], self.directory / WEIGHTS)
            return
        n, weight_map = len(self.files), {}
        for i, (file, names) in enumerate(self.files, start=1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.rename(file, self.directory / final)
            weight_map.update({name: final for name in names})
        _write_json(self.directory / SAFETENSORS_INDEX,
                    {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map})


def save_state(path: str | Path, tensors: Iterable[tuple[str, torch.Tensor]], cfg: ModelConfig, kind: str, *,
               tokenizer_model: str | Path | None = None, meta: dict[str, Any] | None = None,
               train_state: dict[str, Any] | None = None, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write (name, tensor) pairs as an HF Llama directory at `path`, atomically, consuming `tensors` one at a time
    (a sharded model streams its parameters in: at most one shard file is held in memory). Over
    `max_shard_bytes` the weights are split into HF's sharded layout with its index."""
    if kind not in ARCHITECTURES:
        raise ValueError(f"checkpoint kind {kind!r} is not one of {sorted(ARCHITECTURES)}")
    if tokenizer_model is not None and not Path(tokenizer_model).is_file():
        raise CheckpointError(f"tokenizer_model {tokenizer_model} does not exist; "
                              f"pass the .model file or None")
    tok = None
    if tokenizer_model is not None:
        try:
            tok = Tokenizer(tokenizer_model)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    target = Path(path).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    aside = target.parent / f".{target.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        writer = _ShardWriter(tmp, max_shard_bytes)
        for name, tensor in tensors:
            writer.add(name, tensor)
        writer.close()
        _write_json(tmp / CONFIG, hf_config_dict(cfg, kind, writer.dtype or torch.float32))
        if tok is not None:
            shutil.copyfile(tokenizer_model, tmp / TOKENIZER)
            for name, content in hf_tokenizer_files(tok, cfg.max_seq_len).items():
                _write_json(tmp / name, content)
            if kind == "causal":
                _write_json(tmp / GENERATION_CONFIG, hf_generation_config(tok))
        if train_state is not None:
            torch.save(train_state, tmp / TRAIN_STATE)
        _write_json(tmp / META, {**(meta or {}), "kind": kind})
        for f in tmp.iterdir():
            _fsync_file(f)
        _fsync_dir(tmp)
        if target.exists():
            shutil.rmtree(aside, ignore_errors=True)
            os.rename(target, aside)
        os.rename(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if aside.exists() and not target.exists():
            os.rename(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)
    _remove_stale(target)
    return target


# ---------------------------------------------------------------------------------------------- load


def read_model_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of the checkpoint at `path` (config.json only; no tensors read)."""
    return _config(resolve(path))[1]


def resolve(path: str | Path) -> Path:
    """The directory to read for `path`: itself, or the complete copy a save killed mid-swap left aside."""
    target = Path(path).absolute()
    if target.is_dir():
        return target
    for old in _siblings(target, "old"):
        if _dir_complete(old):
            return old
    raise CheckpointError(f"checkpoint {target} does not exist; check the path (or train that stage first)")


def _check_safetensors(file: Path) -> dict[str, Any]:
    """Header check: 8-byte little-endian n, n bytes of JSON, then exactly max(data_offsets) bytes of data.
    Returns the header (tensor name -> dtype, shape, data_offsets)."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size:
                raise ValueError
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        for k, v in header.items():
            if k != "__metadata__" and not isinstance(v["shape"], list):
                raise TypeError
    except (struct.error, ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{file} is not a readable safetensors file (truncated or corrupt); "
                              f"re-save or re-download the checkpoint") from None
    if size != 8 + n + end:
        raise CheckpointError(f"{file} is truncated ({size} bytes, header says {8 + n + end}); "
                              f"re-save or re-download the checkpoint")
    return header


def _weight_files(d: Path) -> list[Path]:
    """The weight files of `d`: one safetensors, a sharded safetensors index, or pytorch_model.bin[.index]."""
    if (d / WEIGHTS).is_file():
        return [d / WEIGHTS]
    for index_name in (SAFETENSORS_INDEX, TORCH_BIN_INDEX):
        if (d / index_name).is_file():
            try:
                weight_map = json.loads((d / index_name).read_text())["weight_map"]
            except (ValueError, KeyError):
                raise CheckpointError(f"{d / index_name} is unreadable; re-save the checkpoint") from None
            files = [d / name for name in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{d} lacks shards {missing} named in {index_name}; copy them in")
            return files
    if (d / TORCH_BIN).is_file():
        return [d / TORCH_BIN]
    raise CheckpointError(f"{d} has no {WEIGHTS} (nor sharded/pytorch_model.bin weights); "
                          f"the save did not finish, re-save it")


def weights_fingerprint(path: str | Path, samples: int = 16, window: int = 1 << 16) -> str:
    """A 12-hex-digit identity of the checkpoint's weights, read in O(samples) rather than O(size): per weight
    file its name, size and `samples` evenly spaced `window`-byte reads (SHA-256 over all). Retraining changes
    essentially every weight byte, so two trainings of one architecture never share it; copies of one checkpoint
    always do. For caches derived from a model (a policy's rated samples) that must not outlive the model."""
    h = hashlib.sha256()
    for f in _weight_files(resolve(path)):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            for i in range(samples):
                fh.seek(max(0, size - window) * i // max(1, samples - 1))
                h.update(fh.read(window))
    return h.hexdigest()[:12]


def _read_config(d: Path) -> dict[str, Any]:
    if not (d / CONFIG).is_file():
        raise CheckpointError(f"{d} has no {CONFIG}; it is not a (complete) checkpoint, re-save it")
    try:
        hf = json.loads((d / CONFIG).read_text())
    except ValueError:
        raise CheckpointError(f"{d / CONFIG} is not valid JSON; re-save the checkpoint") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{d / CONFIG} holds a JSON {type(hf).__name__}, not an object; re-save the checkpoint")
    return hf


def _config(d: Path) -> tuple[dict[str, Any], ModelConfig]:
    """(config.json as a dict, its ModelConfig); errors name the file."""
    hf = _read_config(d)
    try:
        return hf, config_from_hf(hf)
    except CheckpointError as e:
        raise CheckpointError(f"{d / CONFIG}: {e}") from None


def is_complete(path: str | Path) -> bool:
    """True if `path` (or the copy `resolve` finds) holds a readable config and untruncated weight files."""
    try:
        return _dir_complete(resolve(path))
    except CheckpointError:
        return False


def _dir_complete(d: Path) -> bool:
    try:
        _config(d)
        for f in _weight_files(d):
            if f.suffix == ".safetensors":
                _check_safetensors(f)
    except CheckpointError:
        return False
    return True


def _load_state(d: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in _weight_files(d):
        if f.suffix == ".safetensors":
            _check_safetensors(f)
            try:
                state.update(load_file(f))
            except Exception as e:  # safetensors raises its own error type
                raise CheckpointError(f"{f} could not be read ({e}); re-save the checkpoint") from None
        else:
            state.update(torch.load(f, map_location="cpu", weights_only=True))
    return state


def _match_shapes(d: Path, arch: str, expected: dict[str, tuple], got: dict[str, tuple]) -> None:
    """CheckpointError unless the tensors `got` have exactly the names and shapes `expected` (from config.json)."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{d}: weights lack {missing[:3]} / have unexpected {unexpected[:3]} "
                              f"for a {arch}; the weights do not match config.json, re-export the checkpoint")
    for k, shape in expected.items():
        if tuple(got[k]) != shape:
            raise CheckpointError(f"{d}: tensor {k} has shape {tuple(got[k])} "
                                  f"but config.json implies "
                                  f"{shape}; the weights do not match config.json, re-export the checkpoint")


def verify(path: str | Path) -> Path:
    """Check a checkpoint without reading its tensors: config.json, untruncated safetensors files, and tensor
    names and shapes (from the file headers) against what config.json implies. Raises CheckpointError naming
    the first problem (what `load_model` would fail on); returns the directory. pytorch_model.bin weights are
    only checked for presence (their shapes need a full load)."""
    d = resolve(path)
    hf, cfg = _config(d)
    arch = (hf.get("architectures") or ["LlamaForCausalLM"])[0]
    kind = "scalar" if arch == ARCHITECTURES["scalar"] else "causal"
    got: dict[str, tuple] = {}
    for f in _weight_files(d):
        if f.suffix != ".safetensors":
            return d
        header = _check_safetensors(f)
        got.update({k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})
    if kind == "causal" and "lm_head.weight" not in got and "model.embed_tokens.weight" in got:
        got["lm_head.weight"] = got["model.embed_tokens.weight"]  # tied there, untied here
    with torch.device("meta"):
        model = ScalarHeadModel(cfg) if kind == "scalar" else Transformer(cfg)
    _match_shapes(d, arch, {k: tuple(v.shape) for k, v in model.state_dict().items()}, got)
    return d


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               ) -> tuple[Transformer | ScalarHeadModel, ModelConfig, dict[str, Any]]:
    """(model, cfg, meta) from a directory written by `save_model` or by transformers' `save_pretrained`.

    Builds a ScalarHeadModel for LlamaForSequenceClassification (num_labels 1), else a Transformer;
    weights are cast to `dtype` and placed on `device`; the model is returned in train mode.
    """
    d = resolve(path)
    hf, cfg = _config(d)
    arch = (hf.get("architectures") or ["LlamaForCausalLM"])[0]
    kind = "scalar" if arch == ARCHITECTURES["scalar"] else "causal"
    n_labels = hf.get("num_labels", len(hf.get("id2label") or {}) or 2)  # HF's default is 2 labels
    if kind == "scalar" and n_labels != 1:
        raise CheckpointError(f"{d / CONFIG}: sequence classifier has num_labels {n_labels}; "
                              f"reward models need 1")
    state = _load_state(d)
    if kind == "causal" and "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()  # tied there, untied here
    with torch.device("meta"):
        model = ScalarHeadModel(cfg) if kind == "scalar" else Transformer(cfg)
    _match_shapes(d, arch, {k: tuple(v.shape) for k, v in model.state_dict().items()},
                  {k: tuple(v.shape) for k, v in state.items()})
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    meta: dict[str, Any] = {"kind": kind}
    if (d / META).is_file():
        try:
            meta.update(json.loads((d / META).read_text()))
        except (ValueError, TypeError):
            raise CheckpointError(f"{d / META} is not a JSON object; re-save the checkpoint") from None
    return model, cfg, meta


def load_train_state(path: str | Path) -> dict[str, Any] | None:
    """The `train_state` dict saved with the checkpoint, or None. Uses pickle: load only your own files."""
    f = resolve(path) / TRAIN_STATE
    if not f.is_file():
        return None
    return torch.load(f, map_location="cpu", weights_only=False)
