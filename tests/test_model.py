"""rayllama.model against transformers' own Llama (the oracle), plus KV-cache and shape/param-count checks."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from rayllama.model import (
    PRESETS,
    KVCache,
    ModelConfig,
    ScalarHeadModel,
    Transformer,
    count_params,
    positions_and_mask,
    preset,
)

CONFIGS = {
    "gqa": ModelConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=97, ffn_dim=96,
                       max_seq_len=64),
    "mqa": ModelConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=1, vocab_size=97, ffn_dim=80,
                       norm_eps=1e-6, rope_theta=500000.0, max_seq_len=64),
    "mha": ModelConfig(dim=48, n_layers=3, n_heads=4, n_kv_heads=4, vocab_size=61, ffn_dim=128,
                       max_seq_len=64),
}
ATOL = 1e-4


def hf_config(cfg: ModelConfig, **extra):
    import transformers

    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        hidden_act="silu", attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
        attn_implementation="eager", **extra)


def hf_causal(model: Transformer):
    """transformers.LlamaForCausalLM holding our weights (strict load: the key sets must be identical)."""
    import transformers

    hf = transformers.LlamaForCausalLM(hf_config(model.cfg)).eval()
    hf.load_state_dict(model.state_dict(), strict=True)
    return hf


def make(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def tokens(b: int, t: int, vocab: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (b, t), generator=g)  # id 0 reserved for padding


def hf_positions(mask: torch.Tensor) -> torch.Tensor:
    """What HF's generate() passes for a padded batch: cumsum(mask) - 1, pads filled with 1."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(name: str) -> None:
    model = make(CONFIGS[name])
    x = tokens(2, 19, model.cfg.vocab_size)
    with torch.no_grad():
        ours, theirs = model(x), hf_causal(model)(x).logits
    assert ours.shape == (2, 19, model.cfg.vocab_size)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_state_dict_keys_are_hf_names() -> None:
    import transformers

    cfg = CONFIGS["gqa"]
    ours = Transformer(cfg).state_dict()
    theirs = transformers.LlamaForCausalLM(hf_config(cfg)).state_dict()
    assert list(ours) == list(theirs)  # same names, same order, no rope buffers
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_matches_transformers(side: str) -> None:
    model = make(CONFIGS["gqa"])
    x = tokens(3, 12, model.cfg.vocab_size)
    lengths = [12, 7, 3]
    mask = torch.zeros(3, 12, dtype=torch.long)
    for i, n in enumerate(lengths):
        if side == "right":
            mask[i, :n] = 1
        else:
            mask[i, 12 - n:] = 1
    x = x * mask  # pad id 0
    with torch.no_grad():
        ours = model(x, attention_mask=mask)
        theirs = hf_causal(model)(x, attention_mask=mask, position_ids=hf_positions(mask)).logits
        # A second oracle: each row alone, unpadded, through our own model.
        alone = [model(x[i][mask[i].bool()][None])[0] for i in range(3)]
    assert torch.isfinite(ours).all()  # pad queries attend to themselves, never an all-masked row
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=ATOL, rtol=0)
    for i in range(3):
        torch.testing.assert_close(ours[i][real[i]], alone[i], atol=ATOL, rtol=0)


def test_positions_and_mask_by_hand() -> None:
    """RoPE is relative, so logits cannot see a constant position shift: check the rule itself.

    mask [[0,0,1,1],[1,1,1,0]]: cumsum-1 = [[-1,-1,0,1],[0,1,2,2]] -> clamp 0 -> positions below.
    Allowed keys = causal AND real key, plus the diagonal (pad queries see only themselves).
    """
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]])
    pos, allowed = positions_and_mask(mask, 2, 4, 0, torch.device("cpu"))
    assert pos.tolist() == [[0, 0, 0, 1], [0, 1, 2, 2]]
    assert allowed.shape == (2, 1, 4, 4)
    assert allowed[0, 0].int().tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    assert allowed[1, 0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    # Decoding one token after a cache of 2: positions continue from the real-token count.
    pos, allowed = positions_and_mask(torch.tensor([[0, 1, 1], [1, 1, 1]]), 2, 1, 2, torch.device("cpu"))
    assert pos.tolist() == [[1], [2]]
    assert allowed[:, 0].int().tolist() == [[[0, 1, 1]], [[1, 1, 1]]]
    pos, allowed = positions_and_mask(None, 2, 3, 0, torch.device("cpu"))
    assert allowed is None and pos.tolist() == [[0, 1, 2]] * 2  # SDPA is_causal fast path


def test_all_ones_mask_equals_no_mask() -> None:
    model = make(CONFIGS["mqa"])
    x = tokens(2, 9, model.cfg.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(model(x, torch.ones_like(x)), model(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["gqa", "mqa"])
def test_kv_cache_incremental_equals_full_forward(name: str) -> None:
    """Prefill 5 tokens, then decode one at a time: every step's logits equal the full pass's."""
    model = make(CONFIGS[name])
    x = tokens(2, 11, model.cfg.vocab_size)
    with torch.no_grad():
        full = model(x)
        cache = KVCache.for_model(model, 2, 16)
        steps = [model(x[:, :5], cache=cache)]
        for t in range(5, 11):
            steps.append(model(x[:, t:t + 1], cache=cache))
    assert cache.length == 11
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_kv_cache_left_padded_batch() -> None:
    """Left-padded prompts of lengths 6 and 3, decoded with a growing mask, equal the one-pass forward."""
    model = make(CONFIGS["gqa"])
    x = tokens(2, 10, model.cfg.vocab_size)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    x = x * mask
    with torch.no_grad():
        full = model(x, attention_mask=mask)
        cache = KVCache(2, 10, model.cfg)
        steps = [model(x[:, :6], attention_mask=mask[:, :6], cache=cache)]
        for t in range(6, 10):
            steps.append(model(x[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache))
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, dim=1)[real], full[real], atol=1e-5, rtol=0)


def test_kv_cache_select_repeats_and_drops_rows() -> None:
    """After prefill, select([1, 1, 0]) gives the cache of the batch x[[1, 1, 0]]; then drop a row."""
    model = make(CONFIGS["gqa"])
    x = tokens(2, 8, model.cfg.vocab_size)
    order = torch.tensor([1, 1, 0])
    with torch.no_grad():
        full = model(x[order])
        cache = KVCache(2, 8, model.cfg)
        model(x[:, :6], cache=cache)
        cache.select(order)
        step6 = model(x[order][:, 6:7], cache=cache)
        cache.select(torch.tensor([2]))  # rows 0 and 1 finished; keep the one that was x[0]
        step7 = model(x[:1, 7:8], cache=cache)
    assert cache.batch_size == 1 and cache.length == 8
    torch.testing.assert_close(step6[:, 0], full[:, 6], atol=1e-5, rtol=0)
    torch.testing.assert_close(step7[0, 0], full[2, 7], atol=1e-5, rtol=0)


def test_bad_mask_and_cache_overflow_raise() -> None:
    model = make(CONFIGS["gqa"])
    x = tokens(2, 6, model.cfg.vocab_size)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(x, attention_mask=torch.ones(2, 5, dtype=torch.long))
    cache = KVCache(2, 7, model.cfg)
    model(x, cache=cache)
    with pytest.raises(ValueError, match="KVCache holds"):
        model(x[:, :2], cache=cache)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(tokens(1, 65, model.cfg.vocab_size))


def test_scalar_head_matches_transformers_sequence_classification() -> None:
    import transformers

    torch.manual_seed(0)
    cfg = CONFIGS["gqa"]
    rm = ScalarHeadModel(cfg).eval()
    torch.nn.init.normal_(rm.score.weight, std=0.5)
    hf = transformers.LlamaForSequenceClassification(hf_config(cfg, num_labels=1, pad_token_id=0)).eval()
    hf.load_state_dict(rm.state_dict(), strict=True)
    x = tokens(3, 10, cfg.vocab_size)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    x = x * mask  # right padding with pad id 0: HF finds the last non-pad token by id
    with torch.no_grad():
        ours = rm.last_token_score(x, mask)
        theirs = hf(x, attention_mask=mask).logits
    assert ours.shape == (3,) and theirs.shape == (3, 1)
    torch.testing.assert_close(ours, theirs[:, 0], atol=ATOL, rtol=0)


def test_scalar_head_left_padding_and_values_by_hand() -> None:
    """last_token_score(left-padded) = score . hidden(last real token) of the unpadded row; values (B, T)."""
    torch.manual_seed(0)
    cfg = CONFIGS["mha"]
    rm = ScalarHeadModel(cfg).eval()
    x = tokens(2, 7, cfg.vocab_size)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :4] = 0
    x = x * mask
    with torch.no_grad():
        values = rm(x, mask)
        score = rm.last_token_score(x, mask)
        h0 = rm.model(x[0, 4:][None])[0, -1]  # (E,) row 0 unpadded, last token
        h1 = rm.model(x[1:])[0, -1]
    assert values.shape == (2, 7)
    w = rm.score.weight[0]
    torch.testing.assert_close(score, torch.stack([w @ h0, w @ h1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(score, values[:, -1], atol=1e-6, rtol=0)


def test_scalar_head_from_transformer_copies_trunk() -> None:
    lm = make(CONFIGS["gqa"])
    rm = ScalarHeadModel.from_transformer(lm).eval()
    assert set(rm.state_dict()) == (set(lm.state_dict()) - {"lm_head.weight"}) | {"score.weight"}
    x = tokens(2, 5, lm.cfg.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(rm.model(x), lm.hidden_states(x), atol=0, rtol=0)
        assert torch.equal(rm(x), torch.zeros(2, 5))  # zero-initialised score
    small = ScalarHeadModel.from_transformer(lm.state_dict(), lm.cfg, score_std=0.01)
    assert 0 < small.score.weight.abs().max() < 0.1


def test_gradients_flow_and_are_finite() -> None:
    model = make(CONFIGS["gqa"]).train()
    x = tokens(2, 9, model.cfg.vocab_size)
    mask = torch.ones_like(x)
    mask[1, 6:] = 0
    logits = model(x[:, :-1], attention_mask=mask[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_count_params_matches_built_model_and_published_sizes() -> None:
    for cfg in [*CONFIGS.values(), PRESETS["tiny"]]:
        model = Transformer(cfg)
        assert count_params(cfg) == sum(p.numel() for p in model.parameters())
        assert count_params(cfg, lm_head=False) == count_params(cfg) - cfg.vocab_size * cfg.dim
    # Published: Llama-2-7b 6.74B, 13b 13.0B, 70b 69.0B (HF model cards / paper table 1).
    for name, published in [("llama2-7b", 6.74e9), ("llama2-13b", 13.0e9), ("llama2-70b", 69.0e9)]:
        assert abs(count_params(preset(name)) / published - 1) < 0.01, name
    # By hand, 7B: 32 * (4*4096^2 + 3*4096*11008 + 2*4096) + 2*32000*4096 + 4096 = 6,738,415,616.
    assert count_params(preset("llama2-7b")) == 6_738_415_616
    assert 5e6 <= count_params(preset("tiny")) <= 10e6


def test_presets_and_validation_errors() -> None:
    a = preset("tiny")
    a.dim = 1
    assert PRESETS["tiny"].dim == 256  # preset() returns a copy
    with pytest.raises(ValueError, match="llama2-7b"):
        preset("llama3")
    bad = [dict(n_heads=8, n_kv_heads=3), dict(dim=100, n_heads=8), dict(vocab_size=0),
           dict(dim=24, n_heads=8, n_kv_heads=2), dict(norm_eps=0.0)]
    for kwargs in bad:
        with pytest.raises(ValueError):
            ModelConfig(**kwargs).validate()
    with pytest.raises(ValueError, match="n_kv_heads"):
        Transformer(ModelConfig(n_heads=8, n_kv_heads=3))
