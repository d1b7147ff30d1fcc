"""Faults: actors killed with SIGKILL during PPO, learners lost mid-iteration, a kill in the middle of a checkpoint
save, and the driver killed mid-stage and rerun. The oracle throughout is an uninterrupted run with the same seed:
a run that survived its faults ends with the same policy weights, bit for bit (CPU, one thread per actor), and
logs every iteration exactly once.

Tiny models from tests/test_ppo_loop.py (`make_world`: 420-piece tokenizer, dim 32, 2 layers).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from worlds import FailsSecondGenerate, local, rej_config, tiny_config

from actors.group import create_local_rejection_actors, create_rl_actors, shutdown_rl_actors
from actors.policy import PolicyLearner
from rayllama.checkpoint import is_complete, load_model, save_model
from rayllama.config import PipelineConfig
from rayllama.data.formats import PromptRecord, read_prompts, read_sft, write_jsonl
from rayllama.rl.actors_api import ActorCallError, LearnerLostError, LocalHandle, RLActors
from rayllama.rl.ppo import latest_checkpoint, run_ppo
from rayllama.rl.rejection import POOL_JSONL, run_rejection

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")




def iteration_rows(out_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "iteration" in r]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


def policy_state(path: Path) -> dict[str, torch.Tensor]:
    return load_model(path)[0].state_dict()


# ---------------------------------------------------------------------------------------------- kill -9 actors


def actor_pid(ray: Any, handle: Any) -> int:
    return ray.get(handle.__ray_call__.remote(lambda self: os.getpid()), timeout=120)


class KillDuring:
    """Stands in for an actor handle: call number `nth` of `method` is submitted, then the actor's process gets
    SIGKILL at once (so it dies with the call queued or running). Every other call passes through."""

    def __init__(self, ray: Any, handle: Any, role: str, method: str, nth: int, kills: list) -> None:
        self._ray, self._handle, self._role, self._method, self._nth, self._kills = ray, handle, role, method, nth, kills
        self._calls = 0

    def __getattr__(self, name: str) -> Any:
        real = getattr(self._handle, name)
        if name != self._method:
            return real
        outer = self

        class Armed:
            @staticmethod
            def remote(*args: Any, **kwargs: Any) -> Any:
                outer._calls += 1
                if outer._calls != outer._nth:
                    return real.remote(*args, **kwargs)
                pid = actor_pid(outer._ray, outer._handle)  # asked while the actor is idle
                ref = real.remote(*args, **kwargs)
                os.kill(pid, signal.SIGKILL)
                outer._kills.append((outer._role, f"during {name} call {outer._nth}", pid, outer._handle))
                return ref

        return Armed


def test_every_role_killed_once_during_ppo_and_the_run_equals_an_uninterrupted_one(ray_session, world, tmp_path,
                                                                                    caplog):
    """Four PPO iterations through Ray actors, checkpoints at 2 and 4. Kills (SIGKILL to the actor's process):
    reward-safety idle after iteration 1 (its next call waits for the restart); rollout-0 during its 2nd generate
    (the restarted generator refuses to serve until the loop sends it the current weights); reference during its
    2nd log-prob call and reward-helpfulness during its 3rd score (Ray re-runs the call on the restarted actor);
    policy-learner-0 during its 4th train (the restarted learner refuses work; the loop restores iter-0002 and
    redoes iterations 3 and 4). The run completes, logs iterations 1..4 once each, every rollout was sampled with
    the learner's current weights, and the final policy equals an uninterrupted in-process run's bit for bit."""
    ray = ray_session
    cfg = tiny_config(iterations=4, checkpoint_every=2, eval_every=1)
    group = create_rl_actors(cfg, world.sft, world.sft, world.reward_helpfulness, world.reward_safety,
                             name_prefix="faults-")
    kills: list[tuple[str, str, int, Any]] = []

    def kill_idle(role: str, handle: Any) -> None:
        pid = actor_pid(ray, handle)
        os.kill(pid, signal.SIGKILL)
        kills.append((role, "idle", pid, handle))

    def between_iterations(actors: RLActors, iteration: int) -> dict[str, float]:
        if iteration == 1:  # (iteration 1 is not redone: the learner's loss rolls back to iter-0002)
            kill_idle("reward-safety", group.reward_safety)
        return {}

    faulty = dataclasses.replace(
        group,
        learners=[KillDuring(ray, group.learners[0], "policy-learner-0", "train", 4, kills)],
        reference=KillDuring(ray, group.reference, "reference", "logprobs", 2, kills),
        reward_helpfulness=KillDuring(ray, group.reward_helpfulness, "reward-helpfulness", "score", 3, kills),
        generators=[KillDuring(ray, group.generators[0], "rollout-0", "generate", 2, kills)],
    )
    caplog.set_level("WARNING", logger="rayllama")
    try:
        summary = run_ppo(cfg, faulty, world.prompts, world.tokenizer, tmp_path, evaluate=between_iterations)
        restarted = {role: actor_pid(ray, handle) for role, _, _, handle in kills}
    finally:
        shutdown_rl_actors(group)

    assert sorted({k[0] for k in kills}) == ["policy-learner-0", "reference", "reward-helpfulness", "reward-safety",
                                             "rollout-0"] and len(kills) == 5
    for role, _, pid, _ in kills:
        assert restarted[role] != pid, f"{role} still runs in the killed process {pid}"
    # the restarted generator was sent the current weights before it served; the lost learner was restored
    assert "generator(s) behind weight version" in caplog.text
    assert "policy learner lost" in caplog.text and "restored iter-0002" in caplog.text
    rows = iteration_rows(tmp_path)
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]  # none lost, none duplicated (3 was redone)
    assert summary["recoveries"] == 1 and summary["iterations"] == 4
    versions = [r["weight_version"] for r in rows]
    assert versions == sorted(set(versions))  # strictly increasing
    # every rollout came from the learner's current weights: its log-probs before the first step equal the
    # generator's up to float noise (one iteration moves them ~1e-2 from SFT: a stale generator would show)
    assert all(r["logprob_drift"] < 1e-4 for r in rows), [r["logprob_drift"] for r in rows]

    straight = local(cfg, world)
    run_ppo(cfg, straight, world.prompts, world.tokenizer, tmp_path / "straight")
    assert_same_weights(policy_state(tmp_path / "model"), straight.learners[0].obj.policy.state_dict())
    assert [r["reward/combined"] for r in rows] == [r["reward/combined"]
                                                    for r in iteration_rows(tmp_path / "straight")]


def test_async_ppo_survives_a_generator_killed_in_a_prefetch_and_a_lost_learner(ray_session, world, tmp_path,
                                                                                caplog):
    """ppo.async_rollouts through Ray actors, checkpoints at 2 and 4. rollout-0 gets SIGKILL during its 2nd
    generate: the prefetch of iteration 2, beside iteration 1's training. A prefetch never sends weights (the
    learner is busy training), so the restarted generator refuses it; the weight sync after iteration 1 sends it
    the new weights and iteration 2 generates its rollouts again, on-policy. policy-learner-0 gets SIGKILL during
    its 4th train: the loop restores iter-0002 with the rollouts it had prefetched for iteration 3 and redoes 3
    and 4. The oracle is an in-process async run whose generator fails its 2nd call: the same weights, bit for
    bit, and the same rows."""
    ray = ray_session
    cfg = tiny_config(iterations=4, checkpoint_every=2, async_rollouts=True)
    group = create_rl_actors(cfg, world.sft, world.sft, world.reward_helpfulness, world.reward_safety,
                             name_prefix="async-faults-")
    kills: list[tuple[str, str, int, Any]] = []
    faulty = dataclasses.replace(
        group,
        learners=[KillDuring(ray, group.learners[0], "policy-learner-0", "train", 4, kills)],
        generators=[KillDuring(ray, group.generators[0], "rollout-0", "generate", 2, kills)],
    )
    caplog.set_level("WARNING", logger="rayllama")
    try:
        summary = run_ppo(cfg, faulty, world.prompts, world.tokenizer, tmp_path)
    finally:
        shutdown_rl_actors(group)
    assert sorted(k[0] for k in kills) == ["policy-learner-0", "rollout-0"]
    assert "prefetching the rollouts of PPO iteration 2 failed" in caplog.text
    assert "restored iter-0002" in caplog.text and summary["recoveries"] == 1
    rows = iteration_rows(tmp_path)
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    assert [r["rollout_lag"] for r in rows] == [0, 0, 1, 1]

    real = local(cfg, world)
    oracle = dataclasses.replace(real, generators=[LocalHandle(FailsSecondGenerate(world.sft))])
    run_ppo(cfg, oracle, world.prompts, world.tokenizer, tmp_path / "oracle")
    assert_same_weights(policy_state(tmp_path / "model"), real.learners[0].obj.policy.state_dict())
    assert [r["reward/combined"] for r in rows] == [r["reward/combined"]
                                                    for r in iteration_rows(tmp_path / "oracle")]


# ---------------------------------------------------------------------------------------------- lost learners, in-process


class LosesStateOnCall:
    """A local learner handle whose call numbers `crash_at` of `method` simulate a kill -9 and Ray's restart: the
    learner is rebuilt by `make()` (fresh SFT weights, as Ray reruns the constructor), marked as restarted, and
    the call fails with LearnerLostError."""

    def __init__(self, make: Any, method: str, crash_at: set[int]) -> None:
        self.obj, self._make, self._method, self._crash_at, self._calls = make(), make, method, crash_at, 0

    def __getattr__(self, name: str) -> Any:
        outer = self

        class Method:
            @staticmethod
            def remote(*args: Any, **kwargs: Any) -> Any:
                if name == outer._method:
                    outer._calls += 1
                    if outer._calls in outer._crash_at:
                        outer.obj = outer._make()
                        outer.obj.state_lost = True
                        raise LearnerLostError(f"simulated kill -9 during {name} call {outer._calls}")
                return getattr(outer.obj, name)(*args, **kwargs)

        return Method


@pytest.mark.parametrize("async_rollouts", [False, True], ids=["sync", "async"])
def test_ppo_learner_lost_in_a_checkpoint_save_rolls_back_and_equals_an_uninterrupted_run(world, tmp_path,
                                                                                           async_rollouts):
    """Checkpoints every 2 iterations; the learner "dies" in its 2nd save (iteration 4): the loop restores
    iter-0002 (async: with the rollouts it had prefetched for iteration 3), removes iteration 3's logged row,
    redoes 3 and 4 (and saves), and ends where a straight run ends."""
    cfg = tiny_config(iterations=5, checkpoint_every=2, async_rollouts=async_rollouts)
    actors = local(cfg, world)
    actors.learners = [LosesStateOnCall(lambda: PolicyLearner(world.sft, world.reward_helpfulness, cfg.ppo,
                                                              seed=cfg.seed), "save", {2})]
    summary = run_ppo(cfg, actors, world.prompts, world.tokenizer, tmp_path / "crashed")
    straight = local(cfg, world)
    run_ppo(cfg, straight, world.prompts, world.tokenizer, tmp_path / "straight")

    assert summary["recoveries"] == 1
    rows = iteration_rows(tmp_path / "crashed")
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["reward/combined"] for r in rows] == [r["reward/combined"] for r in iteration_rows(tmp_path / "straight")]
    assert_same_weights(actors.learners[0].obj.policy.state_dict(), straight.learners[0].obj.policy.state_dict())
    assert_same_weights(actors.learners[0].obj.value.state_dict(), straight.learners[0].obj.value.state_dict())
    assert not list((tmp_path / "crashed" / "checkpoints").glob(".iter-*"))  # the torn save's temp dir is gone


def test_rejection_learner_lost_before_and_after_its_first_checkpoint_equals_an_uninterrupted_run(world, tmp_path):
    """The learner "dies" in its 1st fine-tuning call (no checkpoint yet: it restores its initial state) and in
    its 4th (iteration 3 after one redo: it restores iter-0002 with its pool and curves). Pool, curves and weights
    equal a straight run's."""
    cfg = rej_config(iterations=3)

    def actors():
        return create_local_rejection_actors(cfg, world.sft, world.reward_helpfulness, world.reward_safety)

    crashed = actors()
    crashed.learners = [LosesStateOnCall(lambda: PolicyLearner(
        world.sft, None, None, seed=cfg.seed, micro_batch_size=cfg.rejection.micro_batch_size,
        sft_optim=cfg.rejection.optim), "sft_train", {1, 4})]
    summary = run_rejection(cfg, crashed, world.prompts, world.tokenizer, tmp_path / "crashed")
    straight = actors()
    run_rejection(cfg, straight, world.prompts, world.tokenizer, tmp_path / "straight")

    assert summary["recoveries"] == 2
    assert [r["iteration"] for r in iteration_rows(tmp_path / "crashed")] == [1, 2, 3]
    assert (tmp_path / "crashed" / POOL_JSONL).read_text() == (tmp_path / "straight" / POOL_JSONL).read_text()
    assert_same_weights(crashed.learners[0].obj.policy.state_dict(), straight.learners[0].obj.policy.state_dict())
    assert_same_weights(policy_state(tmp_path / "crashed" / "model"), policy_state(tmp_path / "straight" / "model"))


def test_a_learner_lost_too_often_stops_with_one_line(world, tmp_path):
    cfg = tiny_config(iterations=3)
    actors = local(cfg, world)
    actors.max_recoveries = 1
    actors.learners = [LosesStateOnCall(lambda: PolicyLearner(world.sft, world.reward_helpfulness, cfg.ppo,
                                                              seed=cfg.seed), "train", {1, 2})]
    with pytest.raises(ActorCallError, match=r"lost 2 times \(limit 1\)") as info:
        run_ppo(cfg, actors, world.prompts, world.tokenizer, tmp_path)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------- kill -9 mid-save

# Runs in a subprocess: arms a pause at one point of a save, prints PAUSED there and waits for the SIGKILL.
SAVE_SCRIPT = textwrap.dedent("""
    import json, os, shutil, sys, time
    from pathlib import Path

    import torch

    from rayllama import checkpoint

    phase, target, spec = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    real_rename, real_rmtree = os.rename, shutil.rmtree

    def pause():
        print("PAUSED", flush=True)
        time.sleep(600)

    def rename(src, dst):
        if phase == "ppo-rename" and Path(dst).name == "iter-0002":  # the PPO checkpoint is written, not renamed
            pause()
        real_rename(src, dst)
        if phase == "swapping" and ".old-" in str(dst):  # the old checkpoint is aside, the new one not renamed in
            pause()

    def rmtree(path, *args, **kwargs):
        if phase == "cleanup" and ".old-" in str(path) and Path(path).exists():  # the new one is in place
            pause()
        real_rmtree(path, *args, **kwargs)

    def save_file(*args, **kwargs):
        real_save_file(*args, **kwargs)
        if phase == "writing":  # the new weights are in the temp dir, config and meta are not
            pause()

    os.rename, shutil.rmtree = rename, rmtree
    real_save_file, checkpoint.save_file = checkpoint.save_file, save_file
    torch.set_num_threads(1)
    if phase.startswith(("ppo", "rejection")):
        sys.path.insert(0, spec["tests"])
        from worlds import TinyWorld, local, rej_config, tiny_config
        from actors.group import create_local_rejection_actors
        from actors.policy import PolicyLearner
        from rayllama.data.formats import read_prompts
        from rayllama.rl.ppo import run_ppo
        from rayllama.rl.rejection import run_rejection
        from rayllama.tokenizer import Tokenizer

        world = TinyWorld(Tokenizer(spec["tok"]), Path(spec["sft"]), Path(spec["rh"]), Path(spec["rs"]),
                          list(read_prompts(spec["prompts"])))
        if phase == "ppo-rename":
            cfg = tiny_config(iterations=3)
            run_ppo(cfg, local(cfg, world), world.prompts, world.tokenizer, target)
        else:  # rejection-train: pause in the 3rd fine-tuning call (iteration 3), after iteration 2's checkpoint
            real_sft_train, calls = PolicyLearner.sft_train, []

            def sft_train(self, *args, **kwargs):
                calls.append(1)
                if len(calls) == 3:
                    pause()
                return real_sft_train(self, *args, **kwargs)

            PolicyLearner.sft_train = sft_train
            cfg = rej_config(iterations=4)
            actors = create_local_rejection_actors(cfg, world.sft, world.reward_helpfulness, world.reward_safety)
            run_rejection(cfg, actors, world.prompts, world.tokenizer, target)
    else:
        from rayllama.model import ModelConfig, Transformer

        cfg = ModelConfig(**spec["cfg"])
        torch.manual_seed(1)
        checkpoint.save_model(target, Transformer(cfg), cfg, meta={"step": 2}, train_state={"step": 2})
    print("FINISHED", flush=True)
""")


def run_until_paused_then_kill(phase: str, target: Path, spec: dict) -> None:
    """Start SAVE_SCRIPT, wait until it pauses at `phase`, SIGKILL it (no cleanup handlers run)."""
    proc = subprocess.Popen([sys.executable, "-c", SAVE_SCRIPT, phase, str(target), json.dumps(spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = proc.stdout.readline()  # blocks until the pause (or the end)
        assert line.strip() == "PAUSED", f"the save did not pause at {phase}: {line!r}\n{proc.stderr.read()}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def siblings(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


SMALL = dict(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=300, ffn_dim=64, max_seq_len=32)


@pytest.mark.parametrize("phase, survivor", [("writing", 1), ("swapping", 1), ("cleanup", 2)])
def test_sigkill_during_a_checkpoint_save_leaves_a_loadable_checkpoint(tmp_path, phase, survivor):
    """A real SIGKILL of a process in the middle of `save_model` over an existing checkpoint (step 1): while the
    new files are written, between moving the old one aside and renaming the new one in, and before the old one
    is removed. The target (or the copy set aside) loads complete, old or new; the next save cleans up."""
    from rayllama.model import ModelConfig, Transformer

    cfg = ModelConfig(**SMALL)
    torch.manual_seed(0)
    old = Transformer(cfg)
    torch.manual_seed(1)
    new = Transformer(cfg)  # what the killed process saves (the same seed)
    target = save_model(tmp_path / "ckpt", old, cfg, meta={"step": 1})

    run_until_paused_then_kill(phase, target, {"cfg": SMALL})
    assert siblings(target), "the kill left no temp/aside dir: it did not land mid-save"
    assert is_complete(target)
    model, _, meta = load_model(target)
    assert meta["step"] == survivor
    assert_same_weights(model.state_dict(), (old if survivor == 1 else new).state_dict())

    torch.manual_seed(2)
    latest = Transformer(cfg)
    save_model(target, latest, cfg, meta={"step": 3})
    assert load_model(target)[2]["step"] == 3 and siblings(target) == []


def test_sigkill_during_a_ppo_checkpoint_then_rerun_equals_an_uninterrupted_run(world, tmp_path):
    """A process running PPO (checkpoint every iteration) is killed after iteration 2's checkpoint is written but
    before its rename: iter-0001 stays the latest complete checkpoint, and rerunning resumes from it, logs each
    iteration once, and ends with the weights of a run that was never killed."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", world.prompts)
    spec = {"tests": str(ROOT / "tests"), "tok": str(world.tokenizer.model_path), "sft": str(world.sft),
            "rh": str(world.reward_helpfulness), "rs": str(world.reward_safety), "prompts": str(prompts)}
    out = tmp_path / "ppo"
    run_until_paused_then_kill("ppo-rename", out, spec)
    assert latest_checkpoint(out).name == "iter-0001"
    assert [p.name for p in (out / "checkpoints").glob(".iter-0002.tmp-*")]  # the torn one, not picked

    cfg = tiny_config(iterations=3)
    prompts_read = list(read_prompts(prompts))
    resumed = local(cfg, world)
    summary = run_ppo(cfg, resumed, prompts_read, world.tokenizer, out)
    assert summary["resumed_from"] == 1
    assert [r["iteration"] for r in iteration_rows(out)] == [1, 2, 3]
    assert not list((out / "checkpoints").glob(".iter-*"))  # the dead writer's temp dir is gone
    straight = local(cfg, world)
    run_ppo(cfg, straight, world.prompts, world.tokenizer, tmp_path / "straight")
    assert_same_weights(resumed.learners[0].obj.policy.state_dict(), straight.learners[0].obj.policy.state_dict())


# ---------------------------------------------------------------------------------------------- kill -9 the driver

# Stages before PPO are pre-built by the test (tokenizer, SFT and reward checkpoints under run_dir), so the
# driver runs only `ppo` on tiny random models.
DRIVER_RUN = [
    "stages=[ppo]", "ray.include_dashboard=false", "ray.num_cpus=2",
    "world.pretrain_world=20", "world.sft=40", "world.pref_helpfulness=20", "world.pref_safety=20",
    "world.pref_helpfulness_heldout=10", "world.pref_safety_heldout=10", "world.prompts=24", "world.gatt=2",
    "world.gatt_turns=2", "world.eval_safe=4", "world.eval_unsafe=2", "world.eval_borderline=2", "world.eval_gatt=1",
    "ppo.iterations=6", "ppo.prompts_per_iteration=4", "ppo.samples_per_prompt=2", "ppo.mini_batch_size=8",
    "ppo.max_new_tokens=8", "ppo.checkpoint_every=2", "ppo.optim.lr=1e-3",
    # the in-process oracle runs one torch thread (the one_thread fixture): so must the driver's learner, whose bits
    # depend on its thread count (tiny.yaml gives it 2)
    "ppo.resources.learner.threads=1",
]


def prebuild_run(run_dir: Path) -> tuple[PipelineConfig, list[PromptRecord]]:
    """The toy world's files, a tokenizer trained on them, a random SFT policy and two random reward models,
    where the driver's earlier stages would have put them; returns the config and the RL prompts."""
    from rayllama.config import load_config
    from rayllama.model import ModelConfig, ScalarHeadModel, Transformer
    from rayllama.pipeline import template_text, write_world_once
    from rayllama.tokenizer import Tokenizer, train_tokenizer

    cfg = load_config(ROOT / "configs" / "ppo.yaml", [*DRIVER_RUN, f"run_dir={run_dir}"])
    files = write_world_once(run_dir / "data", cfg)
    prompts = list(read_prompts(files["prompts"]))
    texts = [template_text(r.prompt) for r in [*prompts, *read_prompts(files["eval"])]]
    texts += [json.loads(line)["messages"][-1]["content"] for line in files["sft"].read_text().splitlines()]
    (run_dir / "tokenizer").mkdir(parents=True)
    tok_path = train_tokenizer(texts, run_dir / "tokenizer" / "tokenizer", vocab_size=400)
    model_cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=Tokenizer(tok_path).vocab_size,
                            ffn_dim=64, max_seq_len=160)
    torch.manual_seed(0)
    save_model(run_dir / "sft" / "model", Transformer(model_cfg), model_cfg, tokenizer_model=tok_path)
    for kind in ("helpfulness", "safety"):
        rm = ScalarHeadModel(model_cfg)
        torch.nn.init.normal_(rm.score.weight, std=1.0)
        save_model(run_dir / "reward" / kind / "model", rm, model_cfg, tokenizer_model=tok_path)
    return cfg, prompts


def start_driver(run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rayllama.driver", str(ROOT / "configs" / "ppo.yaml"),
                             *DRIVER_RUN, f"run_dir={run_dir}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, cwd=ROOT)


def logged(metrics: Path, iteration: int) -> bool:
    """Whether `metrics` holds the row of `iteration` (a line being written is skipped)."""
    if not metrics.exists():
        return False
    for line in metrics.read_text().splitlines():
        try:
            if json.loads(line).get("iteration", 0) >= iteration:
                return True
        except ValueError:
            pass
    return False


def kill_driver_after(proc: subprocess.Popen, metrics: Path, iteration: int, timeout: float = 400) -> None:
    """SIGKILL the driver's whole process group (it and the Ray it started) once `metrics` logs `iteration`."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not logged(metrics, iteration):
        time.sleep(0.1)
    assert proc.poll() is None, f"the driver ended before it could be killed:\n{proc.stdout.read()}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def test_driver_killed_in_ppo_then_rerun_equals_an_uninterrupted_run(tmp_path):
    """`python -m rayllama.driver` (stages [ppo], checkpoints every 2 iterations) is killed with SIGKILL to its
    process group after PPO iteration 3 is logged, then the same command is run again. PPO resumes from its last
    checkpoint, logs each iteration once, and the final policy equals an uninterrupted in-process run's bit for
    bit. (Rejection sampling: the same resume code, proven with a real SIGKILL at the run_rejection level in
    test_sigkill_during_rejection_training_then_rerun_equals_an_uninterrupted_run.)"""
    from actors.group import create_local_rl_actors
    from rayllama.tokenizer import Tokenizer

    run_dir = tmp_path / "run"
    cfg, prompts = prebuild_run(run_dir)
    first = start_driver(run_dir)
    kill_driver_after(first, run_dir / "ppo" / "metrics.jsonl", 3)
    assert not is_complete(run_dir / "ppo" / "model")
    again = start_driver(run_dir)
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out

    rows = [json.loads(line) for line in (run_dir / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "iteration" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["resumed_from"] for r in rows if "resumed_from" in r] in ([-1, 2], [-1, 4])
    assert json.loads((run_dir / "eval.json").read_text())["ppo"]["started_from"] == "sft"  # what its column is a change from

    tok = Tokenizer(run_dir / "tokenizer" / "tokenizer.model")
    sft, rh, rs = (run_dir / "sft" / "model", run_dir / "reward" / "helpfulness" / "model",
                   run_dir / "reward" / "safety" / "model")
    replay = [r.messages for r in read_sft(run_dir / "data" / "sft.jsonl")]  # what the driver's PPO-ptx replays
    run_ppo(cfg, create_local_rl_actors(cfg, sft, sft, rh, rs), prompts, tok, tmp_path / "ppo", replay=replay)
    assert_same_weights(policy_state(run_dir / "ppo" / "model"), policy_state(tmp_path / "ppo" / "model"))


def test_sigkill_during_rejection_training_then_rerun_equals_an_uninterrupted_run(world, tmp_path):
    """A process running rejection sampling (checkpoint every iteration) is killed in iteration 3's fine-tuning:
    rerunning resumes from iter-0002 with its pool, logs each iteration once, and ends with the pool and weights
    of a run that was never killed."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", world.prompts)
    spec = {"tests": str(ROOT / "tests"), "tok": str(world.tokenizer.model_path), "sft": str(world.sft),
            "rh": str(world.reward_helpfulness), "rs": str(world.reward_safety), "prompts": str(prompts)}
    out = tmp_path / "rejection"
    run_until_paused_then_kill("rejection-train", out, spec)
    assert [r["iteration"] for r in iteration_rows(out)] == [1, 2]

    cfg = rej_config(iterations=4)

    def actors():
        return create_local_rejection_actors(cfg, world.sft, world.reward_helpfulness, world.reward_safety)

    resumed = actors()
    summary = run_rejection(cfg, resumed, list(read_prompts(prompts)), world.tokenizer, out)
    assert summary["resumed_from"] == 2
    assert [r["iteration"] for r in iteration_rows(out)] == [1, 2, 3, 4]
    straight = actors()
    run_rejection(cfg, straight, world.prompts, world.tokenizer, tmp_path / "straight")
    assert (out / POOL_JSONL).read_text() == (tmp_path / "straight" / POOL_JSONL).read_text()
    assert_same_weights(resumed.learners[0].obj.policy.state_dict(), straight.learners[0].obj.policy.state_dict())
