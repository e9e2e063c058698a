"""Group-relative advantages as pure torch functions: the centring and scaling of each group's
rewards (`algorithm.scale_rewards`, a registry), the groups without a gradient, and the
aggregations of several reward functions' scores (`algorithm.multi_objective_aggregation`, a
registry). Used by the driver (`driver.groups`), which is the only process that sees whole
groups.

The formulas follow TRL 1.16's `GRPOTrainer._generate_and_score_completions`, checked by
`tests/algo/test_parity_trl.py` against TRL's own source. Deliberate differences are stated
where they occur.

TRL components: `trl.trainer.utils.nanstd` (the group and batch std), imported where it is used,
as TRL loads transformers and accelerate.

Shapes: B completions, prompt-major (row i*n+j is sample j of prompt i), P prompts, n = the
group size, K reward functions.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

Scaling = Callable[[Tensor, Tensor, Tensor, float], Tensor]
ADVANTAGE_SCALINGS: dict[str, Scaling] = {}
"""`algorithm.scale_rewards` -> how the centred rewards are scaled: (centred (P, n), rewards
grouped (P, n), rewards (B,), eps) -> (P, n)."""


def register_advantage_scaling(name: str) -> Callable[[Scaling], Scaling]:
    def register(fn: Scaling) -> Scaling:
        ADVANTAGE_SCALINGS[name] = fn
        return fn
    return register


@register_advantage_scaling("group")
def _by_group_std(centred: Tensor, groups: Tensor, rewards: Tensor, eps: float) -> Tensor:
    """Divided by the group's std + eps (DeepSeekMath; TRL's `scale_rewards="group"`)."""
    from trl.trainer.utils import nanstd

    return centred / (nanstd(groups, dim=1, keepdim=True) + eps)


@register_advantage_scaling("batch")
def _by_batch_std(centred: Tensor, groups: Tensor, rewards: Tensor, eps: float) -> Tensor:
    """Divided by the whole batch's std + eps, the mean staying per group (PPO Lite; TRL's
    `scale_rewards="batch"`)."""
    from trl.trainer.utils import nanstd

    return centred / (nanstd(rewards) + eps)


@register_advantage_scaling("none")
def _unscaled(centred: Tensor, groups: Tensor, rewards: Tensor, eps: float) -> Tensor:
    """Not divided (Dr. GRPO, arXiv 2503.20783: the std brings a question-difficulty bias)."""
    return centred


SCALES = tuple(ADVANTAGE_SCALINGS)


def group_advantages(rewards: Tensor, group_size: int, scale: str = "group",
                     eps: float = 1e-4) -> Tensor:
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
        raise ValueError(f"rewards must be a 1-D float tensor, got shape "
                         f"{tuple(rewards.shape)} {rewards.dtype}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"group_size {group_size} does not divide the {rewards.numel()} "
                         "rewards into whole groups")
    if scale not in ADVANTAGE_SCALINGS:
        raise ValueError(f"unknown scale {scale!r}; expected one of {SCALES}")
    if torch.isinf(rewards).any():
        raise ValueError("rewards contain inf; mark unscorable rows with NaN instead")

    groups = rewards.view(-1, group_size)
    adv = ADVANTAGE_SCALINGS[scale](groups - torch.nanmean(groups, dim=1, keepdim=True), groups,
                                    rewards, eps)
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


MultiObjective = Callable[[Tensor, Tensor, int, str], Tensor]
MULTI_OBJECTIVE_AGGREGATIONS: dict[str, MultiObjective] = {}
"""`algorithm.multi_objective_aggregation` -> the advantages of a step from every reward
function's scores: (rewards_per_func (B, K), NaN where function k did not score the row;
weights (K,); group_size; scale_rewards) -> (B,). A row no function scored gets 0."""


def register_multi_objective(name: str) -> Callable[[MultiObjective], MultiObjective]:
    def register(fn: MultiObjective) -> MultiObjective:
        MULTI_OBJECTIVE_AGGREGATIONS[name] = fn
        return fn
    return register


def _check_per_func(rewards_per_func: Tensor, weights: Tensor, group_size: int) -> None:
    if rewards_per_func.dim() != 2 or weights.shape != rewards_per_func.shape[1:]:
        raise ValueError(f"rewards_per_func {tuple(rewards_per_func.shape)} must be (B, K) and "
                         f"weights {tuple(weights.shape)} (K,)")
    if group_size < 1 or rewards_per_func.shape[0] % group_size:
        raise ValueError(f"group_size {group_size} does not divide the {rewards_per_func.shape[0]}"
                         " rows into whole groups")


@register_multi_objective("sum_then_normalize")
def sum_then_normalize(rewards_per_func: Tensor, weights: Tensor, group_size: int,
                       scale: str) -> Tensor:
    """The weighted sum of the functions that scored each row (NaN where none did: the reward
    pool's `Scores.total`), then `group_advantages` with `scale`. TRL:
    `_generate_and_score_completions`, the `sum_then_normalize` branch."""
    _check_per_func(rewards_per_func, weights, group_size)
    total = (rewards_per_func * weights.to(rewards_per_func).unsqueeze(0)).nansum(dim=1)
    total[torch.isnan(rewards_per_func).all(dim=1)] = math.nan
    return group_advantages(total, group_size, scale)


@register_multi_objective("normalize_then_sum")
def normalize_then_sum(rewards_per_func: Tensor, weights: Tensor, group_size: int,
                       scale: str, eps: float = 1e-4) -> Tensor:
    """GDPO (each reward function normalized within its group, then the weighted sum normalized
    over the batch): with z_k = (r_k - mean_group(r_k)) / (std_group(r_k) + eps) (0 where NaN),
    s = sum_k w_k z_k, A = (s - mean(s)) / (std(s) + eps) over the batch; rows no function scored
    stay out of the means. `scale` does not apply (TRL ignores `scale_rewards` here too). TRL:
    `_generate_and_score_completions`, the `normalize_then_sum` branch, then its NaN -> 0."""
    from trl.trainer.utils import nanstd

    _check_per_func(rewards_per_func, weights, group_size)
    k = rewards_per_func.shape[1]
    grouped = rewards_per_func.view(-1, group_size, k)
    z = ((grouped - torch.nanmean(grouped, dim=1, keepdim=True))
         / (nanstd(grouped, dim=1, keepdim=True) + eps)).view(-1, k)
    summed = (z * weights.to(z).unsqueeze(0)).nansum(dim=1)
    summed[torch.isnan(rewards_per_func).all(dim=1)] = math.nan
    adv = (summed - torch.nanmean(summed)) / (nanstd(summed) + eps)
    return torch.nan_to_num(adv, nan=0.0)
