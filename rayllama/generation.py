"""The generation-engine interface shared by PPO rollouts and the chat endpoint, and its pure-torch engine.

`GenerationEngine` is what `actors/rollout.py` and `serve/` call: token ids in, `Completion`s out, plus a
weight update. `TorchEngine` implements it with `rayllama.model.Transformer` and a `KVCache`:

    left-pad the prompts -> prefill once -> repeat cache rows for n samples -> decode one token per step,
    dropping finished rows from the batch.

Shape symbols: B prompts in a chunk, N = B * n rows being decoded, P padded prompt length, V vocabulary.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from rayllama.model import KVCache, Transformer


@dataclass
class SamplingParams:
    """How to sample. temperature 0 is greedy (argmax); top_p is nucleus sampling over softmax(logits / T).

    `seed` seeds a torch.Generator per `generate` call, so equal calls give equal samples (None: torch's global
    RNG). Generation stops after a token in `stop_token_ids` (it is kept in the output) or `max_new_tokens`.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop_token_ids: tuple[int, ...] = (2,)
    seed: int | None = None

    def __post_init__(self) -> None:
        self.stop_token_ids = tuple(self.stop_token_ids)
        self.validate()

    def validate(self) -> SamplingParams:
        """Raise ValueError naming the bad field and its valid range; return self."""
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be an integer >= 1")
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature!r} must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1] (1 = no nucleus filtering)")
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n={self.n!r} must be an integer >= 1 (samples per prompt)")
        return self


@dataclass
class Completion:
    """One sampled continuation of one prompt.

    `logprobs[i]` is log pi(token_ids[i] | prompt, token_ids[:i]) under the *unmodified* model: log_softmax of
    the raw logits (temperature 1, no top-p), whatever the sampling parameters were. That is the policy's own
    log-probability, which PPO needs as log pi_old.
    """

    prompt_index: int  # index of the prompt in the `generate` call
    token_ids: list[int]  # generated tokens, including the stop token if it stopped on one
    logprobs: list[float]  # log pi(token) per generated token (see above)
    finish_reason: Literal["stop", "length"]  # "stop": ended on a stop token; "length": hit max_new_tokens
    weight_version: int  # the engine's weight version when this was generated


class GenerationEngine(ABC):
    """Token-level generation with swappable weights (rollouts and serving share it)."""

    @abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Completion]]:
        """Sample `params.n` completions per prompt; result[i][j] is sample j of prompts[i]."""

    @abstractmethod
    def load_weights(self, state_dict: dict[str, Tensor], version: int) -> None:
        """Replace the model's weights (same keys and shapes) and record `version`."""

    @abstractmethod
    def load_weights_stream(self, tensors: Iterable[tuple[str, Tensor]], version: int, count: int) -> None:
        """Copy `count` (name, tensor) pairs into the model in place as they arrive (a weight update streamed
        over the weight-sync group: the caller checked names and shapes), then record `version`."""

    @property
    @abstractmethod
    def weight_version(self) -> int:
        """The version passed to the last `load_weights` (0 before any)."""


def sample_tokens(logits: Tensor, temperature: float, top_p: float,
                  generator: torch.Generator | None = None) -> Tensor:
    """Next tokens (N,) from logits (N, V): argmax if temperature == 0, else a draw from softmax(logits / T)
    restricted to the nucleus: the most probable tokens whose cumulative probability, before each one, is
    below top_p (the top token always stays), renormalised."""
    if temperature == 0:
        return logits.argmax(-1)  # (N,)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (N, V)
    if top_p < 1:
        probs, order = probs.sort(dim=-1, descending=True)  # (N, V)
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)  # (N, V)
        choice = torch.multinomial(probs, 1, generator=generator)  # (N, 1)
        return order.gather(-1, choice).squeeze(-1)  # (N,)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (N,)


def check_prompts(prompts: Sequence[Sequence[int]], params: SamplingParams, cfg: Any) -> None:
    """Every engine's prompt rules: non-empty, prompt + max_new_tokens <= cfg.max_seq_len, ids in the vocab."""
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty; give at least one token (e.g. BOS)")
        if len(prompt) + params.max_new_tokens > cfg.max_seq_len:
            raise ValueError(f"prompt {i} has {len(prompt)} tokens + max_new_tokens {params.max_new_tokens} "
                             f"> max_seq_len {cfg.max_seq_len}; shorten the prompt or lower max_new_tokens")
        bad = [t for t in prompt if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token id {bad[0]} outside [0, {cfg.vocab_size}); "
                             f"use the model's tokenizer")


class TorchEngine(GenerationEngine):
    """Batched KV-cache generation with a `Transformer` in this process (CPU or one GPU).

    Prompts go in chunks of at most max(1, max_batch_size // n) prompts, so at most max_batch_size rows are
    decoded at once (a chunk always holds one prompt, even when n > max_batch_size). Results for a seed depend
    on the chunking, i.e. on max_batch_size and the order of the prompts.
    """

    def __init__(self, model: Transformer, device: str | torch.device = "cpu", max_batch_size: int = 64) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} must be >= 1")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.max_batch_size = max_batch_size
        self._version = 0

    @property
    def weight_version(self) -> int:
        return self._version

    def load_weights_stream(self, tensors: Iterable[tuple[str, Tensor]], version: int, count: int) -> None:
        if hasattr(tensors, "copies"):  # weight_sync.BucketStream: each tensor is copied before the next is taken
            tensors.copies = True  # type: ignore[attr-defined]
        own, copied = self.model.state_dict(), 0
        with torch.no_grad():
            for name, value in tensors:
                own[name].copy_(value)
                copied += 1
        if copied != count:
            raise RuntimeError(f"weight update copied {copied} of {count} tensors; the engine holds mixed weights")
        self._version = int(version)

    def load_weights(self, state_dict: dict[str, Tensor], version: int) -> None:
        """Copy `state_dict` into the model (strict: same keys, same shapes; checked before anything is copied)."""
        own = self.model.state_dict()
        missing = sorted(set(own) - set(state_dict))
        if missing:
            raise ValueError(f"state dict lacks key {missing[0]!r} ({len(missing)} missing); pass the full model")
        unexpected = sorted(set(state_dict) - set(own))
        if unexpected:
            raise ValueError(f"state dict has unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected); "
                             f"pass this model's keys only")
        for key, value in state_dict.items():
            if tuple(value.shape) != tuple(own[key].shape):
                raise ValueError(f"state dict key {key!r} has shape {tuple(value.shape)}, "
                                 f"the model needs {tuple(own[key].shape)}")
        with torch.no_grad():
            for key, value in state_dict.items():
                own[key].copy_(value)
        self._version = int(version)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Completion]]:
        params.validate()
        check_prompts(prompts, params, self.model.cfg)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        per_chunk = max(1, self.max_batch_size // params.n)
        out: list[list[Completion]] = []
        for start in range(0, len(prompts), per_chunk):
            out.extend(self._generate_chunk(prompts[start:start + per_chunk], start, params, generator))
        return out

    @torch.inference_mode()
    def _generate_chunk(self, prompts: Sequence[Sequence[int]], first_index: int, params: SamplingParams,
                        generator: torch.Generator | None) -> list[list[Completion]]:
        b, n, dev = len(prompts), params.n, self.device
        p_len = max(len(p) for p in prompts)
        tokens = torch.zeros(b, p_len, dtype=torch.long, device=dev)  # (B, P) left-padded
        attention_mask = torch.zeros(b, p_len, dtype=torch.long, device=dev)  # (B, P) 1 = real token
        for i, prompt in enumerate(prompts):
            tokens[i, p_len - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
            attention_mask[i, p_len - len(prompt):] = 1
        dtype = next(self.model.parameters()).dtype
        cache = KVCache(b, p_len + params.max_new_tokens, self.model.cfg, device=dev, dtype=dtype)

        # prefill the prompts once; LM head on the last position only
        hidden = self.model.hidden_states(tokens, attention_mask, cache)[:, -1]  # (B, E)
        logits = self.model.lm_head(hidden)  # (B, V)

        # n samples per prompt: repeat rows (prompt-major: row r is sample r % n of prompt r // n)
        repeat = torch.arange(b, device=dev).repeat_interleave(n)  # (N,)
        if n > 1:
            cache.select(repeat)
            logits, attention_mask = logits[repeat], attention_mask[repeat]  # (N, V), (N, P)
        rows = torch.arange(b * n, device=dev)  # (N,) output slot of each live row
        out_tokens: list[list[int]] = [[] for _ in range(b * n)]
        out_logprobs: list[list[float]] = [[] for _ in range(b * n)]
        finish: list[str] = ["length"] * (b * n)
        stop_ids = torch.tensor(params.stop_token_ids, dtype=torch.long, device=dev)

        for step in range(params.max_new_tokens):
            next_tokens = sample_tokens(logits, params.temperature, params.top_p, generator)  # (N,)
            logp = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
            next_logp = logp.gather(-1, next_tokens[:, None]).squeeze(-1)  # (N,)
            stopped = torch.isin(next_tokens, stop_ids)  # (N,)
            for slot, tok, lp, stop in zip(rows.tolist(), next_tokens.tolist(), next_logp.tolist(),
                                           stopped.tolist(), strict=True):
                out_tokens[slot].append(tok)
                out_logprobs[slot].append(lp)
                if stop:
                    finish[slot] = "stop"
            if step == params.max_new_tokens - 1 or bool(stopped.all()):
                break
            if bool(stopped.any()):  # drop finished rows from the batch
                keep = torch.nonzero(~stopped).squeeze(-1)  # (N',)
                cache.select(keep)
                rows, next_tokens, attention_mask = rows[keep], next_tokens[keep], attention_mask[keep]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], dim=1)  # (N, S)
            hidden = self.model.hidden_states(next_tokens[:, None], attention_mask, cache)[:, -1]  # (N, E)
            logits = self.model.lm_head(hidden)  # (N, V)

        return [
            [Completion(prompt_index=first_index + i, token_ids=out_tokens[i * n + j],
                        logprobs=out_logprobs[i * n + j], finish_reason=finish[i * n + j],  # type: ignore[arg-type]
                        weight_version=self._version)
             for j in range(n)]
            for i in range(b)
        ]
