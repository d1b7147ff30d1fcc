"""Rejection-sampling fine-tuning of LLaMA 2-Chat (Touvron et al. 2023, section 3.2.3), driven over `RLActors`.

LLaMA 2-Chat's RLHF V1-V4 were this loop alone; PPO came on top later (`stages: [..., rejection, ppo]`).
One iteration (`rejection_step`):

    1. sample prompts       deterministic from (seed, prompt position), as in PPO
    2. generate             K = samples_per_prompt responses per prompt at temperature T_i (temperature_schedule[i - 1],
                            or `temperature`); round-robin shards over the generators, all of the last pushed version
    3. score                both reward models on every sample, in parallel
    4. select               s = sigmoid(raw RM score); R_c = s_safety if is_safety or s_safety < gate else s_helpful;
                            the best of the K samples by R_c; the pool keeps the best sample ever seen per prompt
                            (a later, worse sample never replaces a better one: the paper's fix for regressions)
    5. fine-tune            the policy on the whole pool with the SFT loss on answer tokens (`sft_rows`), plus,
                            with `replay_share` > 0, SFT dialogues drawn afresh each iteration (against forgetting)
    6. sync weights         the same path as PPO: a broadcast from the learner to every generator
    7. log                  metrics.jsonl + TensorBoard, the best-of-K curve (JSON + PNG), timing/<phase>

`run_rejection` drives it with the RL loop core (rayllama.rl.loop, shared with PPO): resume (the last complete `checkpoints/iter-XXXX`, holding the policy with its
optimizer, the pool, the prompt position and the curves), a checkpoint every iteration, the optional gold eval
every iteration, and the final `out_dir/model` (a complete HF-layout checkpoint: the driver's "stage done").
Faults are handled as in PPO (rayllama.rl.ppo, "Faults"): retried calls, restarted generators refreshed before
they serve, a lost learner restored from the last checkpoint; metrics.jsonl holds each iteration once.

Metrics per iteration (out_dir/metrics.jsonl, TensorBoard under out_dir/tensorboard as rejection/<name>):
    reward/helpfulness, reward/safety   mean raw RM outputs over all samples
    reward/composed                     mean R_c over all samples (probability scale here; PPO logs logit(R_c))
    reward/chosen                       mean R_c of the chosen (best-of-K) sample per prompt
    reward/safety_branch                share of samples scored by the safety RM (is_safety or s_safety < gate)
    best_of_k/max_k<K>, best_of_k/median_k<K>
                                        for K in 1, 2, 4, ... and K_max: the max and the median R_c among the
                                        first K samples of a prompt, averaged over prompts (LLaMA 2 Figure 7)
    pool/size, pool/mean_reward         prompts in the pool and their mean best-ever R_c
    pool/added, pool/replaced, pool/kept
                                        this iteration's prompts new to the pool / improved / left as they were
    sft_loss, sft_grad_norm, lr, sft_steps, sft_rows, sft_rows_dropped (longer than the model's max_seq_len),
    sft_rows_replayed                   the replayed SFT dialogues among sft_rows
    temperature, response_length, response_stopped, iteration, prompt_position, weight_version
    timing/<phase>                      seconds: generate, score, select, train, sync, [evaluate], checkpoint,
                                        iteration
Files in out_dir: best_of_k.json ({"ks": [...], "iterations": [{"iteration", "temperature", "max", "median"}]}),
best_of_k.png (one max line and one median line per iteration), pool.jsonl (the final pool, one prompt a line).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rayllama import storage
from rayllama.config import PipelineConfig, RejectionConfig, validate_rejection
from rayllama.data.formats import PromptRecord
from rayllama.dist import dcp
from rayllama.generation import Completion
from rayllama.losses import llama2_combined_score
from rayllama.rl.actors_api import TRAIN_STATE, RLActors
from rayllama.rl.loop import (
    RLLoop,
    at,
    check_learners,
    generate_grouped,
    prompt_indices,
    push_weights,
    run_loop,
    sampling_params,
    sleep_generators,
    start_loop,
    tokenizer_for_learners,
)
from rayllama.rl.loop import latest_checkpoint as _latest_checkpoint
from rayllama.tokenizer import Tokenizer, strip_chat_tags

STATE_FILE, POOL_FILE = "rejection_state.json", "pool.json"
CURVE_JSON, CURVE_PNG, POOL_JSONL = "best_of_k.json", "best_of_k.png", "pool.jsonl"


# ---------------------------------------------------------------------------------------------- selection (pure)


def composed_rewards(raw_helpful: torch.Tensor, raw_safety: torch.Tensor, is_safety: torch.Tensor,
                     gate: float) -> torch.Tensor:
    """LLaMA 2 section 3.2.3 per sample: s = sigmoid(raw); R_c = s_safety if is_safety or s_safety < gate else
    s_helpful. raw_* are (P, K) (K samples of P prompts), is_safety (P,) bool -> R_c (P, K)."""
    if raw_helpful.shape != raw_safety.shape or raw_helpful.dim() != 2 or is_safety.shape != raw_helpful.shape[:1]:
        raise ValueError(f"composed_rewards wants (P, K) scores and (P,) tags, got {tuple(raw_helpful.shape)}, "
                         f"{tuple(raw_safety.shape)} and {tuple(is_safety.shape)}")
    k = raw_helpful.shape[1]
    tags = torch.as_tensor(is_safety, dtype=torch.bool).repeat_interleave(k)  # (P * K,)
    r_c = llama2_combined_score(torch.sigmoid(raw_helpful).flatten(), torch.sigmoid(raw_safety).flatten(), tags,
                                gate)  # (P * K,)
    return r_c.view_as(raw_helpful)  # (P, K)


def select_best(r_c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best-of-K per prompt: (index (P,), R_c (P,)) of the sample with the highest R_c (the first one on ties)."""
    best, index = r_c.max(dim=1)  # (P,), (P,)
    return index, best


def best_of_k_ks(k_max: int) -> list[int]:
    """K in 1, 2, 4, ... up to k_max, with k_max itself last when it is not a power of two."""
    ks = [2 ** i for i in range(int(math.log2(k_max)) + 1)] if k_max >= 1 else []
    return ks if not ks or ks[-1] == k_max else [*ks, k_max]


def best_of_k_curve(r_c: torch.Tensor, ks: Sequence[int]) -> dict[str, list[float]]:
    """LLaMA 2 Figure 7 from one batch: for each K, mean over prompts of max_{j<K} R_c[:, j] and of the median of
    R_c[:, :K] (the middle value, the mean of the two middle ones for even K). r_c (P, K_max)."""
    out: dict[str, list[float]] = {"max": [], "median": []}
    for k in ks:
        first = r_c[:, :k].double()  # (P, k)
        out["max"].append(float(first.max(dim=1).values.mean()))
        out["median"].append(float(torch.quantile(first, 0.5, dim=1).mean()))
    return out


@dataclass
class PoolEntry:
    """The best sample ever seen for one prompt."""

    prompt_index: int  # into the loop's (kept) prompts
    response: str  # the answer text (chat tags removed), what the reward models scored
    reward: float  # R_c, the composed score it was chosen by
    helpfulness: float  # raw helpfulness RM output
    safety: float  # raw safety RM output
    iteration: int  # when it was sampled


def update_pool(pool: dict[int, PoolEntry], candidates: Iterable[PoolEntry]) -> tuple[int, int]:
    """Keep the best sample ever per prompt: a candidate enters when its prompt has no entry or when its R_c is
    strictly higher than the entry's (ties keep the older one). Returns (added, replaced)."""
    added = replaced = 0
    for c in candidates:
        old = pool.get(c.prompt_index)
        if old is None or c.reward > old.reward:
            added, replaced = added + (old is None), replaced + (old is not None)
            pool[c.prompt_index] = c
    return added, replaced


def temperature_at(rej: RejectionConfig, iteration: int) -> float:
    """T of iteration `iteration` (1-based): temperature_schedule[iteration - 1], or `temperature`."""
    return float(rej.temperature_schedule[iteration - 1]) if rej.temperature_schedule else float(rej.temperature)


# ---------------------------------------------------------------------------------------------- the loop state


@dataclass
class RejectionLoop(RLLoop):
    """The rejection-sampling loop's state: the core's plus the pool and the best-of-K curves. Checkpoints every
    iteration (the learner group's policy and SFT optimizer shards with RNG and version in `train_state/`, the
    pool in pool.json, the curves in the state file);
    evaluates after every iteration's weight sync."""

    pool: dict[int, PoolEntry] = field(default_factory=dict)  # prompt index -> best sample ever
    curves: list[dict[str, Any]] = field(default_factory=list)  # the best-of-K curve of every iteration
    replay: Sequence[list[dict[str, str]]] = ()  # SFT dialogues to replay (rejection.replay_share)

    kind = "rejection"
    learner_save, learner_load = "save_sft", "load_sft"  # policy + SFT optimizer shards

    def step(self) -> dict[str, float]:
        return rejection_step(self)

    def state(self) -> dict[str, Any]:
        return {**super().state(), "curves": self.curves}

    def restore(self, state: dict[str, Any], path: Path | str) -> None:
        super().restore(state, path)
        self.curves = state["curves"]
        self.pool = {e["prompt_index"]: PoolEntry(**e) for e in json.loads(storage.read_bytes(at(path, POOL_FILE)))}

    def reset(self) -> None:
        super().reset()
        self.pool, self.curves = {}, []

    def save_files(self, tmp: Path) -> None:
        (tmp / POOL_FILE).write_text(json.dumps([dataclasses.asdict(self.pool[i]) for i in sorted(self.pool)]) + "\n")

    @staticmethod
    def learners_complete(path: Path) -> bool:
        return (path / POOL_FILE).is_file() and dcp.is_complete(path / TRAIN_STATE)

    def iteration_done(self, metrics: dict[str, Any]) -> None:
        write_curve(self.out_dir, self.curves)

    def finish(self) -> None:
        write_curve(self.out_dir, self.curves)
        write_pool(self.out_dir, self)
        meta = {"stage": "rejection", "iteration": self.iteration, "pool_size": len(self.pool)}
        self.actors.get_learners([learner.export_policy.remote(str(at(self.out_dir, "model")),
                                                               tokenizer_for_learners(self), meta)
                                  for learner in self.actors.learners], "export policy")

    def postfix(self, metrics: dict[str, Any]) -> dict[str, str]:
        return {"chosen": f"{metrics['reward/chosen']:.3f}", "pool": str(len(self.pool))}


# ---------------------------------------------------------------------------------------------- the step


def rejection_step(loop: RejectionLoop) -> dict[str, float]:
    """One rejection-sampling iteration (see module docstring); returns its metrics."""
    rej, actors, iteration = loop.cfg.rejection, loop.actors, loop.iteration + 1
    k, temperature = rej.samples_per_prompt, temperature_at(rej, iteration)
    loop.timings = {}

    # 1. sample prompts: a pure function of (seed, position), so a resumed run draws the same ones
    index = prompt_indices(len(loop.prompt_ids), rej.prompts_per_iteration, loop.prompt_position, loop.cfg.seed)
    loop.prompt_position += len(index)

    # 2. generate: K samples per prompt at T, prompt-major
    with loop.timed("generate"):
        completions = generate(loop, index, iteration, temperature)
        sleep_generators(loop)
    texts = [[strip_chat_tags(loop.tokenizer.decode(c.token_ids)) for c in samples] for samples in completions]

    # 3. score every sample with both reward models, in parallel
    with loop.timed("score"):
        pairs = [(loop.prompts[i].prompt, text) for i, row in zip(index, texts) for text in row]
        pairs_ref = actors.put(pairs)
        helpful, safety = actors.call(lambda: [actors.reward_helpfulness.score.remote(pairs_ref),
                                               actors.reward_safety.score.remote(pairs_ref)], "score")
        raw_helpful = torch.tensor(helpful, dtype=torch.float32).view(len(index), k)  # (P, K)
        raw_safety = torch.tensor(safety, dtype=torch.float32).view(len(index), k)  # (P, K)

    # 4. select: best of K by the composed reward; the pool keeps the best ever per prompt
    with loop.timed("select"):
        is_safety = torch.tensor([loop.prompts[i].is_safety for i in index])  # (P,)
        r_c = composed_rewards(raw_helpful, raw_safety, is_safety, rej.safety_gate)  # (P, K)
        best_index, chosen = select_best(r_c)  # (P,), (P,)
        candidates = [PoolEntry(i, texts[p][j], float(r_c[p, j]), float(raw_helpful[p, j]), float(raw_safety[p, j]),
                                iteration) for p, (i, j) in enumerate(zip(index, best_index.tolist()))]
        added, replaced = update_pool(loop.pool, candidates)
        ks = best_of_k_ks(k)
        curve = best_of_k_curve(r_c, ks)
        loop.curves.append({"iteration": iteration, "temperature": temperature, "ks": ks, **curve})

    # 5. fine-tune the policy on the whole pool: SFT loss on the answers only
    with loop.timed("train"):
        stats = fine_tune(loop, iteration)
    loop.iteration = iteration

    # 6. sync weights: a broadcast from the learner to every generator
    with loop.timed("sync"):
        push_weights(loop)

    # 7. metrics
    flat = [c for samples in completions for c in samples]
    pool_rewards = [e.reward for e in loop.pool.values()]
    return {
        "iteration": iteration,
        "prompt_position": loop.prompt_position,
        "weight_version": loop.weight_version,
        "temperature": temperature,
        "reward/helpfulness": float(raw_helpful.mean()),
        "reward/safety": float(raw_safety.mean()),
        "reward/composed": float(r_c.mean()),
        "reward/chosen": float(chosen.mean()),
        "reward/safety_branch": float((is_safety[:, None] | (torch.sigmoid(raw_safety) < rej.safety_gate))
                                      .float().mean()),
        **{f"best_of_k/max_k{kk}": v for kk, v in zip(ks, curve["max"])},
        **{f"best_of_k/median_k{kk}": v for kk, v in zip(ks, curve["median"])},
        "pool/size": len(loop.pool),
        "pool/mean_reward": sum(pool_rewards) / len(pool_rewards),
        "pool/added": added,
        "pool/replaced": replaced,
        "pool/kept": len(index) - added - replaced,
        "response_length": sum(len(c.token_ids) for c in flat) / len(flat),
        "response_stopped": sum(c.finish_reason == "stop" for c in flat) / len(flat),
        **stats,
        **loop.timings,
    }


# ---------------------------------------------------------------------------------------------- phases


def generate(loop: RejectionLoop, index: list[int], iteration: int, temperature: float) -> list[list[Completion]]:
    """The K completions of every prompt in `index`, in prompt order (`generate_grouped`)."""
    return generate_grouped(loop, index, lambda g: sampling_params(loop, iteration, g, temperature))


def pool_dialogues(loop: RejectionLoop) -> list[list[dict[str, str]]]:
    """The pool as SFT dialogues (prompt messages + the best answer), in prompt-index order."""
    return [[*loop.prompts[i].prompt, {"role": "assistant", "content": loop.pool[i].response}]
            for i in sorted(loop.pool)]


def fine_tune(loop: RejectionLoop, iteration: int) -> dict[str, float]:
    """The learner's `sft_train` on the pool (answers only) and the replayed SFT dialogues, seeded by (seed,
    iteration)."""
    from rayllama.train.data import replay_sample, sft_rows

    rej, actors = loop.cfg.rejection, loop.actors
    seed = loop.cfg.seed * 1_000_003 + iteration
    dialogues = pool_dialogues(loop)
    replayed = replay_sample(loop.replay, len(dialogues), rej.replay_share, seed)
    rows, dropped = sft_rows(dialogues + replayed, loop.tokenizer, loop.max_seq_len)
    rows_ref = actors.put(rows)  # one object-store copy that every rank reads
    stats = actors.get_learners([learner.sft_train.remote(rows_ref, rej.finetune_epochs, rej.batch_size,
                                                          rej.micro_batch_size, seed)
                                 for learner in actors.learners], "learner sft_train")
    check_learners(stats, loop.weight_version + 1)
    return {**stats[0], "sft_rows_dropped": float(dropped), "sft_rows_replayed": float(len(replayed))}


# ---------------------------------------------------------------------------------------------- files


def write_curve(out_dir: Path | str, curves: list[dict[str, Any]]) -> None:
    """best_of_k.json and best_of_k.png (matplotlib, Agg): max (solid) and median (dashed) R_c against K, one
    colour per iteration."""
    if not curves:
        return
    ks = curves[-1]["ks"]
    payload = {"ks": ks, "iterations": [{key: c[key] for key in ("iteration", "temperature", "max", "median")}
                                        for c in curves]}
    storage.write_bytes(at(out_dir, CURVE_JSON), (json.dumps(payload, indent=2) + "\n").encode())

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    colours = plt.get_cmap("viridis")
    for n, c in enumerate(curves):
        colour = colours(n / max(1, len(curves) - 1))
        ax.plot(c["ks"], c["max"], "-o", color=colour, label=f"iter {c['iteration']} max (T={c['temperature']:g})")
        ax.plot(c["ks"], c["median"], "--", color=colour, label=f"iter {c['iteration']} median")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("K (samples per prompt)")
    ax.set_ylabel("composed reward R_c")
    ax.set_title("best-of-K (LLaMA 2 Figure 7)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    storage.write_bytes(at(out_dir, CURVE_PNG), png.getvalue())
    plt.close(fig)


def write_pool(out_dir: Path | str, loop: RejectionLoop) -> None:
    """pool.jsonl: one line per prompt in the pool (prompt, is_safety, best answer and its scores)."""
    lines = [json.dumps({"prompt": loop.prompts[i].prompt, "is_safety": loop.prompts[i].is_safety,
                         **dataclasses.asdict(loop.pool[i])}) for i in sorted(loop.pool)]
    storage.write_bytes(at(out_dir, POOL_JSONL), "".join(line + "\n" for line in lines).encode())


# ---------------------------------------------------------------------------------------------- the run


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete `checkpoints/iter-XXXX` of a rejection run (state file, pool file, complete policy)."""
    return _latest_checkpoint(out_dir, STATE_FILE, RejectionLoop.learners_complete)


def run_rejection(cfg: PipelineConfig, actors: RLActors, prompts: list[PromptRecord], tokenizer: Tokenizer,
                  out_dir: Path, evaluate: Callable[[RLActors, int], dict[str, float]] | None = None,
                  replay: Sequence[list[dict[str, str]]] = ()) -> dict[str, Any]:
    """Run rejection sampling up to cfg.rejection.iterations, resuming from `out_dir/checkpoints`; checkpoint
    every iteration; write `out_dir/model` (policy + tokenizer.model) at the end.

    `actors`: learners[0] a policy-only PolicyLearner with sft_optim (`actors.group.create_rejection_actors`),
    both reward scorers, the generators; no reference. `evaluate(actors, iteration) -> metrics` runs after every
    iteration's weight sync. `replay`: the SFT dialogues that `rejection.replay_share` draws from. Returns the last iteration's metrics plus `model_dir`, `iterations`,
    `resumed_from`, `pool_size`, `pool_mean_reward`, `best_of_k` (the last curve) and `curve_json`/`curve_png`.
    """
    validate_rejection(cfg.rejection)  # configs from load_config are checked already; this is for built ones
    if cfg.rejection.replay_share > 0 and not replay:
        raise ValueError(f"rejection.replay_share {cfg.rejection.replay_share} needs SFT dialogues to replay; pass "
                         "replay= or set it to 0")
    loop, dropped = start_loop(RejectionLoop, cfg, actors, prompts, tokenizer, out_dir, replay=replay)
    summary = run_loop(loop, evaluate, dropped)
    pool_rewards = [e.reward for e in loop.pool.values()]
    return {**summary, "pool_size": len(loop.pool), "pool_mean_reward": sum(pool_rewards) / max(1, len(pool_rewards)),
            "best_of_k": loop.curves[-1] if loop.curves else None,
            "curve_json": str(at(out_dir, CURVE_JSON)), "curve_png": str(at(out_dir, CURVE_PNG))}
