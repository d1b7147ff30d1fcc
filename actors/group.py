"""Create (and shut down) the RL roles as named Ray actors in one placement group, or in this process.

Roles and names (the dashboard shows them):

    policy-learner-<i>   PolicyLearner rank i < ppo.num_learners (one FSDP2 group when > 1)
    reference            ReferenceModel (the SFT checkpoint, frozen); reference-<i>, i < shards, when sharded
    reward-helpfulness   RewardScorer("helpfulness"); reward-helpfulness-<i> when sharded
    reward-safety        RewardScorer("safety"); reward-safety-<i> when sharded
    rollout-<i>          RolloutGenerator, i < ppo.num_generators

The learners train and read out in micro-batches of `ppo.micro_batch_size` rows; every learner computes in, and
the reference and reward scorers hold their weights in, `rayllama.config.param_dtype(cfg.train, its device)`
(bfloat16 on cuda with train.param_dtype auto, float32 on the CPU); the generators keep theirs.

Resources per role come from `ppo.resources` (one bundle per actor, fractional CPUs allowed, plus custom Ray
resources per role: `ppo.resources.learner.resources={node_a: 0.1}` pins the learner to the node(s) that offer
`node_a`). If the bundles do not fit within `placement_timeout_s`, creation fails with a one-line
`PlacementError` naming what was asked.

The learner group (`start_learners`): with N > 1 learners, a small task in rank 0's bundle picks a free port on
rank 0's node, and the N actors are created at once with (rank, N, tcp://that address): each joins the process
group in its constructor and then builds its FSDP2-sharded models (actors.policy), so no rank ever loads a whole
model. `__ray_ready__` returns once every rank has loaded its shards.

Sharded frozen roles (`start_frozen`): with `ppo.resources.reference.shards` (or `<section>.resources.reward.shards`,
each scorer) N > 1 the role is N actors, a bundle each, that form one FSDP2 group the same way (the same rendezvous,
`rayllama.dist.fsdp.join_group`), each holding 1/N of the frozen model in the role's dtype; the loops call them
through one `rayllama.rl.actors_api.ShardedHandle`. Their ranks are not restarted either (max_restarts 0) and there
is no rebuild: a lost rank fails the call that needed it.

Faults: every actor except a grouped learner or a sharded frozen role's rank restarts up to `max_restarts` times
and re-runs the task it died in (`_role_options`); `RLActors.call` re-issues up to `max_restarts` more times. A
lone learner restarts with fresh SFT weights and refuses work until the loop restores a checkpoint. Ranks of a group of N > 1 are not restarted
(max_restarts 0: a new process cannot join the old process group); instead `RLActors.rebuild_learners` kills every
rank and starts a new group (new actors, new rendezvous address, the same bundles and names), and the loop
restores the last complete sharded checkpoint, or the initial state, and redoes the lost iterations, up to
`max_restarts` times (rayllama.rl.ppo, "Faults").

Rejection sampling (`create_rejection_actors`) needs fewer roles: one policy-only learner (`policy-learner-0`,
no value model, AdamW per rejection.optim), both reward scorers and rejection.num_generators generators, with
resources from `rejection.resources`; `RLActors.reference` is None.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rayllama import storage
from rayllama.checkpoint import is_complete, resolve
from rayllama.config import (
    ActorResources,
    FrozenResources,
    PipelineConfig,
    PPOConfig,
    RLResources,
    param_dtype,
)
from rayllama.rl.actors_api import ActorCallError, RLActors, frozen_handle, local_actors


class PlacementError(RuntimeError):
    """The RL actors' resources do not fit in the Ray cluster."""


def _require(path: str | Path | None, what: str, key: str) -> str:
    """`path` if it holds a complete checkpoint (a URI: the store has it, marked complete; each actor reads its
    own node's copy)."""
    try:
        if path is not None and storage.is_uri(path):
            ok = storage.is_complete_dir(path)
        else:
            ok = path is not None and is_complete(resolve(path))
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"{what} checkpoint {path} is missing or incomplete; run the {key} stage first "
                         f"(or fix the path)")
    return str(path)


def _bundle(res: ActorResources, role: str, section: str = "ppo") -> dict[str, float]:
    if res.num_cpus < 0 or res.num_gpus < 0 or res.num_cpus + res.num_gpus <= 0:
        raise ValueError(f"{section}.resources.{role} asks for {res.num_cpus} CPUs and {res.num_gpus} GPUs; give "
                         f"it num_cpus > 0 (fractions are fine) or num_gpus > 0")
    bad = {k: v for k, v in res.resources.items() if k in ("CPU", "GPU", "memory") or not v > 0}
    if bad:
        raise ValueError(f"{section}.resources.{role}.resources {bad} is not a custom resource amount > 0; use "
                         f"num_cpus/num_gpus for CPU and GPU, and positive amounts")
    bundle = {"CPU": float(res.num_cpus), **{k: float(v) for k, v in res.resources.items()}}
    if res.num_gpus > 0:
        bundle["GPU"] = float(res.num_gpus)
    return bundle


Role = tuple[str, ActorResources, str]  # (actor name, its resources, its key under <section>.resources)


def _place_roles(roles: list[Role], res: RLResources, section: str, name: str) -> Any:
    """A PACK placement group with one bundle per role, ready within res.placement_timeout_s, or PlacementError."""
    import ray
    from ray.exceptions import GetTimeoutError
    from ray.util.placement_group import placement_group, remove_placement_group

    bundles = [_bundle(r, key, section) for _, r, key in roles]
    pg = placement_group(bundles, strategy="PACK", name=name)
    try:
        ray.get(pg.ready(), timeout=res.placement_timeout_s)
    except GetTimeoutError:
        remove_placement_group(pg)
        cpus, gpus = sum(b["CPU"] for b in bundles), sum(b.get("GPU", 0.0) for b in bundles)
        free = ray.available_resources()
        custom: dict[str, float] = {}
        for b in bundles:
            for k, v in b.items():
                if k not in ("CPU", "GPU"):
                    custom[k] = custom.get(k, 0.0) + v
        extra = "".join(f" and {v:g} '{k}' (free: {free.get(k, 0):g})" for k, v in custom.items())
        raise PlacementError(f"the {len(bundles)} RL actors need {cpus:g} CPUs and {gpus:g} GPUs{extra} but only "
                             f"{free.get('CPU', 0):g} CPUs and {free.get('GPU', 0):g} GPUs were free within "
                             f"{res.placement_timeout_s:g} s; lower {section}.resources.*.num_cpus/num_gpus or "
                             f"{section}.num_learners/num_generators/resources.*.shards") from None
    return pg


def _role_options(roles: list[Role], res: RLResources, pg: Any, name_prefix: str) -> Callable[[int], dict]:
    """options(index) for `ActorClass.options(...)`: the role's name, resources, bundle and restarts.

    Every role also re-runs the task it died in (max_task_retries), which is safe: the frozen roles compute the
    same thing again, a restarted generator refuses to generate until it is sent weights (`ActorRestartedError`:
    the loops send it the current ones and call again), and a restarted lone learner refuses work
    (`LearnerLostError`) until a checkpoint is restored. `start_learners` turns restarts off for grouped learners."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    def options(index: int) -> dict:
        name, r, _ = roles[index]
        return dict(name=f"{name_prefix}{name}", num_cpus=r.num_cpus, num_gpus=r.num_gpus,
                    resources=dict(r.resources), max_restarts=res.max_restarts, max_task_retries=res.max_restarts,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index))

    return options


def _await_ready(actors: RLActors, roles: list[Role], name_prefix: str) -> RLActors:
    """Wait until every role has built its model (learners: joined their group, loaded their shards); on failure
    kill them all."""
    handles = list(actors.names.values())
    try:  # construction errors (bad checkpoint, OOM) surface here, named by role
        for (name, _, _), handle in zip(roles, handles, strict=True):
            actors.get(handle.__ray_ready__.remote(), f"starting {name_prefix}{name}")
    except Exception as e:
        shutdown_rl_actors(actors)
        if isinstance(e, ActorCallError):
            raise
        raise ActorCallError(f"starting the RL actors failed: {str(e).strip().splitlines()[-1]}") from e
    return actors


def _device(cfg: PipelineConfig, r: ActorResources) -> str:
    return "cuda" if cfg.device == "cuda" and r.num_gpus > 0 else "cpu"


def _threads(cfg: PipelineConfig, r: ActorResources) -> int:
    """The role's torch intra-op threads: its `threads`, else threads_per_worker."""
    return r.threads or cfg.threads_per_worker


def _frozen_roles(name: str, res: FrozenResources, key: str) -> list[Role]:
    """A frozen role's bundles: one named `name`, or `name-<i>` per shard."""
    if res.shards == 1:
        return [(name, res, key)]
    return [(f"{name}-{i}", res, key) for i in range(res.shards)]


def _scorer_roles(res: RLResources) -> list[Role]:
    return [*_frozen_roles("reward-helpfulness", res.reward, "reward"),
            *_frozen_roles("reward-safety", res.reward, "reward")]


def _rendezvous(options: Callable[[int], dict], first: int, timeout_s: float) -> str:
    """rank 0's tcp:// init_method for a group whose rank 0 is bundle `first`: a zero-CPU task scheduled like rank 0
    (its placement-group bundle, so its node) picks a free port there."""
    import ray

    from actors.policy import free_address

    strategy = options(first).get("scheduling_strategy")
    task = ray.remote(num_cpus=0)(free_address)
    if strategy is not None:
        task = task.options(scheduling_strategy=strategy)
    return ray.get(task.remote(), timeout=timeout_s)


def start_frozen(actor_class: Any, shards: int, options: Callable[[int], dict], first: int, *args: Any,
                 timeout_s: float, **kwargs: Any) -> list[Any]:
    """A frozen role's actors at bundles first .. first + shards - 1: one plain actor, or `shards` ranks of one
    FSDP2 group (rank, world size, rendezvous; no restarts: a new process cannot join the old group). Returns at
    once; each constructor loads its shard in its actor."""
    if shards == 1:
        return [actor_class.options(**options(first)).remote(*args, **kwargs)]
    init_method = _rendezvous(options, first, timeout_s)
    return [actor_class.options(**{**options(first + rank), "max_restarts": 0, "max_task_retries": 0}).remote(
        *args, rank=rank, world_size=shards, init_method=init_method, timeout_s=timeout_s, **kwargs)
        for rank in range(shards)]


def _start_scorers_and_generators(cfg: PipelineConfig, res: RLResources, options: Callable[[int], dict], first: int,
                                  policy_dir: str | Path, engine: str, count: int, reward_helpfulness_dir: str | Path,
                                  reward_safety_dir: str | Path) -> tuple[list[Any], list[Any], list[Any]]:
    """The two reward scorers' actors (`res.reward.shards` each) from bundle `first` on (weights in
    `param_dtype(cfg.train, their device)`) and `count` generators on `policy_dir` after them."""
    from actors.reward import RewardScorerActor
    from actors.rollout import RolloutGeneratorActor

    reward_device, n = _device(cfg, res.reward), res.reward.shards
    dtype = param_dtype(cfg.train, reward_device)
    reward_h, reward_s = (
        start_frozen(RewardScorerActor, n, options, first + i * n, kind, model_dir, device=reward_device,
                     dtype=dtype, threads=_threads(cfg, res.reward), timeout_s=res.call_timeout_s)
        for i, (kind, model_dir) in enumerate((("helpfulness", reward_helpfulness_dir),
                                               ("safety", reward_safety_dir))))
    generators = [RolloutGeneratorActor.options(**options(first + 2 * n + i)).remote(
        policy_dir, engine, device=_device(cfg, res.rollout), threads=_threads(cfg, res.rollout), vllm=cfg.vllm)
        for i in range(count)]
    return reward_h, reward_s, generators


def _ready_group(roles: list[Role], res: RLResources, pg: Any, name_prefix: str, *, learners: list[Any],
                 reference: list[Any], reward_h: list[Any], reward_s: list[Any], generators: list[Any],
                 rebuild_learners: Callable[[RLActors], None] | None = None) -> RLActors:
    """The `RLActors` over the started handles (in `roles` order; a frozen role's actors: one, or its ranks),
    once every one is ready."""
    handles = [*learners, *reference, *reward_h, *reward_s, *generators]
    actors = RLActors(learners=learners, reference=frozen_handle(reference) if reference else None,
                      reward_helpfulness=frozen_handle(reward_h), reward_safety=frozen_handle(reward_s),
                      generators=generators, call_timeout_s=res.call_timeout_s, placement_group=pg,
                      retries=res.max_restarts, max_recoveries=res.max_restarts,
                      names={f"{name_prefix}{name}": h for (name, _, _), h in zip(roles, handles, strict=True)},
                      rebuild_learners=rebuild_learners)
    return _await_ready(actors, roles, name_prefix)


def start_learners(n: int, options: Callable[[int], dict], policy_dir: str | Path, value_dir: str | Path | None,
                   ppo: PPOConfig | None, *, rendezvous_timeout_s: float = 120.0, **learner_kwargs: Any) -> list[Any]:
    """N `PolicyLearnerActor`s, rank i created with `options(i)` and `learner_kwargs` (seed, device, threads,
    param_dtype, ...); returns at once (each constructor runs in its actor: wait on `__ray_ready__`).

    With N > 1 they form one FSDP2 group: a zero-CPU task scheduled like rank 0 (its placement-group bundle, so
    its node) picks a free port for the tcp rendezvous, and no rank is restarted by Ray (see module docstring)."""
    from actors.policy import PolicyLearnerActor

    init_method = _rendezvous(options, 0, rendezvous_timeout_s) if n > 1 else None
    handles = []
    for rank in range(n):
        opts = options(rank)
        if n > 1:
            opts = {**opts, "max_restarts": 0, "max_task_retries": 0}
        handles.append(PolicyLearnerActor.options(**opts).remote(
            policy_dir, value_dir, ppo, rank=rank, world_size=n, init_method=init_method, **learner_kwargs))
    return handles


def _wait_dead(handles: list[Any], timeout_s: float = 60.0) -> None:
    """Until every killed actor in `handles` is reported dead (its bundle and name are free), at most timeout_s."""
    import ray
    from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError

    deadline = time.monotonic() + timeout_s
    for handle in handles:
        while time.monotonic() < deadline:
            try:
                ray.get(handle.__ray_ready__.remote(), timeout=1.0)
            except (RayActorError, ActorDiedError, ActorUnavailableError):
                break
            except GetTimeoutError:
                continue
            time.sleep(0.05)


def _learner_rebuilder(start: Callable[[], list[Any]], names: list[str]) -> Callable[[RLActors], None]:
    """`RLActors.rebuild_learners` for a learner group: kill every rank (by name: the loop may hold wrapped
    handles), wait until they are gone, start a new group with `start()` under the same names and wait until it
    has loaded its shards."""

    def rebuild(actors: RLActors) -> None:
        import ray

        old = [actors.names[name] for name in names]
        for handle in old:
            try:
                ray.kill(handle, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead is fine
                pass
        _wait_dead(old)
        new = start()
        actors.names.update(zip(names, new, strict=True))
        actors.learners = list(new)
        for name, handle in zip(names, new, strict=True):
            actors.get_learners(handle.__ray_ready__.remote(), f"starting {name}")

    return rebuild


def _learner_kwargs(cfg: PipelineConfig, res: RLResources) -> dict[str, Any]:
    device = _device(cfg, res.learner)
    return dict(seed=cfg.seed, device=device, threads=_threads(cfg, res.learner),
                param_dtype=param_dtype(cfg.train, device),
                activation_checkpointing=cfg.train.activation_checkpointing,
                reshard_after_forward=cfg.train.reshard_after_forward, timeout_s=res.call_timeout_s)


def create_rl_actors(cfg: PipelineConfig, policy_dir: str | Path, reference_dir: str | Path,
                     reward_helpfulness_dir: str | Path, reward_safety_dir: str | Path, *,
                     name_prefix: str = "") -> RLActors:
    """Start the RL roles as Ray actors (ray.init must have run) and wait until each has loaded its model."""
    from actors.reference import ReferenceModelActor

    ppo, res = cfg.ppo, cfg.ppo.resources
    _require(policy_dir, "policy (SFT)", "sft")
    _require(reference_dir, "reference (SFT)", "sft")
    _require(reward_helpfulness_dir, "helpfulness reward", "reward")
    _require(reward_safety_dir, "safety reward", "reward")
    roles = ([(f"policy-learner-{i}", res.learner, "learner") for i in range(ppo.num_learners)]
             + _frozen_roles("reference", res.reference, "reference") + _scorer_roles(res)
             + [(f"rollout-{i}", res.rollout, "rollout") for i in range(ppo.num_generators)])
    pg = _place_roles(roles, res, "ppo", f"{name_prefix}rl-actors")
    options = _role_options(roles, res, pg, name_prefix)

    n, m = ppo.num_learners, ppo.num_generators

    def learners_now() -> list[Any]:
        return start_learners(n, options, policy_dir, reward_helpfulness_dir, ppo,
                              micro_batch_size=ppo.micro_batch_size, **_learner_kwargs(cfg, res))

    learners = learners_now()
    reference_device = _device(cfg, res.reference)
    reference = start_frozen(ReferenceModelActor, res.reference.shards, options, n, reference_dir,
                             device=reference_device, dtype=param_dtype(cfg.train, reference_device),
                             threads=_threads(cfg, res.reference),
                             timeout_s=res.call_timeout_s)
    reward_h, reward_s, generators = _start_scorers_and_generators(
        cfg, res, options, n + res.reference.shards, policy_dir, ppo.engine, m, reward_helpfulness_dir,
        reward_safety_dir)
    rebuild = _learner_rebuilder(learners_now, [f"{name_prefix}{roles[i][0]}" for i in range(n)]) if n > 1 else None
    return _ready_group(roles, res, pg, name_prefix, learners=learners, reference=reference, reward_h=reward_h,
                        reward_s=reward_s, generators=generators, rebuild_learners=rebuild)


def create_rejection_actors(cfg: PipelineConfig, policy_dir: str | Path, reward_helpfulness_dir: str | Path,
                            reward_safety_dir: str | Path, *, name_prefix: str = "") -> RLActors:
    """Start the roles rejection sampling needs as Ray actors: rejection.num_learners policy-only learners (one
    FSDP2 group; sft_optim = rejection.optim), both reward scorers, rejection.num_generators generators on
    `policy_dir`; no reference."""
    rej, res = cfg.rejection, cfg.rejection.resources
    _require(policy_dir, "policy (SFT)", "sft")
    _require(reward_helpfulness_dir, "helpfulness reward", "reward")
    _require(reward_safety_dir, "safety reward", "reward")
    if rej.num_generators < 1:
        raise ValueError(f"rejection.num_generators {rej.num_generators} must be >= 1")
    n = rej.num_learners
    roles = ([(f"policy-learner-{i}", res.learner, "learner") for i in range(n)]
             + _scorer_roles(res) + [(f"rollout-{i}", res.rollout, "rollout") for i in range(rej.num_generators)])
    pg = _place_roles(roles, res, "rejection", f"{name_prefix}rejection-actors")
    options = _role_options(roles, res, pg, name_prefix)

    def learners_now() -> list[Any]:
        return start_learners(n, options, policy_dir, None, None, micro_batch_size=rej.micro_batch_size,
                              sft_optim=rej.optim, **_learner_kwargs(cfg, res))

    learners = learners_now()
    reward_h, reward_s, generators = _start_scorers_and_generators(
        cfg, res, options, n, policy_dir, rej.engine, rej.num_generators, reward_helpfulness_dir, reward_safety_dir)
    rebuild = _learner_rebuilder(learners_now, [f"{name_prefix}{roles[i][0]}" for i in range(n)]) if n > 1 else None
    return _ready_group(roles, res, pg, name_prefix, learners=learners, reference=[], reward_h=reward_h,
                        reward_s=reward_s, generators=generators, rebuild_learners=rebuild)


def create_gatt_actors(cfg: PipelineConfig, policy_dir: str | Path, reward_helpfulness_dir: str | Path,
                       reward_safety_dir: str | Path, *, name_prefix: str = "gatt-") -> RLActors:
    """Start the roles a GAtt round samples with: gatt.num_generators generators on `policy_dir` and both reward
    scorers, resources from `gatt.resources`; no learner, no reference."""
    g, res = cfg.gatt, cfg.gatt.resources
    _require(policy_dir, "GAtt policy", "sft")
    _require(reward_helpfulness_dir, "helpfulness reward", "reward")
    _require(reward_safety_dir, "safety reward", "reward")
    roles = _scorer_roles(res) + [(f"rollout-{i}", res.rollout, "rollout") for i in range(g.num_generators)]
    pg = _place_roles(roles, res, "gatt", f"{name_prefix}actors")
    options = _role_options(roles, res, pg, name_prefix)
    reward_h, reward_s, generators = _start_scorers_and_generators(
        cfg, res, options, 0, policy_dir, g.engine, g.num_generators, reward_helpfulness_dir, reward_safety_dir)
    return _ready_group(roles, res, pg, name_prefix, learners=[], reference=[], reward_h=reward_h,
                        reward_s=reward_s, generators=generators)


def _require_unsharded(res: RLResources, section: str) -> None:
    """Local roles are plain objects in this process: one whole model each."""
    for key in ("reference", "reward"):
        shards = getattr(res, key).shards
        if shards != 1:
            raise ValueError(f"local RL actors hold whole models, got {section}.resources.{key}.shards={shards}; use "
                             f"Ray actors or shards=1")


def create_local_rl_actors(cfg: PipelineConfig, policy_dir: str | Path, reference_dir: str | Path,
                           reward_helpfulness_dir: str | Path, reward_safety_dir: str | Path) -> RLActors:
    """The same roles as plain objects in this process (one learner, one generator): tests and benches."""
    from actors.policy import PolicyLearner
    from actors.reference import ReferenceModel
    from actors.reward import RewardScorer
    from actors.rollout import RolloutGenerator

    if cfg.ppo.num_learners != 1:
        raise ValueError(f"local RL actors support ppo.num_learners=1, got {cfg.ppo.num_learners}; use Ray actors")
    _require_unsharded(cfg.ppo.resources, "ppo")
    dtype = param_dtype(cfg.train, cfg.device)
    learner = PolicyLearner(policy_dir, reward_helpfulness_dir, cfg.ppo, seed=cfg.seed, device=cfg.device,
                            micro_batch_size=cfg.ppo.micro_batch_size, param_dtype=dtype,
                            activation_checkpointing=cfg.train.activation_checkpointing)
    return local_actors(
        learners=[learner],
        reference=ReferenceModel(reference_dir, device=cfg.device, dtype=dtype),
        reward_helpfulness=RewardScorer("helpfulness", reward_helpfulness_dir, device=cfg.device, dtype=dtype),
        reward_safety=RewardScorer("safety", reward_safety_dir, device=cfg.device, dtype=dtype),
        generators=[RolloutGenerator(policy_dir, cfg.ppo.engine, device=cfg.device, vllm=cfg.vllm)
                    for _ in range(cfg.ppo.num_generators)],
    )


def create_local_rejection_actors(cfg: PipelineConfig, policy_dir: str | Path, reward_helpfulness_dir: str | Path,
                                  reward_safety_dir: str | Path) -> RLActors:
    """The rejection-sampling roles as plain objects in this process (reference None): tests and benches."""
    from actors.policy import PolicyLearner
    from actors.reward import RewardScorer
    from actors.rollout import RolloutGenerator

    rej, dtype = cfg.rejection, param_dtype(cfg.train, cfg.device)
    if rej.num_learners != 1:
        raise ValueError(f"local rejection actors support rejection.num_learners=1, got {rej.num_learners}; use "
                         f"Ray actors")
    _require_unsharded(rej.resources, "rejection")
    learner = PolicyLearner(policy_dir, None, None, seed=cfg.seed, device=cfg.device,
                            micro_batch_size=rej.micro_batch_size, sft_optim=rej.optim, param_dtype=dtype,
                            activation_checkpointing=cfg.train.activation_checkpointing)
    return local_actors(
        learners=[learner], reference=None,
        reward_helpfulness=RewardScorer("helpfulness", reward_helpfulness_dir, device=cfg.device, dtype=dtype),
        reward_safety=RewardScorer("safety", reward_safety_dir, device=cfg.device, dtype=dtype),
        generators=[RolloutGenerator(policy_dir, rej.engine, device=cfg.device, vllm=cfg.vllm)
                    for _ in range(rej.num_generators)],
    )


def shutdown_rl_actors(actors: RLActors) -> None:
    """Kill the Ray actors (no restarts) and free their placement group; a no-op for local actors."""
    if actors.local:
        return
    import ray
    from ray.util.placement_group import remove_placement_group

    for handle in actors.names.values():
        try:
            ray.kill(handle, no_restart=True)
        except Exception:  # noqa: BLE001 - already dead is fine
            pass
    if actors.placement_group is not None:
        remove_placement_group(actors.placement_group)
