"""The RL loop core that PPO (rayllama.rl.ppo) and rejection sampling (rayllama.rl.rejection) share.

A loop is an `RLLoop` subclass that says what one iteration does (`step`) and what its checkpoint holds beyond the
common state (`state` / `restore`, `save_files`, the learners' own save and load); `run_loop` drives every loop the
same way:

    resume      the newest complete `out_dir/checkpoints/iter-XXXX` (a damaged newer one is skipped with a
                warning; temp dirs of writers that are gone are removed), or the start
    start_sync  the generators get the learners' weights, labelled no older than what they hold
    iterate     `step`, the evaluation and the checkpoint when due (`evaluate_due`, `checkpoint_due`), one metrics
                row per iteration (metrics.jsonl + TensorBoard under `<kind>/`), a progress bar
    recover     a lost learner (`LearnerLostError`): the group rebuilt (several ranks), the last checkpoint restored
                (or the initial state), the metrics log rewound, the iterations after it redone
    finish      `finish()` writes the stage's output (`out_dir/model`, the driver's "stage done")

Generators: prompt shards go round-robin to the generators (`generate_grouped`); a generator that restarted, or
missed an update, is sent the current weights before it serves (`refresh_generators`) and a shard made by other
weights is regenerated once. Weight updates go over the weight-sync group (rayllama.rl.weight_sync).

A checkpoint `iter-XXXX/` holds the loop's state file (`<kind>_state.json`: iteration, prompt position, weight
version, seed, prompt count, the iteration's metrics row, and what the loop adds), the learners' state and the
loop's extra files. It is written into a temp dir and renamed into place, so a checkpoint whose state file is
readable and whose learner state is complete is whole. `out_dir` may be a URI (a run on an object store,
rayllama.storage): there is no rename, so each rank uploads its shards into `iter-XXXX/`, the loop its files, and
the COMPLETE marker written last makes the checkpoint whole; a killed save leaves a directory without it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from rayllama import storage
from rayllama.config import PipelineConfig
from rayllama.data.formats import PromptRecord
from rayllama.generation import Completion, SamplingParams
from rayllama.rl.actors_api import ActorCallError, LearnerLostError, RLActors, StaleRolloutError
from rayllama.rl.weight_sync import sync_for
from rayllama.tokenizer import Tokenizer

CHECKPOINTS, MODEL = "checkpoints", "model"
KEEP_CHECKPOINTS = 2  # complete checkpoints kept under out_dir/checkpoints (older ones are removed)
log = logging.getLogger("rayllama")


# ---------------------------------------------------------------------------------------------- the loop state


@dataclass
class RLLoop(ABC):
    """What a loop carries between iterations (and what a checkpoint restores); subclasses add their own state
    and say what an iteration does."""

    cfg: PipelineConfig
    actors: RLActors
    prompts: list[PromptRecord]  # the prompts that fit (encode_prompts)
    prompt_ids: list[list[int]]  # their chat-template ids up to [/INST]
    tokenizer: Tokenizer
    out_dir: Path | str  # a local directory, or a URI (a run on an object store)
    max_seq_len: int  # the generators' (the policy's)
    iteration: int = 0  # iterations done
    prompt_position: int = 0  # prompts consumed from the endless shuffled stream
    weight_version: int = -1  # the version of the weights last pushed to the generators (-1: none yet)
    timings: dict[str, float] = field(default_factory=dict)

    kind: ClassVar[str] = ""  # "ppo" | "rejection": the config section, metrics prefix, state file, progress bar
    learner_save: ClassVar[str] = "save"  # the learner methods that write / read a checkpoint's learner state
    learner_load: ClassVar[str] = "load"

    @property
    def section(self) -> Any:
        """This loop's config section (cfg.ppo or cfg.rejection)."""
        return getattr(self.cfg, self.kind)

    @property
    def state_file(self) -> str:
        return f"{self.kind}_state.json"

    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.timings[f"timing/{phase}"] = time.perf_counter() - start

    # -- what a loop says (the defaults are what both loops do)

    @abstractmethod
    def step(self) -> dict[str, float]:
        """One iteration; sets self.iteration and returns its metrics."""

    def evaluate_due(self) -> bool:
        return True

    def checkpoint_due(self) -> bool:
        return True

    def state(self) -> dict[str, Any]:
        """The JSON-able loop state a checkpoint stores (subclasses add theirs)."""
        return {"iteration": self.iteration, "prompt_position": self.prompt_position,
                "weight_version": self.weight_version, "seed": self.cfg.seed, "n_prompts": len(self.prompt_ids)}

    def restore(self, state: dict[str, Any], path: Path) -> None:
        """Take a checkpoint's state (the learners are loaded already)."""
        self.iteration, self.prompt_position = state["iteration"], state["prompt_position"]

    def reset(self) -> None:
        """Back to the start (a learner lost before the first checkpoint)."""
        self.iteration, self.prompt_position = 0, 0

    def save_files(self, tmp: Path) -> None:  # noqa: B027 - an optional hook, a no-op by default
        """Extra files of a checkpoint, written into its temp dir."""

    def save_learners(self, tmp: Path) -> None:
        """Every rank writes its shards (`learner.<learner_save>(tmp)`, a collective)."""
        actors = self.actors
        actors.get_learners([getattr(learner, self.learner_save).remote(str(tmp)) for learner in actors.learners],
                            "learner save")

    def load_learners(self, path: Path) -> None:
        """Every rank loads its shards (`learner.<learner_load>(path)`, a collective; DCP reshards)."""
        actors = self.actors
        actors.get_learners([getattr(learner, self.learner_load).remote(str(path)) for learner in actors.learners],
                            "learner load")

    @staticmethod
    @abstractmethod
    def learners_complete(path: Path) -> bool:
        """Whether checkpoint `path` holds a complete learner state (and the loop's files)."""

    def iteration_done(self, metrics: dict[str, Any]) -> None:  # noqa: B027 - an optional hook, a no-op by default
        """After an iteration's row is final (before it is logged)."""

    @abstractmethod
    def finish(self) -> None:
        """After the last iteration: the stage's outputs (out_dir/model)."""

    def postfix(self, metrics: dict[str, Any]) -> dict[str, str]:
        """The progress bar's figures."""
        return {}

    def close(self) -> None:  # noqa: B027 - an optional hook, a no-op by default
        """When the run ends, however it ends (threads, pools)."""


# ---------------------------------------------------------------------------------------------- prompts


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


def encode_prompts(prompts: Sequence[PromptRecord], tokenizer: Tokenizer, max_prompt_len: int,
                   kind: str = "ppo") -> tuple[list[PromptRecord], list[list[int]]]:
    """Prompt ids (the chat template up to `[/INST]`), dropping prompts longer than max_prompt_len tokens."""
    kept, ids = [], []
    for record in prompts:
        encoded = tokenizer.encode_prompt(record.prompt)
        if len(encoded) <= max_prompt_len:
            kept.append(record)
            ids.append(encoded)
    if not kept:
        raise ValueError(f"all {len(prompts)} {kind} prompts are longer than {max_prompt_len} tokens (max_seq_len - "
                         f"{kind}.max_new_tokens); lower {kind}.max_new_tokens or use shorter prompts")
    return kept, ids


def sampling_params(loop: RLLoop, iteration: int, generator_index: int, temperature: float) -> SamplingParams:
    """The sampling of iteration `iteration`'s shard `generator_index`: seeded by (seed, iteration, shard), so a
    resumed run draws the same samples."""
    section = loop.section
    return SamplingParams(max_new_tokens=section.max_new_tokens, temperature=temperature, top_p=section.top_p,
                          n=section.samples_per_prompt, stop_token_ids=(loop.tokenizer.eos_id,),
                          seed=(loop.cfg.seed * 1_000_003 + iteration) * 1009 + generator_index)


# ---------------------------------------------------------------------------------------------- generators


def generate_grouped(loop: RLLoop, index: list[int], params: Callable[[int], SamplingParams], *,
                     refresh: bool = True) -> list[list[Completion]]:
    """Prompt j (of loop.prompt_ids[index[j]]) goes to generator j % M with `params(generator index)`; returns
    the completions of every prompt, in prompt order, all made by the last pushed weights (loop.weight_version).

    With `refresh` (the default), a generator behind that version (restarted from the start checkpoint, a missed
    update) is sent the current weights before it serves, and a shard made by other weights is regenerated once;
    if it is still off, `StaleRolloutError`. Without it (a generation running beside training, which must not
    send weights), such a generator fails the call: `StaleRolloutError` or `ActorCallError`."""
    actors, m, expected = loop.actors, len(loop.actors.generators), loop.weight_version
    shards = {g: list(range(g, len(index), m)) for g in range(m) if g < len(index)}
    if refresh:
        refresh_generators(loop)

    def run(gens: list[int]) -> dict[int, list[list[Completion]]]:
        return dict(zip(gens, actors.call(lambda: [actors.generators[g].generate.remote(
            [loop.prompt_ids[index[j]] for j in shards[g]], params(g)) for g in gens],
            "generate", before_retry=(lambda: refresh_generators(loop)) if refresh else None)))

    def versions(samples: list[list[Completion]]) -> set[int]:
        return {c.weight_version for cs in samples for c in cs}

    def check(gens: list[int]) -> list[int]:
        return [g for g in gens if versions(results[g]) != {expected}]

    results = run(list(shards))
    stale = check(list(shards))
    if stale and refresh:
        push_weights(loop)
        results.update(run(stale))
        stale = check(stale)
    for g in stale:
        raise StaleRolloutError(f"rollout-{g} produced weight version(s) {sorted(versions(results[g]))} after "
                                f"being sent version {expected}; its weight updates are not taking effect")
    out: list[list[Completion]] = [[] for _ in index]
    for g, samples in results.items():
        for j, completions in zip(shards[g], samples, strict=True):
            out[j] = completions
    return out


def sleep_generators(loop: RLLoop) -> None:
    """With vllm.enable_sleep_mode, after a generation: the generators free their GPU memory for the learner's
    training on the same GPUs; each wakes at its next weight update (or generate)."""
    if loop.cfg.vllm.enable_sleep_mode:
        actors = loop.actors
        actors.call(lambda: [g.sleep.remote() for g in actors.generators], "generator sleep")


def push_weights(loop: RLLoop) -> None:
    """The learners' current weights to every generator over the weight-sync group (formed on first use, formed
    again after a restart); a generator that dies or stalls in it is named, restarted and sent them again
    (rayllama.rl.weight_sync.WeightSync). Sets loop.weight_version."""
    loop.weight_version = sync_for(loop.actors, loop.cfg).push(loop.actors)


def refresh_generators(loop: RLLoop) -> None:
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


def start_sync(loop: RLLoop) -> None:
    """At the start and after a recovery: label the learners' weights no older than what the generators hold
    (they may have outlived a learner), then send them to every generator."""
    actors = loop.actors
    held = max(actors.call(lambda: [g.version.remote() for g in actors.generators], "generator versions"))
    actors.get_learners([learner.advance_version.remote(held) for learner in actors.learners], "learner version")
    push_weights(loop)


def check_learners(stats: list[dict[str, float]], expected_version: int) -> None:
    """Every learner must report the version it had at the last sync + 1; a learner that restarted (and lost its
    weights and optimizer) reports less. Training on would mix fresh SFT weights into the run: `LearnerLostError`
    (the loop restores the last checkpoint)."""
    for rank, s in enumerate(stats):
        if int(s.pop("version")) != expected_version:
            raise LearnerLostError(f"policy-learner-{rank} restarted and lost its training state; run the stage "
                                   f"again to resume from the last checkpoint")


# ---------------------------------------------------------------------------------------------- checkpoints


def at(base: Path | str, *parts: str) -> Path | str:
    """base / parts: a Path under a local directory, a URI string under an object-store one."""
    return storage.join(base, *parts) if storage.is_uri(base) else Path(base, *parts)


def tokenizer_for_learners(loop: RLLoop) -> str | None:
    """The tokenizer.model the learners copy into the exported policy: the loop's, when out_dir is local (a disk
    the learners share); for a run on an object store None: each learner takes the one of the checkpoint it
    started from (its node's copy)."""
    return None if storage.is_uri(loop.out_dir) else str(loop.tokenizer.model_path)


def checkpoint_dir(out_dir: Path | str, iteration: int) -> Path | str:
    return at(out_dir, CHECKPOINTS, f"iter-{iteration:04d}")


def read_state(path: Path | str) -> dict[str, Any] | None:
    """The JSON state file at `path`, or None if it is missing or unreadable (a checkpoint damaged on disk)."""
    try:
        state = json.loads(storage.read_bytes(path))
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and "iteration" in state else None


def _checkpoints(out_dir: Path | str) -> list[Path | str]:
    """The `iter-XXXX` directories under out_dir/checkpoints, oldest first (temp dirs left out)."""
    root = at(out_dir, CHECKPOINTS)
    if not storage.is_uri(root):
        return sorted(Path(root).glob("iter-[0-9]*")) if Path(root).is_dir() else []
    return [d for d in storage.list_dirs(root) if storage.name_of(d).startswith("iter-")]


def checkpoint_complete(path: Path | str, complete: Callable[[Path], bool]) -> bool:
    """A local checkpoint is complete when `complete(path)` holds (it was renamed into place whole); one on an
    object store when its COMPLETE marker, written last, exists."""
    return storage.is_complete_dir(path) if storage.is_uri(path) else complete(Path(path))


def latest_checkpoint(out_dir: Path | str, state_file: str,
                      complete: Callable[[Path], bool]) -> Path | str | None:
    """The newest `checkpoints/iter-XXXX` with a readable `state_file` of which `complete(path)` holds, or None.
    A damaged newer one is skipped with a warning (the one before it is complete: saves are atomic)."""
    for path in reversed(_checkpoints(out_dir)):
        if checkpoint_complete(path, complete) and read_state(at(path, state_file)) is not None:
            return path
        log.warning(f"checkpoint {str(path).partition('?')[0]} is incomplete or damaged; skipping it")
    return None


def save_checkpoint(loop: RLLoop, writer: Any, metrics: dict[str, Any] | None = None) -> Path | str:
    """The learners write their state into a temp dir; the loop state (with the iteration's metrics row, for
    `rewind_metrics`) and the loop's files go beside it; then one rename. The newest KEEP_CHECKPOINTS stay.
    On an object store: into the checkpoint's own prefix (emptied first), the COMPLETE marker last. `writer`'s
    rows (the iterations before this one) reach the store first, so a run killed once the checkpoint is complete
    resumes with all of them (this iteration's own row is in the checkpoint)."""
    writer.sync()
    target = checkpoint_dir(loop.out_dir, loop.iteration)
    state = json.dumps({**loop.state(), "metrics": metrics}, indent=2) + "\n"
    if storage.is_uri(target):
        storage.delete_dir(target)  # a killed save's files
        loop.save_learners(target)  # each rank uploads its own shards
        with storage.writing_dir(target) as tmp:
            loop.save_files(tmp)
            (tmp / loop.state_file).write_text(state)
        storage.mark_complete(target)
    else:
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        loop.save_learners(tmp)
        loop.save_files(tmp)
        (tmp / loop.state_file).write_text(state)
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    prune_checkpoints(loop.out_dir, loop.state_file)
    return target


def prune_checkpoints(out_dir: Path | str, state_file: str, keep: int = KEEP_CHECKPOINTS) -> None:
    """Keep the newest `keep` checkpoints that have a state file; remove older ones and the temp dirs of writers
    that are gone (another pid: a killed save; on an object store: the unmarked directories older than the
    newest complete one)."""
    if storage.is_uri(out_dir):
        found = _checkpoints(out_dir)
        done = [d for d in found if storage.is_complete_dir(d)]
        for path in done[:-keep]:
            storage.delete_dir(path)
        for path in found:
            if done and path not in done and storage.name_of(path) < storage.name_of(done[-1]):
                storage.delete_dir(path)
        return
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return
    done = sorted(p for p in root.glob("iter-[0-9]*") if (p / state_file).is_file())
    for path in done[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    for tmp in root.glob(".iter-*.tmp-*"):
        if not tmp.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(tmp, ignore_errors=True)


def resume(loop: RLLoop) -> Path | str | None:
    """Load the latest complete checkpoint into the learners and the loop; None if there is none."""
    path = latest_checkpoint(loop.out_dir, loop.state_file, loop.learners_complete)
    prune_checkpoints(loop.out_dir, loop.state_file)  # a killed save's temp dir
    if path is None:
        return None
    state = json.loads(storage.read_bytes(at(path, loop.state_file)))
    if state["n_prompts"] != len(loop.prompt_ids):
        raise ValueError(f"checkpoint {path} was made with {state['n_prompts']} prompts but {len(loop.prompt_ids)} "
                         f"are given; resume with the same prompts or use a new run directory")
    loop.load_learners(path)
    loop.restore(state, path)
    return path


# ---------------------------------------------------------------------------------------------- recovery


def rewind_metrics(writer: Any, checkpoint: Path | str | None, state_file: str, iteration: int) -> None:
    """Make metrics.jsonl hold iterations 1..`iteration` once each before the loop goes on from `iteration`:
    drop the rows of later iterations (a crash after them rolled back to an older checkpoint; they are redone),
    and put back the checkpoint's own row when the crash came between the checkpoint and its row."""
    rows = writer.rewind(iteration)
    if iteration and not any(r.get("iteration") == iteration for r in rows) and checkpoint is not None:
        stored = (read_state(at(checkpoint, state_file)) or {}).get("metrics")
        if stored:
            writer.write(iteration, {**stored, "recovered_row": 1})


def recover_learners(loop: RLLoop, error: LearnerLostError, recoveries: int) -> Path | str | None:
    """After a learner was lost: with several learners, rebuild the group first (`actors.rebuild_learners`: every
    rank killed, a new group in the same bundles); then restore the last checkpoint, or, with none yet, take the
    learners' initial state back (`restore_initial`) and reset the loop; returns the checkpoint or None. Gives up
    (ActorCallError) after `actors.max_recoveries` losses, or with several learners that cannot be rebuilt (no
    `rebuild_learners`: rerun the stage, it resumes from the checkpoint)."""
    actors = loop.actors
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
    path = resume(loop)
    if path is None:
        actors.get_learners([learner.restore_initial.remote() for learner in actors.learners], "learner restore")
        loop.reset()
    log.warning(f"policy learner lost ({type(error).__name__}); recovery {recoveries} of {actors.max_recoveries}: "
                f"{rebuilt}restored {storage.name_of(path) if path else 'the initial state'} and redoing the iterations after it")
    return path


# ---------------------------------------------------------------------------------------------- the run


def run_loop(loop: RLLoop, evaluate: Callable[[RLActors, int], dict[str, float]] | None,
             dropped_prompts: int) -> dict[str, Any]:
    """Drive `loop` up to its section's `iterations` (module docstring); returns the last iteration's metrics plus
    `model_dir`, `iterations`, `resumed_from` and `recoveries`. `evaluate(actors, iteration) -> metrics` runs
    after the weight sync of the iterations where `loop.evaluate_due()`."""
    from tqdm import tqdm

    from rayllama.train.loop import MetricsWriter

    iterations = loop.section.iterations
    resumed = resume(loop)
    # the generators start from the learner's weights (the checkpoint's, on resume), labelled no older than theirs
    start_sync(loop)
    writer = MetricsWriter(str(loop.out_dir), loop.kind)
    metrics: dict[str, Any] = {}
    recoveries = 0
    try:
        rewind_metrics(writer, resumed, loop.state_file, loop.iteration)
        writer.write(loop.iteration, {"prompts": len(loop.prompt_ids), "prompts_dropped_too_long": dropped_prompts,
                                      "resumed_from": loop.iteration if resumed else -1})
        bar = tqdm(total=iterations, initial=loop.iteration, desc=loop.kind, unit="it")
        while True:
            try:
                if loop.iteration == iterations:  # done: the final checkpoint's policy is the stage's output
                    loop.finish()
                    break
                start = time.perf_counter()
                metrics = loop.step()
                if evaluate is not None and loop.evaluate_due():
                    with loop.timed("evaluate"):
                        metrics.update(evaluate(loop.actors, loop.iteration))
                if loop.iteration == iterations or loop.checkpoint_due():
                    with loop.timed("checkpoint"):
                        save_checkpoint(loop, writer, {**metrics, **loop.timings})
            except LearnerLostError as error:
                recoveries += 1
                restored = recover_learners(loop, error, recoveries)
                start_sync(loop)
                rewind_metrics(writer, restored, loop.state_file, loop.iteration)
                bar.n = loop.iteration
                continue
            metrics = {**metrics, **loop.timings, "timing/iteration": time.perf_counter() - start}
            loop.iteration_done(metrics)
            writer.write(loop.iteration, metrics)
            bar.set_postfix(loop.postfix(metrics), refresh=False)  # one redraw per iteration (update's)
            bar.update(1)
        bar.close()
    finally:
        writer.close()
        loop.close()
    return {**metrics, "model_dir": str(at(loop.out_dir, MODEL)), "iterations": loop.iteration,
            "resumed_from": int(storage.name_of(resumed).split("-")[1]) if resumed else None,
            "recoveries": recoveries}


def start_loop(make: Callable[..., RLLoop], cfg: PipelineConfig, actors: RLActors, prompts: Sequence[PromptRecord],
               tokenizer: Tokenizer, out_dir: Path, **kwargs: Any) -> tuple[RLLoop, int]:
    """`make(cfg, actors, kept prompts, their ids, tokenizer, out_dir, max_seq_len, **kwargs)` over the prompts
    that fit the generators' max_seq_len - max_new_tokens; returns the loop and the count of prompts dropped."""
    kind = make.kind  # type: ignore[attr-defined]
    max_seq_len = actors.call(lambda: actors.generators[0].max_seq_len.remote(), "generator max_seq_len")
    kept, prompt_ids = encode_prompts(prompts, tokenizer, max_seq_len - getattr(cfg, kind).max_new_tokens, kind)
    out_dir = out_dir if storage.is_uri(out_dir) else Path(out_dir)
    return make(cfg, actors, kept, prompt_ids, tokenizer, out_dir, max_seq_len, **kwargs), len(prompts) - len(kept)
