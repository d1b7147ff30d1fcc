"""Ghost Attention (GAtt, LLaMA 2 section 3.3): make a system instruction hold for a whole dialogue.

Touvron et al. (2023), section 3.3: "we synthetically concatenate this instruction to all the user messages of
the conversation", sample answers from the latest model, then "drop it in all but the first turn" for training;
because that creates "a mismatch at training time between the system message, i.e., all the intermediate
assistant messages that come before the last turn, and our sample", "we can simply set the loss to 0 for all
the tokens from the previous turns, including assistant messages."

Here, for a toy-world dialogue (an instruction, alone or combined, plus T user turns):

1. Sampling view (`sampling_messages`): the instruction is the system message (the chat template folds it into
   the first user turn's ``<<SYS>>`` block) AND is joined in front of every later user turn
   (``"{instruction} {user}"``), so the instruction sits in every user turn the model answers.
2. Sampling (`sample_dialogues`): turn by turn, every live dialogue of the turn in one batched call,
   ``samples_per_turn`` answers each from the current policy; a `Judge` scores the finished ones (an answer cut at
   ``max_new_tokens`` is no answer to train on; nor, with ``reject_repetitive``, one that loops: `is_repetitive`)
   and the best accepted answer joins the history. The pipeline's judge (`reward_model_judge`) accepts an answer
   iff the instruction's program check passes (`toyworld.follows_training_instruction`: capitals, the end word,
   ..., for training instructions only) and ranks the adherent answers by the two reward models composed as in
   PPO and rejection sampling (LLaMA 2's safety gate and `is_safety` tags). The gold judge's helpfulness and
   safety never select training data: they stay an independent evaluation. No gold answer is ever substituted: a
   dialogue with no accepted answer at turn t is cut to its first t - 1 turns.
3. Training view (`training_messages`, `encode_example`): the instruction only as the first turn's system
   prompt, later user turns plain, and the loss zero on every token of earlier turns, assistant answers
   included. One example per turn depth k (turns 1..k, loss on answer k and its ``</s>`` only), so each kept
   answer is trained exactly once, with all its earlier context masked: the paper's "context-dialogue and the
   sample" for every sample.
4. `run_gatt` samples through the round's tools (the pipeline: rollout generator actors on the round's policy
   and the two reward scorer actors, `actor_sampler` / `actor_scorer`; shut down before the fine-tune frees
   their CPUs), writes the tensors ``{tokens, loss_mask, lengths}`` and fine-tunes with the shared Ray Train loop
   (objective "lm"), in one or more rounds, each sampling from the model the round before trained. Optionally a share of
   SFT dialogues (their usual SFT mask) is replayed in the fine-tune data: on the tiny model, fine-tuning on
   its own noisy GAtt samples alone made it forget (over-refusal of borderline prompts, decorations without a
   system prompt); LLaMA 2 does not say it mixes data here.

This module imports neither ray nor the model at load time; `run_gatt` imports them when it runs.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rayllama.data.formats import PromptRecord
from rayllama.data.toyworld import category, follows_training_instruction, instruction_text
from rayllama.losses import llama2_combined_score
from rayllama.run_dir import RunDir
from rayllama.tokenizer import Tokenizer

Messages = list[dict[str, str]]
# dialogues (each ending with a user turn), n -> n answers per dialogue, None for an answer cut at max_new_tokens
SampleFn = Callable[[list[Messages], int], list[list[str | None]]]
Candidate = tuple[Mapping[str, Any], Mapping[str, Any], str]  # (task of the turn, instruction, answer)
# candidates -> per candidate a score (higher is better) if accepted, None if rejected
Judge = Callable[[Sequence[Candidate]], list[float | None]]
# (prompt messages, response) pairs -> (raw helpfulness scores, raw safety scores), one each per pair
PairScorer = Callable[[list[tuple[Messages, str]]], tuple[list[float], list[float]]]
CHECKPOINT_EVERY = 50  # fine-tune steps between Ray Train checkpoints
LOG_EVERY = 5


class GAttError(ValueError):
    """Bad GAtt input (a dialogue without an instruction or turns, nothing accepted, ...)."""


# ------------------------------------------------------------------------------------------------ the views


def _check_record(record: PromptRecord, index: int) -> None:
    if not record.instruction or not record.turns:
        raise GAttError(
            f"GAtt dialogue {index} has no instruction or no turns; use toyworld.gatt_dialogues / gatt.jsonl records"
        )


def _msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def sampling_messages(record: PromptRecord, answers: Sequence[str]) -> Messages:
    """The sampling view of `record` for its next turn (len(answers) < turns): system = the instruction, every
    later user turn ``"{instruction} {user}"``, the earlier `answers` as assistant turns; ends with a user turn."""
    if len(answers) >= len(record.turns or ()):
        raise GAttError(f"{len(answers)} answers for a {len(record.turns or ())}-turn dialogue; nothing to sample")
    text = instruction_text(record.instruction or {})
    messages = [_msg("system", text)]
    for i, task in enumerate(record.turns[: len(answers) + 1]):
        messages.append(_msg("user", task["prompt"] if i == 0 else f"{text} {task['prompt']}"))
        if i < len(answers):
            messages.append(_msg("assistant", answers[i]))
    return messages


def training_messages(record: PromptRecord, answers: Sequence[str]) -> Messages:
    """The training view: the instruction only as the system prompt of turn 1, user turns plain, one assistant
    message per answer (turns 1..len(answers)); ends with the last answer."""
    if not answers or len(answers) > len(record.turns or ()):
        raise GAttError(f"{len(answers)} answers for a {len(record.turns or ())}-turn dialogue; give 1..turns")
    messages = [_msg("system", instruction_text(record.instruction or {}))]
    for task, answer in zip(record.turns, answers):
        messages += [_msg("user", task["prompt"]), _msg("assistant", answer)]
    return messages


def encode_example(tok: Tokenizer, messages: Messages) -> tuple[list[int], list[int]]:
    """Ids of a training dialogue and its GAtt loss mask: 1 exactly on the LAST answer's tokens and its ``</s>``,
    0 on every token of the earlier turns (their answers included), on ``<<SYS>>`` and on user turns."""
    turns = tok.encode_dialog_turns(messages)
    ids = [t for turn_ids, _ in turns for t in turn_ids]
    mask = [0] * (len(ids) - len(turns[-1][1])) + list(turns[-1][1])
    return ids, mask


# ------------------------------------------------------------------------------------------------ sampling


def reward_model_judge(score_pairs: PairScorer, safety_gate: float = 0.15, min_reward: float = 0.0) -> Judge:
    """Accept an answer iff it obeys the instruction (`follows_training_instruction`, the program check of a training instruction) and its
    composed reward R_c >= min_reward; score = R_c. R_c is LLaMA 2's composition of the two reward models on the
    turn's plain user prompt and the answer: s = sigmoid(raw), R_c = s_safety if the task is safety-tagged (unsafe
    or borderline, as the RL prompts' `is_safety`) or s_safety < safety_gate, else s_helpful. One scoring call
    per batch, on the adherent answers only."""

    def judge(candidates: Sequence[Candidate]) -> list[float | None]:
        out: list[float | None] = [None] * len(candidates)
        adherent = [i for i, (_, instruction, answer) in enumerate(candidates) if follows_training_instruction(instruction, answer)]
        if not adherent:
            return out
        pairs = [([_msg("user", candidates[i][0]["prompt"])], candidates[i][2]) for i in adherent]
        raw_h, raw_s = score_pairs(pairs)
        tags = torch.tensor([category(candidates[i][0]) != "safe" for i in adherent])  # (N,)
        r_c = llama2_combined_score(torch.sigmoid(torch.tensor(raw_h, dtype=torch.float32)),
                                    torch.sigmoid(torch.tensor(raw_s, dtype=torch.float32)), tags, safety_gate)
        for i, r in zip(adherent, r_c.tolist()):
            if r >= min_reward:
                out[i] = r
        return out

    return judge


def is_repetitive(answer: str, max_span: int = 8) -> bool:
    """Whether `answer` loops: some span of 1 or 2 words occurs 3 times in a row, or a span of 3 to `max_span` words
    twice in a row (words: runs of letters and digits, case-insensitive, punctuation ignored), e.g. "folks, folks,
    folks" or "I repeat: the cat, I repeat: the cat". A sampled answer that loops is no GAtt target, whatever it
    starts and ends with: training on them made each round's samples loop more (world v6: 3 of 524 kept answers
    in round 1, 104 of 754 in round 5)."""
    words = [w.lower() for w in re.findall(r"[A-Za-z0-9]+", answer)]
    for k in range(1, max_span + 1):
        times = 3 if k <= 2 else 2
        for i in range(len(words) - times * k + 1):
            if all(words[i + j * k:i + (j + 1) * k] == words[i:i + k] for j in range(1, times)):
                return True
    return False


@dataclass
class GAttSamples:
    """Accepted answers per dialogue (a prefix of its turns: a dialogue stops at its first turn with no accepted
    sample) and the counts behind them."""

    answers: list[list[str]]  # answers[i][t]: the kept answer of dialogue i at turn t + 1
    samples: int = 0  # answers sampled, all turns
    samples_unfinished: int = 0  # of those, cut at max_new_tokens (never kept)
    samples_repetitive: int = 0  # of the finished ones, looping (`is_repetitive`; never kept when rejected)
    samples_adherent: int = 0  # of the finished ones, obeying the instruction (follows_training_instruction)
    samples_accepted: int = 0  # of those, accepted by the judge
    turns_sampled: list[int] = field(default_factory=list)  # per turn: dialogues still alive, sampled
    turns_kept: list[int] = field(default_factory=list)  # per turn: dialogues with an accepted answer

    def stats(self) -> dict[str, Any]:
        sampled, kept = sum(self.turns_sampled), sum(self.turns_kept)
        return {
            "dialogues_sampled": self.turns_sampled[0] if self.turns_sampled else 0,
            "dialogues_complete": self.turns_kept[-1] if self.turns_kept else 0,
            "turns_sampled": sampled,
            "turns_kept": kept,
            "turn_acceptance_rate": kept / sampled if sampled else math.nan,
            "samples": self.samples,
            "samples_unfinished": self.samples_unfinished,
            "samples_repetitive": self.samples_repetitive,
            "sample_adherence_rate": self.samples_adherent / self.samples if self.samples else math.nan,
            "sample_acceptance_rate": self.samples_accepted / self.samples if self.samples else math.nan,
            **{f"turns_kept_{t + 1}": k for t, k in enumerate(self.turns_kept)},
            **{f"truncated_at_turn_{t + 1}": s - k for t, (s, k) in enumerate(zip(self.turns_sampled, self.turns_kept))},
        }


def sample_dialogues(
    records: Sequence[PromptRecord], sample_fn: SampleFn, samples_per_turn: int, judge: Judge,
    max_turns: int | None = None, reject_repetitive: bool = True,
) -> GAttSamples:
    """Sample GAtt answers turn by turn: for turn t, all dialogues still alive in ONE `sample_fn` call on their
    sampling views (`samples_per_turn` answers each) and one `judge` call on all their finished answers (an answer
    cut at max_new_tokens, None from `sample_fn`, is never kept; nor, with `reject_repetitive`, one that loops:
    `is_repetitive`); keep the judge's best-scoring accepted answer (ties: the first sampled); a dialogue without
    an accepted answer stops there (its earlier turns stay)."""
    if samples_per_turn < 1:
        raise GAttError(f"samples_per_turn {samples_per_turn} must be >= 1")
    for i, r in enumerate(records):
        _check_record(r, i)
    n_turns = max((len(r.turns) for r in records), default=0)
    if max_turns is not None:
        n_turns = min(n_turns, max_turns)
    out = GAttSamples(answers=[[] for _ in records])
    alive = list(range(len(records)))
    for t in range(n_turns):
        alive = [i for i in alive if len(records[i].turns) > t]
        if not alive:
            break
        views = [sampling_messages(records[i], out.answers[i]) for i in alive]
        candidates = sample_fn(views, samples_per_turn)
        if len(candidates) != len(views) or any(len(c) != samples_per_turn for c in candidates):
            raise GAttError(
                f"sample_fn returned {[len(c) for c in candidates][:4]}... answers for {len(views)} dialogues; "
                f"it must return {samples_per_turn} strings per dialogue, in order"
            )
        flat = [(records[i].turns[t], records[i].instruction, a) for i, answers in zip(alive, candidates)
                for a in answers]
        looping = [a is not None and is_repetitive(a) for _, _, a in flat]
        judged = [j for j, (_, _, a) in enumerate(flat) if a is not None and not (reject_repetitive and looping[j])]
        scores: list[float | None] = [None] * len(flat)
        judged_scores = judge([flat[j] for j in judged]) if judged else []
        if len(judged_scores) != len(judged):
            raise GAttError(f"the judge returned {len(judged_scores)} scores for {len(judged)} answers; one per answer")
        for j, score in zip(judged, judged_scores):
            scores[j] = score
        survivors = []
        for d, (i, answers) in enumerate(zip(alive, candidates)):
            record = records[i]
            scored = list(zip(scores[d * samples_per_turn:(d + 1) * samples_per_turn], answers))
            finished = [a for a in answers if a is not None]
            out.samples += len(answers)
            out.samples_unfinished += len(answers) - len(finished)
            out.samples_repetitive += sum(looping[d * samples_per_turn:(d + 1) * samples_per_turn])
            out.samples_adherent += sum(follows_training_instruction(record.instruction, a) for a in finished)
            accepted = [(s, -j, a) for j, (s, a) in enumerate(scored) if s is not None]
            out.samples_accepted += len(accepted)
            if accepted:
                out.answers[i].append(max(accepted)[2])
                survivors.append(i)
        out.turns_sampled.append(len(alive))
        out.turns_kept.append(len(survivors))
        alive = survivors
    return out


def actor_sampler(actors: Any, tok: Tokenizer, g: Any, max_seq_len: int, seed: int) -> SampleFn:
    """A `SampleFn` over the rollout generators of `actors` (an `RLActors`; None for an answer that reached
    g.max_new_tokens without a stop): dialogue j goes to generator j % M,
    prompts keep their last max_seq_len - g.max_new_tokens tokens; call c samples with seeds derived from
    (seed, c, generator), so a run is reproducible."""
    from rayllama.chat import completion_text
    from rayllama.generation import SamplingParams

    calls = [0]
    budget = max_seq_len - g.max_new_tokens

    def sample(dialogues: list[Messages], n: int) -> list[list[str | None]]:
        m = len(actors.generators)
        shards = [list(range(k, len(dialogues), m)) for k in range(m)]
        busy = [k for k in range(m) if shards[k]]

        def params(k: int) -> SamplingParams:
            return SamplingParams(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p, n=n,
                                  stop_token_ids=(tok.eos_id,), seed=(seed * 1_000_003 + calls[0]) * 1009 + k)

        results = actors.call(lambda: [actors.generators[k].generate.remote(
            [tok.encode_prompt(dialogues[j])[-budget:] for j in shards[k]], params(k)) for k in busy],
            "GAtt sampling")
        calls[0] += 1
        out: list[list[str | None]] = [[] for _ in dialogues]
        for k, per_shard in zip(busy, results):
            for j, completions in zip(shards[k], per_shard, strict=True):
                out[j] = [completion_text(tok, c.token_ids) if c.finish_reason == "stop" else None
                          for c in completions]
        return out

    return sample


def actor_scorer(actors: Any) -> PairScorer:
    """A `PairScorer` over the two reward scorer actors of `actors`, both called at once."""

    def score(pairs: list[tuple[Messages, str]]) -> tuple[list[float], list[float]]:
        ref = actors.put(pairs)
        helpful, safety = actors.call(lambda: [actors.reward_helpfulness.score.remote(ref),
                                               actors.reward_safety.score.remote(ref)], "GAtt reward scoring")
        return helpful, safety

    return score


# ------------------------------------------------------------------------------------------------ tensors


def build_examples(records: Sequence[PromptRecord], answers: Sequence[Sequence[str]]) -> list[Messages]:
    """One training dialogue per kept turn depth k: `training_messages(record, answers[:k])`."""
    return [training_messages(r, a[:k]) for r, a in zip(records, answers) for k in range(1, len(a) + 1)]


Row = tuple[list[int], list[int]]  # (ids, loss mask)


def encode_rows(examples: Sequence[Messages], tok: Tokenizer, max_len: int, gatt_mask: bool = True) -> tuple[list[Row], int]:
    """Encode dialogues (gatt_mask: `encode_example`, loss on the last answer only; else the SFT mask, loss on
    every answer); those longer than max_len are dropped and counted."""
    rows, dropped = [], 0
    for messages in examples:
        row = encode_example(tok, messages) if gatt_mask else tok.encode_dialog(messages)
        if len(row[0]) > max_len:
            dropped += 1
        else:
            rows.append(row)
    return rows, dropped


def pad_rows(rows: Sequence[Row], pad_id: int) -> dict[str, torch.Tensor]:
    """The lm tensors of the shared Ray Train loop: tokens (N, L) long right-padded with pad_id, loss_mask (N, L)
    bool (False on padding), lengths (N,)."""
    width = max(len(ids) for ids, _ in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (N, L)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.bool)  # (N, L)
    for i, (ids, mask) in enumerate(rows):
        tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        loss_mask[i, : len(mask)] = torch.tensor(mask, dtype=torch.bool)
    return {"tokens": tokens, "loss_mask": loss_mask, "lengths": torch.tensor([len(ids) for ids, _ in rows])}


def example_tensors(examples: Sequence[Messages], tok: Tokenizer, max_len: int) -> tuple[dict, int]:
    """`pad_rows` of the GAtt-masked examples; examples longer than max_len are dropped and counted."""
    rows, dropped = encode_rows(examples, tok, max_len)
    if not rows:
        raise GAttError(f"no GAtt example fits in {max_len} tokens ({dropped} dropped); raise gatt.max_seq_len")
    return pad_rows(rows, tok.pad_id), dropped


# ------------------------------------------------------------------------------------------------ the stage

# the policy checkpoint of a round -> a context that yields that round's (SampleFn over the policy, Judge) and
# frees what it holds (actors) on exit, before the round's fine-tune
OpenRound = Callable[[Path], AbstractContextManager[tuple[SampleFn, Judge]]]


def run_gatt(
    cfg: Any, run_dir: str | Path | RunDir, tok: Tokenizer, dialogues: Sequence[PromptRecord], init_model_dir: str | Path,
    open_round: OpenRound, *, replay: Sequence[Messages] = (),
) -> dict[str, Any]:
    """The GAtt stage, in cfg.gatt.rounds rounds (each samples from the policy the round before trained, as
    LLaMA 2 samples from its latest RLHF model). Round r:

      sample   the r-th slice of cfg.gatt.dialogues dialogues (wrapping around `dialogues`) with the round's
               (sample_fn, judge) = `open_round(policy)`; counts go to gatt/round-<r>/stats.json
      build    one GAtt example per kept turn (loss on its last answer only) plus `replay` SFT dialogues
               (full SFT mask) making cfg.gatt.replay_share of the examples (against forgetting), in
               data/gatt-<r>.pt
      train    the shared Ray Train loop (objective "lm", cfg.gatt epochs / batch / optim) from the policy;
               the last round writes run_dir/gatt/model (a complete checkpoint with tokenizer.model)

    A round whose model (or whose tensors and stats) exist is not redone. Returns the last round's stats plus
    `round_<r>/<key>` for every round, `train_steps` and `rounds`."""
    g = cfg.gatt
    if g.rounds < 1:
        raise GAttError(f"gatt.rounds {g.rounds} must be >= 1")
    records = list(dialogues)
    if not records or g.dialogues < 1:
        raise GAttError("no GAtt dialogues given; pass toyworld.gatt_dialogues / gatt.jsonl records "
                        "and gatt.dialogues >= 1")
    if g.replay_share > 0 and not replay:
        raise GAttError(f"gatt.replay_share {g.replay_share} needs SFT dialogues to replay; pass replay= or set it "
                        f"to 0")
    # Ray Train workers run in another folder: absolute paths (or the URIs of a run on an object store)
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(Path(run_dir).absolute())
    policy = Path(init_model_dir).absolute()
    out: dict[str, Any] = {"rounds": g.rounds}
    for r in range(g.rounds):
        n = min(g.dialogues, len(records))
        chunk = [records[(r * n + i) % len(records)] for i in range(n)]
        last = r == g.rounds - 1
        model_dir = run.root / "gatt" / "model" if last else run.root / "gatt" / f"round-{r}" / "model"
        stats = _gatt_round(cfg, run, r, tok, chunk, policy, model_dir, open_round, replay)
        out.update({f"round_{r}/{k}": v for k, v in stats.items()})
        policy = model_dir
    return {**stats, **out}


def _gatt_round(cfg: Any, run: RunDir, r: int, tok: Tokenizer, records: list[PromptRecord], policy: Path,
                model_dir: Path, open_round: OpenRound, replay: Sequence[Messages]) -> dict[str, Any]:
    """One round: sample -> tensors -> fine-tune (see run_gatt); each step skipped when its output exists."""
    from rayllama.checkpoint import is_complete
    from rayllama.data.formats import SFTRecord, write_jsonl
    from rayllama.train.data import replay_sample, save_tensors
    from rayllama.train.loop import TrainJob, run_train_job
    from rayllama.train.stages import sharding

    g = cfg.gatt
    round_dir = run.root / "gatt" / f"round-{r}"
    data_path = run.data / f"gatt-{r}.pt"
    stats_path = round_dir / "stats.json"
    for path in (data_path, stats_path):  # a run on an object store: what an earlier driver wrote
        if not path.exists():
            run.pull(path)
    if not (data_path.exists() and stats_path.exists()):
        with open_round(policy) as (sample_fn, judge):
            sampled = sample_dialogues(records, sample_fn, g.samples_per_turn, judge, g.turns, g.reject_repetitive)
        max_len = _max_len(g.max_seq_len, policy)
        rows, too_long = encode_rows(build_examples(records, sampled.answers), tok, max_len)
        if not rows:
            raise GAttError(
                f"round {r}: no GAtt example (accepted {sampled.samples_accepted} of {sampled.samples} samples, "
                f"{too_long} too long); raise gatt.samples_per_turn or gatt.max_seq_len, or start from a better policy"
            )
        picked = replay_sample(replay, len(rows), g.replay_share, cfg.seed * 1000 + r)
        replay_rows, replay_long = encode_rows(picked, tok, max_len, gatt_mask=False)
        tensors = pad_rows(rows + replay_rows, tok.pad_id)  # one tensor file; the loop shuffles it per epoch
        stats = {**sampled.stats(), "examples": len(rows), "examples_too_long": too_long,
                 "replay_examples": len(replay_rows), "replay_too_long": replay_long, "max_len": max_len}
        write_jsonl(round_dir / "samples.jsonl", [
            SFTRecord(messages=training_messages(rec, a), extra={"instruction": rec.instruction})
            for rec, a in zip(records, sampled.answers) if a
        ])
        save_tensors(data_path, tensors)
        round_dir.mkdir(parents=True, exist_ok=True)
        stats_path.write_text(json.dumps(stats, indent=1, sort_keys=True))
        for path in (round_dir / "samples.jsonl", data_path, stats_path):  # the stats last: they mark the round
            run.push(path)
    stats = json.loads(stats_path.read_text())
    n = stats["examples"] + stats["replay_examples"]
    job = TrainJob(
        stage="gatt", objective="lm", data_path=run.remote(data_path), output=run.remote(model_dir),
        log_dir=run.remote(round_dir), optim=g.optim, total_steps=max(1, math.ceil(g.epochs * n / g.batch_size)),
        batch_size=g.batch_size, micro_batch_size=g.micro_batch_size, init=run.remote(policy),
        tokenizer_model=run.remote(Path(tok.model_path).absolute()),
        checkpoint_every=CHECKPOINT_EVERY, log_every=LOG_EVERY, seed=cfg.seed + r, threads=cfg.threads_per_worker,
        device=cfg.device, **sharding(cfg),
    )
    if not is_complete(run.pull(model_dir)):
        run_train_job(job, cfg.scaling)
        run.pull(model_dir)
    return {**stats, "train_steps": job.total_steps}


def _max_len(gatt_max_seq_len: int, model_dir: str | Path) -> int:
    """Training rows must fit both gatt.max_seq_len and the model's own max_seq_len (its RoPE table)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return min(gatt_max_seq_len, int(config.get("max_position_embeddings", gatt_max_seq_len)))


# ------------------------------------------------------------------------------------------------ reporting


def adherence_table(results: Mapping[str, Mapping[str, Any]], stages: Sequence[str] | None = None) -> str:
    """Instruction adherence by turn (rows) for each stage (columns), from rayllama.eval's adherence_turn_<t>."""
    stages = [s for s in (stages or list(results)) if any(k.startswith("adherence_turn_") for k in results.get(s, {}))]
    turns = sorted({int(k.rsplit("_", 1)[1]) for s in stages for k in results[s]
                    if k.startswith("adherence_turn_") and k.rsplit("_", 1)[1].isdigit()})
    width = max([8, *(len(s) for s in stages)])
    lines = ["turn".ljust(6) + "".join(s.rjust(width + 2) for s in stages)]
    lines.append("-" * len(lines[0]))
    for t in turns:
        cells = "".join(_fmt(results[s].get(f"adherence_turn_{t}")).rjust(width + 2) for s in stages)
        lines.append(str(t).ljust(6) + cells)
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"
