"""Losses and RL math of the LLaMA 2-Chat recipe, as pure functions (torch only).

Shape symbols: B batch, T tokens, V vocabulary. Masks are 1 on the positions that count and 0 elsewhere.

- language modelling: `logprobs_from_logits`, `entropy_from_logits`, `lm_loss`
- reward models: `MARGINS`, `margin_for`, `margin_ranking_loss` (LLaMA 2 paper, eq. 2)
- PPO reward: `safe_logit`, `llama2_combined_score`, `llama2_reward` (LLaMA 2 paper, section 3.2.3),
  `kl_per_token`, `token_rewards`
- PPO: `whiten`, `gae`, `ppo_policy_loss`, `value_loss`
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# ---------------------------------------------------------------------------------------------- masked reductions


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum_i x_i * m_i over `dim` (all dimensions when None)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum_i x_i m_i / sum_i m_i over `dim` (all dimensions when None); 0 where the mask is all zero."""
    mask = mask.to(x.dtype)
    total = masked_sum(x, mask, dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return torch.where(count > 0, total / count.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(total))


def whiten(x: Tensor, mask: Tensor | None = None, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Whitening: (x - mean) / sqrt(var + eps), mean and (population) variance over the mask==1 entries.

    With `shift_mean=False` the mean is added back (only the scale changes). Masked-out entries come back as 0.
    """
    if mask is None:
        mask = torch.ones_like(x)
    _check_same_shape(x=x, mask=mask)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


# ---------------------------------------------------------------------------------------------- language modelling


def logprobs_from_logits(logits: Tensor, tokens: Tensor) -> Tensor:
    """log pi(token_t) = z_t[token_t] - logsumexp(z_t), for logits z (B, T, V) and tokens (B, T) -> (B, T).

    Computed in float32 (never materialises a second (B, T, V) tensor of log-probabilities in full precision
    for bf16/fp16 inputs: those are upcast one row at a time).
    """
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)} disagree; "
                         "logits must be tokens.shape + (V,)")
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (B, T)
        return picked - torch.logsumexp(logits, dim=-1)  # (B, T)
    rows = []
    for row_logits, row_tokens in zip(logits, tokens, strict=True):  # (T, V), (T,)
        row = F.log_softmax(row_logits.float(), dim=-1)  # (T, V)
        rows.append(row.gather(-1, row_tokens.unsqueeze(-1)).squeeze(-1))  # (T,)
    return torch.stack(rows)  # (B, T)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """H(softmax(z)) = logsumexp(z) - sum_v softmax(z)_v z_v, for logits (B, T, V) -> (B, T)."""
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)  # (B, T, V)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)  # (B, T)


def lm_loss(logits: Tensor, targets: Tensor, loss_mask: Tensor) -> Tensor:
    """Next-token cross entropy: -sum_t m_t log p(targets_t | logits_t) / sum_t m_t.

    Convention: logits[:, t] predicts targets[:, t]; the caller shifts (targets = tokens[:, 1:],
    logits = model(tokens)[:, :-1]). A batch with no mask==1 position gives 0.
    """
    _check_same_shape(targets=targets, loss_mask=loss_mask)
    logp = logprobs_from_logits(logits, targets)  # (B, T)
    return -masked_mean(logp, loss_mask)


# ---------------------------------------------------------------------------------------------- reward models

RATINGS: tuple[str, ...] = ("significantly_better", "better", "slightly_better", "negligibly_better")

MARGINS: dict[str, dict[str, float]] = {
    "none": {r: 0.0 for r in RATINGS},
    "small": {"significantly_better": 1.0, "better": 2 / 3, "slightly_better": 1 / 3, "negligibly_better": 0.0},
    "large": {"significantly_better": 3.0, "better": 2.0, "slightly_better": 1.0, "negligibly_better": 0.0},
}


def margin_for(ratings: Sequence[str], table: str) -> Tensor:
    """m(rating) for each pair from the margin table `table` ("none", "small" or "large") -> (B,) float32."""
    if table not in MARGINS:
        raise ValueError(f"unknown margin table {table!r}; choose one of {sorted(MARGINS)}")
    margins = MARGINS[table]
    for rating in ratings:
        if rating not in margins:
            raise ValueError(f"unknown rating {rating!r}; choose one of {list(RATINGS)}")
    return torch.tensor([margins[r] for r in ratings], dtype=torch.float32)


def margin_ranking_loss(r_chosen: Tensor, r_rejected: Tensor, margin: Tensor) -> Tensor:
    """LLaMA 2 eq. 2: mean_b -log(sigmoid(r_c - r_r - m(rating))), computed stably as -logsigmoid."""
    _check_same_shape(r_chosen=r_chosen, r_rejected=r_rejected, margin=margin)
    margin = margin.to(device=r_chosen.device, dtype=r_chosen.dtype)
    return -F.logsigmoid(r_chosen - r_rejected - margin).mean()


# ---------------------------------------------------------------------------------------------- PPO reward


def safe_logit(p: Tensor, eps: float = 1e-6) -> Tensor:
    """logit(p) = log(p / (1 - p)) with p clamped to [eps, 1 - eps] so 0 and 1 stay finite."""
    p = p.clamp(eps, 1 - eps)
    return torch.log(p) - torch.log1p(-p)


def llama2_combined_score(s_helpful: Tensor, s_safety: Tensor, is_safety: Tensor, gate: float = 0.15) -> Tensor:
    """LLaMA 2 section 3.2.3: R_c = R_s if is_safety(prompt) or R_s < gate else R_h, per sample -> (B,).

    `s_helpful`, `s_safety` are probabilities (sigmoid of the reward models' outputs); `is_safety` is (B,) bool.
    """
    is_safety = torch.as_tensor(is_safety, dtype=torch.bool, device=s_safety.device)
    _check_same_shape(s_helpful=s_helpful, s_safety=s_safety, is_safety=is_safety)
    return torch.where(is_safety | (s_safety < gate), s_safety, s_helpful)


def llama2_reward(
    s_helpful: Tensor, s_safety: Tensor, is_safety: Tensor, gate: float = 0.15, whiten_rewards: bool = True
) -> Tensor:
    """LLaMA 2 section 3.2.3: R = whiten(logit(R_c)) over the batch (the KL penalty is added per token later)."""
    score = safe_logit(llama2_combined_score(s_helpful, s_safety, is_safety, gate))  # (B,)
    return whiten(score) if whiten_rewards else score


def kl_per_token(logp: Tensor, ref_logp: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_0) from samples of pi (Schulman's estimators), -> (B, T).

    k1 = log pi - log pi_0 (unbiased, can be negative); k3 = exp(r) - 1 - r with r = log pi_0 - log pi
    (unbiased, always >= 0).
    """
    _check_same_shape(logp=logp, ref_logp=ref_logp)
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k3":
        r = ref_logp - logp
        return torch.expm1(r) - r
    raise ValueError(f"unknown KL estimator {estimator!r}; choose 'k1' or 'k3'")


def token_rewards(score: Tensor, kl: Tensor, mask: Tensor, beta: float) -> Tensor:
    """Per-token PPO reward: r_t = -beta * KL_t on every response token, plus the score R on the last one.

    score (B,), kl (B, T), mask (B, T) with 1 on response tokens -> (B, T), 0 where mask is 0.
    """
    _check_same_shape(kl=kl, mask=mask)
    if score.shape != kl.shape[:1]:
        raise ValueError(f"score {tuple(score.shape)} must be (B,) with B = {kl.shape[0]}")
    mask = mask.to(kl.dtype)
    if (mask.sum(-1) == 0).any():
        empty = torch.nonzero(mask.sum(-1) == 0).flatten().tolist()
        raise ValueError(f"rows {empty} have no response token in the mask; every row needs at least one")
    positions = torch.arange(kl.shape[1], device=kl.device)  # (T,)
    last = torch.where(mask > 0, positions, -1).max(-1).values  # (B,)
    rewards = -beta * kl * mask  # (B, T)
    rewards[torch.arange(kl.shape[0], device=kl.device), last] += score.to(kl.dtype)
    return rewards


# ---------------------------------------------------------------------------------------------- PPO


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the response tokens -> (advantages, returns), each (B, T).

    delta_t = r_t + gamma * V_{t+1} - V_t,  A_t = delta_t + gamma * lam * A_{t+1},  returns_t = A_t + V_t,
    with V and A zero after the last mask==1 token. Positions where mask is 0 come back as 0.
    """
    _check_same_shape(rewards=rewards, values=values, mask=mask)
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask  # (B, T)
    advantages = torch.zeros_like(values)  # (B, T)
    next_value = torch.zeros_like(values[:, 0])  # (B,)
    next_advantage = torch.zeros_like(values[:, 0])  # (B,)
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]  # (B,)
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    returns = (advantages + values) * mask
    return advantages, returns


def ppo_policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip: float = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate: -mean_t min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t), rho = pi / pi_old.

    Mean over mask==1 tokens. Stats (detached): clip_fraction = share of tokens where the clipped term is the
    one used; approx_kl = mean 0.5 * (log pi - log pi_old)^2; ratio = mean rho.
    """
    _check_same_shape(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask)
    log_ratio = logp - old_logp  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    unclipped = -advantages * ratio  # (B, T)
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)  # (B, T)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clip_fraction": masked_mean((clipped > unclipped).to(logp.dtype), mask),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss: 0.5 * mean_t max((V_t - R_t)^2, (clip(V_t, V_old - eps, V_old + eps) - R_t)^2).

    Mean over mask==1 tokens. Stats (detached): clip_fraction = share of tokens where the clipped error is used.
    """
    _check_same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)  # (B, T)
    err = (values - returns) ** 2  # (B, T)
    err_clipped = (clipped_values - returns) ** 2  # (B, T)
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        stats = {"clip_fraction": masked_mean((err_clipped > err).to(values.dtype), mask)}
    return loss, stats


# ---------------------------------------------------------------------------------------------- helpers


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shapes disagree: {shapes}; pass tensors of one shape")
