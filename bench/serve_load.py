"""Load benchmark of the chat endpoint: time to first token, inter-token latency and tokens/s per concurrency
level, a mixed-length load, and 1000 requests at concurrency 32.

    python bench/serve_load.py                                   # own server: random `tiny` model
    python bench/serve_load.py --clients 1 4 16 64 --max-tokens 32
    python bench/serve_load.py --ingress proxy                   # through Serve's Python proxy instead of HAProxy
    python bench/serve_load.py --url http://127.0.0.1:8000 --token $RAYLLAMA_API_KEY --model rayllama-chat
    PYTHONPATH=<a checkout of main> python bench/serve_load.py  # the same load on another version's server

Every request streams (`stream=True`, `stream_options.include_usage`): TTFT = request sent -> first content
chunk, ITL = the gaps between a request's later content chunks (with --stream-interval n > 1 the tokens of one
chunk arrive together: gaps of ~0 between them), tokens = usage.completion_tokens. Each client (an
asyncio task sharing one httpx.AsyncClient) sends requests back to back; a level's tokens/s is its tokens / wall
time. The own server uses random weights with the eos logit pinned to 0 and greedy decoding, so every answer runs
to its max_tokens (steady-state decode, no early stops); one replica, auth on.

Mixed lengths: `--long-clients` clients ask for 256-token answers while `--short-clients` clients ask for
16-token ones; the short requests' p50 latency is compared with the short clients running without the long ones
(what the long answers cost them: static batching makes them wait for whole 256-token batches) and with one
short client alone (which on a CPU also includes the cost of decoding 16 rows per step instead of 1).
Then 1000 requests at concurrency 32 (16 tokens): statuses and p99. /metrics is scraped before and after: its
counters must have moved by what was sent. Prints tables and writes bench/results/serve_load-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import secrets
import socket
import statistics
import tempfile
import time
from pathlib import Path

import httpx

PROMPTS = [
    "What is 12 plus 30?", "Spell the word castle backwards.", "Who wrote The Tempest?",
    "Copy this sentence: the rain in Spain.", "Name three colours.", "How do I bake bread?",
    "Give me a short greeting.", "What is the capital of France?",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_own_server(args: argparse.Namespace) -> tuple[str, str, str, dict]:
    """Train a small tokenizer, save a random-weight model, start Ray + Serve; return (url, token, name, info)."""
    import ray
    import torch

    from rayllama.checkpoint import save_model
    from rayllama.data.corpus import shakespeare_documents
    from rayllama.model import Transformer, preset
    from rayllama.tokenizer import Tokenizer, train_tokenizer
    from serve.app import start
    from serve.config import AuthConfig, BatchConfig, HTTPConfig, LimitsConfig, ReplicaConfig, ServeConfig

    work = Path(tempfile.mkdtemp(prefix="serve_load"))
    tok_path = train_tokenizer(["\n".join(shakespeare_documents()[:3])[:400_000]], work / "tok", vocab_size=1000)
    tok = Tokenizer(tok_path)
    torch.manual_seed(0)
    model_cfg = preset(args.preset)
    model_cfg.vocab_size = tok.vocab_size
    model = Transformer(model_cfg)
    with torch.no_grad():
        model.lm_head.weight[tok.eos_id] = 0.0  # eos logit 0: random logits beat it, answers run to max_tokens
    save_model(work / "model", model, model_cfg, tokenizer_model=tok_path)
    token, name = secrets.token_hex(16), "bench-chat"
    batch_fields = {f.name for f in dataclasses.fields(BatchConfig)}
    if "max_rows" in batch_fields:  # continuous batching
        batch, kind = BatchConfig(max_rows=args.max_rows, max_waiting=4096), "continuous"
        if "stream_interval" in batch_fields:
            batch.stream_interval = args.stream_interval
        elif args.stream_interval != 1:
            raise SystemExit("--stream-interval: this version's server sends every token (no batch.stream_interval)")
    else:  # a version with static batching (BatchQueue): the same row budget
        batch = BatchConfig(max_requests=args.max_rows, wait_ms=5.0, engine_max_rows=args.max_rows)
        kind = "static"
    cfg = ServeConfig(
        model_dir=str(work / "model"), model_name=name, torch_threads=args.threads,
        limits=LimitsConfig(max_prompt_tokens=128, max_tokens=256, default_max_tokens=16),
        batch=batch, auth=AuthConfig(token=token), replicas=ReplicaConfig(num_cpus=1.0, max_ongoing_requests=4096),
        http=HTTPConfig(port=_free_port()),
    )
    if "ingress" in {f.name for f in dataclasses.fields(HTTPConfig)}:
        from serve.preflight import ingress_env

        cfg.http.ingress = args.ingress
        os.environ.update(ingress_env(cfg))  # before Ray starts: its Serve processes read them
    elif args.ingress != "proxy":
        raise SystemExit("--ingress: this version's server has only Serve's proxy (no http.ingress)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    url = start(cfg)
    info = {"model_dir": str(work / "model"), "preset": args.preset, "params": sum(p.numel() for p in model.parameters()),
            "vocab_size": tok.vocab_size, "torch_threads": args.threads, "batching": kind,
            "max_rows": args.max_rows, "stream_interval": args.stream_interval, "ingress": args.ingress}
    return url, token, name, info


@dataclasses.dataclass
class Result:
    status: int
    latency: float
    ttft: float | None
    gaps: list[float]
    tokens: int


async def _one(client: httpx.AsyncClient, url: str, body: dict) -> Result:
    """One streamed request: status, latency, time to first content chunk, gaps between content chunks."""
    t0 = time.perf_counter()
    ttft, last, gaps, tokens, status = None, None, [], 0, 599
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            status = r.status_code
            if status != 200:
                await r.aread()
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    if any(c["delta"].get("content") for c in chunk["choices"]):
                        now = time.perf_counter()
                        if ttft is None:
                            ttft = now - t0
                        else:
                            gaps.append(now - last)
                        last = now
    except httpx.HTTPError:
        status = 599  # transport failure: counted with the 5xx
    return Result(status, time.perf_counter() - t0, ttft, gaps, tokens)


def _body(model: str, i: int, max_tokens: int) -> dict:
    return {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}


def _pct(values: list[float], q: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


async def run_clients(url: str, headers: dict, model: str, plan: list[tuple[int, int]]) -> tuple[list, float]:
    """plan: (requests, max_tokens) per client; each client sends its requests back to back.
    Returns ([(max_tokens, Result)], wall seconds)."""
    results: list[tuple[int, Result]] = []
    limits = httpx.Limits(max_connections=len(plan) + 4, max_keepalive_connections=len(plan) + 4)
    async with httpx.AsyncClient(headers=headers, timeout=600, limits=limits) as client:
        async def worker(k: int, n: int, max_tokens: int) -> None:
            for i in range(n):
                results.append((max_tokens, await _one(client, url, _body(model, k + i, max_tokens))))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k, n, m) for k, (n, m) in enumerate(plan)))
        return results, time.perf_counter() - t0


def summary(results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.status == 200]
    gaps = [g for r in ok for g in r.gaps]
    ms = lambda v: None if v is None else 1000 * v  # noqa: E731
    return {
        "requests": len(results), "ok": len(ok), "status_4xx": sum(400 <= r.status < 500 for r in results),
        "status_5xx": sum(r.status >= 500 for r in results), "wall_s": wall,
        "completion_tokens": sum(r.tokens for r in ok), "tokens_per_s": sum(r.tokens for r in ok) / wall,
        "ttft_p50_ms": ms(_pct([r.ttft for r in ok if r.ttft is not None], 50)),
        "ttft_p99_ms": ms(_pct([r.ttft for r in ok if r.ttft is not None], 99)),
        "itl_p50_ms": ms(_pct(gaps, 50)), "itl_p99_ms": ms(_pct(gaps, 99)),
        "latency_p50_ms": ms(_pct([r.latency for r in ok], 50)),
        "latency_p99_ms": ms(_pct([r.latency for r in ok], 99)),
    }


async def scrape(url: str) -> dict[str, float]:
    """Sum of each rayllama_* sample in GET /metrics (empty if the server has no /metrics)."""
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.get(f"{url}/metrics")
    out: dict[str, float] = {}
    if r.status_code != 200:
        return out
    for line in r.text.splitlines():
        if line.startswith("rayllama_"):
            name = line.split("{")[0].split(" ")[0]
            out[name] = out.get(name, 0.0) + float(line.split()[-1])
    return out


def _f(v: float | None, width: int, digits: int = 0) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width}.{digits}f}"


def engine_mixed(model_dir: str, args: argparse.Namespace) -> dict:
    """The mixed-length load on the engine alone, no HTTP: the same closed loop of clients (long: 256 tokens,
    short: 16) stepping one ContinuousBatcher in this process, against one short client alone. Its ratio is what
    the decode steps themselves cost on this machine (a step of 16 rows vs one row), the floor under the
    endpoint's."""
    import torch

    from rayllama.checkpoint import load_model
    from rayllama.generation import ContinuousBatcher, Request, SamplingParams
    from rayllama.tokenizer import Tokenizer

    torch.set_num_threads(args.threads)
    model, _, _ = load_model(model_dir)
    tok = Tokenizer(Path(model_dir) / "tokenizer.model")
    prompts = [tok.encode_prompt([{"role": "user", "content": p}]) for p in PROMPTS]

    def short_p50(plan: list[tuple[int, int]]) -> float:
        batcher, running, short = ContinuousBatcher(model, max_rows=args.max_rows), {}, []

        def submit(client: int, left: int, max_tokens: int) -> None:
            params = SamplingParams(max_new_tokens=max_tokens, temperature=0.0, stop_token_ids=())
            r = batcher.submit(Request([prompts[(client + left) % len(prompts)]], params))
            running[r.id] = (r, client, left, max_tokens, time.perf_counter())

        for client, (n, max_tokens) in enumerate(plan):
            submit(client, n, max_tokens)
        while running:
            batcher.step()
            for rid, (r, client, left, max_tokens, t0) in list(running.items()):
                if r.done:
                    del running[rid]
                    if max_tokens == 16:
                        short.append(time.perf_counter() - t0)
                    if left > 1:
                        submit(client, left - 1, max_tokens)
        return statistics.median(short)

    alone = short_p50([(8, 16)])
    mixed = short_p50([(2, 256)] * args.long_clients + [(6, 16)] * args.short_clients)
    return {"short_alone_p50_ms": 1000 * alone, "short_mixed_p50_ms": 1000 * mixed, "ratio_vs_alone": mixed / alone}


def table(rows: list[dict]) -> str:
    head = (f"{'clients':>7} {'reqs':>5} {'5xx':>4} {'tok/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} "
            f"{'ITL p99':>8} {'lat p50':>8} {'lat p99':>8}")
    lines = [head + "   (ms)", "-" * len(head)]
    for r in rows:
        lines.append(f"{r['clients']:>7} {r['requests']:>5} {r['status_5xx']:>4} {_f(r['tokens_per_s'], 7)} "
                     f"{_f(r['ttft_p50_ms'], 9)} {_f(r['ttft_p99_ms'], 9)} {_f(r['itl_p50_ms'], 8, 1)} "
                     f"{_f(r['itl_p99_ms'], 8, 1)} {_f(r['latency_p50_ms'], 8)} {_f(r['latency_p99_ms'], 8)}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", help="target a running server instead of starting one")
    ap.add_argument("--token", default=os.environ.get("RAYLLAMA_API_KEY"), help="bearer token for --url")
    ap.add_argument("--model", default="rayllama-chat", help="model id for --url")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64], help="concurrency levels")
    ap.add_argument("--requests", type=int, default=0, help="requests per level (default 4 per client, >= 8)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--long-clients", type=int, default=2, help="mixed load: clients asking for 256 tokens")
    ap.add_argument("--short-clients", type=int, default=14, help="mixed load: clients asking for 16 tokens")
    ap.add_argument("--bulk", type=int, default=1000, help="requests of the concurrency-32 run (0: skip)")
    ap.add_argument("--preset", default="tiny", help="model preset of the own server (random weights)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the own server's replica")
    ap.add_argument("--max-rows", type=int, default=64, help="own server: sequences decoded at once")
    ap.add_argument("--stream-interval", type=int, default=1,
                    help="own server: tokens per streamed chunk after the first (batch.stream_interval)")
    ap.add_argument("--ingress", choices=("proxy", "haproxy"), default="haproxy",
                    help="own server: http.ingress (haproxy: what `auto` gives python -m rayllama.serve, Serve's "
                         "high-throughput mode; proxy: Serve's Python proxy actor)")
    ap.add_argument("--ray-cpus", type=int, default=None)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()

    info: dict = {"target": args.url or "own server"}
    if args.url:
        url, token, name = args.url.rstrip("/"), args.token, args.model
    else:
        url, token, name, own = start_own_server(args)
        info.update(own)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    record: dict = {"bench": "serve_load", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "max_tokens": args.max_tokens,
                    "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "server": info}
    try:
        asyncio.run(run_clients(url, headers, name, [(2, args.max_tokens)]))  # warm-up
        metrics0 = asyncio.run(scrape(url))
        rows, sent, sent_tokens = [], 0, 0
        for c in args.clients:
            total = args.requests or max(8, 4 * c)
            plan = [(total // c + (k < total % c), args.max_tokens) for k in range(c)]
            results, wall = asyncio.run(run_clients(url, headers, name, plan))
            rows.append({"clients": c, **summary([r for _, r in results], wall)})
            sent, sent_tokens = sent + len(results), sent_tokens + rows[-1]["completion_tokens"]
            print(f"  {c} clients: {rows[-1]['tokens_per_s']:.1f} tokens/s", flush=True)
        one = rows[0]["tokens_per_s"] if args.clients[0] == 1 else None
        for r in rows:
            r["speedup_vs_1"] = r["tokens_per_s"] / one if one else None
        record["levels"] = rows

        # mixed lengths: short requests alone (one client), the short clients without the long ones, then
        # the short clients among long ones
        alone, _ = asyncio.run(run_clients(url, headers, name, [(8, 16)]))
        shorts_only, _ = asyncio.run(run_clients(url, headers, name, [(6, 16)] * args.short_clients))
        plan = [(2, 256)] * args.long_clients + [(6, 16)] * args.short_clients
        mixed, wall = asyncio.run(run_clients(url, headers, name, plan))
        short = [r for m, r in mixed if m == 16 and r.status == 200]
        alone_p50 = _pct([r.latency for _, r in alone if r.status == 200], 50)
        only_p50 = _pct([r.latency for _, r in shorts_only if r.status == 200], 50)
        mixed_p50 = _pct([r.latency for r in short], 50)
        record["mixed"] = {"long_clients": args.long_clients, "short_clients": args.short_clients,
                           "short_alone_p50_ms": 1000 * alone_p50, "short_only_p50_ms": 1000 * only_p50,
                           "short_mixed_p50_ms": 1000 * mixed_p50,
                           "short_mixed_p99_ms": 1000 * _pct([r.latency for r in short], 99),
                           "ratio_vs_alone": mixed_p50 / alone_p50, "ratio_vs_shorts_only": mixed_p50 / only_p50,
                           **summary([r for _, r in mixed], wall)}
        for batch in (alone, shorts_only, mixed):
            sent, sent_tokens = sent + len(batch), sent_tokens + sum(r.tokens for _, r in batch)
        print(f"  mixed: short p50 {1000 * mixed_p50:.0f} ms vs alone {1000 * alone_p50:.0f} ms", flush=True)

        if args.bulk:
            plan = [(args.bulk // 32 + (k < args.bulk % 32), 16) for k in range(32)]
            bulk, wall = asyncio.run(run_clients(url, headers, name, plan))
            record["bulk"] = {"clients": 32, **summary([r for _, r in bulk], wall)}
            sent, sent_tokens = sent + len(bulk), sent_tokens + record["bulk"]["completion_tokens"]
        metrics1 = asyncio.run(scrape(url))
        record["metrics_delta"] = {k: metrics1[k] - metrics0.get(k, 0.0) for k in sorted(metrics1)
                                   if k.endswith(("_total", "_count"))}
        record["sent"] = {"requests": sent, "completion_tokens": sent_tokens}
    finally:
        if not args.url and args.ingress == "haproxy":
            from serve.app import shutdown

            shutdown(ray_started_here=True)  # also an HAProxy that outlived Serve
        elif not args.url:  # proxy: also on a version (PYTHONPATH) without serve.app.shutdown
            import ray
            from ray import serve

            serve.shutdown()
            ray.shutdown()

    if not args.url:  # the server is down: the engine alone has the CPUs
        record["mixed"]["engine_only"] = engine_mixed(info["model_dir"], args)
    print(f"\nchat endpoint load ({info['target']}, {info.get('batching', '?')} batching, ingress "
          f"{info.get('ingress', '?')}, streamed every {info.get('stream_interval', '?')} token(s), max_tokens "
          f"{args.max_tokens}, {os.cpu_count()} CPUs)")
    print(table(rows))
    if one:
        print("tokens/s vs 1 client: " + ", ".join(f"{r['clients']}: {r['speedup_vs_1']:.1f}x" for r in rows))
    m = record["mixed"]
    print(f"mixed lengths ({m['long_clients']} clients x 256 tokens + {m['short_clients']} x 16): short p50 "
          f"{m['short_mixed_p50_ms']:.0f} ms (p99 {m['short_mixed_p99_ms']:.0f}) = {m['ratio_vs_shorts_only']:.2f}x "
          f"the {m['short_clients']} short clients without the long ones ({m['short_only_p50_ms']:.0f} ms), "
          f"{m['ratio_vs_alone']:.2f}x one short client alone ({m['short_alone_p50_ms']:.0f} ms)")
    if "engine_only" in m:
        e = m["engine_only"]
        print(f"  the same mixed load on the engine alone (no HTTP, this process): short p50 "
              f"{e['short_mixed_p50_ms']:.0f} ms = {e['ratio_vs_alone']:.2f}x one short client alone "
              f"({e['short_alone_p50_ms']:.0f} ms)")
    if args.bulk:
        b = record["bulk"]
        print(f"{b['requests']} requests at concurrency 32: {b['ok']} ok, {b['status_4xx']} 4xx, {b['status_5xx']} "
              f"5xx, latency p50 {b['latency_p50_ms']:.0f} ms p99 {b['latency_p99_ms']:.0f} ms, "
              f"{b['tokens_per_s']:.0f} tokens/s")
    if record["metrics_delta"]:
        d = record["metrics_delta"]
        print(f"/metrics moved: requests {d.get('rayllama_requests_total', 0):.0f} (sent {record['sent']['requests']}), "
              f"generated tokens {d.get('rayllama_generation_tokens_total', 0):.0f} "
              f"(received {record['sent']['completion_tokens']})")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"serve_load-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
