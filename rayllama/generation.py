"""The generation-engine interface shared by PPO rollouts and the chat endpoint, and its pure-torch engine.

`GenerationEngine` is what `actors/rollout.py` and `serve/` call: token ids in, `Completion`s out, plus a
weight update. `TorchEngine` implements it with `rayllama.model.Transformer` and a `ContinuousBatcher`, a
step-level scheduler with a slot KV cache (one slot = one sequence's keys/values, at its own length; running
row i lives in slot i, so a decode step attends through a view of the first N slots, no copy):

    every step: drop aborted requests -> admit waiting requests whose rows fit -> one forward over every running
    row's last token and the admitted prompts (packed into one batch of single tokens, so they share each
    matmul, as vLLM's chunked prefill does; the prompts go into the slots after the running ones, then each
    prompt's cache is copied into its n sample slots) -> sample one token for every row with its own request's
    settings -> finish rows (stop token, stop string, max_new_tokens) and fill their slots with the last
    running rows.

So requests join and leave the running batch at every step. `TorchEngine.generate` (rollouts) submits its
prompts and steps until they are done; the chat endpoint drives the same batcher from its engine thread and
streams each step's tokens.

Shape symbols: N running rows, P admitted prompts, p_len padded prompt length, S attended length, V vocabulary,
R cache slots, L cache positions per slot.
"""

from __future__ import annotations

import itertools
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from rayllama.model import Transformer, attend, rope_cos_sin


@dataclass
class SamplingParams:
    """How to sample. temperature 0 is greedy (argmax); top_p is nucleus sampling over softmax(logits / T).

    `seed` seeds a torch.Generator per `generate` call (per request in the batcher), so equal calls give equal
    samples (None: torch's global RNG). Generation stops after a token in `stop_token_ids` (it is kept in the
    output), once the decoded text contains one of `stop` (checked every step; needs the batcher's `decode`), or
    after `max_new_tokens`. presence/frequency penalties follow OpenAI: logits[t] -= presence * [t generated]
    + frequency * count(t generated), before temperature; they change the sampling, not the reported logprobs.
    `top_logprobs` k > 0 also records the k most likely tokens' raw logprobs at every step.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop_token_ids: tuple[int, ...] = (2,)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        self.stop_token_ids = tuple(self.stop_token_ids)
        self.stop = tuple(self.stop)
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
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name}={getattr(self, name)!r} must be in [-2, 2] (0 = off)")
        if not isinstance(self.top_logprobs, int) or self.top_logprobs < 0:
            raise ValueError(f"top_logprobs={self.top_logprobs!r} must be an integer >= 0")
        if any(not s for s in self.stop):
            raise ValueError("stop holds an empty string; every stop string needs at least one character")
        return self

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0


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
    finish_reason: Literal["stop", "length"]  # "stop": a stop token or stop string; "length": max_new_tokens
    weight_version: int  # the engine's weight version when this was generated
    # per generated token, the top_logprobs most likely (token, raw logprob) pairs, best first (None: not asked)
    top_logprobs: list[list[tuple[int, float]]] | None = None


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
        return order.gather(-1, draw(probs, generator)[:, None]).squeeze(-1)  # (N,)
    return draw(probs, generator)  # (N,)


def draw(weights: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One index per row of `weights` (N, V) (non-negative, any total), with probability weight / row total: by
    inverting the cumulative sum at one uniform draw per row. torch.multinomial draws an exponential variate per
    vocabulary entry instead: 2.7 ms for 64 rows of 2000 entries on one CPU thread against 0.15 ms here, 47 ms
    against 2 ms at Llama 2's 32000."""
    cdf = weights.cumsum(-1)  # (N, V)
    u = torch.rand(weights.shape[0], 1, generator=generator, device=weights.device, dtype=cdf.dtype)  # (N, 1)
    # the first index whose cumulative weight exceeds u * total: an index of zero weight is never chosen
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=weights.shape[-1] - 1).squeeze(-1)


def check_request(prompts: Sequence[Sequence[int]], params: SamplingParams, cfg: Any) -> None:
    """Every engine's request rules (ValueError naming the bad field or prompt): the sampling settings (they may
    have been changed since they were made), then each prompt non-empty, prompt + max_new_tokens <=
    cfg.max_seq_len, ids in the vocab."""
    params.validate()
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


@dataclass
class TokenEvent:
    """One step's output for one row of a request: what a streaming client is sent."""

    index: int  # the row within its request: prompt i, sample j -> i * n + j
    token: int
    logprob: float  # raw log pi(token) (see Completion)
    top_logprobs: list[tuple[int, float]] | None  # the k best (token, raw logprob), if the request asked
    finish_reason: str | None  # "stop" | "length" when this token ends the row, else None


@dataclass
class Request:
    """Prompts sharing one SamplingParams and one RNG, admitted (and prefilled) together; row i * n + j is sample j
    of prompts[i]. `on_event` is called from the stepping thread with each step's TokenEvents of this request."""

    prompts: list[list[int]]
    params: SamplingParams
    generator: torch.Generator | None = None
    first_index: int = 0  # Completion.prompt_index of prompts[0]
    on_event: Callable[[list[TokenEvent]], None] | None = None
    id: int = field(default_factory=itertools.count().__next__)
    completions: list[Completion | None] = field(default_factory=list)
    aborted: bool = False

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.params.n

    @property
    def done(self) -> bool:
        return self.aborted or (len(self.completions) == self.rows and all(c is not None for c in self.completions))

    def results(self) -> list[list[Completion]]:
        """result[i][j]: sample j of prompts[i] (only once `done` and not aborted)."""
        n = self.params.n
        return [self.completions[i * n:(i + 1) * n] for i in range(len(self.prompts))]  # type: ignore[misc]


@dataclass
class _Row:
    request: Request
    index: int  # i * n + j within the request
    length: int  # positions written in its slot (prompt + generated tokens fed back so far)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    text_checked: int = 0  # characters of decoded text already searched for stop strings


class _SlotCache:
    """Keys/values of R sequences, each in its own slot at its own length: k, v (n_layers, R, K, L, D).

    Grows (copying) when a request needs more slots or positions than allocated, up to max_seq_len positions;
    `bind` makes the view the model's attention layers write through for one forward."""

    def __init__(self, model: Transformer) -> None:
        self.cfg = model.cfg
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.k = self.v = torch.zeros(0)
        self.slots, self.length = 0, 0

    def ensure(self, slots: int, length: int) -> None:
        if slots <= self.slots and length <= self.length:
            return
        length = -(-length // 64) * 64  # whole blocks of 64 positions: fewer regrowths
        slots, length = max(slots, self.slots), min(max(length, self.length), self.cfg.max_seq_len)
        shape = (self.cfg.n_layers, slots, self.cfg.n_kv_heads, length, self.cfg.head_dim)
        k = torch.zeros(shape, device=self.device, dtype=self.dtype)
        v = torch.zeros(shape, device=self.device, dtype=self.dtype)
        if self.slots:
            k[:, :self.slots, :, :self.length] = self.k
            v[:, :self.slots, :, :self.length] = self.v
        self.k, self.v, self.slots, self.length = k, v, slots, length

    def copy_slots(self, src: list[int], dst: list[int]) -> None:
        """Slot dst[i] := slot src[i] (no slot is both a source and a destination)."""
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]


class _StepView:
    """The `cache` argument of the attention layers for one step's forward, which packs two kinds of token as
    rows of length one (T == 1): first one token for each of the N running rows, at its own position starts[b]
    of slot b (attending to positions 0..starts[b] of its slot); then the right-padded prompts of the admitted
    requests, P prompts x p_len tokens, prompt i at positions 0..p_len-1 of slot N + i (causal attention within
    the prompt). Running rows and prompts share every linear layer's one matmul; attention is per kind. `mask`
    (the layers' argument) is unused: each kind's mask is known here."""

    def __init__(self, cache: _SlotCache, starts: Tensor, prompts: int, p_len: int) -> None:
        self.cache, self.starts, self.prompts, self.p_len = cache, starts, prompts, p_len
        self.attended = int(starts.max()) + 1 if len(starts) else 0
        # key j is visible to row b iff j <= starts[b] (its prompt, its tokens so far, and itself)
        self.mask = (torch.arange(self.attended, device=starts.device)[None, :] <= starts[:, None])[:, None, None]

    def attention(self, layer_id: int, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """q (N + P * p_len, H, 1, D), k, v (N + P * p_len, K, 1, D) -> (N + P * p_len, H, 1, D)."""
        b, outs = len(self.starts), []
        if b:
            ck = self.cache.k[layer_id, :b]  # (N, K, L, D) view
            cv = self.cache.v[layer_id, :b]
            rows = torch.arange(b, device=k.device)
            ck[rows, :, self.starts] = k[:b, :, 0]  # (N, K, D) at each row's own position
            cv[rows, :, self.starts] = v[:b, :, 0]
            outs.append(attend(q[:b], ck[:, :, :self.attended], cv[:, :, :self.attended], self.mask))  # (N, H, 1, D)
        if self.prompts:
            n, t = self.prompts, self.p_len
            qp, kp, vp = (x[b:].view(n, t, x.shape[1], x.shape[3]).transpose(1, 2) for x in (q, k, v))  # (P, ., t, D)
            self.cache.k[layer_id, b:b + n, :, :t] = kp
            self.cache.v[layer_id, b:b + n, :, :t] = vp
            # causal: a real token never sees the padding after it, so right padding needs no mask
            out = attend(qp, kp, vp, None)  # (P, H, t, D)
            outs.append(out.transpose(1, 2).reshape(n * t, out.shape[1], 1, out.shape[3]))
        return outs[0] if len(outs) == 1 else torch.cat(outs)


class ContinuousBatcher:
    """Step-level scheduling of generation requests over one model (see the module docstring).

    The KV cache is bounded: at most `max_rows` sequences run at once (a request is admitted whole, when all of
    its rows fit; a lone request larger than max_rows runs by itself), each slot at most max_seq_len positions.
    Waiting requests are admitted first come, first served. `submit` and `abort` may be called from any thread;
    `step` from one thread at a time (it holds a lock). `decode` (token ids -> text) is needed for stop strings.
    """

    def __init__(self, model: Transformer, max_rows: int = 64,
                 decode: Callable[[list[int]], str] | None = None) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows={max_rows} must be >= 1")
        self.model, self.max_rows, self.decode = model, max_rows, decode
        self.device = next(model.parameters()).device
        self.cache = _SlotCache(model)
        self.version = 0  # weight version stamped on the Completions
        self._waiting: deque[Request] = deque()
        self._rows: list[_Row] = []  # running rows; row i lives in cache slot i
        self.stepped = 0  # rows that sampled a token in the last step (running, before its finished rows left)
        self._lock, self._step_lock = threading.Lock(), threading.Lock()

    # ------------------------------------------------------------------------------------------- queue

    def submit(self, request: Request) -> Request:
        """Queue `request` (validated here: ValueError names the bad field or prompt)."""
        check_request(request.prompts, request.params, self.model.cfg)
        if request.params.stop and self.decode is None:
            raise ValueError("stop strings need a tokenizer: build the ContinuousBatcher with decode=")
        request.completions = [None] * request.rows
        with self._lock:
            self._waiting.append(request)
        return request

    def abort(self, request: Request) -> None:
        """Stop generating for `request`; its rows leave the batch at the start of the next step."""
        request.aborted = True

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Rows (sequences) in the running batch."""
        return len(self._rows)

    @property
    def has_work(self) -> bool:
        return bool(self._rows or self._waiting)

    def reset(self) -> None:
        """Abort every running and waiting request and free all slots (after a failed step)."""
        with self._lock:
            for r in [*self._waiting, *(row.request for row in self._rows)]:
                r.aborted = True
            self._waiting.clear()
        self._rows = []

    def run_until_done(self, requests: Sequence[Request]) -> None:
        while not all(r.done for r in requests):
            self.step()

    # ------------------------------------------------------------------------------------------- step

    @torch.inference_mode()
    def step(self) -> None:
        """One scheduling step: admit, one forward (each running row's last token and the admitted prompts), sample
        one token per row, finish rows."""
        with self._step_lock:
            self._drop_aborted()
            admitted = self._admit()
            if not self._rows and not admitted:
                self.stepped = 0
                return
            logits = self._forward(admitted)
            self.stepped = len(self._rows)
            self._compact(self._sample(self._rows, logits))

    def _compact(self, gone: list[bool]) -> None:
        """Remove the rows flagged in `gone`: the last running rows move into their slots."""
        keep = len(gone) - sum(gone)
        holes = [i for i in range(keep) if gone[i]]
        movers = [i for i in range(keep, len(gone)) if not gone[i]]
        if holes:
            self.cache.copy_slots(movers, holes)
        order = list(range(keep))
        for hole, mover in zip(holes, movers, strict=True):
            order[hole] = mover
        self._rows = [self._rows[i] for i in order]

    def _drop_aborted(self) -> None:
        with self._lock:
            self._waiting = deque(r for r in self._waiting if not r.aborted)
        gone = [r.request.aborted for r in self._rows]
        if any(gone):
            self._compact(gone)

    def _admit(self) -> list[Request]:
        admitted, used = [], len(self._rows)
        with self._lock:
            while self._waiting:
                need = self._waiting[0].rows
                if used + need > self.max_rows and used > 0:
                    break
                admitted.append(self._waiting.popleft())
                used += need
        if admitted:
            longest = max(len(p) + r.params.max_new_tokens for r in admitted for p in r.prompts)
            self.cache.ensure(max(used, self.max_rows), longest)
        return admitted

    def _forward(self, admitted: list[Request]) -> Tensor:
        """One forward over the running rows' last sampled tokens (each at its row's next position) and the prompts
        of `admitted` (right-padded, into the slots after the running rows), packed as rows of one token so they
        share each matmul; then each admitted prompt's cache is copied into its n sample slots and its rows join
        the batch. Returns next-token logits (N, V) of the running rows, the new ones last."""
        running = len(self._rows)
        prompts = [(r, i, p) for r in admitted for i, p in enumerate(r.prompts)]
        p_len = max((len(p) for _, _, p in prompts), default=0)
        padded = torch.zeros(len(prompts), p_len, dtype=torch.long)  # (P, p_len)
        for b, (_, _, p) in enumerate(prompts):
            padded[b, :len(p)] = torch.tensor(p, dtype=torch.long)
        starts = torch.tensor([r.length for r in self._rows], dtype=torch.long)  # (N,)
        tokens = torch.cat([torch.tensor([r.tokens[-1] for r in self._rows], dtype=torch.long), padded.flatten()])
        positions = torch.cat([starts, torch.arange(p_len).repeat(len(prompts))])  # (N + P * p_len,)
        tokens, positions, starts = tokens.to(self.device), positions.to(self.device), starts.to(self.device)
        view = _StepView(self.cache, starts, len(prompts), p_len)
        model = self.model.model
        h = model.embed_tokens(tokens[:, None])  # (N + P * p_len, 1, E)
        cos, sin = rope_cos_sin(positions[:, None], self.model.cfg.head_dim, self.model.cfg.rope_theta, h.dtype)
        for layer in model.layers:
            h = layer(h, cos, sin, None, view)
        if prompts:  # the running rows, then each prompt's last token
            last = [running + b * p_len + len(p) - 1 for b, (_, _, p) in enumerate(prompts)]
            hidden = h[torch.tensor(list(range(running)) + last, device=self.device), 0]  # (N + P, E)
        else:  # a decode-only step: every row, no gather
            hidden = h[:, 0]  # (N, E)
        logits = self.model.lm_head(model.norm(hidden))  # (N + P, V)
        for r in self._rows:
            r.length += 1
        if not prompts:
            return logits
        # prompt b sits in slot running + b; its n samples go to slots running + (rows so far) .. in prompt-major
        # order, so rearrange: new row j copies prompt take[j] (from the back, so a prompt's own slot is read
        # before a later row overwrites it)
        take = [b for b, (req, _, _) in enumerate(prompts) for _ in range(req.params.n)]
        if len(take) > len(prompts):
            self.cache.ensure(running + len(take), 0)
            for j in reversed(range(len(take))):
                if take[j] != j:
                    self.cache.copy_slots([running + take[j]], [running + j])
        self._rows += [_Row(req, i * req.params.n + j, len(p)) for req, i, p in prompts for j in range(req.params.n)]
        keep = torch.tensor(list(range(running)) + [running + b for b in take], device=self.device)
        return logits[keep]  # (N, V)

    def _sample(self, rows: list[_Row], logits: Tensor) -> list[bool]:
        """Next token of every row with its request's settings; records it; returns which rows finished.

        Greedy rows without penalties take one argmax together; sampled rows without penalties draw together per
        (generator, temperature, top_p): the requests of one `TorchEngine.generate` call share a generator; a
        request with penalties draws alone. Within a draw, rows go in (request, row) order, so a request's draws
        never depend on where its rows sit in the cache."""
        tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)  # (N,)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(rows):
            p, gen = r.request.params, r.request.generator
            key = (("greedy",) if p.temperature == 0 and not p.penalized else ("request", r.request.id)
                   if p.penalized else ("draw", None if gen is None else id(gen), p.temperature, p.top_p))
            groups.setdefault(key, []).append(i)
        for key, members in groups.items():
            if key[0] != "greedy":
                members.sort(key=lambda i: (rows[i].request.id, rows[i].index))
            idx = torch.tensor(members, device=logits.device)
            if key[0] == "greedy":
                tokens[idx] = logits[idx].argmax(-1)
                continue
            req = rows[members[0]].request
            group_logits = logits[idx]  # (G, V)
            if req.params.penalized:
                group_logits = apply_penalties(group_logits, [rows[i].tokens for i in members], req.params)
            tokens[idx] = sample_tokens(group_logits, req.params.temperature, req.params.top_p, req.generator)
        logp = torch.log_softmax(logits.float(), dim=-1)  # (N, V) raw: what PPO needs as log pi_old
        chosen = logp.gather(-1, tokens[:, None]).squeeze(-1).tolist()  # (N,)
        k = max(r.request.params.top_logprobs for r in rows)
        top = logp.topk(min(k, logp.shape[-1]), dim=-1) if k else None
        finished: list[bool] = []
        events: dict[int, list[TokenEvent]] = {}
        for i, (r, tok, lp) in enumerate(zip(rows, tokens.tolist(), chosen, strict=True)):
            params = r.request.params
            best = None
            if params.top_logprobs and top is not None:
                best = list(zip(top.indices[i, :params.top_logprobs].tolist(),
                                top.values[i, :params.top_logprobs].tolist(), strict=True))
                r.top.append(best)
            r.tokens.append(tok)
            r.logprobs.append(lp)
            reason = None
            if tok in params.stop_token_ids or self._hit_stop_string(r):
                reason = "stop"
            elif len(r.tokens) >= params.max_new_tokens:
                reason = "length"
            finished.append(reason is not None)
            events.setdefault(r.request.id, []).append(TokenEvent(r.index, tok, lp, best, reason))
            if reason is not None:
                n = params.n
                r.request.completions[r.index] = Completion(
                    prompt_index=r.request.first_index + r.index // n, token_ids=r.tokens, logprobs=r.logprobs,
                    finish_reason=reason, weight_version=self.version,  # type: ignore[arg-type]
                    top_logprobs=r.top if params.top_logprobs else None)
        requests = {r.request.id: r.request for r in rows}
        for rid, request_events in events.items():
            if requests[rid].on_event is not None:
                requests[rid].on_event(request_events)
        return finished

    def _hit_stop_string(self, row: _Row) -> bool:
        stops = row.request.params.stop
        if not stops:
            return False
        text = self.decode(row.tokens)  # type: ignore[misc]
        # only text that could contain a stop string not seen before: from before the last check's end
        start = max(0, row.text_checked - max(len(s) for s in stops))
        row.text_checked = len(text)
        return any(s in text[start:] for s in stops)


def apply_penalties(logits: Tensor, generated: list[list[int]], params: SamplingParams) -> Tensor:
    """OpenAI's presence/frequency penalties on logits (G, V): subtract presence * [count > 0] + frequency *
    count, count = how often each token was generated so far in that row (the prompt does not count)."""
    counts = torch.zeros_like(logits, dtype=torch.float32)  # (G, V)
    for g, toks in enumerate(generated):
        if toks:
            counts[g] = torch.bincount(torch.tensor(toks), minlength=logits.shape[-1]).to(counts)
    penalty = params.presence_penalty * (counts > 0).float() + params.frequency_penalty * counts  # (G, V)
    return (logits.float() - penalty).to(logits.dtype)


class TorchEngine(GenerationEngine):
    """Continuous-batching KV-cache generation with a `Transformer` in this process (CPU or one GPU).

    `generate` submits one request per prompt (one RNG for the call), and at most max_batch_size rows are
    decoded at once (a prompt whose n exceeds it runs alone): a prompt's samples start as soon as n slots are
    free. Sampled results for a seed depend on max_batch_size and the order of the prompts (which rows draw
    together at each step). Greedy results do not depend on what else is in the batch (each row attends to its
    own slot only).
    """

    def __init__(self, model: Transformer, device: str | torch.device = "cpu", max_batch_size: int = 64,
                 decode: Callable[[list[int]], str] | None = None) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} must be >= 1")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.max_batch_size = max_batch_size
        self.batcher = ContinuousBatcher(self.model, max_batch_size, decode)

    @property
    def weight_version(self) -> int:
        return self.batcher.version

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
        self.batcher.version = int(version)

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
        self.batcher.version = int(version)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Completion]]:
        check_request(prompts, params, self.model.cfg)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        # one request per prompt, so a prompt's samples join the batch as soon as n slots are free (continuous
        # batching, not a chunk at a time); all of them draw from one generator
        requests = [self.batcher.submit(Request([list(p)], params, generator, first_index=i))
                    for i, p in enumerate(prompts)]
        self.batcher.run_until_done(requests)
        return [samples for r in requests for samples in r.results()]
