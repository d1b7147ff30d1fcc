"""The chat endpoint: one Ray Serve deployment over FastAPI, OpenAI-compatible, on the shared GenerationEngine.

    POST /v1/chat/completions   OpenAI chat schema; stream=true answers with server-sent chunks + "data: [DONE]"
    GET  /v1/models             the one served model
    GET  /health                liveness + batching counters (no auth)

A request: auth -> size -> parse/validate (400) -> the system message (or the config's default) folded into the
first user turn's <<SYS>> block, as GAtt trains it (`Tokenizer.encode_prompt`) -> limits (413 prompt, 400
max_tokens/n/stop) -> a BatchQueue collects concurrent requests (up to `batch.max_requests`) -> one
`GenerationEngine.generate` call per distinct SamplingParams in the batch, off the event loop -> text cut at stop
strings -> JSON or SSE. Streaming replays the finished answer as per-token deltas (the shared engine returns
whole completions).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hmac
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve  # (this package is also named `serve`; here the name is Ray's)
from starlette.exceptions import HTTPException as StarletteHTTPException

from rayllama.config import ConfigError
from rayllama.generation import Completion, SamplingParams
from rayllama.tokenizer import DialogError
from serve import protocol as proto
from serve.config import ServeConfig, resolve_auth_token
from serve.text import Answer, finish_answer, stream_deltas

log = logging.getLogger("ray.serve")


class ServeError(ValueError):
    """A setup mistake (missing checkpoint, busy port, ...): one line naming the thing and the fix."""


app = FastAPI(title="rayllama chat", docs_url=None, redoc_url=None)


@app.exception_handler(proto.APIError)
async def _api_error(request: Request, e: proto.APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    if e.status_code == 404:
        msg = f"no route {request.method} {request.url.path}; use POST /v1/chat/completions, GET /v1/models, GET /health"
    else:
        msg = f"{request.method} {request.url.path}: {e.detail}"
    return JSONResponse(proto.APIError(e.status_code, msg, code=str(e.status_code)).body(), status_code=e.status_code)


@app.exception_handler(Exception)
async def _internal_error(request: Request, e: Exception) -> JSONResponse:
    log.exception("internal error on %s", request.url.path)
    body = proto.APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").body()
    return JSONResponse(body, status_code=500)


@dataclasses.dataclass
class _Job:
    prompt: list[int]
    params: SamplingParams


def run_jobs(engine: Any, jobs: list[_Job]) -> list[list[Completion] | Exception]:
    """Generate a batch of requests: one `engine.generate` per distinct SamplingParams (in first-seen order);
    an engine error fails only the requests of its group."""
    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(dataclasses.astuple(job.params), []).append(i)
    out: list[list[Completion] | Exception] = [ValueError("not generated")] * len(jobs)
    for members in groups.values():
        try:
            results = engine.generate([jobs[i].prompt for i in members], jobs[members[0]].params)
        except Exception as e:  # noqa: BLE001 - reported to the group's callers as a 500 / 400
            results = [e] * len(members)
        for i, res in zip(members, results, strict=True):
            out[i] = res
    return out


class BatchQueue:
    """Collects concurrent requests into batches for one consumer that runs one batch at a time.

    Rule: a batch starts with the oldest queued request and takes everything queued, plus what arrives within
    wait_s of its start, up to max_size. Requests that arrive while a batch generates therefore wait in the
    queue and form the next batch. (Serve's @serve.batch forms new wait_s windows while a batch runs and
    queues them behind it, which leaves batches of one or two under load.)
    """

    def __init__(self, run: Callable[[list[Any]], Awaitable[list[Any]]], max_size: int, wait_s: float) -> None:
        self._run, self._max, self._wait = run, max_size, wait_s
        self._queue: asyncio.Queue | None = None
        self._consumer: asyncio.Task | None = None

    async def submit(self, item: Any) -> Any:
        """Queue `item`; return its result from `run` (an Exception result is returned, not raised)."""
        if self._consumer is None:  # created lazily: in the replica's request event loop
            self._queue = asyncio.Queue()
            self._consumer = asyncio.create_task(self._consume())
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))
        return await future

    async def _take(self) -> list[tuple[Any, asyncio.Future]]:
        queue, loop = self._queue, asyncio.get_running_loop()
        batch = [await queue.get()]
        deadline = loop.time() + self._wait
        while len(batch) < self._max:
            if not queue.empty():
                batch.append(queue.get_nowait())
                continue
            timeout = deadline - loop.time()
            if timeout <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), timeout))
            except TimeoutError:
                break
        return [(item, fut) for item, fut in batch if not fut.done()]  # done: the client went away

    async def _consume(self) -> None:
        while True:
            batch = await self._take()
            if not batch:
                continue
            try:
                results = await self._run([item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"batch of {len(batch)} requests gave {len(results)} results")
            except Exception as e:  # noqa: BLE001 - every request of the batch gets the error
                results = [e] * len(batch)
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)


def make_engine(cfg: ServeConfig) -> tuple[Any, Any, int]:
    """(GenerationEngine, Tokenizer, max_seq_len) for cfg.model_dir; the one place an engine kind is chosen."""
    from rayllama.engines import engine_model_config
    from rayllama.engines import make_engine as build_engine
    from rayllama.tokenizer import Tokenizer

    try:
        engine = build_engine(cfg.engine, cfg.model_dir, cfg.device, dtype=cfg.dtype,
                              max_batch_size=cfg.batch.engine_max_rows, vllm=cfg.vllm)
    except ValueError as e:  # CheckpointError, a scalar-head checkpoint, a model vLLM cannot run here
        raise ServeError(str(e)) from None
    model_cfg = engine_model_config(engine)
    tok = Tokenizer(tokenizer_file(cfg))
    if tok.vocab_size > model_cfg.vocab_size:
        raise ServeError(f"tokenizer {tokenizer_file(cfg)} has {tok.vocab_size} pieces but the model only "
                         f"{model_cfg.vocab_size}; use the tokenizer the model was trained with")
    return engine, tok, model_cfg.max_seq_len


def tokenizer_file(cfg: ServeConfig) -> Path:
    return Path(cfg.tokenizer_path) if cfg.tokenizer_path else Path(cfg.model_dir) / "tokenizer.model"


@serve.deployment
@serve.ingress(app)
class ChatDeployment:
    """One replica: a model, its tokenizer, a GenerationEngine and a batch queue."""

    def __init__(self, cfg: ServeConfig, auth_token: str | None) -> None:
        import torch

        self.cfg, self._token = cfg, auth_token
        # one engine thread: batches run one at a time, off the event loop that keeps accepting requests
        self._pool = concurrent.futures.ThreadPoolExecutor(1, "engine", initializer=torch.set_num_threads,
                                                           initargs=(cfg.torch_threads,))
        torch.set_num_threads(cfg.torch_threads)
        self.engine, self.tok, self.max_seq_len = make_engine(cfg)
        self.stats = {"requests": 0, "engine_batches": 0, "largest_batch": 0}
        self._batches = BatchQueue(self._run_batch, cfg.batch.max_requests, cfg.batch.wait_ms / 1000.0)
        self.created = int(time.time())

    # ------------------------------------------------------------------------------------------- routes

    @app.get("/health")
    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.cfg.model_name, "weight_version": self.engine.weight_version,
                **self.stats}

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._check_auth(request)
        return {"object": "list", "data": [{"id": self.cfg.model_name, "object": "model", "created": self.created,
                                            "owned_by": "rayllama"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        self._check_auth(request)
        req = proto.parse_chat_request(await self._read_body(request))
        prompt, params, stop = self._prepare(req)
        self.stats["requests"] += 1
        result = await self._batches.submit(_Job(prompt, params))
        if isinstance(result, ValueError):
            raise proto.APIError(400, str(result))
        if isinstance(result, Exception):
            raise result
        answers = [finish_answer(self.tok, c.token_ids, c.finish_reason, stop) for c in result]
        req_id = proto.new_id()
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._sse(req_id, answers, len(prompt), include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return proto.completion_body(req_id, self.cfg.model_name, [(a.text, a.finish_reason) for a in answers],
                                     len(prompt), sum(a.n_tokens for a in answers))

    # ------------------------------------------------------------------------------------------- steps

    async def _run_batch(self, jobs: list[_Job]) -> list[list[Completion] | Exception]:
        """One batch -> run_jobs on the engine thread (the event loop keeps accepting requests meanwhile)."""
        self.stats["engine_batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(jobs))
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, run_jobs, self.engine, jobs)

    def _check_auth(self, request: Request) -> None:
        if self._token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if not header:
            raise proto.APIError(401, "missing bearer token; send the header 'Authorization: Bearer <token>'",
                                 type="authentication_error", code="missing_api_key")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._token.encode()):
            raise proto.APIError(401, "invalid bearer token; send the token configured in auth.token / "
                                      "auth.token_env", type="authentication_error", code="invalid_api_key")

    async def _read_body(self, request: Request) -> bytes:
        limit = self.cfg.limits.max_request_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise proto.APIError(413, f"request body is {declared} bytes; the limit is {limit} "
                                      f"(limits.max_request_bytes)", code="request_too_large")
        body = await request.body()
        if len(body) > limit:
            raise proto.APIError(413, f"request body is {len(body)} bytes; the limit is {limit} "
                                      f"(limits.max_request_bytes)", code="request_too_large")
        return body

    def _prepare(self, req: proto.ChatRequest) -> tuple[list[int], SamplingParams, list[str]]:
        """Validate against the limits and build (prompt ids, SamplingParams, stop strings)."""
        cfg, lim = self.cfg, self.cfg.limits
        if req.model is not None and req.model != cfg.model_name:
            raise proto.APIError(404, f"model '{req.model}' is not served here; use '{cfg.model_name}' "
                                      f"(GET /v1/models)", param="model", code="model_not_found")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            prompt = self.tok.encode_prompt(messages)  # validates roles/order with the client's own indices
        except DialogError as e:
            raise proto.APIError(400, f"messages: {e}", param="messages") from None
        if messages[0]["role"] != "system" and cfg.default_system_prompt:
            messages.insert(0, {"role": "system", "content": cfg.default_system_prompt})
            prompt = self.tok.encode_prompt(messages)
        if len(prompt) > lim.max_prompt_tokens:
            raise proto.APIError(413, f"the prompt is {len(prompt)} tokens (chat template included); the limit is "
                                      f"{lim.max_prompt_tokens}; shorten the messages", param="messages",
                                 code="context_length_exceeded")
        room = self.max_seq_len - len(prompt)
        if room < 1:
            raise proto.APIError(413, f"the prompt is {len(prompt)} tokens and fills the model's context of "
                                      f"{self.max_seq_len}; shorten the messages", param="messages",
                                 code="context_length_exceeded")
        asked = req.max_tokens if req.max_tokens is not None else req.max_completion_tokens
        if asked is not None and asked > lim.max_tokens:
            raise proto.APIError(400, f"max_tokens {asked} exceeds the limit {lim.max_tokens}; ask for fewer",
                                 param="max_tokens")
        if asked is not None and asked > room:
            raise proto.APIError(400, f"the prompt is {len(prompt)} tokens, so max_tokens {asked} exceeds the "
                                      f"model's context of {self.max_seq_len}; ask for at most {room}",
                                 param="max_tokens", code="context_length_exceeded")
        if req.n > lim.max_n:
            raise proto.APIError(400, f"n {req.n} exceeds the limit {lim.max_n}; ask for fewer choices", param="n")
        stop = req.stop_strings()
        if len(stop) > lim.max_stop or any(not s for s in stop):
            raise proto.APIError(400, f"stop must hold at most {lim.max_stop} non-empty strings, got {stop!r:.80}",
                                 param="stop")
        params = SamplingParams(max_new_tokens=asked if asked is not None else min(lim.default_max_tokens, room),
                                temperature=req.temperature, top_p=req.top_p, n=req.n,
                                stop_token_ids=(self.tok.eos_id,), seed=req.seed)
        return prompt, params, stop

    async def _sse(self, req_id: str, answers: list[Answer], prompt_tokens: int, include_usage: bool):
        created, name = int(time.time()), self.cfg.model_name
        for i, answer in enumerate(answers):
            yield proto.chunk(req_id, name, created, i, {"role": "assistant", "content": ""})
            for piece in stream_deltas(self.tok, answer):
                yield proto.chunk(req_id, name, created, i, {"content": piece})
            yield proto.chunk(req_id, name, created, i, {}, finish_reason=answer.finish_reason)
        if include_usage:
            yield proto.chunk(req_id, name, created, None, {},
                              usage_=proto.usage(prompt_tokens, sum(a.n_tokens for a in answers)))
        yield proto.DONE


# ----------------------------------------------------------------------------------------------- building


def check_checkpoint(cfg: ServeConfig) -> None:
    """Fail early, in one line, when model_dir or its tokenizer is missing or incomplete."""
    from rayllama.checkpoint import is_complete, resolve

    d = Path(cfg.model_dir)
    try:
        complete = is_complete(resolve(d))
    except ValueError:
        complete = False
    if not complete:
        what = "does not exist" if not d.exists() else "is not a complete checkpoint"
        raise ServeError(f"checkpoint {d} {what}; run `make run` first to train the policy, or pass "
                         f"model_dir=PATH to a complete checkpoint directory")
    tok = tokenizer_file(cfg)
    if not tok.is_file():
        raise ServeError(f"tokenizer {tok} does not exist; copy the run's tokenizer.model into {d} "
                         f"or pass tokenizer_path=PATH")


def build_app(cfg: ServeConfig) -> serve.Application:
    """The Serve application for `cfg`: checks the checkpoint, resolves the auth token, sets replicas/resources."""
    check_checkpoint(cfg)
    token = resolve_auth_token(cfg)
    cfg = dataclasses.replace(cfg, model_dir=str(Path(cfg.model_dir).absolute()),
                              tokenizer_path=str(tokenizer_file(cfg).absolute()))
    r = cfg.replicas
    actor_options = {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus,
                     "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(cfg.torch_threads)}}}
    return ChatDeployment.options(num_replicas=r.num_replicas, max_ongoing_requests=r.max_ongoing_requests,
                                  ray_actor_options=actor_options).bind(cfg, token)


def check_port_free(host: str, port: int) -> None:
    """Raise ServeError if host:port cannot be listened on (checked before Ray starts, for a one-line error)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError as e:
            raise ServeError(f"cannot listen on {host}:{port} ({e.strerror}); pass http.port=N for a free port "
                             f"or stop what holds it") from None


def start(cfg: ServeConfig) -> str:
    """Start Serve's HTTP proxy on cfg.http (Ray must be initialised or is started locally), deploy the app,
    wait until it is ready; return the base URL (e.g. http://127.0.0.1:8000)."""
    application = build_app(cfg)
    serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port})
    serve.run(application, name=cfg.app_name, route_prefix="/")
    host = f"[{cfg.http.host}]" if ":" in cfg.http.host else cfg.http.host
    return f"http://{host}:{cfg.http.port}"


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """`python -m rayllama.serve CONFIG [key=value ...]`: serve until Ctrl-C (or SIGTERM), then shut down."""
    import signal
    import sys

    from serve.config import load_serve_config

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m rayllama.serve configs/serve.yaml [key=value ...]")
        return 0 if argv else 2
    try:
        cfg = load_serve_config(argv[0], argv[1:])
        check_checkpoint(cfg)
        resolve_auth_token(cfg)
        if not cfg.ray.address:
            check_port_free(cfg.http.host, cfg.http.port)
    except (ConfigError, ServeError) as e:
        print(f"rayllama.serve: error: {e}", file=sys.stderr)
        return 2

    import ray

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if cfg.ray.address:
        ray.init(address=cfg.ray.address)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=cfg.ray.include_dashboard,
                 dashboard_host="127.0.0.1", dashboard_port=cfg.ray.dashboard_port)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C, even if started with SIGINT ignored
    signal.signal(signal.SIGTERM, _interrupt)  # `kill PID` shuts down as cleanly as Ctrl-C
    try:
        url = start(cfg)
        auth = "bearer token required" if resolve_auth_token(cfg) else "no auth"
        print(f"rayllama.serve: '{cfg.model_name}' from {cfg.model_dir} at {url}/v1 ({auth}); Ctrl-C stops",
              flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("rayllama.serve: shutting down", flush=True)
        return 0
    except Exception as e:  # noqa: BLE001 - a replica that fails to start: one line, details in Ray's logs
        print(f"rayllama.serve: error: the app failed to start: {str(e).strip().splitlines()[-1]}",
              file=sys.stderr)
        return 1
    finally:
        serve.shutdown()
        ray.shutdown()
