"""One weight update of a 7B-width model from a learner process to a generation engine in another process, over
the product's weight-sync protocol (rayllama.rl.weight_sync), against the bandwidth of a plain copy.

    python bench/weight_update.py [--device cuda] [--layers 2] [--dtype bfloat16] [--engine torch|vllm]
                                  [--bucket-mb 256] [--reps 3] [--out bench/results/weight_update.json]

Two processes, no Ray (the GPU check machine may not have it): this one is the learner (sync rank 0: a
Llama-2-7B-width `Transformer` with `--layers` blocks in `--dtype`, random weights), a spawned child the generator
(sync rank 1: `make_engine(--engine)` over the same checkpoint). Each update: header + buckets of --bucket-mb
MB broadcast from rank 0 (`weight_sync.send`), the child streams them into its engine (`load_weights_stream`,
as `RolloutGenerator` does) and acknowledges; seconds from the first broadcast to the acknowledgement.

    cuda, 2+ GPUs   learner on cuda:0, generator on cuda:1, NCCL (the product's GPU path)
    cuda, 1 GPU     both on cuda:0; NCCL refuses two ranks on one device: ipc (the learner's buckets handed over
                    by CUDA IPC handle, what `ppo.weight_sync.backend: auto` picks for a colocated generator),
                    and gloo (host-staged) as the baseline
    cpu             gloo and ipc (shared memory), a dry run of the plumbing; use small --layers

The floor is a `copy_` of the same number of bytes between the two devices (cuda:0 -> cuda:1, or within one
device / host memory), so the table reads: seconds per update, GB moved, effective GB/s, and update / copy.
After the last update the child returns a float64 sum of its lm_head and first-layer weights; it must equal the
learner's (the update arrived whole). Writes --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rayllama.checkpoint import save_model  # noqa: E402
from rayllama.model import Transformer, count_params, preset  # noqa: E402
from rayllama.rl.weight_sync import SyncMember, receive, send, stream_state, wire_dtype  # noqa: E402

TIMEOUT_S = 300.0


def fingerprint(state: dict[str, torch.Tensor]) -> float:
    """A float64 sum over two tensors the update must have replaced (the head and the first block's q)."""
    return sum(float(state[name].double().sum()) for name in ("lm_head.weight", "model.layers.0.self_attn.q_proj.weight"))


def generator(model_dir: str, engine_kind: str, device: str, backend: str, address: str, reps: int,
              dtype: str, results: Any) -> None:
    """The child: rank 1 of the weight-sync group, an engine that takes every update."""
    try:
        from rayllama.engines import make_engine

        engine = make_engine(engine_kind, model_dir, device, dtype=dtype)
        member = SyncMember(address, 1, 2, backend, TIMEOUT_S, generation=1, device=device)
        for _ in range(reps):
            incoming = receive(member)
            engine.load_weights_stream(incoming.tensors(), incoming.version, len(incoming.header["names"]))
            incoming.finish()
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
            results.put(("ack", incoming.version))
        model = getattr(engine, "model", None)
        results.put(("fingerprint", fingerprint(model.state_dict()) if model is not None else None))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which fails the run
        results.put(("error", f"{type(e).__name__}: {e}"))
        raise


def copy_seconds(nbytes: int, src_device: str, dst_device: str, reps: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=src_device)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=dst_device)
    dst.copy_(src)  # fault the pages in / warm the copy engines
    times = []
    for _ in range(reps):
        if src_device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        if src_device.startswith("cuda") or dst_device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def update_seconds(model: Any, cfg: Any, names: list[str], shapes: list[Any], backend: str, send_dev: str,
                   recv_dev: str, args: Any, dtype: torch.dtype) -> tuple[list[float], float | None, float]:
    """(seconds per update after a warm-up one, the child's fingerprint, the learner's) over `backend`."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=TIMEOUT_S))
    address = f"127.0.0.1:{store.port}"
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_model(Path(tmp) / "model", model, cfg)  # the generator's start checkpoint
        child = ctx.Process(target=generator, args=(str(model_dir), args.engine, recv_dev, backend, address,
                                                    args.reps + 1, args.dtype, results))
        child.start()
        member = SyncMember(address, 0, 2, backend, TIMEOUT_S, generation=1, device=send_dev, store=store)
        seconds = []
        for version in range(1, args.reps + 2):  # update 1 warms up (first NCCL/gloo use, allocations)
            with torch.no_grad():
                for p in model.parameters():  # new weights every update
                    p.add_(1e-3)
            if send_dev.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            outcome = send(member, names, shapes, iter(model.state_dict().items()), version, dtype,
                           args.bucket_mb << 20, verify=False)
            kind, value = results.get(timeout=TIMEOUT_S)
            if kind != "ack" or not outcome["ok"]:
                raise SystemExit(f"update {version} over {backend} failed: {outcome} / {kind}: {value}")
            if version > 1:
                seconds.append(time.perf_counter() - start)
        kind, remote = results.get(timeout=TIMEOUT_S)
        child.join(timeout=60)
        member.close()
    if kind == "error":
        raise SystemExit(f"the generator failed over {backend}: {remote}")
    return seconds, remote, fingerprint(model.state_dict())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dim", type=int, default=None, help="model width (default: Llama-2-7B's 4096)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--engine", default="torch", choices=("torch", "vllm"))
    ap.add_argument("--bucket-mb", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="bench/results/weight_update.json")
    args = ap.parse_args()

    cfg = preset("llama2-7b")
    cfg.n_layers = args.layers
    if args.dim:
        cfg.dim, cfg.ffn_dim, cfg.n_heads, cfg.n_kv_heads = args.dim, int(args.dim * 2.6875), 8, 8
        cfg.vocab_size, cfg.max_seq_len = 4000, 256
    dtype = wire_dtype(args.dtype)
    gpus = torch.cuda.device_count() if args.device.startswith("cuda") else 0
    if args.device.startswith("cuda") and gpus == 0:
        raise SystemExit("--device cuda but no GPU is visible; use --device cpu")
    send_dev, recv_dev = ("cuda:0", "cuda:1") if gpus >= 2 else (("cuda:0", "cuda:0") if gpus else ("cpu", "cpu"))
    # what `ppo.weight_sync.backend: auto` picks for this layout last; a host-staged gloo baseline before it
    backends = ["nccl"] if gpus >= 2 else ["gloo", "ipc"]

    torch.manual_seed(0)
    with torch.device(send_dev):
        model = Transformer(cfg).to(dtype)
    names, shapes = stream_state(model)
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    print(f"{count_params(cfg) / 1e9:.2f}B params ({args.layers} layers, width {cfg.dim}), {nbytes / 1e9:.2f} GB "
          f"in {args.dtype}; learner {send_dev} -> {args.engine} engine {recv_dev} over {', '.join(backends)}",
          flush=True)
    floor = copy_seconds(nbytes, send_dev, recv_dev, args.reps)
    rows, equal = [], True
    for backend in backends:
        seconds, remote, local = update_seconds(model, cfg, names, shapes, backend, send_dev, recv_dev, args, dtype)
        update = statistics.median(seconds)
        equal &= remote is None or remote == local
        if remote is not None and remote != local:
            print(f"over {backend} the generator's weights differ from the learner's: {remote} vs {local}")
        rows.append({"backend": backend, "update_s": update, "update_gb_s": nbytes / update / 1e9,
                     "update_over_copy": update / floor, "weights_equal": None if remote is None else remote == local,
                     "reps": seconds})
    print(f"{'path':<28}{'seconds':>10}{'GB/s':>10}{'/ copy':>9}")
    for row in rows:
        print(f"{'weight update (' + row['backend'] + ')':<28}{row['update_s']:>10.4f}{row['update_gb_s']:>10.2f}"
              f"{row['update_over_copy']:>8.1f}x")
    print(f"{f'copy_ {send_dev}->{recv_dev}':<28}{floor:>10.4f}{nbytes / floor / 1e9:>10.2f}")
    checked = "not checked (the engine exposes no model)" if rows[0]["weights_equal"] is None else (
        "yes" if equal else "NO")
    print(f"the generator's weights equal the learner's after the updates: {checked}")
    result = {"device": torch.cuda.get_device_name() if gpus else "cpu", "gpus": gpus, "engine": args.engine,
              "dtype": args.dtype, "layers": args.layers, "params": count_params(cfg), "bytes": nbytes,
              "bucket_mb": args.bucket_mb, "copy_s": floor, "copy_gb_s": nbytes / floor / 1e9, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if not equal:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
