"""Streaming pretraining over a generated corpus of --corpus-gb: peak RSS of every process of the Ray session.

    python bench/stream_pretrain.py [--corpus-gb 1.0] [--corpus PATH] [--rss-bound-mb 1024] [--workdir DIR] [--keep]

Writes a JSONL text corpus of at least --corpus-gb (toy-world pretraining documents, rayllama.data.toyworld
.pretrain_texts, generated in chunks with seed, seed + 1, ... and written line by line, never held in memory), or
reuses --corpus PATH. Trains a SentencePiece tokenizer on a sample of it and measures bytes per token on another
sample, estimates the packed rows of one pass, and runs the real streaming path (rayllama.data.stream
.pretrain_dataset under data.stream_memory_mb, rayllama.train.stages.run_pretrain_stream: 2 Ray Train workers,
FSDP2) with a tiny model for the steps that pass the whole corpus through once (--fraction < 1 passes a share).
A background thread walks the process tree of the driver (the Ray processes it started: gcs_server, raylet and its
workers, the Ray Data read tasks, which also tokenize and pack, the Ray Train controller and workers) every
--interval s and keeps, per role, the highest RSS seen and the kernel's high-water mark (VmHWM in
/proc/PID/status), so a peak between two samples still counts. Prints a table (role, processes, peak RSS MB, peak RSS less shared pages MB,
PASS/FAIL against --rss-bound-mb) and writes bench/results/stream_pretrain.json.

RSS counts shared pages a process has touched, among them Ray's object store (/dev/shm) pages it maps; the
"private" column leaves them out (psutil's rss - shared). Also reported: the object store's bytes in use (sampled
every 4th time, against data.stream_memory_mb), each top role's highest RSS per quarter of the streaming part (from
the dataset's creation to the end: does it grow as the corpus streams?), the CPU seconds per role and, from them,
what one pass of 1 GB would take on 2 idle cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")  # as tests/conftest.py: fast Ray Train reports

import psutil  # noqa: E402

from rayllama.config import DataSection, DataSource, OptimConfig, PipelineConfig  # noqa: E402
from rayllama.data import stream, toyworld  # noqa: E402
from rayllama.data.corpus import write_pretrain_jsonl  # noqa: E402
from rayllama.tokenizer import Tokenizer, train_tokenizer  # noqa: E402
from rayllama.train.stages import HELDOUT_ROWS, run_pretrain_stream  # noqa: E402

CHUNK_DOCS = 2000  # documents per generator call (one chunk in memory at a time)
MB = 1024 * 1024
STORE = "(object store in use)"


def documents(seed: int):
    """Toy-world pretraining documents without end: chunk k comes from pretrain_texts(CHUNK_DOCS, seed + k)."""
    k = 0
    while True:
        for rec in toyworld.pretrain_texts(CHUNK_DOCS, seed + k):
            yield rec.text
        k += 1


def write_corpus(path: Path, target_bytes: int, seed: int) -> None:
    """Documents until their UTF-8 text reaches target_bytes (the JSONL lines, escaped and framed, are longer)."""
    def until_full():
        n = 0
        for text in documents(seed):
            yield text
            n += len(text.encode())
            if n >= target_bytes:
                return
    write_pretrain_jsonl(path, until_full())


def sample_docs(path: Path, n: int, skip: int = 0) -> list[str]:
    out = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= skip + n:
                break
            if i >= skip:
                out.append(json.loads(line)["text"])
    return out


def role_of(proc: psutil.Process, driver: int) -> str:
    """A process's role: "driver", a Ray worker's title up to its method ("ray::RayTrainWorker", "ray::IDLE",
    "ray::ReadPretrainText->..."), else its executable or script name (raylet, gcs_server, dashboard agent)."""
    if proc.pid == driver:
        return "driver"
    cmd = proc.cmdline()
    if cmd and cmd[0].startswith("ray::"):
        return re.sub(r"\.\w+$", "", cmd[0].split(" ")[0])  # the title less a method being run
    for arg in cmd[1:3] if cmd and "python" in Path(cmd[0]).name else []:
        if arg.endswith(".py"):
            return Path(arg).name
    return proc.name()


def hwm_bytes(pid: int) -> int:
    """The kernel's peak resident set of a process (VmHWM), 0 where unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def store_bytes() -> int | None:
    """Bytes in use in the Ray object store (what `ray memory --stats-only` prints), None without Ray."""
    import ray

    if not ray.is_initialized():
        return None
    try:
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        state = get_state_from_address(ray.get_runtime_context().gcs_address)
        return get_memory_info_reply(state).store_stats.object_store_bytes_used
    except Exception:  # a private API: no figure rather than no bench
        return None


class RssSampler(threading.Thread):
    """Every `interval` s: every process under the driver, its role, RSS, RSS less shared pages and VmHWM; keeps
    per role the peak of each and the pids seen, and the peak of the sum over all processes."""

    def __init__(self, interval: float) -> None:
        super().__init__(daemon=True)
        self.interval, self.driver = interval, os.getpid()
        self.roles: dict[str, dict] = {}
        self.cpu: dict[int, tuple[str, float]] = {}  # pid: (its latest role, its CPU seconds so far)
        self.peak_total = 0
        self.store_peak = 0  # bytes in Ray's object store (not a process's RSS; its pages count in those that map them)
        self.samples = 0
        self.t0 = time.perf_counter()
        self.stream_t0 = 0.0  # s since start when the stream begins (the quarters are of the streaming part)
        self.series: list[tuple[float, dict[str, float]]] = []  # (s since start, {role: highest RSS MB}) per ~10 s
        self.window: dict[str, float] = {}
        self.done = threading.Event()
        self.lock = threading.Lock()  # the driver samples too (before Ray shuts down)

    def sample(self) -> None:
        with self.lock:
            self._sample()

    def _sample(self) -> None:
        me = psutil.Process(self.driver)
        total, now = 0, self.window
        for proc in [me, *me.children(recursive=True)]:
            try:
                role = role_of(proc, self.driver)
                mem = proc.memory_info()
                cpu = proc.cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            r = self.roles.setdefault(role, {"pids": set(), "rss": 0, "private": 0, "hwm": 0})
            r["pids"].add(proc.pid)
            r["rss"] = max(r["rss"], mem.rss)
            r["private"] = max(r["private"], mem.rss - mem.shared)
            r["hwm"] = max(r["hwm"], hwm_bytes(proc.pid))
            total += mem.rss
            now[role] = max(now.get(role, 0.0), mem.rss / MB)
            self.cpu[proc.pid] = (role, cpu.user + cpu.system)
        self.peak_total = max(self.peak_total, total)
        if self.samples % 4 == 0:
            used = store_bytes()
            if used is not None:
                self.store_peak = max(self.store_peak, used)
                now[STORE] = max(now.get(STORE, 0.0), used / MB)
        t = time.perf_counter() - self.t0
        if not self.series or t - self.series[-1][0] >= 10:
            self.series.append((t, now))
            self.window = {}
        self.samples += 1

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self.done.set()
        self.join()
        self.sample()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus-gb", type=float, default=1.0, help="size of the generated corpus (1 GB = 1e9 bytes)")
    ap.add_argument("--corpus", default=None, help="an existing JSONL text corpus to stream instead of generating one")
    ap.add_argument("--workdir", default=None, help="default: a temp dir under /tmp, removed at the end")
    ap.add_argument("--keep", action="store_true", help="keep --workdir (the corpus, for a rerun with --corpus)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=600)
    ap.add_argument("--seq-len", type=int, default=127)
    ap.add_argument("--batch", type=int, default=512, help="rows per optimizer step over both workers")
    ap.add_argument("--micro", type=int, default=64, help="rows per worker forward pass")
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--fraction", type=float, default=1.0, help="share of one pass to train on (1: the whole corpus)")
    ap.add_argument("--stream-memory-mb", type=float, default=32.0, help="data.stream_memory_mb: Ray Data's budget")
    ap.add_argument("--rss-bound-mb", type=float, default=1024.0, help="the stated per-process peak RSS bound")
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between RSS samples")
    ap.add_argument("--out", default="bench/results/stream_pretrain.json")
    args = ap.parse_args()

    sampler = RssSampler(args.interval)
    sampler.start()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="stream_pretrain", dir="/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        result = run(args, workdir, sampler)
    finally:
        sampler.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    report(args, result, sampler)


def run(args, workdir: Path, sampler: RssSampler) -> dict:
    import ray
    import ray.data

    t0 = time.perf_counter()
    if args.corpus:
        path = Path(args.corpus)
    else:
        path = workdir / "corpus.jsonl"
        write_corpus(path, int(args.corpus_gb * 1e9), args.seed)
    write_s = time.perf_counter() - t0
    corpus_bytes = path.stat().st_size

    data = DataSection(pretrain=[DataSource(path=str(path), format="text")], heldout_fraction=0.001,
                       stream_memory_mb=args.stream_memory_mb)
    tok = Tokenizer(train_tokenizer(sample_docs(path, 4000), workdir / "tok", vocab_size=args.vocab))
    probe = sample_docs(path, 4000, skip=4000)  # bytes per streamed token, on documents the tokenizer did not see
    probe_bytes = sum(len(json.dumps({"text": d}, ensure_ascii=False).encode()) + 1 for d in probe)
    probe_tokens = sum(len(tok.encode(d)) + 2 for d in probe if not stream.is_heldout(d, data.heldout_fraction))
    bytes_per_token = probe_bytes / probe_tokens
    est_tokens = corpus_bytes / bytes_per_token
    est_docs = corpus_bytes / (probe_bytes / len(probe))
    row = args.seq_len + 1
    est_rows = est_tokens / row + est_docs / stream.BLOCK_DOCS / 2  # each block's last row is padded: half on average
    steps = max(1, math.ceil(args.fraction * est_rows / args.batch))

    cfg = PipelineConfig(stages=["pretrain"], run_dir=str(workdir / "run"), data=data, seed=args.seed)
    m = cfg.model
    m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.ffn_dim, m.max_seq_len = args.dim, 1, 2, 1, 2 * args.dim, row
    p = cfg.pretrain
    p.seq_len, p.batch_size, p.micro_batch_size, p.steps = args.seq_len, args.batch, args.micro, steps
    p.log_every, p.checkpoint_every, p.eval_every = max(1, steps // 20), steps + 1, 0
    p.optim = OptimConfig(lr=1e-3)
    cfg.scaling.num_workers = 2
    print(f"corpus {path}: {corpus_bytes / 1e9:.3f} GB ({'given' if args.corpus else f'written in {write_s:.0f} s'})"
          f"; {bytes_per_token:.2f} bytes/token on a {len(probe)}-document sample -> ~{est_tokens / 1e6:.1f}M tokens, "
          f"~{est_rows:.0f} rows of {row}; {steps} steps of {args.batch} rows = {args.fraction:g} pass(es)", flush=True)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"),  # short: socket paths are limited
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        t1 = time.perf_counter()
        sampler.stream_t0 = t1 - sampler.t0
        dataset = stream.pretrain_dataset(data, tok, p.seq_len, cfg.seed, memory_mb=data.stream_memory_mb)
        heldout = stream.collect_heldout(data, cfg.seed, max_chars=HELDOUT_ROWS * row * 8)
        out = run_pretrain_stream(cfg, workdir / "run", tok, dataset, heldout)
        train_s = time.perf_counter() - t1
        windows = [json.loads(line).get("items_per_s") for line in (workdir / "run" / "pretrain" / "metrics.jsonl")
                   .read_text().splitlines()]
        windows = [w for w in windows if w][1:-1]  # the first window holds the start, the last may be one step
    finally:
        sampler.sample()  # the Ray processes, before they end
        ray.shutdown()
    return {"corpus": str(path), "corpus_bytes": corpus_bytes, "write_s": write_s, "bytes_per_token": bytes_per_token,
            "est_tokens": est_tokens, "est_rows": est_rows, "steps": steps, "seq_len": args.seq_len,
            "tokens_seen": out["tokens_seen"], "train_s": train_s, "tokens_per_s": out["tokens_seen"] / train_s,
            "passes": out["tokens_seen"] / est_tokens,
            "steady_tokens_per_s": sorted(windows)[len(windows) // 2] if windows else None}


def report(args, r: dict, sampler: RssSampler) -> None:
    bound = args.rss_bound_mb * MB
    rows = []
    for role, s in sorted(sampler.roles.items(), key=lambda kv: -max(kv[1]["rss"], kv[1]["hwm"])):
        peak = max(s["rss"], s["hwm"])
        if peak < MB:  # gone before its memory could be read
            continue
        cpu = sum(c for rl, c in sampler.cpu.values() if rl == role)
        rows.append({"role": role, "processes": len(s["pids"]), "peak_rss_mb": peak / MB,
                     "peak_private_mb": s["private"] / MB, "cpu_s": cpu, "pass": peak < bound})
    width = max(len(x["role"]) for x in rows)
    print(f"\n{'role':<{width}}  {'procs':>5}  {'peak RSS MB':>11}  {'private MB':>10}  {'CPU s':>7}  "
          f"bound {args.rss_bound_mb:g} MB")
    for x in rows:
        print(f"{x['role']:<{width}}  {x['processes']:>5}  {x['peak_rss_mb']:>11.1f}  {x['peak_private_mb']:>10.1f}  "
              f"{x['cpu_s']:>7.0f}  {'PASS' if x['pass'] else 'FAIL'}")
    driver_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    ok = all(x["pass"] for x in rows)
    print(f"\ncorpus {r['corpus_bytes'] / 1e9:.3f} GB, ~{r['est_tokens'] / 1e6:.1f}M tokens "
          f"({r['bytes_per_token']:.2f} bytes/token); streamed {r['tokens_seen'] / 1e6:.1f}M tokens in {r['steps']} "
          f"steps = {r['passes']:.2f} pass(es); training {r['train_s']:.0f} s, {r['tokens_per_s']:.0f} tokens/s")
    if r["steady_tokens_per_s"]:
        per_gb = 1e9 / r["bytes_per_token"] / r["steady_tokens_per_s"]
        print(f"training loop's median window {r['steady_tokens_per_s']:.0f} tokens/s: one pass of 1 GB "
              f"(~{1e9 / r['bytes_per_token'] / 1e6:.0f}M tokens) would take ~{per_gb / 60:.0f} min at this rate")
    top = [x["role"] for x in rows[:4]] + [STORE]
    end, t0 = (sampler.series[-1][0] if sampler.series else 0), sampler.stream_t0
    quarters = [[now for t, now in sampler.series if t0 + q * (end - t0) / 4 <= t <= t0 + (q + 1) * (end - t0) / 4]
                for q in range(4)]
    r["quarters_mb"] = {role: [max((n.get(role, 0) for n in q), default=0) for q in quarters] for role in top}
    print(f"\nhighest RSS MB in each quarter of the {end - t0:.0f} s from the stream's start to the end (does it grow "
          f"as the corpus streams?):")
    for role in top:
        print(f"  {role:<{width}}  " + "  ".join(f"{max((n.get(role, 0) for n in q), default=0):>7.1f}"
                                                 for q in quarters))
    worker_cpu = sum(x["cpu_s"] for x in rows if x["role"] == "ray::RayTrainWorker")
    if worker_cpu:  # a rate per CPU-second does not depend on what else runs on the machine
        per_cpu = r["tokens_seen"] / worker_cpu
        r["tokens_per_worker_cpu_s"] = per_cpu
        print(f"the Ray Train workers used {worker_cpu:.0f} CPU-s: {per_cpu:.0f} tokens per worker CPU-second; with "
              f"each of the 2 workers on a core of its own, one pass of 1 GB would take ~"
              f"{1e9 / r['bytes_per_token'] / per_cpu / 2 / 60:.0f} min of training")
    total_cpu = sum(x["cpu_s"] for x in rows)
    r["cpu_s"] = total_cpu
    print(f"all processes used {total_cpu:.0f} CPU-s (start-up included): at that cost per token, one pass of 1 GB "
          f"on 2 otherwise idle cores would take ~{total_cpu * 1e9 / r['bytes_per_token'] / r['tokens_seen'] / 2 / 60:.0f}"
          f" min, plus writing the corpus")
    print(f"object store in use at most {sampler.store_peak / MB:.0f} MB (data.stream_memory_mb "
          f"{args.stream_memory_mb:g})")
    print(f"peak of the summed RSS of all processes {sampler.peak_total / MB:.0f} MB; driver ru_maxrss "
          f"{driver_maxrss / MB:.0f} MB; {sampler.samples} samples every {args.interval} s; every process's peak RSS "
          f"< {args.rss_bound_mb:g} MB: {'PASS' if ok else 'FAIL'} (corpus / bound: "
          f"{r['corpus_bytes'] / bound:.1f}x)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "args": vars(args), **r, "rss_bound_mb": args.rss_bound_mb, "processes": rows, "all_pass": ok,
        "peak_total_rss_mb": sampler.peak_total / MB, "object_store_peak_mb": sampler.store_peak / MB, "driver_ru_maxrss_mb": driver_maxrss / MB,
        "samples": sampler.samples, "rss_series_mb": sampler.series,
    }, indent=2))


if __name__ == "__main__":
    main()
