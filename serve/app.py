"""The chat endpoint: one Ray Serve deployment over FastAPI, OpenAI-compatible, on the shared generation engine.

    POST /v1/chat/completions   OpenAI chat schema; stream=true answers with server-sent chunks + "data: [DONE]"
    POST /v1/completions        raw prompts (text or token ids), no chat template
    GET  /v1/models             the one served model
    GET  /health                liveness + batch figures (no auth)
    GET  /metrics               Prometheus text format (no auth; the same figures go to Ray's metrics)

A request: auth -> size -> parse/validate (400, unsupported fields named) -> the system message (or the config's
default) folded into the first user turn's <<SYS>> block, as GAtt trains it (`Tokenizer.encode_prompt`) -> limits
(413 prompt, 400 max_tokens/n/stop) -> the engine (serve.engine): the torch engine's ContinuousBatcher, or vLLM's
AsyncLLM, both batching continuously; 429 with Retry-After when too many requests wait -> each step's tokens are
decoded as they come (stop strings end the row in the engine) -> JSON, or SSE chunks sent token by token. A client
that goes away aborts its request; its slots are free at the next engine step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hmac
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve  # (this package is also named `serve`; here the name is Ray's)
from starlette.exceptions import HTTPException as StarletteHTTPException

from rayllama.generation import SamplingParams, TokenEvent
from rayllama.tokenizer import DialogError
from serve import protocol as proto
from serve.config import ServeConfig, resolve_auth_token
from serve.engine import EngineDead, QueueFull, every_n_steps, steps_in
from serve.metrics import ServeMetrics
from serve.preflight import ServeError, check_checkpoint, tokenizer_file
from serve.text import Answer, TextStream

log = logging.getLogger("ray.serve")


app = FastAPI(title="rayllama chat", docs_url=None, redoc_url=None)


@app.exception_handler(proto.APIError)
async def _api_error(request: Request, e: proto.APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    if e.retry_after_s is not None:
        headers = {"Retry-After": str(e.retry_after_s)}
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    if e.status_code == 404:
        msg = (f"no route {request.method} {request.url.path}; use POST /v1/chat/completions, POST /v1/completions, "
               f"GET /v1/models, GET /health, GET /metrics")
    else:
        msg = f"{request.method} {request.url.path}: {e.detail}"
    return JSONResponse(proto.APIError(e.status_code, msg, code=str(e.status_code)).body(), status_code=e.status_code)


@app.exception_handler(Exception)
async def _internal_error(request: Request, e: Exception) -> JSONResponse:
    log.exception("internal error on %s", request.url.path)
    body = proto.APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").body()
    return JSONResponse(body, status_code=500)


@dataclasses.dataclass
class _Choice:
    """One choice being generated: its text stream, logprob entries, and the answer once finished."""

    text: TextStream
    logprobs: list[proto.TokenLogprob] = dataclasses.field(default_factory=list)
    answer: Answer | None = None


@dataclasses.dataclass
class _Job:
    """A validated request on its way through the engine."""

    prompt: list[int]
    params: SamplingParams
    chat: bool  # chat (stripped text, chat chunks) or raw completions
    stream: bool
    include_usage: bool
    want_logprobs: bool
    arrived: float
    id: str = ""

    def __post_init__(self) -> None:
        self.id = proto.new_id("chatcmpl" if self.chat else "cmpl")


def make_engine(cfg: ServeConfig, on_step: Any = None) -> tuple[Any, Any, int, int]:
    """(streaming engine, Tokenizer, max_seq_len, weight version) for cfg.model_dir; the one place the endpoint
    chooses an engine kind: torch -> TorchStreamer (the shared ContinuousBatcher in an engine process); vllm ->
    VLLMStreamer over vLLM's AsyncLLM; auto -> vllm when it is importable and runs here, else torch."""
    from rayllama import storage
    from rayllama.engines import vllm_importable
    from rayllama.tokenizer import Tokenizer
    from serve.engine import TorchStreamer, VLLMStreamer, load_batcher

    model_dir = storage.local_dir(cfg.model_dir)  # this node's copy of a checkpoint on an object store
    tok_file = storage.local_file(cfg.tokenizer_path) if cfg.tokenizer_path else model_dir / "tokenizer.model"
    tok = Tokenizer(tok_file)
    b = cfg.batch
    try:
        kind = cfg.engine
        if kind == "auto":
            kind = "vllm" if vllm_importable() else "torch"
        if kind == "vllm":
            from rayllama.vllm_engine import VLLMUnsupportedError, build_async_llm, read_model_config

            try:
                llm = build_async_llm(model_dir, device=cfg.device, settings=cfg.vllm, max_batch_size=b.max_rows)
                _, model_cfg = read_model_config(model_dir)
                model_cfg = dataclasses.replace(model_cfg, max_seq_len=cfg.vllm.max_model_len or model_cfg.max_seq_len)
                engine: Any = VLLMStreamer(llm, tok.decode, b.max_waiting + b.max_rows, b.retry_after_s)
                version = 0
            except VLLMUnsupportedError as e:
                if cfg.engine == "vllm":
                    raise
                log.warning("engine=auto: %s; using the torch engine", e)
                kind = "torch"
        if kind == "torch":
            build = functools.partial(load_batcher, str(model_dir), cfg.device, cfg.dtype, b.max_rows, str(tok_file))
            engine = TorchStreamer(build, b.max_waiting, b.retry_after_s, cfg.torch_threads, on_step)
            model_cfg, version = engine.model_cfg, engine.version
    except ValueError as e:  # CheckpointError, a scalar-head checkpoint, a model vLLM cannot run here
        raise ServeError(str(e)) from None
    if tok.vocab_size > model_cfg.vocab_size:
        raise ServeError(f"tokenizer {tokenizer_file(cfg)} has {tok.vocab_size} pieces but the model only "
                         f"{model_cfg.vocab_size}; use the tokenizer the model was trained with")
    return engine, tok, model_cfg.max_seq_len, version


@serve.deployment
@serve.ingress(app)
class ChatDeployment:
    """One replica: a model, its tokenizer, a continuously batching engine and its metrics."""

    def __init__(self, cfg: ServeConfig, auth_token: str | None) -> None:
        import torch

        self.cfg, self._token = cfg, auth_token
        torch.set_num_threads(cfg.torch_threads)
        self.metrics = ServeMetrics(cfg.model_name)
        self.stats = {"requests": 0, "largest_batch": 0}
        self._gauges_at = 0.0
        self.engine, self.tok, self.max_seq_len, self.weight_version = make_engine(cfg, self._on_step)
        self.created = int(time.time())

    def check_health(self) -> None:
        """Ray Serve's periodic health check: a replica whose engine died is replaced."""
        self.engine.check_health()

    def __del__(self) -> None:  # Serve calls it when the replica shuts down
        with contextlib.suppress(Exception):
            self.engine.close()

    def _on_step(self, running: int, waiting: int, stepped: int) -> None:
        """After every engine step (the engine's reader thread): the most rows one step sampled (`largest_batch`,
        counted before the step's finished rows leave: a batch of one-token answers is a batch too) and the batch
        gauges, at most every 50 ms (a Ray metric update per step would cost the replica's event loop time it holds
        the GIL in)."""
        self.stats["largest_batch"] = max(self.stats["largest_batch"], stepped)
        now = time.monotonic()
        if now - self._gauges_at >= 0.05 or not running:
            self._gauges_at = now
            self.metrics.batch(running, waiting)

    # ------------------------------------------------------------------------------------------- routes

    @app.get("/health")
    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.cfg.model_name, "weight_version": self.weight_version,
                "running": self.engine.running, "waiting": self.engine.waiting, **self.stats}

    @app.get("/metrics")
    async def prometheus(self) -> Response:
        self.metrics.batch(self.engine.running, self.engine.waiting)
        return Response(self.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._check_auth(request)
        return {"object": "list", "data": [{"id": self.cfg.model_name, "object": "model", "created": self.created,
                                            "owned_by": "rayllama"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        arrived = time.perf_counter()
        with self._counted():
            self._check_auth(request)
            req = proto.parse_chat_request(await self._read_body(request))
            self._check_model(req.model)
            prompt = self._chat_prompt(req)
            job = self._job(req, prompt, chat=True, arrived=arrived)
            return await self._respond(job)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        arrived = time.perf_counter()
        with self._counted():
            self._check_auth(request)
            req = proto.parse_completion_request(await self._read_body(request))
            self._check_model(req.model)
            prompt = self.tok.encode(req.prompt, bos=True) if isinstance(req.prompt, str) else list(req.prompt)
            if not prompt:
                raise proto.APIError(400, "prompt: empty token list; send text or at least one token id",
                                     param="prompt")
            if len(prompt) > self.cfg.limits.max_prompt_tokens:
                raise proto.APIError(413, f"the prompt is {len(prompt)} tokens; the limit is "
                                          f"{self.cfg.limits.max_prompt_tokens}; shorten it", param="prompt",
                                     code="context_length_exceeded")
            job = self._job(req, prompt, chat=False, arrived=arrived)
            return await self._respond(job)

    # ------------------------------------------------------------------------------------------- steps

    @contextlib.contextmanager
    def _counted(self):
        """Count the request (by status) once it is answered; a streamed one counts when its stream ends."""
        self.stats["requests"] += 1
        try:
            yield
        except proto.APIError as e:
            self.metrics.request_done(e.status)
            raise
        except Exception:
            self.metrics.request_done(500)
            raise

    async def _respond(self, job: _Job) -> Any:
        try:
            stream = self.engine.open(job.prompt, job.params)
        except QueueFull as e:
            raise proto.APIError(429, str(e), type="rate_limit_error", code="queue_full",
                                 retry_after_s=e.retry_after_s) from None
        except EngineDead as e:
            raise proto.APIError(503, f"the engine is down: {e}", type="server_error", code="engine_dead") from None
        except ValueError as e:  # a prompt the engine refuses (token id outside the vocabulary, ...)
            raise proto.APIError(400, str(e), param="prompt" if not job.chat else None) from None
        self.metrics.tokens(prompt=len(job.prompt))
        choices = [_Choice(TextStream(self.tok, job.params.stop, strip=job.chat)) for _ in range(job.params.n)]
        if job.stream:
            return StreamingResponse(self._sse(job, stream, choices), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        async with contextlib.aclosing(stream):
            async for events in self._timed(job, stream):
                for e in events:
                    self._advance(choices[e.index], e, job)
        n_tokens = sum(c.answer.n_tokens for c in choices)  # type: ignore[union-attr]
        self.metrics.request_done(200)
        out = []
        for i, c in enumerate(choices):
            assert c.answer is not None
            if job.chat:
                lp = proto.chat_logprobs(c.logprobs) if job.want_logprobs else None
                out.append(proto.chat_choice(i, c.answer.text, c.answer.finish_reason, lp))
            else:
                lp = proto.completion_logprobs(c.logprobs) if job.want_logprobs else None
                out.append(proto.text_choice(i, c.answer.text, c.answer.finish_reason, lp))
        return proto.completion_body(job.id, self.cfg.model_name, out, len(job.prompt), n_tokens, chat=job.chat)

    async def _timed(self, job: _Job, stream: AsyncIterator[list[TokenEvent]]) -> AsyncIterator[list[TokenEvent]]:
        """The engine steps of `stream`, recording time to first token, inter-token latency and token counts."""
        last = None
        async for events in stream:
            now = time.perf_counter()
            steps = steps_in(events)
            if last is None:
                self.metrics.latency("ttft", now - job.arrived)
                steps -= 1
            for _ in range(steps):  # steps that arrived together share the gap since the last delivery
                self.metrics.latency("itl", (now - last) / steps if last is not None else 0.0)
            self.metrics.tokens(generated=len(events))
            last = now
            yield events

    def _advance(self, choice: _Choice, e: TokenEvent, job: _Job) -> str:
        """Feed one token to its choice; return the text delta to send now."""
        delta = choice.text.push(e.token)
        if job.want_logprobs:
            best = [(self._piece(t), lp) for t, lp in (e.top_logprobs or [])]
            choice.logprobs.append((self._piece(e.token), e.logprob, best))
        if e.finish_reason is not None:
            last, choice.answer = choice.text.finish(e.finish_reason)
            delta += last
        return delta

    def _piece(self, token: int) -> str:
        return self.tok.id_to_piece(token).replace("\u2581", " ")

    async def _sse(self, job: _Job, stream: AsyncIterator[list[TokenEvent]], choices: list[_Choice]):
        created, name, status = int(time.time()), self.cfg.model_name, 499  # 499: the client went away
        try:
            if job.chat:
                for i in range(len(choices)):
                    yield proto.chunk(job.id, name, created, i, {"role": "assistant", "content": ""})
            async with contextlib.aclosing(stream):
                async for events in every_n_steps(self._timed(job, stream), self.cfg.batch.stream_interval):
                    out = [self._event_chunk(job, created, choices, e) for e in events]
                    if any(out):
                        yield "".join(out)  # the steps since the last send, in one write
            if job.include_usage:
                n_tokens = sum(c.answer.n_tokens for c in choices)  # type: ignore[union-attr]
                usage = proto.usage(len(job.prompt), n_tokens)
                yield (proto.chunk(job.id, name, created, None, {}, usage_=usage) if job.chat
                       else proto.text_chunk(job.id, name, created, None, usage_=usage))
            yield proto.DONE
            status = 200
        except Exception:
            status = 500
            raise
        finally:
            self.metrics.request_done(status)

    def _event_chunk(self, job: _Job, created: int, choices: list[_Choice], e: TokenEvent) -> str:
        """The SSE chunk(s) of one generated token ("" when there is nothing to send yet)."""
        name, choice = self.cfg.model_name, choices[e.index]
        delta = self._advance(choice, e, job)
        if not delta and e.finish_reason is None and not job.want_logprobs:
            return ""
        lp = None
        if job.want_logprobs:
            lp = proto.chat_logprobs(choice.logprobs[-1:]) if job.chat else proto.completion_logprobs(choice.logprobs[-1:])
        if not job.chat:
            finish = choice.answer.finish_reason if e.finish_reason and choice.answer else None
            return proto.text_chunk(job.id, name, created, proto.text_choice(e.index, delta, finish, lp))
        out = ""
        if delta or lp is not None:
            out = proto.chunk(job.id, name, created, e.index, {"content": delta}, logprobs=lp)
        if e.finish_reason is not None and choice.answer is not None:
            out += proto.chunk(job.id, name, created, e.index, {}, finish_reason=choice.answer.finish_reason)
        return out

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

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.cfg.model_name:
            raise proto.APIError(404, f"model '{model}' is not served here; use '{self.cfg.model_name}' "
                                      f"(GET /v1/models)", param="model", code="model_not_found")

    def _chat_prompt(self, req: proto.ChatRequest) -> list[int]:
        """The prompt ids of the dialogue (the config's default system prompt when it has none)."""
        cfg = self.cfg
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            prompt = self.tok.encode_prompt(messages)  # validates roles/order with the client's own indices
        except DialogError as e:
            raise proto.APIError(400, f"messages: {e}", param="messages") from None
        if messages[0]["role"] != "system" and cfg.default_system_prompt:
            messages.insert(0, {"role": "system", "content": cfg.default_system_prompt})
            prompt = self.tok.encode_prompt(messages)
        if len(prompt) > cfg.limits.max_prompt_tokens:
            raise proto.APIError(413, f"the prompt is {len(prompt)} tokens (chat template included); the limit is "
                                      f"{cfg.limits.max_prompt_tokens}; shorten the messages", param="messages",
                                 code="context_length_exceeded")
        return prompt

    def _job(self, req: proto.SamplingRequest, prompt: list[int], chat: bool, arrived: float) -> _Job:
        """Validate the sampling fields against the limits and the context left; build the engine request."""
        lim, what = self.cfg.limits, "messages" if chat else "prompt"
        room = self.max_seq_len - len(prompt)
        if room < 1:
            raise proto.APIError(413, f"the prompt is {len(prompt)} tokens and fills the model's context of "
                                      f"{self.max_seq_len}; shorten the {what}", param=what,
                                 code="context_length_exceeded")
        asked = req.asked_tokens()
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
        want_logprobs = bool(req.logprobs) if chat else req.logprobs is not None  # type: ignore[attr-defined]
        params = SamplingParams(max_new_tokens=asked if asked is not None else min(lim.default_max_tokens, room),
                                temperature=req.temperature, top_p=req.top_p, n=req.n,
                                stop_token_ids=(self.tok.eos_id,), seed=req.seed, stop=tuple(stop),
                                presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                                top_logprobs=req.n_top_logprobs())  # type: ignore[attr-defined]
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _Job(prompt, params, chat, req.stream, include_usage, want_logprobs, arrived)


# ----------------------------------------------------------------------------------------------- building


def build_app(cfg: ServeConfig) -> serve.Application:
    """The Serve application for `cfg`: checks the checkpoint, resolves the auth token, sets replicas/resources."""
    check_checkpoint(cfg)
    token = resolve_auth_token(cfg)
    from rayllama import storage

    def absolute(path: str) -> str:  # the replicas may run in another directory; URIs stay as they are
        return path if storage.is_uri(path) else str(Path(storage.filesystem(path)[1]))

    cfg = dataclasses.replace(cfg, model_dir=absolute(cfg.model_dir),
                              tokenizer_path=absolute(cfg.tokenizer_path) if cfg.tokenizer_path else None)
    return ChatDeployment.options(**deployment_options(cfg)).bind(cfg, token)


def deployment_options(cfg: ServeConfig) -> dict[str, Any]:
    """Serve options of the deployment: a fixed replica count, or autoscaling between min_replicas and
    max_replicas on ongoing requests per replica; each replica's CPUs/GPUs (num_gpus > 0: on a GPU)."""
    r = cfg.replicas
    actor_options = {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus,
                     "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(cfg.torch_threads)}}}
    options: dict[str, Any] = {"max_ongoing_requests": r.max_ongoing_requests, "ray_actor_options": actor_options}
    if r.max_replicas is None:
        options["num_replicas"] = r.num_replicas
    else:
        options["autoscaling_config"] = {"min_replicas": r.min_replicas, "max_replicas": r.max_replicas,
                                         "target_ongoing_requests": r.target_ongoing_requests}
    return options


def shutdown(ray_started_here: bool) -> None:
    """serve.shutdown() and ray.shutdown(); then, for a Ray this process started, kill the HAProxy Serve ran
    under it if it outlived them (it does when the controller's shutdown times out) and would keep holding
    http.port. It is found first, while it is still this process's descendant."""
    import psutil
    import ray

    leftovers = []
    if ray_started_here and ingress_in_use() == "haproxy":
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if child.name() == "haproxy":
                    leftovers.append(child)
    serve.shutdown()
    ray.shutdown()
    for proc in leftovers:
        with contextlib.suppress(psutil.Error):
            proc.kill()


def ingress_in_use() -> str:
    """The ingress Serve runs with here: its processes take it from the environment Ray started with (this
    process's, for a Ray this process started)."""
    return "haproxy" if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" else "proxy"


def start(cfg: ServeConfig) -> str:
    """Start Serve's HTTP ingress on cfg.http (Ray must be initialised; for haproxy with ingress_env(cfg) in its
    environment), deploy the app, wait until it is ready; return the base URL (e.g. http://127.0.0.1:8000)."""
    used = ingress_in_use()
    if cfg.http.ingress not in ("auto", used):
        need = ("Ray started with RAY_SERVE_ENABLE_HA_PROXY=1 and RAY_SERVE_THROUGHPUT_OPTIMIZED=1" if used == "proxy"
                else "Ray started without RAY_SERVE_ENABLE_HA_PROXY")
        raise ServeError(f"http.ingress={cfg.http.ingress} needs {need} (python -m rayllama.serve sets this up when it "
                         f"starts Ray; on a cluster, export or unset it before `ray start`), or use http.ingress=auto")
    application = build_app(cfg)
    serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port})
    serve.run(application, name=cfg.app_name, route_prefix="/")
    host = f"[{cfg.http.host}]" if ":" in cfg.http.host else cfg.http.host
    return f"http://{host}:{cfg.http.port}"


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run(cfg: ServeConfig, ray_env: dict[str, str]) -> int:
    """Serve `cfg` (checked by serve.preflight, whose `ray_env` a Ray started here gets) until Ctrl-C (or SIGTERM),
    then shut down."""
    import signal
    import sys

    import ray

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if cfg.ray.address:
        ray.init(address=cfg.ray.address)
    else:
        for key, value in ray_env.items():  # the Ray processes started here inherit them
            os.environ.setdefault(key, value)
        ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=cfg.ray.include_dashboard,
                 dashboard_host="127.0.0.1", dashboard_port=cfg.ray.dashboard_port)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C, even if started with SIGINT ignored
    signal.signal(signal.SIGTERM, _interrupt)  # `kill PID` shuts down as cleanly as Ctrl-C
    try:
        url = start(cfg)
        auth = "bearer token required" if resolve_auth_token(cfg) else "no auth"
        print(f"rayllama.serve: '{cfg.model_name}' from {cfg.model_dir} at {url}/v1 ({auth}, {ingress_in_use()} "
              f"ingress); Ctrl-C stops",
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
        shutdown(ray_started_here=not cfg.ray.address)
