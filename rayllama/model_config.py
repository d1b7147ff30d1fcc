"""The shape of a LLaMA 2 model and the named presets: plain data, no torch, so that config checks (the driver's
and the serve CLI's key, range and shape errors, `--dry-run`, the memory plan's arithmetic) answer without
importing it. `rayllama.model` builds the modules from these."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass
class ModelConfig:
    """Shape of a LLaMA 2 model. n_kv_heads == n_heads is MHA, 1 is MQA, anything dividing n_heads is GQA."""

    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 2
    vocab_size: int = 2000
    ffn_dim: int = 688
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 512

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def validate(self) -> ModelConfig:
        """Raise ValueError naming the bad field and the fix; return self so calls chain."""
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"model {name}={value!r} must be a positive integer")
        if self.dim % self.n_heads:
            raise ValueError(f"model dim {self.dim} is not divisible by n_heads {self.n_heads}; "
                             f"make dim a multiple of n_heads")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model n_heads {self.n_heads} is not divisible by n_kv_heads "
                             f"{self.n_kv_heads}; "
                             f"use an n_kv_heads that divides n_heads (1 = MQA, n_heads = MHA)")
        if self.head_dim % 2:
            raise ValueError(f"model head_dim {self.head_dim} (dim / n_heads) is odd; RoPE needs an even "
                             f"head_dim, change dim or n_heads")
        if not self.norm_eps > 0:
            raise ValueError(f"model norm_eps={self.norm_eps!r} must be > 0 (LLaMA 2 uses 1e-5)")
        if not self.rope_theta > 0:
            raise ValueError(f"model rope_theta={self.rope_theta!r} must be > 0 (LLaMA 2 uses 10000.0)")
        return self


def count_params(cfg: ModelConfig, lm_head: bool = True) -> int:
    """Parameter count from the shapes alone.

    per layer = E*H*D (q) + 2*E*K*D (k, v) + H*D*E (o) + 3*E*F (gate, up, down) + 2*E (two RMSNorms);
    total = n_layers * per layer + V*E (embedding) + E (final norm) [+ V*E (untied output)].
    """
    e, d = cfg.dim, cfg.head_dim
    attn = e * cfg.n_heads * d * 2 + e * cfg.n_kv_heads * d * 2
    per_layer = attn + 3 * e * cfg.ffn_dim + 2 * e
    total = cfg.n_layers * per_layer + cfg.vocab_size * e + e
    return total + (cfg.vocab_size * e if lm_head else 0)


PRESETS: dict[str, ModelConfig] = {
    # ~5.2M parameters at vocab 2000 (4.2M in the blocks): pretrains on a laptop CPU in minutes.
    "tiny": ModelConfig(dim=256, n_layers=6, n_heads=8, n_kv_heads=2, vocab_size=2000, ffn_dim=688,
                        max_seq_len=512),
    "llama2-7b": ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, vocab_size=32000,
                             ffn_dim=11008, max_seq_len=4096),
    "llama2-13b": ModelConfig(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, vocab_size=32000,
                              ffn_dim=13824, max_seq_len=4096),
    "llama2-70b": ModelConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=32000,
                              ffn_dim=28672, max_seq_len=4096),
}


def preset(name: str) -> ModelConfig:
    """A fresh copy of a named configuration (edit it freely)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name])
