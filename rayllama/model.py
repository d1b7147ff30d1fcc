"""The LLaMA 2 transformer (Touvron et al., 2023): RMSNorm, RoPE, grouped-query attention, SwiGLU, KV cache.

Reads like Meta's `llama/model.py`, but trainable, device-agnostic, with the KV cache an object passed in, and
with parameter names equal to Hugging Face `LlamaForCausalLM`'s, so `model.state_dict()` is an HF checkpoint.
RoPE uses HF's `rotate_half` layout (first half / second half of each head, not interleaved pairs), so the
weights need no permutation either way.

Shape symbols used in comments:
    B batch, T new tokens this call, S all tokens so far (cache length + T), L cache length before this call,
    H query heads, K key/value heads, D head dim, E model dim (`dim`), F feed-forward dim, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from rayllama.model_config import PRESETS, ModelConfig, count_params, preset  # noqa: F401 (re-exported)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight  (Zhang & Sennrich, 2019), computed in float32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE angles (Su et al., 2021): angle[p, i] = p * theta^(-2i/D), i < D/2, repeated for both halves.

    positions: (B, T) long -> cos, sin: (B, T, D). Computed in float32 on the fly (no buffer, so casting
    the model to bf16 never degrades the frequencies and the state dict holds weights only).
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[..., None] * inv_freq  # (B, T, D/2)
    emb = torch.cat((angles, angles), dim=-1)  # (B, T, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dim (HF layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin: a rotation by angle[p, i] of each pair (x_i, x_{i+D/2})."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]  # (B, H, T, D)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(Q K^T / sqrt(D) + mask) V: q (B, H, T, D), k, v (B, K, S, D), boolean mask broadcastable to
    (B, H, T, S) (None: causal) -> (B, H, T, D). GQA without materialising repeated K/V: SDPA maps query head h
    to KV head h // (H / K)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                          enable_gqa=k.shape[1] != q.shape[1])


class KVCache:
    """Preallocated keys and values for incremental decoding, passed into `Transformer.forward`.

    k, v: (n_layers, B, K, max_len, D). `length` is how many positions are written, shared by every row:
    rows are left-padded to a common length and the caller's attention_mask marks the padding. Each forward
    call writes T new positions in every layer, then advances `length` by T.
    """

    def __init__(self, batch_size: int, max_len: int, cfg: ModelConfig,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        if batch_size <= 0 or max_len <= 0:
            raise ValueError(f"KVCache batch_size={batch_size} and max_len={max_len} must be positive")
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (n_layers, B, K, max_len, D)
        self.v = torch.zeros(shape, device=device, dtype=dtype)  # (n_layers, B, K, max_len, D)
        self.length = 0

    @classmethod
    def for_model(cls, model: nn.Module, batch_size: int, max_len: int) -> KVCache:
        """A cache on the device and in the dtype of `model` (a Transformer), sized for `model.cfg`."""
        p = next(model.parameters())
        return cls(batch_size, max_len, model.cfg, device=p.device, dtype=p.dtype)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer_id: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this call's (B, K, T, D) keys/values after `length`; return all (B, K, L+T, D) so far."""
        end = self.length + k.shape[2]
        self.k[layer_id, :, :, self.length:end] = k
        self.v[layer_id, :, :, self.length:end] = v
        return self.k[layer_id, :, :, :end], self.v[layer_id, :, :, :end]

    def attention(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  mask: torch.Tensor | None) -> torch.Tensor:
        """Write this call's keys/values, then attend over every position so far: (B, H, T, D)."""
        k, v = self.update(layer_id, k, v)  # (B, K, L+T, D)
        return attend(q, k, v, mask)

    def advance(self, n: int) -> None:
        self.length += n

    def select(self, index: torch.Tensor) -> KVCache:
        """Keep/reorder/repeat rows in place: `index` (B',) long, e.g. the unfinished rows, or
        `torch.arange(B).repeat_interleave(n)` for n samples per prompt. Returns self."""
        index = index.to(self.k.device)
        self.k = self.k[:, index]
        self.v = self.v[:, index]
        return self

    def reset(self) -> None:
        self.length = 0


class Attention(nn.Module):
    """Causal grouped-query self-attention: softmax(Q K^T / sqrt(D) + mask) V with RoPE on Q and K."""

    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            out = attend(q, k, v, mask)  # (B, H, T, D)
        else:  # the cache writes this call's keys/values and attends over what it holds
            out = cache.attention(self.layer_id, q, k, v, mask)  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))  # (B, T, E)


class FeedForward(nn.Module):
    """SwiGLU (Shazeer, 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (B, T, E)


class TransformerBlock(nn.Module):
    """Pre-norm block: h = x + attn(norm(x)); out = h + ffn(norm(h))."""

    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer_id)  # (registration order = HF's state-dict order)
        self.mlp = FeedForward(cfg)
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)  # (B, T, E)
        return h + self.mlp(self.post_attention_layernorm(h))  # (B, T, E)


def positions_and_mask(attention_mask: torch.Tensor | None, b: int, t: int, past: int,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RoPE positions (B, T) and the SDPA boolean mask (B, 1, T, S) (None means plain causal).

    positions = cumsum(attention_mask) - 1, clamped at 0, over the last T columns, so left padding does not
    shift real tokens. Query i (absolute index L+i) may see key j iff j <= L+i and attention_mask[j] == 1;
    it may always see itself, so a padding query never has an all-masked row (no NaN; its output is unused).
    """
    s = past + t
    if attention_mask is None:
        positions = torch.arange(past, s, device=device).expand(b, t)  # (B, T)
        if past == 0:
            return positions, None
        attention_mask = torch.ones(b, s, dtype=torch.long, device=device)
    if attention_mask.shape != (b, s):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but tokens (B={b}, T={t}) "
                         f"after a cache of length {past} need ({b}, {s}); "
                         f"pass the mask for all tokens so far")
    keep = attention_mask.to(device=device, dtype=torch.bool)  # (B, S)
    positions = (keep.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T)
    if past == 0 and bool(keep.all()):
        return positions, None  # no padding: SDPA's is_causal fast path
    q_idx = torch.arange(past, s, device=device)[:, None]  # (T, 1)
    k_idx = torch.arange(s, device=device)[None, :]  # (1, S)
    mask = (k_idx <= q_idx) & keep[:, None, :]  # (B, T, S)
    mask = mask | (k_idx == q_idx)  # (B, T, S)
    return positions, mask[:, None]  # (B, 1, T, S)


class LlamaTrunk(nn.Module):
    """Embedding -> n_layers blocks -> final RMSNorm; HF's `LlamaModel` (the `model.*` keys)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg.validate()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.activation_checkpointing = False  # recompute each block in backward instead of keeping activations

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """tokens (B, T) long -> final-normed hidden states (B, T, E); writes T positions into `cache`."""
        b, t = tokens.shape
        past = 0 if cache is None else cache.length
        if past + t > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {past + t} exceeds max_seq_len {self.cfg.max_seq_len}; "
                             f"truncate the input or raise max_seq_len")
        if cache is not None and (cache.batch_size != b or past + t > cache.max_len):
            raise ValueError(f"KVCache holds {cache.batch_size} rows x {cache.max_len} positions "
                             f"({past} used) but got {b} rows x {t} new tokens; "
                             f"allocate a larger cache or select() its rows")
        h = self.embed_tokens(tokens)  # (B, T, E)
        positions, mask = positions_and_mask(attention_mask, b, t, past, tokens.device)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, h.dtype)  # (B, T, D)
        recompute = self.activation_checkpointing and cache is None and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, mask, None, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, cache)  # (B, T, E)
        if cache is not None:
            cache.advance(t)
        return self.norm(h)  # (B, T, E)


def _init_weights(module: nn.Module, std: float = 0.02) -> None:
    """N(0, std^2) for linear and embedding weights (HF's initializer_range); RMSNorm weights stay 1."""
    for m in module.modules():
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=std)


class Transformer(nn.Module):
    """LLaMA 2 causal LM: logits = lm_head(trunk(tokens)); untied output (HF `LlamaForCausalLM`)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = LlamaTrunk(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        _init_weights(self)

    def hidden_states(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      cache: KVCache | None = None) -> torch.Tensor:
        """(B, T) -> (B, T, E) final-normed hidden states. See `positions_and_mask` for the mask rules."""
        return self.model(tokens, attention_mask, cache)

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) long; attention_mask (B, S) 1 = token, 0 = pad, S = cache.length + T -> (B, T, V).
        `logits_at` (B, T) bool: the LM head runs on those positions only -> (N, V), N = logits_at.sum(), in
        row-major order (a loss that reads a few positions, e.g. SFT's answer tokens, skips the rest's head)."""
        hidden = self.hidden_states(tokens, attention_mask, cache)  # (B, T, E)
        return self.lm_head(hidden if logits_at is None else hidden[logits_at])  # (B, T, V) | (N, V)


class ScalarHeadModel(nn.Module):
    """Trunk + `score` Linear(E, 1) (HF `LlamaForSequenceClassification`, num_labels=1).

    Per-token values for PPO's value function, and the value at the last real token for reward models.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = LlamaTrunk(cfg)
        self.score = nn.Linear(cfg.dim, 1, bias=False)
        _init_weights(self)

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) -> values (B, T): score(trunk(tokens))."""
        # a tensor of its own, not squeeze's view: FSDP2 warns at every forward of a sharded model that returns a
        # view (an in-place op on one would skip its pre-backward hook)
        return self.score(self.model(tokens, attention_mask)).squeeze(-1).clone()  # (B, T)

    def last_token_score(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B,) value at the last position whose attention_mask is 1 (right or left padding alike)."""
        values = self(tokens, attention_mask)  # (B, T)
        idx = torch.arange(tokens.shape[1], device=tokens.device)  # (T,)
        last = (idx * attention_mask.to(values.device).long()).argmax(-1)  # (B,)
        return values.gather(1, last[:, None]).squeeze(1)  # (B,)

    @classmethod
    def from_transformer(cls, source: Transformer | dict[str, torch.Tensor], cfg: ModelConfig | None = None,
                         score_std: float = 0.0) -> ScalarHeadModel:
        """A scalar model whose trunk copies a causal LM's (`lm_head` dropped); score ~ N(0, score_std^2)
        (0 = zeros, so the initial reward is 0 for every input)."""
        if isinstance(source, Transformer):
            cfg = cfg or source.cfg
            source = source.state_dict()
        if cfg is None:
            raise ValueError("ScalarHeadModel.from_transformer got a state dict without cfg; "
                             "pass cfg=ModelConfig")
        model = cls(cfg)
        trunk = {k[len("model."):]: v for k, v in source.items() if k.startswith("model.")}
        model.model.load_state_dict(trunk, strict=True)
        with torch.no_grad():
            if score_std > 0:
                model.score.weight.normal_(0.0, score_std)
            else:
                model.score.weight.zero_()
        first = next(iter(trunk.values()))
        return model.to(device=first.device, dtype=first.dtype)

