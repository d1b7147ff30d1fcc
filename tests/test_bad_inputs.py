"""Bad inputs: config files, CLI overrides, data files, checkpoints and HTTP requests.

Every case is a user mistake (or a damaged file) and must give one line naming the problem (no traceback), a
non-zero exit or a 4xx, and leave nothing corrupt on disk (files untouched, no half-written output). CLI cases run
`python -m rayllama.driver` / `python -m rayllama.serve` as subprocesses (several at once, to save wall time);
the HTTP cases share one Serve app, which also takes a small bounded load test (bench/serve_load.py is the big one).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import torch
from test_faults import DRIVER_RUN, prebuild_run

from rayllama.checkpoint import CheckpointError, load_model, save_model, verify
from rayllama.data.formats import DataError, read_preferences, read_prompts, read_sft
from rayllama.model import ModelConfig, ScalarHeadModel, Transformer

# Ray Serve's own pydantic models warn on import (PydanticDeprecatedSince20); not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "ppo.yaml")
ALLOWED_NEW = {"driver.log", "config.yaml"}  # what the driver writes before it reads the data


def snapshot(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under root (empty if root does not exist)."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------- CLI cases


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


def replace_line(path: Path, lineno: int, raw: bytes) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    lines[lineno - 1] = raw + b"\n"
    path.write_bytes(b"".join(lines))


def prebuilt(tmp: Path, base: Path) -> Path:
    run = tmp / "run"
    shutil.copytree(base, run)
    return run


def driver(run: Path, *overrides: str) -> list[str]:
    return ["-m", "rayllama.driver", CONFIG, *DRIVER_RUN, f"run_dir={run}", *overrides]


def damage_sft_truncated(tmp: Path, base: Path) -> tuple[list[str], Path]:
    run = prebuilt(tmp, base)
    weights = run / "sft" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    return driver(run), run


def damage_reward_shapes(tmp: Path, base: Path) -> tuple[list[str], Path]:
    """config.json says dim 32; the weights are a dim-48 model's."""
    run = prebuilt(tmp, base)
    rm_dir = run / "reward" / "safety" / "model"
    cfg = load_model(rm_dir)[1]
    other = ModelConfig(**{**cfg.__dict__, "dim": 48})
    save_model(tmp / "other", ScalarHeadModel(other), other)
    shutil.copyfile(tmp / "other" / "model.safetensors", rm_dir / "model.safetensors")
    return driver(run), run


def bad_data_line(file: str, lineno: int, raw: bytes) -> Callable[[Path, Path], tuple[list[str], Path]]:
    def prepare(tmp: Path, base: Path) -> tuple[list[str], Path]:
        run = prebuilt(tmp, base)
        replace_line(run / "data" / file, lineno, raw)
        return driver(run), run
    return prepare


def removed(sub: str) -> Callable[[Path, Path], tuple[list[str], Path]]:
    def prepare(tmp: Path, base: Path) -> tuple[list[str], Path]:
        run = prebuilt(tmp, base)
        shutil.rmtree(run / sub)
        return driver(run), run
    return prepare


def config_file(text: str | bytes, name: str = "bad.yaml") -> Callable[[Path, Path], tuple[list[str], Path]]:
    def prepare(tmp: Path, base: Path) -> tuple[list[str], Path]:
        return ["-m", "rayllama.driver", str(write(tmp / name, text)), f"run_dir={tmp / 'run'}"], tmp / "run"
    return prepare


def overrides(*items: str) -> Callable[[Path, Path], tuple[list[str], Path]]:
    def prepare(tmp: Path, base: Path) -> tuple[list[str], Path]:
        return ["-m", "rayllama.driver", CONFIG, f"run_dir={tmp / 'run'}", *items], tmp / "run"
    return prepare


def serve_cli(*items: str, model: str = "good") -> Callable[[Path, Path], tuple[list[str], Path]]:
    """`python -m rayllama.serve configs/serve.yaml model_dir=<the fixture's checkpoint> items...`; model
    "truncated" gives it a copy with cut weights."""
    def prepare(tmp: Path, base: Path) -> tuple[list[str], Path]:
        model_dir = base / "sft" / "model"
        if model == "truncated":
            model_dir = tmp / "model"
            shutil.copytree(base / "sft" / "model", model_dir)
            (model_dir / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes()[:1000])
        return ["-m", "rayllama.serve", str(ROOT / "configs" / "serve.yaml"), f"model_dir={model_dir}",
                *[i.format(port=BUSY["port"]) for i in items]], model_dir
    return prepare


BUSY: dict[str, int] = {}  # "port": the port cli_results holds while the cases run (bound then, not at import:
# a port that was free at collection may be some Ray process's by the time the fixture runs)
ILLEGAL_PROMPT = b'{"prompt": [{"role": "user", "content": "hi"}], "is_safety": "yes"}'

# name -> (prepare(tmp, prebuilt run) -> (argv after python, dir that must not be corrupted), fragment, exit code)
CLI_CASES: dict[str, tuple[Callable, str, int]] = {
    "config file missing": (lambda t, b: (["-m", "rayllama.driver", str(t / "nope.yaml")], t / "run"),
                            "not found", 2),
    "config not YAML": (config_file("stages: [tokenizer\n"), "is not valid YAML", 2),
    "config a list": (config_file("- tokenizer\n- pretrain\n"), "must hold a mapping", 2),
    "config unknown key": (config_file(f"base: {CONFIG}\nppo:\n  clipp: 0.1\n"), "unknown config key 'ppo.clipp'",
                           2),
    "config wrong type": (config_file("seed: abc\n"), "bad value for config key 'seed'", 2),
    "config base cycle": (config_file("base: bad.yaml\n"), "longer than 8 files", 2),
    "config base missing": (config_file("base: nowhere.yaml\n"), "nowhere.yaml' not found", 2),
    "override without =": (overrides("ppo.clip"), "not of the form key=value", 2),
    "override unknown key": (overrides("ppo.clipp=0.3"), "unknown config key 'ppo.clipp'", 2),
    "override wrong type": (overrides("ppo.iterations=many"), "'ppo.iterations'", 2),
    "override missing interpolation": (overrides("name=${nope}"), "Interpolation key 'nope' not found", 2),
    "override unknown stage": (overrides("stages=[tokenizer,magic]"), "unknown stage 'magic'", 2),
    "override stages out of order": (overrides("stages=[sft,pretrain]"), "out of order", 2),
    "override batch not a multiple": (overrides("ppo.mini_batch_size=7"), "not a multiple", 2),
    "override clip out of range": (overrides("ppo.clip=3"), "ppo.clip 3.0 must be in (0, 1)", 2),
    "override weight-sync backend unknown": (overrides("ppo.weight_sync.backend=shm"),
                                             "ppo.weight_sync.backend 'shm' is not auto, gloo, nccl or ipc", 2),
    "override ptx coefficient negative": (overrides("ppo.ptx_coef=-1"), "ppo.ptx_coef -1.0 must be >= 0", 2),
    "override rejection K zero": (overrides("rejection.samples_per_prompt=0"),
                                  "rejection.samples_per_prompt 0 must be >= 1", 2),
    "override gatt replay share out of range": (overrides("gatt.replay_share=1.5"),
                                                "gatt.replay_share 1.5 must be in [0, 1)", 2),
    "override rejection replay share out of range": (overrides("rejection.replay_share=1"),
                                                     "rejection.replay_share 1.0 must be in [0, 1)", 2),
    "dry run: tokenizer file missing": (overrides("--dry-run", "tokenizer.model_path=/nonexistent/sp.model"),
                                        "tokenizer.model_path '/nonexistent/sp.model' does not exist", 2),
    "dry run: temperature out of range": (overrides("--dry-run", "--ppo.temperature=-1"),
                                          "ppo.temperature -1.0 must be >= 0", 2),
    "dry run: misspelt key": (overrides("--dry-run", "--ppo.temprature=0.5"),
                              "did you mean 'ppo.temperature'?", 2),
    "data: prompts line with a bad field": (bad_data_line("prompts.jsonl", 3, ILLEGAL_PROMPT),
                                            "prompts.jsonl:3: field 'is_safety'", 2),
    "data: sft line not UTF-8": (bad_data_line("sft.jsonl", 2, b'{"messages": "\xff\xfe"}'),
                                 "sft.jsonl:2: field '<encoding>': not UTF-8", 2),
    "data: preference line cut short": (bad_data_line("pref_safety.jsonl", 5, b'{"prompt": [{"role": "us'),
                                        "pref_safety.jsonl:5: field '<json>': bad JSON", 2),
    "checkpoint: SFT missing": (removed("sft"), "sft/model, which is missing or incomplete; add 'sft'", 2),
    "checkpoint: SFT truncated": (damage_sft_truncated, "sft/model, which is missing or incomplete", 2),
    "checkpoint: reward wrong shapes": (damage_reward_shapes, "but config.json implies", 2),
    "checkpoint: tokenizer missing": (removed("tokenizer"), "no tokenizer at", 2),
    "serve: checkpoint truncated": (serve_cli(model="truncated"), "is not a complete checkpoint", 2),
    "serve: auth token env unset": (serve_cli("auth.token_env=RAYLLAMA_TEST_UNSET_TOKEN"),
                                    "$RAYLLAMA_TEST_UNSET_TOKEN, which is unset", 2),
    "serve: port in use": (serve_cli("http.port={port}"), "cannot listen on 127.0.0.1", 2),
    "serve: unknown key": (serve_cli("limits.max_tokenz=5"), "unknown config key 'limits.max_tokenz'", 2),
}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A run dir with the toy world's data, a tokenizer, an SFT policy and reward models (tests/test_faults.py)."""
    run = tmp_path_factory.mktemp("base") / "run"
    prebuild_run(run)
    return run


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory, base_run) -> dict[str, tuple[subprocess.CompletedProcess, dict, dict, Path]]:
    """Every CLI case, three subprocesses at a time: name -> (result, snapshot before, snapshot after, dir)."""
    env = {k: v for k, v in os.environ.items() if k != "RAYLLAMA_TEST_UNSET_TOKEN"}

    def run(name: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *prepared[name][0]], capture_output=True, text=True, timeout=300,
                              cwd=ROOT, env=env)

    with socket.socket() as busy:  # holds a port for the "port in use" case
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        BUSY["port"] = busy.getsockname()[1]
        prepared = {}
        for name, (prepare, _, _) in CLI_CASES.items():
            tmp = tmp_path_factory.mktemp("cli")
            argv, watched = prepare(tmp, base_run)
            prepared[name] = (argv, watched, snapshot(watched))
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            results = dict(zip(prepared, pool.map(run, prepared)))
    return {name: (results[name], prepared[name][2], snapshot(prepared[name][1]), prepared[name][1])
            for name in prepared}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_mistake_gives_one_line_and_a_nonzero_exit(cli_results, case):
    _, fragment, code = CLI_CASES[case]
    result, before, after, watched = cli_results[case]
    err = result.stderr.strip()
    assert result.returncode == code, (result.returncode, err, result.stdout[-2000:])
    assert "Traceback" not in result.stderr + result.stdout
    assert len(err.splitlines()) == 1 and fragment in err, err
    # nothing written but the driver's log and config copy; every existing file byte for byte as it was
    assert {k: v for k, v in after.items() if Path(k).name not in ALLOWED_NEW} == \
        {k: v for k, v in before.items() if Path(k).name not in ALLOWED_NEW}, watched
    if watched.exists():
        assert not list(watched.rglob("*.tmp-*")), "a half-written file was left behind"


# ---------------------------------------------------------------------------------------------- checkpoints


CFG = ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=300, ffn_dim=64, max_seq_len=32)


def saved(tmp: Path, model: torch.nn.Module | None = None, cfg: ModelConfig = CFG) -> Path:
    torch.manual_seed(0)
    return save_model(tmp / "ckpt", model or Transformer(cfg), cfg, meta={"step": 1})


def edit_json(path: Path, edit: Callable[[dict], object]) -> None:
    obj = json.loads(path.read_text())
    path.write_text(json.dumps(edit(obj)))


def ck_missing(tmp: Path) -> Path:
    return tmp / "nothing-here"


def ck_empty(tmp: Path) -> Path:
    (tmp / "empty").mkdir()
    return tmp / "empty"


def ck_truncated(tmp: Path) -> Path:
    d = saved(tmp)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-64])
    return d


def ck_header_garbage(tmp: Path) -> Path:
    d = saved(tmp)
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00[1, 2, 3]       " + b"\x00" * 64)
    return d


def ck_wrong_shapes(tmp: Path) -> Path:
    d = saved(tmp)
    other = ModelConfig(**{**CFG.__dict__, "ffn_dim": 96})
    save_model(tmp / "other", Transformer(other), other)
    shutil.copyfile(tmp / "other" / "model.safetensors", d / "model.safetensors")
    return d


def ck_config_not_json(tmp: Path) -> Path:
    d = saved(tmp)
    (d / "config.json").write_text('{"hidden_size": 32,')
    return d


def ck_config_a_list(tmp: Path) -> Path:
    d = saved(tmp)
    (d / "config.json").write_text("[32, 1]")
    return d


def ck_not_llama(tmp: Path) -> Path:
    d = saved(tmp)
    edit_json(d / "config.json", lambda c: {**c, "model_type": "gpt2"})
    return d


def ck_meta_corrupt(tmp: Path) -> Path:
    d = saved(tmp)
    (d / "rayllama.json").write_text("{step: 1")
    return d


def ck_two_labels(tmp: Path) -> Path:
    d = saved(tmp, ScalarHeadModel(CFG))
    edit_json(d / "config.json", lambda c: {**c, "num_labels": 2, "id2label": {"0": "A", "1": "B"}})
    return d


CHECKPOINT_CASES = {
    "missing": (ck_missing, "does not exist"),
    "empty dir": (ck_empty, "has no config.json"),
    "truncated weights": (ck_truncated, "is truncated"),
    "garbage safetensors header": (ck_header_garbage, "not a readable safetensors file"),
    "wrong shapes": (ck_wrong_shapes, "has shape (96, 32) but config.json implies (64, 32)"),
    "config.json not JSON": (ck_config_not_json, "config.json is not valid JSON"),
    "config.json a list": (ck_config_a_list, "holds a JSON list, not an object"),
    "not a Llama": (ck_not_llama, "model_type 'gpt2' is not 'llama'"),
    "rayllama.json corrupt": (ck_meta_corrupt, "rayllama.json is not a JSON object"),
    "reward model with 2 labels": (ck_two_labels, "num_labels 2; reward models need 1"),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_bad_checkpoint_is_one_line_naming_it_and_stays_as_it_was(tmp_path, case):
    make, fragment = CHECKPOINT_CASES[case]
    path = make(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    message = str(info.value)
    assert fragment in message and "\n" not in message and str(path.name) in message
    if case not in ("rayllama.json corrupt", "reward model with 2 labels"):  # verify reads neither
        with pytest.raises(CheckpointError):
            verify(path)  # the metadata-only check (what the driver runs before Ray starts) finds it too
    assert snapshot(tmp_path) == before


def test_a_damaged_newest_ppo_checkpoint_is_skipped_for_the_one_before(tmp_path):
    from rayllama.dist import dcp
    from rayllama.rl.ppo import STATE_FILE, TRAIN_STATE, latest_checkpoint

    for it in (1, 2):
        d = tmp_path / "checkpoints" / f"iter-000{it}"
        parts = {"policy": (Transformer(CFG), None), "value": (ScalarHeadModel(CFG), None)}
        dcp.save_train_state(d / TRAIN_STATE, parts, {"version": it})  # the learner group's sharded state
        (d / STATE_FILE).write_text(json.dumps({"iteration": it, "prompt_position": 8 * it}))
    assert latest_checkpoint(tmp_path).name == "iter-0002"
    (tmp_path / "checkpoints" / "iter-0002" / STATE_FILE).write_text('{"iteration": 2, "prompt_pos')  # torn
    assert latest_checkpoint(tmp_path).name == "iter-0001"
    (tmp_path / "checkpoints" / "iter-0002" / STATE_FILE).write_text('{"iteration": 2, "prompt_position": 16}')
    assert latest_checkpoint(tmp_path).name == "iter-0002"
    (tmp_path / "checkpoints" / "iter-0002" / TRAIN_STATE / dcp.MARKER).unlink()  # shards not all written
    assert latest_checkpoint(tmp_path).name == "iter-0001"


# ---------------------------------------------------------------------------------------------- data files


DATA_CASES = {
    "prompt nested too deeply": (read_prompts, b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                                 "nested too deeply"),
    "prompt not an object": (read_prompts, b'["user", "hi"]', "expected a JSON object"),
    "sft ends with the user": (read_sft, b'{"messages": [{"role": "user", "content": "hi"}]}',
                               "the last message must be 'assistant'"),
    "preference unknown rating": (read_preferences, json.dumps(
        {"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b", "rating": "much_better",
         "kind": "helpfulness"}).encode(), "unknown rating 'much_better'"),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_malformed_user_jsonl_line_names_file_line_and_field(tmp_path, case):
    reader, line, fragment = DATA_CASES[case]
    good = {read_prompts: b'{"prompt": [{"role": "user", "content": "hi"}], "is_safety": false}',
            read_sft: b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}',
            read_preferences: DATA_CASES["preference unknown rating"][1].replace(b"much_better", b"better")}[reader]
    path = write(tmp_path / "user.jsonl", b"\xef\xbb\xbf" + good + b"\n\n" + good + b"\n" + line + b"\n")  # BOM ok
    with pytest.raises(DataError) as info:
        reader(path)
    assert "user.jsonl:4: " in str(info.value) and fragment in str(info.value) and "\n" not in str(info.value)
    assert len(reader(path, skip_bad=True)) == 2  # the good lines, the BOM and the blank line are fine


# ---------------------------------------------------------------------------------------------- HTTP


TOKEN = "bad-inputs-token"
USER = [{"role": "user", "content": "Good morning, what news?"}]


@pytest.fixture(scope="module")
def server(ray_session, base_run):
    from ray import serve as ray_serve

    from serve.app import start
    from serve.config import AuthConfig, BatchConfig, HTTPConfig, LimitsConfig, ReplicaConfig, ServeConfig

    cfg = ServeConfig(model_dir=str(base_run / "sft" / "model"), model_name="tiny",
                      limits=LimitsConfig(max_prompt_tokens=100, max_tokens=16, default_max_tokens=4, max_n=2,
                                          max_stop=2, max_request_bytes=20_000),
                      batch=BatchConfig(max_rows=32), auth=AuthConfig(token=TOKEN),
                      replicas=ReplicaConfig(num_cpus=0.5, max_ongoing_requests=64), http=HTTPConfig(port=free_port()))
    url = start(cfg)
    yield url
    ray_serve.shutdown()


def chat(url: str, body: bytes | dict, headers: dict | None = None, method: str = "POST",
         path: str = "/v1/chat/completions") -> httpx.Response:
    h = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}", **(headers or {})}
    content = json.dumps(body).encode() if isinstance(body, dict) else body
    return httpx.request(method, f"{url}{path}", content=content, headers=h, timeout=60)


HTTP_CASES = {
    "JSON nested too deeply": (b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", {}, 400, "nested too deeply"),
    "body not UTF-8": (b'{"messages": [{"role": "user", "content": "\xff"}]}', {}, 400, "not valid JSON"),
    "lone surrogate": (b'{"messages": [{"role": "user", "content": "a\\ud800"}]}', {}, 400, "lone surrogate"),
    "seed beyond int64": ({"messages": USER, "seed": 2**70}, {}, 400, "seed"),
    "temperature NaN": (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', {}, 400,
                        "temperature"),
    "n zero": ({"messages": USER, "n": 0}, {}, 400, "n: "),
    "max_tokens negative": ({"messages": USER, "max_tokens": -5}, {}, 400, "max_tokens"),
    "max_tokens huge": ({"messages": USER, "max_tokens": 10**30}, {}, 400, "max_tokens"),
    "messages an object": ({"messages": {"role": "user", "content": "hi"}}, {}, 400, "messages"),
    "image content part": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
                           {}, 400, "messages.0.content"),
    "too many stop strings": ({"messages": USER, "stop": ["a", "b", "c"]}, {}, 400, "at most 2"),
    "top_p above 1": ({"messages": USER, "top_p": 1.5}, {}, 400, "top_p"),
    "stream_options a string": ({"messages": USER, "stream": True, "stream_options": "yes"}, {}, 400,
                                "stream_options"),
    "basic auth": ({"messages": USER}, {"Authorization": "Basic dXNlcjpwYXNz"}, 401, "invalid bearer token"),
    "GET on the chat route": (b"", {"method": "GET"}, 405, "Method Not Allowed"),
    "prompt over max_prompt_tokens": ({"messages": [{"role": "user", "content": "word " * 300}]}, {}, 413,
                                        "limit is 100"),
}


@pytest.mark.parametrize("case", list(HTTP_CASES))
def test_bad_request_gets_a_4xx_with_one_line(server, case):
    body, options, status, fragment = HTTP_CASES[case]
    options = dict(options)
    method = options.pop("method", "POST")
    r = chat(server, body, headers=options, method=method)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert fragment in err["message"] and "\n" not in err["message"], err


def test_bounded_load_gives_no_5xx_and_equal_answers_to_equal_prompts(server, record_property):
    """128 requests at concurrency 32 (8 prompts x 16, greedy): every answer is a 200, and the 16 answers to each
    prompt are equal however the requests were batched. p50/p99 latency are recorded (bench/serve_load.py runs
    1000 requests)."""
    prompts = [f"Question number {i}: what is {i} plus {i}?" for i in range(8)]
    bodies = [{"messages": [{"role": "user", "content": prompts[i % 8]}], "max_tokens": 4, "temperature": 0}
              for i in range(128)]

    async def load() -> list[tuple[int, float, dict]]:
        limit = asyncio.Semaphore(32)
        async with httpx.AsyncClient(timeout=120, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
            async def one(body: dict) -> tuple[int, float, dict]:
                async with limit:
                    t0 = time.perf_counter()
                    r = await client.post(f"{server}/v1/chat/completions", json=body)
                    return r.status_code, time.perf_counter() - t0, r.json()
            return await asyncio.gather(*(one(b) for b in bodies))

    before = httpx.get(f"{server}/health").json()
    results = asyncio.run(load())
    statuses = [s for s, _, _ in results]
    assert statuses.count(200) == 128, sorted(set(statuses))
    answers: dict[str, set[str]] = {}
    for body, (_, _, reply) in zip(bodies, results):
        answers.setdefault(body["messages"][0]["content"], set()).add(reply["choices"][0]["message"]["content"])
    assert all(len(texts) == 1 for texts in answers.values()), answers
    latencies = sorted(t for _, t, _ in results)
    p50, p99 = statistics.median(latencies), latencies[int(0.99 * (len(latencies) - 1))]
    record_property("serve_p50_s", round(p50, 3))
    record_property("serve_p99_s", round(p99, 3))
    print(f"\nserve load: 128 requests, concurrency 32: p50 {p50:.3f} s, p99 {p99:.3f} s, 0 errors")
    after = httpx.get(f"{server}/health").json()
    assert after["requests"] - before["requests"] == 128 and after["largest_batch"] >= 2
