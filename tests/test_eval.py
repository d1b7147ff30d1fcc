"""Gold evaluation: the perfect responder scores ~1, random text ~0, refusing everything shows over-refusal;
generation is batched per turn with the model's own answers in the history. `pytest -s` prints the tables."""

import math
import random

import pytest

from rayllama.data import toyworld as tw
from rayllama.data.formats import read_prompts, write_jsonl
from rayllama.eval import evaluate, format_table, sampled_helpfulness

TURNS = 6


@pytest.fixture(scope="module")
def eval_set():
    return tw.eval_sets(seed=0, n_safe=60, n_unsafe=20, n_borderline=20, n_gatt=20, turns=TURNS)


def perfect_fn(dialogues):
    return [tw.perfect_chat(d) for d in dialogues]


def random_fn_factory(seed=0):
    rng = random.Random(seed)
    vocab = tw.world()["filler"] + tw.world()["words"]
    return lambda dialogues: [" ".join(rng.choices(vocab, k=rng.randint(2, 8))) for _ in dialogues]


def refuse_fn(dialogues):
    return ["I'm sorry, but I can't help with that." for _ in dialogues]


def test_perfect_random_and_refusing_responders(eval_set):
    perfect = evaluate(perfect_fn, eval_set)
    rand = evaluate(random_fn_factory(), eval_set)
    refuse = evaluate(refuse_fn, eval_set)
    print("\n" + format_table({"perfect": perfect, "random": rand, "always_refuse": refuse}))
    print("\n" + format_table({"perfect": perfect, "random": rand, "always_refuse": refuse}, transpose=True))

    assert (perfect["n_safe"], perfect["n_unsafe"], perfect["n_borderline"], perfect["n_gatt"]) == (
        60,
        20,
        20,
        20,
    )
    assert perfect["gold_helpfulness"] == 1.0 and perfect["gold_safety"] == 1.0
    assert perfect["refusal_rate_unsafe"] == 1.0 and perfect["over_refusal_borderline"] == 0.0
    assert perfect["helpfulness_borderline"] == 1.0 and perfect["helpfulness_gatt"] == 1.0
    assert [perfect[f"adherence_turn_{t}"] for t in range(1, TURNS + 1)] == [1.0] * TURNS
    assert "adherence_turn_7" not in perfect

    assert rand["gold_helpfulness"] < 0.05 and rand["helpfulness_borderline"] < 0.05
    assert rand["refusal_rate_unsafe"] == 0.0 and rand["adherence_mean"] < 0.05
    assert rand["gold_safety"] == pytest.approx(
        80 / 100
    )  # of 100 single-turn prompts only the 20 unsafe fail

    assert refuse["refusal_rate_unsafe"] == 1.0 and refuse["over_refusal_borderline"] == 1.0
    assert refuse["over_refusal_safe"] == 1.0 and refuse["gold_helpfulness"] == 0.0
    assert refuse["gold_safety"] == 1.0


def test_generation_is_batched_per_turn_with_own_history(eval_set):
    calls = []

    def echo_fn(dialogues):
        calls.append(dialogues)
        return [f"answer {len(calls)} {i}" for i in range(len(dialogues))]

    out = evaluate(echo_fn, eval_set, max_turns=3)
    assert [len(c) for c in calls] == [
        100,
        20,
        20,
        20,
    ]  # all single-turn prompts at once, then one call a turn
    assert "adherence_turn_3" in out and "adherence_turn_4" not in out
    for i, d in enumerate(calls[3]):  # turn 3 sees the model's own answers of turns 1 and 2
        assert [m["role"] for m in d] == ["system", "user", "assistant", "user", "assistant", "user"]
        assert d[2]["content"] == f"answer 2 {i}" and d[4]["content"] == f"answer 3 {i}"


def test_eval_file_round_trip_gives_same_metrics(tmp_path, eval_set):
    path = write_jsonl(tmp_path / "eval.jsonl", eval_set)
    assert evaluate(perfect_fn, read_prompts(path)) == evaluate(perfect_fn, eval_set)


def test_bad_generate_fn_and_records(eval_set):
    with pytest.raises(ValueError, match="returned 99 answers for 100 dialogues"):
        evaluate(lambda ds: ["x"] * (len(ds) - 1), eval_set)
    with pytest.raises(ValueError, match="must return strings"):
        evaluate(lambda ds: [None] * len(ds), eval_set)
    bare = tw.rl_prompts(1, seed=0)[0]
    bare.task = None
    with pytest.raises(ValueError, match="has no task payload"):
        evaluate(perfect_fn, [bare])
    with pytest.raises(ValueError, match="has no task payload"):
        sampled_helpfulness(perfect_fn, [bare], 8)


def test_empty_groups_are_nan():
    only_safe = [r for r in tw.eval_sets(seed=1, n_safe=6, n_unsafe=0, n_borderline=0, n_gatt=0)]
    out = evaluate(perfect_fn, only_safe)
    assert out["gold_helpfulness"] == 1.0 and out["n_unsafe"] == 0
    assert math.isnan(out["refusal_rate_unsafe"]) and math.isnan(out["adherence_mean"])


def test_sampled_helpfulness_averages_every_sample_of_every_safe_prompt(eval_set):
    n_safe = sum(1 for r in eval_set if not r.turns and tw.category(r.task) == "safe")
    calls = []

    def first_of_four_perfect(dialogues):  # each prompt's samples are consecutive: the first of four is perfect
        calls.append(len(dialogues))
        return [tw.perfect_response(tw.task_from_prompt(d[-1]["content"])) if i % 4 == 0 else "I don't know."
                for i, d in enumerate(dialogues)]

    assert sampled_helpfulness(first_of_four_perfect, eval_set, 4) == pytest.approx(0.25)
    assert calls == [4 * n_safe]
    with pytest.raises(ValueError, match="samples 0 must be >= 1"):
        sampled_helpfulness(first_of_four_perfect, eval_set, 0)


def test_format_table_fixed_width():
    table = format_table(
        {
            "sft": {"gold_helpfulness": 0.61234, "n_safe": 60},
            "ppo": {"gold_helpfulness": 0.8, "refusal": float("nan")},
        }
    )
    assert table.splitlines() == [
        "stage  gold_helpfulness  n_safe  refusal",
        "-----  ----------------  ------  -------",
        "sft               0.612      60        -",
        "ppo               0.800       -        -",
    ]
    assert format_table({"a": {"x": 1}}, transpose=True).splitlines() == [
        "metric  a",
        "------  -",
        "x       1",
    ]


def test_bootstrap_intervals_and_paired_changes_by_hand():
    from rayllama.eval import bootstrap_ci, change_lines, paired_change

    assert bootstrap_ci([0.5] * 10) == (0.5, 0.5)  # no spread, no width
    lo, hi = bootstrap_ci([0.0, 1.0] * 30)  # mean 0.5, standard error 0.5 / sqrt(60) = 0.065
    assert 0.5 - 2.2 * 0.065 < lo < 0.5 - 1.7 * 0.065 and 0.5 + 1.7 * 0.065 < hi < 0.5 + 2.2 * 0.065
    assert bootstrap_ci([0.0, 1.0] * 30) == (lo, hi)  # deterministic
    # pairing: every item improves by exactly 0.1, so the paired interval has no width while the unpaired
    # intervals of the two stages overlap
    before = [i / 60 for i in range(60)]
    after = [b + 0.1 for b in before]
    change, c_lo, c_hi = paired_change(before, after)
    assert abs(change - 0.1) < 1e-12 and abs(c_lo - 0.1) < 1e-12 and abs(c_hi - 0.1) < 1e-12
    assert bootstrap_ci(after)[0] < bootstrap_ci(before)[1]
    with pytest.raises(ValueError, match="same items"):
        paired_change([1.0], [1.0, 2.0])
    results = {"sft": {"scores": {"gold_helpfulness": before}}, "ppo": {"scores": {"gold_helpfulness": after}}}
    assert change_lines(results, ["sft", "ppo"]) == ["gold_helpfulness: sft -> ppo +0.100 [+0.100, +0.100] (n=60)"]


def test_evaluate_fills_the_per_item_scores_behind_its_means(eval_set):
    from rayllama.eval import evaluate

    scores: dict[str, list[float]] = {}
    metrics = evaluate(random_fn_factory(1), eval_set, scores=scores)
    for name in ("gold_helpfulness", "refusal_rate_unsafe", "over_refusal_borderline", "adherence_turn_1"):
        assert abs(sum(scores[name]) / len(scores[name]) - metrics[name]) < 1e-12, name
    assert len(scores["gold_helpfulness"]) == metrics["n_safe"]
