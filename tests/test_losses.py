"""Tests for rayllama.losses: expected values are derived by hand in the comments."""

import math

import pytest
import torch
import torch.nn.functional as F

from rayllama import losses as L


def close(actual: torch.Tensor, expected, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# ---------------------------------------------------------------------------------------------- masked reductions


def test_masked_mean_and_sum_ignore_masked_entries():
    x = torch.tensor([[1.0, 2.0, 100.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    close(L.masked_sum(x, mask), 7.0)  # 1 + 2 + 4
    close(L.masked_mean(x, mask), 7.0 / 3)
    close(L.masked_mean(x, mask, dim=1), [1.5, 4.0])
    close(L.masked_mean(x, torch.zeros_like(mask)), 0.0)  # empty mask: 0, not nan


def test_whiten_unmasked_has_mean_zero_var_one():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    # mean 2.5, population var (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25 -> (x - 2.5) / sqrt(1.25)
    s = math.sqrt(1.25)
    close(L.whiten(x), [-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s])
    out = L.whiten(torch.randn(1000) * 3 + 7)
    close(out.mean(), 0.0, atol=1e-5)
    close(out.var(unbiased=False), 1.0, atol=1e-4)
    # shift_mean=False keeps the mean: (x - 2.5) / sqrt(1.25) + 2.5
    close(L.whiten(x, shift_mean=False), [2.5 - 1.5 / s, 2.5 - 0.5 / s, 2.5 + 0.5 / s, 2.5 + 1.5 / s])


def test_whiten_masked_ignores_pads():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    s = math.sqrt(1.25)  # same statistics as [1, 2, 3, 4] above; pads come back as 0
    close(L.whiten(x, mask), [[-1.5 / s, -0.5 / s, 0.0], [0.5 / s, 1.5 / s, 0.0]])


# ---------------------------------------------------------------------------------------------- language modelling


def naive_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    out = torch.empty(tokens.shape, dtype=torch.float64)
    for b in range(tokens.shape[0]):
        for t in range(tokens.shape[1]):
            z = logits[b, t].double()
            out[b, t] = z[tokens[b, t]] - torch.log(torch.exp(z).sum())
    return out


def test_logprobs_from_logits_matches_naive():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 7, generator=g) * 3
    tokens = torch.randint(0, 7, (2, 3), generator=g)
    expected = naive_logprobs(logits, tokens).float()
    close(L.logprobs_from_logits(logits, tokens), expected)
    # bf16 logits are upcast row by row; compare with the naive result on the same rounded logits
    bf = logits.bfloat16()
    out = L.logprobs_from_logits(bf, tokens)
    assert out.dtype == torch.float32
    close(out, naive_logprobs(bf.float(), tokens).float())


def test_logprobs_shape_mismatch_raises():
    with pytest.raises(ValueError, match="tokens"):
        L.logprobs_from_logits(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


def test_entropy_from_logits():
    # uniform over 4 -> log 4; one-hot-like (one logit huge) -> ~0
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]]])
    close(L.entropy_from_logits(logits), [[math.log(4), 0.0]])
    # against the definition -sum p log p
    z = torch.randn(2, 3, 6)
    p = torch.softmax(z, -1)
    close(L.entropy_from_logits(z), -(p * torch.log(p)).sum(-1))


def test_lm_loss_matches_cross_entropy_with_ignore_index():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 9, generator=g)
    targets = torch.randint(0, 9, (2, 4), generator=g)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]])
    ignored = targets.masked_fill(mask == 0, -100)
    expected = F.cross_entropy(logits.reshape(-1, 9), ignored.reshape(-1), ignore_index=-100)
    close(L.lm_loss(logits, targets, mask), expected.item())


# ---------------------------------------------------------------------------------------------- reward models


def test_margin_tables():
    assert L.RATINGS == ("significantly_better", "better", "slightly_better", "negligibly_better")
    close(L.margin_for(list(L.RATINGS), "none"), [0.0, 0.0, 0.0, 0.0])
    close(L.margin_for(list(L.RATINGS), "small"), [1.0, 2 / 3, 1 / 3, 0.0])
    close(L.margin_for(list(L.RATINGS), "large"), [3.0, 2.0, 1.0, 0.0])


def test_margin_for_rejects_unknown_names():
    with pytest.raises(ValueError, match="'medium'.*large"):
        L.margin_for(["better"], "medium")
    with pytest.raises(ValueError, match="'much_better'.*significantly_better"):
        L.margin_for(["much_better"], "small")


@pytest.mark.parametrize(
    ("table", "rating", "expected"),
    [
        ("none", "significantly_better", 0.1269280110),  # m = 0:   log(1 + e^-2)
        ("small", "better", 0.2339625251),  # m = 2/3: log(1 + e^(-4/3)), e^(-4/3) = 0.263597
        ("small", "slightly_better", math.log1p(math.exp(-5 / 3))),  # m = 1/3: 2 - 1/3 = 5/3
        ("large", "slightly_better", 0.3132616875),  # m = 1:   log(1 + e^-1)
        ("large", "significantly_better", 1.3132616875),  # m = 3: log(1 + e) = 1 + log(1 + e^-1)
    ],
)
def test_margin_ranking_loss_hand_values(table, rating, expected):
    # r_c - r_r = 2 (r_c = 1.5, r_r = -0.5); loss = -log sigmoid(2 - m) = log(1 + e^(m - 2))
    margin = L.margin_for([rating], table)
    loss = L.margin_ranking_loss(torch.tensor([1.5]), torch.tensor([-0.5]), margin)
    close(loss, expected)


def test_margin_ranking_loss_batch_mean_and_stability():
    # batch of the two "large" cases above: (0.31326 + 1.31326) / 2 = 0.81326
    margin = L.margin_for(["slightly_better", "significantly_better"], "large")
    loss = L.margin_ranking_loss(torch.tensor([2.0, 2.0]), torch.tensor([0.0, 0.0]), margin)
    close(loss, 0.5 + 0.3132616875)
    # r_c - r_r = -200: -log sigmoid(-200) = 200 + log(1 + e^-200) ~= 200, finite (a naive log(sigmoid) is inf)
    loss = L.margin_ranking_loss(torch.tensor([-100.0]), torch.tensor([100.0]), torch.tensor([0.0]))
    close(loss, 200.0, atol=1e-3)


# ---------------------------------------------------------------------------------------------- PPO reward


def test_safe_logit():
    close(L.safe_logit(torch.tensor([0.5, 0.9, 0.1])), [0.0, math.log(9), -math.log(9)])
    # 0 and 1 clamp to eps: logit(1e-6) = log(1e-6 / (1 - 1e-6)) ~= -13.8155
    out = L.safe_logit(torch.tensor([0.0, 1.0], dtype=torch.float64))
    close(out, [math.log(1e-6 / (1 - 1e-6)), -math.log(1e-6 / (1 - 1e-6))], atol=1e-6)


def test_llama2_combined_score_gate_and_tag():
    s_helpful = torch.tensor([0.9, 0.9, 0.9, 0.9])
    s_safety = torch.tensor([0.5, 0.1, 0.5, 0.15])
    is_safety = torch.tensor([False, False, True, False])
    # row 0: not tagged, safety 0.5 >= 0.15 -> helpfulness 0.9
    # row 1: safety 0.1 < 0.15 gate         -> safety 0.1
    # row 2: tagged as a safety prompt       -> safety 0.5
    # row 3: safety exactly 0.15 is not below the gate -> helpfulness 0.9
    close(L.llama2_combined_score(s_helpful, s_safety, is_safety), [0.9, 0.1, 0.5, 0.9])
    # a higher gate moves row 3 (and row 0 stays: 0.5 >= 0.2)
    close(L.llama2_combined_score(s_helpful, s_safety, is_safety, gate=0.2), [0.9, 0.1, 0.5, 0.15])


def test_llama2_reward_is_whitened_logit():
    s_helpful = torch.tensor([0.9, 0.9, 0.9])
    s_safety = torch.tensor([0.5, 0.1, 0.5])
    is_safety = torch.tensor([False, False, True])
    # R_c = [0.9, 0.1, 0.5] -> logit = [ln 9, -ln 9, 0]
    close(L.llama2_reward(s_helpful, s_safety, is_safety, whiten_rewards=False), [math.log(9), -math.log(9), 0.0])
    # whiten [a, -a, 0]: mean 0, var 2a^2/3 -> [sqrt(3/2), -sqrt(3/2), 0]
    k = math.sqrt(1.5)
    close(L.llama2_reward(s_helpful, s_safety, is_safety), [k, -k, 0.0])


def test_kl_estimators():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    close(L.kl_per_token(logp, ref, "k1"), [[0.5, -1.0]])  # logp - ref
    # r = ref - logp = [-0.5, 1.0]; k3 = e^r - 1 - r = [e^-0.5 - 0.5, e - 2] = [0.1065307, 0.7182818]
    close(L.kl_per_token(logp, ref, "k3"), [[0.1065307, 0.7182818]])
    close(L.kl_per_token(logp, logp, "k3"), [[0.0, 0.0]])
    with pytest.raises(ValueError, match="'k2'"):
        L.kl_per_token(logp, ref, "k2")


def test_token_rewards_penalty_and_score_placement():
    score = torch.tensor([2.0, -1.0, 0.5])
    kl = torch.tensor([[0.5, -1.0, 0.3], [0.2, 0.4, 9.0], [7.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 1, 1]])
    # beta 0.1: -0.1 * kl on mask==1 tokens, score added at the last mask==1 token
    # row 0: [-0.05, 0.1, -0.03 + 2.0]; row 1: [-0.02, -0.04 - 1.0, 0 (pad)]; row 2: [0 (prompt), -0.1, -0.1 + 0.5]
    expected = [[-0.05, 0.1, 1.97], [-0.02, -1.04, 0.0], [0.0, -0.1, 0.4]]
    close(L.token_rewards(score, kl, mask, beta=0.1), expected)


def test_token_rewards_rejects_empty_rows():
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        L.token_rewards(torch.zeros(2), torch.zeros(2, 3), torch.tensor([[1, 0, 0], [0, 0, 0]]), beta=0.1)


# ---------------------------------------------------------------------------------------------- PPO


def test_gae_hand_computed():
    gamma, lam = 0.9, 0.8  # gamma * lam = 0.72
    rewards = torch.tensor([[1.0, 0.0, 2.0], [1.0, 0.0, 5.0]])
    values = torch.tensor([[0.5, 1.0, 1.5], [0.5, 1.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # row 0 (V_3 = 0):
    #   t=2: delta = 2 + 0.9*0 - 1.5 = 0.5;      A = 0.5
    #   t=1: delta = 0 + 0.9*1.5 - 1.0 = 0.35;   A = 0.35 + 0.72*0.5 = 0.71
    #   t=0: delta = 1 + 0.9*1.0 - 0.5 = 1.4;    A = 1.4 + 0.72*0.71 = 1.9112
    #   returns = A + V = [2.4112, 1.71, 2.0]
    # row 1 (pad at t=2 ignored, so V_2 = 0):
    #   t=1: delta = 0 + 0 - 1.0 = -1.0;         A = -1.0
    #   t=0: delta = 1 + 0.9*1.0 - 0.5 = 1.4;    A = 1.4 + 0.72*(-1.0) = 0.68
    #   returns = [1.18, 0.0, 0 (pad)]
    adv, ret = L.gae(rewards, values, mask, gamma, lam)
    close(adv, [[1.9112, 0.71, 0.5], [0.68, -1.0, 0.0]])
    close(ret, [[2.4112, 1.71, 2.0], [1.18, 0.0, 0.0]])


def test_gae_ignores_leading_prompt_positions():
    # response on t=1..2 only: same as a 2-token response [0, 2] with values [1.0, 1.5]
    # t=2: A = 0.5; t=1: A = 0.35 + 0.72*0.5 = 0.71; t=0 (prompt): 0
    adv, ret = L.gae(torch.tensor([[9.0, 0.0, 2.0]]), torch.tensor([[9.0, 1.0, 1.5]]),
                     torch.tensor([[0, 1, 1]]), 0.9, 0.8)
    close(adv, [[0.0, 0.71, 0.5]])
    close(ret, [[0.0, 1.71, 2.0]])


def test_ppo_loss_at_ratio_one_is_negated_mean_advantage():
    logp = torch.tensor([[-1.0, -2.0, -3.0]])
    adv = torch.tensor([[1.0, -2.0, 3.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, stats = L.ppo_policy_loss(logp, logp.clone(), adv, mask)
    close(loss, 0.5)  # -(1 - 2) / 2
    close(stats["clip_fraction"], 0.0)
    close(stats["approx_kl"], 0.0)


def test_ppo_loss_clipping_both_signs():
    ratios = torch.tensor([[1.5, 0.5, 0.5, 1.5, 1.1]])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 1.0]])
    old = torch.full((1, 5), -2.0)
    logp = (old + ratios.log()).requires_grad_()
    mask = torch.ones(1, 5)
    # per token max(-A*rho, -A*clip(rho, 0.8, 1.2)):
    #   A=+1 rho=1.5: max(-1.5, -1.2) = -1.2  (clipped)
    #   A=+1 rho=0.5: max(-0.5, -0.8) = -0.5
    #   A=-1 rho=0.5: max( 0.5,  0.8) =  0.8  (clipped)
    #   A=-1 rho=1.5: max( 1.5,  1.2) =  1.5
    #   A=+1 rho=1.1: max(-1.1, -1.1) = -1.1  (inside the trust region)
    # mean = (-1.2 - 0.5 + 0.8 + 1.5 - 1.1) / 5 = -0.1; clip fraction 2/5
    loss, stats = L.ppo_policy_loss(logp, old, adv, mask, clip=0.2)
    close(loss, -0.1)
    close(stats["clip_fraction"], 0.4)
    # approx_kl = mean 0.5 * (log rho)^2
    close(stats["approx_kl"], (0.5 * ratios.log() ** 2).mean())
    # clipped tokens get no gradient; others d(-A rho)/d logp / 5 = -A rho / 5
    loss.backward()
    close(logp.grad, [[0.0, -0.5 / 5, 0.0, 1.5 / 5, -1.1 / 5]])


def test_value_loss_clipping():
    old = torch.tensor([[1.0, 1.0, 1.0]])
    values = torch.tensor([[1.5, 1.1, 0.0]])
    returns = torch.tensor([[2.0, 0.0, 5.0]])
    mask = torch.tensor([[1, 1, 0]])
    # token 0: v=1.5 clipped to 1.2: (1.5-2)^2 = 0.25, (1.2-2)^2 = 0.64 -> 0.64 (clipped)
    # token 1: v=1.1 inside [0.8, 1.2]: (1.1-0)^2 = 1.21 both           -> 1.21
    # token 2: masked
    # loss = 0.5 * (0.64 + 1.21) / 2 = 0.4625; clip fraction 1/2
    loss, stats = L.value_loss(values, old, returns, mask, clip=0.2)
    close(loss, 0.4625)
    close(stats["clip_fraction"], 0.5)
    # with a wide clip range nothing clips: 0.5 * (0.25 + 1.21) / 2 = 0.365
    loss, stats = L.value_loss(values, old, returns, mask, clip=10.0)
    close(loss, 0.365)
    close(stats["clip_fraction"], 0.0)


def test_shape_mismatch_names_the_tensors():
    with pytest.raises(ValueError, match="advantages"):
        L.ppo_policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))
