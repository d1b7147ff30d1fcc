"""The handles the RL loops drive (`RLActors`), the weight-sync contract, and the errors of both.

`rl/` never imports `actors/`: the driver builds an `RLActors` with `actors.group.create_rl_actors` (Ray actors)
or `actors.group.create_local_rl_actors` / `local_actors` (plain objects in this process, for tests and benches),
and the loops call methods by name on its handles, Ray-style:

    refs = [g.generate.remote(prompts, params) for g in actors.generators]
    results = actors.get(refs, "generate")

A `LocalHandle` runs `obj.method(*args)` at `.remote()` time and returns the result itself, which
`RLActors.get` passes through, so the same loop code runs with and without Ray.

Weight sync (rayllama.rl.weight_sync): learner rank 0 broadcasts the policy to the generators over a process group
of their own (gloo on CPU, NCCL on GPU), in buckets, labelled with a version that increases with every update, and
every `ppo.verify_weights_every`-th update with a blake2b digest per bucket. A generator refuses a version older
than its own (`StaleWeightsError`) and buckets whose digest differs (`WeightChecksumError`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

T = TypeVar("T")
log = logging.getLogger("rayllama")

TRAIN_STATE = "train_state"  # a PPO checkpoint's sharded learner state (DCP), `PolicyLearner.save(<dir>)` writes


class StaleWeightsError(ValueError):
    """A weight update older than the weights a generator already holds."""


class WeightChecksumError(ValueError):
    """Received weights whose digest differs from the one the sender computed (corrupt or mixed-up tensors)."""


class StaleRolloutError(RuntimeError):
    """Rollouts produced by weights other than the latest ones pushed to the generators."""


class ActorCallError(RuntimeError):
    """A remote call that timed out or whose actor died more often than the retries allow."""


class ActorRestartedError(RuntimeError):
    """A restarted actor that must be brought up to date before it serves (a generator: sent the current weights).
    `RLActors.call` treats it like a death: it runs `before_retry` and re-issues the call."""


class LearnerLostError(ActorCallError):
    """A policy learner died (Ray restarts it with fresh SFT weights) or was restarted without its training state:
    the loop restores the learners from the last checkpoint and redoes the iterations after it."""


# ---------------------------------------------------------------------------------------------- weights


def state_to_numpy(state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray | torch.Tensor]:
    """CPU numpy views of a state dict's tensors (what Ray ships zero-copy); dtypes numpy lacks (bf16) stay
    tensors."""
    out: dict[str, np.ndarray | torch.Tensor] = {}
    for name, tensor in state.items():
        t = tensor.detach().cpu().contiguous()
        out[name] = t if t.dtype == torch.bfloat16 else t.numpy()
    return out


# ---------------------------------------------------------------------------------------------- handles


class _LocalMethod:
    def __init__(self, method: Callable[..., Any]) -> None:
        self._method = method

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        """Run now; the result stands in for the ObjectRef Ray would return."""
        return self._method(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._method(*args, **kwargs)


class LocalHandle:
    """A plain object behind the handle interface: `h.method.remote(*args)` == `obj.method(*args)`, evaluated now."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __getattr__(self, name: str) -> _LocalMethod:
        return _LocalMethod(getattr(self.obj, name))

    def __repr__(self) -> str:
        return f"LocalHandle({type(self.obj).__name__})"


def concat_shares(*shares: Any) -> Any:
    """The ranks' results of one call in rank order: (b_i, A) tensors concatenated on rows, or lists joined."""
    if isinstance(shares[0], torch.Tensor):
        return torch.cat(shares)
    return [x for share in shares for x in share]


class _ShardedMethod:
    def __init__(self, handles: list[Any], name: str) -> None:
        self._handles, self._name = handles, name

    def remote(self, *args: Any) -> Any:
        """Call the method on every rank with the same arguments (put once in the object store); one ref to the
        ranks' results concatenated in rank order (a zero-CPU task that waits for all of them)."""
        import ray

        args = tuple(a if isinstance(a, ray.ObjectRef) else ray.put(a) for a in args)
        refs = [getattr(h, self._name).remote(*args) for h in self._handles]
        return _concat_task().remote(*refs)


@functools.cache
def _concat_task() -> Any:
    import ray

    return ray.remote(num_cpus=0)(concat_shares)


class ShardedHandle:
    """The N ranks of a sharded frozen role (the reference, a reward scorer: one FSDP2 group) behind one handle:
    `h.logprobs.remote(batch)` / `h.score.remote(pairs)` calls every rank with the whole batch, each computes its
    contiguous share of the rows (rayllama.rl.experience.rank_rows), and the one returned ref holds the results
    in the original row order, what the single actor returns. A rank that died fails the call (its error is the
    ref's); grouped ranks are not restarted (a new process cannot join the old process group)."""

    def __init__(self, handles: list[Any]) -> None:
        self.handles = list(handles)

    def __getattr__(self, name: str) -> _ShardedMethod:
        if name.startswith("__"):
            raise AttributeError(name)
        return _ShardedMethod(self.handles, name)

    def __repr__(self) -> str:
        return f"ShardedHandle({len(self.handles)} ranks)"


def frozen_handle(handles: list[Any]) -> Any:
    """The handle the loops call for a frozen role: its actor, or a ShardedHandle over its ranks."""
    return handles[0] if len(handles) == 1 else ShardedHandle(handles)


@dataclass
class RLActors:
    """The RL roles the loops drive: Ray actor handles, or `LocalHandle`s when `local`.

    learners[0] is rank 0 of the learner group (its `weights` carry the state); every call that runs a learner's
    forward or gathers its weights goes to all learners (they are one FSDP2 group). Generators are called
    round-robin. `rebuild_learners(actors)` (Ray groups of more than one learner) kills the learner group and
    starts a fresh one in the same placement-group bundles, replacing `learners` (and their `names`).
    """

    learners: list[Any]  # PolicyLearner handles, rank order
    reference: Any  # ReferenceModel (a ShardedHandle over its ranks when sharded)
    reward_helpfulness: Any  # RewardScorer(kind="helpfulness") (or a ShardedHandle)
    reward_safety: Any  # RewardScorer(kind="safety") (or a ShardedHandle)
    generators: list[Any]  # RolloutGenerator handles
    local: bool = False
    call_timeout_s: float | None = None  # None: wait forever
    retries: int = 1  # re-issues of a call whose actor died (it restarts, see max_restarts)
    max_recoveries: int = 3  # learner losses a loop recovers from (restore the last checkpoint) before it gives up
    placement_group: Any = None  # the group holding the Ray actors (removed by shutdown_rl_actors)
    names: dict[str, Any] = field(default_factory=dict)  # actor name -> handle, for logs and fault injection
    rebuild_learners: Callable[[RLActors], None] | None = None  # new learner group after a lost rank (or None)
    peer_grace_s: float = 30.0  # how long a failed learner call waits for the other ranks' fate (see get_learners)
    weight_sync: Any = None  # rayllama.rl.weight_sync.WeightSync, made by the loop on its first weight update

    def put(self, value: T) -> T:
        """One copy in the object store that every later call reads (local: the value itself)."""
        if self.local:
            return value
        import ray

        return ray.put(value)

    def get(self, refs: Any, what: str) -> Any:
        """Wait for a ref or a list of refs at most `call_timeout_s`; `what` names the call in errors. No re-issue
        (Ray itself re-runs a task whose actor died and restarted, see actors.group)."""
        if self.local:
            return refs
        import ray
        from ray.exceptions import GetTimeoutError

        try:
            return ray.get(refs, timeout=self.call_timeout_s)
        except GetTimeoutError:
            raise ActorCallError(f"{what} did not answer within {self.call_timeout_s:.0f} s; raise "
                                 f"ppo.resources.call_timeout_s or look at the actor's log") from None

    def get_learners(self, refs: Any, what: str) -> Any:
        """`get` for calls on the learners, never re-issued: a learner that died raises `LearnerLostError` (the
        loops recover by restoring the last checkpoint), as does a restarted one, which refuses work.

        A list of calls (one per rank of the group) fails fast: the first error is raised without waiting for
        the other ranks, which may sit in a collective with the lost one. A rank that failed in a collective
        because a peer died (gloo: "Connection closed by peer") is no bug of its own: when one of the other ranks
        turns out dead within `peer_grace_s`, the error is that `LearnerLostError`."""
        if self.local:
            return refs
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        lost = (RayActorError, ActorDiedError, ActorUnavailableError)
        try:
            if not isinstance(refs, list) or len(refs) < 2:
                return self.get(refs, what)
            return self._get_fail_fast(refs, what)
        except lost as e:
            raise LearnerLostError(f"{what} failed: a policy learner died ({type(e).__name__})") from e

    def _get_fail_fast(self, refs: list[Any], what: str) -> list[Any]:
        import time

        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        lost = (RayActorError, ActorDiedError, ActorUnavailableError)
        deadline = None if self.call_timeout_s is None else time.monotonic() + self.call_timeout_s
        pending = list(refs)
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, pending = ray.wait(pending, num_returns=1, timeout=left)
            if not ready:
                raise ActorCallError(f"{what} did not answer within {self.call_timeout_s:.0f} s; raise "
                                     f"ppo.resources.call_timeout_s or look at the actor's log") from None
            try:
                ray.get(ready[0])
            except lost:
                raise
            except Exception as error:
                if pending:  # did a peer die? then that is the cause of this rank's failure
                    done, _ = ray.wait(pending, num_returns=len(pending), timeout=self.peer_grace_s)
                    for ref in done:
                        try:
                            ray.get(ref)
                        except lost as death:
                            raise death from error
                        except Exception:  # noqa: BLE001 - another rank's own failure: the first error stands
                            pass
                raise
        return ray.get(refs)

    def call(self, issue: Callable[[], Any], what: str, before_retry: Callable[[], None] | None = None) -> Any:
        """`get(issue(), what)`, re-issuing the calls up to `retries` times when an actor died (Ray restarts it);
        `before_retry()` runs before each re-issue (e.g. to send a restarted generator the current weights).
        For calls that are safe to repeat on a fresh actor (generation, scoring, reference log-probs)."""
        if self.local:
            return issue()
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        attempt = 0
        while True:
            try:
                return self.get(issue(), what)
            except (RayActorError, ActorDiedError, ActorUnavailableError, ActorRestartedError) as e:
                attempt += 1
                if attempt > self.retries:
                    raise ActorCallError(f"{what} failed: an actor died {attempt} time(s) ({type(e).__name__}); "
                                         f"see its log") from e
                log.warning(f"{what}: an actor died or restarted ({type(e).__name__}); retry {attempt} of "
                            f"{self.retries}")
                if before_retry is not None:
                    before_retry()


def local_actors(learners: list[Any], reference: Any, reward_helpfulness: Any, reward_safety: Any,
                 generators: list[Any]) -> RLActors:
    """`RLActors` over plain objects (real role classes or stand-ins with the same methods), in this process."""
    return RLActors(learners=[LocalHandle(x) for x in learners], reference=LocalHandle(reference),
                    reward_helpfulness=LocalHandle(reward_helpfulness), reward_safety=LocalHandle(reward_safety),
                    generators=[LocalHandle(x) for x in generators], local=True)
