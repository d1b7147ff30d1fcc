"""The PPO loop without Ray: the real role classes in this process behind `LocalHandle`s, on tiny random models.

`tests/worlds.py`'s `make_world` trains a small real tokenizer and saves a tiny SFT policy and two reward models
with `save_model`, as the earlier stages would.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from worlds import FailsSecondGenerate, TinyWorld, local, tiny_config

from actors.policy import PolicyLearner
from actors.reference import ReferenceModel
from actors.rollout import RolloutGenerator
from rayllama.checkpoint import is_complete, load_model
from rayllama.config import OptimConfig, PipelineConfig
from rayllama.generation import SamplingParams
from rayllama.model import Transformer
from rayllama.rl.actors_api import (
    ActorCallError,
    ActorRestartedError,
    StaleRolloutError,
    StaleWeightsError,
    WeightChecksumError,
    local_actors,
)
from rayllama.rl.experience import Experience, collate, mini_batches, pad_right, shard, trim
from rayllama.rl.ppo import STATE_FILE, check_learners, latest_checkpoint, prompt_indices, run_ppo
from rayllama.rl.weight_sync import LocalChannel, digest, plan_buckets


def read_metrics(out_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if "reward/combined" in m]


pytestmark = pytest.mark.usefixtures("one_thread")




REQUIRED = ("reward/helpfulness", "reward/safety", "reward/combined", "kl", "entropy", "clip_fraction", "value_loss",
            "policy_loss", "response_length", "timing/generate", "timing/score", "timing/advantages",
            "timing/train", "timing/sync", "timing/checkpoint", "timing/iteration")


# ---------------------------------------------------------------------------------------------- pure helpers


def test_collate_layout_left_pads_prompts_and_right_pads_responses():
    batch = collate([[1, 7], [1, 8, 9]], [[4, 2], [5]], pad_id=0)
    # P = 3, A = 2: row 0 = [pad, 1, 7 | 4, 2], row 1 = [1, 8, 9 | 5, pad]
    assert batch.sequences.tolist() == [[0, 1, 7, 4, 2], [1, 8, 9, 5, 0]]
    assert batch.attention_mask.tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch.action_mask.tolist() == [[1, 1], [1, 0]]
    assert batch.actions().tolist() == [[4, 2], [5, 0]]
    assert pad_right([[0.5], [0.25, 0.75]], 2).tolist() == [[0.5, 0.0], [0.25, 0.75]]


def test_trim_drops_all_padding_columns_only():
    batch = collate([[1, 7], [1, 8]], [[4], [5]], pad_id=0)
    wide = collate([[1, 7], [1, 8], [1, 2, 3, 4]], [[4], [5], [6, 6, 6]], pad_id=0).select([0, 1])
    trimmed = trim(wide)  # the long third row is gone: 2 prompt and 2 response columns are padding everywhere
    assert trimmed.sequences.tolist() == batch.sequences.tolist()
    assert trimmed.action_mask.tolist() == batch.action_mask.tolist()


def test_mini_batches_cover_every_row_once_per_epoch_and_shards_are_contiguous():
    n = 8
    exp = Experience(*(torch.arange(n)[:, None].repeat(1, 3) for _ in range(2)),
                     *(torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 2) for _ in range(5)))
    seen = [int(mb.sequences[r, 0]) for mb in mini_batches(exp, 4, epochs=2, seed=1) for r in range(4)]
    assert sorted(seen[:8]) == list(range(8)) and sorted(seen[8:]) == list(range(8))
    assert seen[:8] != seen[8:]  # a fresh permutation per epoch
    assert [s.sequences[:, 0].tolist() for s in shard(exp, 2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError, match="multiple of the mini-batch size"):
        next(mini_batches(exp, 3))
    with pytest.raises(ValueError, match="num_learners"):
        shard(exp, 3)


def test_prompt_indices_are_a_permutation_per_epoch_and_resumable():
    stream = prompt_indices(5, 12, 0, seed=7)
    assert sorted(stream[:5]) == list(range(5)) and sorted(stream[5:10]) == list(range(5))
    assert prompt_indices(5, 4, 6, seed=7) == stream[6:10]  # position 6 continues the same stream
    assert prompt_indices(5, 5, 0, seed=8) != stream[:5] or prompt_indices(5, 5, 5, seed=8) != stream[5:10]


def test_a_learner_that_restarted_is_caught():
    stats = [{"version": 4.0, "policy_loss": 0.1}, {"version": 4.0, "policy_loss": 0.3}]
    check_learners(stats, 4)
    assert stats == [{"policy_loss": 0.1}, {"policy_loss": 0.3}]  # the version is not a metric
    with pytest.raises(ActorCallError, match="policy-learner-1 restarted"):
        check_learners([{"version": 4.0}, {"version": 1.0}], 4)  # rank 1 came back with fresh SFT weights


def test_bucket_digest_is_over_the_bytes_and_buckets_are_planned_by_size():
    bucket = torch.tensor([1.0, 2.0, 5.0])
    assert digest(bucket) == digest(bucket.clone()) and len(digest(bucket)) == 16
    assert digest(torch.tensor([1.0, 2.0 + 2**-20, 5.0])) != digest(bucket)  # one low bit of one element
    assert digest(torch.tensor([5.0, 1.0, 2.0])) != digest(bucket)  # the same values in another order (a sum agrees)
    assert digest(torch.tensor([0.0])) != digest(torch.tensor([-0.0]))  # equal floats, other bytes
    # 4-byte elements, 40-byte buckets: 2 + 3 + 5 elements fill the first; 12 elements alone; then 1 + 1
    assert plan_buckets([(2,), (3,), (5,), (3, 4), (1,), (1,)], 4, 40) == [(0, 3), (3, 4), (4, 6)]


# ---------------------------------------------------------------------------------------------- roles, locally


def naive_logprobs(model: Transformer, prompt: list[int], response: list[int]) -> list[float]:
    """Oracle: one unpadded full forward; log_softmax at the position before each response token."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt + response]))[0].double(), -1)  # (T, V)
    return [float(logp[len(prompt) - 1 + t, tok]) for t, tok in enumerate(response)]


def test_learner_and_reference_read_outs_equal_an_unpadded_forward(world):
    cfg = tiny_config()
    learner = PolicyLearner(world.sft, world.reward_helpfulness, cfg.ppo)
    reference = ReferenceModel(world.sft, micro_batch_size=2)
    prompts, responses = [[1, 30, 31], [1, 40, 41, 42, 43, 44], [1, 50]], [[60, 61, 2], [70], [80, 81, 82, 83]]
    batch = collate(prompts, responses)
    for got in (learner.logprobs(batch), reference.logprobs(batch)):
        for i, (p, r) in enumerate(zip(prompts, responses)):
            torch.testing.assert_close(got[i, :len(r)].double(), torch.tensor(naive_logprobs(learner.policy, p, r),
                                       dtype=torch.float64), atol=1e-5, rtol=0)
            assert got[i, len(r):].abs().sum() == 0
    values = learner.values(batch)
    rm, _, _ = load_model(world.reward_helpfulness)
    with torch.no_grad():
        for i, (p, r) in enumerate(zip(prompts, responses)):  # V(s_t) = head at the token before a_t
            expected = rm(torch.tensor([p + r]))[0, len(p) - 1:len(p) - 1 + len(r)]
            torch.testing.assert_close(values[i, :len(r)], expected, atol=1e-5, rtol=0)


def test_generator_refuses_stale_versions_and_corrupt_buckets(world):
    """The sync protocol between plain objects (the `local` backend carries the same messages as gloo): a stale
    version is refused and changes nothing; a bucket altered on the wire fails its digest, and the generator, now
    holding mixed weights, refuses to generate (version -1) until a whole update arrives."""
    gen, learner = RolloutGenerator(world.sft), PolicyLearner(world.sft, None, tiny_config(value_init="sft").ppo)
    channel = LocalChannel()
    learner.join_weight_sync(channel, 0, 2, "local", 5.0, 1)
    gen.join_weight_sync(channel, 1, 2, "local", 5.0, 1)

    def update(version: int, corrupt: bool = False) -> int:
        learner.version = version
        assert learner.send_weights(1, 0.01, "float32", True)["ok"]  # 10 KB buckets: several of them
        if corrupt:  # message 2: the second bucket (after the preamble; the header is the last update's, not resent)
            channel.messages[2].view(-1)[0] += 1e-6
        return gen.receive_weights(1)

    assert update(5) == 5 and gen.version() == 5
    assert len(channel.messages) > 4  # preamble, header, >= 2 buckets, digests
    with pytest.raises(StaleWeightsError, match="older"):
        update(4)
    assert gen.version() == 5
    with pytest.raises(WeightChecksumError, match="bucket 1 of"):
        update(6, corrupt=True)
    assert gen.version() == -1
    with pytest.raises(ActorRestartedError, match="failed part-way"):
        gen.generate([[1, 30, 31]], SamplingParams(max_new_tokens=3))
    assert update(6) == 6 and gen.version() == 6
    completion = gen.generate([[1, 30, 31]], SamplingParams(max_new_tokens=3))[0][0]
    assert completion.weight_version == 6
    for name, tensor in learner.policy.state_dict().items():
        assert torch.equal(gen.engine.model.state_dict()[name], tensor), name


# ---------------------------------------------------------------------------------------------- the loop


def test_three_iterations_log_metrics_and_write_the_model(world, tmp_path):
    cfg = tiny_config(iterations=3)
    actors = local(cfg, world)
    summary = run_ppo(cfg, actors, world.prompts, world.tokenizer, tmp_path)
    metrics = read_metrics(tmp_path)
    assert [m["iteration"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert all(k in m for k in REQUIRED), sorted(set(REQUIRED) - set(m))
        assert all(torch.isfinite(torch.tensor(float(m[k]))) for k in REQUIRED)
        # the generator sampled with the learner's weights: before its first step the learner recomputes
        # the same log-probs (numerical noise only); iteration 2 proves the update reached the generator
        assert m["logprob_drift"] < 1e-4
        assert 1 <= m["response_length"] <= cfg.ppo.max_new_tokens
    assert abs(metrics[0]["kl"]) < 1e-4  # iteration 1 samples from pi == pi_ref
    # one lr-1e-3 step later the policy has moved away: the same statistic now lies outside the bound that held it
    # at pi == pi_ref. It is a sampled estimate of a KL of ~1e-2 that crosses zero with the draw (seeds 0-7 of this
    # config: |kl| 4.2e-4 to 4.3e-2, either sign; at iteration 1 at most 6e-7), so no larger bound holds for every
    # draw
    assert abs(metrics[1]["kl"]) > 1e-4
    assert [m["prompt_position"] for m in metrics] == [8, 16, 24]
    assert summary["iterations"] == 3 and is_complete(tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["iter-0002", "iter-0003"]  # keep 2
    assert (tmp_path / "model" / "tokenizer.model").is_file()
    final, _, _ = load_model(tmp_path / "model")
    sft, _, _ = load_model(world.sft)
    assert not torch.equal(final.lm_head.weight, sft.lm_head.weight)
    assert torch.equal(final.lm_head.weight, actors.learners[0].obj.policy.lm_head.weight)


def test_ppo_raises_the_reward_it_is_trained_on(world, tmp_path):
    """The sign check of the whole loop: ten iterations at a large lr move the policy towards responses the
    (random, fixed) reward models score higher. Here the safety RM scores everything below the 0.15 gate, so
    R_c is its score throughout; a flipped advantage or reward sign makes the curve fall instead."""
    cfg = tiny_config(iterations=10, optim=OptimConfig(lr=1e-2, schedule="constant"), checkpoint_every=100,
                      prompts_per_iteration=16, mini_batch_size=8)
    run_ppo(cfg, local(cfg, world), world.prompts, world.tokenizer, tmp_path)
    metrics = read_metrics(tmp_path)
    rewards = [m["reward/combined"] for m in metrics]
    assert all(m["reward/safety_branch"] == 1.0 for m in metrics)
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.2, rewards
    assert metrics[-1]["kl"] > metrics[0]["kl"] + 1.0  # it paid for it in KL from the reference


def test_resume_continues_at_the_checkpoint_and_matches_an_uninterrupted_run(world, tmp_path):
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    run_ppo(tiny_config(iterations=1), local(tiny_config(), world), world.prompts, world.tokenizer, interrupted)
    assert latest_checkpoint(interrupted).name == "iter-0001"
    state = json.loads((latest_checkpoint(interrupted) / STATE_FILE).read_text())
    assert (state["iteration"], state["prompt_position"]) == (1, 8)

    resumed_actors = local(tiny_config(), world)  # fresh actors, as after a crash
    summary = run_ppo(tiny_config(iterations=2), resumed_actors, world.prompts, world.tokenizer, interrupted)
    assert summary["resumed_from"] == 1 and summary["iterations"] == 2
    assert [(m["iteration"], m["prompt_position"]) for m in read_metrics(interrupted)] == [(1, 8), (2, 16)]

    straight_actors = local(tiny_config(), world)
    run_ppo(tiny_config(iterations=2), straight_actors, world.prompts, world.tokenizer, straight)
    a, b = resumed_actors.learners[0].obj, straight_actors.learners[0].obj
    for (name, x), y in zip(a.policy.state_dict().items(), b.policy.state_dict().values()):
        assert torch.equal(x, y), name
    for x, y in zip(a.value.parameters(), b.value.parameters()):
        assert torch.equal(x, y)
    assert a.policy_opt.state_dict()["state"][0]["exp_avg"].equal(b.policy_opt.state_dict()["state"][0]["exp_avg"])
    assert read_metrics(interrupted)[-1]["reward/combined"] == read_metrics(straight)[-1]["reward/combined"]


class DeafGenerator(RolloutGenerator):
    """Acknowledges weight updates without loading them: its rollouts keep version 0."""

    def _load(self, incoming):
        incoming.finish()


class ForgetfulGenerator(RolloutGenerator):
    """Drops the first update after version 0 (a lost message), then behaves."""

    dropped = False

    def _load(self, incoming):
        if incoming.version > 0 and not self.dropped:
            self.dropped = True
            incoming.finish()
            return
        super()._load(incoming)


def stand_in_actors(cfg: PipelineConfig, world: TinyWorld, generator: RolloutGenerator):
    real = local(cfg, world)
    return local_actors([h.obj for h in real.learners], real.reference.obj, real.reward_helpfulness.obj,
                        real.reward_safety.obj, [generator])


def test_stale_rollouts_are_detected(world, tmp_path):
    cfg = tiny_config(iterations=2)
    with pytest.raises(StaleRolloutError, match="rollout-0 produced weight version"):
        run_ppo(cfg, stand_in_actors(cfg, world, DeafGenerator(world.sft)), world.prompts, world.tokenizer, tmp_path)
    assert [m["iteration"] for m in read_metrics(tmp_path)] == [1]  # iteration 2 saw version-0 rollouts

    forgetful = ForgetfulGenerator(world.sft)  # one lost update: re-sent once, then the loop goes on
    run_ppo(cfg, stand_in_actors(cfg, world, forgetful), world.prompts, world.tokenizer, tmp_path / "again")
    assert forgetful.dropped and forgetful.version() == 2


def test_logprob_drift_above_the_limit_stops_the_run():
    from rayllama.rl.ppo import LogprobDriftError, check_drift

    check_drift({"logprob_drift": 1e-6, "logprob_drift_max": 1e-5}, 1e-3)  # fp32 engines agree: fine
    check_drift({"logprob_drift": 5.0, "logprob_drift_max": 9.0}, 0.0)  # 0 turns the monitor off
    with pytest.raises(LogprobDriftError, match="ppo.max_logprob_drift"):
        check_drift({"logprob_drift": 0.2, "logprob_drift_max": 1.5}, 0.05)


# ---------------------------------------------------------------------------------------------- async rollouts


def policy_of(actors) -> dict[str, torch.Tensor]:
    return actors.learners[0].obj.policy.state_dict()


def test_async_rollouts_train_one_version_behind_and_resume_bit_for_bit(world, tmp_path):
    """ppo.async_rollouts: iteration k+1's rollouts are sampled during iteration k by the weights before it, so
    from iteration 2 on the learner trains one version ahead of its rollouts (the behaviour log-probs differ from
    its own before the first step, where the synchronous mode's agree to float noise). Iteration 1 equals the
    synchronous run's. Scoring the prefetch one frozen model at a time (auto on CPU) or all three together gives
    the same run. The prefetched rollouts go into the checkpoint: a run resumed after iteration 2 ends with the
    uninterrupted run's weights and rows, bit for bit."""
    straight, sync, interrupted = tmp_path / "straight", tmp_path / "sync", tmp_path / "interrupted"
    straight_actors = local(tiny_config(3, async_rollouts=True), world)
    assert tiny_config().device == "cpu"  # prefetch_scoring auto: the frozen models score one at a time
    run_ppo(tiny_config(3, async_rollouts=True), straight_actors, world.prompts, world.tokenizer, straight)
    together = local(tiny_config(), world)
    run_ppo(tiny_config(3, async_rollouts=True, prefetch_scoring="parallel"), together, world.prompts,
            world.tokenizer, tmp_path / "together")
    rewards = [m["reward/combined"] for m in read_metrics(straight)]
    assert len(rewards) == 3 and [m["reward/combined"] for m in read_metrics(tmp_path / "together")] == rewards
    for (name, x), y in zip(policy_of(together).items(), policy_of(straight_actors).values()):
        assert torch.equal(x, y), name
    run_ppo(tiny_config(3), local(tiny_config(), world), world.prompts, world.tokenizer, sync)
    rows, sync_rows = read_metrics(straight), read_metrics(sync)
    assert [m["rollout_lag"] for m in rows] == [0, 1, 1] and [m["rollout_lag"] for m in sync_rows] == [0, 0, 0]
    assert [m["weight_version"] for m in rows] == [m["weight_version"] for m in sync_rows]
    assert rows[0]["reward/combined"] == sync_rows[0]["reward/combined"]  # same prompts, seeds and weights
    assert rows[1]["reward/combined"] != sync_rows[1]["reward/combined"]  # sampled by the older weights
    assert rows[0]["logprob_drift"] < 1e-4 and all(m["logprob_drift"] < 1e-4 for m in sync_rows)
    assert all(m["logprob_drift"] > 1e-3 for m in rows[1:])  # one lr-1e-3 step between behaviour and learner
    assert all("timing/prefetch_wait" in m for m in rows) and not any("timing/generate" in m for m in rows[1:])

    run_ppo(tiny_config(2, async_rollouts=True), local(tiny_config(), world), world.prompts, world.tokenizer,
            interrupted)
    assert (latest_checkpoint(interrupted) / "rollouts.json").is_file()  # iteration 3's, made by version 1
    resumed_actors = local(tiny_config(), world)  # fresh actors, as after a crash
    summary = run_ppo(tiny_config(3, async_rollouts=True), resumed_actors, world.prompts, world.tokenizer,
                      interrupted)
    assert summary["resumed_from"] == 2
    assert [m["reward/combined"] for m in read_metrics(interrupted)] == [m["reward/combined"] for m in rows]
    for (name, x), y in zip(policy_of(resumed_actors).items(), policy_of(straight_actors).values()):
        assert torch.equal(x, y), name


def test_a_failed_prefetch_is_generated_again_after_the_sync(world, tmp_path, caplog):
    cfg = tiny_config(3, async_rollouts=True)
    generator = FailsSecondGenerate(world.sft)
    caplog.set_level("WARNING", logger="rayllama")
    run_ppo(cfg, stand_in_actors(cfg, world, generator), world.prompts, world.tokenizer, tmp_path)
    assert "prefetching the rollouts of PPO iteration 2 failed" in caplog.text
    rows = read_metrics(tmp_path)
    assert [m["iteration"] for m in rows] == [1, 2, 3]
    assert [m["rollout_lag"] for m in rows] == [0, 0, 1]  # iteration 2 regenerated on the new weights
    assert rows[1]["logprob_drift"] < 1e-4


class RecordingGenerator(RolloutGenerator):
    """Logs generate / weight-update calls and its engine's sleep / wake_up (the torch engine cannot sleep: the
    two methods are given to it here, as vLLM's engine has them)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.events: list[str] = []
        self.engine.sleep = lambda: self.events.append("sleep")
        self.engine.wake_up = lambda: self.events.append("wake")

    def generate(self, prompts, params):
        self.events.append("generate")
        return super().generate(prompts, params)

    def receive_weights(self, generation):
        self.events.append("weights")
        return super().receive_weights(generation)


def test_sleep_mode_frees_the_generators_while_the_learner_trains(world, tmp_path):
    """vllm.enable_sleep_mode: after every generation the generators sleep (free their GPU memory for the
    learner on the same GPUs); the next weight update wakes them first."""
    cfg = tiny_config(2)
    cfg.vllm.enable_sleep_mode = True
    generator = RecordingGenerator(world.sft)
    run_ppo(cfg, stand_in_actors(cfg, world, generator), world.prompts, world.tokenizer, tmp_path)
    assert generator.events == ["weights", "generate", "sleep", "weights", "wake", "generate", "sleep", "weights",
                                "wake"]
    assert not generator.asleep


def test_a_tensor_parallel_generator_takes_one_weight_sync_rank_per_worker():
    """vLLM with tensor_parallel_size T joins the weight-sync group with each of its T workers (vLLM's
    weight-transfer API, rayllama.vllm_weight_transfer): ranks are handed out per worker, and a rank that falls
    behind in an update is traced back to its generator."""
    from rayllama.rl.weight_sync import WeightSync

    class Member:
        def __init__(self, workers: int) -> None:
            self.workers, self.joined = workers, None

        def weight_sync_places(self) -> list[dict]:
            return [{"machine": "m", "device": "cpu", "shm_free": 0}] * self.workers

        def join_weight_sync(self, address, rank, size, backend, timeout_s, generation) -> str:
            self.joined = (rank, size)
            return "float32"

    learner, tp2, single = Member(1), Member(2), Member(1)
    actors = local_actors([learner], None, None, None, [tp2, single])
    sync = WeightSync(backend="gloo")
    sync.form(actors)
    assert (learner.joined, tp2.joined, single.joined) == ((0, 4), (1, 4), (3, 4))
    assert sync.owners == {1: 0, 2: 0, 3: 1}
