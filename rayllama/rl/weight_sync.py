"""Policy weights from the learner group to the generators over a collective: gloo on CPU, NCCL on GPU.

The weight-sync group is learner rank 0 (sync rank 0) and every generator (sync ranks 1..M): a process group of
its own, separate from the learners' FSDP group. A process that already has a default group (an FSDP learner; a
vLLM worker initialises one too) cannot join a second one through `init_process_group`, and `dist.new_group` only
spans members of the default group, so every member builds the backend object directly over a shared store:

    store  torch.distributed.TCPStore served by learner rank 0 (`open_store`), a PrefixStore per generation
    group  torch.distributed.ProcessGroupGloo(store, rank, size, timeout)   (CPU)
           torch.distributed.ProcessGroupNCCL(store, rank, size, options)  (GPU)

The backend name is the only difference between CPU and GPU; every collective carries `ppo.weight_sync.timeout_s`.

Members on one machine can skip the wire: backend `ipc` keeps the header, the digests and small acknowledgements on
a gloo group and hands each bucket over by reference. Rank 0's two bucket buffers live in memory every member can
map: files in /dev/shm on CPU (unlinked once mapped), a CUDA IPC handle on a GPU that every member shares (a
generator colocated with the learner: NCCL refuses two ranks on one GPU). A bucket message is then the buffer's
handle (opened once per buffer, cached); a receiver reads the tensors straight from the sender's buffer, and before
rank 0 packs bucket b into the buffer bucket b-2 used, every member acknowledges that it is done with b-2 (a
message of its own to rank 0, which waits for each: a member that sent it goes on at once) as soon as bucket b-1
has arrived, so rank 0 packs b while the members copy b-1 out. A learner of one rank
on CPU goes further (`SyncMember.share_params`): its parameters move into one shared buffer when the group forms,
and when every bucket lies in it the header says where (handle, offsets): nothing is packed, and a generator copies
straight out of the learner's parameters: one copy per update where packing made two (a parameter replaced since, its
storage no longer the shared one, has the update packed as usual). `ppo.weight_sync.backend: auto` decides
per member (`resolve_backend`): the members on the learner's machine (CPU, when /dev/shm has room) or on its GPU map
its buffers; the others get the bucket bytes over a second group, gloo on CPU or NCCL across GPUs, in the same
update (a generator Ray places beside learner rank 0 by CUDA IPC, the rest by NCCL).

A `local` backend (`LocalChannel`) carries the same messages between plain objects in one process (the loop's
local actors, tests): the sender runs first and the receivers read what it wrote.

One update, every message a broadcast from rank 0:

    1. preamble             int64[3]: header bytes (0: the same header as this group's last update), version, verify
    2. header (if new)      uint8 JSON: names, shapes, wire dtype, buckets (index ranges), where shared buckets lie
    3. bucket 0 .. B-1      one flat tensor of the wire dtype each: the bucket's tensors, flattened, in order (ipc:
                            its handle message; none when the header says where every bucket lies)
    4. digests (if verify)  uint8[16 * B]: blake2b-128 of every bucket's bytes

So an update of a model whose parameters rank 0 shares (one CPU rank, every member mapping them) is one preamble and
one acknowledgement, whatever its number of buckets.

Every learner rank iterates the policy's full state (`iter_full_state`: one FSDP all-gather per parameter); rank 0
packs the tensors into buckets of ~`ppo.weight_sync.bucket_mb` MB and broadcasts each. A generator copies each
received bucket's tensors into its engine as they arrive (torch: in place; vLLM: its `reload_weights` iterator).
Digests are computed on both sides in a background thread (hashlib releases the GIL), overlapped with the next
bucket's transfer, only on the updates `ppo.verify_weights_every` selects (0: never).

Faults: a member that died or stalled fails rank 0's broadcast within the timeout; rank 0 then keeps gathering
(the other learner ranks are in the all-gathers with it), drops its end of the group (the healthy receivers fail
at once instead of waiting out the timeout) and reports which ranks fell behind: each receiver writes its progress
into the store after every message. `WeightSync` (the driver's side) names those generators in one line, kills a
stalled one (Ray restarts it), forms a new group and sends again, `retries` times; a restarted generator refuses
to generate until it is sent weights (`ActorRestartedError`), and refuses an update of a group it is not in. Over
gloo a generator that restarted between updates needs no check before each update: its old process's connections
closed with it, so the update's first broadcast fails at once. Where the control messages go over NCCL, which waits
out the timeout on a peer that is gone, or a generator's ranks are processes of their own (vLLM's tensor-parallel
workers), the driver first asks every member its group generation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import secrets
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from rayllama.rl.actors_api import (
    ActorCallError,
    LearnerLostError,
    RLActors,
    StaleWeightsError,
    WeightChecksumError,
)

log = logging.getLogger("rayllama")
DIGEST_BYTES = 16
RING = 2  # bucket buffers per member: bucket b reuses bucket b-2's once its digest (if any) is done
BACKENDS = ("gloo", "nccl", "ipc", "local")
HANDLE_BYTES = 4096  # an ipc bucket message: int32 length, then the pickled handle of a ring buffer
PREAMBLE = 3  # an update's first message, int64s: header bytes (0: this group's last header again), version, verify
ACK_TAG = 1  # the point-to-point tag of a member's acknowledgement to rank 0


class WeightSyncError(RuntimeError):
    """A weight update that did not reach every generator (a member died, stalled, or left the group).
    `restarting`: whether a generator died or was killed, so the retry should give Ray time to restart it."""

    def __init__(self, message: str, restarting: bool = True) -> None:
        super().__init__(message)
        self.restarting = restarting


def place_of(device: str | torch.device) -> dict[str, Any]:
    """Where a member lives, for `resolve_backend`: its machine (host name, boot id, IPC namespace and the
    /dev/shm mount: processes that agree on all four share /dev/shm and can open each other's CUDA IPC handles;
    two containers on one host do not; or $RAYLLAMA_MACHINE_ID), its device (cpu, or cuda:<GPU UUID>) and the free
    bytes of /dev/shm."""
    import socket

    device = torch.device(device)
    machine = os.environ.get("RAYLLAMA_MACHINE_ID", "")  # an explicit identity (tests; containers that share IPC)
    if not machine:
        parts = [socket.gethostname()]
        for read in (lambda: Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
                     lambda: os.readlink("/proc/self/ns/ipc"), lambda: str(os.stat("/dev/shm").st_dev)):
            try:
                parts.append(read())
            except OSError:
                parts.append("")
        machine = "/".join(parts)
    key = "cpu"
    if device.type == "cuda":
        key = f"cuda:{torch.cuda.get_device_properties(device).uuid}"
    return {"machine": machine, "device": key, "shm_free": shm_free()}


def shm_free() -> int:
    """Free bytes of /dev/shm (0 where there is none): a buffer larger than that faults (SIGBUS) when touched."""
    try:
        stat = os.statvfs("/dev/shm")
    except OSError:
        return 0
    return stat.f_bavail * stat.f_frsize


def resolve_backend(requested: str, places: Sequence[dict[str, Any]], bucket_bytes: int,
                    names: Sequence[str] = ()) -> str | dict[str, Any]:
    """The weight-sync transport for members at `places` (rank 0, the learner, first): a backend name, or
    {"wire": gloo|nccl, "ipc": [ranks]} when some members map rank 0's buffers and the others need the wire.

    `auto`: a member maps rank 0's buffers when it can, on CPU when it is on rank 0's machine and rank 0's /dev/shm
    holds its two bucket buffers with room to spare, on CUDA when it is on rank 0's GPU (where NCCL refuses a
    second rank, and Ray shows each process only its own GPUs); the rest get the bytes over gloo (CPU) or NCCL
    (CUDA, one rank per GPU). Explicit gloo / nccl / ipc use that backend for every member. A layout that cannot
    work (two receivers on one GPU other than the learner's, nccl with members sharing a GPU, ipc across machines
    or GPUs) is a one-line ValueError naming the members."""
    devices = [p["device"] for p in places]
    gpus = [d for d in devices if d.startswith("cuda")]
    label = list(names) or [f"rank {r}" for r in range(len(places))]
    if gpus and len(gpus) != len(devices):
        raise ValueError(f"weight sync: {label[devices.index('cpu')]} is on the CPU and "
                         f"{label[devices.index(gpus[0])]} on a GPU; put every member on the same kind of device")
    if gpus:
        near = [r for r in range(1, len(places)) if devices[r] == devices[0]]  # on the learner's GPU
    else:
        room = places[0].get("shm_free", 0) >= 4 * RING * bucket_bytes
        near = [r for r in range(1, len(places)) if places[r]["machine"] == places[0]["machine"] and room]
    wire = "nccl" if gpus else "gloo"
    if requested == "ipc":
        far = [label[r] for r in range(1, len(places)) if r not in near]
        if far:
            where = "GPU" if gpus else "machine (or /dev/shm has no room)"
            raise ValueError(f"ppo.weight_sync.backend ipc needs every member on the learner's {where}; "
                             f"{', '.join(far)} is not: use auto")
        return "ipc"
    if requested == "nccl" and not gpus:
        raise ValueError("ppo.weight_sync.backend nccl needs GPUs; these members are on the CPU: use auto, gloo or ipc")
    if requested == "nccl" or requested == "auto" and gpus:  # NCCL: one rank per GPU among those on the wire
        seen: dict[str, int] = {}
        for r in [r for r in range(len(places)) if requested == "nccl" or r not in near]:
            if devices[r] in seen:
                raise ValueError(f"weight sync: {label[seen[devices[r]]]} and {label[r]} share one GPU; NCCL needs "
                                 f"one GPU per member (only members on the learner's own GPU can share it, over "
                                 f"CUDA IPC): place each generator on its own GPU or on the learner's")
            seen[devices[r]] = r
    if requested in ("gloo", "nccl"):
        return requested
    if not near:
        return wire
    if len(near) == len(places) - 1:
        return "ipc"
    return {"wire": wire, "ipc": near}


def transport_name(transport: str | dict[str, Any]) -> str:
    """A resolved transport in words: "ipc", "nccl", or "nccl + ipc for ranks 1, 3"."""
    if isinstance(transport, dict):
        return f"{transport['wire']} + ipc for rank(s) {', '.join(map(str, transport['ipc']))}"
    return transport


def wire_dtype(name: str) -> torch.dtype:
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"weight-sync dtype {name!r} is not a torch dtype; use float32, bfloat16 or float16")
    return value


def digest(buffer: torch.Tensor) -> bytes:
    """blake2b-128 of a flat tensor's bytes (hashlib releases the GIL: runs beside the next transfer)."""
    data = buffer.detach().reshape(-1).view(torch.uint8).cpu().numpy()
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest()


def plan_buckets(shapes: Sequence[Sequence[int]], element_size: int, bucket_bytes: int) -> list[tuple[int, int]]:
    """Index ranges [start, end) of consecutive tensors whose bytes stay within bucket_bytes (a larger tensor
    gets a bucket of its own)."""
    buckets, start, size = [], 0, 0
    for i, shape in enumerate(shapes):
        nbytes = element_size * _numel(shape)
        if i > start and size + nbytes > bucket_bytes:
            buckets.append((start, i))
            start, size = i, 0
        size += nbytes
    if start < len(shapes):
        buckets.append((start, len(shapes)))
    return buckets


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# ---------------------------------------------------------------------------------------------- one member's end


class LocalChannel:
    """The `local` backend's wire: the sender appends each message, every receiver reads them in order."""

    def __init__(self) -> None:
        self.messages: list[torch.Tensor] = []


def open_store(timeout_s: float) -> tuple[Any, str]:
    """(TCPStore server on a free port of this node, its "host:port"): learner rank 0 serves the group's store."""
    import ray
    import torch.distributed as dist

    store = dist.TCPStore("0.0.0.0", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout_s))
    return store, f"{ray.util.get_node_ip_address()}:{store.port}"


def _process_group(backend: str, store: Any, rank: int, size: int, timeout_s: float) -> Any:
    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, size, timeout)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, size, options)
    raise ValueError(f"weight-sync backend {backend!r} is not one of {', '.join(BACKENDS)}")


def _shared_buffer(nbytes: int, device: torch.device, tag: str) -> tuple[torch.Tensor, bytes, str | None]:
    """(a flat uint8 buffer other processes on this machine can map, its pickled handle for `_open`, the file to
    unlink once they have: CPU buffers are files in /dev/shm, whose mappings outlive the name; CUDA buffers go by
    a CUDA IPC handle, nothing to unlink)."""
    if device.type == "cpu":
        path = f"/dev/shm/rayllama-weight-sync-{os.getpid()}-{tag}-{secrets.token_hex(4)}"
        buffer = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
        return buffer, pickle.dumps(("cpu", path, nbytes)), path
    from torch.multiprocessing.reductions import reduce_tensor

    buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return buffer, pickle.dumps(("cuda", *reduce_tensor(buffer))), None


def _handle_message(handle: bytes) -> torch.Tensor:
    """The HANDLE_BYTES bucket message of a ring buffer's handle (the bucket starts at its first byte): int32
    length of the handle, then the handle."""
    if len(handle) > HANDLE_BYTES - 4:
        raise RuntimeError(f"weight sync: a buffer handle of {len(handle)} bytes exceeds {HANDLE_BYTES - 4}")
    message = torch.zeros(HANDLE_BYTES, dtype=torch.uint8)
    message[:4] = torch.tensor([len(handle)], dtype=torch.int32).view(torch.uint8)
    message[4:4 + len(handle)] = torch.frombuffer(bytearray(handle), dtype=torch.uint8)
    return message


@dataclass
class SharedParams:
    """Rank 0's parameters moved into one buffer the mapping members can open (`SyncMember.share_params`): when
    every bucket's tensors lie in it in order, in the wire dtype, the header gives each bucket's offset in it."""

    buffer: torch.Tensor  # flat uint8, every parameter a view into it
    handle: bytes

    def bucket(self, tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> tuple[int, int] | None:
        """(byte offset, bytes) of `tensors` in the buffer if they are its consecutive contiguous bytes in
        `dtype` (a parameter replaced since, e.g. by a checkpoint load, is not); else None."""
        base = self.buffer.data_ptr()
        start = tensors[0].data_ptr() - base
        offset = start
        for t in tensors:
            if t.dtype != dtype or not t.is_contiguous() or t.data_ptr() - base != offset:
                return None
            offset += t.numel() * t.element_size()
        return (start, offset - start) if 0 <= start and offset <= self.buffer.numel() else None


def _indexed(device: torch.device) -> torch.device:
    """cuda -> cuda:<current device>; anything else as it is."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _open(handle: bytes) -> torch.Tensor:
    """The flat uint8 buffer behind a `_shared_buffer` handle, mapped into this process (no copy)."""
    kind, *rest = pickle.loads(handle)
    if kind == "cpu":
        path, nbytes = rest
        return torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
    rebuild, args = rest
    return rebuild(*args)


def _transport(backend: str | dict[str, Any], size: int) -> tuple[str | None, list[int]]:
    """(the wire backend or None, the ranks that map rank 0's buffers) of a `resolve_backend` result."""
    if isinstance(backend, dict):
        return backend["wire"], sorted(int(r) for r in backend["ipc"])
    if backend == "ipc":
        return None, list(range(1, size))
    return backend, []


class SyncMember:
    """This process's end of one generation of the weight-sync group (rank 0: the sender)."""

    def __init__(self, address: Any, rank: int, size: int, backend: str | dict[str, Any], timeout_s: float,
                 generation: int, device: str | torch.device = "cpu", store: Any = None) -> None:
        """`backend`: gloo | nccl | ipc | local, or {"wire": gloo|nccl, "ipc": [ranks]} (resolve_backend): the
        listed ranks map rank 0's buffers, the others receive the buckets over the wire backend."""
        self.rank, self.size, self.backend, self.generation = rank, size, backend, generation
        self.timeout_s, self.device = timeout_s, torch.device(device)
        wire, ipc_ranks = _transport(backend, size)
        self.shares = bool(ipc_ranks)  # rank 0 hands buckets over by handle (to some members) and everyone acks
        self.mapped = rank in ipc_ranks  # this receiver reads rank 0's buffers
        wire_ranks = [0] + [r for r in range(1, size) if r not in ipc_ranks] if wire else []
        self.on_wire = rank in wire_ranks and len(wire_ranks) > 1  # this member sends / receives bucket bytes
        self.control = torch.device("cpu") if self.shares else self.device  # where header and digests travel
        self._messages: dict[int, torch.Tensor] = {}  # ipc, rank 0: ring slot -> the bucket message of its buffer
        self._scratch = torch.empty(HANDLE_BYTES, dtype=torch.uint8)  # ipc, receivers: where bucket messages land
        self._ack = torch.zeros(1)  # ipc: an acknowledgement's payload (rank 0 receives each member's into it)
        self._unlink: list[str] = []  # ipc on CPU, rank 0: buffer files the receivers have yet to map
        self._opened: dict[bytes, torch.Tensor] = {}  # ipc, receivers: handle -> rank 0's buffer, mapped
        self.params: SharedParams | None = None  # ipc on CPU, rank 0: its parameters, mappable (share_params)
        self.channel: LocalChannel | None = None
        self.pg: Any = None  # the control group: header, digests, handles, acknowledgements (all members)
        self.wire_pg: Any = None  # the bucket bytes' group: the control group itself when nobody maps buffers
        self.store: Any = None
        self.step = 0  # messages of the current update so far
        self.updates = 0  # updates begun in this group (progress reports name theirs: an old one's is no news)
        self.header: bytes | None = None  # this group's last header (rank 0 sends one only when it changes)
        self._ring: list[torch.Tensor | None] = [None] * RING  # bucket buffers, reused across buckets and updates
        if backend == "local":
            self.channel, self._cursor = address, 0
            return
        import torch.distributed as dist

        if store is None:
            host, port = str(address).rsplit(":", 1)
            store = dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=timeout_s))
        self._server = store
        self.store = dist.PrefixStore(f"weight-sync/{generation}/", store)
        self.pg = _process_group("gloo" if self.shares else str(wire), self.store, rank, size, timeout_s)
        if not self.shares:
            self.wire_pg = self.pg
        elif self.on_wire:
            self.wire_pg = _process_group(str(wire), dist.PrefixStore("wire/", self.store), wire_ranks.index(rank),
                                          len(wire_ranks), timeout_s)

    def bucket(self, slot: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat `numel` tensor of `dtype` in ring slot `slot % RING`, kept for the next buckets and updates: a
        fresh multi-MB allocation per bucket costs its page faults every update (on CPU, 3-4x the transfer)."""
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        slot %= RING
        store = self._ring[slot]
        if store is None or store.numel() < nbytes:
            if self.shares and self.rank == 0:
                store, handle, path = _shared_buffer(nbytes, self.device, f"{self.generation}-{slot}")
                self._messages[slot] = _handle_message(handle)
                self._unlink += [path] if path else []
            else:
                store = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            self._ring[slot] = store
        return store[:nbytes].view(dtype)

    def share_params(self, module: torch.nn.Module) -> None:
        """Rank 0 on CPU, when members map its buffers and /dev/shm has room: move `module`'s parameters
        (state-dict order) into one buffer they can map, so that `send` tells where each bucket lies in it
        instead of packing (the receivers copy straight out of the parameters: one copy per update, not two). The
        parameters stay the same objects (their `.data` moves), so optimizers keep working on them. Nothing
        otherwise, nor for tied, non-parameter or mixed-dtype state (packed as usual)."""
        if not self.shares or self.rank != 0 or self.device.type != "cpu":
            return
        params = list(module.state_dict(keep_vars=True).values())
        if (len({p.data_ptr() for p in params}) != len(params) or len({p.dtype for p in params}) != 1
                or not all(isinstance(p, torch.nn.Parameter) for p in params)):
            return
        nbytes = sum(p.numel() * p.element_size() for p in params)
        if shm_free() < 2 * nbytes:  # room to spare (a full /dev/shm faults when touched): pack as usual
            log.info(f"weight sync: /dev/shm has {shm_free() / 2**20:.0f} MiB free, too little to share "
                     f"{nbytes / 2**20:.0f} MiB of parameters; buckets are packed")
            return
        buffer, handle, path = _shared_buffer(nbytes, self.device, f"{self.generation}-params")
        offset = 0
        with torch.no_grad():
            for p in params:
                size = p.numel() * p.element_size()
                view = buffer[offset:offset + size].view(p.dtype).view(p.shape)
                view.copy_(p.data)
                p.data = view
                offset += size
        self.params = SharedParams(buffer, handle)
        self._unlink += [path] if path else []

    def send_bucket(self, bucket: int, buffer: torch.Tensor, tell_mapped: bool = True) -> None:
        """Rank 0: bucket number `bucket`, packed in `self.bucket(bucket, ...)` (or lying in the shared parameters,
        `tell_mapped` False: the header told the mapping members where), to every member: its bytes over the wire
        group, then the ring buffer's handle message to the members that map it."""
        if self.on_wire:
            self._send(self.wire_pg, buffer)
        if self.shares and tell_mapped:
            if buffer.device.type == "cuda":
                torch.cuda.synchronize(buffer.device)  # packed before the mapping receivers read it
            self._send(self.pg, self._messages[bucket % RING])
        self._progress()

    def receive_bucket(self, bucket: int, numel: int, dtype: torch.dtype, reuse: bool,
                       shared: tuple[bytes, int] | None = None) -> torch.Tensor:
        """A receiver: bucket number `bucket` as a flat tensor. Over the wire: received into a ring slot when
        `reuse` (its tensors are copied out before the bucket after next), else into a fresh buffer. Mapped: rank
        0's buffer itself when `reuse`, else a copy of it; where it lies comes in a message, or, when the header
        said (`shared`: rank 0's parameter buffer, the bucket's offset in it), without one."""
        if not self.mapped:
            buffer = self.bucket(bucket, numel, dtype) if reuse else torch.empty(numel, dtype=dtype,
                                                                                   device=self.device)
            self._send(self.wire_pg, buffer)
            if self.shares and shared is None:  # the handle message the mapping members read
                self._send(self.pg, self._scratch)
            self._progress()
            return buffer
        if shared is not None:
            handle, offset = shared
        else:
            message = self._scratch
            self._send(self.pg, message)
            offset, length = 0, int(message[:4].view(torch.int32).item())
            handle = bytes(message[4:4 + length].numpy().tobytes())
        self._progress()
        if handle not in self._opened:
            if len(self._opened) >= 2 * RING:  # rank 0 re-allocated its buffers: drop the oldest mappings
                self._opened.pop(next(iter(self._opened)))
            shared = _open(handle)
            if shared.device != _indexed(self.device):
                raise RuntimeError(f"weight sync over ipc: the learner's buffer is on {shared.device}, this "
                                   f"member on {self.device}; use ppo.weight_sync.backend auto or nccl")
            self._opened[handle] = shared
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        shared = self._opened[handle][offset:offset + nbytes].view(dtype)
        return shared if reuse else shared.clone()

    def acknowledge(self) -> None:
        """When some members map rank 0's buffers: every member is done with the oldest bucket it still reads.
        A member sends rank 0 a message and goes on (its send returns once written, not once read); rank 0
        receives one from every member, each within the timeout (a member that died fails it at once), and may
        refill that buffer after. Nothing otherwise. (An all-reduce made the member that finished last wait a round
        trip more: 0.68 against 0.23 ms inside a 7.7 ms update on two CPU cores, bench/weight_sync_breakdown.py.)"""
        if not self.shares:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # copies out of rank 0's buffer are done
        if self.rank == 0:
            for member in range(1, self.size):
                self.pg.recv([self._ack], member, ACK_TAG).wait()
        else:
            self.pg.send([self._ack], 0, ACK_TAG).wait()
        self._progress()

    def unlink_mapped(self) -> None:
        """Rank 0, once every receiver acknowledged an update: remove the names of the buffer files they mapped
        (the mappings stay; nothing is left in /dev/shm when a process dies)."""
        for path in self._unlink:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self._unlink.clear()

    def begin(self) -> None:
        """Start an update: the local channel's receivers read from its first message."""
        self.step = 0
        self.updates += 1
        if self.channel is not None:
            if self.rank == 0:
                self.channel.messages.clear()
            self._cursor = 0

    def broadcast(self, tensor: torch.Tensor) -> None:
        """Rank 0's `tensor` into every member's `tensor` (same shape and dtype), within the timeout."""
        self._send(self.pg, tensor)
        self._progress()

    def _send(self, pg: Any, tensor: torch.Tensor) -> None:
        """Rank 0's `tensor` to every member of `pg` (a broadcast from its rank 0), within the timeout; the
        local channel's members read what rank 0 wrote."""
        if self.channel is None:
            pg.broadcast(tensor, 0).wait()
        elif self.rank == 0:
            self.channel.messages.append(tensor.detach().clone())
        else:
            tensor.copy_(self.channel.messages[self._cursor])
            self._cursor += 1

    def _progress(self) -> None:
        self.step += 1
        if self.rank and self.store is not None:  # progress, read by rank 0 when an update fails
            self.store.set(f"progress/{self.rank}", f"{self.updates}:{self.step}")

    def behind(self, step: int) -> list[int]:
        """Receiver ranks that did not report message `step` (1-based) of this update done: the ones that failed
        it (a rank that restarted since the last update reports nothing, its old process the last update's)."""
        if self.store is None:
            return []
        late = []
        for rank in range(1, self.size):
            key = f"progress/{rank}"
            report = self.store.get(key).decode() if self.store.check([key]) else "0:0"
            update, done = (int(v) for v in report.split(":"))
            if update != self.updates or done < step:
                late.append(rank)
        return late

    def close(self) -> None:
        """Drop this end: peers blocked in a broadcast with it fail at once (connection closed)."""
        self.pg = self.wire_pg = None
        self._opened.clear()
        self.params = None
        self.unlink_mapped()


# ---------------------------------------------------------------------------------------------- sender


def _next_named(tensors: Iterator[tuple[str, torch.Tensor]], name: str, k: int) -> torch.Tensor:
    """The next tensor of `tensors`, which must be tensor `k` of the header, `name`."""
    got, tensor = next(tensors)
    if got != name:
        raise ValueError(f"weight sync: tensor {k} is {got!r}, the header says {name!r}")
    return tensor


def send(member: SyncMember, names: Sequence[str], shapes: Sequence[Sequence[int]],
         tensors: Iterator[tuple[str, torch.Tensor]], version: int, dtype: torch.dtype, bucket_bytes: int,
         verify: bool) -> dict[str, Any]:
    """Rank 0: preamble and header, the buckets packed from `tensors` (consumed in `names` order), digests. Returns
    {"version", "ok", "bytes", "buckets"}, or on a failed broadcast {"ok": False, "step", "behind", "error"}:
    the caller drains `tensors` (other learner ranks gather with it) and drops the group.

    When rank 0 shares its parameters (`share_params`) and every bucket lies in them as it is, the header says where
    (`"shared"`: the buffer's handle and each bucket's byte offset): the members that map it copy every bucket out
    without a message, and acknowledge once, at the end (nothing is packed, so no buffer is refilled)."""
    element = torch.empty((), dtype=dtype).element_size()
    buckets = plan_buckets(shapes, element, bucket_bytes)
    shared, places, where = member.params, None, None
    if shared is not None:  # one rank (no gather): every tensor at hand, so the header can say where each bucket is
        every = [_next_named(tensors, names[k], k) for k in range(len(names))]
        tensors = iter(zip(names, every))
        found = [shared.bucket(every[start:end], dtype) for start, end in buckets]
        if all(p is not None for p in found):  # else a parameter was replaced since: every bucket is packed
            places = [p for p in found if p is not None]
            where = {"handle": shared.handle.hex(), "offsets": [offset for offset, _ in places]}
    header = json.dumps({"names": list(names), "shapes": [list(s) for s in shapes],
                         "dtype": str(dtype).removeprefix("torch."), "buckets": buckets, "shared": where}).encode()
    pool = ThreadPoolExecutor(1) if verify else None
    futures: list[Future[bytes]] = []
    member.begin()
    sent = 0
    try:
        fresh = header != member.header
        member.broadcast(torch.tensor([len(header) if fresh else 0, int(version), int(verify)], dtype=torch.int64,
                                      device=member.control))
        if fresh:
            member.broadcast(torch.frombuffer(bytearray(header), dtype=torch.uint8).to(member.control))
            member.header = header
        for b, (start, end) in enumerate(buckets):
            numels = [_numel(shapes[k]) for k in range(start, end)]
            if shared is not None and places is not None:  # in the shared parameters: a message to the wire only
                offset, nbytes = places[b]
                buffer = shared.buffer[offset:offset + nbytes].view(dtype)
                member.send_bucket(b, buffer, tell_mapped=False)
            else:  # packed into a ring slot (gathered one at a time under FSDP as they are packed)
                if b >= RING:
                    if futures:
                        futures[b - RING].result()  # its digest read the slot this bucket packs into
                    member.acknowledge()  # ipc: every receiver is done with bucket b - RING, which used this slot
                buffer = member.bucket(b, sum(numels), dtype)
                offset = 0
                for k, numel in zip(range(start, end), numels, strict=True):
                    buffer[offset:offset + numel].copy_(_next_named(tensors, names[k], k).reshape(-1))
                    offset += numel
                member.send_bucket(b, buffer)
            sent += buffer.numel() * element
            if pool is not None:
                futures.append(pool.submit(digest, buffer))
        for _ in range(1 if places is not None else min(RING, len(buckets))):
            member.acknowledge()  # ipc: the receivers are done with the last buckets
        member.unlink_mapped()
        if pool is not None:
            digests = b"".join(f.result() for f in futures)
            member.broadcast(torch.frombuffer(bytearray(digests), dtype=torch.uint8).to(member.control))
    except RuntimeError as e:  # a broadcast failed (gloo/NCCL: timeout, connection closed)
        failed = member.step + 1
        return {"ok": False, "version": int(version), "step": failed, "behind": member.behind(failed),
                "error": str(e).strip().splitlines()[0][:300]}
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
    return {"ok": True, "version": int(version), "bytes": sent, "buckets": len(buckets)}


# ---------------------------------------------------------------------------------------------- receiver


class BucketStream:
    """`Incoming.tensors()`: an iterator of (name, tensor); `copies = True` (set before iterating) promises that
    the consumer copies each tensor out before taking the next, so the receiver may reuse its bucket buffers."""

    def __init__(self) -> None:
        self.copies = False
        self.iterator: Iterator[tuple[str, torch.Tensor]] = iter(())

    def __iter__(self) -> BucketStream:
        return self

    def __next__(self) -> tuple[str, torch.Tensor]:
        return next(self.iterator)


@dataclass
class Incoming:
    """A receiver's view of one update after its header: `tensors()` yields (name, tensor) as buckets arrive;
    `finish()` drains what the consumer left, reads the digests and checks them."""

    member: SyncMember
    header: dict[str, Any]
    _digests: list[Future[bytes]] = field(default_factory=list)
    _pool: ThreadPoolExecutor | None = None
    _next_bucket: int = 0

    @property
    def version(self) -> int:
        return int(self.header["version"])

    def names_and_shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(s) for n, s in zip(self.header["names"], self.header["shapes"], strict=True)}

    def _receive_bucket(self, reuse: bool) -> tuple[int, torch.Tensor]:
        """The next bucket: into the member's ring slot (ipc: rank 0's buffer) when `reuse` (nobody keeps its
        tensors past the next bucket), else into a fresh buffer (a consumer that may keep them, e.g. vLLM's reload
        iterator)."""
        b = self._next_bucket
        start, end = self.header["buckets"][b]
        shapes = self.header["shapes"]
        numel, dtype = sum(_numel(shapes[k]) for k in range(start, end)), wire_dtype(self.header["dtype"])
        shared = self.header["shared"]
        where = (bytes.fromhex(shared["handle"]), int(shared["offsets"][b])) if shared else None
        buffer = self.member.receive_bucket(b, numel, dtype, reuse, where)
        done = b - RING + 1  # the consumer has moved on to bucket b, so it is done with every bucket before it
        if done >= 0:
            if self._digests:
                self._digests[done].result()  # its digest read the slot (ipc: rank 0's buffer) it was in
            if not shared:  # (rank 0 refills nothing when every bucket lies in its parameters: one ack, at the end)
                # ipc: rank 0 waits for this before packing bucket done + RING: acknowledged now, as soon as bucket
                # b arrived, rank 0 packs that bucket while this member copies b out (the two copies overlap)
                self.member.acknowledge()
        if self.header["verify"]:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1)
            self._digests.append(self._pool.submit(digest, buffer))
        self._next_bucket += 1
        return start, buffer

    def tensors(self) -> BucketStream:
        """(name, tensor) views into each bucket as it arrives. A consumer that copies every tensor out before
        taking the next sets the stream's `copies` before iterating: the buckets then land in the member's two
        reused buffers (no allocation, no page faults); else each bucket gets a fresh buffer it may keep."""
        stream = BucketStream()
        stream.iterator = self._tensors(stream)
        return stream

    def _tensors(self, stream: BucketStream) -> Iterator[tuple[str, torch.Tensor]]:
        names, shapes = self.header["names"], self.header["shapes"]
        while self._next_bucket < len(self.header["buckets"]):
            start, buffer = self._receive_bucket(stream.copies)
            end = self.header["buckets"][self._next_bucket - 1][1]
            offset = 0
            for k in range(start, end):
                numel = _numel(shapes[k])
                yield names[k], buffer[offset:offset + numel].view(shapes[k])
                offset += numel

    def finish(self) -> None:
        """Receive every bucket the consumer did not take, then the digests; WeightChecksumError on a mismatch."""
        try:
            while self._next_bucket < len(self.header["buckets"]):
                self._receive_bucket(reuse=True)  # drained: nobody keeps these
            got = b"".join(f.result() for f in self._digests)
            last = 1 if self.header["shared"] else min(RING - 1, len(self.header["buckets"]))
            for _ in range(last):
                self.member.acknowledge()  # ipc: done with the last buckets (the earlier ones were acknowledged)
            if not self.header["verify"]:
                return
            sent = torch.empty(DIGEST_BYTES * len(self.header["buckets"]), dtype=torch.uint8,
                               device=self.member.control)
            self.member.broadcast(sent)
            expected = bytes(sent.cpu().numpy().tobytes())
            for b in range(len(self.header["buckets"])):
                if got[b * DIGEST_BYTES:(b + 1) * DIGEST_BYTES] != expected[b * DIGEST_BYTES:(b + 1) * DIGEST_BYTES]:
                    raise WeightChecksumError(f"weights for version {self.version}: bucket {b} of "
                                              f"{len(self.header['buckets'])} hashes differently from what the "
                                              f"learner sent; the transfer is corrupt, send them again")
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=False)


def receive(member: SyncMember) -> Incoming:
    """Start receiving an update: its preamble, and its header unless it is the group's last one again."""
    member.begin()
    preamble = torch.empty(PREAMBLE, dtype=torch.int64, device=member.control)
    member.broadcast(preamble)
    size, version, verify = (int(v) for v in preamble.cpu().tolist())
    if size:
        raw = torch.empty(size, dtype=torch.uint8, device=member.control)
        member.broadcast(raw)
        member.header = bytes(raw.cpu().numpy().tobytes())
    elif member.header is None:
        raise RuntimeError("weight sync: the learner sent no header and this member has none from this group")
    return Incoming(member, {**json.loads(member.header.decode()), "version": version, "verify": bool(verify)})


def check_header(incoming: Incoming, expected: dict[str, tuple[int, ...]], current_version: int) -> None:
    """Refuse (after the caller drained the update) a header with other names/shapes or an older version."""
    got = incoming.names_and_shapes()
    missing = sorted(set(expected) - set(got))
    if missing:
        raise ValueError(f"weight update lacks key {missing[0]!r} ({len(missing)} missing); send the full model")
    unexpected = sorted(set(got) - set(expected))
    if unexpected:
        raise ValueError(f"weight update has unexpected key {unexpected[0]!r}; send this model's keys only")
    for key, shape in got.items():
        if shape != expected[key]:
            raise ValueError(f"weight update key {key!r} has shape {shape}, the model needs {expected[key]}")
    if incoming.version < current_version:
        raise StaleWeightsError(f"weight version {incoming.version} is older than the generator's "
                                f"{current_version}; send the learner's latest weights")


# ---------------------------------------------------------------------------------------------- the driver's side


@dataclass
class WeightSync:
    """Forms the weight-sync group over `actors` (learners[0] + generators) and pushes updates through it.

    `push(actors)` sends the learners' current weights (label: their version) to every generator and returns the
    version. Before each push it asks every member its group generation and forms a new group when one differs
    (a restarted generator, a rebuilt learner group). A failed update names the generators it lost in one line;
    the group is formed again and the update resent, up to `actors.retries` times, else `ActorCallError`."""

    backend: str = "auto"  # requested: auto | gloo | nccl | ipc (resolve_backend, at every forming)
    bucket_mb: float = 64.0
    dtype: str = "auto"
    timeout_s: float = 60.0
    verify_every: int = 1
    generation: int = 0  # the current group's (0: none yet)
    forms: int = 0  # groups formed so far
    updates: int = 0
    wire: str | None = None  # the resolved dtype on the wire
    owners: dict[int, int] = field(default_factory=dict)  # group rank -> index of the generator it belongs to
    resolved: str | dict[str, Any] | None = None  # the transport the current group uses (resolve_backend)

    @classmethod
    def from_config(cls, cfg: Any) -> WeightSync:
        ws = cfg.ppo.weight_sync
        return cls(backend=ws.backend, bucket_mb=ws.bucket_mb, dtype=ws.dtype,
                   timeout_s=ws.timeout_s, verify_every=cfg.ppo.verify_weights_every)

    # ------------------------------------------------------------------ naming

    @staticmethod
    def _name(actors: RLActors, index: int) -> str:
        handle = actors.generators[index]
        for name, h in actors.names.items():
            if h is handle:
                return name
        return f"rollout-{index}"

    # ------------------------------------------------------------------ group

    def _generations(self, actors: RLActors) -> list[int]:
        """Every member's group generation; a generator that does not answer within the timeout is named, killed
        (Ray restarts it) and the update retried."""
        refs = [g.weight_sync_generation.remote() for g in actors.generators]
        if actors.local:
            gens = refs
        else:
            import ray

            _, pending = ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s)
            gens, lost, stalled = [], [], []
            for i, ref in enumerate(refs):
                if ref in pending:
                    lost.append(f"{self._name(actors, i)} did not answer within {self.timeout_s:g} s")
                    stalled.append(i)
                    continue
                try:
                    gens.append(ray.get(ref))
                except Exception as e:  # noqa: BLE001 - a death: Ray restarts it, the retry forms a new group
                    lost.append(f"{self._name(actors, i)}: {_one_line(e)}")
            if lost:
                _kill(actors, stalled)
                raise WeightSyncError("; ".join(lost))
        learner = actors.get_learners(actors.learners[0].weight_sync_generation.remote(),
                                      "learner weight-sync generation")
        return [learner, *gens]

    def form(self, actors: RLActors) -> None:
        """A new generation of the group: learner rank 0 serves the store, every member joins at once. The
        generation is random: it names the group's keys in the learner's store, which outlives this object."""
        self.generation = secrets.randbits(62) + 1
        self.forms += 1
        # a generator is one rank, or one per vLLM worker (tensor_parallel_size > 1: each worker joins itself)
        places = actors.call(lambda: [g.weight_sync_places.remote() for g in actors.generators],
                             "generator weight-sync places")
        members = [len(p) for p in places]
        first = [1 + sum(members[:i]) for i in range(len(members))]
        size = 1 + sum(members)
        self.owners = {first[g] + k: g for g in range(len(members)) for k in range(members[g])}
        if actors.local:
            backend = "local"
        else:
            sender = actors.get_learners(actors.learners[0].weight_sync_places.remote(), "learner weight-sync place")
            names = ["policy-learner-0"] + [f"{self._name(actors, g)}" + (f" worker {k}" if members[g] > 1 else "")
                                            for g in range(len(members)) for k in range(members[g])]
            backend = resolve_backend(self.backend, [*sender, *(p for ps in places for p in ps)],
                                      int(self.bucket_mb * 2**20), names)
            if backend != self.resolved:
                log.info(f"weight sync: {transport_name(backend)} ({self.backend} for {size} members)")
        self.resolved = backend
        if actors.local:
            address: Any = LocalChannel()
        else:
            address = actors.get_learners(actors.learners[0].open_weight_sync.remote(self.timeout_s),
                                          "learner open weight sync")
        args = (size, backend, self.timeout_s, self.generation)
        learner_ref = actors.learners[0].join_weight_sync.remote(address, 0, *args)
        gen_refs = [g.join_weight_sync.remote(address, rank, *args) for g, rank in zip(actors.generators, first)]
        if actors.local:
            dtypes = gen_refs
        else:
            dtypes = self._wait_members(actors, learner_ref, gen_refs, "forming the weight-sync group")
        if self.wire is None:
            self.wire = self.dtype if self.dtype != "auto" else dtypes[0]

    def _wait_members(self, actors: RLActors, learner_ref: Any, gen_refs: list[Any], what: str) -> list[Any]:
        """Wait for the learner's and the generators' refs; a failure names the generators that did not make it."""
        import ray

        deadline = time.monotonic() + self.timeout_s + 30.0
        refs = [learner_ref, *gen_refs]
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=max(0.0, deadline - time.monotonic()))
        failed: list[str] = []
        for i, ref in enumerate(gen_refs):
            if ref in pending:
                failed.append(f"{self._name(actors, i)} did not answer within {self.timeout_s:.0f} s")
                continue
            try:
                ray.get(ref)
            except Exception as e:  # noqa: BLE001 - named below
                failed.append(f"{self._name(actors, i)}: {_one_line(e)}")
        try:
            actors.get_learners(learner_ref, what) if learner_ref not in pending else None
        except LearnerLostError:
            raise
        except Exception as e:  # noqa: BLE001
            if not failed:
                failed.append(f"policy-learner-0: {_one_line(e)}")
        if failed or learner_ref in pending:
            raise WeightSyncError(f"{what} failed: {'; '.join(failed) or 'policy-learner-0 did not answer'}")
        return ray.get(gen_refs)

    # ------------------------------------------------------------------ updates

    def _asks_generations(self, actors: RLActors) -> bool:
        """Whether a push first asks every member its group generation (one Ray call each): where the group's
        control messages go over NCCL, which waits out the timeout on a member that is gone; where a generator's
        ranks live in processes of their own (vLLM's tensor-parallel workers, which may outlive a killed generator
        for a while, their connections open); and for local members. Otherwise (gloo, every rank in its
        generator's own process) a restarted generator's old process is gone, and with it its connections: the
        update's first broadcast fails at once, and the retry forms the group again."""
        return actors.local or self.resolved == "nccl" or len(self.owners) > len(actors.generators)

    def push(self, actors: RLActors) -> int:
        """Send the learners' current weights to every generator; returns their version."""
        attempt = 0
        while True:
            try:
                if self.generation == 0 or (self._asks_generations(actors)
                                            and any(g != self.generation for g in self._generations(actors))):
                    self.form(actors)
                return self._push_once(actors)
            except BaseException as e:
                self.generation = 0  # whatever failed, the next try forms the group again
                if not isinstance(e, WeightSyncError):
                    raise
                attempt += 1
                if attempt > actors.retries:
                    raise ActorCallError(f"generator weight update failed {attempt} time(s): {e}") from None
                log.warning(f"{e}; forming the weight-sync group again and resending (retry {attempt} of "
                            f"{actors.retries})")
                if e.restarting and not actors.local:
                    time.sleep(min(2.0 * attempt, self.timeout_s))  # let Ray restart a killed generator

    def _push_once(self, actors: RLActors) -> int:
        verify = self.verify_every > 0 and self.updates % self.verify_every == 0
        self.updates += 1
        args = (self.generation, self.bucket_mb, self.wire, verify)
        sends = [learner.send_weights.remote(*args) for learner in actors.learners]
        recvs = [g.receive_weights.remote(self.generation) for g in actors.generators]
        if actors.local:
            return self._check(actors, sends, recvs)
        import ray

        results = actors.get_learners(sends, "learner weight sync")  # LearnerLostError passes through
        grace = 2.0 if not results[0]["ok"] else self.timeout_s
        _, pending = ray.wait(recvs, num_returns=len(recvs), timeout=grace)
        outcomes: dict[int, Any] = {}
        for i, ref in enumerate(recvs):
            if ref in pending:
                outcomes[i] = None
                continue
            try:
                outcomes[i] = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - sorted out in _check
                outcomes[i] = e
        return self._check(actors, results, [outcomes[i] for i in range(len(recvs))])

    def _check(self, actors: RLActors, results: list[dict[str, Any]], outcomes: list[Any]) -> int:
        sent = results[0]
        lost: list[str] = []
        after: list[str] = []  # errors that may only follow another member's failure (a connection it closed)
        stalled: list[int] = []
        died = False
        behind = {self.owners.get(r, r - 1) for r in sent.get("behind", [])}  # ranks -> generator indices
        for i, outcome in enumerate(outcomes):
            name = self._name(actors, i)
            if isinstance(outcome, StaleWeightsError | ValueError) and not isinstance(outcome, WeightChecksumError):
                raise outcome
            if _is_death(outcome):
                died = True
                lost.append(f"{name} died during the weight update")
            elif outcome is None or (i in behind and not isinstance(outcome, Exception)):
                lost.append(f"{name} died or stopped answering during the weight update (no message within "
                            f"{self.timeout_s:g} s)")
                stalled.append(i)
            elif isinstance(outcome, Exception):
                if sent["ok"] or isinstance(outcome, WeightSyncError):  # e.g. restarted, so not in the group
                    lost.append(f"{name}: {_one_line(outcome)}")
                elif i in behind:
                    after.append(f"{name}: {_one_line(outcome)}")
            elif outcome != sent["version"]:
                lost.append(f"{name} took version {outcome}, the learner sent {sent['version']}")
        lost = lost or after
        if not sent["ok"] and not lost:
            lost.append(f"the broadcast failed at message {sent['step']} ({sent['error']})")
        if lost:
            _kill(actors, stalled)
            raise WeightSyncError("; ".join(lost), restarting=died or bool(stalled))
        return int(sent["version"])


def _kill(actors: RLActors, indices: list[int]) -> None:
    """Kill stalled generators so Ray restarts them (they then refuse to serve until sent weights)."""
    if actors.local:
        return
    import ray

    for i in indices:
        try:
            ray.kill(actors.generators[i], no_restart=False)
        except Exception:  # noqa: BLE001 - already gone is fine
            pass


def _is_death(outcome: Any) -> bool:
    if not isinstance(outcome, Exception):
        return False
    try:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    except ImportError:
        return False
    return isinstance(outcome, RayActorError | ActorDiedError | ActorUnavailableError)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    last = [line for line in text if line.strip()]
    return (last[-1] if last else type(e).__name__)[:300]


def sync_for(actors: RLActors, cfg: Any) -> WeightSync:
    """The actors' `WeightSync` (made on first use from cfg.ppo.weight_sync / verify_weights_every)."""
    if actors.weight_sync is None:
        actors.weight_sync = WeightSync.from_config(cfg)
    return actors.weight_sync


def stream_state(model: torch.nn.Module) -> tuple[list[str], list[tuple[int, ...]]]:
    """(names, full shapes) of a (possibly FSDP2-sharded) model's state, without gathering anything."""
    state = getattr(model, "module", model).state_dict()
    return list(state), [tuple(v.shape) for v in state.values()]


