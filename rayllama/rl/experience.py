"""PPO's rollout data: token batches, the `Experience` learners train on, and the helpers that collate, shard,
shuffle and trim them; plus the two model read-outs every role needs (action log-probs, values). Pure torch.

Layout (OpenRLHF's): prompts are left-padded to P columns and responses right-padded to A columns, so response
token t of every row sits at column P + t of `sequences` and at column t of every (B, A) field. The logits that
predict it, and the value V(s_t) of the state before it, are read at position P - 1 + t.

Shape symbols: B rows (one prompt-response pair each), P padded prompt length, A padded response length,
S = P + A, E model dim, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

Rows = TypeVar("Rows", bound="_RowsMixin")


class _RowsMixin:
    """Row selection shared by the batch dataclasses: every field is a tensor with B rows."""

    def __len__(self) -> int:
        return self.sequences.shape[0]  # type: ignore[attr-defined]

    @property
    def num_actions(self) -> int:
        """A: the padded response length."""
        return self.action_mask.shape[1]  # type: ignore[attr-defined]

    @property
    def prompt_len(self) -> int:
        """P: the padded prompt length (S - A)."""
        return self.sequences.shape[1] - self.num_actions  # type: ignore[attr-defined]

    def select(self: Rows, index: Tensor | Sequence[int] | slice) -> Rows:
        """The rows `index` of every field (a new object; tensors are views for slices)."""
        if not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.long)
        return dataclasses.replace(self, **{f.name: getattr(self, f.name)[index] for f in dataclasses.fields(self)})


@dataclass
class SequenceBatch(_RowsMixin):
    """Prompt + response token sequences: what the policy, reference and value models read."""

    sequences: Tensor  # (B, S) long: left-padded prompt ++ right-padded response
    attention_mask: Tensor  # (B, S) long: 1 on real tokens, 0 on padding
    action_mask: Tensor  # (B, A) float: 1 on response tokens (the stop token included)

    def actions(self) -> Tensor:
        """(B, A) the response tokens a_t."""
        return self.sequences[:, self.prompt_len:]


@dataclass
class Experience(_RowsMixin):
    """One PPO iteration's rollouts as a learner trains on them (OpenRLHF's `Experience`)."""

    # tokens
    sequences: Tensor  # (B, S) long: left-padded prompt ++ right-padded response
    attention_mask: Tensor  # (B, S) long: 1 on real tokens
    action_mask: Tensor  # (B, A) float: 1 on response tokens
    # the behaviour policy and critic, at sampling time
    logprobs: Tensor  # (B, A) log pi_old(a_t | s_t), from the generator
    values: Tensor  # (B, A) V_old(s_t)
    # targets
    advantages: Tensor  # (B, A) A_t from GAE (whitened over the batch if configured)
    returns: Tensor  # (B, A) R_t = A_t + V_old(s_t) (GAE advantages before whitening)

    @property
    def batch(self) -> SequenceBatch:
        return SequenceBatch(self.sequences, self.attention_mask, self.action_mask)


# ---------------------------------------------------------------------------------------------- collation


def collate(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int = 0) -> SequenceBatch:
    """Left-pad the prompts to P = max prompt length, right-pad the responses to A = max response length."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"collate got {len(prompts)} prompts and {len(responses)} responses; "
                         f"pass one non-empty response per prompt")
    if any(len(r) == 0 for r in responses) or any(len(p) == 0 for p in prompts):
        raise ValueError("collate got an empty prompt or response; every row needs at least one token of each")
    b, p_len, a_len = len(prompts), max(map(len, prompts)), max(map(len, responses))
    sequences = torch.full((b, p_len + a_len), pad_id, dtype=torch.long)  # (B, S)
    attention_mask = torch.zeros(b, p_len + a_len, dtype=torch.long)  # (B, S)
    action_mask = torch.zeros(b, a_len)  # (B, A)
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        sequences[i, p_len - len(prompt):p_len] = torch.tensor(list(prompt), dtype=torch.long)
        sequences[i, p_len:p_len + len(response)] = torch.tensor(list(response), dtype=torch.long)
        attention_mask[i, p_len - len(prompt):p_len + len(response)] = 1
        action_mask[i, :len(response)] = 1.0
    return SequenceBatch(sequences, attention_mask, action_mask)


def pad_right(rows: Sequence[Sequence[float]], width: int, value: float = 0.0) -> Tensor:
    """(B, width) float32: each row's values, then `value`."""
    out = torch.full((len(rows), width), value, dtype=torch.float32)  # (B, A)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(list(row), dtype=torch.float32)
    return out


def trim(x: Rows) -> Rows:
    """Drop the prompt columns that are padding in every row and the response columns past every row's end.

    Keeps the layout (P shrinks, A shrinks); the model read-outs on the trimmed batch equal the untrimmed ones
    on the kept columns. Used per micro-batch, where lengths vary less than in the whole batch.
    """
    p_len = x.prompt_len
    real_prompt = x.attention_mask[:, :p_len].bool().any(0)  # (P,)
    first = int(real_prompt.float().argmax()) if bool(real_prompt.any()) else p_len - 1
    first = min(first, p_len - 1)  # keep at least one prompt column (the logits of a_0 are read there)
    used = x.action_mask.bool().any(0)  # (A,)
    keep_a = int(torch.nonzero(used).max()) + 1 if bool(used.any()) else 1
    changes = {}
    for f in dataclasses.fields(x):
        value = getattr(x, f.name)
        if f.name in ("sequences", "attention_mask"):
            changes[f.name] = value[:, first:p_len + keep_a]
        else:
            changes[f.name] = value[:, :keep_a]
    return dataclasses.replace(x, **changes)


# ---------------------------------------------------------------------------------------------- batching


def shard(x: Rows, n: int) -> list[Rows]:
    """n contiguous shards of equal size (one per learner); B must be a multiple of n."""
    if n < 1 or len(x) % n:
        raise ValueError(f"cannot split {len(x)} rollouts into {n} equal learner shards; make "
                         f"prompts_per_iteration x samples_per_prompt a multiple of num_learners")
    size = len(x) // n
    return [x.select(slice(i * size, (i + 1) * size)) for i in range(n)]


def split_rows(x: Rows, n: int) -> list[Rows]:
    """At most n contiguous parts of near-equal size (sizes differ by at most 1; no empty part)."""
    bounds = torch.linspace(0, len(x), min(n, len(x)) + 1).round().long().tolist()
    return [x.select(slice(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]


def rank_rows(n: int, rank: int, world: int) -> slice:
    """Rank `rank`'s contiguous share of n rows over `world` ranks: sizes differ by at most 1, in rank order, empty
    for some ranks when n < world (the sharded reference and reward scorers' split of a call's rows)."""
    return slice(rank * n // world, (rank + 1) * n // world)


def micro_batches(x: Rows, size: int) -> Iterator[Rows]:
    """Contiguous chunks of `size` rows (the last may be smaller), each trimmed of all-padding columns."""
    if size < 1:
        raise ValueError(f"micro-batch size {size} must be >= 1")
    for start in range(0, len(x), size):
        yield trim(x.select(slice(start, start + size)))


def mini_batches(exp: Experience, size: int, epochs: int = 1, seed: int = 0) -> Iterator[Experience]:
    """`epochs` passes over `exp`, each a fresh permutation (seeded by seed and the epoch) cut into B / size
    mini-batches: one gradient step each (LLaMA 2 / PPO). B must be a multiple of `size`."""
    if size < 1 or len(exp) % size:
        raise ValueError(f"{len(exp)} rollouts are not a multiple of the mini-batch size {size}; make "
                         f"ppo.prompts_per_iteration x ppo.samples_per_prompt a multiple of ppo.mini_batch_size")
    for epoch in range(epochs):
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(len(exp), generator=g)
        for start in range(0, len(exp), size):
            yield exp.select(order[start:start + size])


# ---------------------------------------------------------------------------------------------- model read-outs


def action_logits(policy: torch.nn.Module, batch: SequenceBatch) -> Tensor:
    """(B, A, V) logits that predict each response token: lm_head(h[P - 1 + t]) (the LM head runs on A rows
    per sequence only, not on the prompt)."""
    p_len, s_len = batch.prompt_len, batch.sequences.shape[1]
    hidden = policy.hidden_states(batch.sequences, batch.attention_mask)  # (B, S, E)
    return policy.lm_head(hidden[:, p_len - 1:s_len - 1])  # (B, A, V)


def action_values(value_model: torch.nn.Module, batch: SequenceBatch) -> Tensor:
    """(B, A) V(s_t), the scalar head at position P - 1 + t (the state before response token t)."""
    p_len, s_len = batch.prompt_len, batch.sequences.shape[1]
    return value_model(batch.sequences, batch.attention_mask)[:, p_len - 1:s_len - 1]  # (B, A)


@torch.no_grad()
def batched_values(value_model: torch.nn.Module, batch: SequenceBatch, micro_batch_size: int = 16) -> Tensor:
    """(B, A) V(s_t), zero on padding; computed in trimmed micro-batches."""
    device = next(value_model.parameters()).device
    out = torch.zeros(len(batch), batch.num_actions)  # (B, A)
    start = 0
    for micro in micro_batches(batch, micro_batch_size):
        micro = to_device(micro, device)
        values = action_values(value_model, micro)  # (b, a)
        out[start:start + len(micro), :micro.num_actions] = (values * micro.action_mask).float().cpu()
        start += len(micro)
    return out


def to_device(x: Rows, device: torch.device | str) -> Rows:
    """Every field moved to `device` (the same object if already there)."""
    device = torch.device(device)
    if all(getattr(x, f.name).device == device for f in dataclasses.fields(x)):
        return x
    return dataclasses.replace(x, **{f.name: getattr(x, f.name).to(device) for f in dataclasses.fields(x)})
