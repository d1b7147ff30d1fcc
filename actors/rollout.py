"""RolloutGenerator: samples responses for PPO with a `GenerationEngine`, and takes the learner's new weights.

Every `Completion` carries the weight version that produced it. Weights arrive over the weight-sync group
(rayllama.rl.weight_sync): `join_weight_sync` makes this generator a member (learner rank 0 sends; the torch engine
is one rank, in this process; a vLLM engine joins with each of its workers through vLLM's weight-transfer API),
`receive_weights` takes one update: the header (names, shapes, version) is checked first (a version older than the
one held: `StaleWeightsError`, after the update is drained so the group stays in step), then each bucket's tensors
are copied into the engine as they arrive, then the digests, when the update carries them, are checked
(`WeightChecksumError`). A generator whose update failed part-way holds mixed weights: it reports version -1 and
refuses to generate until it is sent a whole update.

Engines (rayllama.engines.make_engine): "torch" (rayllama.generation.TorchEngine), "vllm" (rayllama.vllm_engine,
in-process vLLM with in-place weight reloads, built from the config's `vllm:` section), "auto" (vLLM when
importable and able to run the model).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray
import torch

from rayllama import storage
from rayllama.config import VLLMSettings
from rayllama.engines import engine_model_config, make_engine
from rayllama.generation import Completion, SamplingParams
from rayllama.rl.actors_api import ActorRestartedError, StaleWeightsError
from rayllama.rl.weight_sync import Incoming, SyncMember, WeightSyncError, check_header, place_of, receive
from rayllama.vllm_engine import expected_shapes


class RolloutGenerator:
    """Samples PPO rollouts from the latest policy weights it was sent."""

    def __init__(self, model_dir: str | Path, engine: str = "torch", *, device: str = "cpu",
                 max_batch_size: int = 64, threads: int | None = None, vllm: VLLMSettings | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.device = device
        model_dir = storage.local_dir(model_dir)  # a URI: this node's copy of the run's checkpoint
        self.engine = make_engine(engine, model_dir, device, max_batch_size=max_batch_size, vllm=vllm)
        self.model_cfg = engine_model_config(self.engine)
        self.shapes = expected_shapes(self.model_cfg)
        self.sync: SyncMember | None = None  # the torch engine's end of the weight-sync group
        self.generation = 0  # the weight-sync group this generator is in (0: none)
        self.torn = False  # an update failed part-way: mixed weights, refuse to serve
        self.asleep = False  # the engine freed its accelerator memory (`sleep`)

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Completion]]:
        """`params.n` completions per prompt; each carries `weight_version`."""
        if self.torn:
            raise ActorRestartedError("this rollout generator's last weight update failed part-way (mixed "
                                      "weights); send it the current weights first")
        self._wake()
        return self.engine.generate(prompt_ids, params)

    def sleep(self) -> bool:
        """Free the engine's accelerator memory (weights and KV cache) while a learner on the same GPUs trains
        (vllm.enable_sleep_mode); the next update or generate wakes it. False for an engine that cannot sleep
        (the torch engine)."""
        if not hasattr(self.engine, "sleep"):
            return False
        if not self.asleep:
            self.engine.sleep()
            self.asleep = True
        return True

    def _wake(self) -> None:
        if self.asleep:
            self.engine.wake_up()
            self.asleep = False

    def weight_dtype(self) -> str:
        """The engine's weight dtype (what `ppo.weight_sync.dtype: auto` sends)."""
        dtype = getattr(self.engine, "dtype", None)
        if dtype is None:
            dtype = next(self.engine.model.parameters()).dtype
        return str(dtype).removeprefix("torch.")

    def weight_sync_places(self) -> list[dict[str, Any]]:
        """Where each rank this generator takes in the weight-sync group lives (rayllama.rl.weight_sync.place_of):
        one rank, or one per vLLM worker (its engine joins the group itself: tensor_parallel_size)."""
        return self.engine.weight_sync_places() if self._engine_transfers else [place_of(self.device)]

    @property
    def _engine_transfers(self) -> bool:
        """vLLM's engine takes updates through vLLM's weight-transfer API, in its own workers."""
        return hasattr(self.engine, "receive_weight_sync")

    def join_weight_sync(self, address: Any, rank: int, size: int, backend: Any, timeout_s: float,
                         generation: int) -> str:
        """Become ranks `rank`.. of weight-sync group `generation` (blocks until every member joined); returns
        the engine's dtype."""
        self.sync, self.generation = None, 0
        if self._engine_transfers:
            self.engine.join_weight_sync(address, rank, size, backend, timeout_s, generation)
        else:
            self.sync = SyncMember(address, rank, size, backend, timeout_s, generation, device=self.device)
        self.generation = generation
        return self.weight_dtype()

    def weight_sync_generation(self) -> int:
        """The weight-sync group this generator is in (0: none, e.g. after a restart)."""
        return self.generation

    def receive_weights(self, generation: int) -> int:
        """Take one update from the weight-sync group (see module docstring); returns its version."""
        if self.generation == 0 or self.generation != generation:
            raise WeightSyncError(f"this generator is not in weight-sync group {generation} (it restarted?); form "
                                  f"the group again")
        torn = self.torn
        try:
            self._wake()
            if self._engine_transfers:
                self.torn = True
                version = self.engine.receive_weight_sync(generation)
            else:
                assert self.sync is not None
                incoming = receive(self.sync)
                self._load(incoming)
                version = incoming.version
        except (ValueError, StaleWeightsError):  # a header refused (update drained, group in step) or bad digests
            if self._engine_transfers:
                self.torn = torn  # the workers check the header before they load anything
            raise
        except Exception:  # the group broke (a peer died or stalled), or a torn load: the loop forms a new group
            self.sync, self.generation = None, 0
            raise
        self.torn = False
        return version

    def _load(self, incoming: Incoming) -> None:
        """Check the update's header, copy its buckets into the engine as they arrive, check the digests."""
        try:
            check_header(incoming, self.shapes, self.engine.weight_version)
        except (ValueError, StaleWeightsError):
            incoming.finish()  # drain: the sender and the other generators go on in step
            raise
        self.torn = True
        self.engine.load_weights_stream(incoming.tensors(), incoming.version, len(self.shapes))
        incoming.finish()

    def version(self) -> int:
        return -1 if self.torn else self.engine.weight_version

    def max_seq_len(self) -> int:
        """Longest prompt + response the engine's model takes."""
        return self.model_cfg.max_seq_len


@ray.remote
class RolloutGeneratorActor(RolloutGenerator):
    """Ray shell (one process per generator).

    After a crash Ray reruns the constructor (max_restarts): the generator is back on its start checkpoint, so
    until it is sent weights it reports version -1 and refuses to generate (`ActorRestartedError`; the loops send
    it the current weights and call again). No rollout comes from weights the loop did not send."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.restarted = ray.get_runtime_context().was_current_actor_reconstructed

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Completion]]:
        if self.restarted:
            raise ActorRestartedError("this rollout generator restarted after a crash and holds its start "
                                      "checkpoint's weights; send it the current weights first")
        return super().generate(prompt_ids, params)

    def receive_weights(self, generation: int) -> int:
        version = super().receive_weights(generation)
        self.restarted = False
        return version

    def version(self) -> int:
        return -1 if self.restarted else super().version()
