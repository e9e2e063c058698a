"""GRPO's math as pure torch functions: group-relative advantages, the clipped surrogate, the k3
KL to the reference, truncated importance sampling and the loss aggregations.

The formulas follow TRL 1.16's `GRPOTrainer` (`_generate_and_score_completions` for the
advantages and the vLLM importance-sampling ratio, `_compute_loss` for the loss), checked by
`tests/algo/test_parity_trl.py`. Deliberate differences are stated where they occur.

TRL components: `trl.trainer.utils.nanstd` (the group and batch std of the advantages), imported
where it is used, as TRL loads transformers and accelerate.

Shapes: B sequences (completions, prompt-major: row i*n+j is sample j of prompt i), T completion
positions (right-padded). Padded positions must hold finite values: the mask multiplies them
away, as in TRL, and NaN * 0 is NaN.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

SCALES = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo")


def group_advantages(rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """Group-relative advantages, one per completion.

    rewards: (B,) float, B = P * group_size, prompt-major. NaN marks a row that could not be
    scored: it is left out of its group's mean and std and gets advantage 0.
    Returns (B,): r - mean_group, divided by `std_group + eps` (scale "group"; unbiased std, as
    TRL and `torch.std`), by `std_batch + eps` (scale "batch": the mean stays per group, as TRL),
    or not divided (scale "none", Dr. GRPO).

    The std is TRL's `nanstd`: unbiased, ignoring NaN, NaN for fewer than two values; its Bessel
    factor is computed in float32 (torch's default dtype), ~1e-8 off (relative) in float64.
    A group with fewer than two valid rows gets 0 (TRL: its NaN std turns into 0 too). A group
    whose valid rewards are all equal gets exactly 0; TRL divides the rounding residue of
    r - mean by 1e-4 there (|A| ~ 1e-12), a deliberate, harmless difference.
    """
    if rewards.dim() != 1 or not rewards.is_floating_point():
        raise ValueError(f"rewards must be a 1-D float tensor, got shape {tuple(rewards.shape)} {rewards.dtype}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"group_size {group_size} does not divide the {rewards.numel()} rewards into whole groups")
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {SCALES}")
    if torch.isinf(rewards).any():
        raise ValueError("rewards contain inf; mark unscorable rows with NaN instead")

    from trl.trainer.utils import nanstd

    groups = rewards.view(-1, group_size)
    adv = groups - torch.nanmean(groups, dim=1, keepdim=True)
    if scale == "group":
        adv = adv / (nanstd(groups, dim=1, keepdim=True) + eps)
    elif scale == "batch":
        adv = adv / (nanstd(rewards) + eps)
    # Groups with one distinct valid value carry no signal; exact zeros keep them out of the loss.
    adv = torch.where(zero_variance_groups(rewards, group_size).unsqueeze(1),
                      torch.zeros_like(adv), adv)
    return torch.nan_to_num(adv, nan=0.0).view(-1)


def zero_variance_groups(rewards: Tensor, group_size: int) -> Tensor:
    """(B,) rewards (NaN = unscored), prompt-major -> (B / group_size,) bool: the groups that
    carry no gradient, because fewer than two of their rows are scored or every scored reward is
    the same (their advantages are all 0). DAPO's dynamic sampling drops them."""
    groups = rewards.view(-1, group_size)
    valid = ~torch.isnan(groups)
    hi = torch.where(valid, groups, -torch.inf).amax(dim=1)
    lo = torch.where(valid, groups, torch.inf).amin(dim=1)
    return (hi == lo) | (valid.sum(dim=1) < 2)


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(policy || ref) on tokens sampled from the policy (Schulman;
    TRL's `per_token_kl`). (B, T), (B, T) -> (B, T): exp(ref - logp) - (ref - logp) - 1, >= 0."""
    if logp.shape != ref_logp.shape:
        raise ValueError(f"ref_logp shape {tuple(ref_logp.shape)} != logp shape {tuple(logp.shape)}")
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def clipped_surrogate(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, epsilon_low: float, epsilon_high: float
) -> tuple[Tensor, Tensor]:
    """PPO's clipped objective, negated as a loss, per token.

    logp, old_logp: (B, T); advantages: (B,). ratio = exp(logp - old_logp).
    Returns (loss (B, T) = -min(ratio * A, clamp(ratio, 1 - eps_low, 1 + eps_high) * A),
    clipped (B, T) bool: where the clipped term is the one taken, so the token has no gradient;
    TRL's is_low_clipped | is_high_clipped).
    """
    if logp.shape != old_logp.shape:
        raise ValueError(f"old_logp shape {tuple(old_logp.shape)} != logp shape {tuple(logp.shape)}")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages shape {tuple(advantages.shape)} must be ({logp.shape[0]},), one per sequence")
    adv = advantages.unsqueeze(1)
    ratio = torch.exp(logp - old_logp)
    clamped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.min(ratio * adv, clamped * adv)
    clipped = ((ratio < 1 - epsilon_low) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))
    return loss, clipped


def truncated_is_weights(old_logp: Tensor, sampling_logp: Tensor, cap: float) -> Tensor:
    """Truncated importance weights that correct for the rollout engine sampling from a slightly
    different distribution than the learner's (TRL's vLLM importance sampling, `token_truncate`).

    (B, T), (B, T) -> (B, T) detached: min(exp(old_logp - sampling_logp), cap). A NaN sampling
    logprob (unavailable from the engine) gives weight 1, as TRL. TRL's default mode is
    `sequence_mask` with cap 3; this is the token-level truncated variant only.
    """
    if old_logp.shape != sampling_logp.shape:
        raise ValueError(f"sampling_logp shape {tuple(sampling_logp.shape)} != old_logp shape {tuple(old_logp.shape)}")
    diff = (old_logp - sampling_logp).detach()
    diff = torch.where(torch.isnan(diff), torch.zeros_like(diff), diff)
    return torch.clamp(torch.exp(diff), max=cap)


def aggregate_loss(
    per_token: Tensor, mask: Tensor, loss_type: str, *, num_sequences: int, num_tokens: int,
    max_completion_length: int,
) -> Tensor:
    """These rows' share of the whole batch's loss: summed over micro-batches it equals the loss
    of the whole batch computed at once, so gradient accumulation is exact.

    per_token, mask: (B, T) (mask float or bool); num_sequences and num_tokens (sum of the mask)
    count the WHOLE batch. Returns a scalar:
    - "grpo": sum_i (sum_t l*m / max(1, sum_t m)) / num_sequences (DeepSeekMath);
    - "bnpo": sum l*m / max(1, num_tokens) (token mean over the batch);
    - "dr_grpo": sum l*m / (num_sequences * max_completion_length) (Dr. GRPO).
    With one micro-batch these are TRL's formulas. TRL normalizes each micro-batch by its own
    size and divides by the accumulation steps, which is inexact for "bnpo" when micro-batches
    hold different token counts (and for all types with unequal micro-batches); this is not.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    if mask.shape != per_token.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != per_token shape {tuple(per_token.shape)}")
    if num_sequences < 1:
        raise ValueError(f"num_sequences must be >= 1, got {num_sequences}")
    m = mask.to(per_token.dtype)
    masked = per_token * m
    if loss_type == "grpo":
        return (masked.sum(-1) / m.sum(-1).clamp(min=1.0)).sum() / num_sequences
    if loss_type == "bnpo":
        return masked.sum() / max(1, num_tokens)
    if max_completion_length < 1:
        raise ValueError(f"max_completion_length must be >= 1, got {max_completion_length}")
    return masked.sum() / (num_sequences * max_completion_length)


@dataclass
class LossOutputs:
    loss: Tensor
    """Scalar, this micro-batch's share of the batch loss (differentiable)."""
    per_token_kl: Tensor
    """(B, T) detached k3 KL to the reference; zeros when beta == 0 or there is no reference."""
    clipped: Tensor
    """(B, T) bool, tokens whose clipped term was taken."""
    ratio: Tensor
    """(B, T) detached exp(logp - old_logp)."""


def grpo_loss(
    logp: Tensor, old_logp: Tensor, ref_logp: Tensor | None, advantages: Tensor, mask: Tensor, *,
    beta: float, epsilon: float, epsilon_high: float | None, loss_type: str, num_sequences: int,
    num_tokens: int, max_completion_length: int, is_weights: Tensor | None = None,
) -> LossOutputs:
    """The GRPO loss of one micro-batch (TRL's `_compute_loss` for grpo/bnpo/dr_grpo, token-level
    ratios, no entropy mask or off-policy mask).

    logp (B, T) differentiable; old_logp, ref_logp, is_weights, mask (B, T); advantages (B,).
    per_token = surrogate * is_weights (if given) + beta * k3_kl(logp, ref_logp) (if beta > 0 and
    ref_logp is given); as TRL, the importance weights do not touch the KL term. The loss is
    `aggregate_loss(per_token, mask, ...)`. epsilon_high None means epsilon.
    """
    eps_high = epsilon if epsilon_high is None else epsilon_high
    surrogate, clipped = clipped_surrogate(logp, old_logp, advantages, epsilon, eps_high)
    if is_weights is not None:
        if is_weights.shape != logp.shape:
            raise ValueError(f"is_weights shape {tuple(is_weights.shape)} != logp shape {tuple(logp.shape)}")
        surrogate = surrogate * is_weights
    per_token = surrogate
    if beta > 0 and ref_logp is not None:
        kl = k3_kl(logp, ref_logp)
        per_token = per_token + beta * kl
        per_token_kl = kl.detach()
    else:
        per_token_kl = torch.zeros_like(logp).detach()
    loss = aggregate_loss(per_token, mask, loss_type, num_sequences=num_sequences, num_tokens=num_tokens,
                          max_completion_length=max_completion_length)
    return LossOutputs(loss=loss, per_token_kl=per_token_kl, clipped=clipped,
                       ratio=torch.exp(logp - old_logp).detach())


def probability_gap(learner_logp: Tensor, sampling_logp: Tensor, mask: Tensor) -> dict[str, float]:
    """How far the rollout engine's token probabilities are from the learner's, on sampled tokens.

    learner_logp, sampling_logp, mask: (B, T). Returns
    - "mean_abs_diff": masked mean of |learner_logp - sampling_logp|;
    - "kl": masked mean of the k3 estimate of KL(rollout || learner) from the rollout's own
      samples: with d = learner_logp - sampling_logp, k3 = exp(d) - d - 1 (>= 0, unbiased).
    Positions outside the mask are ignored whatever they hold; an empty mask gives zeros.
    """
    if not (learner_logp.shape == sampling_logp.shape == mask.shape):
        raise ValueError(f"shapes differ: learner_logp {tuple(learner_logp.shape)}, "
                         f"sampling_logp {tuple(sampling_logp.shape)}, mask {tuple(mask.shape)}")
    m = mask.bool()
    d = (learner_logp - sampling_logp).detach().double()
    d = torch.where(m, d, torch.zeros_like(d))
    count = max(1, int(m.sum()))
    return {"mean_abs_diff": float(d.abs().sum() / count),
            "kl": float((torch.exp(d) - d - 1).sum() / count)}
