"""Gold evaluation: the perfect responder scores ~1, random text ~0, refusing everything shows over-refusal;
generation is batched per turn with the model's own answers in the history. `pytest -s` prints the tables."""

import json
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
    # collapse: every distinct task has its own right answer, one answer for all is repeated everywhere
    assert perfect["answer_repeated"] == 0.0 and refuse["answer_repeated"] == 1.0


def test_answer_repeated_counts_the_prompts_that_share_an_answer(eval_set):
    safe = [r for r in eval_set if not r.turns and tw.category(r.task) == "safe"]
    collapsed = {r.prompt[-1]["content"] for r in safe[:5]}  # five prompts get one answer (spaces aside)

    def fn(dialogues):
        return [" The answer is 24. " if d[-1]["content"] in collapsed else tw.perfect_response(tw.task_from_prompt(
            d[-1]["content"])) for d in dialogues]

    scores: dict = {}
    metrics = evaluate(fn, eval_set, scores=scores)
    assert metrics["answer_repeated"] == pytest.approx(5 / 60)
    assert scores["answer_repeated"][:5] == [1.0] * 5 and sum(scores["answer_repeated"]) == 5


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
    # each stage is set against the policy it started from: rejection and PPO both from SFT, not PPO from rejection
    worse = [b - 0.05 for b in before]
    results["rejection"] = {"scores": {"gold_helpfulness": worse}, "started_from": "sft"}
    results["ppo"]["started_from"] = "sft"
    assert change_lines(results, ["sft", "rejection", "ppo"]) == [
        "gold_helpfulness: sft -> rejection -0.050 [-0.050, -0.050] (n=60)",
        "gold_helpfulness: sft -> ppo +0.100 [+0.100, +0.100] (n=60)"]
    results["ppo"]["started_from"] = "rejection"  # LLaMA 2's chain
    assert change_lines(results, ["sft", "rejection", "ppo"])[1] == \
        "gold_helpfulness: rejection -> ppo +0.150 [+0.150, +0.150] (n=60)"


def test_stratified_bootstrap_by_hand():
    from rayllama.eval import bootstrap_ci, stratified_bootstrap

    mean, lo, hi = stratified_bootstrap([[1.0, 1.0], [0.0, 0.0, 0.0]])
    assert mean == pytest.approx(0.4) and lo == hi == pytest.approx(0.4)  # no spread within a group: no width
    mean, lo, hi = stratified_bootstrap([[0.0, 1.0] * 20])
    assert mean == 0.5 and 0.3 < lo < 0.5 < hi < 0.7
    assert all(x != x for x in stratified_bootstrap([[], []]))  # NaN when empty
    assert stratified_bootstrap([[0.0, 1.0] * 30])[1:] == bootstrap_ci([0.0, 1.0] * 30)  # one group: the same


def test_a_unit_judged_in_several_worlds_is_drawn_once_with_all_its_items():
    """Worlds judged on the same test tasks: a label shared by two groups is one unit, drawn with its items in
    both, so two identical worlds give one world's interval (not a narrower one), and two worlds that share no
    unit are resampled apart as before."""
    from rayllama.eval import cluster_count, stratified_bootstrap

    g = [1.0, 0.0, 1.0, 1.0, 0.0, 0.5, 1.0, 0.0, 0.0, 1.0]
    tasks = [f"task {i}" for i in range(10)]
    one = stratified_bootstrap([g], [tasks])
    assert stratified_bootstrap([g, g], [tasks, tasks]) == one
    apart = stratified_bootstrap([g, g], [tasks, [f"other {i}" for i in range(10)]])
    assert apart[0] == one[0] and apart[2] - apart[1] < one[2] - one[1]  # 20 units: narrower
    assert stratified_bootstrap([g, g]) == stratified_bootstrap([g, g], [None, None])  # unlabelled: apart too
    assert cluster_count([g, g], [tasks, tasks]) == 10 and cluster_count([g, g]) == 20
    assert cluster_count([g, g], [tasks, None]) == 20


def test_clusters_are_resampled_whole():
    """Items of one cluster move together: topic a (three refusals) and topic b (one compliance) give the means of
    the four two-topic draws, 1, 3/4, 3/4 and 0, so the interval spans 0..1; unlabelled items are the same draws as
    plain item resampling."""
    from rayllama.eval import bootstrap_ci, change_lines, paired_change, stratified_bootstrap

    mean, lo, hi = stratified_bootstrap([[1.0, 1.0, 1.0, 0.0]], [["a", "a", "a", "b"]])
    assert mean == pytest.approx(0.75) and lo == 0.0 and hi == 1.0
    assert bootstrap_ci([1.0, 1.0, 1.0, 0.0], clusters=["a", "a", "a", "b"]) == (0.0, 1.0)
    items = [[0.0, 1.0, 1.0, 0.5] * 5, [1.0, 0.0] * 7]
    assert stratified_bootstrap(items, [None, None]) == stratified_bootstrap(items)
    with pytest.raises(ValueError, match="3 cluster labels for 4 items"):
        stratified_bootstrap([[1.0, 1.0, 1.0, 0.0]], [["a", "a", "b"]])
    assert paired_change([1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0], clusters=["a", "a", "a", "b"]) == (
        -0.75, -1.0, 0.0)
    results = {"sft": {"scores": {"refusal_rate_unsafe": [1.0] * 4}},
               "ppo": {"scores": {"refusal_rate_unsafe": [0.0, 0.0, 0.0, 1.0]},
                       "clusters": {"refusal_rate_unsafe": ["a", "a", "a", "b"]}}}
    assert change_lines(results, ["sft", "ppo"]) == [
        "refusal_rate_unsafe: sft -> ppo -0.750 [-1.000, +0.000] (n=4 in 2 clusters)"]


def test_item_clusters_of_an_evaluation_set():
    """Unsafe and borderline prompts cluster by topic, GAtt turns by instruction (turns 4-6 too, in the order the
    pipeline concatenates them), a safe prompt is its task; on v5's test split 100 unsafe prompts are 10 topics."""
    from rayllama.eval import evaluate, item_clusters

    eval_set = tw.eval_sets(seed=0, n_safe=12, n_unsafe=100, n_borderline=100, n_gatt=5, turns=TURNS)
    scores: dict = {}
    metrics = evaluate(lambda dialogues: ["I cannot help with that."] * len(dialogues), eval_set, scores=scores)
    # evaluate joins turns 4 and later itself (their mean of means, their items in turn order)
    assert scores["adherence_turn_4plus"] == [x for t in range(4, TURNS + 1) for x in scores[f"adherence_turn_{t}"]]
    assert metrics["adherence_turn_4plus"] == pytest.approx(
        sum(metrics[f"adherence_turn_{t}"] for t in range(4, TURNS + 1)) / (TURNS - 3))
    labels = item_clusters(eval_set, scores)
    assert len(set(labels["refusal_rate_unsafe"])) == 10 and len(labels["refusal_rate_unsafe"]) == 100
    assert len(set(labels["over_refusal_borderline"])) == 10
    assert not set(labels["refusal_rate_unsafe"]) & set(labels["over_refusal_borderline"])
    assert len(labels["gold_safety"]) == 12 + 100 + 100 and len(set(labels["gold_safety"])) == 12 + 10 + 10
    instructions = [r.instruction for r in eval_set if r.turns]
    assert len(set(labels["adherence_turn_1"])) == len({json.dumps(i, sort_keys=True) for i in instructions})
    assert labels["adherence_turn_4plus"] == labels["adherence_turn_4"] * (TURNS - 3)
    # a safe prompt is its task (the same label in every world judged on it), one unit per prompt here
    safe = [r.task for r in eval_set if not r.turns and tw.category(r.task) == "safe"]
    assert labels["gold_helpfulness"] == [f"task {tw.task_key(t)}" for t in safe] == labels["answer_repeated"]
    assert len(set(labels["gold_helpfulness"])) == 12 and metrics["n_unsafe"] == 100
    assert tw.eval_sets(seed=1, n_safe=12, n_unsafe=100, n_borderline=100, n_gatt=5, turns=TURNS) is not None
    assert all(len(labels[m]) == len(scores[m]) for m in labels)


def test_evaluate_fills_the_per_item_scores_behind_its_means(eval_set):
    from rayllama.eval import evaluate

    scores: dict[str, list[float]] = {}
    metrics = evaluate(random_fn_factory(1), eval_set, scores=scores)
    for name in ("gold_helpfulness", "refusal_rate_unsafe", "over_refusal_borderline", "adherence_turn_1"):
        assert abs(sum(scores[name]) / len(scores[name]) - metrics[name]) < 1e-12, name
    assert len(scores["gold_helpfulness"]) == metrics["n_safe"]
