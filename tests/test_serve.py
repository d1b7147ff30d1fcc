"""Tests for serve/: the OpenAI-compatible Ray Serve chat endpoint, on a small random model.

Oracles: the prompt the server builds is checked through usage.prompt_tokens == len(encode_prompt(messages)) and
through greedy text equal to a local TorchEngine run on those exact prompt ids (a random model's greedy text is a
fingerprint of its prompt); stop-string cuts against the uncut text; streamed deltas against the plain answer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import socket
import statistics
import threading
import time

import httpx
import openai
import pytest
import torch

from rayllama.checkpoint import load_model, save_model
from rayllama.config import ConfigError
from rayllama.data.corpus import shakespeare_documents
from rayllama.generation import SamplingParams, TokenEvent, TorchEngine
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
from serve.engine import every_n_steps
from serve.text import TextStream, finish_answer

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

    def greedy(messages: list[dict] | list[int], max_tokens: int, ids: bool = False) -> str | list[int]:
        """Greedy text of a dialogue (or of raw prompt ids); ids=True: the generated ids."""
        prompt = messages if isinstance(messages[0], int) else tok.encode_prompt(messages)
        params = SamplingParams(max_new_tokens=max_tokens, temperature=0.0, stop_token_ids=(tok.eos_id,))
        [[c]] = engine.generate([prompt], params)
        return c.token_ids if ids else tok.decode(c.token_ids).strip()

    greedy.model = model
    return greedy


@pytest.fixture(scope="module")
def server(ray_session, checkpoint):
    from ray import serve as ray_serve

    from serve.app import start

    cfg = ServeConfig(
        model_dir=str(checkpoint[0]), model_name=NAME, default_system_prompt=DEFAULT_SYSTEM,
        limits=LimitsConfig(max_prompt_tokens=120, max_tokens=128, default_max_tokens=8, max_n=3,
                            max_request_bytes=20_000),
        batch=BatchConfig(max_rows=8), auth=AuthConfig(token=TOKEN),
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
    # the engine stopped at the token that completed the stop string: usage counts no token beyond it
    ids = tok.encode_prompt([{"role": "system", "content": DEFAULT_SYSTEM}, *USER])
    engine_ids = TorchEngine(load_model(checkpoint[0])[0]).generate(
        [ids], SamplingParams(max_new_tokens=30, temperature=0.0, stop_token_ids=(tok.eos_id,)))[0][0].token_ids
    assert cut.usage.completion_tokens == finish_answer(tok, engine_ids, "length", [stop]).n_tokens < 30
    single = client.chat.completions.create(model=NAME, messages=USER, max_tokens=30, temperature=0, stop=stop)
    assert single.choices[0].message.content == text[:k]


def test_wrong_key_is_rejected_by_openai_client(server):
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=NAME, messages=USER, max_tokens=2)


def test_first_streamed_token_arrives_early(client, checkpoint):
    """A 128-token answer streams token by token: its first content chunk arrives before 20% of the same request's
    unstreamed time (the issue's ratio), and within the first half of the stream's own duration (a replayed
    answer's chunks all arrive together: a ratio near 1). Five rounds, each the unstreamed request and then the
    streamed one back to back; the medians are compared, so one stalled step on the shared CPUs, in either
    request, decides nothing (a single pair gave 0.22 under CI load once; medians under load here: about 0.15)."""
    _, tok = checkpoint
    messages = [{"role": "system", "content": "."}, {"role": "user", "content": "Hi"}]
    max_tokens = min(128, 150 - len(tok.encode_prompt(messages)))
    assert max_tokens >= 120
    kwargs = dict(model=NAME, messages=messages, max_tokens=max_tokens, temperature=0)
    whole = client.chat.completions.create(**kwargs)  # also warms up
    assert whole.usage.completion_tokens == max_tokens
    unstreamed, firsts, self_ratios = [], [], []
    for _ in range(5):
        t0 = time.perf_counter()
        assert client.chat.completions.create(**kwargs).choices[0].message.content == whole.choices[0].message.content
        unstreamed.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        first, last, pieces = None, None, []
        for c in client.chat.completions.create(**kwargs, stream=True):
            if c.choices and c.choices[0].delta.content:
                last = time.perf_counter() - t0
                first = first or last
                pieces.append(c.choices[0].delta.content)
        firsts.append(first)
        self_ratios.append(first / last)
        assert "".join(pieces) == whole.choices[0].message.content and len(pieces) > max_tokens // 4
    ratio = statistics.median(firsts) / statistics.median(unstreamed)
    assert ratio < 0.2, (firsts, unstreamed)
    assert statistics.median(self_ratios) < 0.5, self_ratios


def test_greedy_answers_equal_the_engine_alone_and_in_a_busy_batch(client, server, oracle):
    """Greedy answers do not depend on what else runs: alone, and while sampled streams join and leave."""
    questions = [[{"role": "user", "content": q}] for q in ("Who is there?", "Speak, what news?", "Stand ho!")]
    with_default = [[{"role": "system", "content": DEFAULT_SYSTEM}, *q] for q in questions]
    alone = [client.chat.completions.create(model=NAME, messages=q, max_tokens=30, temperature=0)
             for q in questions]
    stop = threading.Event()

    def noise(i: int) -> None:  # sampled streams of mixed lengths, back to back, until the greedy ones finish
        k = 0
        while not stop.is_set():
            list(client.chat.completions.create(model=NAME, messages=USER, max_tokens=[5, 37, 11][k % 3],
                                                temperature=1.2, seed=i * 100 + k, n=1 + k % 2, stream=True))
            k += 1

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        busy = [pool.submit(noise, i) for i in range(3)]
        time.sleep(0.3)
        crowded = list(pool.map(lambda q: client.chat.completions.create(model=NAME, messages=q, max_tokens=30,
                                                                       temperature=0), questions * 2))
        stop.set()
        for f in busy:
            f.result()
    assert httpx.get(f"{server}/health").json()["largest_batch"] >= 4
    for i, dialog in enumerate(with_default):
        want = oracle(dialog, 30)
        assert alone[i].choices[0].message.content == want
        assert crowded[i].choices[0].message.content == want == crowded[i + 3].choices[0].message.content


def test_logprobs_are_the_models_log_softmax(client, checkpoint, oracle):
    _, tok = checkpoint
    dialog = [{"role": "system", "content": DEFAULT_SYSTEM}, *USER]
    r = client.chat.completions.create(model=NAME, messages=USER, max_tokens=10, temperature=0, logprobs=True,
                                       top_logprobs=3)
    ids = oracle(dialog, 10, ids=True)
    prompt = tok.encode_prompt(dialog)
    with torch.no_grad():
        logp = torch.log_softmax(oracle.model(torch.tensor([prompt + ids]))[0].double(), -1)  # (T, V)
    content = r.choices[0].logprobs.content
    assert [c.token for c in content] == [tok.id_to_piece(t).replace("\u2581", " ") for t in ids]
    for i, entry in enumerate(content):
        row = logp[len(prompt) - 1 + i]
        assert abs(entry.logprob - float(row[ids[i]])) < 1e-4
        values, best = row.topk(3)
        assert [t.token for t in entry.top_logprobs] == [tok.id_to_piece(t).replace("\u2581", " ")
                                                         for t in best.tolist()]
        assert max(abs(t.logprob - float(v)) for t, v in zip(entry.top_logprobs, values, strict=True)) < 1e-4
    plain = client.chat.completions.create(model=NAME, messages=USER, max_tokens=3, temperature=0)
    assert plain.choices[0].logprobs is None  # only when asked
    chunks = [c for c in client.chat.completions.create(model=NAME, messages=USER, max_tokens=10, temperature=0,
                                                        logprobs=True, stream=True) if c.choices]
    streamed = [e.logprob for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert streamed == pytest.approx([e.logprob for e in content], abs=1e-6)


def test_penalties_and_seed(client):
    kwargs = dict(model=NAME, messages=USER, max_tokens=30, temperature=0)
    plain = client.chat.completions.create(**kwargs).choices[0].message.content
    # negative penalties reward repeating what was generated (the exact rule is tested in test_generation.py)
    penalised = client.chat.completions.create(**kwargs, presence_penalty=-2.0, frequency_penalty=-1.0)
    assert penalised.choices[0].message.content != plain
    sampled = [client.chat.completions.create(model=NAME, messages=USER, max_tokens=12, temperature=1.0, seed=s)
               for s in (7, 7, 8)]
    texts = [r.choices[0].message.content for r in sampled]
    assert texts[0] == texts[1] != texts[2]


def test_completions_route(server, checkpoint, oracle):
    _, tok = checkpoint
    prompt = tok.encode("To be, or not to be", bos=True)
    r = httpx.post(f"{server}/v1/completions", json={"model": NAME, "prompt": prompt, "max_tokens": 12,
                                                     "temperature": 0, "logprobs": 2},
                   headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60).json()
    ids = oracle(prompt, 12, ids=True)
    assert r["object"] == "text_completion" and r["choices"][0]["text"] == tok.decode(ids)
    assert r["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 12, "total_tokens": len(prompt) + 12}
    lp = r["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == 12 and all(len(top) == 2 for top in lp["top_logprobs"])
    text = openai.OpenAI(base_url=f"{server}/v1", api_key=TOKEN, max_retries=0).completions.create(
        model=NAME, prompt="To be, or not to be", max_tokens=12, temperature=0)
    assert text.choices[0].text == r["choices"][0]["text"]  # text prompts get BOS, as the token-id one had
    streamed = list(openai.OpenAI(base_url=f"{server}/v1", api_key=TOKEN, max_retries=0).completions.create(
        model=NAME, prompt="To be, or not to be", max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text.choices[0].text
    assert streamed[-1].usage.completion_tokens == 12


def test_disconnected_stream_frees_its_slot(server):
    def generated() -> float:
        metrics = httpx.get(f"{server}/metrics").text
        return sum(float(line.split()[-1]) for line in metrics.splitlines()
                   if line.startswith("rayllama_generation_tokens_total"))

    before = generated()
    body = {"model": NAME, "prompt": [1, 5, 6, 7], "max_tokens": 128, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers={"Authorization": f"Bearer {TOKEN}"},
                      timeout=60) as r:
        next(r.iter_lines())  # the first token is out: the request is running
    deadline = time.time() + 20
    while httpx.get(f"{server}/health").json()["running"] and time.time() < deadline:
        time.sleep(0.02)
    assert httpx.get(f"{server}/health").json()["running"] == 0
    time.sleep(0.2)
    assert generated() - before < 128  # aborted before its answer was complete


def test_metrics_move_under_load(server):
    def scrape() -> dict[str, float]:
        out: dict[str, float] = {}
        for line in httpx.get(f"{server}/metrics").text.splitlines():
            if line.startswith("rayllama_") and not line.startswith("#"):
                name, value = line.split("{")[0].split(" ")[0], float(line.split()[-1])
                out[name] = out.get(name, 0.0) + value
                if 'status="400"' in line:
                    out[name + '{status="400"}'] = value
        return out

    before = scrape()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: post(server, {"messages": USER, "max_tokens": 6, "temperature": 0}), range(8)))
    post(server, {"messages": USER, "max_tokens": 0})
    after = scrape()
    for name, grew_by in (("rayllama_requests_total", 9), ('rayllama_requests_total{status="400"}', 1),
                          ("rayllama_generation_tokens_total", 48),
                          ("rayllama_time_to_first_token_seconds_count", 8),
                          ("rayllama_inter_token_latency_seconds_count", 40)):
        assert after[name] - before.get(name, 0.0) >= grew_by, name
    assert after["rayllama_prompt_tokens_total"] > before.get("rayllama_prompt_tokens_total", 0.0)
    assert "rayllama_queue_length" in after and "rayllama_running_batch_size" in after


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
    "max_tokens over limit": ({"messages": USER, "max_tokens": 129}, 400, "exceeds the limit 128"),
    "temperature negative": ({"messages": USER, "temperature": -1}, 400, "temperature"),
    "top_p zero": ({"messages": USER, "top_p": 0}, 400, "top_p"),
    "n over limit": ({"messages": USER, "n": 4}, 400, "n 4 exceeds"),
    "stop a number": ({"messages": USER, "stop": 7}, 400, "stop"),
    "empty stop string": ({"messages": USER, "stop": [""]}, 400, "stop"),
    "stream not bool": ({"messages": USER, "stream": "yes"}, 400, "stream"),
    "oversize prompt": ({"messages": [{"role": "user", "content": "word " * 200}]}, 413, "limit is 120"),
    "oversize body": ({"messages": [{"role": "user", "content": "x" * 30_000}]}, 413, "max_request_bytes"),
    "unknown model": ({"model": "gpt-4", "messages": USER}, 404, "not served here"),
    # fields we do not implement are refused by name
    "tools": ({"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools:"),
    "tool_choice": ({"messages": USER, "tool_choice": "auto"}, 400, "tool_choice:"),
    "response_format json": ({"messages": USER, "response_format": {"type": "json_object"}}, 400,
                             "response_format:"),
    "logit_bias": ({"messages": USER, "logit_bias": {"5": 10}}, 400, "logit_bias:"),
    "image part": ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                              {"type": "image_url", "image_url": {"url": "x"}}]}]},
                   400, "messages.0.content.1.type"),
    "functions": ({"messages": USER, "functions": [{"name": "f"}]}, 400, "functions:"),
    # malformed values of the fields we do implement
    "presence_penalty too big": ({"messages": USER, "presence_penalty": 3}, 400, "presence_penalty"),
    "frequency_penalty a string": ({"messages": USER, "frequency_penalty": "x"}, 400, "frequency_penalty"),
    "top_logprobs too many": ({"messages": USER, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    "top_logprobs without logprobs": ({"messages": USER, "top_logprobs": 2}, 400, "top_logprobs"),
    "logprobs a string": ({"messages": USER, "logprobs": "yes"}, 400, "logprobs"),
    "max_completion_tokens zero": ({"messages": USER, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    "max_completion_tokens over limit": ({"messages": USER, "max_completion_tokens": 500}, 400,
                                         "exceeds the limit 128"),
    "n a string": ({"messages": USER, "n": "two"}, 400, "n"),
    "seed a float": ({"messages": USER, "seed": 1.5}, 400, "seed"),
    "include_usage a string": ({"messages": USER, "stream": True, "stream_options": {"include_usage": "yes"}}, 400,
                               "stream_options.include_usage"),
}

BAD_COMPLETIONS = {
    "no prompt": ({"model": NAME}, 400, "prompt"),
    "prompt an object": ({"prompt": {"text": "hi"}}, 400, "prompt"),
    "token id outside the vocabulary": ({"prompt": [1, 100000]}, 400, "token id 100000"),
    "empty token list": ({"prompt": []}, 400, "prompt"),
    "echo": ({"prompt": "hi", "echo": True}, 400, "echo:"),
    "suffix": ({"prompt": "hi", "suffix": "end"}, 400, "suffix:"),
    "best_of": ({"prompt": "hi", "best_of": 3}, 400, "best_of:"),
    "logprobs too many": ({"prompt": "hi", "logprobs": 50}, 400, "logprobs"),
}


@pytest.mark.parametrize("case", list(BAD_COMPLETIONS))
def test_bad_completions_get_4xx_naming_the_field(server, case):
    body, status, fragment = BAD_COMPLETIONS[case]
    r = httpx.post(f"{server}/v1/completions", json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]["message"] and "\n" not in r.json()["error"]["message"]


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
    # greedy: eos is never the argmax of this model, so the answer runs to max_tokens (sampled at temperature 1,
    # it could draw eos early: the test then depended on the model not stopping)
    ok = post(server, {"messages": [{"role": "user", "content": "word " * k}], "max_tokens": 150 - n_prompt,
                       "temperature": 0})
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
    assert after["largest_batch"] >= 2  # requests ran in one batch
    assert after["running"] == 0 and after["waiting"] == 0


# ------------------------------------------------------------------------------------------- pure parts


def test_finish_answer_and_text_stream(checkpoint):
    _, tok = checkpoint
    ids = tok.encode("To be, or not to be: that is the question. ")
    plain = finish_answer(tok, ids + [tok.eos_id], "stop", [])
    assert plain.text == "To be, or not to be: that is the question." and plain.n_tokens == len(ids) + 1
    cut = finish_answer(tok, ids, "length", ["not", "that"])
    assert cut.text == "To be, or " and cut.finish_reason == "stop"
    # the fewest ids whose text reaches the end of "not"
    n = next(k for k in range(1, len(ids) + 1) if tok.decode(ids[:k]).startswith("To be, or not"))
    assert cut.n_tokens == n
    for ids_, stop, answer in ((ids + [tok.eos_id], [], plain), (ids[:n], ["not", "that"], cut)):
        stream = TextStream(tok, stop)
        deltas = [stream.push(t) for t in ids_]
        last, final = stream.finish(answer.finish_reason)
        assert "".join(deltas) + last == answer.text == final.text
        assert sum(bool(d) for d in deltas) > 3  # sent piece by piece, not at the end
    assert finish_answer(tok, ids, "length", ["zzz"]).finish_reason == "length"


def test_a_stream_is_sent_every_n_steps():
    """batch.stream_interval (vLLM's stream_interval): the first step at once, then every n steps of a choice, at
    once when a choice finishes, and what is left when the stream ends; every event exactly once, in order."""
    def step(k: int, *finished: int) -> list[TokenEvent]:  # choices 0 and 1 (1 stops at step 6), token id = step
        return [TokenEvent(i, k, -0.5, None, "stop" if i in finished else None) for i in (0, 1) if i == 0 or k <= 6]

    steps = [step(1), step(2), step(3) + step(4), step(5), step(6, 1), step(7), step(8), step(9), step(10)]

    async def engine():  # step 3 and 4 arrive together, as when the engine stepped twice between reads
        for events in steps:
            yield events

    async def sent(n: int) -> list[list[TokenEvent]]:
        return [events async for events in every_n_steps(engine(), n)]

    for n in (1, 4, 100):
        groups = asyncio.run(sent(n))
        assert [e for g in groups for e in g] == [e for events in steps for e in events]
        tokens_of_choice_0 = [[e.token for e in g if e.index == 0] for g in groups]
        expected = {1: [[1], [2], [3, 4], [5], [6], [7], [8], [9], [10]],
                    4: [[1], [2, 3, 4, 5], [6], [7, 8, 9, 10]],  # 6: choice 1 finished
                    100: [[1], [2, 3, 4, 5, 6], [7, 8, 9, 10]]}[n]  # 7-10: the end of the stream
        assert tokens_of_choice_0 == expected, (n, tokens_of_choice_0)


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
    with pytest.raises(ConfigError, match="batch.stream_interval 0 must be >= 1"):
        load_serve_config("configs/serve.yaml", ["batch.stream_interval=0"])
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


def test_haproxy_ingress_serves_streams_and_metrics(checkpoint, oracle):
    """`python -m rayllama.serve` with the default http.ingress (auto: Ray Serve's high-throughput mode, set up by
    the CLI when it starts Ray): Ray's bundled HAProxy listens on http.port, a streamed greedy answer equals the
    engine's, /metrics counts it, and Ctrl-C shuts it all down, HAProxy included."""
    import os
    import signal
    import subprocess
    import sys

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, not the session's
    proc = subprocess.Popen(
        [sys.executable, "-m", "rayllama.serve", "configs/serve.yaml", f"model_dir={checkpoint[0]}",
         f"model_name={NAME}", f"http.port={port}", f"auth.token={TOKEN}",
         "replicas.num_cpus=0.5", "limits.max_prompt_tokens=120", "ray.num_cpus=2"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    lines: list[str] = []

    def read() -> None:  # the CLI's output, line by line, until it exits
        for line in proc.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.time() + 180
        while not any("Ctrl-C stops" in line for line in lines):  # the CLI's ready line: serve.run returned
            assert proc.poll() is None and time.time() < deadline, "".join(lines)[-3000:]
            time.sleep(0.5)
        ready = next(line for line in lines if "Ctrl-C stops" in line)
        assert f"127.0.0.1:{port}/v1" in ready and "haproxy ingress" in ready, ready
        assert _listener(port) == "haproxy"
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0, timeout=60)
        messages = [{"role": "system", "content": DEFAULT_SYSTEM}, *USER]
        chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0,
                                                     stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text.strip() == oracle(messages, 10)
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        assert 'rayllama_requests_total{model="tiny-chat",status="200"} 1.0' in metrics, metrics[:2000]
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
        reader.join(10)
    assert proc.returncode == 0 and any("shutting down" in line for line in lines), "".join(lines)[-3000:]
    assert _listener(port, wait_s=0) is None  # no HAProxy left holding the port


def _listener(port: int, wait_s: float = 20.0) -> str | None:
    """The name of the process listening on TCP `port` (retried: HAProxy reloads hand the socket over)."""
    import psutil

    deadline = time.time() + wait_s
    while True:
        for c in psutil.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid:
                with contextlib.suppress(psutil.Error):
                    name = psutil.Process(c.pid).name()
                    if name == "haproxy" or time.time() > deadline:
                        return name
        if time.time() > deadline:
            return None
        time.sleep(0.5)


def test_haproxy_ingress_without_a_binary(monkeypatch, tmp_path):
    """No HAProxy binary (e.g. macOS: ray[serve] bundles it on Linux only): auto falls back to Serve's proxy,
    an explicit http.ingress=haproxy is one line naming the fix."""
    from serve.preflight import ServeError, ingress_env

    assert ingress_env(ServeConfig())["RAY_SERVE_ENABLE_HA_PROXY"] == "1"  # ray[serve] on Linux: the bundled one
    not_executable = tmp_path / "haproxy"
    not_executable.write_text("")
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(not_executable))
    assert ingress_env(ServeConfig()) == {}
    with pytest.raises(ServeError, match="needs an HAProxy binary") as info:
        ingress_env(ServeConfig(http=HTTPConfig(ingress="haproxy")))
    assert "\n" not in str(info.value) and "http.ingress=proxy" in str(info.value)


def test_haproxy_ingress_without_its_ray_setup_is_one_line(checkpoint, monkeypatch):
    from serve.app import ServeError, start

    monkeypatch.delenv("RAY_SERVE_ENABLE_HA_PROXY", raising=False)
    cfg = ServeConfig(model_dir=str(checkpoint[0]), http=HTTPConfig(ingress="haproxy"))
    with pytest.raises(ServeError, match="RAY_SERVE_ENABLE_HA_PROXY=1") as info:
        start(cfg)
    assert "\n" not in str(info.value) and "http.ingress=auto" in str(info.value)
    with pytest.raises(ConfigError, match="http.ingress 'nginx' is not one of auto, proxy, haproxy"):
        load_serve_config("configs/serve.yaml", ["http.ingress=nginx"])


def test_queue_beyond_its_limit_is_refused_with_retry_after():
    """One slot (max_rows 1), one waiting place: a third request is refused (the endpoint answers 429), and a
    request refused or aborted leaves the engine empty."""
    import asyncio

    from rayllama.generation import ContinuousBatcher
    from serve.engine import QueueFull, TorchStreamer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=50, ffn_dim=64,
                                    max_seq_len=4096))
    streamer = TorchStreamer(functools.partial(ContinuousBatcher, model, max_rows=1), max_waiting=1, retry_after_s=3,
                             threads=1)
    long = SamplingParams(max_new_tokens=4000, temperature=0.0, stop_token_ids=())  # seconds: still running

    async def scenario():
        first = streamer.open([1, 2, 3], long)
        await anext(first)  # running: it holds the only slot
        second = streamer.open([1, 2], long)  # waits
        with pytest.raises(QueueFull, match="queue.max_waiting") as info:
            streamer.open([1], long)
        assert info.value.retry_after_s == 3
        await first.aclose()  # the client went away: its slot goes to `second`
        events = await anext(second)
        assert events[0].index == 0
        await second.aclose()

    asyncio.run(scenario())
    deadline = time.time() + 10
    while (streamer.running or streamer.waiting) and time.time() < deadline:
        time.sleep(0.01)
    assert streamer.running == 0 and streamer.waiting == 0
    streamer.close()


def test_a_dead_engine_process_fails_its_requests_and_the_health_check():
    """The engine process killed mid-answer: the request in flight ends with EngineDead (the endpoint: an error,
    never a hang), new requests are refused with EngineDead (503) and check_health raises, so Serve replaces the
    replica."""
    import asyncio
    import os
    import signal

    from rayllama.generation import ContinuousBatcher
    from serve.engine import EngineDead, TorchStreamer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=50, ffn_dim=64,
                                    max_seq_len=4096))
    streamer = TorchStreamer(functools.partial(ContinuousBatcher, model, max_rows=4), max_waiting=4,
                             retry_after_s=1, threads=1)
    streamer.check_health()
    long = SamplingParams(max_new_tokens=4000, temperature=0.0, stop_token_ids=())

    async def scenario() -> None:
        stream = streamer.open([1, 2, 3], long)
        await anext(stream)
        os.kill(streamer.process.pid, signal.SIGKILL)
        with pytest.raises(EngineDead, match="exit code -9"):
            async with asyncio.timeout(30):
                async for _ in stream:
                    pass
        with pytest.raises(EngineDead, match="engine process exited"):
            streamer.open([1, 2], long)

    asyncio.run(scenario())
    with pytest.raises(EngineDead):
        streamer.check_health()
    streamer.close()


def test_autoscaling_and_gpu_options():
    from serve.app import deployment_options

    fixed = deployment_options(load_serve_config("configs/serve.yaml"))
    assert fixed["num_replicas"] == 1 and "autoscaling_config" not in fixed
    scaled = deployment_options(load_serve_config("configs/serve.yaml", [
        "replicas.min_replicas=1", "replicas.max_replicas=4", "replicas.target_ongoing_requests=8",
        "replicas.num_gpus=1", "device=cuda"]))
    assert scaled["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8.0}
    assert "num_replicas" not in scaled and scaled["ray_actor_options"]["num_gpus"] == 1
    with pytest.raises(ConfigError, match="min_replicas 5 / max_replicas 2"):
        load_serve_config("configs/serve.yaml", ["replicas.min_replicas=5", "replicas.max_replicas=2"])
    with pytest.raises(ConfigError, match="batch.max_waiting 0 must be >= 1"):
        load_serve_config("configs/serve.yaml", ["batch.max_waiting=0"])
