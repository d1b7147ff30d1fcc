"""RewardScorer: one of LLaMA 2's two reward models (helpfulness or safety) scoring (prompt, response) text.

The scorer reads text, not token ids, and tokenizes with the `tokenizer.model` inside its own checkpoint, so a
reward model may use another tokenizer than the policy. A pair is scored as the chat dialogue
`prompt + [assistant: response]` (`Tokenizer.encode_dialog`, ending in `</s>`), and the score is the scalar head
at that last token. Scores are raw (the caller applies the sigmoid of LLaMA 2's reward rule).

With `<section>.resources.reward.shards` N > 1 each scorer is N actors of one FSDP2 group, as the sharded
reference (actors.reference): each holds 1/N of the model, scores its contiguous share of a call's pairs, and the
driver's `rayllama.rl.actors_api.ShardedHandle` concatenates the shares in rank order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import ray
import torch

from rayllama import storage
from rayllama.checkpoint import TOKENIZER, load_model, read_model_config, resolve
from rayllama.dist.fsdp import build_model, checkpoint_kind, is_sharded, join_group, max_over_ranks
from rayllama.model import ScalarHeadModel
from rayllama.rl.experience import rank_rows
from rayllama.tokenizer import Tokenizer, strip_chat_tags

KINDS = ("helpfulness", "safety")
Message = Mapping[str, str]


class RewardScorer:
    """A ScalarHeadModel reward model with its tokenizer, its weights in `dtype` (actors.group passes
    `rayllama.config.param_dtype(cfg.train, device)`); `score` returns one raw float per pair (the head's output
    upcast to float32). Rank `rank` of a `world_size`-rank FSDP2 group when world_size > 1 (every rank constructed
    at once; see the module docstring)."""

    def __init__(self, kind: str, model_dir: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 batch_size: int = 32, threads: int | None = None, rank: int = 0, world_size: int = 1,
                 init_method: str | None = None, timeout_s: float = 600.0) -> None:
        if kind not in KINDS:
            raise ValueError(f"reward kind {kind!r} is not one of {', '.join(KINDS)}")
        if threads:
            torch.set_num_threads(threads)
        self.kind, self.device, self.batch_size = kind, torch.device(device), batch_size
        self.rank, self.world = rank, world_size
        model_dir = storage.local_dir(model_dir)  # a URI: this node's copy of the run's checkpoint
        causal_lm = f"{kind} reward checkpoint {model_dir} is a causal LM; pass a reward model checkpoint"
        if world_size > 1:
            join_group(f"reward-{kind}", rank, world_size, init_method, self.device, timeout_s)
            if checkpoint_kind(model_dir) != "scalar":
                raise ValueError(causal_lm)
            self.cfg = read_model_config(model_dir)
            model = build_model("scalar", self.cfg, device=self.device, param_dtype=dtype, init=model_dir,
                                frozen=True)
        else:
            model, self.cfg, _ = load_model(model_dir, device=device, dtype=dtype)
            if not isinstance(model, ScalarHeadModel):
                raise ValueError(causal_lm)
        tokenizer_path = resolve(model_dir) / TOKENIZER
        if not tokenizer_path.is_file():
            raise ValueError(f"{kind} reward checkpoint {model_dir} has no {TOKENIZER}; save it with "
                             f"save_model(..., tokenizer_model=...)")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = Tokenizer(tokenizer_path)

    def encode(self, prompt: Sequence[Message], response: str) -> list[int]:
        """Token ids of `prompt + [assistant: response]`, cut to max_seq_len keeping the final `</s>`."""
        messages = [*prompt, {"role": "assistant", "content": strip_chat_tags(response)}]
        ids, _ = self.tokenizer.encode_dialog(messages)
        limit = self.cfg.max_seq_len
        return ids if len(ids) <= limit else ids[:limit - 1] + [self.tokenizer.eos_id]

    @torch.no_grad()
    def score(self, pairs: Sequence[tuple[Sequence[Message], str]]) -> list[float]:
        """Raw reward r(x, y) per (prompt messages, response text) pair of this rank's rows of `pairs` (all of them
        on one actor), in batches of `batch_size`. Collective in a group: every rank runs as many forwards as the
        rank with the most batches (idle ones on its first batch, or on the first pair when it has no rows)."""
        share = pairs[rank_rows(len(pairs), self.rank, self.world)]
        rows = [self.encode(prompt, response) for prompt, response in share]
        chunks = [rows[start:start + self.batch_size] for start in range(0, len(rows), self.batch_size)]
        count = max_over_ranks(len(chunks), self.device)
        out: list[float] = []
        for chunk in chunks:
            out.extend(self._forward(chunk).float().cpu().tolist())
        for _ in range(count - len(chunks)):
            self._forward(chunks[0] if chunks else [self.encode(*pairs[0])])
        if is_sharded(self.model):
            self.model.reshard()  # free the root's gathered parameters (FSDP keeps them after a forward)
        return out

    def _forward(self, chunk: list[list[int]]) -> torch.Tensor:
        """(b,) the head at each row's last token, the rows right-padded into one batch."""
        width = max(map(len, chunk))
        tokens = torch.full((len(chunk), width), self.tokenizer.pad_id, dtype=torch.long)  # (b, T)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)  # (b, T) right padding
        for i, ids in enumerate(chunk):
            tokens[i, :len(ids)] = torch.tensor(ids)
            mask[i, :len(ids)] = 1
        return self.model.last_token_score(tokens.to(self.device), mask.to(self.device))  # (b,)


@ray.remote
class RewardScorerActor(RewardScorer):
    """Ray shell (one process per reward model)."""
