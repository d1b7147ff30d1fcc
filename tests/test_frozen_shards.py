"""Sharded frozen roles: the reference and a reward scorer as FSDP2 groups of 2 Ray actors (gloo, CPU) give what
one actor gives, in the original row order, also for a batch smaller than the shard count (a rank without rows
runs idle forwards); each rank holds half of the model; `create_rl_actors` wires `<section>.resources.*.shards`;
the memory plan divides the frozen roles' parameter bytes by their shards.

Oracle: the one-actor role in this process on the same checkpoint (the ranks compute the same float32 forward on
all-gathered parameters, rows padded per micro-batch as there: within 1e-5)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from worlds import tiny_config

from actors.group import create_local_rl_actors, create_rl_actors, shutdown_rl_actors, start_frozen
from actors.reference import ReferenceModel, ReferenceModelActor
from actors.reward import RewardScorer, RewardScorerActor
from rayllama.config import ActorResources, FrozenResources, load_config
from rayllama.model import ScalarHeadModel, Transformer
from rayllama.plan import build_plan
from rayllama.rl.actors_api import ShardedHandle, frozen_handle
from rayllama.rl.experience import collate, rank_rows

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PROMPTS = [[1, 30, 31, 32], [1, 40], [1, 50, 51, 52, 53, 54], [1, 60, 61], [1, 70, 71]]
RESPONSES = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14], [15, 16, 2]]
WORDS = "add copy the word number please help refuse cake friend sum capital weather".split()


def _pairs(n: int) -> list[tuple[list[dict[str, str]], str]]:
    g = torch.Generator().manual_seed(n)

    def text(k: int) -> str:
        return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g))

    return [([{"role": "user", "content": text(3 + i % 4)}], text(1 + i % 6)) for i in range(n)]


def _local_numel(ray, handle) -> tuple[int, int]:
    """(elements this rank holds, elements of the whole model) of an actor's `model`."""
    def count(actor):
        from torch.distributed.tensor import DTensor

        params = list(actor.model.parameters())
        return (sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params),
                sum(p.numel() for p in params))

    return ray.get(handle.__ray_call__.remote(count))


@pytest.fixture(scope="module")
def sharded(ray_session, world):
    """A 2-rank reference (micro-batches of 2) and a 2-rank safety scorer (batches of 3), not in a placement group."""
    def options(prefix):
        return lambda i: dict(name=f"fs-{prefix}-{i}", num_cpus=0.1)

    ref = start_frozen(ReferenceModelActor, 2, options("ref"), 0, world.sft, threads=1, micro_batch_size=2,
                       timeout_s=120.0)
    rm = start_frozen(RewardScorerActor, 2, options("rm"), 0, "safety", world.reward_safety, threads=1,
                      batch_size=3, timeout_s=120.0)
    ray_session.get([h.__ray_ready__.remote() for h in ref + rm], timeout=300)
    yield frozen_handle(ref), frozen_handle(rm)
    for handle in ref + rm:
        ray_session.kill(handle)


def test_rank_rows_cover_the_rows_in_order():
    for n in range(0, 9):
        for world_size in (1, 2, 3, 4):
            parts = [rank_rows(n, r, world_size) for r in range(world_size)]
            assert [i for p in parts for i in range(n)[p]] == list(range(n))
            assert max(p.stop - p.start for p in parts) - min(p.stop - p.start for p in parts) <= 1


def test_sharded_reference_equals_one_actor(ray_session, world, sharded):
    ref, _ = sharded
    assert isinstance(ref, ShardedHandle) and len(ref.handles) == 2
    one = ReferenceModel(world.sft, micro_batch_size=2)
    batch = collate(PROMPTS, RESPONSES)  # 5 rows: ranks of 2 (one micro-batch) and 3 (two; rank 0 runs one idle)
    expected = one.logprobs(batch)
    got = ray_session.get(ref.logprobs.remote(batch))
    assert got.shape == expected.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert bool((got[batch.action_mask == 0] == 0).all()) and got.abs().sum() > 0
    single = batch.select(slice(2, 3))  # one row for two ranks: rank 0 has none and runs an idle forward
    torch.testing.assert_close(ray_session.get(ref.logprobs.remote(single)), one.logprobs(single), atol=1e-5,
                               rtol=0)
    for handle in ref.handles:  # each rank holds about half of the parameters, none the whole model
        held, whole = _local_numel(ray_session, handle)
        assert whole == sum(p.numel() for p in one.model.parameters()) and held < 0.6 * whole


def test_sharded_reward_scorer_equals_one_actor(ray_session, world, sharded):
    _, rm = sharded
    one = RewardScorer("safety", world.reward_safety, batch_size=3)
    for n in (7, 1):  # 7: ranks of 3 and 4 pairs (1 and 2 batches); 1: rank 0 has no pair
        pairs = _pairs(n)
        expected = one.score(pairs)
        got = ray_session.get(rm.score.remote(pairs))
        assert len(got) == n and all(type(x) is float for x in got)
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), atol=1e-5, rtol=0)
    assert torch.tensor(one.score(_pairs(7))).std() > 0.1  # the scores are not all alike: the order is checked


def test_sharded_roles_hold_the_configured_dtype(ray_session, world):
    """bf16 ranks store bf16 shards (no fp32 copy) and still return float32, close to the one bf16 actor."""
    ref = start_frozen(ReferenceModelActor, 2, lambda i: dict(name=f"fs-bf16-{i}", num_cpus=0.25), 0, world.sft,
                       dtype=torch.bfloat16, threads=1, micro_batch_size=2, timeout_s=120.0)
    try:
        dtypes = ray_session.get([h.__ray_call__.remote(lambda a: {p.dtype for p in a.model.parameters()})
                                  for h in ref], timeout=300)
        assert dtypes == [{torch.bfloat16}] * 2
        batch = collate(PROMPTS, RESPONSES)
        got = ray_session.get(ShardedHandle(ref).logprobs.remote(batch))
        one = ReferenceModel(world.sft, dtype=torch.bfloat16, micro_batch_size=2).logprobs(batch)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, one, atol=1e-2, rtol=0)
    finally:
        for handle in ref:
            ray_session.kill(handle)


def test_create_rl_actors_shards_the_frozen_roles(ray_session, world):
    """ppo.resources.{reference,reward}.shards=2: named ranks in the placement group, one handle per role that the
    loop calls as it calls one actor (here as rayllama.rl.ppo.score_frozen does)."""
    cfg = tiny_config()
    res = dataclasses.replace(cfg.ppo.resources, learner=ActorResources(num_cpus=0.1),
                              rollout=ActorResources(num_cpus=0.1), reference=FrozenResources(num_cpus=0.1, shards=2),
                              reward=FrozenResources(num_cpus=0.1, shards=2))
    cfg = dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, resources=res))
    actors = create_rl_actors(cfg, world.sft, world.sft, world.reward_helpfulness, world.reward_safety,
                              name_prefix="fs-")
    try:
        for role in ("reference", "reward-helpfulness", "reward-safety"):
            assert [ray_session.get_actor(f"fs-{role}-{i}") for i in range(2)]
            assert f"fs-{role}" not in actors.names
        batch = collate(PROMPTS, RESPONSES)
        pairs = _pairs(5)
        batch_ref, pairs_ref = actors.put(batch), actors.put(pairs)
        ref, helpful, safety = actors.call(lambda: [actors.reference.logprobs.remote(batch_ref),
                                                    actors.reward_helpfulness.score.remote(pairs_ref),
                                                    actors.reward_safety.score.remote(pairs_ref)], "score")
        torch.testing.assert_close(ref, ReferenceModel(world.sft).logprobs(batch), atol=1e-5, rtol=0)
        for got, kind, path in ((helpful, "helpfulness", world.reward_helpfulness),
                                (safety, "safety", world.reward_safety)):
            torch.testing.assert_close(torch.tensor(got), torch.tensor(RewardScorer(kind, path).score(pairs)),
                                       atol=1e-5, rtol=0)
    finally:
        shutdown_rl_actors(actors)


@pytest.mark.parametrize("shards", [2, 4, 8])
def test_plan_divides_the_frozen_roles_bytes_by_their_shards(shards):
    """70B reference and reward scorers: each of the N processes holds rank 0's dim-0 shard of every meta-device
    parameter in bf16 (torch.chunk's first piece, FSDP2's padded shard), about the whole model's bytes / N."""
    cfg = load_config(CONFIGS / "llama2-70b.yaml", [f"ppo.resources.reference.shards={shards}",
                                                    f"ppo.resources.reward.shards={shards}", "cluster.nodes=14"])
    plan = build_plan(cfg)
    ppo = next(s for s in plan.stages if s.stage == "ppo")
    roles, m = {r.name: r for r in ppo.roles}, plan.model
    for name, cls in (("reference", Transformer), ("reward-helpfulness", ScalarHeadModel),
                      ("reward-safety", ScalarHeadModel)):
        with torch.device("meta"):
            params = list(cls(m).to(torch.bfloat16).parameters())
        whole = sum(p.numel() * p.element_size() for p in params)
        role = roles[name]
        assert role.procs == shards and role.shards == shards
        assert role.params == sum(torch.chunk(p, shards)[0].numel() * p.element_size() for p in params)
        assert abs(role.params - whole / shards) < 1e-4 * whole
        placed = [n for g in ppo.gpus for n, r in g.procs if r is role]
        assert placed == [f"{name}-{i}" for i in range(shards)]  # one process per shard, a GPU each
    assert ppo.blockers == []  # no role blocks every layout (the generators are tensor-parallel over 8 GPUs)


def test_local_actors_refuse_shards(world):
    cfg = tiny_config()
    cfg.ppo.resources.reference.shards = 2
    with pytest.raises(ValueError, match=r"ppo\.resources\.reference\.shards=2; use Ray actors"):
        create_local_rl_actors(cfg, world.sft, world.sft, world.reward_helpfulness, world.reward_safety)
