"""Load benchmark of the chat endpoint: N concurrent clients, tokens/s and p50/p99 latency per concurrency level.

    python bench/serve_load.py                                   # own server: random `tiny` model, 1 and 16 clients
    python bench/serve_load.py --clients 1 4 16 32 --requests 1000 --max-tokens 16
    python bench/serve_load.py --url http://127.0.0.1:8000 --token $RAYLLAMA_API_KEY --model rayllama-chat

Each client (an asyncio task sharing one httpx.AsyncClient) sends chat requests back to back; a level's tokens/s is
sum(usage.completion_tokens) / wall time of the level. The own server uses random weights with the eos logit
pinned to 0, so every request generates exactly --max-tokens tokens (steady-state decode, no early stops), auth on,
and one replica; "batch" is requests per engine call from /health. Also probes that an oversize prompt gets 413
and a request without the token 401. Prints a table and writes bench/results/serve_load-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
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
    cfg = ServeConfig(
        model_dir=str(work / "model"), model_name=name, torch_threads=args.threads,
        limits=LimitsConfig(max_prompt_tokens=128, max_tokens=max(args.max_tokens, 64)),
        batch=BatchConfig(max_requests=args.batch, wait_ms=args.wait_ms, engine_max_rows=max(64, args.batch)),
        auth=AuthConfig(token=token), replicas=ReplicaConfig(num_cpus=1.0, max_ongoing_requests=256),
        http=HTTPConfig(port=_free_port()),
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    url = start(cfg)
    info = {"preset": args.preset, "params": sum(p.numel() for p in model.parameters()),
            "vocab_size": tok.vocab_size, "torch_threads": args.threads, "batch_max_requests": args.batch,
            "batch_wait_ms": args.wait_ms}
    return url, token, name, info


async def _one(client: httpx.AsyncClient, url: str, body: dict) -> tuple[int, float, int]:
    t0 = time.perf_counter()
    try:
        r = await client.post(f"{url}/v1/chat/completions", json=body)
        status = r.status_code
        tokens = r.json()["usage"]["completion_tokens"] if status == 200 else 0
    except httpx.HTTPError:
        status, tokens = 599, 0  # transport failure: counted with the 5xx
    return status, time.perf_counter() - t0, tokens


async def run_level(url: str, headers: dict, model: str, clients: int, total: int, max_tokens: int) -> dict:
    """`clients` tasks share `total` requests; returns throughput and latency figures for the level."""
    counter = iter(range(total))
    results: list[tuple[int, float, int]] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(headers=headers, timeout=600, limits=limits) as client:
        health0 = (await client.get(f"{url}/health")).json()

        async def worker() -> None:
            for i in counter:
                body = {"model": model, "max_tokens": max_tokens, "temperature": 1.0,
                        "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}
                results.append(await _one(client, url, body))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
        health1 = (await client.get(f"{url}/health")).json()
    ok = [lat for status, lat, _ in results if status == 200]
    q = statistics.quantiles(ok, n=100, method="inclusive") if len(ok) >= 2 else ok * 99
    batches = health1.get("engine_batches", 0) - health0.get("engine_batches", 0)
    served = health1.get("requests", 0) - health0.get("requests", 0)
    return {
        "clients": clients, "requests": len(results), "ok": len(ok),
        "status_4xx": sum(400 <= s < 500 for s, _, _ in results), "status_5xx": sum(s >= 500 for s, _, _ in results),
        "wall_s": wall, "completion_tokens": sum(t for _, _, t in results),
        "tokens_per_s": sum(t for _, _, t in results) / wall, "requests_per_s": len(results) / wall,
        "p50_ms": 1000 * q[49] if ok else None, "p99_ms": 1000 * q[98] if ok else None,
        "mean_batch": served / batches if batches > 0 else None,
    }


async def probes(url: str, headers: dict, model: str) -> dict:
    """An oversize prompt and a request without the token: the statuses they get."""
    async with httpx.AsyncClient(timeout=60) as client:
        big = {"model": model, "messages": [{"role": "user", "content": "word " * 5000}]}
        small = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        oversize = (await client.post(f"{url}/v1/chat/completions", json=big, headers=headers)).status_code
        no_token = (await client.post(f"{url}/v1/chat/completions", json=small)).status_code
    return {"oversize_prompt_status": oversize, "missing_token_status": no_token}


def table(rows: list[dict]) -> str:
    head = f"{'clients':>7} {'requests':>8} {'5xx':>4} {'tokens/s':>9} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'batch':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        batch = f"{r['mean_batch']:.1f}" if r["mean_batch"] else "-"
        lines.append(f"{r['clients']:>7} {r['requests']:>8} {r['status_5xx']:>4} {r['tokens_per_s']:>9.1f} "
                     f"{r['requests_per_s']:>7.2f} {r['p50_ms']:>8.0f} {r['p99_ms']:>8.0f} {batch:>6}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", help="target a running server instead of starting one")
    ap.add_argument("--token", default=os.environ.get("RAYLLAMA_API_KEY"), help="bearer token for --url")
    ap.add_argument("--model", default="rayllama-chat", help="model id for --url")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 16], help="concurrency levels")
    ap.add_argument("--requests", type=int, default=0, help="requests per level (default 8 per client, >= 16)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--preset", default="tiny", help="model preset of the own server (random weights)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the own server's replica")
    ap.add_argument("--batch", type=int, default=32, help="own server: requests per engine call at most")
    ap.add_argument("--wait-ms", type=float, default=5.0, help="own server: batch collection window")
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
    try:
        asyncio.run(run_level(url, headers, name, 1, 2, args.max_tokens))  # warm-up
        rows = []
        for c in args.clients:
            total = args.requests or max(16, 8 * c)
            rows.append(asyncio.run(run_level(url, headers, name, c, total, args.max_tokens)))
            print(f"  {c} clients: {rows[-1]['tokens_per_s']:.1f} tokens/s", flush=True)
        checks = asyncio.run(probes(url, headers, name))
    finally:
        if not args.url:
            import ray
            from ray import serve

            serve.shutdown()
            ray.shutdown()

    print(f"\nchat endpoint load ({info['target']}, max_tokens {args.max_tokens}, {os.cpu_count()} CPUs)")
    print(table(rows))
    print(f"oversize prompt -> {checks['oversize_prompt_status']}, missing token -> {checks['missing_token_status']}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"serve_load-{time.strftime('%Y%m%d-%H%M%S')}.json"
    record = {"bench": "serve_load", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "max_tokens": args.max_tokens,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "server": info,
              "levels": rows, "probes": checks}
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
