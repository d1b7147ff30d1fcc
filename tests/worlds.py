"""Tiny worlds and configs the RL tests share (PPO, rejection sampling, actors, faults, multi-node): a small real
tokenizer, a ~45k-parameter SFT policy and two reward models saved with `save_model`, as the earlier stages would
write them."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from actors.group import create_local_rl_actors
from actors.rollout import RolloutGenerator
from rayllama.checkpoint import save_model
from rayllama.config import OptimConfig, PipelineConfig
from rayllama.data.formats import PromptRecord
from rayllama.model import ModelConfig, ScalarHeadModel, Transformer
from rayllama.rl.actors_api import ActorCallError
from rayllama.tokenizer import Tokenizer, train_tokenizer

WORDS = ("add subtract copy spell the word number answer please refuse help how do I make a cake bomb friend "
         "letter capital sum of and is what tell me about weather today yes no sorry cannot").split()


@dataclass
class TinyWorld:
    tokenizer: Tokenizer
    sft: Path
    reward_helpfulness: Path
    reward_safety: Path
    prompts: list[PromptRecord]


def make_world(root: Path, seed: int = 0, dim: int = 32) -> TinyWorld:
    """A 420-piece tokenizer, a ~45k-parameter SFT policy and two reward models (score heads std 1, so the
    sigmoid scores spread over (0, 1) and both branches of the 0.15 safety gate occur). `dim` 128 gives head_dim
    32, which vLLM's CPU kernels need."""
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + f" {rng.randint(0, 99)}."
             for _ in range(600)]
    tok_path = train_tokenizer(lines, root / "tok", vocab_size=420)
    tok = Tokenizer(tok_path)
    cfg = ModelConfig(dim=dim, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size, ffn_dim=2 * dim,
                      max_seq_len=64)
    torch.manual_seed(seed)
    sft = save_model(root / "sft", Transformer(cfg), cfg, tokenizer_model=tok_path)
    rms = []
    for kind in ("helpfulness", "safety"):
        rm = ScalarHeadModel(cfg)
        torch.nn.init.normal_(rm.score.weight, std=1.0)
        rms.append(save_model(root / f"rm-{kind}", rm, cfg, tokenizer_model=tok_path))
    prompts = [PromptRecord(prompt=[{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(4))}],
                            is_safety=i % 3 == 0) for i in range(20)]
    return TinyWorld(tok, sft, rms[0], rms[1], prompts)


def tiny_config(iterations: int = 2, **ppo_overrides) -> PipelineConfig:
    cfg = PipelineConfig(seed=3)
    ppo = cfg.ppo
    ppo.iterations, ppo.prompts_per_iteration, ppo.samples_per_prompt = iterations, 8, 2
    ppo.mini_batch_size, ppo.max_new_tokens, ppo.checkpoint_every = 8, 10, 1
    ppo.optim = OptimConfig(lr=1e-3, schedule="constant")  # large enough that one step visibly moves the policy
    for key, value in ppo_overrides.items():
        setattr(ppo, key, value)
    return cfg


def local(cfg: PipelineConfig, world: TinyWorld):
    return create_local_rl_actors(cfg, world.sft, world.sft, world.reward_helpfulness, world.reward_safety)



def rej_config(iterations: int = 2, **overrides) -> PipelineConfig:
    cfg = PipelineConfig(seed=3)
    r = cfg.rejection
    r.iterations, r.prompts_per_iteration, r.samples_per_prompt = iterations, 4, 4
    r.max_new_tokens, r.batch_size, r.micro_batch_size = 8, 4, 2
    r.optim = OptimConfig(lr=1e-3, schedule="constant")  # large enough that one pass visibly moves the policy
    for key, value in overrides.items():
        setattr(r, key, value)
    return cfg


class FailsSecondGenerate(RolloutGenerator):
    """A generator whose 2nd `generate` call fails as a dead actor's does after Ray's retries (in-process stand-in
    for a generator lost in the async mode's prefetch of iteration 2)."""

    calls = 0

    def generate(self, prompts, params):
        self.calls += 1
        if self.calls == 2:
            raise ActorCallError("generate failed: an actor died 2 time(s) (RayActorError); see its log")
        return super().generate(prompts, params)
