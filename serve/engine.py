"""The endpoint's view of a generation engine: submit one request, get its tokens step by step as they are made.

    stream = engine.open(prompt_ids, params)     # QueueFull (-> 429) when too many requests already wait
    async for events in stream: ...              # list[TokenEvent] of the engine steps since the last one;
                                                 # ends when every choice has finished; leaving the loop
                                                 # early (client gone) aborts the request

TorchStreamer drives the shared `ContinuousBatcher` (rayllama.generation) from one engine thread: it steps while
any request runs or waits and hands each step's tokens to the request's asyncio queue. VLLMStreamer does the same
over vLLM's async engine (`AsyncLLM`), which batches continuously itself; stop strings are checked here on the
decoded text (the engine runs without a tokenizer) and a hit aborts the vLLM request.
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

from rayllama.generation import ContinuousBatcher, Request, SamplingParams, TokenEvent

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


class TorchStreamer:
    """Continuous batching on the torch engine: one thread steps the shared ContinuousBatcher."""

    def __init__(self, batcher: ContinuousBatcher, max_waiting: int, retry_after_s: int, threads: int,
                 on_step: Callable[[int, int], None] | None = None) -> None:
        self.batcher, self.max_waiting, self.retry_after_s = batcher, max_waiting, retry_after_s
        self._on_step = on_step  # (running rows, waiting requests) after every step: the gauges
        self._streams: dict[int, tuple[asyncio.AbstractEventLoop, _Stream, Request]] = {}
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(threads,), name="engine", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return self.batcher.waiting

    @property
    def running(self) -> int:
        return self.batcher.running

    def open(self, prompt: list[int], params: SamplingParams) -> AsyncIterator[list[TokenEvent]]:
        if self.batcher.waiting >= self.max_waiting:
            raise QueueFull(self.batcher.waiting, self.retry_after_s)
        loop = asyncio.get_running_loop()
        generator = None if params.seed is None else torch.Generator().manual_seed(params.seed)
        request = Request([prompt], params, generator)
        stream = _Stream(params.n, lambda: self.batcher.abort(request))
        request.on_event = lambda events: loop.call_soon_threadsafe(stream.queue.put_nowait, events)
        self._streams[request.id] = (loop, stream, request)
        self.batcher.submit(request)  # ValueError (-> 400) for a prompt the engine refuses
        self._wake.set()
        return stream.events()

    def _loop(self, threads: int) -> None:
        torch.set_num_threads(threads)
        while True:
            self._wake.wait()
            self._wake.clear()
            while self.batcher.has_work:
                try:
                    self.batcher.step()
                except Exception as e:  # noqa: BLE001 - fail the requests in flight, keep serving
                    log.exception("engine step failed")
                    self._fail_all(e)
                self._forget_done()
                if self._on_step is not None:
                    self._on_step(self.batcher.running, self.batcher.waiting)

    def _forget_done(self) -> None:
        for rid in [rid for rid, (_, _, request) in self._streams.items() if request.done]:
            del self._streams[rid]

    def _fail_all(self, error: Exception) -> None:
        for loop, stream, _ in list(self._streams.values()):
            loop.call_soon_threadsafe(stream.queue.put_nowait, error)
        self._streams.clear()
        self.batcher.reset()


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
