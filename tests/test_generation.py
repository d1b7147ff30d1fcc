"""Tests for rayllama.generation: the KV-cache engine against a naive full-recompute loop."""

import pytest
import torch

from rayllama.generation import Completion, SamplingParams, TorchEngine, draw, sample_tokens
from rayllama.model import ModelConfig, Transformer

CFG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, ffn_dim=64, max_seq_len=48)
PROMPTS = [[1, 5, 9, 12, 7], [1, 3], [1, 40, 41, 42, 43, 44, 45, 8], [1, 17, 4]]


def make_model(seed: int, std: float = 0.3) -> Transformer:
    """A small random model; std 0.3 makes next-token distributions peaked, so argmax has clear winners."""
    torch.manual_seed(seed)
    model = Transformer(CFG)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, std)
    return model.eval()


def naive_greedy(model: Transformer, prompt: list[int], max_new: int, stop_ids=()) -> tuple[list[int], list[float]]:
    """Oracle: recompute the full forward pass on the whole sequence every step, take the argmax."""
    seq, out, lps = list(prompt), [], []
    with torch.no_grad():
        for _ in range(max_new):
            logits = model(torch.tensor([seq]))[0, -1]  # (V,)
            tok = int(logits.argmax())
            out.append(tok)
            lps.append(float(torch.log_softmax(logits.double(), -1)[tok]))
            seq.append(tok)
            if tok in stop_ids:
                break
    return out, lps


def full_forward_logprobs(model: Transformer, prompt: list[int], generated: list[int]) -> list[float]:
    """log_softmax of the full-sequence logits at each generated token."""
    seq = torch.tensor([prompt + generated])
    with torch.no_grad():
        logp = torch.log_softmax(model(seq)[0].double(), -1)  # (T, V)
    start = len(prompt) - 1
    return [float(logp[start + i, tok]) for i, tok in enumerate(generated)]


def assert_logprobs_close(actual: list[float], expected: list[float]) -> None:
    torch.testing.assert_close(torch.tensor(actual, dtype=torch.float64),
                               torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def model() -> Transformer:
    return make_model(0)


@pytest.mark.parametrize("max_batch_size", [64, 3])
def test_greedy_matches_naive_loop_with_left_padding(model, max_batch_size):
    engine = TorchEngine(model, max_batch_size=max_batch_size)
    params = SamplingParams(max_new_tokens=10, temperature=0.0, stop_token_ids=())
    result = engine.generate(PROMPTS, params)
    assert len(result) == len(PROMPTS)
    for i, (prompt, samples) in enumerate(zip(PROMPTS, result, strict=True)):
        assert len(samples) == 1
        c = samples[0]
        want_tokens, want_lps = naive_greedy(model, prompt, 10)
        assert c.prompt_index == i
        assert c.token_ids == want_tokens
        assert c.finish_reason == "length"
        assert_logprobs_close(c.logprobs, want_lps)
    # the prompts do not all produce the same continuation (the test would be weak otherwise)
    assert len({tuple(s[0].token_ids) for s in result}) > 1


def test_sampled_logprobs_equal_full_forward_log_softmax(model):
    # logprobs are log_softmax of the raw logits (temperature 1), even when sampling at another temperature
    engine = TorchEngine(model)
    params = SamplingParams(max_new_tokens=8, temperature=1.7, top_p=0.9, n=2, seed=3, stop_token_ids=())
    for prompt, samples in zip(PROMPTS, engine.generate(PROMPTS, params), strict=True):
        for c in samples:
            want = full_forward_logprobs(model, prompt, c.token_ids)
            assert_logprobs_close(c.logprobs, want)


def test_prefill_once_then_one_token_per_step(model):
    seen: list[tuple[int, ...]] = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    try:
        TorchEngine(model).generate(PROMPTS[:2], SamplingParams(max_new_tokens=4, n=3, seed=0, stop_token_ids=()))
    finally:
        hook.remove()
    # one prefill of 2 prompts padded to 5 (packed as 10 single-token rows), then 3 decode steps of 2 prompts x 3
    # samples, one token each
    assert seen == [(10, 1), (6, 1), (6, 1), (6, 1)]


def test_stop_token_ends_rows_independently(model):
    free_run, _ = naive_greedy(model, PROMPTS[0], 10)
    stop = free_run[2]  # a token prompt 0 emits at step 3 (or earlier)
    engine = TorchEngine(model)
    result = engine.generate(PROMPTS, SamplingParams(max_new_tokens=10, temperature=0.0, stop_token_ids=(stop,)))
    stopped_any = False
    for prompt, samples in zip(PROMPTS, result, strict=True):
        c = samples[0]
        want, want_lps = naive_greedy(model, prompt, 10, stop_ids=(stop,))
        assert c.token_ids == want
        assert_logprobs_close(c.logprobs, want_lps)
        if want[-1] == stop:
            assert c.finish_reason == "stop"
            stopped_any = True
        else:
            assert len(want) == 10 and c.finish_reason == "length"
    assert result[0][0].finish_reason == "stop" and len(result[0][0].token_ids) <= 3
    assert stopped_any


def test_seeded_samples_are_reproducible_and_distinct():
    model = make_model(1, std=0.02)  # near-uniform next-token distributions: samples differ
    engine = TorchEngine(model)
    params = SamplingParams(max_new_tokens=6, temperature=1.0, n=4, seed=123, stop_token_ids=())
    a = engine.generate(PROMPTS[:2], params)
    b = engine.generate(PROMPTS[:2], params)
    assert [[c.token_ids for c in s] for s in a] == [[c.token_ids for c in s] for s in b]
    for samples in a:
        assert len(samples) == 4
        assert len({tuple(c.token_ids) for c in samples}) == 4
        assert all(c.finish_reason == "length" and len(c.token_ids) == 6 for c in samples)
    other = engine.generate(PROMPTS[:2], SamplingParams(max_new_tokens=6, n=4, seed=124, stop_token_ids=()))
    assert [[c.token_ids for c in s] for s in other] != [[c.token_ids for c in s] for s in a]


def test_tiny_top_p_equals_greedy(model):
    engine = TorchEngine(model)
    greedy = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=0.0, stop_token_ids=()))
    nucleus = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=1.0, top_p=1e-6, n=2,
                                                      seed=0, stop_token_ids=()))
    for g, s in zip(greedy, nucleus, strict=True):
        assert [c.token_ids for c in s] == [g[0].token_ids] * 2


def test_sample_tokens_follows_temperature_and_top_p():
    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(20000, 4)
    # top_p 0.7: mass before token 1 is 0.5 < 0.7 (kept), before token 2 is 0.8 >= 0.7 (dropped)
    # -> renormalised [0.5, 0.3] / 0.8 = [0.625, 0.375, 0, 0]
    freq = torch.bincount(sample_tokens(logits, 1.0, 0.7, g), minlength=4).float() / 20000
    torch.testing.assert_close(freq, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.015, rtol=0)
    # temperature 0.5: p^(1/0.5) = p^2 = [0.25, 0.09, 0.0225, 0.0025] / 0.365 = [0.6849, 0.2466, 0.0616, 0.0068]
    freq = torch.bincount(sample_tokens(logits, 0.5, 1.0, g), minlength=4).float() / 20000
    torch.testing.assert_close(freq, torch.tensor([0.6849, 0.2466, 0.0616, 0.0068]), atol=0.015, rtol=0)
    assert torch.equal(sample_tokens(logits[:3], 0.0, 1.0), torch.zeros(3, dtype=torch.long))


def test_draw_follows_unnormalised_weights_and_never_picks_a_zero():
    g = torch.Generator().manual_seed(1)
    weights = torch.tensor([0.0, 2.0, 0.0, 1.0, 1.0, 0.0]).expand(40000, 6)  # total 4, zeros first, inside and last
    freq = torch.bincount(draw(weights, g), minlength=6).float() / 40000
    torch.testing.assert_close(freq, torch.tensor([0.0, 0.5, 0.0, 0.25, 0.25, 0.0]), atol=0.01, rtol=0)
    assert freq[[0, 2, 5]].sum() == 0
    one_hot = torch.eye(5)[torch.tensor([4, 0, 2])]  # a row with all its weight on one index always draws it
    assert draw(one_hot, g).tolist() == [4, 0, 2]
    # reproducible from the generator's seed
    assert torch.equal(draw(weights[:50], torch.Generator().manual_seed(7)),
                       draw(weights[:50], torch.Generator().manual_seed(7)))


def test_load_weights_changes_output_and_records_version(model):
    engine = TorchEngine(make_model(0))
    params = SamplingParams(max_new_tokens=8, temperature=0.0, stop_token_ids=())
    before = engine.generate(PROMPTS, params)
    assert engine.weight_version == 0 and before[0][0].weight_version == 0
    new = make_model(7)
    engine.load_weights(new.state_dict(), version=5)
    assert engine.weight_version == 5
    after = engine.generate(PROMPTS, params)
    assert [s[0].token_ids for s in after] != [s[0].token_ids for s in before]
    for prompt, samples in zip(PROMPTS, after, strict=True):
        assert samples[0].token_ids == naive_greedy(new, prompt, 8)[0]
        assert samples[0].weight_version == 5


def test_load_weights_is_strict_and_atomic():
    engine = TorchEngine(make_model(0))
    params = SamplingParams(max_new_tokens=6, temperature=0.0, stop_token_ids=())
    before = engine.generate(PROMPTS, params)
    good = make_model(7).state_dict()
    bad_shape = dict(good)
    bad_shape["lm_head.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="lm_head.weight"):
        engine.load_weights(bad_shape, version=1)
    missing = {k: v for k, v in good.items() if k != "model.norm.weight"}
    with pytest.raises(ValueError, match="model.norm.weight"):
        engine.load_weights(missing, version=1)
    with pytest.raises(ValueError, match="extra.weight"):
        engine.load_weights({**good, "extra.weight": torch.zeros(1)}, version=1)
    assert engine.weight_version == 0
    assert [s[0].token_ids for s in engine.generate(PROMPTS, params)] == [s[0].token_ids for s in before]


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("n", 0), ("max_new_tokens", 0)],
)
def test_bad_sampling_params_raise(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_bad_prompts_raise(model):
    engine = TorchEngine(model)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1, 2], []], SamplingParams(max_new_tokens=4))
    with pytest.raises(ValueError, match="max_seq_len"):
        engine.generate([[1] * 40], SamplingParams(max_new_tokens=9))
    with pytest.raises(ValueError, match="token id 50"):
        engine.generate([[1, 50]], SamplingParams(max_new_tokens=4))


def test_completion_fields(model):
    c = TorchEngine(model).generate([[1, 2, 3]], SamplingParams(max_new_tokens=3, seed=0, stop_token_ids=()))[0][0]
    assert isinstance(c, Completion)
    assert len(c.token_ids) == len(c.logprobs) == 3
    assert all(lp <= 0 for lp in c.logprobs)


# ------------------------------------------------------------------------------------------- continuous batching


def greedy_alone(model, prompt, max_new, **kw):
    [[c]] = TorchEngine(model).generate([prompt], SamplingParams(max_new_tokens=max_new, temperature=0.0,
                                                                 stop_token_ids=(), **kw))
    return c


def test_requests_join_and_leave_the_batch_every_step(model):
    """Greedy rows give the same tokens and logprobs alone and inside a busy batch that others join and leave."""
    from rayllama.generation import ContinuousBatcher, Request

    batcher = ContinuousBatcher(model, max_rows=4)
    hot = SamplingParams(max_new_tokens=12, temperature=1.5, n=2, seed=1, stop_token_ids=())
    busy = batcher.submit(Request([PROMPTS[2]], hot))
    batcher.step()
    batcher.step()  # `busy` is 2 tokens in when the greedy requests arrive
    greedy = [batcher.submit(Request([p], SamplingParams(max_new_tokens=n, temperature=0.0, stop_token_ids=())))
              for p, n in zip(PROMPTS, [3, 9, 5, 7], strict=True)]
    sizes = []
    while not all(r.done for r in [busy, *greedy]):
        batcher.step()
        sizes.append(batcher.running)
        assert batcher.running <= 4  # the bound: requests that do not fit wait
    assert len(set(sizes)) > 2  # the batch grew and shrank step by step
    for prompt, req, n in zip(PROMPTS, greedy, [3, 9, 5, 7], strict=True):
        [[c]] = req.results()
        alone = greedy_alone(model, prompt, n)
        assert c.token_ids == alone.token_ids and len(c.token_ids) == n
        assert_logprobs_close(c.logprobs, alone.logprobs)
        assert_logprobs_close(c.logprobs, full_forward_logprobs(model, prompt, c.token_ids))
    assert [len(c.token_ids) for c in busy.results()[0]] == [12, 12]
    assert batcher.running == 0 and batcher.waiting == 0


def test_abort_frees_the_slots_at_the_next_step(model):
    from rayllama.generation import ContinuousBatcher, Request

    batcher = ContinuousBatcher(model, max_rows=2)
    long = SamplingParams(max_new_tokens=30, temperature=0.0, stop_token_ids=())
    a = batcher.submit(Request([PROMPTS[0]], long))
    b = batcher.submit(Request([PROMPTS[1]], long))
    c = batcher.submit(Request([PROMPTS[3]], SamplingParams(max_new_tokens=4, temperature=0.0, stop_token_ids=())))
    batcher.step()
    assert batcher.running == 2 and batcher.waiting == 1  # c waits for a slot
    batcher.abort(a)
    batcher.step()
    assert a.done and batcher.waiting == 0 and batcher.running == 2  # a's slot went to c
    batcher.run_until_done([c])
    assert c.results()[0][0].token_ids == greedy_alone(model, PROMPTS[3], 4).token_ids
    batcher.abort(b)
    batcher.step()
    assert batcher.running == 0


def test_stop_strings_end_generation_in_the_engine(model):
    """With decode = a letter per id, a stop string made of tokens 3..4 of the free run ends the row there."""
    free = greedy_alone(model, PROMPTS[0], 12).token_ids
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    engine = TorchEngine(model, decode=lambda ids: "".join(letters[t] for t in ids))
    stop = letters[free[2]] + letters[free[3]]
    first = next(k for k in range(2, 12) if stop in "".join(letters[t] for t in free[:k]))
    params = SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=(), stop=("@", stop))
    [[c]] = engine.generate([PROMPTS[0]], params)
    assert c.token_ids == free[:first] and c.finish_reason == "stop"
    with pytest.raises(ValueError, match="decode="):
        TorchEngine(model).generate([PROMPTS[0]], params)


def test_penalties_match_a_naive_penalised_loop(model):
    """Greedy with presence/frequency penalties == a full-recompute loop that penalises the argmax itself;
    logprobs stay the raw model's."""
    pres, freq = 1.5, 0.7
    seq, want = list(PROMPTS[1]), []
    with torch.no_grad():
        for _ in range(10):
            logits = model(torch.tensor([seq]))[0, -1]
            counts = torch.bincount(torch.tensor(want, dtype=torch.long), minlength=CFG.vocab_size).float()
            tok = int((logits - pres * (counts > 0).float() - freq * counts).argmax())
            want.append(tok)
            seq.append(tok)
    c = greedy_alone(model, PROMPTS[1], 10, presence_penalty=pres, frequency_penalty=freq)
    assert c.token_ids == want
    assert c.token_ids != greedy_alone(model, PROMPTS[1], 10).token_ids  # the penalties changed the answer
    assert_logprobs_close(c.logprobs, full_forward_logprobs(model, PROMPTS[1], c.token_ids))


def test_top_logprobs_are_the_models_best_tokens(model):
    c = greedy_alone(model, PROMPTS[2], 5, top_logprobs=3)
    logp = torch.log_softmax(model(torch.tensor([PROMPTS[2] + c.token_ids]))[0].double(), -1)  # (T, V)
    assert c.top_logprobs is not None and len(c.top_logprobs) == 5
    for i, best in enumerate(c.top_logprobs):
        values, ids = logp[len(PROMPTS[2]) - 1 + i].topk(3)
        assert [t for t, _ in best] == ids.tolist() and best[0][0] == c.token_ids[i]  # greedy = the best
        assert_logprobs_close([lp for _, lp in best], values.tolist())
