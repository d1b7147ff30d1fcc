"""Gold evaluation of a chat model on the toy world's held-out sets (rayllama.data.toyworld's judge).

`evaluate(generate_fn, eval_set)` answers every single-turn prompt in one batched call, then the multi-turn GAtt
dialogues turn by turn (one batched call per turn, the model's own earlier answers kept in the history), and
returns one flat dict of metrics:

    gold_helpfulness         mean judge_helpfulness on held-out safe prompts
    gold_safety              mean judge_safety on all single-turn prompts (safe, unsafe, borderline)
    refusal_rate_unsafe      share of unsafe prompts refused (is_refusal)
    over_refusal_borderline  share of borderline prompts refused (they only look unsafe)
    over_refusal_safe        share of safe prompts refused
    helpfulness_borderline   mean judge_helpfulness on borderline prompts
    helpfulness_gatt         mean judge_helpfulness over every GAtt turn
    adherence_turn_<t>       mean judge_adherence of the system instruction at user turn t (1-based)
    adherence_mean           mean adherence over all GAtt turns
    n_safe, n_unsafe, n_borderline, n_gatt   counts (a metric of an empty group is NaN)

`sampled_helpfulness(generate_fn, eval_set, samples)` is gold helpfulness of a sampling `generate_fn`: the mean
over `samples` answers per held-out safe prompt. The pipeline reports it at ppo.temperature as
gold_helpfulness_sampled: the distribution PPO optimizes, which a tiny model's greedy answer can hide.

`format_table(rows)` prints stages x metrics as a fixed-width text table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rayllama.data.formats import PromptRecord
from rayllama.data.toyworld import (
    category,
    dialogue_messages,
    is_refusal,
    judge_adherence,
    judge_helpfulness,
    judge_safety,
)

Messages = list[dict[str, str]]
GenerateFn = Callable[[list[Messages]], list[str]]
SAMPLES_PER_PROMPT = 8  # answers per held-out safe prompt for gold_helpfulness_sampled


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _generate(generate_fn: GenerateFn, dialogues: list[Messages]) -> list[str]:
    if not dialogues:
        return []
    answers = list(generate_fn(dialogues))
    if len(answers) != len(dialogues):
        raise ValueError(
            f"generate_fn returned {len(answers)} answers for {len(dialogues)} dialogues; "
            "it must return one string per dialogue, in order"
        )
    for a in answers:
        if not isinstance(a, str):
            raise ValueError(f"generate_fn returned a {type(a).__name__}; it must return strings")
    return answers


def _single_turn(eval_set: Sequence[PromptRecord]) -> list[PromptRecord]:
    """The single-turn records of `eval_set`, each with its task payload (ValueError naming one without)."""
    single = [r for r in eval_set if not r.turns]
    for r in single:
        if r.task is None:
            raise ValueError(
                f"eval prompt {r.prompt[-1]['content']!r} has no task payload; use records from "
                "toyworld.eval_sets / eval.jsonl"
            )
    return single


def evaluate(
    generate_fn: GenerateFn, eval_set: Sequence[PromptRecord], max_turns: int | None = None
) -> dict[str, float | int]:
    """Score `generate_fn` (a batch of dialogues, each ending with a user turn -> one answer each) with the gold
    judge on `eval_set` (toyworld.eval_sets or eval.jsonl records). `max_turns` caps the GAtt turns."""
    single = _single_turn(eval_set)
    multi = [r for r in eval_set if r.turns]

    # single-turn: one batched call
    answers = _generate(generate_fn, [[dict(m) for m in r.prompt] for r in single])
    groups: dict[str, list[tuple[dict[str, Any], str]]] = {"safe": [], "unsafe": [], "borderline": []}
    for r, a in zip(single, answers):
        groups[category(r.task)].append((r.task, a))
    safe, unsafe, border = groups["safe"], groups["unsafe"], groups["borderline"]
    out: dict[str, float | int] = {
        "gold_helpfulness": _mean([judge_helpfulness(t, a) for t, a in safe]),
        "gold_safety": _mean([judge_safety(t, a) for t, a in safe + unsafe + border]),
        "refusal_rate_unsafe": _mean([float(is_refusal(a)) for _, a in unsafe]),
        "over_refusal_borderline": _mean([float(is_refusal(a)) for _, a in border]),
        "over_refusal_safe": _mean([float(is_refusal(a)) for _, a in safe]),
        "helpfulness_borderline": _mean([judge_helpfulness(t, a) for t, a in border]),
    }

    # multi-turn GAtt dialogues: turn t of every dialogue in one call, the model's own answers in the history
    n_turns = max((len(r.turns) for r in multi), default=0)
    if max_turns is not None:
        n_turns = min(n_turns, max_turns)
    history: list[list[str]] = [[] for _ in multi]
    adherence: list[float] = []
    helpfulness: list[float] = []
    for t in range(n_turns):
        active = [i for i, r in enumerate(multi) if len(r.turns) > t]
        replies = _generate(generate_fn, [dialogue_messages(multi[i], history[i]) for i in active])
        scores = []
        for i, a in zip(active, replies):
            history[i].append(a)
            scores.append(float(judge_adherence(multi[i].instruction, a)))
            helpfulness.append(judge_helpfulness(multi[i].turns[t], a))
        out[f"adherence_turn_{t + 1}"] = _mean(scores)
        adherence += scores
    out["adherence_mean"] = _mean(adherence)
    out["helpfulness_gatt"] = _mean(helpfulness)
    out.update(n_safe=len(safe), n_unsafe=len(unsafe), n_borderline=len(border), n_gatt=len(multi))
    return out


def sampled_helpfulness(generate_fn: GenerateFn, eval_set: Sequence[PromptRecord], samples: int) -> float:
    """Mean judge_helpfulness of `samples` answers (one batched call, each safe single-turn prompt repeated
    `samples` times) per held-out safe prompt of `eval_set`; NaN without safe prompts."""
    if samples < 1:
        raise ValueError(f"samples {samples} must be >= 1; pass the number of answers per prompt, such as 8")
    safe = [r for r in _single_turn(eval_set) if category(r.task) == "safe"]
    answers = _generate(generate_fn, [[dict(m) for m in r.prompt] for r in safe for _ in range(samples)])
    return _mean([judge_helpfulness(safe[i // samples].task, a) for i, a in enumerate(answers)])


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool) or isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def format_table(
    rows: Mapping[str, Mapping[str, Any]], metrics: Sequence[str] | None = None, transpose: bool = False
) -> str:
    """A fixed-width table: one row per stage (the keys of `rows`), one column per metric (`metrics`, or every
    metric in first-seen order). `transpose=True` puts metrics down and stages across (narrower)."""
    if metrics is None:
        metrics = list(dict.fromkeys(k for row in rows.values() for k in row))
    header = ["stage", *metrics]
    body = [[stage, *(_cell(row.get(m)) for m in metrics)] for stage, row in rows.items()]
    if transpose:
        table = [list(col) for col in zip(header, *body)]
        table[0][0] = "metric"
    else:
        table = [header, *body]
    widths = [max(len(r[c]) for r in table) for c in range(len(table[0]))]
    lines = [
        "  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(r, widths)))
        for r in table
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)
