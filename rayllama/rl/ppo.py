"""The PPO loop of LLaMA 2-Chat (Touvron et al. 2023, section 3.2.3), driven from the driver over `RLActors`.

One iteration (`ppo_step`):

    1. sample prompts       deterministic from (seed, prompt position)
    2. generate             round-robin shards over the generators; every result carries its weight version
    3. score, in parallel   reference log-probs, helpfulness and safety RM scores, values
    4. advantages           s = sigmoid(RM score); R_c = s_safety if is_safety or s_safety < 0.15 else s_helpful;
                            R = whiten(logit(R_c)); r_t = R [last token] - beta * KL_t; GAE(gamma, lambda);
                            whitened advantages
    5. train                every rank of the learner group (FSDP2) gets the rollouts and trains on its share of
                            each mini-batch; one gradient step per mini-batch, equal to one learner's
    6. sync weights         the ranks gather the new policy one parameter at a time; rank 0 broadcasts it in
                            buckets to every generator over the weight-sync group (rayllama.rl.weight_sync: gloo
                            on CPU, NCCL on GPU; version-labelled, blake2b-verified every verify_weights_every)
    7. log                  metrics.jsonl + TensorBoard, timing/<phase> seconds

`run_ppo` wraps it with resume (the last complete `checkpoints/iter-XXXX`), periodic checkpoints and the final
`out_dir/model` (a complete HF-layout checkpoint: the driver's "stage done"). Every call that runs a learner's
forward or gathers its weights (train, values, weights, save, load, export) goes to all learners.

A checkpoint `checkpoints/iter-XXXX/` holds `ppo_state.json` (iteration, prompt position, weight version, the
iteration's metrics row) and `train_state/`, the learner group's sharded state written by torch.distributed.
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
    reference, reward   frozen: Ray re-runs the task on the restarted actor (max_task_retries), or `call` re-issues
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
    response_length, response_stopped, value_mean, iteration, prompt_position, weight_version
    timing/<phase>                      seconds: generate, score, advantages, train, sync, [evaluate],
                                        [checkpoint], iteration
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rayllama.config import PipelineConfig
from rayllama.data.formats import PromptRecord
from rayllama.dist import dcp
from rayllama.generation import Completion, SamplingParams
from rayllama.losses import (
    gae,
    kl_per_token,
    llama2_combined_score,
    llama2_reward,
    masked_mean,
    token_rewards,
    whiten,
)
from rayllama.rl.actors_api import TRAIN_STATE, ActorCallError, LearnerLostError, RLActors, StaleRolloutError
from rayllama.rl.experience import Experience, SequenceBatch, collate, pad_right, split_rows
from rayllama.rl.weight_sync import sync_for
from rayllama.tokenizer import Tokenizer

CHECKPOINTS, STATE_FILE, MODEL = "checkpoints", "ppo_state.json", "model"
KEEP_CHECKPOINTS = 2  # complete checkpoints kept under out_dir/checkpoints (older ones are removed)
log = logging.getLogger("rayllama")


@dataclass
class PPOLoop:
    """What the loop carries between iterations (and what a checkpoint restores)."""

    cfg: PipelineConfig
    actors: RLActors
    prompts: list[PromptRecord]
    prompt_ids: list[list[int]]
    tokenizer: Tokenizer
    overlap: bool = True  # issue the scoring calls together (False: one after another, for the bench)
    iteration: int = 0  # iterations done
    prompt_position: int = 0  # prompts consumed from the endless shuffled stream
    weight_version: int = -1  # the version of the weights last pushed to the generators (-1: none yet)
    timings: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.timings[f"timing/{phase}"] = time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- the PPO step


def ppo_step(loop: PPOLoop) -> dict[str, float]:
    """One PPO iteration (see module docstring); returns its metrics."""
    ppo, actors, iteration = loop.cfg.ppo, loop.actors, loop.iteration + 1
    loop.timings = {}

    # 1. sample prompts: a pure function of (seed, position), so a resumed run draws the same ones
    index = prompt_indices(len(loop.prompt_ids), ppo.prompts_per_iteration, loop.prompt_position, loop.cfg.seed)
    loop.prompt_position += len(index)

    # 2. generate: samples_per_prompt responses per prompt; rows are prompt-major
    with loop.timed("generate"):
        completions = generate(loop, index, iteration)
    rows = [i for i in index for _ in range(ppo.samples_per_prompt)]  # prompt of each row
    batch = collate([loop.prompt_ids[i] for i in rows], [c.token_ids for c in completions],
                    loop.tokenizer.pad_id)  # (B, S), (B, A)
    mask = batch.action_mask  # (B, A)
    logprobs = pad_right([c.logprobs for c in completions], batch.num_actions)  # (B, A) log pi_old
    pairs = [(loop.prompts[i].prompt, loop.tokenizer.decode(c.token_ids)) for i, c in zip(rows, completions)]

    # 3. score, in parallel: reference log-probs, both reward models (on text), values (learners share the rows)
    with loop.timed("score"):
        ref_logprobs, raw_helpful, raw_safety, values = score(loop, batch, pairs)

    # 4. reward and advantages (LLaMA 2 section 3.2.3)
    with loop.timed("advantages"):
        s_helpful, s_safety = torch.sigmoid(raw_helpful), torch.sigmoid(raw_safety)  # (B,)
        is_safety = torch.tensor([loop.prompts[i].is_safety for i in rows])  # (B,)
        r_combined = llama2_combined_score(s_helpful, s_safety, is_safety, ppo.safety_gate)  # (B,) R_c
        score_r = llama2_reward(s_helpful, s_safety, is_safety, ppo.safety_gate)  # (B,) whiten(logit(R_c))
        kl = kl_per_token(logprobs, ref_logprobs, ppo.kl_estimator) * mask  # (B, A)
        rewards = token_rewards(score_r, kl, mask, ppo.kl_beta)  # (B, A)
        advantages, returns = gae(rewards, values, mask, ppo.gamma, ppo.lam)  # (B, A)
        if ppo.whiten_advantages:
            advantages = whiten(advantages, mask)

    # 5. train: every rank gets the rollouts (one object-store copy) and trains on its share of each mini-batch
    exp = actors.put(Experience(batch.sequences, batch.attention_mask, mask, logprobs, values, advantages, returns))
    seed = loop.cfg.seed * 1_000_003 + iteration
    with loop.timed("train"):
        stats = actors.get_learners([learner.train.remote(exp, seed) for learner in actors.learners],
                                    "learner train")
    check_learners(stats, loop.weight_version + 1)
    loop.iteration = iteration

    # 6. sync weights: a broadcast from learner rank 0 to every generator
    with loop.timed("sync"):
        sync_weights(loop)

    # 7. metrics
    lengths = mask.sum(-1)  # (B,)
    learner_stats = dict(stats[0])  # the ranks' stats are all-reduced: the whole mini-batches' on every rank
    learner_stats["logprob_drift_max"] = max(s["logprob_drift_max"] for s in stats)  # each rank's own rows
    check_drift(learner_stats, ppo.max_logprob_drift)
    return {
        "iteration": iteration,
        "prompt_position": loop.prompt_position,
        "weight_version": loop.weight_version,
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
        **loop.timings,
    }


# ---------------------------------------------------------------------------------------------- phases


def prompt_indices(n: int, count: int, position: int, seed: int) -> list[int]:
    """Prompts position .. position + count - 1 of an endless stream in which epoch e = position // n is a
    permutation of range(n) seeded by (seed, e)."""
    out: list[int] = []
    perms: dict[int, list[int]] = {}
    for pos in range(position, position + count):
        epoch = pos // n
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        out.append(perms[epoch][pos % n])
    return out


def sampling_params(loop: PPOLoop, iteration: int, generator_index: int) -> SamplingParams:
    ppo = loop.cfg.ppo
    return SamplingParams(max_new_tokens=ppo.max_new_tokens, temperature=ppo.temperature, top_p=ppo.top_p,
                          n=ppo.samples_per_prompt, stop_token_ids=(loop.tokenizer.eos_id,),
                          seed=(loop.cfg.seed * 1_000_003 + iteration) * 1009 + generator_index)


def generate(loop: PPOLoop, index: list[int], iteration: int) -> list[Completion]:
    """The completions of prompts `index`, prompt-major (see `generate_grouped`)."""
    grouped = generate_grouped(loop, index, lambda g: sampling_params(loop, iteration, g))
    return [c for completions in grouped for c in completions]


def generate_grouped(loop: Any, index: list[int],
                     params: Callable[[int], SamplingParams]) -> list[list[Completion]]:
    """Prompt j (of loop.prompt_ids[index[j]]) goes to generator j % M with `params(generator index)`; returns
    the completions of every prompt, in prompt order, all made by the last pushed weights (loop.weight_version).

    A shard made by other weights (a generator that restarted from the SFT checkpoint, a missed update) gets the
    latest weights again and is regenerated once; if it is still off, `StaleRolloutError`. Shared by the PPO and
    rejection-sampling loops (it reads loop.actors, loop.weight_version and loop.prompt_ids)."""
    actors, m, expected = loop.actors, len(loop.actors.generators), loop.weight_version
    shards = {g: list(range(g, len(index), m)) for g in range(m) if g < len(index)}
    refresh_generators(loop)

    def run(gens: list[int]) -> dict[int, list[list[Completion]]]:
        return dict(zip(gens, actors.call(lambda: [actors.generators[g].generate.remote(
            [loop.prompt_ids[index[j]] for j in shards[g]], params(g)) for g in gens],
            "generate", before_retry=lambda: refresh_generators(loop))))

    def versions(samples: list[list[Completion]]) -> set[int]:
        return {c.weight_version for cs in samples for c in cs}

    results = run(list(shards))
    stale = [g for g, samples in results.items() if versions(samples) != {expected}]
    if stale:
        push_weights(loop)
        results.update(run(stale))
        for g in stale:
            if versions(results[g]) != {expected}:
                raise StaleRolloutError(f"rollout-{g} produced weight version(s) {sorted(versions(results[g]))} "
                                        f"after being sent version {expected}; its weight updates are not taking "
                                        f"effect")
    out: list[list[Completion]] = [[] for _ in index]
    for g, samples in results.items():
        for j, completions in zip(shards[g], samples, strict=True):
            out[j] = completions
    return out


def score(loop: PPOLoop, batch: SequenceBatch,
          pairs: Sequence[tuple[list[dict[str, str]], str]]) -> tuple[torch.Tensor, ...]:
    """(ref log-probs (B, A), raw helpfulness (B,), raw safety (B,), values (B, A)), the four calls overlapped
    (or, with loop.overlap False, one after another). Values: every rank of the learner group reads out its part
    of the rows (a collective); a lost learner raises `LearnerLostError` (learner calls are never re-issued)."""
    actors, n = loop.actors, len(loop.actors.learners)
    batch_ref, pairs_ref = actors.put(batch), actors.put(list(pairs))
    parts = [actors.put(p) for p in split_rows(batch, n)] if n > 1 else [batch_ref]
    if len(parts) != n:
        raise ValueError(f"{len(batch)} rollouts cannot give each of the {n} learners a row; make "
                         f"prompts_per_iteration x samples_per_prompt at least num_learners")
    calls: list[Callable[[], Any]] = [
        lambda: actors.reference.logprobs.remote(batch_ref),
        lambda: actors.reward_helpfulness.score.remote(pairs_ref),
        lambda: actors.reward_safety.score.remote(pairs_ref),
    ]

    def read_values() -> list[torch.Tensor]:
        return actors.get_learners([learner.values.remote(p) for learner, p in zip(actors.learners, parts)],
                                   "learner values")

    if loop.overlap:
        value_refs = [learner.values.remote(p) for learner, p in zip(actors.learners, parts)]
        ref, helpful, safety = actors.call(lambda: [issue() for issue in calls], "score")
        values = actors.get_learners(value_refs, "learner values")
    else:
        ref, helpful, safety = [actors.call(issue, "score") for issue in calls]
        values = read_values()
    return ref, torch.tensor(helpful), torch.tensor(safety), torch.cat(values)


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


def check_learners(stats: list[dict[str, float]], expected_version: int) -> None:
    """Every learner must report the version it had at the last sync + 1; a learner that restarted (and lost its
    weights and optimizer) reports less. Training on would mix fresh SFT weights into the run: `LearnerLostError`
    (the loop restores the last checkpoint)."""
    for rank, s in enumerate(stats):
        if int(s.pop("version")) != expected_version:
            raise LearnerLostError(f"policy-learner-{rank} restarted and lost its training state; run the stage "
                                   f"again to resume from the last checkpoint")


def push_weights(loop: Any) -> None:
    """The learners' current weights to every generator over the weight-sync group (formed on first use, formed
    again after a restart); a generator that dies or stalls in it is named, restarted and sent them again
    (rayllama.rl.weight_sync.WeightSync). Sets loop.weight_version."""
    loop.weight_version = sync_for(loop.actors, loop.cfg).push(loop.actors)


def refresh_generators(loop: PPOLoop) -> None:
    """Send the current weights again when a generator holds an older version, before it serves: a generator that
    Ray restarted after a crash reports -1 until it is sent weights. One small call per generator; the update
    itself is one broadcast to all of them."""
    actors = loop.actors
    held = actors.call(lambda: [g.version.remote() for g in actors.generators], "generator versions")
    behind = [g for g, version in zip(actors.generators, held, strict=True) if version < loop.weight_version]
    if behind:
        log.warning(f"{len(behind)} generator(s) behind weight version {loop.weight_version} (restarted?); "
                    f"sending the current weights")
        push_weights(loop)


def sync_weights(loop: Any) -> None:
    """The learner group's weights (gathered by every rank, broadcast by rank 0) to every generator."""
    push_weights(loop)


def start_sync(loop: PPOLoop) -> None:
    """At the start and after a recovery: label the learners' weights no older than what the generators hold
    (they may have outlived a learner), then send them to every generator."""
    actors = loop.actors
    held = max(actors.call(lambda: [g.version.remote() for g in actors.generators], "generator versions"))
    actors.get_learners([learner.advance_version.remote(held) for learner in actors.learners], "learner version")
    sync_weights(loop)


# ---------------------------------------------------------------------------------------------- checkpoints


def checkpoint_dir(out_dir: Path, iteration: int) -> Path:
    return out_dir / CHECKPOINTS / f"iter-{iteration:04d}"


def read_state(path: Path) -> dict[str, Any] | None:
    """The JSON state file at `path`, or None if it is missing or unreadable (a checkpoint damaged on disk)."""
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and "iteration" in state else None


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete `checkpoints/iter-XXXX` (readable state file + complete sharded train_state), or None.
    A damaged newer one is skipped with a warning (the one before it is complete: saves are atomic)."""
    root = out_dir / CHECKPOINTS
    if not root.is_dir():
        return None
    for path in sorted(root.glob("iter-[0-9]*"), reverse=True):
        if read_state(path / STATE_FILE) is not None and dcp.is_complete(path / TRAIN_STATE):
            return path
        log.warning(f"checkpoint {path} is incomplete or damaged; skipping it")
    return None


def save_checkpoint(loop: PPOLoop, out_dir: Path, metrics: dict[str, Any] | None = None) -> Path:
    """Every rank writes its shards of policy, value and optimizers (rank 0: schedulers, version, RNG) into a
    temp dir; the loop state (and the iteration's metrics row, for `rewind_metrics`) goes beside; then one
    rename."""
    target = checkpoint_dir(out_dir, loop.iteration)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    actors = loop.actors
    actors.get_learners([learner.save.remote(str(tmp)) for learner in actors.learners], "learner save")
    state = {"iteration": loop.iteration, "prompt_position": loop.prompt_position, "weight_version": loop.weight_version,
             "seed": loop.cfg.seed, "n_prompts": len(loop.prompt_ids), "metrics": metrics}
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    if target.exists():
        shutil.rmtree(target)
    os.rename(tmp, target)
    prune_checkpoints(out_dir)
    return target


def prune_checkpoints(out_dir: Path, keep: int = KEEP_CHECKPOINTS) -> None:
    """Keep the newest `keep` complete checkpoints; remove older ones and temp dirs of writers that are gone."""
    root = out_dir / CHECKPOINTS
    done = sorted(p for p in root.glob("iter-[0-9]*") if (p / STATE_FILE).is_file())
    for path in done[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    for tmp in root.glob(".iter-*.tmp-*"):
        if not tmp.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(tmp, ignore_errors=True)


def resume(loop: PPOLoop, out_dir: Path) -> Path | None:
    """Load the latest complete checkpoint into every learner and the loop state; None if there is none."""
    path = latest_checkpoint(out_dir)
    if path is None:
        return None
    state = json.loads((path / STATE_FILE).read_text())
    if state["n_prompts"] != len(loop.prompt_ids):
        raise ValueError(f"checkpoint {path} was made with {state['n_prompts']} prompts but {len(loop.prompt_ids)} "
                         f"are given; resume with the same prompts or use a new run directory")
    actors = loop.actors
    actors.get_learners([learner.load.remote(str(path)) for learner in actors.learners], "learner load")
    loop.iteration, loop.prompt_position = state["iteration"], state["prompt_position"]
    return path


# ---------------------------------------------------------------------------------------------- recovery


def rewind_metrics(writer: Any, checkpoint: Path | None, state_file: str, iteration: int) -> None:
    """Make metrics.jsonl hold iterations 1..`iteration` once each before the loop goes on from `iteration`:
    drop the rows of later iterations (a crash after them rolled back to an older checkpoint; they are redone),
    and put back the checkpoint's own row when the crash came between the checkpoint and its row."""
    rows = writer.rewind(iteration)
    if iteration and not any(r.get("iteration") == iteration for r in rows) and checkpoint is not None:
        stored = (read_state(checkpoint / state_file) or {}).get("metrics")
        if stored:
            writer.write(iteration, {**stored, "recovered_row": 1})


def recover_learners(actors: RLActors, error: LearnerLostError, recoveries: int,
                     resume_fn: Callable[[], Path | None], reset_fn: Callable[[], None]) -> Path | None:
    """After a learner was lost: with several learners, rebuild the group first (`actors.rebuild_learners`: every
    rank killed, a new group in the same bundles); then restore the last checkpoint (`resume_fn`), or, with none
    yet, take the learners' initial state back (`restore_initial`) and `reset_fn()` the loop; returns the
    checkpoint or None. Gives up (ActorCallError) after `actors.max_recoveries` losses, or with several learners
    that cannot be rebuilt (no `rebuild_learners`: rerun the stage, it resumes from the checkpoint)."""
    if recoveries > actors.max_recoveries:
        raise ActorCallError(f"the policy learner was lost {recoveries} times (limit {actors.max_recoveries}); "
                             f"see its log, then run the stage again to resume from the last checkpoint") from error
    rebuilt = ""
    if len(actors.learners) > 1:
        if actors.rebuild_learners is None:
            raise ActorCallError(f"a policy learner was lost ({str(error).splitlines()[0]}); these "
                                 f"{len(actors.learners)} learners cannot be rebuilt, so run the stage again to "
                                 f"resume from the last checkpoint") from error
        actors.rebuild_learners(actors)
        rebuilt = f"rebuilt the {len(actors.learners)}-learner group, "
    path = resume_fn()
    if path is None:
        actors.get_learners([learner.restore_initial.remote() for learner in actors.learners], "learner restore")
        reset_fn()
    log.warning(f"policy learner lost ({type(error).__name__}); recovery {recoveries} of {actors.max_recoveries}: "
                f"{rebuilt}restored {path.name if path else 'the initial state'} and redoing the iterations after it")
    return path


def recover_loop(loop: Any, error: LearnerLostError, recoveries: int, resume_fn: Callable[[], Path | None],
                 reset_fn: Callable[[], None], writer: Any, state_file: str, bar: Any) -> None:
    """The PPO and rejection loops after a lost learner: `recover_learners`, send the restored weights to the
    generators, and rewind the metrics log and the progress bar to the restored iteration."""
    restored = recover_learners(loop.actors, error, recoveries, resume_fn, reset_fn)
    start_sync(loop)
    rewind_metrics(writer, restored, state_file, loop.iteration)
    bar.n = loop.iteration


# ---------------------------------------------------------------------------------------------- the loop


def encode_prompts(prompts: Sequence[PromptRecord], tokenizer: Tokenizer,
                   max_prompt_len: int) -> tuple[list[PromptRecord], list[list[int]]]:
    """Prompt ids (the chat template up to `[/INST]`), dropping prompts longer than max_prompt_len tokens."""
    kept, ids = [], []
    for record in prompts:
        encoded = tokenizer.encode_prompt(record.prompt)
        if len(encoded) <= max_prompt_len:
            kept.append(record)
            ids.append(encoded)
    if not kept:
        raise ValueError(f"all {len(prompts)} PPO prompts are longer than {max_prompt_len} tokens (max_seq_len - "
                         f"ppo.max_new_tokens); lower ppo.max_new_tokens or use shorter prompts")
    return kept, ids


def ppo_iteration(loop: PPOLoop, out_dir: Path, evaluate: Callable[[RLActors, int], dict[str, float]] | None,
                  ) -> dict[str, Any]:
    """One `ppo_step`, the optional evaluation and the checkpoint when it is due; returns the metrics row."""
    ppo, start = loop.cfg.ppo, time.perf_counter()
    metrics = ppo_step(loop)
    if evaluate is not None and ppo.eval_every and loop.iteration % ppo.eval_every == 0:
        with loop.timed("evaluate"):
            metrics.update(evaluate(loop.actors, loop.iteration))
    if loop.iteration == ppo.iterations or (ppo.checkpoint_every and loop.iteration % ppo.checkpoint_every == 0):
        with loop.timed("checkpoint"):
            save_checkpoint(loop, out_dir, {**metrics, **loop.timings})
    return {**metrics, **loop.timings, "timing/iteration": time.perf_counter() - start}


def run_ppo(cfg: PipelineConfig, actors: RLActors, prompts: list[PromptRecord], tokenizer: Tokenizer,
            out_dir: Path, evaluate: Callable[[RLActors, int], dict[str, float]] | None = None, *,
            overlap: bool = True) -> dict[str, Any]:
    """Run PPO up to cfg.ppo.iterations, resuming from `out_dir/checkpoints`; write `out_dir/model` at the end.

    `evaluate(actors, iteration) -> metrics` runs every cfg.ppo.eval_every iterations (0: never) after the weight
    sync, so the generators hold the new policy. A lost learner is recovered from (module docstring, "Faults").
    Returns the last iteration's metrics plus `model_dir`, `iterations`, `resumed_from` and `recoveries`.
    """
    from tqdm import tqdm

    from rayllama.train.loop import MetricsWriter

    ppo, out_dir = cfg.ppo, Path(out_dir)
    max_seq_len = actors.call(lambda: actors.generators[0].max_seq_len.remote(), "generator max_seq_len")
    kept, prompt_ids = encode_prompts(prompts, tokenizer, max_seq_len - ppo.max_new_tokens)
    loop = PPOLoop(cfg, actors, kept, prompt_ids, tokenizer, overlap=overlap)
    resumed = resume(loop, out_dir)
    # the generators start from the learner's weights (the checkpoint's, on resume), labelled no older than theirs
    start_sync(loop)

    def reset() -> None:
        loop.iteration, loop.prompt_position = 0, 0

    model_dir = out_dir / MODEL
    writer = MetricsWriter(str(out_dir), "ppo")
    metrics: dict[str, Any] = {}
    recoveries = 0
    try:
        rewind_metrics(writer, resumed, STATE_FILE, loop.iteration)
        writer.write(loop.iteration, {"prompts": len(kept), "prompts_dropped_too_long": len(prompts) - len(kept),
                                      "resumed_from": loop.iteration if resumed else -1})
        bar = tqdm(total=ppo.iterations, initial=loop.iteration, desc="ppo", unit="it")
        while True:
            try:
                if loop.iteration == ppo.iterations:  # done: the final checkpoint's policy is the stage's output
                    actors.get_learners([learner.export_policy.remote(
                        str(model_dir), str(tokenizer.model_path), {"iteration": loop.iteration})
                        for learner in actors.learners], "export policy")
                    break
                metrics = ppo_iteration(loop, out_dir, evaluate)
            except LearnerLostError as error:
                recoveries += 1
                recover_loop(loop, error, recoveries, lambda: resume(loop, out_dir), reset, writer, STATE_FILE, bar)
                continue
            writer.write(loop.iteration, metrics)
            bar.update(1)
            bar.set_postfix({"reward": f"{metrics['reward/combined']:.3f}", "kl": f"{metrics['kl']:.3f}"})
        bar.close()
    finally:
        writer.close()
    return {**metrics, "model_dir": str(model_dir), "iterations": loop.iteration,
            "resumed_from": int(resumed.name.split("-")[1]) if resumed else None, "recoveries": recoveries}
