"""The PPO learner as an FSDP2 group of 2 Ray actors (gloo, CPU): it trains like one learner, survives a rank
killed with SIGKILL (the group is rebuilt and the last sharded checkpoint restored), and its sharded checkpoints
load into one learner.

Oracles: a 1-learner run in this process (same seed; the 2 ranks' micro-batches are padded and summed
differently, so metrics agree to float rounding, ~1e-6 relative) and, for the fault, the uninterrupted 2-rank run
(the same sharding: bit for bit). Tiny models of tests/worlds.py, 3 PPO iterations of 16 rollouts (2 optimizer
steps each, PPO-ptx replaying SFT dialogues in each), a checkpoint every iteration.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from typing import Any

import pytest
import torch
from test_faults import KillDuring, actor_pid, iteration_rows, policy_state
from worlds import local, tiny_config

from actors.group import create_rl_actors, shutdown_rl_actors
from actors.policy import PolicyLearner
from rayllama.generation import SamplingParams
from rayllama.rl.actors_api import LearnerLostError, RLActors
from rayllama.rl.ppo import latest_checkpoint, run_ppo

pytestmark = pytest.mark.usefixtures("one_thread")

ITERATIONS = 3
PROMPTS = [[1, 30, 31, 32], [1, 40], [1, 50, 51, 52, 53, 54], [1, 60, 61]]
LOSS_STATS = ("policy_loss", "value_loss", "entropy", "approx_kl", "ratio", "clip_fraction", "value_clip_fraction",
              "grad_norm", "value_grad_norm", "ptx_loss")


def group_config():
    return tiny_config(iterations=ITERATIONS, checkpoint_every=1, num_learners=2, ptx_coef=0.5)


def one_config():
    return tiny_config(iterations=ITERATIONS, checkpoint_every=1, ptx_coef=0.5)


def replay(world) -> list[list[dict]]:
    """SFT dialogues for PPO-ptx (ptx_coef 0.5 in both runs: the ranks share each step's draw of 8 of them)."""
    return [[*p.prompt, {"role": "assistant", "content": f"the answer is {n}."}] for n, p in enumerate(world.prompts)]


def close(a: float, b: float, key: str = "") -> bool:
    """Within 1e-5 relative, or 1e-7 absolute for the stats that are near-cancelling means of O(1) terms:
    policy_loss (~1e-4 here: whitened advantages) and approx_kl (~1e-5) differ by ~2e-8 absolute, ~2e-5 relative.
    The O(1) quantities (rewards, value loss, entropy, ratio, grad norms) agree within ~1e-7 relative. `kl`, the
    mean of log pi - log pi_ref over response tokens whose log-probs are about -6 (420 pieces), gets 1e-6 absolute:
    fp32 rounding of one such log-prob is ~6e-7; measured 1.2e-7 (iteration 2, kl -5.8e-3) on a machine where the
    1e-7 bound failed, ~2e-8 on another."""
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6 if key == "kl" else 1e-7)


@pytest.fixture(scope="module")
def grouped(ray_session, world, tmp_path_factory) -> dict[str, Any]:
    """An uninterrupted 2-rank run through Ray actors; also what each rank holds (its shard of lm_head)."""
    ray, cfg = ray_session, group_config()
    out = tmp_path_factory.mktemp("grouped")
    group = create_rl_actors(cfg, world.sft, world.sft, world.reward_helpfulness, world.reward_safety,
                             name_prefix="lg-")
    try:
        ranks = ray.get([h.__ray_call__.remote(lambda self: (self.rank, self.world, type(self.policy).__name__,
                                                             tuple(self.policy.lm_head.weight.to_local().shape)))
                         for h in group.learners], timeout=120)
        summary = run_ppo(cfg, group, world.prompts, world.tokenizer, out, replay=replay(world))
        # greedy on the group (a copy gathered on rank 0) and on the generator, which holds the final weights
        eos = world.tokenizer.eos_id
        greedy = ray.get([h.greedy.remote(PROMPTS, 8, (eos,)) for h in group.learners], timeout=120)
        params = SamplingParams(max_new_tokens=8, temperature=0.0, stop_token_ids=(eos,))
        generated = [c[0].token_ids for c in ray.get(group.generators[0].generate.remote(PROMPTS, params))]
    finally:
        shutdown_rl_actors(group)
    return {"out": out, "summary": summary, "ranks": ranks, "greedy": greedy, "generated": generated}


@pytest.fixture(scope="module")
def single(world, tmp_path_factory) -> dict[str, Any]:
    """The same run with one learner in this process."""
    cfg = one_config()
    out = tmp_path_factory.mktemp("single")
    actors = local(cfg, world)
    run_ppo(cfg, actors, world.prompts, world.tokenizer, out, replay=replay(world))
    return {"out": out, "learner": actors.learners[0].obj}


def test_two_fsdp_ranks_train_like_one_learner(grouped, single, world):
    """Per iteration, the rewards the policy earned and the learner's loss stats agree within 1e-5 relative (see
    `close`), and the final policies within 1e-5 (measured: 2.3e-7): sharding the learner changes nothing but
    float rounding."""
    vocab = world.tokenizer.vocab_size
    assert grouped["ranks"] == [(0, 2, "FSDPTransformer", (vocab // 2, 32)), (1, 2, "FSDPTransformer", (vocab // 2, 32))]
    rows, oracle = iteration_rows(grouped["out"]), iteration_rows(single["out"])
    assert [r["iteration"] for r in rows] == [r["iteration"] for r in oracle] == [1, 2, 3]
    for row, expected in zip(rows, oracle, strict=True):
        for key in ("reward/combined", "kl", *LOSS_STATS):
            assert close(row[key], expected[key], key), (row["iteration"], key, row[key], expected[key])
        assert row["optimizer_steps"] == expected["optimizer_steps"] == 2
    assert abs(rows[-1]["kl"]) > 1e-3  # the policy moved: the comparison is not of untouched SFT weights
    final, expected = policy_state(grouped["out"] / "model"), single["learner"].policy.state_dict()
    assert final.keys() == expected.keys()
    for name in final:
        torch.testing.assert_close(final[name], expected[name], atol=1e-5, rtol=0, msg=name)
    assert grouped["greedy"][1] is None and grouped["greedy"][0] == grouped["generated"]  # rank 0 answers


def test_a_rank_failing_because_its_peer_died_is_reported_as_a_lost_learner(ray_session):
    """The driver waits for no rank stuck with a lost one: a rank whose collective failed because its peer died
    ("Connection closed by peer") is reported as `LearnerLostError` once the peer's death shows, within the grace
    time; a rank's own error with no dead peer stays what it is."""
    ray = ray_session

    @ray.remote(num_cpus=0.1, max_restarts=0)
    class Rank:
        def fail(self) -> None:
            raise RuntimeError("[gloo/transport/tcp/pair.cc] Connection closed by peer")

        def die(self, after_s: float) -> None:
            time.sleep(after_s)
            os._exit(1)

        def wait(self, s: float) -> None:
            time.sleep(s)

    ranks = [Rank.remote() for _ in range(3)]
    try:
        ray.get([r.__ray_ready__.remote() for r in ranks], timeout=120)
        actors = RLActors(ranks[:2], None, None, None, [], call_timeout_s=60, peer_grace_s=20)
        start = time.monotonic()
        with pytest.raises(LearnerLostError, match="a policy learner died"):
            actors.get_learners([ranks[0].fail.remote(), ranks[1].die.remote(1.0)], "learner train")
        assert time.monotonic() - start < 15
        actors.peer_grace_s = 1.0
        with pytest.raises(RuntimeError, match="Connection closed by peer") as info:
            actors.get_learners([ranks[0].fail.remote(), ranks[2].wait.remote(5.0)], "learner train")
        assert not isinstance(info.value, LearnerLostError)
    finally:
        for r in ranks:
            ray.kill(r)


def test_a_rank_killed_mid_iteration_rebuilds_the_group_and_equals_the_uninterrupted_run(
        ray_session, world, grouped, tmp_path, caplog):
    """SIGKILL to rank 1 right after its 3rd train call is submitted (iteration 3; checkpoints after 1 and 2).
    Rank 0 is left in a collective with a dead peer: the loop kills the group, starts two new ranks (new
    processes, new rendezvous, same bundles and names), restores iter-0002 and redoes iteration 3. Every iteration
    is logged once and the final policy equals the uninterrupted 2-rank run's bit for bit."""
    ray, cfg = ray_session, group_config()
    group = create_rl_actors(cfg, world.sft, world.sft, world.reward_helpfulness, world.reward_safety,
                             name_prefix="lg-kill-")
    names = ["lg-kill-policy-learner-0", "lg-kill-policy-learner-1"]
    kills: list[tuple[str, str, int, Any]] = []
    caplog.set_level("WARNING", logger="rayllama")
    try:
        before = [actor_pid(ray, group.names[name]) for name in names]
        faulty = dataclasses.replace(group, learners=[
            group.learners[0], KillDuring(ray, group.learners[1], names[1], "train", ITERATIONS, kills)])
        summary = run_ppo(cfg, faulty, world.prompts, world.tokenizer, tmp_path, replay=replay(world))
        after = [actor_pid(ray, group.names[name]) for name in names]
        alive = [ray.get(h.__ray_call__.remote(lambda self: (self.rank, self.world, self.version)), timeout=60)
                 for h in faulty.learners]
    finally:
        shutdown_rl_actors(group)

    assert [(role, when, pid) for role, when, pid, _ in kills] == [(names[1], "during train call 3", before[1])]
    assert not set(before) & set(after)  # both ranks are new processes: the group was rebuilt, not patched
    assert alive == [(0, 2, 3), (1, 2, 3)]
    assert "policy learner lost" in caplog.text
    assert "rebuilt the 2-learner group, restored iter-0002" in caplog.text
    assert summary["recoveries"] == 1 and summary["iterations"] == ITERATIONS
    rows = iteration_rows(tmp_path)
    assert [r["iteration"] for r in rows] == [1, 2, 3]  # iteration 3 redone, logged once
    assert [r["reward/combined"] for r in rows] == [r["reward/combined"] for r in iteration_rows(grouped["out"])]
    final, uninterrupted = policy_state(tmp_path / "model"), policy_state(grouped["out"] / "model")
    assert final.keys() == uninterrupted.keys()
    for name in final:
        assert torch.equal(final[name], uninterrupted[name]), name


def test_a_checkpoint_of_two_ranks_loads_into_one_learner(grouped, single, world, tmp_path):
    """The 2-rank group's sharded checkpoints reshard into one learner: iter-0003 gives exactly the exported
    policy (and the one-learner run's value model, to float rounding); resuming one learner from iter-0002
    (weights and AdamW moments) redoes iteration 3 as the one-learner run did."""
    cfg = one_config()
    learner = PolicyLearner(world.sft, world.reward_helpfulness, cfg.ppo, seed=cfg.seed)
    assert learner.load(latest_checkpoint(grouped["out"])) == 3
    exported = policy_state(grouped["out"] / "model")
    for name, tensor in learner.policy.state_dict().items():
        assert torch.equal(tensor, exported[name]), name
    for (name, tensor), expected in zip(learner.value.state_dict().items(),
                                        single["learner"].value.state_dict().values(), strict=True):
        torch.testing.assert_close(tensor, expected, atol=1e-5, rtol=0, msg=name)

    out = tmp_path / "resumed"
    shutil.copytree(grouped["out"] / "checkpoints" / "iter-0002", out / "checkpoints" / "iter-0002")
    resumed = local(cfg, world)
    summary = run_ppo(cfg, resumed, world.prompts, world.tokenizer, out, replay=replay(world))
    assert summary["resumed_from"] == 2 and summary["iterations"] == ITERATIONS
    third = iteration_rows(out)[-1]
    expected = iteration_rows(single["out"])[-1]
    assert third["iteration"] == 3
    for key in ("reward/combined", *LOSS_STATS):
        assert close(third[key], expected[key], key), (key, third[key], expected[key])
    for name, tensor in resumed.learners[0].obj.policy.state_dict().items():
        torch.testing.assert_close(tensor, single["learner"].policy.state_dict()[name], atol=1e-5, rtol=0, msg=name)
    assert os.path.isdir(out / "model")


def test_a_two_rank_rejection_learner_fine_tunes_like_one(ray_session, world, tmp_path):
    """rejection.num_learners 2: two FSDP2 ranks (gloo) fine-tune on their shares of each pool batch; the
    pool, the rewards and the fine-tuning loss per iteration equal a one-learner run's to float rounding, as do the
    final weights; its sharded checkpoints are complete DCP train states."""
    from worlds import rej_config

    from actors.group import create_local_rejection_actors, create_rejection_actors
    from rayllama.dist import dcp
    from rayllama.rl.rejection import POOL_JSONL, run_rejection

    group_cfg, one_cfg = rej_config(iterations=2, num_learners=2), rej_config(iterations=2)
    group = create_rejection_actors(group_cfg, world.sft, world.reward_helpfulness, world.reward_safety,
                                    name_prefix="rej-lg-")
    try:
        assert len(group.learners) == 2 and group.rebuild_learners is not None
        run_rejection(group_cfg, group, world.prompts, world.tokenizer, tmp_path / "group")
    finally:
        shutdown_rl_actors(group)
    single = create_local_rejection_actors(one_cfg, world.sft, world.reward_helpfulness, world.reward_safety)
    run_rejection(one_cfg, single, world.prompts, world.tokenizer, tmp_path / "single")

    rows, oracle = iteration_rows(tmp_path / "group"), iteration_rows(tmp_path / "single")
    assert [r["iteration"] for r in rows] == [r["iteration"] for r in oracle] == [1, 2]
    for row, expected in zip(rows, oracle, strict=True):
        for key in ("reward/chosen", "pool/mean_reward", "sft_loss", "sft_grad_norm"):
            assert close(row[key], expected[key], key), (row["iteration"], key, row[key], expected[key])
    assert (tmp_path / "group" / POOL_JSONL).read_text() == (tmp_path / "single" / POOL_JSONL).read_text()
    assert dcp.is_complete(tmp_path / "group" / "checkpoints" / "iter-0002" / "train_state")
    final, expected = policy_state(tmp_path / "group" / "model"), single.learners[0].obj.policy.state_dict()
    for name in final:
        torch.testing.assert_close(final[name], expected[name], atol=1e-5, rtol=0, msg=name)


def test_two_ranks_fine_tune_on_a_batch_they_cannot_halve(ray_session, world):
    """A fine-tuning batch of 3 rows over 2 ranks with micro-batches of 1 row: shares of 2 and 1 would run 2 and 1
    backward passes, and rank 0 would wait in its second gradient reduction for a peer that never comes. The batch
    is cut to 2 rows (equal shares), so both ranks finish the same steps (ceil(2 epochs x 3 rows / 2) = 3)."""
    ray = ray_session
    from actors.group import start_learners
    from rayllama.config import OptimConfig
    from rayllama.train.data import sft_rows

    dialogues = [[*p.prompt, {"role": "assistant", "content": a}]
                 for p, a in zip(world.prompts, ["seven.", "the answer is 12.", "sorry, I cannot help with that."])]
    rows, _ = sft_rows(dialogues, world.tokenizer, 64)
    pair = start_learners(2, lambda i: dict(name=f"lg-odd-{i}", num_cpus=0.25), world.sft, None, None, threads=1,
                          sft_optim=OptimConfig(lr=1e-3, schedule="constant"), timeout_s=60.0)
    try:
        ray.get([learner.__ray_ready__.remote() for learner in pair], timeout=300)
        stats = ray.get([learner.sft_train.remote(rows, 2.0, 3, 1, 0) for learner in pair], timeout=120)
        assert [s["sft_steps"] for s in stats] == [3.0, 3.0] and stats[0]["sft_loss"] == stats[1]["sft_loss"]
    finally:
        for learner in pair:
            ray.kill(learner)
