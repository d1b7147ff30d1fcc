"""The RL roles as real Ray actors (one shared Ray session): weight sync, refusals, reward scoring, an FSDP2
learner group, PPO."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from test_ppo_loop import REQUIRED
from test_rejection import answer_logprob
from worlds import tiny_config

from actors.group import (
    PlacementError,
    create_local_rl_actors,
    create_rl_actors,
    shutdown_rl_actors,
    start_learners,
)
from actors.policy import PolicyLearner
from actors.reference import ReferenceModel
from actors.reward import RewardScorer
from rayllama.checkpoint import is_complete, load_model
from rayllama.config import ActorResources, OptimConfig
from rayllama.dist import dcp
from rayllama.generation import SamplingParams
from rayllama.rl.actors_api import ActorCallError, StaleWeightsError
from rayllama.rl.experience import Experience, collate
from rayllama.rl.ppo import run_ppo
from rayllama.rl.weight_sync import WeightSync, digest
from rayllama.train.data import sft_rows

PROMPTS = [[1, 30, 31, 32], [1, 40], [1, 50, 51, 52, 53, 54], [1, 60, 61]]




@pytest.fixture(scope="module")
def cfg():
    return tiny_config(iterations=2, optim=OptimConfig(lr=1e-2, schedule="constant"))


@pytest.fixture(scope="module")
def actors(ray_session, world, cfg):
    group = create_rl_actors(cfg, world.sft, world.sft, world.reward_helpfulness, world.reward_safety,
                             name_prefix="test-")
    yield group
    shutdown_rl_actors(group)


def synthetic_experience(ray, learner, seed: int) -> Experience:
    """Rollouts with full response masks (equal token counts per row), pi_old = the learner's own log-probs,
    random advantages and returns: a PPO step on it moves the weights. `learner`: an actor handle or a
    PolicyLearner in this process."""
    g = torch.Generator().manual_seed(seed)
    prompts = [[1, *torch.randint(3, 400, (4,), generator=g).tolist()] for _ in range(8)]
    responses = [torch.randint(3, 400, (5,), generator=g).tolist() for _ in range(8)]
    batch = collate(prompts, responses)
    if isinstance(learner, PolicyLearner):
        logprobs, values = learner.logprobs(batch), learner.values(batch)
    else:
        logprobs, values = ray.get([learner.logprobs.remote(batch), learner.values.remote(batch)])
    return Experience(batch.sequences, batch.attention_mask, batch.action_mask, logprobs, values,
                      torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g))


def test_actors_are_named_by_role(ray_session, actors):
    for name in ("policy-learner-0", "reference", "reward-helpfulness", "reward-safety", "rollout-0"):
        assert ray_session.get_actor(f"test-{name}") is not None


def test_generator_greedy_equals_learner_greedy_after_every_update(ray_session, actors, world):
    ray, learner, gen = ray_session, actors.learners[0], actors.generators[0]
    eos = world.tokenizer.eos_id
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0, stop_token_ids=(eos,))
    outputs, digests, sync = [], [], WeightSync(backend="gloo", timeout_s=30.0)
    for update in range(3):
        if update:  # a PPO step, then the sync the loop does: a gloo broadcast from the learner to the generator
            ray.get(learner.train.remote(synthetic_experience(ray, learner, update), update))
        version = sync.push(actors)
        assert ray.get(gen.version.remote()) == version
        mine = [c[0].token_ids for c in ray.get(gen.generate.remote(PROMPTS, greedy))]
        assert mine == ray.get(learner.greedy.remote(PROMPTS, 8, (eos,)))
        outputs.append(mine)
        digests.append(ray.get(gen.__ray_call__.remote(lambda self: digest(torch.cat(
            [t.reshape(-1) for t in self.engine.model.state_dict().values()])))))
    assert len(set(digests)) == 3  # every update changed the generator's weights ...
    assert outputs[0] != outputs[-1]  # ... enough to change greedy output, so the equality is not vacuous


def _set_learner_version(ray, learner, version: int) -> None:
    def set_version(self, v=version):
        self.version = v

    ray.get(learner.__ray_call__.remote(set_version))


def _break_digests(ray, learner, broken: bool) -> None:
    """In the learner's process: the sender's digests all zero (broken) or blake2b again."""
    def patch(self, broken=broken):
        import rayllama.rl.weight_sync as ws

        if broken:
            ws._real_digest = getattr(ws, "_real_digest", ws.digest)
            ws.digest = lambda buffer: bytes(ws.DIGEST_BYTES)
        elif hasattr(ws, "_real_digest"):
            ws.digest = ws._real_digest

    ray.get(learner.__ray_call__.remote(patch))


def test_generator_refuses_stale_version_and_wrong_digest(ray_session, actors):
    ray, learner, gen = ray_session, actors.learners[0], actors.generators[0]
    sync = WeightSync(backend="gloo", timeout_s=30.0)
    version = sync.push(actors)
    _set_learner_version(ray, learner, version - 1)
    try:
        with pytest.raises(StaleWeightsError, match="older than the generator's"):
            sync.push(actors)
        assert ray.get(gen.version.remote()) == version  # a refused update changes nothing
        _set_learner_version(ray, learner, version)
        _break_digests(ray, learner, True)  # every bucket arrives with a digest that does not match its bytes
        with pytest.raises(ActorCallError, match=r"rollout-0: .*bucket 0 of \d+ hashes differently"):
            sync.push(actors)
        assert ray.get(gen.version.remote()) == -1  # it holds weights it could not verify: refuses to serve
    finally:
        _break_digests(ray, learner, False)
        _set_learner_version(ray, learner, version)
    assert sync.push(actors) == version and ray.get(gen.version.remote()) == version


def test_reward_scorer_actor_equals_direct_computation(ray_session, actors, world):
    g = torch.Generator().manual_seed(0)
    words = "add copy the word number please help refuse cake friend sum capital weather".split()

    def text(n: int) -> str:
        return " ".join(words[int(i)] for i in torch.randint(0, len(words), (n,), generator=g))

    pairs = [([{"role": "user", "content": text(3 + i % 5)}], text(1 + i % 9)) for i in range(64)]
    got = ray_session.get(actors.reward_safety.score.remote(pairs))
    model, _, _ = load_model(world.reward_safety)
    expected = []
    with torch.no_grad():  # one unpadded sequence at a time; the score is the head at the final </s>
        for prompt, response in pairs:
            ids, _ = world.tokenizer.encode_dialog([*prompt, {"role": "assistant", "content": response}])
            assert ids[-1] == world.tokenizer.eos_id
            expected.append(float(model(torch.tensor([ids]))[0, -1]))
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), atol=1e-5, rtol=0)
    assert torch.tensor(expected).std() > 0.1  # the scores are not all alike


def test_frozen_roles_hold_the_configured_dtype_and_return_float32(world, cfg):
    """The reference and the reward scorers load their weights in the dtype actors.group gives them
    (param_dtype(cfg.train, device): bf16 on cuda) and still return float32 log-probs (a float32 log-softmax) and
    scores; here bf16 on the CPU against the float32 roles."""
    batch = collate(PROMPTS, [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]])
    pairs = [([{"role": "user", "content": "add the number"}], "the sum is 7"),
             ([{"role": "user", "content": "how do I make a cake"}], "sorry, I cannot")]
    ref16 = ReferenceModel(world.sft, dtype=torch.bfloat16, micro_batch_size=3)
    ref32 = ReferenceModel(world.sft, micro_batch_size=3)
    assert {p.dtype for p in ref16.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in ref32.model.parameters()} == {torch.float32}  # the default: nothing changes on CPU
    logp16, logp32 = ref16.logprobs(batch), ref32.logprobs(batch)
    assert logp16.dtype == torch.float32 and logp16.shape == logp32.shape
    torch.testing.assert_close(logp16, logp32, atol=0.05, rtol=0)  # bf16 weights, float32 log-softmax
    assert bool((logp16[batch.action_mask == 0] == 0).all())
    for kind, path in (("helpfulness", world.reward_helpfulness), ("safety", world.reward_safety)):
        rm16 = RewardScorer(kind, path, dtype=torch.bfloat16)
        assert {p.dtype for p in rm16.model.parameters()} == {torch.bfloat16}
        scores = rm16.score(pairs)
        assert all(type(x) is float for x in scores)  # upcast from the bf16 head
        torch.testing.assert_close(torch.tensor(scores), torch.tensor(RewardScorer(kind, path).score(pairs)),
                                   atol=0.1, rtol=0.05)
    # actors.group wires train.param_dtype (and ppo.micro_batch_size) into the roles it creates
    bf16 = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, param_dtype="bfloat16"),
                               ppo=dataclasses.replace(cfg.ppo, micro_batch_size=3))
    local = create_local_rl_actors(bf16, world.sft, world.sft, world.reward_helpfulness, world.reward_safety)
    for handle in (local.reference, local.reward_helpfulness, local.reward_safety):
        assert {p.dtype for p in handle.obj.model.parameters()} == {torch.bfloat16}
    assert local.learners[0].obj.micro_batch_size == 3 and local.learners[0].obj.param_dtype == torch.bfloat16


def test_ppo_ptx_adds_gamma_times_the_sft_loss_of_replayed_dialogues(world, cfg):
    """PPO-ptx: every step adds ptx_coef x the token-mean SFT loss of mini_batch_size replayed dialogues (here
    all 6: fewer than the 8 of a mini-batch). The reported ptx_loss of the first (only) step is that loss before the
    step, by hand; a large ptx_coef raises the replayed answers' likelihood, PPO alone on the same rollouts does
    not as much."""
    answers = ["sum of 3 and 4 is 7.", "sorry I cannot help make a bomb.", "the capital letter is A.",
               "seven.", "the answer is 12.", "I am not able to help with that."]
    dialogues = [[*p.prompt, {"role": "assistant", "content": a}] for p, a in zip(world.prompts, answers)]
    rows, dropped = sft_rows(dialogues, world.tokenizer, 64)
    assert dropped == 0 and rows["tokens"].shape[0] == 6
    ppo = dataclasses.replace(cfg.ppo, mini_batch_size=8, value_init="sft", optim=OptimConfig(lr=1e-3,
                                                                                            schedule="constant"))
    plain = PolicyLearner(world.sft, None, ppo, micro_batch_size=4)
    ptx = PolicyLearner(world.sft, None, dataclasses.replace(ppo, ptx_coef=5.0), micro_batch_size=4)
    before = [answer_logprob(ptx.policy, world.tokenizer, d) for d in dialogues]
    counts = [sum(world.tokenizer.encode_dialog(d)[1]) for d in dialogues]
    exp = synthetic_experience(None, plain, seed=5)  # 8 rows: one step per call
    stats = ptx.train(exp, 0, rows)
    assert stats["optimizer_steps"] == 1
    assert stats["ptx_loss"] == pytest.approx(-sum(b * c for b, c in zip(before, counts)) / sum(counts), rel=1e-4)
    assert "ptx_loss" not in plain.train(exp, 0, rows)  # ptx_coef 0: the rows are not read
    for seed in range(1, 4):
        ptx.train(exp, seed, rows)
        plain.train(exp, seed, rows)
    gain_ptx = [answer_logprob(ptx.policy, world.tokenizer, d) - b for d, b in zip(dialogues, before)]
    gain_plain = [answer_logprob(plain.policy, world.tokenizer, d) - b for d, b in zip(dialogues, before)]
    # measured: ptx +0.22..+0.29 nats per answer token, PPO alone -0.02..+0.00
    assert min(gain_ptx) > 0.15 and min(gain_ptx) > max(gain_plain) + 0.15, (gain_ptx, gain_plain)
    with pytest.raises(ValueError, match="ppo.ptx_coef 5.0 needs at least 1 SFT rows to replay"):
        ptx.train(exp, 0)


def test_two_fsdp_learners_step_like_one_learner_on_the_union(ray_session, world, cfg, tmp_path):
    """An FSDP2 group of 2 ranks, each training on its 4 of the mini-batch's 8 rows (loss normalised by the
    union's token count, gradients reduce-scattered as the ranks' mean), takes the step one local learner takes on
    all 8 rows (mini_batch_size 8 in both)."""
    ray = ray_session
    ppo = dataclasses.replace(cfg.ppo, num_learners=2, mini_batch_size=8, value_init="sft")
    local = PolicyLearner(world.sft, None, ppo, micro_batch_size=2)
    pair = start_learners(2, lambda i: dict(name=f"test-fsdp-{i}", num_cpus=0.25), world.sft, None, ppo, threads=1,
                          micro_batch_size=2)
    try:
        ray.get([learner.__ray_ready__.remote() for learner in pair], timeout=300)
        exp = synthetic_experience(ray, local, seed=9)
        ray.get([learner.train.remote(exp, 0) for learner in pair])
        local.train(exp, 0)
        written = ray.get([learner.export_policy.remote(str(tmp_path / "pair")) for learner in pair])
        assert written[1] is None  # both ranks gather, only rank 0 writes
        state0 = load_model(written[0])[0].state_dict()
        for name, tensor in local.policy.state_dict().items():
            torch.testing.assert_close(state0[name], tensor, atol=2e-6, rtol=1e-5)
        sft, _, _ = load_model(world.sft)
        assert not torch.allclose(local.policy.lm_head.weight, sft.lm_head.weight)
        # read-outs are collectives over uneven parts: 5 rows (3 micro-batches of <= 2) and 3 rows (2, plus one
        # idle forward to keep rank 1's all-gathers in step with rank 0's)
        batch = exp.batch
        for method in ("logprobs", "values"):
            parts = ray.get([getattr(pair[0], method).remote(batch.select(slice(0, 5))),
                             getattr(pair[1], method).remote(batch.select(slice(5, 8)))], timeout=120)
            torch.testing.assert_close(torch.cat(parts), getattr(local, method)(batch), atol=2e-6, rtol=1e-5)
    finally:
        for learner in pair:
            ray.kill(learner)


def test_placement_error_names_the_request(ray_session, world, cfg):
    big = dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, resources=dataclasses.replace(
        cfg.ppo.resources, learner=ActorResources(num_cpus=64), placement_timeout_s=1.0)))
    with pytest.raises(PlacementError, match="need 65 CPUs and 0 GPUs but only"):
        create_rl_actors(big, world.sft, world.sft, world.reward_helpfulness, world.reward_safety,
                         name_prefix="test-big-")


def test_two_ppo_iterations_through_actors(ray_session, actors, world, cfg, tmp_path):
    summary = run_ppo(cfg, actors, world.prompts, world.tokenizer, tmp_path)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    metrics = [m for m in metrics if "reward/combined" in m]
    assert [m["iteration"] for m in metrics] == [1, 2]
    assert all(k in m for m in metrics for k in REQUIRED)
    assert all(m["logprob_drift"] < 1e-4 for m in metrics)  # generators sampled with the learner's weights
    assert summary["iterations"] == 2 and is_complete(tmp_path / "model")
    assert dcp.is_complete(tmp_path / "checkpoints" / "iter-0002" / "train_state")  # the learners' sharded state
