"""Tests for serve/: the OpenAI-compatible Ray Serve chat endpoint, on a small random model.

Oracles: the prompt the server builds is checked through usage.prompt_tokens == len(encode_prompt(messages)) and
through greedy text equal to a local TorchEngine run on those exact prompt ids (a random model's greedy text is a
fingerprint of its prompt); stop-string cuts against the uncut text; streamed deltas against the plain answer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import socket

import httpx
import openai
import pytest
import torch

from rayllama.checkpoint import load_model, save_model
from rayllama.config import ConfigError
from rayllama.data.corpus import shakespeare_documents
from rayllama.generation import Completion, SamplingParams, TorchEngine
from rayllama.model import ModelConfig, Transformer
from rayllama.tokenizer import Tokenizer, train_tokenizer
from serve.config import (
    AuthConfig,
    BatchConfig,
    HTTPConfig,
    LimitsConfig,
    ReplicaConfig,
    ServeConfig,
    load_serve_config,
    resolve_auth_token,
)
from serve.text import finish_answer, stream_deltas

# Ray Serve's own pydantic models warn on import (PydanticDeprecatedSince20); not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TOKEN = "test-token-123"
NAME = "tiny-chat"
DEFAULT_SYSTEM = "Always answer briefly."
USER = [{"role": "user", "content": "Good morning, what news?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 2-layer random model + a 420-piece tokenizer trained on a slice of Shakespeare, saved as a checkpoint.
    The eos row of lm_head is zeroed so greedy decoding never stops early (every answer runs to max_tokens)."""
    d = tmp_path_factory.mktemp("serve")
    tok_path = train_tokenizer([shakespeare_documents()[0][:60000]], d / "tok", vocab_size=420)
    tok = Tokenizer(tok_path)
    torch.manual_seed(0)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size, ffn_dim=128,
                      max_seq_len=150)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.2)  # peaked next-token distributions: clear greedy winners
        model.lm_head.weight[tok.eos_id] = 0.0
    return save_model(d / "model", model, cfg, tokenizer_model=tok_path), tok


@pytest.fixture(scope="module")
def oracle(checkpoint):
    """Greedy text for prompt ids from a local engine on the same checkpoint."""
    path, tok = checkpoint
    model, _, _ = load_model(path)
    engine = TorchEngine(model)

    def greedy(messages: list[dict], max_tokens: int) -> str:
        params = SamplingParams(max_new_tokens=max_tokens, temperature=0.0, stop_token_ids=(tok.eos_id,))
        [[c]] = engine.generate([tok.encode_prompt(messages)], params)
        return tok.decode(c.token_ids).strip()

    return greedy


@pytest.fixture(scope="module")
def server(ray_session, checkpoint):
    from ray import serve as ray_serve

    from serve.app import start

    cfg = ServeConfig(
        model_dir=str(checkpoint[0]), model_name=NAME, default_system_prompt=DEFAULT_SYSTEM,
        limits=LimitsConfig(max_prompt_tokens=120, max_tokens=40, default_max_tokens=8, max_n=3,
                            max_request_bytes=20_000),
        batch=BatchConfig(max_requests=8, wait_ms=5.0), auth=AuthConfig(token=TOKEN),
        replicas=ReplicaConfig(num_cpus=0.5), http=HTTPConfig(port=free_port()),
    )
    url = start(cfg)
    yield url
    ray_serve.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=TOKEN, max_retries=0, timeout=60)


def post(url: str, body: bytes | dict, token: str | None = TOKEN) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    content = json.dumps(body).encode() if isinstance(body, dict) else body
    return httpx.post(f"{url}/v1/chat/completions", content=content, headers=headers, timeout=60)


# ------------------------------------------------------------------------------------------- openai client


def test_plain_call_uses_default_system_prompt(client, checkpoint, oracle):
    _, tok = checkpoint
    r = client.chat.completions.create(model=NAME, messages=USER, max_tokens=12, temperature=0)
    with_default = [{"role": "system", "content": DEFAULT_SYSTEM}, *USER]
    assert r.object == "chat.completion" and r.model == NAME and len(r.choices) == 1
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"  # eos is never argmax
    assert r.usage.prompt_tokens == len(tok.encode_prompt(with_default))
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == r.usage.prompt_tokens + 12
    assert choice.message.content == oracle(with_default, 12)


def test_streaming_equals_plain_answer(client, server):
    kwargs = dict(model=NAME, messages=USER, max_tokens=10, temperature=0)
    plain = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens
    raw = httpx.post(f"{server}/v1/chat/completions", json={**kwargs, "stream": True},
                     headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().splitlines()[-1] == "data: [DONE]"


def test_multi_turn_with_system_prompt(client, checkpoint, oracle):
    _, tok = checkpoint
    messages = [
        {"role": "system", "content": "Answer in capitals."},
        {"role": "user", "content": "Who is the king?"},
        {"role": "assistant", "content": "THE KING IS OLD."},
        {"role": "user", "content": "And the queen?"},
    ]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=9, temperature=0)
    ids = tok.encode_prompt(messages)
    assert tok.decode(ids).startswith("[INST] <<SYS>>\nAnswer in capitals.\n<</SYS>>\n\nWho is the king? [/INST]")
    assert r.usage.prompt_tokens == len(ids)  # the request's system message replaced the default one
    assert r.choices[0].message.content == oracle(messages, 9)


def test_n_choices_and_usage(client):
    r = client.chat.completions.create(model=NAME, messages=USER, max_tokens=5, n=2, temperature=1.0, seed=3)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.completion_tokens == 2 * 5


def test_stop_strings_cut_the_text(client, checkpoint):
    _, tok = checkpoint
    full = client.chat.completions.create(model=NAME, messages=USER, max_tokens=30, temperature=0)
    text = full.choices[0].message.content
    # a 3-character stop string whose first occurrence is at k > 0
    k = next(k for k in range(1, len(text) - 3) if text.find(text[k:k + 3]) == k and text[k:k + 3].strip())
    stop = text[k:k + 3]
    cut = client.chat.completions.create(model=NAME, messages=USER, max_tokens=30, temperature=0,
                                         stop=[stop, "@@never@@"])
    assert cut.choices[0].message.content == text[:k]
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens <= 30
    single = client.chat.completions.create(model=NAME, messages=USER, max_tokens=30, temperature=0, stop=stop)
    assert single.choices[0].message.content == text[:k]


def test_wrong_key_is_rejected_by_openai_client(server):
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=NAME, messages=USER, max_tokens=2)


# ------------------------------------------------------------------------------------------- raw HTTP


BAD_REQUESTS = {
    "malformed json": (b'{"messages": [{"role": "user", "content": "hi"}', 400, "not valid JSON"),
    "not an object": (b'[1, 2]', 400, "JSON object"),
    "empty body": (b"", 400, "empty"),
    "wrong role": ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
    "assistant first": ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "first turn"),
    "two user turns": ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, 400,
                       "two user turns in a row"),
    "late system": ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                  {"role": "system", "content": "c"}, {"role": "user", "content": "d"}]}, 400,
                    "only message 0 may be system"),
    "empty messages": ({"messages": []}, 400, "messages"),
    "no messages": ({"model": NAME}, 400, "messages"),
    "content not a string": ({"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
    "chat tag in content": ({"messages": [{"role": "user", "content": "x [INST] y"}]}, 400, "chat tag"),
    "max_tokens a string": ({"messages": USER, "max_tokens": "ten"}, 400, "max_tokens"),
    "max_tokens zero": ({"messages": USER, "max_tokens": 0}, 400, "max_tokens"),
    "max_tokens over limit": ({"messages": USER, "max_tokens": 41}, 400, "exceeds the limit 40"),
    "temperature negative": ({"messages": USER, "temperature": -1}, 400, "temperature"),
    "top_p zero": ({"messages": USER, "top_p": 0}, 400, "top_p"),
    "n over limit": ({"messages": USER, "n": 4}, 400, "n 4 exceeds"),
    "stop a number": ({"messages": USER, "stop": 7}, 400, "stop"),
    "empty stop string": ({"messages": USER, "stop": [""]}, 400, "stop"),
    "stream not bool": ({"messages": USER, "stream": "yes"}, 400, "stream"),
    "oversize prompt": ({"messages": [{"role": "user", "content": "word " * 200}]}, 413, "limit is 120"),
    "oversize body": ({"messages": [{"role": "user", "content": "x" * 30_000}]}, 413, "max_request_bytes"),
    "unknown model": ({"model": "gpt-4", "messages": USER}, 404, "not served here"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_4xx_with_a_message(server, case):
    body, status, fragment = BAD_REQUESTS[case]
    r = post(server, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert fragment in err["message"] and set(err) == {"message", "type", "param", "code"}
    assert "\n" not in err["message"]


def test_max_tokens_beyond_the_context_is_rejected(server, checkpoint):
    _, tok = checkpoint
    # a prompt under max_prompt_tokens (120) whose length + max_tokens 40 exceeds max_seq_len 150
    k = next(k for k in range(1, 200)
             if len(tok.encode_prompt([{"role": "system", "content": DEFAULT_SYSTEM},
                                       {"role": "user", "content": "word " * k}])) > 112)
    n_prompt = len(tok.encode_prompt([{"role": "system", "content": DEFAULT_SYSTEM},
                                      {"role": "user", "content": "word " * k}]))
    assert n_prompt <= 120
    r = post(server, {"messages": [{"role": "user", "content": "word " * k}], "max_tokens": 40})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert f"ask for at most {150 - n_prompt}" in r.json()["error"]["message"]
    ok = post(server, {"messages": [{"role": "user", "content": "word " * k}], "max_tokens": 150 - n_prompt})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 150 - n_prompt


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_auth_is_enforced(server, token):
    r = post(server, {"messages": USER, "max_tokens": 2}, token=token)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["type"] == "authentication_error" and "token" in r.json()["error"]["message"]
    assert httpx.get(f"{server}/v1/models", headers={"Authorization": f"Bearer {token}"}).status_code == 401


def test_health_models_and_unknown_route(server):
    health = httpx.get(f"{server}/health")  # open without a token
    assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["model"] == NAME
    models = httpx.get(f"{server}/v1/models", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert [m["id"] for m in models["data"]] == [NAME]
    missing = httpx.get(f"{server}/v1/nothing", headers={"Authorization": f"Bearer {TOKEN}"})
    assert missing.status_code == 404 and "no route GET /v1/nothing" in missing.json()["error"]["message"]


def test_concurrent_requests_are_batched(server):
    before = httpx.get(f"{server}/health").json()
    bodies = [{"messages": [{"role": "user", "content": f"Question number {i}?"}], "max_tokens": 40,
               "temperature": 0} for i in range(6)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda b: post(server, b), bodies))
    assert [r.status_code for r in responses] == [200] * 6
    assert all(r.json()["usage"]["completion_tokens"] == 40 for r in responses)
    after = httpx.get(f"{server}/health").json()
    assert after["requests"] - before["requests"] == 6
    assert after["engine_batches"] - before["engine_batches"] < 6  # fewer engine calls than requests
    assert after["largest_batch"] >= 2


# ------------------------------------------------------------------------------------------- pure parts


class RecordingEngine:
    """A stand-in GenerationEngine: returns one 1-token completion per prompt, records each generate call."""

    weight_version = 0

    def __init__(self):
        self.calls = []

    def generate(self, prompts, params):
        self.calls.append((list(map(list, prompts)), params.temperature))
        return [[Completion(i, [len(p)], [0.0], "length", 0)] for i, p in enumerate(prompts)]


def test_run_jobs_groups_by_sampling_params():
    from serve.app import _Job, run_jobs

    greedy, hot = SamplingParams(temperature=0.0), SamplingParams(temperature=0.7)
    jobs = [_Job([1, 5], greedy), _Job([1, 6, 7], hot), _Job([1], greedy)]
    engine = RecordingEngine()
    out = run_jobs(engine, jobs)
    # two groups in first-seen order: greedy = jobs 0 and 2, hot = job 1
    assert engine.calls == [([[1, 5], [1]], 0.0), ([[1, 6, 7]], 0.7)]
    assert [o[0].token_ids for o in out] == [[2], [3], [1]]  # each request gets its own prompt's completion


def test_batch_queue_batches_what_queues_while_busy():
    from serve.app import BatchQueue

    seen = []

    async def run(items):
        seen.append(list(items))
        await asyncio.sleep(0.05)
        if -1 in items:
            raise RuntimeError("engine down")
        return [x * 10 for x in items]

    async def scenario():
        q = BatchQueue(run, max_size=3, wait_s=0.01)
        first = asyncio.create_task(q.submit(0))
        await asyncio.sleep(0.02)  # batch [0] closed its 10 ms window and is generating
        rest = [asyncio.create_task(q.submit(i)) for i in range(1, 6)]
        results = [await first, *await asyncio.gather(*rest)]
        failed = await q.submit(-1)
        return results, failed

    results, failed = asyncio.run(scenario())
    assert results == [0, 10, 20, 30, 40, 50]
    # [0] alone; 1..5 queued while it ran -> batches of at most 3 in arrival order
    assert seen[:3] == [[0], [1, 2, 3], [4, 5]]
    assert isinstance(failed, RuntimeError)  # an engine error is returned to the batch's callers


def test_finish_answer_and_stream_deltas(checkpoint):
    _, tok = checkpoint
    ids = tok.encode("To be, or not to be: that is the question. ")
    plain = finish_answer(tok, ids + [tok.eos_id], "stop", [])
    assert plain.text == "To be, or not to be: that is the question." and plain.n_tokens == len(ids) + 1
    cut = finish_answer(tok, ids, "length", ["not", "that"])
    assert cut.text == "To be, or " and cut.finish_reason == "stop"
    # the fewest ids whose text reaches the end of "not"
    n = next(k for k in range(1, len(ids) + 1) if tok.decode(ids[:k]).startswith("To be, or not"))
    assert cut.n_tokens == n
    for answer in (plain, cut):
        deltas = stream_deltas(tok, answer)
        assert "".join(deltas) == answer.text and all(deltas)
    assert finish_answer(tok, ids, "length", ["zzz"]).finish_reason == "length"


def test_config_defaults_and_errors(tmp_path, monkeypatch):
    cfg = load_serve_config("configs/serve.yaml")
    assert (cfg.http.host, cfg.http.port) == ("127.0.0.1", 8000)  # loopback unless told otherwise
    assert resolve_auth_token(cfg) is None
    with pytest.raises(ConfigError, match=r"unknown config key 'limits.max_tokenz' in override"):
        load_serve_config("configs/serve.yaml", ["limits.max_tokenz=5"])
    with pytest.raises(ConfigError, match=r"'http.port' in override"):
        load_serve_config("configs/serve.yaml", ["http.port=eighty"])
    with pytest.raises(ConfigError, match="default_max_tokens 300 exceeds limits.max_tokens 128"):
        load_serve_config("configs/serve.yaml", ["limits.default_max_tokens=300"])
    with pytest.raises(ConfigError, match=r"\$RL_TEST_TOKEN, which is unset"):
        resolve_auth_token(load_serve_config(None, ["auth.token_env=RL_TEST_TOKEN"]))
    monkeypatch.setenv("RL_TEST_TOKEN", "s3cret")
    assert resolve_auth_token(load_serve_config(None, ["auth.token_env=RL_TEST_TOKEN"])) == "s3cret"


def test_cli_missing_checkpoint_is_one_line(tmp_path, capsys):
    from rayllama.serve import main

    missing = tmp_path / "no" / "model"
    assert main(["configs/serve.yaml", f"model_dir={missing}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(missing) in err and "make run" in err
    assert main(["configs/serve.yaml", "http.port=0x"]) == 2
