"""The weight-sync protocol (rayllama.rl.weight_sync) as a vLLM weight-transfer engine, so that every vLLM worker
joins the weight-sync group itself and takes the learner's broadcast straight into its model.

vLLM 0.32's weight-transfer API is four worker calls: `init_weight_transfer_engine(init_info)`,
`start_weight_update()`, `update_weights(update_info)`, `finish_weight_update()`; the worker hands them to the engine
its `weight_transfer_config.backend` names. This module is that engine, registered (by module path, so it is
imported only where a worker builds it) as "rayllama" with vLLM's `WeightTransferEngineFactory` by
`rayllama.vllm_engine.register_weight_transfer`: in the generator's process before `vllm.LLM` is built (at
tensor_parallel_size 1 the worker runs there), and in every process vLLM starts through the `vllm.general_plugins`
entry point in pyproject.toml (vLLM loads general plugins in each worker, which is how the worker processes of
tensor_parallel_size > 1 know the engine).

    init    each worker becomes rank `rank_offset + its global worker rank` of the weight-sync group (a
            `SyncMember`: gloo on CPU, NCCL on GPU, over the TCPStore learner rank 0 serves), so a generator with
            tensor_parallel_size T is T members; no tensor passes through the generator's Ray actor
    start   vLLM's layer-wise reload begins (initialize_layerwise_reload), as its own NCCL engine does
    update  header (version, names, shapes) checked against the model's expected shapes and the version held;
            the buckets are streamed into `model.load_weights`, each worker loading its shard of every tensor
    finish  finalize_layerwise_reload (on CPU this re-packs the weights for oneDNN)

vLLM is imported at the top: import this module only where vLLM is installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from rayllama.rl.actors_api import StaleWeightsError
from rayllama.rl.weight_sync import SyncMember, WeightSyncError, check_header, place_of, receive

BACKEND = "rayllama"


@dataclass
class SyncInitInfo(WeightTransferInitInfo):
    address: Any  # "host:port" of the weight-sync group's TCPStore (learner rank 0); a LocalChannel in-process
    rank_offset: int  # this generator's first rank in the group
    world_size: int  # members of the group: learner rank 0 + every generator's workers
    backend: Any  # gloo | nccl | ipc, or {"wire": ..., "ipc": [ranks]} (rayllama.rl.weight_sync.resolve_backend)
    timeout_s: float
    generation: int  # which forming of the group


@dataclass
class SyncUpdateInfo(WeightTransferUpdateInfo):
    generation: int  # the group the update comes over
    current_version: int  # the version the generator holds (an older update is refused)
    expected_shapes: dict[str, list[int]]  # HF name -> shape of the full (unsharded) model


class SyncWeightTransferEngine(WeightTransferEngine[SyncInitInfo, SyncUpdateInfo]):
    """One vLLM worker's end of the weight-sync group."""

    init_info_cls = SyncInitInfo
    update_info_cls = SyncUpdateInfo

    def __init__(self, config: Any, vllm_config: Any, device: Any, model: Any) -> None:
        super().__init__(config, vllm_config, device, model)
        self.member: SyncMember | None = None
        self.version = -1  # the version of the last update taken

    def init_transfer_engine(self, init_info: SyncInitInfo) -> None:
        p = self.parallel_config
        rank = init_info.rank_offset + p.data_parallel_index * p.world_size + p.rank
        self.member = None
        self.member = SyncMember(init_info.address, rank, init_info.world_size, init_info.backend,
                                 init_info.timeout_s, init_info.generation, device=self.device)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def receive_weights(self, update_info: SyncUpdateInfo) -> None:
        member = self.member
        if member is None or member.generation != update_info.generation:
            self.member = None
            raise WeightSyncError(f"this vLLM worker is not in weight-sync group {update_info.generation} (it "
                                  f"restarted?); form the group again")
        try:
            incoming = receive(member)
            expected = {name: tuple(shape) for name, shape in update_info.expected_shapes.items()}
            try:
                check_header(incoming, expected, update_info.current_version)
            except (ValueError, StaleWeightsError):
                incoming.finish()  # drain: the sender and the other members go on in step
                raise
            fed = 0

            def weights() -> Any:
                nonlocal fed
                for name, tensor in incoming.tensors():  # fresh buffers: the layer-wise loader may keep them
                    yield name, tensor
                    fed += 1

            self.model.load_weights(weights())
            if fed != len(expected):
                raise RuntimeError(f"vLLM's loader took {fed} of {len(expected)} tensors; the worker holds mixed "
                                   f"weights, send the full state again")
            incoming.finish()
        except RuntimeError:  # the group broke (a peer died or stalled) or a torn load: leave the group
            self.member = None
            raise
        self.version = incoming.version

    def shutdown(self) -> None:
        self.member = None


def worker_place(worker: Any) -> dict[str, Any]:
    """Run on a vLLM worker through `collective_rpc`: where it lives (rayllama.rl.weight_sync.place_of)."""
    return place_of(worker.device)


def worker_weight_version(worker: Any) -> int:
    """Run on a vLLM worker through `collective_rpc`: the version of the last update its engine took."""
    return worker.weight_transfer_engine.version
