"""The endpoint's view of a generation engine: submit one request, get its tokens step by step as they are made.

    stream = engine.open(prompt_ids, params)     # QueueFull (-> 429) when too many requests already wait
    async for events in stream: ...              # list[TokenEvent] of the engine steps since the last one;
                                                 # ends when every choice has finished; leaving the loop
                                                 # early (client gone) aborts the request

TorchStreamer runs the shared `ContinuousBatcher` (rayllama.generation) in an engine process of its own: it steps
while any request runs or waits and sends each step's tokens back, which a reader thread hands to the requests'
asyncio queues. VLLMStreamer does the same over vLLM's async engine (`AsyncLLM`, whose EngineCore also runs in a
process of its own), which batches continuously itself; stop strings are checked here on the decoded text (the
engine runs without a tokenizer) and a hit aborts the vLLM request. Both have check_health() (the replica's
health check) and close().
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import torch

from rayllama.generation import ContinuousBatcher, Request, SamplingParams, TokenEvent, check_request

log = logging.getLogger("ray.serve")


class QueueFull(Exception):
    """More requests wait for a slot than the queue allows (the endpoint answers 429 with Retry-After)."""

    def __init__(self, waiting: int, retry_after_s: int) -> None:
        super().__init__(f"{waiting} requests are waiting for the engine (queue.max_waiting); retry in "
                         f"{retry_after_s} s")
        self.retry_after_s = retry_after_s


class _Stream:
    """The async iterator of one request's engine steps; aborts the request if it is closed early."""

    def __init__(self, n: int, abort: Callable[[], None]) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self._left, self._abort = n, abort

    async def events(self) -> AsyncIterator[list[TokenEvent]]:
        try:
            while self._left:
                item = await self.queue.get()
                while not isinstance(item, BaseException) and not self.queue.empty():
                    # the engine stepped more than once since we last ran: hand over all those steps at once
                    more = self.queue.get_nowait()
                    if isinstance(more, BaseException):
                        item = more
                        break
                    item = item + more
                if isinstance(item, BaseException):
                    raise item
                self._left -= sum(e.finish_reason is not None for e in item)
                yield item
        finally:
            if self._left:  # the consumer went away (client disconnected) or the engine failed
                self._abort()


def steps_in(events: list[TokenEvent]) -> int:
    """Engine steps a list of events spans: the most tokens any one choice has in it."""
    return max(Counter(e.index for e in events).values())


async def every_n_steps(stream: AsyncIterator[list[TokenEvent]], n: int) -> AsyncIterator[list[TokenEvent]]:
    """`stream`'s events regrouped for sending: the first step's at once, then whenever `n` steps have gathered
    (a choice's token count), a choice has finished, or the stream ends (vLLM's stream_interval)."""
    held: list[TokenEvent] = []
    sent = False
    async for events in stream:
        held += events
        if not sent or steps_in(held) >= n or any(e.finish_reason is not None for e in events):
            yield held
            held, sent = [], True
    if held:
        yield held


class EngineDead(RuntimeError):
    """The engine process is gone: every request in flight failed, new ones are refused (the replica's health check
    fails, so Serve replaces the replica)."""


def load_batcher(model_dir: str, device: str, dtype: str, max_rows: int, tokenizer_file: str) -> ContinuousBatcher:
    """The ContinuousBatcher over the causal LM checkpoint at `model_dir` (runs in the engine process), its decode
    set so stop strings are checked on the text."""
    from rayllama.engines import make_torch_engine
    from rayllama.tokenizer import Tokenizer

    batcher = make_torch_engine(model_dir, device, dtype, max_rows).batcher
    batcher.decode = Tokenizer(tokenizer_file).decode
    return batcher


def _engine_core(build: Callable[[], ContinuousBatcher], threads: int, inbox: Any, outbox: Any) -> None:
    """The engine process: step the ContinuousBatcher while any request runs or waits; between steps take every
    message waiting (submit, abort), block on the inbox only when there is nothing to step. One message per step
    back: each request's events of the step, the running rows and the rows the step sampled. Exits when the replica
    closes the inbox (or dies)."""
    torch.set_num_threads(threads)
    try:
        batcher = build()
    except Exception as e:  # noqa: BLE001 - reported to the replica as one line
        outbox.send(("error", f"{type(e).__name__}: {e}"))
        return
    outbox.send(("ready", batcher.model.cfg, batcher.version))
    requests: dict[int, Request] = {}
    out: dict[int, list[TokenEvent]] = {}
    while True:
        try:
            while inbox.poll(0 if batcher.has_work else None):
                msg = inbox.recv()
                if msg[0] == "submit":
                    _, rid, prompt, params = msg
                    generator = None if params.seed is None else torch.Generator().manual_seed(params.seed)
                    request = Request([prompt], params, generator,
                                      on_event=lambda events, rid=rid: out.setdefault(rid, []).extend(events))
                    try:
                        requests[rid] = batcher.submit(request)
                    except ValueError as e:
                        outbox.send(("failed", [rid], f"{e}"))
                elif msg[0] == "abort" and msg[1] in requests:
                    batcher.abort(requests.pop(msg[1]))
        except (EOFError, OSError):  # the replica is gone
            return
        try:
            batcher.step()
        except Exception as e:  # noqa: BLE001 - fail the requests in flight, keep serving
            log.exception("engine step failed")
            outbox.send(("failed", list(requests), f"engine step failed: {type(e).__name__}: {e}"))
            batcher.reset()
            requests.clear()
            out.clear()
            continue
        for rid in [rid for rid, request in requests.items() if request.done]:
            del requests[rid]
        outbox.send(("step", out, batcher.running, batcher.stepped))  # pickled here: the dict can be reused
        out.clear()


class TorchStreamer:
    """Continuous batching on the torch engine, in an engine process of its own (as vLLM's AsyncLLM runs its
    EngineCore): the replica's event loop (HTTP, detokenizing, SSE) and the model's steps then run on two cores
    instead of taking turns holding one GIL. `build` (picklable, e.g. functools.partial(load_batcher, ...)) makes
    the ContinuousBatcher in that process. Requests go over a pipe; a reader thread hands each step's events to
    the requests' asyncio queues (one wake-up of the loop per step)."""

    def __init__(self, build: Callable[[], ContinuousBatcher], max_waiting: int, retry_after_s: int, threads: int,
                 on_step: Callable[[int, int, int], None] | None = None, start_timeout_s: float = 600.0) -> None:
        import multiprocessing

        self.max_waiting, self.retry_after_s = max_waiting, retry_after_s
        self._on_step = on_step  # (running rows, waiting requests, rows the step sampled) after every step
        self._streams: dict[int, list] = {}  # request id -> [its event loop, its _Stream, rows not finished]
        self._unstarted: set[int] = set()  # submitted, no token yet: waiting for a slot (or their prefill)
        self._ids = itertools.count()
        self._send_lock = threading.Lock()
        self.running, self.dead = 0, ""
        ctx = multiprocessing.get_context("spawn")
        inbox, self._inbox = ctx.Pipe(duplex=False)  # (receiving end, sending end)
        self._outbox, outbox = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=_engine_core, args=(build, threads, inbox, outbox), name="engine-core",
                                   daemon=True)
        self.process.start()
        inbox.close()
        outbox.close()
        if not self._outbox.poll(start_timeout_s):
            self.close()
            raise EngineDead(f"the engine process did not start within {start_timeout_s:.0f} s")
        try:
            msg = self._outbox.recv()
        except EOFError:
            self.process.join(5)
            raise EngineDead(f"the engine process exited while starting (exit code {self.process.exitcode})") \
                from None
        if msg[0] == "error":
            self.close()
            raise ValueError(msg[1])
        _, self.model_cfg, self.version = msg
        self._reader = threading.Thread(target=self._read, name="engine-events", daemon=True)
        self._reader.start()

    @property
    def waiting(self) -> int:
        return len(self._unstarted)

    def open(self, prompt: list[int], params: SamplingParams) -> AsyncIterator[list[TokenEvent]]:
        if self.dead:
            raise EngineDead(self.dead)
        if self.waiting >= self.max_waiting:
            raise QueueFull(self.waiting, self.retry_after_s)
        check_request([prompt], params, self.model_cfg)  # ValueError (-> 400), as the batcher's submit
        rid = next(self._ids)
        stream = _Stream(params.n, lambda: self._abort(rid))
        self._streams[rid] = [asyncio.get_running_loop(), stream, params.n]
        self._unstarted.add(rid)
        try:
            self._send(("submit", rid, prompt, params))
        except OSError:  # the engine process is gone; the reader thread is about to notice
            self._abort(rid)
            raise EngineDead(self.dead or "the engine process exited; see the replica's log") from None
        return stream.events()

    def check_health(self) -> None:
        """Raise EngineDead when the engine process is gone (Ray Serve's health check then replaces the replica)."""
        if self.dead or not self.process.is_alive():
            raise EngineDead(self.dead or f"the engine process exited (exit code {self.process.exitcode})")

    def close(self) -> None:
        """Stop the engine process (it also exits by itself when this process dies: its inbox closes)."""
        with contextlib.suppress(OSError):
            self._inbox.close()
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)

    def _send(self, msg: tuple) -> None:
        with self._send_lock:
            self._inbox.send(msg)

    def _abort(self, rid: int) -> None:
        self._streams.pop(rid, None)
        self._unstarted.discard(rid)
        if not self.dead:
            with contextlib.suppress(OSError):
                self._send(("abort", rid))

    def _read(self) -> None:
        """The reader thread: each message of the engine process to the requests' event loops."""
        while True:
            try:
                msg = self._outbox.recv()
            except (EOFError, OSError):
                self.process.join(5)
                self.dead = f"the engine process exited (exit code {self.process.exitcode}); see the replica's log"
                self._fail(list(self._streams), EngineDead(self.dead))
                return
            if msg[0] == "failed":
                self._fail(msg[1], RuntimeError(msg[2]))
                continue
            _, out, self.running, stepped = msg
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, list[TokenEvent]]]] = {}
            for rid, events in out.items():
                self._unstarted.discard(rid)
                entry = self._streams.get(rid)
                if entry is not None:
                    by_loop.setdefault(entry[0], []).append((entry[1], events))
                    entry[2] -= sum(e.finish_reason is not None for e in events)
                    if not entry[2]:
                        self._streams.pop(rid, None)  # (the client may have gone at the same moment)
            for loop, deliveries in by_loop.items():
                loop.call_soon_threadsafe(_deliver, deliveries)
            if self._on_step is not None:
                self._on_step(self.running, self.waiting, stepped)

    def _fail(self, rids: list[int], error: BaseException) -> None:
        for rid in rids:
            self._unstarted.discard(rid)
            entry = self._streams.pop(rid, None)
            if entry is not None:
                entry[0].call_soon_threadsafe(entry[1].queue.put_nowait, error)


def _deliver(deliveries: list[tuple[_Stream, list[TokenEvent]]]) -> None:
    for stream, events in deliveries:
        stream.queue.put_nowait(events)


class VLLMStreamer:
    """vLLM's AsyncLLM (continuous batching, paged KV cache, its own scheduler) behind the same interface."""

    def __init__(self, async_llm: Any, decode: Callable[[list[int]], str], max_waiting: int,
                 retry_after_s: int) -> None:
        self.llm, self.decode = async_llm, decode
        self.max_waiting, self.retry_after_s = max_waiting, retry_after_s
        self._ids = itertools.count()
        self.running = self.waiting = 0  # requests in flight (vLLM schedules them itself)

    def open(self, prompt: list[int], params: SamplingParams) -> AsyncIterator[list[TokenEvent]]:
        if self.running >= self.max_waiting:
            raise QueueFull(self.running, self.retry_after_s)
        return self._generate(prompt, params, f"rl-{next(self._ids)}")

    def check_health(self) -> None:
        if self.llm.errored:
            raise EngineDead("vLLM's engine failed; see the replica's log")

    def close(self) -> None:
        self.llm.shutdown()
        # dropped, so that AsyncLLM.__del__ (which shuts down again) runs now, not at interpreter exit, where it
        # fails on vLLM's torn-down module globals ("TypeError: 'NoneType' object is not callable")
        self.llm = None

    async def _generate(self, prompt: list[int], params: SamplingParams,
                        request_id: str) -> AsyncIterator[list[TokenEvent]]:
        from rayllama.vllm_engine import vllm_sampling_params

        vparams = vllm_sampling_params(params, delta=True)
        tokens: dict[int, list[int]] = {}
        finished: set[int] = set()
        self.running += 1
        try:
            async for out in self.llm.generate({"prompt_token_ids": prompt}, vparams, request_id=request_id):
                events = []
                for choice in out.outputs:
                    if choice.index in finished:
                        continue
                    have = tokens.setdefault(choice.index, [])
                    for k, tok in enumerate(choice.token_ids):
                        have.append(tok)
                        entry = (choice.logprobs or [])[k] if choice.logprobs else None
                        lp, top = _vllm_logprobs(entry, tok, params.top_logprobs)
                        reason = None
                        if params.stop and any(s in self.decode(have) for s in params.stop):
                            reason = "stop"
                        elif k == len(choice.token_ids) - 1 and choice.finish_reason in ("stop", "length"):
                            reason = choice.finish_reason
                        events.append(TokenEvent(choice.index, tok, lp, top, reason))
                        if reason is not None:
                            finished.add(choice.index)
                            break
                if events:
                    yield events
                if len(finished) == params.n:
                    break
        finally:
            self.running -= 1
            if len(finished) < params.n or params.stop:
                with contextlib.suppress(Exception):
                    await self.llm.abort(request_id)


def _vllm_logprobs(entry: dict | None, token: int, k: int) -> tuple[float, list[tuple[int, float]] | None]:
    """(raw logprob of `token`, its k best (token, logprob)) from one vLLM logprobs dict {token: Logprob}."""
    if not entry:
        return float("nan"), None
    lp = entry[token].logprob if token in entry else float("nan")
    if not k:
        return lp, None
    best = sorted(((t, v.logprob) for t, v in entry.items()), key=lambda tv: -tv[1])[:k]
    return lp, best
