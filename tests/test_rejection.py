"""Rejection-sampling fine-tuning: best-of-K under the composed reward, the best-ever pool, the best-of-K curve,
SFT on the pool, resume; the loop through local role objects and once through Ray actors, on tiny random models
(`make_world` from tests/worlds.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from worlds import rej_config

from actors.group import create_local_rejection_actors, create_rejection_actors, shutdown_rl_actors
from actors.policy import PolicyLearner
from rayllama.checkpoint import is_complete, load_model
from rayllama.config import OptimConfig
from rayllama.dist import dcp
from rayllama.rl.actors_api import local_actors
from rayllama.rl.rejection import (
    CURVE_JSON,
    CURVE_PNG,
    POOL_JSONL,
    PoolEntry,
    best_of_k_curve,
    best_of_k_ks,
    composed_rewards,
    latest_checkpoint,
    run_rejection,
    select_best,
    update_pool,
)
from rayllama.train.data import replay_sample, sft_rows


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def read_metrics(out_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if "reward/chosen" in m]


pytestmark = pytest.mark.usefixtures("one_thread")




# ---------------------------------------------------------------------------------------------- pure parts


def test_best_of_k_under_the_composed_reward_by_hand():
    # raw scores are logits of round probabilities, so s = sigmoid(raw) is that probability
    s_h = [[0.9, 0.6, 0.7], [0.9, 0.2, 0.95]]
    s_s = [[0.1, 0.5, 0.2], [0.3, 0.8, 0.5]]
    raw_h = torch.tensor([[logit(p) for p in row] for row in s_h])
    raw_s = torch.tensor([[logit(p) for p in row] for row in s_s])
    r_c = composed_rewards(raw_h, raw_s, torch.tensor([False, True]), gate=0.15)
    # prompt 0 (not a safety prompt): sample 0 has s_safety 0.1 < 0.15, so the safety score counts: 0.1;
    #   samples 1, 2 pass the gate: their helpfulness 0.6, 0.7. Best: sample 2 (not sample 0, the most helpful)
    # prompt 1 (is_safety): the safety score always counts: 0.3, 0.8, 0.5. Best: sample 1 (the least helpful)
    torch.testing.assert_close(r_c, torch.tensor([[0.1, 0.6, 0.7], [0.3, 0.8, 0.5]]))
    index, best = select_best(r_c)
    assert index.tolist() == [2, 1]
    torch.testing.assert_close(best, torch.tensor([0.7, 0.8]))
    # a higher gate turns sample 2 of prompt 0 (s_safety 0.2) to the safety branch: 0.1, 0.6, 0.2 -> sample 1
    assert select_best(composed_rewards(raw_h, raw_s, torch.tensor([False, True]), gate=0.25))[0].tolist() == [1, 1]
    with pytest.raises(ValueError, match=r"\(P, K\)"):
        composed_rewards(raw_h, raw_s, torch.tensor([False]), gate=0.15)


def entry(prompt: int, reward: float, iteration: int) -> PoolEntry:
    return PoolEntry(prompt, f"answer {prompt} from iteration {iteration}", reward, 0.0, 0.0, iteration)


def test_pool_keeps_the_best_ever_not_the_latest():
    pool: dict[int, PoolEntry] = {}
    assert update_pool(pool, [entry(0, 0.8, 1), entry(1, 0.3, 1)]) == (2, 0)
    assert update_pool(pool, [entry(0, 0.6, 2), entry(1, 0.5, 2), entry(2, 0.1, 2)]) == (1, 1)
    # prompt 0 keeps iteration 1's 0.8 over the later 0.6; prompt 1 improves to 0.5; prompt 2 is new
    assert {i: (e.reward, e.iteration) for i, e in pool.items()} == {0: (0.8, 1), 1: (0.5, 2), 2: (0.1, 2)}
    assert update_pool(pool, [entry(0, 0.8, 3), entry(0, 0.9, 3)]) == (0, 1)  # a tie keeps the older, then 0.9 wins
    assert (pool[0].reward, pool[0].iteration) == (0.9, 3)


def test_best_of_k_curve_by_hand_and_its_max_never_falls():
    assert best_of_k_ks(16) == [1, 2, 4, 8, 16] and best_of_k_ks(6) == [1, 2, 4, 6] and best_of_k_ks(1) == [1]
    r_c = torch.tensor([[0.2, 0.5, 0.1, 0.9], [0.6, 0.4, 0.8, 0.0]])
    curve = best_of_k_curve(r_c, [1, 2, 4])
    # K=1: max = median = the first sample: (0.2 + 0.6) / 2 = 0.4
    # K=2: max (0.5 + 0.6) / 2 = 0.55; median (0.35 + 0.5) / 2 = 0.425
    # K=4: max (0.9 + 0.8) / 2 = 0.85; median of {0.1 0.2 0.5 0.9} = 0.35, of {0.0 0.4 0.6 0.8} = 0.5 -> 0.425
    torch.testing.assert_close(torch.tensor(curve["max"]), torch.tensor([0.4, 0.55, 0.85]), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.tensor(curve["median"]), torch.tensor([0.4, 0.425, 0.425]), atol=1e-6, rtol=0)
    g = torch.Generator().manual_seed(0)
    random_curve = best_of_k_curve(torch.rand(50, 16, generator=g), best_of_k_ks(16))["max"]
    assert all(a <= b for a, b in zip(random_curve, random_curve[1:])), random_curve
    assert random_curve[-1] > random_curve[0] + 0.3  # uniform draws: E[max of 16] = 16/17 vs E[one] = 1/2


# ---------------------------------------------------------------------------------------------- SFT on the pool


def answer_logprob(model, tok, dialogue: list[dict]) -> float:
    """Oracle: mean log p(answer token) over the answer tokens and </s>, one unpadded forward."""
    ids, mask = tok.encode_dialog(dialogue)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0].double(), -1)  # (T-1, V)
    picked = [float(logp[t, ids[t + 1]]) for t in range(len(ids) - 1) if mask[t + 1]]
    return sum(picked) / len(picked)


def test_sft_on_the_pool_raises_the_likelihood_of_the_pooled_answers(world):
    learner = PolicyLearner(world.sft, None, None, sft_optim=OptimConfig(lr=1e-2, schedule="constant"))
    answers = ["sum of 3 and 4 is 7.", "sorry I cannot help make a bomb.", "the capital letter is A."]
    dialogues = [[*p.prompt, {"role": "assistant", "content": a}] for p, a in zip(world.prompts, answers)]
    rows, dropped = sft_rows(dialogues, world.tokenizer, 64)
    assert dropped == 0
    before = [answer_logprob(learner.policy, world.tokenizer, d) for d in dialogues]
    # one step on all 3 rows: the reported loss is the token-mean NLL before the step, over all answer tokens
    stats = learner.sft_train(rows, epochs=1.0, batch_size=8, micro_batch_size=2, seed=0)
    counts = [sum(world.tokenizer.encode_dialog(d)[1]) for d in dialogues]
    expected = -sum(b * c for b, c in zip(before, counts)) / sum(counts)
    assert stats["sft_steps"] == 1 and stats["version"] == 1
    assert stats["sft_loss"] == pytest.approx(expected, rel=1e-4)
    learner.sft_train(rows, epochs=4.0, batch_size=2, micro_batch_size=1, seed=1)  # ceil(4 * 3 / 2) = 6 steps
    after = [answer_logprob(learner.policy, world.tokenizer, d) for d in dialogues]
    assert all(a > b + 0.5 for a, b in zip(after, before)), (before, after)
    assert learner.version == 2
    with pytest.raises(ValueError, match="without sft_optim"):
        PolicyLearner(world.sft, None, None).sft_train(rows)


def test_replay_sample_makes_its_share_of_the_fine_tune_data():
    assert len(replay_sample(range(100), 10, 0.5, seed=0)) == 10  # 0.5 / 0.5 * 10
    assert len(replay_sample(range(100), 9, 0.25, seed=0)) == 3  # 0.25 / 0.75 * 9
    assert len(replay_sample(range(5), 10, 0.5, seed=0)) == 5  # never more than there are
    assert replay_sample(range(100), 0, 0.5, seed=0) == [] and replay_sample(range(100), 10, 0.0, seed=0) == []
    drawn = replay_sample(range(100), 30, 0.5, seed=3)
    assert drawn == replay_sample(range(100), 30, 0.5, seed=3) and len(set(drawn)) == 30  # seeded, no repeats
    assert drawn != replay_sample(range(100), 30, 0.5, seed=4)
    with pytest.raises(ValueError, match=r"replay_share 1.0 must be in \[0, 1\)"):
        replay_sample(range(100), 10, 1.0, seed=0)


# ---------------------------------------------------------------------------------------------- the loop, locally


class ScriptedScorer:
    """A reward model stand-in: call c scores pair n as base[c] + 0.1 * (n % K) (the K-th sample of every prompt
    is its best); it remembers the pairs it saw."""

    def __init__(self, base: list[float], k: int) -> None:
        self.base, self.k, self.seen = base, k, []

    def score(self, pairs):
        self.seen.append(list(pairs))
        base = self.base[len(self.seen) - 1]
        return [base + 0.1 * (n % self.k) for n in range(len(pairs))]


def test_loop_keeps_the_best_ever_sample_and_writes_its_outputs(world, tmp_path):
    cfg = rej_config(iterations=3, temperature_schedule=[1.3, 1.2, 1.1])
    real = create_local_rejection_actors(cfg, world.sft, world.reward_helpfulness, world.reward_safety)
    helpful, safety = ScriptedScorer([2.0, -2.0, 5.0], 4), ScriptedScorer([3.0, 3.0, 3.0], 4)
    actors = local_actors([real.learners[0].obj], None, helpful, safety, [real.generators[0].obj])
    prompts = world.prompts[:4]  # is_safety: True, False, False, True
    summary = run_rejection(cfg, actors, prompts, world.tokenizer, tmp_path)
    metrics = read_metrics(tmp_path)
    assert [m["temperature"] for m in metrics] == [1.3, 1.2, 1.1]
    # 4 prompts, 4 per iteration: every iteration sees every prompt once. Helpful prompts score sigmoid(2 + 0.3),
    # then sigmoid(-2 + 0.3) (worse: kept out), then sigmoid(5 + 0.3) (better: replaces); safety prompts score
    # sigmoid(3 + 0.3) every time (s_safety > 0.15; ties keep iteration 1's sample)
    assert [(m["pool/added"], m["pool/replaced"], m["pool/kept"]) for m in metrics] == [(4, 0, 0), (0, 0, 4), (0, 2, 2)]
    pool = [json.loads(line) for line in (tmp_path / POOL_JSONL).read_text().splitlines()]
    sig = torch.sigmoid(torch.tensor([2.3, 5.3, 3.3])).tolist()
    for e in pool:
        expected = (sig[2], 1) if e["is_safety"] else (sig[1], 3)
        assert (e["reward"], e["iteration"]) == pytest.approx(expected), e
        # the pooled answer is the 4th sample of that prompt in the iteration it came from
        pairs = helpful.seen[e["iteration"] - 1]
        mine = [text for prompt, text in pairs if prompt == e["prompt"]]
        assert len(mine) == 4 and e["response"] == mine[3]
    # the chosen reward of iteration 2 (its own best) is below the pool's mean: the pool kept iteration 1's
    assert metrics[1]["reward/chosen"] < metrics[1]["pool/mean_reward"]
    assert summary["pool_size"] == 4 and summary["iterations"] == 3
    assert metrics[0]["best_of_k/max_k4"] > metrics[0]["best_of_k/max_k1"]
    assert is_complete(tmp_path / "model") and (tmp_path / "model" / "tokenizer.model").is_file()
    final, _, meta = load_model(tmp_path / "model")
    sft, _, _ = load_model(world.sft)
    assert meta["stage"] == "rejection" and not torch.equal(final.lm_head.weight, sft.lm_head.weight)
    curve = json.loads((tmp_path / CURVE_JSON).read_text())
    assert curve["ks"] == [1, 2, 4] and [c["iteration"] for c in curve["iterations"]] == [1, 2, 3]
    assert (tmp_path / CURVE_PNG).read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["iter-0002", "iter-0003"]


def test_replayed_sft_dialogues_join_every_fine_tune(world, tmp_path):
    cfg = rej_config(iterations=2, replay_share=0.5)
    actors = create_local_rejection_actors(cfg, world.sft, world.reward_helpfulness, world.reward_safety)
    with pytest.raises(ValueError, match="rejection.replay_share 0.5 needs SFT dialogues to replay"):
        run_rejection(cfg, actors, world.prompts, world.tokenizer, tmp_path)
    replay = [[*p.prompt, {"role": "assistant", "content": f"answer {n}."}] for n, p in enumerate(world.prompts)]
    run_rejection(cfg, actors, world.prompts, world.tokenizer, tmp_path, replay=replay)
    metrics = read_metrics(tmp_path)
    # 4 prompts per iteration: the pool holds 4, then 8 answers, and as many SFT dialogues join each fine-tune
    assert [m["pool/size"] for m in metrics] == [4, 8]
    assert [m["sft_rows_replayed"] for m in metrics] == [4, 8]
    assert [m["sft_rows"] for m in metrics] == [8, 16]


def test_the_real_reward_models_pick_the_best_sample_they_scored(world, tmp_path):
    cfg = rej_config(iterations=1)
    actors = create_local_rejection_actors(cfg, world.sft, world.reward_helpfulness, world.reward_safety)
    run_rejection(cfg, actors, world.prompts, world.tokenizer, tmp_path)
    m = read_metrics(tmp_path)[0]
    for e in (json.loads(line) for line in (tmp_path / POOL_JSONL).read_text().splitlines()):
        # re-score the pooled answer with the same models: it carries its own composed score
        h = actors.reward_helpfulness.obj.score([(e["prompt"], e["response"])])[0]
        s = actors.reward_safety.obj.score([(e["prompt"], e["response"])])[0]
        r_c = composed_rewards(torch.tensor([[h]]), torch.tensor([[s]]), torch.tensor([e["is_safety"]]), 0.15)
        assert float(r_c) == pytest.approx(e["reward"], abs=1e-5)
    assert m["reward/chosen"] == pytest.approx(m["best_of_k/max_k4"])  # the chosen sample is the best of all K
    assert m["best_of_k/max_k1"] <= m["best_of_k/max_k2"] <= m["best_of_k/max_k4"]
    assert m["reward/chosen"] >= m["reward/composed"]


def test_resume_continues_with_the_same_pool_and_prompt_position(world, tmp_path):
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"

    def actors():  # fresh role objects, as after a crash
        return create_local_rejection_actors(rej_config(), world.sft, world.reward_helpfulness, world.reward_safety)

    run_rejection(rej_config(iterations=1), actors(), world.prompts, world.tokenizer, interrupted)
    assert latest_checkpoint(interrupted).name == "iter-0001"
    resumed_actors = actors()
    summary = run_rejection(rej_config(iterations=2), resumed_actors, world.prompts, world.tokenizer, interrupted)
    assert summary["resumed_from"] == 1 and summary["iterations"] == 2
    assert [(m["iteration"], m["prompt_position"]) for m in read_metrics(interrupted)] == [(1, 4), (2, 8)]

    straight_actors = actors()
    run_rejection(rej_config(iterations=2), straight_actors, world.prompts, world.tokenizer, straight)
    assert (interrupted / POOL_JSONL).read_text() == (straight / POOL_JSONL).read_text()
    assert read_metrics(interrupted)[-1]["pool/size"] == 8  # 2 x 4 distinct prompts out of 20
    assert json.loads((interrupted / CURVE_JSON).read_text()) == json.loads((straight / CURVE_JSON).read_text())
    a, b = resumed_actors.learners[0].obj, straight_actors.learners[0].obj
    for (name, x), y in zip(a.policy.state_dict().items(), b.policy.state_dict().values()):
        assert torch.equal(x, y), name
    assert a.sft_opt.state_dict()["state"][0]["exp_avg"].equal(b.sft_opt.state_dict()["state"][0]["exp_avg"])


def test_config_mistakes_are_named(world, tmp_path):
    cfg = rej_config(iterations=3, temperature_schedule=[1.2])
    actors = create_local_rejection_actors(cfg, world.sft, world.reward_helpfulness, world.reward_safety)
    with pytest.raises(ValueError, match="temperature_schedule has 1 entries for 3 iterations"):
        run_rejection(cfg, actors, world.prompts, world.tokenizer, tmp_path)
    with pytest.raises(ValueError, match="rejection.samples_per_prompt 0"):
        run_rejection(rej_config(samples_per_prompt=0), actors, world.prompts, world.tokenizer, tmp_path)


# ---------------------------------------------------------------------------------------------- through Ray


def test_two_iterations_through_ray_actors(ray_session, world, tmp_path):
    cfg = rej_config(iterations=2)
    actors = create_rejection_actors(cfg, world.sft, world.reward_helpfulness, world.reward_safety,
                                     name_prefix="test-rej-")
    try:
        assert sorted(actors.names) == ["test-rej-policy-learner-0", "test-rej-reward-helpfulness",
                                        "test-rej-reward-safety", "test-rej-rollout-0"]  # no reference model
        summary = run_rejection(cfg, actors, world.prompts, world.tokenizer, tmp_path)
    finally:
        shutdown_rl_actors(actors)
    metrics = read_metrics(tmp_path)
    assert [(m["iteration"], m["weight_version"]) for m in metrics] == [(1, 1), (2, 2)]
    assert summary["iterations"] == 2 and is_complete(tmp_path / "model")
    assert (tmp_path / "model" / "tokenizer.model").is_file() and (tmp_path / CURVE_PNG).is_file()
    assert dcp.is_complete(tmp_path / "checkpoints" / "iter-0002" / "train_state")  # sharded policy + optimizer
