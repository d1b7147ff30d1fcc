"""A checkpoint as a chat function: dialogues in, answer texts out (through the shared GenerationEngine)."""

from __future__ import annotations

from pathlib import Path

import torch

from rayllama.generation import GenerationEngine, SamplingParams, TorchEngine
from rayllama.tokenizer import Tokenizer, strip_chat_tags


def completion_text(tok: Tokenizer, token_ids: list[int]) -> str:
    """Decode generated ids, dropping the stop token and anything after it, and the chat tags (`strip_chat_tags`)."""
    if tok.eos_id in token_ids:
        token_ids = token_ids[: token_ids.index(tok.eos_id)]
    return strip_chat_tags(tok.decode(token_ids)).strip()


class ChatModel:
    """Answers batches of dialogues (each ending with a user turn) with the Llama-2-chat template."""

    def __init__(self, engine: GenerationEngine, tokenizer: Tokenizer, max_seq_len: int):
        self.engine, self.tok, self.max_seq_len = engine, tokenizer, max_seq_len
        self.shortened = 0  # dialogues answered so far that did not fit and lost earlier turns (or were cut)

    @classmethod
    def from_checkpoint(cls, model_dir: str | Path, device: str = "cpu", max_batch_size: int = 64) -> ChatModel:
        from rayllama.checkpoint import load_model

        model, cfg, _ = load_model(model_dir, device=device)
        model.eval()
        tok = Tokenizer(Path(model_dir) / "tokenizer.model")
        return cls(TorchEngine(model, device=device, max_batch_size=max_batch_size), tok, cfg.max_seq_len)

    def respond(self, dialogues: list[list[dict]], params: SamplingParams) -> list[list[str]]:
        """n answers per dialogue. A dialogue too long for the model loses whole earlier turns, never its system
        block or its last user turn (`Tokenizer.encode_prompt_within`); `shortened` counts them."""
        budget = self.max_seq_len - params.max_new_tokens
        fitted = [self.tok.encode_prompt_within(d, budget) for d in dialogues]
        prompts = [ids for ids, _ in fitted]
        self.shortened += sum(dropped != 0 for _, dropped in fitted)
        with torch.inference_mode():
            results = self.engine.generate(prompts, params)
        return [[completion_text(self.tok, c.token_ids) for c in per_prompt] for per_prompt in results]

    def greedy_fn(self, max_new_tokens: int = 48):
        """A `generate_fn(dialogues) -> list[str]` for rayllama.eval (greedy, one answer each)."""
        return self.sample_fn(0.0, max_new_tokens=max_new_tokens)

    def sample_fn(self, temperature: float, seed: int | None = None, max_new_tokens: int = 48):
        """A `generate_fn(dialogues) -> list[str]` sampling one answer each at `temperature` (0: greedy); a seed
        makes each call's samples repeatable."""
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                stop_token_ids=(self.tok.eos_id,))
        return lambda dialogues: [answers[0] for answers in self.respond(dialogues, params)]
