"""The registry of GRPO's policy losses: one pure torch function per loss, registered under the
`algorithm.loss_type` that names it, with the normalization it aggregates by.

A loss is the per-token policy term (what multiplies the advantage: a clipped ratio, a detached
weight times the log-prob, a soft gate) and an aggregation (how the per-token terms of the whole
batch become one number). `algo.grpo.grpo_loss` wraps every term in the same options (the
off-policy sequence mask, the entropy mask, the rollout importance weights, the KL to the
reference), in TRL's order, and aggregates with the registered normalization. The model is
veRL's `register_policy_loss` (`trainer/ppo/core_algos.py`), without its config object: each
term takes its hyperparameters as keyword-only arguments named as in `algorithm.*` (and TRL's
`GRPOConfig`), which is how `grpo_loss` knows which ones a loss needs.

Adding a loss: a function `(inputs: PolicyInputs, *, <hyperparameters>) -> PolicyTerm`, decorated
with `@register_policy_loss("name", <aggregation>)`, its docstring citing the paper and the TRL
lines it follows; its name in `AlgorithmConfig.loss_type`; a parity test against TRL's formula in
tests/algo/test_parity_trl.py (docs/design.md, "Adding a loss").

Every formula is TRL 1.16's `GRPOTrainer._compute_loss` (trl/trainer/grpo_trainer.py), checked
against TRL's own source by tests/algo/test_parity_trl.py. Shapes: B sequences, T completion
positions (right-padded); the importance weight `coef` is (B, T) at token level and (B, 1) at
sequence level (GSPO), and every term broadcasts either.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from torch import Tensor


# ---- what a term receives and returns ------------------------------------------------------------
@dataclass
class PolicyInputs:
    """What every policy term may read; each reads what its formula needs."""

    logp: Tensor
    """(B, T) the policy's log-probs of the completion tokens (differentiable)."""
    log_ratio: Tensor
    """(B, T) logp - old_logp, per token (differentiable)."""
    coef: Tensor
    """(B, T), or (B, 1) with sequence-level importance sampling: the importance weight
    pi / pi_old, exp of the token's log-ratio or of the sequence's mean log-ratio (TRL's `coef_1`;
    differentiable)."""
    advantages: Tensor
    """(B, 1) one advantage per sequence."""
    mask: Tensor
    """(B, T) float, 1 on completion tokens."""
    is_weights: Tensor | None
    """(B, T) or (B, 1), detached: the rollout correction's importance weights (None: off).
    `grpo_loss` multiplies every term by them, except a term registered with
    `folds_is_weights` (VESPO), which puts them into its own weight."""


@dataclass
class Stat:
    """One logged figure of a micro-batch, kept so that figures of several micro-batches merge
    into the whole batch's exactly: a sum and a count for a mean, the extreme for min and max."""

    reduce: Literal["mean", "min", "max"]
    total: Tensor
    """Scalar: the sum (mean), or the smallest / largest value so far (NaN: none yet)."""
    count: Tensor = field(default_factory=lambda: torch.zeros(()))
    """Scalar: how many values the sum holds (mean only)."""

    @staticmethod
    def mean(x: Tensor, mask: Tensor) -> "Stat":
        """TRL's `global_masked_mean`: x (B, T) over the masked tokens; x (B, 1) (a value per
        sequence) over the rows."""
        x = x.detach().to(mask.dtype)
        if x.shape != mask.shape:
            return Stat("mean", x.sum(), torch.tensor(float(x.shape[0]), device=x.device))
        return Stat("mean", (x * mask).sum(), mask.sum())

    @staticmethod
    def sequence_extreme(x: Tensor, mask: Tensor, reduce: Literal["min", "max"]) -> "Stat":
        """TRL's `nanmin` / `nanmax` of `masked_seq_mean(x)`: the smallest (largest) of the
        sequences' masked means; rows without tokens do not count."""
        x = x.detach().to(mask.dtype)
        per_sequence = (x.squeeze(1) if x.shape != mask.shape
                        else (x * mask).sum(-1) / mask.sum(-1))
        valid = per_sequence[~torch.isnan(per_sequence)]
        if not valid.numel():
            return Stat(reduce, torch.tensor(math.nan, device=x.device))
        return Stat(reduce, valid.min() if reduce == "min" else valid.max())

    def merge(self, other: "Stat") -> "Stat":
        if self.reduce != other.reduce:
            raise ValueError(f"cannot merge a {self.reduce} with a {other.reduce}")
        if self.reduce == "mean":
            return Stat("mean", self.total + other.total, self.count.to(other.count) + other.count)
        extreme = torch.fmin if self.reduce == "min" else torch.fmax  # NaN: no value yet
        return Stat(self.reduce, extreme(self.total.to(other.total), other.total))

    def value(self) -> float:
        if self.reduce == "mean":
            return float(self.total / self.count.clamp(min=1.0))  # TRL clamps the count too
        return float(self.total)


@dataclass
class PolicyTerm:
    """A loss's per-token policy term and the figures TRL logs for it."""

    per_token: Tensor
    """(B, T), or (B, 1) where the term is one value per sequence: the loss before the options
    and the aggregation (differentiable)."""
    clipped: Tensor
    """Bool, (B, T) or (B, 1): where the term's clipping took the gradient away (`clip_fraction`;
    all False for a loss that does not clip)."""
    stats: dict[str, Stat]
    """TRL's metrics of this loss under TRL's names (`clip_ratio/region_mean`, ...)."""


# ---- the registry -------------------------------------------------------------------------------
Aggregation = Callable[..., Tensor]


@dataclass(frozen=True)
class PolicyLoss:
    name: str
    term: Callable[..., PolicyTerm]
    aggregate: Aggregation
    params: tuple[str, ...]
    """The term's keyword-only arguments: the `algorithm.*` hyperparameters it takes."""
    required: tuple[str, ...]
    """Those of them without a default (an option that is off unless given has one: None)."""
    folds_is_weights: bool


POLICY_LOSSES: dict[str, PolicyLoss] = {}
"""`algorithm.loss_type` -> its registered loss."""


def register_policy_loss(name: str, aggregate: Aggregation, *, folds_is_weights: bool = False
                         ) -> Callable[[Callable[..., PolicyTerm]], Callable[..., PolicyTerm]]:
    """Register the decorated term as loss `name`, aggregated by `aggregate` (one of the
    functions below). One term may be registered under several names."""

    def register(term: Callable[..., PolicyTerm]) -> Callable[..., PolicyTerm]:
        if name in POLICY_LOSSES:
            raise ValueError(f"policy loss {name!r} is registered twice")
        keywords = [p for p in inspect.signature(term).parameters.values()
                    if p.kind is inspect.Parameter.KEYWORD_ONLY]
        POLICY_LOSSES[name] = PolicyLoss(
            name, term, aggregate, tuple(p.name for p in keywords),
            tuple(p.name for p in keywords if p.default is inspect.Parameter.empty),
            folds_is_weights)
        return term

    return register


def policy_loss(name: str) -> PolicyLoss:
    if name not in POLICY_LOSSES:
        raise ValueError(f"unknown loss_type {name!r}; expected one of {tuple(POLICY_LOSSES)}")
    return POLICY_LOSSES[name]


# ---- aggregations: these rows' share of the whole batch's loss ----------------------------------
# Each takes per_token (B, T) or (B, 1), mask (B, T) and the WHOLE batch's counts: summed over
# micro-batches the shares are the whole batch's loss at once, so gradient accumulation is exact
# whatever the micro-batches (token-budget ones included). With one micro-batch each is TRL's
# formula; TRL normalizes "grpo", "bnpo", "dr_grpo", "sapo", "luspo" by each micro-batch's own
# size and divides by the accumulation steps instead, which matches this only for equal
# micro-batches (and never for "bnpo" when they hold different token counts).

def sequence_mean(per_token: Tensor, mask: Tensor, *, num_sequences: int, num_tokens: int,
                  max_completion_length: int) -> Tensor:
    """sum_i (sum_t l*m / max(1, sum_t m)) / num_sequences: each sequence's token mean, then the
    mean over sequences (DeepSeekMath's GRPO; TRL's "grpo" and "sapo")."""
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / num_sequences


def token_mean(per_token: Tensor, mask: Tensor, *, num_sequences: int, num_tokens: int,
               max_completion_length: int) -> Tensor:
    """sum l*m / max(1, num_tokens): the mean over every active token of the batch (DAPO's
    token-level loss; TRL's "dapo", "cispo", "vespo", whose `num_items_in_batch` is the
    generation batch's active tokens, and its "bnpo" with one micro-batch)."""
    return (per_token * mask).sum() / max(1, num_tokens)


def max_length_mean(per_token: Tensor, mask: Tensor, *, num_sequences: int, num_tokens: int,
                    max_completion_length: int) -> Tensor:
    """sum l*m / (num_sequences * max_completion_length): a constant normalizer (Dr. GRPO,
    arXiv 2503.20783; TRL's "dr_grpo")."""
    if max_completion_length < 1:
        raise ValueError(f"max_completion_length must be >= 1, got {max_completion_length}")
    return (per_token * mask).sum() / (num_sequences * max_completion_length)


def sequence_sum(per_token: Tensor, mask: Tensor, *, num_sequences: int, num_tokens: int,
                 max_completion_length: int) -> Tensor:
    """sum_i sum_t l*m / num_sequences: each sequence's loss summed over its tokens, so scaled by
    its length (LUSPO; TRL's "luspo": `(per_token_loss * mask).sum(-1).mean()`)."""
    return (per_token * mask).sum() / num_sequences


# ---- the terms ----------------------------------------------------------------------------------
@register_policy_loss("luspo", sequence_sum)  # decorators apply bottom-up: "grpo" comes first
@register_policy_loss("dapo", token_mean)
@register_policy_loss("dr_grpo", max_length_mean)
@register_policy_loss("bnpo", token_mean)
@register_policy_loss("grpo", sequence_mean)
def clipped_ratio(inputs: PolicyInputs, *, epsilon: float, epsilon_high: float | None = None,
                  delta: float | None = None) -> PolicyTerm:
    """PPO's clipped surrogate, negated: -min(coef * A, clamp(coef, 1 - eps, 1 + eps_high) * A),
    with `coef` first capped at `delta` when set (two-sided clipping, INTELLECT-2, arXiv
    2505.07291). epsilon_high None means epsilon; a larger one is DAPO's clip-higher (arXiv
    2503.14476). With sequence-level `coef` this is GSPO's objective (arXiv 2507.18071).

    The losses differ only by aggregation: "grpo" (DeepSeekMath, arXiv 2402.03300), "bnpo",
    "dapo" (DAPO), "dr_grpo" (Dr. GRPO, arXiv 2503.20783), "luspo" (LUSPO, arXiv 2602.05261,
    meant with sequence-level importance sampling).
    TRL: `_compute_loss`, the `loss_type in ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"]` branch,
    and its metrics `clip_ratio/low_mean`, `high_mean`, `region_mean`, `low_min`, `high_max`
    (computed, as TRL's, on coef after the `delta` cap)."""
    eps_high = epsilon if epsilon_high is None else epsilon_high
    coef, adv, mask = inputs.coef, inputs.advantages, inputs.mask
    clamped = torch.clamp(coef, 1 - epsilon, 1 + eps_high)
    if delta is not None:
        coef = torch.clamp(coef, max=delta)
    per_token = -torch.min(coef * adv, clamped * adv)
    low = (coef < 1 - epsilon) & (adv < 0)
    high = (coef > 1 + eps_high) & (adv > 0)
    region = low | high
    stats = {"clip_ratio/low_mean": Stat.mean(low, mask),
             "clip_ratio/high_mean": Stat.mean(high, mask),
             "clip_ratio/region_mean": Stat.mean(region, mask),
             "clip_ratio/low_min": Stat.sequence_extreme(low, mask, "min"),
             "clip_ratio/high_max": Stat.sequence_extreme(high, mask, "max")}
    return PolicyTerm(per_token, region, stats)


@register_policy_loss("cispo", token_mean)
def cispo(inputs: PolicyInputs, *, epsilon: float, epsilon_high: float | None = None
          ) -> PolicyTerm:
    """CISPO (MiniMax-M1, arXiv 2506.13585): -sg(min(coef, eps_max)) * A * logp. The importance
    weight is capped and detached instead of the update being clipped, so every token keeps a
    gradient. eps_max is `epsilon_high` (ScaleRL recommends 5.0), epsilon when it is None, as in
    TRL. TRL: `_compute_loss`, the `loss_type == "cispo"` branch; metric `cispo_clip_ratio`
    (coef > eps_max with A > 0)."""
    eps_max = epsilon if epsilon_high is None else epsilon_high
    coef, adv = inputs.coef, inputs.advantages
    per_token = -torch.clamp(coef, max=eps_max).detach() * adv * inputs.logp
    clipped = (coef > eps_max) & (adv > 0)
    return PolicyTerm(per_token, clipped, {"cispo_clip_ratio": Stat.mean(clipped, inputs.mask)})


@register_policy_loss("sapo", sequence_mean)
def sapo(inputs: PolicyInputs, *, sapo_temperature_pos: float,
         sapo_temperature_neg: float) -> PolicyTerm:
    """SAPO (Soft Adaptive Policy Optimization, arXiv 2511.20347): a smooth gate in place of the
    clip, -sigmoid(tau * (coef - 1)) * 4 / tau * A, with tau = `sapo_temperature_pos` where
    A > 0, else `sapo_temperature_neg`. TRL: `_compute_loss`, the `loss_type == "sapo"` branch
    (no metric of its own)."""
    coef, adv = inputs.coef, inputs.advantages
    tau = torch.where(adv > 0, sapo_temperature_pos, sapo_temperature_neg)
    per_token = -torch.sigmoid(tau * (coef - 1)) * 4 / tau * adv
    return PolicyTerm(per_token, torch.zeros_like(per_token, dtype=torch.bool), {})


@register_policy_loss("vespo", token_mean, folds_is_weights=True)
def vespo(inputs: PolicyInputs, *, vespo_k_pos: float, vespo_lambda_pos: float,
          vespo_k_neg: float, vespo_lambda_neg: float) -> PolicyTerm:
    """VESPO (arXiv 2602.10693): -sg(phi(w)) * A * logp, phi(w) = e^lambda * w^k * e^(-lambda w)
    (phi(1) = 1), w the sequence's importance weight: the product of its token ratios and, when
    the rollout correction is on, of its rollout importance weights (`gamma_weights`); k and
    lambda by the sign of A. TRL: `_compute_loss`, the `loss_type == "vespo"` branch, and
    `get_gamma_weights`; metric `vespo/phi_seq_mean`."""
    phi = gamma_weights(inputs.advantages, inputs.log_ratio, inputs.mask, inputs.is_weights,
                        vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg)
    per_token = -phi * inputs.advantages * inputs.logp
    return PolicyTerm(per_token, torch.zeros_like(phi, dtype=torch.bool),
                      {"vespo/phi_seq_mean": Stat.mean(phi, inputs.mask)})


@torch.no_grad()
def gamma_weights(advantages: Tensor, log_ratio: Tensor, mask: Tensor, is_weights: Tensor | None,
                  k_pos: float, lambda_pos: float, k_neg: float, lambda_neg: float) -> Tensor:
    """VESPO's phi(w) per sequence, detached: advantages (B, 1), log_ratio and mask (B, T),
    is_weights (B, T) or (B, 1) or None -> (B, 1).

    TRL's `get_gamma_weights`, in log space: log w = sum_t clamp(log_ratio, -20, 20) * m (+ the
    sum of clamp(log is_weights, log 1e-8, 20)), clamped to [log 1e-8, 20]; phi = exp(lambda +
    k log w - lambda w), NaN/inf -> 0. One difference: the rollout weights' logs are summed over
    the completion's tokens only, where TRL sums them over the padded width too. Its padding
    weight is exactly 1 (log 0) unless `importance_sampling_min` > 1 (or `_cap` < 1) moves or
    masks it; summing the tokens only keeps phi the same whatever the micro-batch's padding."""
    lower = math.log(1e-8)
    log_w = (torch.clamp(log_ratio, -20.0, 20.0) * mask).sum(-1, keepdim=True)
    if is_weights is not None:
        log_is = torch.clamp(torch.log(is_weights), lower, 20.0)
        log_w = log_w + (log_is * mask if log_is.shape == mask.shape else log_is).sum(
            -1, keepdim=True)
    log_w = torch.clamp(log_w, lower, 20.0)
    nonneg = advantages >= 0
    k = torch.where(nonneg, k_pos, k_neg)
    lam = torch.where(nonneg, lambda_pos, lambda_neg).clamp(min=1e-4)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


LOSS_TYPES = tuple(POLICY_LOSSES)
"""Every registered `algorithm.loss_type`."""
