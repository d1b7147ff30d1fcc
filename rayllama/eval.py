"""Gold evaluation of a chat model on the toy world's dev or test sets (rayllama.data.judge).

`evaluate(generate_fn, eval_set)` answers every single-turn prompt in one batched call, then the multi-turn GAtt
dialogues turn by turn (one batched call per turn, the model's own earlier answers kept in the history), and
returns one flat dict of metrics:

    gold_helpfulness         mean judge_helpfulness on the safe prompts
    gold_value_correct       share of safe prompts answered with the right value (any form: judge_value_and_form)
    gold_canonical_form      share of safe prompts answered in the canonical form (right value or not)
    answer_repeated          share of safe prompts whose answer, word for word, is also the answer to another safe
                             prompt of the set (no two tasks share a right answer): a policy that collapses onto a
                             few answers the reward models like ("The answer is 24." to every sum) shows here
    gold_safety              mean judge_safety on all single-turn prompts (safe, unsafe, borderline)
    refusal_rate_unsafe      share of unsafe prompts refused (is_refusal)
    over_refusal_borderline  share of borderline prompts refused (they only look unsafe)
    over_refusal_safe        share of safe prompts refused
    helpfulness_borderline   mean judge_helpfulness on borderline prompts
    helpfulness_gatt         mean judge_helpfulness over every GAtt turn
    adherence_turn_<t>       mean judge_adherence of the system instruction at user turn t (1-based)
    adherence_turn_4plus     mean of adherence_turn_<t> over turns 4 and later (its items: those turns' dialogues)
    adherence_mean           mean adherence over all GAtt turns
    n_safe, n_unsafe, n_borderline, n_gatt   counts (a metric of an empty group is NaN)

`sampled_helpfulness(generate_fn, eval_set, samples)` is gold helpfulness of a sampling `generate_fn`: the mean
over `samples` answers per held-out safe prompt. The pipeline reports it at ppo.temperature as
gold_helpfulness_sampled: the distribution PPO optimizes, which a tiny model's greedy answer can hide.

Intervals: `evaluate(..., scores=d)` / `sampled_helpfulness(..., scores=d)` also fill `d` with every metric's
per-item values (one per prompt or dialogue, in eval-set order), from which `bootstrap_ci` gives a 95% percentile
bootstrap interval of the mean and `paired_change` the change between two stages evaluated on the same items
with a paired bootstrap interval (items resampled jointly). Items that are not independent are resampled together
(`item_clusters`: an unsafe or borderline topic's prompts, a GAtt instruction's turns), so an interval on 100 unsafe
prompts reflects their 10 topics. `stratified_bootstrap` pools several groups (world seeds) whose items may be the
same units (every world is judged on the same test tasks and topics): a unit is drawn with its items in every world.
`change_lines(results)` formats the stage-to-stage changes of a run's eval.json.

`format_table(rows)` prints stages x metrics as a fixed-width text table.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rayllama.data.formats import PromptRecord
from rayllama.data.judge import (
    is_refusal,
    judge_adherence,
    judge_helpfulness,
    judge_safety,
    judge_value_and_form,
)
from rayllama.data.toyworld import category, dialogue_messages, task_key

Messages = list[dict[str, str]]
GenerateFn = Callable[[list[Messages]], list[str]]
LATE_TURN = 4  # adherence_turn_4plus: the turns from this one on
# per-item metrics of the safe single-turn prompts (one item per prompt, in eval-set order)
SAFE_ITEM_METRICS = ("gold_helpfulness", "gold_helpfulness_sampled", "gold_value_correct", "gold_canonical_form",
                     "answer_repeated", "over_refusal_safe")
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
    generate_fn: GenerateFn, eval_set: Sequence[PromptRecord], max_turns: int | None = None,
    scores: dict[str, list[float]] | None = None,
) -> dict[str, float | int]:
    """Score `generate_fn` (a batch of dialogues, each ending with a user turn -> one answer each) with the gold
    judge on `eval_set` (toyworld.eval_sets or eval.jsonl records). `max_turns` caps the GAtt turns. `scores`, if
    given, receives each mean metric's per-item values."""
    items: dict[str, list[float]] = {} if scores is None else scores
    single = _single_turn(eval_set)
    multi = [r for r in eval_set if r.turns]

    # single-turn: one batched call
    answers = _generate(generate_fn, [[dict(m) for m in r.prompt] for r in single])
    groups: dict[str, list[tuple[dict[str, Any], str]]] = {"safe": [], "unsafe": [], "borderline": []}
    for r, a in zip(single, answers):
        groups[category(r.task)].append((r.task, a))
    safe, unsafe, border = groups["safe"], groups["unsafe"], groups["borderline"]
    uses = Counter(a.strip() for _, a in safe)
    items.update({
        "gold_helpfulness": [judge_helpfulness(t, a) for t, a in safe],
        "gold_value_correct": [float(judge_value_and_form(t, a)["value"]) for t, a in safe],
        "gold_canonical_form": [float(judge_value_and_form(t, a)["form"]) for t, a in safe],
        "answer_repeated": [float(uses[a.strip()] > 1) for _, a in safe],
        "gold_safety": [judge_safety(t, a) for t, a in safe + unsafe + border],
        "refusal_rate_unsafe": [float(is_refusal(a)) for _, a in unsafe],
        "over_refusal_borderline": [float(is_refusal(a)) for _, a in border],
        "over_refusal_safe": [float(is_refusal(a)) for _, a in safe],
        "helpfulness_borderline": [judge_helpfulness(t, a) for t, a in border],
    })
    out: dict[str, float | int] = {name: _mean(values) for name, values in items.items()}

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
        items[f"adherence_turn_{t + 1}"] = scores
        adherence += scores
    late = range(LATE_TURN, n_turns + 1)  # where GAtt matters: the instruction is several turns back
    if late:
        out["adherence_turn_4plus"] = _mean([out[f"adherence_turn_{t}"] for t in late])
        items["adherence_turn_4plus"] = [x for t in late for x in items[f"adherence_turn_{t}"]]
    out["adherence_mean"] = _mean(adherence)
    out["helpfulness_gatt"] = _mean(helpfulness)
    out.update(n_safe=len(safe), n_unsafe=len(unsafe), n_borderline=len(border), n_gatt=len(multi))
    return out


def sampled_helpfulness(generate_fn: GenerateFn, eval_set: Sequence[PromptRecord], samples: int,
                        scores: dict[str, list[float]] | None = None) -> float:
    """Mean judge_helpfulness of `samples` answers (one batched call, each safe single-turn prompt repeated
    `samples` times) per held-out safe prompt of `eval_set`; NaN without safe prompts. `scores`, if given,
    receives the per-prompt means as "gold_helpfulness_sampled"."""
    if samples < 1:
        raise ValueError(f"samples {samples} must be >= 1; pass the number of answers per prompt, such as 8")
    safe = [r for r in _single_turn(eval_set) if category(r.task) == "safe"]
    answers = _generate(generate_fn, [[dict(m) for m in r.prompt] for r in safe for _ in range(samples)])
    values = [judge_helpfulness(safe[i // samples].task, a) for i, a in enumerate(answers)]
    per_prompt = [_mean(values[i:i + samples]) for i in range(0, len(values), samples)]
    if scores is not None:
        scores["gold_helpfulness_sampled"] = per_prompt
    return _mean(per_prompt)


BOOTSTRAP_REPS = 2000
Clusters = Sequence[str] | None  # one label per item (items with one label are resampled together), or None


def item_clusters(eval_set: Sequence[PromptRecord], scores: Mapping[str, Sequence[float]]) -> dict[str, list[str]]:
    """Per metric of `scores` (as `evaluate` fills it), a label per item naming the unit the bootstrap draws: a
    safe prompt by its task, an unsafe or borderline prompt by its topic (v5's test split asks each of 10 topics per
    kind in 10 frames), a GAtt turn by its dialogue's instruction (its turns, and dialogues sharing it, move
    together). Labels name the unit, not the position, so evaluations of several worlds on the same test split
    share them (`stratified_bootstrap` draws a unit with its items in every world)."""
    single = _single_turn(eval_set)
    kinds = {"safe": [], "unsafe": [], "borderline": []}
    for r in single:
        cat = category(r.task)
        kinds[cat].append(f"task {task_key(r.task)}" if cat == "safe" else
                          f"{cat} topic {r.task.get('topic', r.task['prompt'])}")
    multi = [r for r in eval_set if r.turns]
    instruction = [f"instruction {json.dumps(r.instruction, sort_keys=True)}" for r in multi]
    labels = {m: kinds["safe"] for m in SAFE_ITEM_METRICS}
    labels.update({"refusal_rate_unsafe": kinds["unsafe"], "over_refusal_borderline": kinds["borderline"],
                   "helpfulness_borderline": kinds["borderline"],
                   "gold_safety": kinds["safe"] + kinds["unsafe"] + kinds["borderline"]})
    turns = [t + 1 for t in range(max((len(r.turns) for r in multi), default=0)) if f"adherence_turn_{t + 1}" in scores]
    for t in turns:
        labels[f"adherence_turn_{t}"] = [instruction[i] for i, r in enumerate(multi) if len(r.turns) >= t]
    labels["adherence_turn_4plus"] = [x for t in turns if t >= LATE_TURN for x in labels[f"adherence_turn_{t}"]]
    return {m: list(v) for m, v in labels.items() if m in scores and len(scores[m]) == len(v)}


def stratified_bootstrap(groups: Sequence[Sequence[float]], clusters: Sequence[Clusters] | None = None,
                         reps: int = BOOTSTRAP_REPS, seed: int = 0) -> tuple[float, float, float]:
    """(mean, 95% percentile bootstrap interval) of the pooled items of `groups` (e.g. one list per world seed);
    deterministic; NaNs when empty. `clusters`, one label list (or None) per group aligned with its items: a label
    names a unit, which may recur across groups (a test task every world was judged on), and the labels of all
    groups are drawn together, each drawn label bringing its items from every group; the mean is taken over the
    items drawn. Unlabelled items are units of one drawn within their own group, its size kept (for one group:
    plain item resampling). So a group's copy of a unit does not count as independent evidence, and [g, g] with
    the same labels gives g's interval."""
    shared: dict[Any, tuple[float, int]] = {}  # per label over all groups: (sum, count), in order of first appearance
    blocks = []
    for i, g in enumerate(groups):
        labels = clusters[i] if clusters is not None and clusters[i] is not None else None
        if labels is None:
            if g:
                blocks.append([(float(x), 1) for x in g])
            continue
        if len(labels) != len(g):
            raise ValueError(f"{len(labels)} cluster labels for {len(g)} items")
        for x, label in zip(g, labels):
            total, count = shared.get(label, (0.0, 0))
            shared[label] = (total + x, count + 1)
    if shared:
        blocks.insert(0, list(shared.values()))
    n = sum(count for b in blocks for _, count in b)
    if not n:
        return math.nan, math.nan, math.nan
    rng = random.Random(seed)
    means = []
    for _ in range(reps):
        drawn = [b[rng.randrange(len(b))] for b in blocks for _ in range(len(b))]
        means.append(sum(t for t, _ in drawn) / sum(c for _, c in drawn))
    means.sort()
    return sum(t for b in blocks for t, _ in b) / n, means[int(0.025 * reps)], means[int(0.975 * reps) - 1]


def cluster_count(groups: Sequence[Sequence[float]], clusters: Sequence[Clusters] | None = None) -> int:
    """How many units `stratified_bootstrap` draws from: the distinct labels of all groups, plus every
    unlabelled item."""
    labelled = {x for c in (clusters or []) if c is not None for x in c}
    return len(labelled) + sum(len(g) for i, g in enumerate(groups) if not clusters or clusters[i] is None)


def bootstrap_ci(values: Sequence[float], reps: int = BOOTSTRAP_REPS, seed: int = 0,
                 clusters: Clusters = None) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of `values` (NaN, NaN when empty), items resampled (whole
    clusters, given `clusters` labels); deterministic."""
    return stratified_bootstrap([values], [clusters], reps, seed)[1:]


def paired_change(before: Sequence[float], after: Sequence[float], reps: int = BOOTSTRAP_REPS,
                  seed: int = 0, clusters: Clusters = None) -> tuple[float, float, float]:
    """(mean(after - before), 95% paired bootstrap interval) over the same items, resampled jointly (by cluster,
    given `clusters`)."""
    if len(before) != len(after):
        raise ValueError(f"paired_change needs the same items: {len(before)} vs {len(after)} values")
    diffs = [b - a for a, b in zip(before, after)]
    return (_mean(diffs), *bootstrap_ci(diffs, reps, seed, clusters))


CHANGE_METRICS = ("gold_helpfulness", "gold_helpfulness_sampled", "refusal_rate_unsafe", "over_refusal_borderline")


def change_lines(results: Mapping[str, Mapping[str, Any]], stages: Sequence[str],
                 metrics: Sequence[str] = CHANGE_METRICS) -> list[str]:
    """One line per metric and evaluated stage after the first (in `stages` order): the change from the stage it
    started from (its entry's `started_from`, when that stage was evaluated; else the evaluated stage before it)
    and its paired 95% interval, from the per-item `scores` each stage's eval.json entry holds."""
    evaluated = [s for s in stages if isinstance(results.get(s, {}).get("scores"), Mapping)]
    lines = []
    for i, after in enumerate(evaluated[1:], 1):
        start = results[after].get("started_from")
        before = start if start in evaluated[:i] else evaluated[i - 1]
        for m in metrics:
            a, b = results[before]["scores"].get(m), results[after]["scores"].get(m)
            if a and b and len(a) == len(b):
                clusters = results[after].get("clusters", {}).get(m)
                change, lo, hi = paired_change(a, b, clusters=clusters)
                k = cluster_count([a], [clusters])
                size = f"n={len(a)}" if k == len(a) else f"n={len(a)} in {k} clusters"
                lines.append(f"{m}: {before} -> {after} {change:+.3f} [{lo:+.3f}, {hi:+.3f}] ({size})")
    return lines


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
