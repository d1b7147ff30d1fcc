"""RolloutGenerator: samples responses for PPO with a `GenerationEngine`, and takes the learner's new weights.

Every `Completion` carries the weight version that produced it. `update_weights(state, version, checksum)`
refuses a version older than the one held (`StaleWeightsError`) and a state whose `weights_checksum` differs from
the sender's (`WeightChecksumError`), then loads the weights and records the version.

Engines (rayllama.engines.make_engine): "torch" (rayllama.generation.TorchEngine), "vllm" (rayllama.vllm_engine,
in-process vLLM with in-place weight reloads), "auto" (vLLM when importable and able to run the model).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from rayllama.engines import engine_model_config, make_engine
from rayllama.generation import Completion, SamplingParams
from rayllama.rl.actors_api import (
    ActorRestartedError,
    StaleWeightsError,
    WeightChecksumError,
    checksums_match,
    weights_checksum,
)


def _as_tensor(value: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A tensor over the received array without copying (Ray hands out read-only numpy views)."""
    if isinstance(value, torch.Tensor):
        return value
    with warnings.catch_warnings():  # read-only is fine: load_weights only reads it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(value)


class RolloutGenerator:
    """Samples PPO rollouts from the latest policy weights it was sent."""

    def __init__(self, model_dir: str | Path, engine: str = "torch", *, device: str = "cpu",
                 max_batch_size: int = 64, threads: int | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.engine = make_engine(engine, model_dir, device, max_batch_size=max_batch_size)
        self.model_cfg = engine_model_config(self.engine)

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Completion]]:
        """`params.n` completions per prompt; each carries `weight_version`."""
        return self.engine.generate(prompt_ids, params)

    def update_weights(self, state: Mapping[str, Any], version: int, checksum: float) -> int:
        """Load `state` as weight `version` after checking it is not stale and its checksum matches."""
        current = self.engine.weight_version
        if version < current:
            raise StaleWeightsError(f"weight version {version} is older than the generator's {current}; "
                                    f"send the learner's latest weights")
        received = weights_checksum(state)
        if not checksums_match(received, checksum):
            raise WeightChecksumError(f"weights for version {version} have checksum {received!r} but the sender "
                                      f"computed {checksum!r}; the transfer is corrupt, send them again")
        self.engine.load_weights({k: _as_tensor(v) for k, v in state.items()}, version)
        return version

    def version(self) -> int:
        return self.engine.weight_version

    def max_seq_len(self) -> int:
        """Longest prompt + response the engine's model takes."""
        return self.model_cfg.max_seq_len


@ray.remote
class RolloutGeneratorActor(RolloutGenerator):
    """Ray shell (one process per generator); `update_weights` receives the state Ray resolved from one ref.

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

    def update_weights(self, state: Mapping[str, Any], version: int, checksum: float) -> int:
        version = super().update_weights(state, version, checksum)
        self.restarted = False
        return version

    def version(self) -> int:
        return -1 if self.restarted else super().version()
