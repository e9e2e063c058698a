"""GRPO's math around the loss as pure torch functions: the k3 KL to the reference, the rollout
importance weights, the off-policy and entropy masks, and `grpo_loss`, which puts them around a
registered policy loss (`algo.losses`) in TRL's order. Used by the learner; the advantages the
loss takes come from `algo.advantages` (the driver's).

The formulas follow TRL 1.16's `GRPOTrainer` (`_generate_and_score_completions` for the vLLM
importance-sampling ratio, `_compute_loss` for the loss), checked by
`tests/algo/test_parity_trl.py` against TRL's own source. Deliberate differences are stated
where they occur.

Shapes: B sequences (completions, prompt-major: row i*n+j is sample j of prompt i), T completion
positions (right-padded). Padded positions must hold finite values: the mask multiplies them
away, as in TRL, and NaN * 0 is NaN.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from grpo_ray.algo.losses import (LOSS_TYPES, POLICY_LOSSES, PolicyInputs, Stat,  # noqa: F401
                                  policy_loss)

# ---- the rollout importance weights and the masks -----------------------------------------------
IMPORTANCE_SAMPLING_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def importance_weights(old_logp: Tensor, sampling_logp: Tensor, mask: Tensor, mode: str,
                       cap: float | None, minimum: float | None = None) -> Tensor:
    """Importance weights pi_old / pi_rollout that correct for the rollout engine sampling from a
    slightly different distribution than the learner's (and, one step off policy, from the
    previous adapter): TRL's vLLM importance sampling, `vllm_importance_sampling_mode`.

    old_logp, sampling_logp, mask: (B, T) -> detached (B, T) for the token modes, (B, 1) for the
    sequence modes (the product of the sequence's token ratios). `*_truncate` clamps the ratio
    to [minimum, cap]; `*_mask` sets ratios outside [minimum, cap] to 0 (the token or sequence
    then takes no part in the policy term). None is no bound. A NaN sampling logprob
    (unavailable from the engine) and every position outside the mask count as ratio 1, as TRL.
    TRL: `_generate_and_score_completions`, the `vllm_importance_sampling_correction` block."""
    if old_logp.shape != sampling_logp.shape or mask.shape != old_logp.shape:
        raise ValueError(f"shapes differ: old_logp {tuple(old_logp.shape)}, sampling_logp "
                         f"{tuple(sampling_logp.shape)}, mask {tuple(mask.shape)}")
    if mode not in IMPORTANCE_SAMPLING_MODES:
        raise ValueError(f"unknown importance sampling mode {mode!r}; expected one of "
                         f"{IMPORTANCE_SAMPLING_MODES}")
    level, constraint = mode.split("_")
    diff = torch.nan_to_num((old_logp - sampling_logp).detach() * mask, nan=0.0)
    ratio = torch.exp(diff.sum(-1, keepdim=True) if level == "sequence" else diff)
    if constraint == "truncate":
        return torch.clamp(ratio, min=minimum, max=cap)
    low = -math.inf if minimum is None else minimum
    high = math.inf if cap is None else cap
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)


def off_policy_mask(advantages: Tensor, logp: Tensor, sampling_logp: Tensor, mask: Tensor,
                    threshold: float) -> Tensor:
    """DeepSeek-V3.2's off-policy sequence mask (arXiv 2512.02556, eq. 9): a sequence with a
    negative advantage whose mean KL(rollout || policy) estimate, sampling_logp - logp over its
    tokens, exceeds `threshold` is dropped. advantages (B, 1); logp, sampling_logp, mask (B, T)
    -> (B, 1) 1.0 keep / 0.0 drop. NaN sampling log-probs count as 0. TRL: `get_off_policy_mask`,
    fed the rollout's log-probs (`sampling_per_token_logps`)."""
    kl = torch.nan_to_num(sampling_logp - logp.detach(), nan=0.0)
    mean_kl = (kl * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    return ((advantages >= 0) | (mean_kl <= threshold)).to(mask.dtype)


def entropy_threshold(entropies: Tensor, mask: Tensor, top_quantile: float) -> Tensor:
    """The entropy at or above which a token is among the `top_quantile` highest of the masked
    tokens (Beyond the 80/20 Rule, arXiv 2506.01939: learning on the ~20% forking tokens).
    entropies, mask: (N, T) (every micro-batch of the whole batch, concatenated) -> a scalar;
    +inf without tokens (nothing passes). TRL: `get_high_entropy_mask`'s `torch.quantile(...,
    1 - top_entropy_quantile)`, over the tokens of its (micro-)batch."""
    active = entropies[mask.bool()].float()
    if not active.numel():
        return torch.tensor(math.inf, device=entropies.device)
    return torch.quantile(active, 1 - top_quantile)


def high_entropy_mask(entropies: Tensor, mask: Tensor, threshold: Tensor) -> Tensor:
    """(B, T) entropies, mask, the batch's `entropy_threshold` -> (B, T) bool: the masked tokens
    whose entropy reaches it (TRL's `get_high_entropy_mask`)."""
    return ((entropies * mask) >= threshold) & mask.bool()


# ---- the loss -----------------------------------------------------------------------------------
def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(policy || ref) on tokens sampled from the policy (Schulman;
    TRL's `per_token_kl`). (B, T), (B, T) -> (B, T): exp(ref - logp) - (ref - logp) - 1, >= 0."""
    if logp.shape != ref_logp.shape:
        raise ValueError(f"ref_logp shape {tuple(ref_logp.shape)} != logp shape "
                         f"{tuple(logp.shape)}")
    d = ref_logp - logp
    return torch.exp(d) - d - 1


IMPORTANCE_SAMPLING_LEVELS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "token": lambda log_ratio, mask: log_ratio,
    "sequence": lambda log_ratio, mask: ((log_ratio * mask).sum(-1, keepdim=True)
                                         / mask.sum(-1, keepdim=True).clamp(min=1.0)),
}
"""`algorithm.importance_sampling_level` -> the log of the policy term's importance weight from
the per-token log-ratios (B, T) and mask: per token, or one per sequence, the mean of its
tokens' (GSPO, arXiv 2507.18071; TRL's `importance_sampling_level`)."""

HYPERPARAMETERS = tuple(sorted({p for loss in POLICY_LOSSES.values() for p in loss.params}))
"""Every keyword argument some registered loss takes (`algorithm.*` names)."""


def aggregate_loss(per_token: Tensor, mask: Tensor, loss_type: str, *, num_sequences: int,
                   num_tokens: int, max_completion_length: int) -> Tensor:
    """These rows' share of the whole batch's loss, by `loss_type`'s registered aggregation
    (`algo.losses`): summed over micro-batches it equals the loss of the whole batch at once.

    per_token: (B, T) or (B, 1); mask: (B, T) (float or bool); num_sequences and num_tokens (the
    sum of the mask) count the WHOLE batch. Returns a scalar."""
    aggregate = policy_loss(loss_type).aggregate
    if per_token.shape[0] != mask.shape[0] or per_token.shape[1] not in (1, mask.shape[1]):
        raise ValueError(f"per_token shape {tuple(per_token.shape)} does not fit mask shape "
                         f"{tuple(mask.shape)}")
    if num_sequences < 1:
        raise ValueError(f"num_sequences must be >= 1, got {num_sequences}")
    return aggregate(per_token, mask.to(per_token.dtype), num_sequences=num_sequences,
                     num_tokens=num_tokens, max_completion_length=max_completion_length)


@dataclass
class LossOutputs:
    loss: Tensor
    """Scalar, this micro-batch's share of the batch loss (differentiable)."""
    per_token_kl: Tensor
    """(B, T) detached k3 KL to the reference (times the importance weight with
    `use_bias_correction_kl`); zeros when beta == 0 or there is no reference."""
    clipped: Tensor
    """Bool, (B, T) or (B, 1): where the loss's clipping took the gradient away."""
    stats: dict[str, Stat]
    """The logged figures, mergeable over micro-batches: `kl`, `clip_fraction` (the mean of
    `clipped`) and the loss's own under TRL's names (`clip_ratio/region_mean`, ...)."""


def grpo_loss(
    logp: Tensor, old_logp: Tensor, ref_logp: Tensor | None, advantages: Tensor, mask: Tensor, *,
    loss_type: str, beta: float, num_sequences: int, num_tokens: int, max_completion_length: int,
    is_weights: Tensor | None = None, importance_sampling_level: str = "token",
    use_bias_correction_kl: bool = False, entropy_mask: Tensor | None = None,
    off_policy_threshold: float | None = None, sampling_logp: Tensor | None = None,
    **hyperparameters: float | None,
) -> LossOutputs:
    """The loss of one micro-batch: TRL's `_compute_loss`, with the policy term of `loss_type`
    (`algo.losses.POLICY_LOSSES`).

    logp (B, T) differentiable; old_logp, ref_logp, mask, entropy_mask, sampling_logp (B, T);
    is_weights (B, T) or (B, 1) (`importance_weights`); advantages (B,). In TRL's order:
    coef = exp(log-ratio) at `importance_sampling_level`; the registered term; times the
    off-policy sequence mask (`off_policy_threshold`, from `sampling_logp`, else old_logp, as
    TRL); times `entropy_mask`; times `is_weights` (but VESPO folds them into its own weight);
    plus beta * k3_kl(logp, ref_logp) (times coef with `use_bias_correction_kl`, DeepSeek-V3.2's
    unbiased KL gradient) when beta > 0 and ref_logp is given: the importance weights and the
    masks never touch the KL term. The loss is `aggregate_loss(per_token, mask, loss_type, ...)`.
    `hyperparameters` are the term's keyword arguments (`epsilon`, `epsilon_high`, `delta`,
    `sapo_temperature_pos`, ...: see its signature; `epsilon_high` and `delta` may be left out:
    None); those of other registered losses are ignored, any other name is an error.
    """
    loss = policy_loss(loss_type)
    missing = [p for p in loss.required if p not in hyperparameters]
    unknown = [p for p in hyperparameters if p not in HYPERPARAMETERS]
    if missing or unknown:
        raise ValueError(f"grpo_loss({loss_type}): " + "; ".join(
            part for part in (missing and f"missing {', '.join(missing)}",
                              unknown and f"unknown {', '.join(unknown)}") if part))
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"unknown importance_sampling_level {importance_sampling_level!r}; "
                         f"expected one of {tuple(IMPORTANCE_SAMPLING_LEVELS)}")
    if old_logp.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError(f"shapes differ: logp {tuple(logp.shape)}, old_logp "
                         f"{tuple(old_logp.shape)}, mask {tuple(mask.shape)}")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages shape {tuple(advantages.shape)} must be "
                         f"({logp.shape[0]},), one per sequence")
    if is_weights is not None and (is_weights.shape[0] != logp.shape[0]
                                   or is_weights.shape[1] not in (1, logp.shape[1])):
        raise ValueError(f"is_weights shape {tuple(is_weights.shape)} must be "
                         f"({logp.shape[0]}, {logp.shape[1]}) or ({logp.shape[0]}, 1)")
    m = mask.to(logp.dtype)
    adv = advantages.unsqueeze(1)
    log_ratio = logp - old_logp
    coef = torch.exp(IMPORTANCE_SAMPLING_LEVELS[importance_sampling_level](log_ratio, m))
    term = loss.term(PolicyInputs(logp, log_ratio, coef, adv, m, is_weights),
                     **{p: hyperparameters[p] for p in loss.params if p in hyperparameters})
    per_token = term.per_token
    if off_policy_threshold is not None:
        rollout = old_logp if sampling_logp is None else sampling_logp
        per_token = per_token * off_policy_mask(adv, logp, rollout, m, off_policy_threshold)
    if entropy_mask is not None:
        per_token = per_token * entropy_mask
    if is_weights is not None and not loss.folds_is_weights:
        per_token = per_token * is_weights
    kl = torch.zeros_like(logp)
    if beta != 0 and ref_logp is not None:
        kl = k3_kl(logp, ref_logp)
        if use_bias_correction_kl:
            kl = kl * coef
        per_token = per_token + beta * kl
    stats = {"kl": Stat.mean(kl, m), "clip_fraction": Stat.mean(term.clipped, m), **term.stats}
    return LossOutputs(
        loss=aggregate_loss(per_token, m, loss_type, num_sequences=num_sequences,
                            num_tokens=num_tokens, max_completion_length=max_completion_length),
        per_token_kl=kl.detach(), clipped=term.clipped, stats=stats)


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
