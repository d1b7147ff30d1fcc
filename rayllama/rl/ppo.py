"""The PPO loop of LLaMA 2-Chat (Touvron et al. 2023, section 3.2.3), driven from the driver over `RLActors`.

One iteration (`ppo_step`):

    1. sample prompts       deterministic from (seed, prompt position)
    2. generate             round-robin shards over the generators; every result carries its weight version
    3. score, in parallel   reference log-probs, helpfulness and safety RM scores, values
    4. advantages           s = sigmoid(RM score); R_c = s_safety if is_safety or s_safety < 0.15 else s_helpful;
                            R = whiten(logit(R_c)); r_t = R [last token] - beta * KL_t; GAE(gamma, lambda);
                            whitened advantages
    5. train                every rank of the learner group (FSDP2) gets the rollouts and trains on its share of
                            each mini-batch; one gradient step per mini-batch, equal to one learner's; with
                            ppo.ptx_coef > 0 each step adds ptx_coef x the SFT loss of replayed SFT dialogues
                            (PPO-ptx, InstructGPT eq. 2)
    6. sync weights         the ranks gather the new policy one parameter at a time; rank 0 broadcasts it in
                            buckets to every generator over the weight-sync group (rayllama.rl.weight_sync: gloo
                            on CPU, NCCL on GPU; version-labelled, blake2b-verified every verify_weights_every)
    7. log                  metrics.jsonl + TensorBoard, timing/<phase> seconds

`run_ppo` drives it with the RL loop core (rayllama.rl.loop, shared with rejection sampling): resume (the last
complete `checkpoints/iter-XXXX`), periodic checkpoints, recovery, and the final `out_dir/model` (a complete
HF-layout checkpoint: the driver's "stage done"). Every call that runs a learner's forward or gathers its weights
(train, values, weights, save, load, export) goes to all learners.

One-step-off-policy rollouts (`ppo.async_rollouts: true`, as AReaL / veRL's one-step-off mode): iteration k+1's
rollouts are generated, and scored by the frozen models (reference log-probs, both reward models), in a driver
thread while iteration k reads its values and trains, by the generators' weights of iteration k-1 (generators and
frozen models are idle during training otherwise); the weight sync waits for them. On CPU the prefetch scores with
one frozen model at a time (`ppo.prefetch_scoring`), so that it takes one core beside the learner, not three. So
iteration k+1 trains on rollouts one version behind the learner; the PPO ratio uses the behaviour policy's
log-probs (what the generator recorded, as in the synchronous mode), and the KL penalty is KL(behaviour ||
reference). `rollout_lag` logs the gap (0 or 1).
The log-prob drift monitor compares learner and generator only where they hold the same version (the first
iteration after a start or a recovery, every iteration in the synchronous mode). The prefetched rollouts are part of
a checkpoint (`rollouts.json`), so a resumed run continues bit for bit. A generator that fails during a prefetch
(died, stalled, stale) makes the next iteration generate its rollouts again after the sync, on the new weights
(logged; that iteration is on-policy).

A checkpoint `checkpoints/iter-XXXX/` holds `ppo_state.json` (iteration, prompt position, weight version, the
iteration's metrics row), `rollouts.json` (async mode: the next iteration's prefetched rollouts) and `train_state/`, the learner group's sharded state written by torch.distributed.
checkpoint (policy, value and both AdamW states, each rank its shards; schedulers, version and RNG in extra.pt;
COMPLETE written last), which loads into any number of learners. It is written into a temp dir and renamed into
place, so it is complete when its state file is readable and train_state is complete (`latest_checkpoint`).

Faults (every role restarts, `ppo.resources.max_restarts`):
    generator           a generator that dies or stalls during a weight update fails it within
                        ppo.weight_sync.timeout_s, named in one line; the loop forms the sync group again (a
                        stalled one is killed and restarted) and resends, `retries` times.
                        A restarted generator (start checkpoint's weights) reports version -1 and refuses to
                        generate until it is sent weights: the loop sends it the current weights before it serves
                        (`refresh_generators`, also before `RLActors.call` re-issues a call: bounded retries, each
                        wait bounded by call_timeout_s); a shard made by other weights is regenerated once
    reference, reward   frozen: Ray re-runs the task on the restarted actor (max_task_retries), or `call` re-issues;
                        a sharded one (resources.*.shards > 1) is not restarted: a lost rank fails the call
    learner             a restart loses its weights and optimizer, so a restarted learner refuses work
                        (`LearnerLostError`, its calls are never re-issued): the loop restores the last checkpoint
                        (or the initial state), drops the metrics rows after it and redoes those iterations, up to
                        `max_recoveries` times. A group of N > 1 learners (never restarted one by one: a new
                        process cannot join the old process group) is rebuilt first: `actors.rebuild_learners`
                        kills every rank and starts a new group (new rendezvous, same bundles); a rank that died
                        fails the call at once (`get_learners` does not wait for the ranks stuck with it).
                        The prompt stream, sampling seeds and learner RNG are restored with it, so the result equals
                        an uninterrupted run bit for bit (tests/test_faults.py, tests/test_learner_group.py).
metrics.jsonl holds every iteration exactly once, across crashes, recoveries and reruns (`rewind_metrics`).

Metrics per iteration (out_dir/metrics.jsonl, TensorBoard under out_dir/tensorboard as ppo/<name>):
    reward/helpfulness, reward/safety   mean raw RM outputs
    reward/combined                     mean logit(R_c) before whitening (the raw score of the chosen RM)
    reward/safety_branch                share of rows scored by the safety RM (is_safety or s_safety < gate)
    kl, kl_per_token                    KL(pi_old || pi_ref) estimate: per response (sum), per token (mean)
    policy_loss, value_loss, entropy, clip_fraction, approx_kl, ratio, value_clip_fraction, grad_norm,
    value_grad_norm, lr, logprob_drift  means over the optimizer steps of the whole mini-batches' token means
                                        (the same on every rank; logprob_drift: mean |log pi_learner -
                                        log pi_generator| before the first step, ~0 if synced)
    ptx_loss                            ppo.ptx_coef > 0: the replayed SFT dialogues' token-mean SFT loss, mean
                                        over the steps
    response_length, response_stopped, value_mean, iteration, prompt_position, weight_version
    rollout_lag                         updates between the weights that made the rollouts and the learner's
                                        (0; async: 1 where they were prefetched)
    timing/<phase>                      seconds: [generate], score, advantages, train, [prefetch_wait], sync,
                                        [evaluate], [checkpoint], iteration. Async: generate only where nothing
                                        was prefetched, score = the values alone, prefetch_wait = waiting for
                                        the next iteration's rollouts after training
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rayllama import storage
from rayllama.config import PipelineConfig
from rayllama.data.formats import PromptRecord
from rayllama.dist import dcp
from rayllama.generation import Completion
from rayllama.losses import (
    gae,
    kl_per_token,
    llama2_combined_score,
    llama2_reward,
    masked_mean,
    token_rewards,
    whiten,
)
from rayllama.rl.actors_api import TRAIN_STATE, ActorCallError, RLActors, StaleRolloutError
from rayllama.rl.experience import Experience, SequenceBatch, collate, pad_right, split_rows
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
from rayllama.tokenizer import Tokenizer

STATE_FILE, ROLLOUTS_FILE = "ppo_state.json", "rollouts.json"
log = logging.getLogger("rayllama")


@dataclass
class Rollouts:
    """One iteration's completions and the frozen models' verdicts on them: what does not depend on the learner.
    The async mode makes them during the iteration before."""

    iteration: int  # the iteration they are for
    index: list[int]  # its prompts (indices into the loop's prompts)
    completions: list[Completion]  # prompt-major, samples_per_prompt per prompt
    ref_logprobs: torch.Tensor  # (B, A) log pi_ref of the response tokens (0 at padding)
    helpfulness: torch.Tensor  # (B,) raw helpfulness RM scores
    safety: torch.Tensor  # (B,) raw safety RM scores


@dataclass
class PPOLoop(RLLoop):
    """The PPO loop's state: the core's plus the prefetched rollouts of the async mode."""

    pending: Rollouts | None = None  # async: the next iteration's rollouts, made during this one
    prefetcher: ThreadPoolExecutor | None = None  # async: the driver thread that waits for the prefetch
    ptx_rows: Any = None  # PPO-ptx: the replayed SFT dialogues' rows (an object-store ref), None when ptx_coef is 0

    kind = "ppo"

    def step(self) -> dict[str, float]:
        return ppo_step(self)

    def evaluate_due(self) -> bool:
        return bool(self.section.eval_every) and self.iteration % self.section.eval_every == 0

    def checkpoint_due(self) -> bool:
        return bool(self.section.checkpoint_every) and self.iteration % self.section.checkpoint_every == 0

    def restore(self, state: dict[str, Any], path: Path | str) -> None:
        super().restore(state, path)
        self.pending = read_rollouts(at(path, ROLLOUTS_FILE))

    def reset(self) -> None:
        super().reset()
        self.pending = None

    def save_files(self, tmp: Path) -> None:
        if self.pending is not None:
            write_rollouts(tmp / ROLLOUTS_FILE, self.pending)

    @staticmethod
    def learners_complete(path: Path) -> bool:
        return dcp.is_complete(path / TRAIN_STATE)

    def finish(self) -> None:
        self.actors.get_learners([learner.export_policy.remote(
            str(at(self.out_dir, "model")), tokenizer_for_learners(self), {"iteration": self.iteration})
            for learner in self.actors.learners], "export policy")

    def postfix(self, metrics: dict[str, Any]) -> dict[str, str]:
        return {"reward": f"{metrics['reward/combined']:.3f}", "kl": f"{metrics['kl']:.3f}"}

    def close(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.shutdown(wait=True)
            self.prefetcher = None


# ---------------------------------------------------------------------------------------------- the PPO step


def ppo_step(loop: PPOLoop) -> dict[str, float]:
    """One PPO iteration (see module docstring); returns its metrics."""
    ppo, iteration = loop.cfg.ppo, loop.iteration + 1
    loop.timings = {}

    # 1. sample prompts: a pure function of (seed, position), so a resumed run draws the same ones
    index = prompt_indices(len(loop.prompt_ids), ppo.prompts_per_iteration, loop.prompt_position, loop.cfg.seed)
    loop.prompt_position += len(index)

    # 2.-3. generate and score with the frozen models (or take what the last iteration prefetched); values are
    # issued first so that the learners read them out while the frozen models score
    pending, loop.pending = loop.pending, None
    if pending is not None and (pending.iteration, pending.index) == (iteration, index):
        rollouts, batch, lag = pending, rollout_batch(loop, pending.index, pending.completions), 1
        with loop.timed("score"):
            values = read_values(loop, issue_values(loop, batch))
    else:
        with loop.timed("generate"):
            completions = generate(loop, index, iteration)
            sleep_generators(loop)
        batch, lag = rollout_batch(loop, index, completions), 0
        with loop.timed("score"):
            value_refs = issue_values(loop, batch)
            rollouts = score_frozen(loop, iteration, index, completions, batch)
            values = read_values(loop, value_refs)

    # async: the next iteration's rollouts, generated and scored beside this iteration's training on the weights
    # the generators hold now (also after the last iteration, so that how many iterations a run has does not
    # change its trajectory: a run resumed with more iterations continues as if it had been started with them)
    prefetch = start_prefetch(loop, iteration + 1) if ppo.async_rollouts else None
    try:
        metrics = learn(loop, iteration, rollouts, batch, values, lag)  # 4.-5.
    finally:
        if prefetch is not None and not prefetch.done():  # unwinding (a lost learner): let it finish, drop it
            with contextlib.suppress(Exception):
                prefetch.result()
    if prefetch is not None:
        with loop.timed("prefetch_wait"):
            loop.pending = finish_prefetch(prefetch, iteration + 1)

    # 6. sync weights: a broadcast from learner rank 0 to every generator
    with loop.timed("sync"):
        push_weights(loop)
    return {**metrics, "weight_version": loop.weight_version, **loop.timings}


def learn(loop: PPOLoop, iteration: int, rollouts: Rollouts, batch: SequenceBatch, values: torch.Tensor,
          lag: int) -> dict[str, float]:
    """Steps 4-5 on one iteration's scored rollouts and their values (B, A): rewards and advantages, train; sets
    loop.iteration and returns the iteration's metrics. `lag`: 1 for rollouts prefetched during the iteration
    before (made by the weights before its update), else 0."""
    ppo, actors, completions = loop.cfg.ppo, loop.actors, rollouts.completions
    rows = [i for i in rollouts.index for _ in range(ppo.samples_per_prompt)]  # prompt of each row
    mask = batch.action_mask  # (B, A)
    logprobs = pad_right([c.logprobs for c in completions], batch.num_actions)  # (B, A) log pi_old (behaviour)

    # 4. reward and advantages (LLaMA 2 section 3.2.3)
    with loop.timed("advantages"):
        raw_helpful, raw_safety = rollouts.helpfulness, rollouts.safety  # (B,)
        s_helpful, s_safety = torch.sigmoid(raw_helpful), torch.sigmoid(raw_safety)  # (B,)
        is_safety = torch.tensor([loop.prompts[i].is_safety for i in rows])  # (B,)
        r_combined = llama2_combined_score(s_helpful, s_safety, is_safety, ppo.safety_gate)  # (B,) R_c
        score_r = llama2_reward(s_helpful, s_safety, is_safety, ppo.safety_gate)  # (B,) whiten(logit(R_c))
        kl = kl_per_token(logprobs, rollouts.ref_logprobs, ppo.kl_estimator) * mask  # (B, A)
        rewards = token_rewards(score_r, kl, mask, ppo.kl_beta)  # (B, A)
        advantages, returns = gae(rewards, values, mask, ppo.gamma, ppo.lam)  # (B, A)
        if ppo.whiten_advantages:
            advantages = whiten(advantages, mask)

    # 5. train: every rank gets the rollouts (one object-store copy) and trains on its share of each mini-batch
    exp = actors.put(Experience(batch.sequences, batch.attention_mask, mask, logprobs, values, advantages, returns))
    seed = loop.cfg.seed * 1_000_003 + iteration
    with loop.timed("train"):
        stats = actors.get_learners([learner.train.remote(exp, seed, loop.ptx_rows) for learner in actors.learners],
                                    "learner train")
    check_learners(stats, loop.weight_version + 1)
    loop.iteration = iteration

    lengths = mask.sum(-1)  # (B,)
    learner_stats = dict(stats[0])  # the ranks' stats are all-reduced: the whole mini-batches' on every rank
    learner_stats["logprob_drift_max"] = max(s["logprob_drift_max"] for s in stats)  # each rank's own rows
    # made by the learner's weights (not prefetched by the ones before): their log-probs must agree with its own
    if {c.weight_version for c in completions} == {loop.weight_version}:
        check_drift(learner_stats, ppo.max_logprob_drift)
    return {
        "iteration": iteration,
        "prompt_position": loop.prompt_position,
        "rollout_lag": lag,
        "reward/helpfulness": float(raw_helpful.mean()),
        "reward/safety": float(raw_safety.mean()),
        "reward/combined": float(torch.logit(r_combined.clamp(1e-6, 1 - 1e-6)).mean()),
        "reward/safety_branch": float(((s_safety < ppo.safety_gate) | is_safety).float().mean()),
        "kl": float((kl.sum(-1)).mean()),
        "kl_per_token": float(masked_mean(kl, mask)),
        "response_length": float(lengths.float().mean()),
        "response_stopped": sum(c.finish_reason == "stop" for c in completions) / len(completions),
        "value_mean": float(masked_mean(values, mask)),
        **learner_stats,
    }


# ---------------------------------------------------------------------------------------------- phases


def generate(loop: PPOLoop, index: list[int], iteration: int, *, refresh: bool = True) -> list[Completion]:
    """The completions of prompts `index`, prompt-major (see `generate_grouped`)."""
    grouped = generate_grouped(loop, index, lambda g: sampling_params(loop, iteration, g, loop.cfg.ppo.temperature),
                               refresh=refresh)
    return [c for completions in grouped for c in completions]


def rollout_batch(loop: PPOLoop, index: list[int], completions: list[Completion]) -> SequenceBatch:
    """Prompt + response ids of every row (prompt-major, samples_per_prompt rows per prompt), padded."""
    rows = [i for i in index for _ in range(loop.cfg.ppo.samples_per_prompt)]
    return collate([loop.prompt_ids[i] for i in rows], [c.token_ids for c in completions],
                   loop.tokenizer.pad_id)  # (B, S), (B, A)


def score_frozen(loop: PPOLoop, iteration: int, index: list[int], completions: list[Completion],
                 batch: SequenceBatch, serial: bool = False) -> Rollouts:
    """The reference log-probs and both reward models' scores (on text), the three calls issued together (or,
    `serial`, one after another); Ray re-runs a call whose actor died on the restarted actor (frozen: no state to
    restore)."""
    actors, ppo = loop.actors, loop.cfg.ppo
    rows = [i for i in index for _ in range(ppo.samples_per_prompt)]
    pairs = [(loop.prompts[i].prompt, loop.tokenizer.decode(c.token_ids)) for i, c in zip(rows, completions)]
    batch_ref, pairs_ref = actors.put(batch), actors.put(pairs)
    calls = [lambda: actors.reference.logprobs.remote(batch_ref),
             lambda: actors.reward_helpfulness.score.remote(pairs_ref),
             lambda: actors.reward_safety.score.remote(pairs_ref)]
    if serial:
        ref, helpful, safety = (actors.call(call, "score") for call in calls)
    else:
        ref, helpful, safety = actors.call(lambda: [call() for call in calls], "score")
    return Rollouts(iteration, index, completions, ref, torch.tensor(helpful), torch.tensor(safety))


def issue_values(loop: PPOLoop, batch: SequenceBatch) -> list[Any]:
    """Every rank of the learner group reads out the values of its part of the rows (a collective); returns the
    calls' refs (`read_values` waits for them)."""
    actors, n = loop.actors, len(loop.actors.learners)
    parts = [actors.put(p) for p in split_rows(batch, n)] if n > 1 else [actors.put(batch)]
    if len(parts) != n:
        raise ValueError(f"{len(batch)} rollouts cannot give each of the {n} learners a row; make "
                         f"prompts_per_iteration x samples_per_prompt at least num_learners")
    return [learner.values.remote(p) for learner, p in zip(actors.learners, parts)]


def read_values(loop: PPOLoop, refs: list[Any]) -> torch.Tensor:
    """(B, A) values; a lost learner raises `LearnerLostError` (learner calls are never re-issued)."""
    return torch.cat(loop.actors.get_learners(refs, "learner values"))


def start_prefetch(loop: PPOLoop, iteration: int) -> Future:
    """Generate iteration `iteration`'s rollouts and score them with the frozen models in a driver thread while
    this iteration trains. The generators keep the weights they hold (no refresh: sending weights would wait on
    the training learners). `ppo.prefetch_scoring` serial (auto on CPU) scores one frozen model at a time: on
    CPUs shared with the learner, three models at once beside it slow its training more than scoring one after
    another lengthens the prefetch (bench/ppo_iteration.py)."""
    ppo = loop.cfg.ppo
    index = prompt_indices(len(loop.prompt_ids), ppo.prompts_per_iteration, loop.prompt_position, loop.cfg.seed)
    serial = ppo.prefetch_scoring == "serial" or (ppo.prefetch_scoring == "auto" and loop.cfg.device == "cpu")

    def make() -> Rollouts:
        completions = generate(loop, index, iteration, refresh=False)
        return score_frozen(loop, iteration, index, completions, rollout_batch(loop, index, completions), serial)

    if loop.prefetcher is None:
        loop.prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ppo-prefetch")
    return loop.prefetcher.submit(make)


def finish_prefetch(prefetch: Future, iteration: int) -> Rollouts | None:
    """The prefetched rollouts, or None when a generator failed them (the iteration then generates its rollouts
    after the weight sync, with the new weights)."""
    try:
        return prefetch.result()
    except (ActorCallError, StaleRolloutError) as error:
        log.warning(f"prefetching the rollouts of PPO iteration {iteration} failed ({str(error).splitlines()[0]}); "
                    f"generating them again after the weight sync")
        return None


def write_rollouts(path: Path, rollouts: Rollouts) -> None:
    """JSON: float32 values as Python floats, whose repr round-trips exactly."""
    path.write_text(json.dumps({
        "iteration": rollouts.iteration, "index": rollouts.index,
        "completions": [dataclasses.asdict(c) for c in rollouts.completions],
        "ref_logprobs": rollouts.ref_logprobs.tolist(), "helpfulness": rollouts.helpfulness.tolist(),
        "safety": rollouts.safety.tolist()}) + "\n")


def read_rollouts(path: Path | str) -> Rollouts | None:
    if not storage.is_file(path):
        return None
    raw = json.loads(storage.read_bytes(path))
    return Rollouts(raw["iteration"], raw["index"], [Completion(**c) for c in raw["completions"]],
                    *(torch.tensor(raw[key], dtype=torch.float32) for key in ("ref_logprobs", "helpfulness",
                                                                              "safety")))


class LogprobDriftError(RuntimeError):
    """The generators' log-probs and the learner's disagree beyond ppo.max_logprob_drift (weights out of sync,
    or an engine that samples from a different model than the learner trains)."""


def check_drift(stats: dict[str, float], limit: float) -> None:
    """Fail loudly when the mean |log pi_learner - log pi_engine| over response tokens exceeds `limit`."""
    if limit > 0 and stats["logprob_drift"] > limit:
        raise LogprobDriftError(
            f"log-prob drift between the rollout engine and the learner is {stats['logprob_drift']:.2e} (max "
            f"{stats['logprob_drift_max']:.2e}), above ppo.max_logprob_drift {limit:g}: the generators do not run "
            f"the learner's weights; check the weight sync (or raise the limit for a low-precision engine)"
        )


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete `checkpoints/iter-XXXX` of a PPO run (readable state file + complete sharded
    train_state), or None."""
    return _latest_checkpoint(out_dir, STATE_FILE, PPOLoop.learners_complete)


def run_ppo(cfg: PipelineConfig, actors: RLActors, prompts: list[PromptRecord], tokenizer: Tokenizer,
            out_dir: Path, evaluate: Callable[[RLActors, int], dict[str, float]] | None = None,
            replay: Sequence[list[dict[str, str]]] = ()) -> dict[str, Any]:
    """Run PPO up to cfg.ppo.iterations, resuming from `out_dir/checkpoints`; write `out_dir/model` at the end.

    `evaluate(actors, iteration) -> metrics` runs every cfg.ppo.eval_every iterations (0: never) after the weight
    sync, so the generators hold the new policy. A lost learner is recovered from (module docstring, "Faults").
    `replay`: the SFT dialogues PPO-ptx replays (needed when cfg.ppo.ptx_coef > 0; dialogues longer than the
    model's context are left out). Returns the last iteration's metrics plus `model_dir`, `iterations`,
    `resumed_from` and `recoveries`.
    """
    from rayllama.train.data import sft_rows

    if cfg.ppo.ptx_coef > 0 and not replay:
        raise ValueError(f"ppo.ptx_coef {cfg.ppo.ptx_coef} needs SFT dialogues to replay; pass replay= or set it to 0")
    loop, dropped = start_loop(PPOLoop, cfg, actors, prompts, tokenizer, out_dir)
    if cfg.ppo.ptx_coef > 0:
        loop.ptx_rows = actors.put(sft_rows(replay, tokenizer, loop.max_seq_len)[0])  # one copy every rank reads
    return run_loop(loop, evaluate, dropped)
