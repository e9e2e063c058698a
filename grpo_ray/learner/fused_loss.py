"""The GRPO loss of one micro-batch straight from the last hidden states, through Liger-Kernel's
fused linear GRPO loss: the lm_head, the log-softmax and the loss in one pass that streams 2048
positions x 4096 vocabulary entries at a time and computes the input's gradient during the
forward, so no step holds the micro-batch's vocabulary logits (`learner.loss_kernel=liger`).

TRL components: none; Liger-Kernel's `LigerFusedLinearGRPOLoss` (0.8.5), the loss TRL's
`use_liger_kernel` runs. Its formulas are `algo.grpo.grpo_loss`'s (clipped surrogate, k3 KL to
the reference, the importance weights on the surrogate only), checked against it by
`tests/learner/test_loss_kernel.py`; only the normalization differs, and is undone here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from grpo_ray.algo.grpo import LOSS_TYPES


@dataclass
class LossShare:
    """One micro-batch's part of the step, whichever loss kernel computed it."""

    loss: Tensor
    """Scalar, this micro-batch's share of the batch loss (differentiable)."""
    kl_sum: Tensor
    """Scalar, detached: the k3 KL summed over this micro-batch's tokens (0 when beta == 0)."""
    clipped_sum: Tensor
    """Scalar, detached: how many of its tokens took the clipped term."""


def fused_grpo_loss(
    hidden: Tensor, weight: Tensor, targets: Tensor, mask: Tensor, advantages: Tensor,
    old_logp: Tensor | None, ref_logp: Tensor | None, is_weights: Tensor | None, *,
    beta: float, epsilon: float, epsilon_high: float | None, loss_type: str, num_sequences: int,
    num_tokens: int, max_completion_length: int, temperature: float,
) -> LossShare:
    """`grpo_loss` of one micro-batch, from hidden states instead of log-probs.

    hidden (b, T, H): the last hidden states at the positions that predict `targets` (b, T);
    weight (V, H): the lm_head's; mask, is_weights, old_logp, ref_logp (b, T); advantages (b,).
    old_logp None: the update's own log-probs, detached (ratio exactly 1, TRL's first
    iteration). ref_logp is required when beta > 0. num_sequences and num_tokens count the WHOLE
    batch, as `aggregate_loss`'s.

    Liger normalizes by the micro-batch alone: "grpo" divides the sum of per-sequence means by
    its rows (b), "bnpo" by its tokens, "dr_grpo" by b * max_completion_length. Its scalar loss
    is rescaled by b / num_sequences ("grpo", "dr_grpo") or by its tokens / num_tokens ("bnpo"),
    which turns it into this micro-batch's share of the whole batch's loss: summed over
    micro-batches, the loss and its gradient are the whole batch's, exactly as `aggregate_loss`.
    The rescaling reaches the gradient through the backward's grad_output (Liger scales the
    gradients it computed in the forward by it). Liger's KL and clip-fraction metrics are means
    over the micro-batch's tokens; they come back as sums.

    The product with the lm_head runs in the weight's dtype (the hidden states are cast to it,
    as `token_logprobs` does): an fp32 lm_head keeps fp32 logits.

    Liger runs eager here (its `compiled=False`). Its `compiled=True` compiles only the loss's
    elementwise math, not the lm_head products and log-softmax (those stay in its autograd
    function), and with a cold compile cache (a fresh machine) that compile fails as soon as a
    micro-batch brings a new shape: torch 2.13 raises dynamo's "list index out of range", then
    "sources must not be empty for symbol s10", for the second and third shapes of (5, 20),
    (5, 31), (2, 12). Micro-batches of changing lengths are every step here. Eager, it never
    recompiles mid-run either.
    """
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    if beta > 0 and ref_logp is None:
        raise ValueError("fused_grpo_loss: beta > 0 needs ref_logp (the reference's log-probs)")
    b = hidden.shape[0]
    m = mask.to(torch.float32)
    tokens = m.sum().clamp(min=1.0)  # as Liger's; a tensor: no wait for the GPU here
    fused = LigerFusedLinearGRPOLoss(
        beta=beta, compiled=False, use_ref_model=beta > 0,
        chunk_size=b,  # one chunk: Liger bounds the logits by its own 2048 x 4096 tiles
        epsilon_low=epsilon, epsilon_high=epsilon if epsilon_high is None else epsilon_high,
        loss_type=loss_type, max_completion_length=max_completion_length,
        temperature=temperature)
    loss, metrics = fused(hidden.to(weight.dtype), weight, targets, m, advantages,
                          ref_per_token_logps=ref_logp if beta > 0 else None,
                          old_per_token_logps=old_logp, vllm_is_ratio=is_weights)
    share = tokens / max(1, num_tokens) if loss_type == "bnpo" else b / num_sequences
    kl_mean = metrics[0] if beta > 0 else torch.zeros((), device=hidden.device)
    return LossShare(loss=loss * share, kl_sum=kl_mean.detach() * tokens,
                     clipped_sum=metrics[-1].detach() * tokens)
