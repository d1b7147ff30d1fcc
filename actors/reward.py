"""RewardScorer: one of LLaMA 2's two reward models (helpfulness or safety) scoring (prompt, response) text.

The scorer reads text, not token ids, and tokenizes with the `tokenizer.model` inside its own checkpoint, so a
reward model may use another tokenizer than the policy. A pair is scored as the chat dialogue
`prompt + [assistant: response]` (`Tokenizer.encode_dialog`, ending in `</s>`), and the score is the scalar head
at that last token. Scores are raw (the caller applies the sigmoid of LLaMA 2's reward rule).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import ray
import torch

from rayllama.checkpoint import TOKENIZER, load_model, resolve
from rayllama.model import ScalarHeadModel
from rayllama.tokenizer import Tokenizer, strip_chat_tags

KINDS = ("helpfulness", "safety")
Message = Mapping[str, str]


class RewardScorer:
    """A ScalarHeadModel reward model with its tokenizer, its weights in `dtype` (actors.group passes
    `rayllama.config.param_dtype(cfg.train, device)`); `score` returns one raw float per pair (the head's output
    upcast to float32)."""

    def __init__(self, kind: str, model_dir: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 batch_size: int = 32, threads: int | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"reward kind {kind!r} is not one of {', '.join(KINDS)}")
        if threads:
            torch.set_num_threads(threads)
        model, self.cfg, _ = load_model(model_dir, device=device, dtype=dtype)
        if not isinstance(model, ScalarHeadModel):
            raise ValueError(f"{kind} reward checkpoint {model_dir} is a causal LM; pass a reward model checkpoint")
        tokenizer_path = resolve(model_dir) / TOKENIZER
        if not tokenizer_path.is_file():
            raise ValueError(f"{kind} reward checkpoint {model_dir} has no {TOKENIZER}; save it with "
                             f"save_model(..., tokenizer_model=...)")
        self.kind, self.device, self.batch_size = kind, torch.device(device), batch_size
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
        """Raw reward r(x, y) per (prompt messages, response text) pair, in batches of `batch_size`."""
        rows = [self.encode(prompt, response) for prompt, response in pairs]
        out: list[float] = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            width = max(map(len, chunk))
            tokens = torch.full((len(chunk), width), self.tokenizer.pad_id, dtype=torch.long)  # (B, T)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)  # (B, T) right padding
            for i, ids in enumerate(chunk):
                tokens[i, :len(ids)] = torch.tensor(ids)
                mask[i, :len(ids)] = 1
            scores = self.model.last_token_score(tokens.to(self.device), mask.to(self.device))  # (B,)
            out.extend(scores.float().cpu().tolist())
        return out


@ray.remote
class RewardScorerActor(RewardScorer):
    """Ray shell (one process per reward model)."""
