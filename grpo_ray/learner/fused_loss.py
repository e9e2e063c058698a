"""The loss of one micro-batch straight from the last hidden states, through Liger-Kernel's
fused linear GRPO loss: the lm_head, the log-softmax and the loss in one pass that streams 2048
positions x 4096 vocabulary entries at a time and computes the input's gradient during the
forward, so no step holds the micro-batch's vocabulary logits (`learner.loss_kernel=liger`).

TRL components: none; Liger-Kernel's `LigerFusedLinearGRPOLoss` (0.8.5), which computes TRL's
loss types, sequence-level importance sampling, `delta`, the rollout importance weights and the
importance-weighted KL as `algo.grpo.grpo_loss` does, checked against it by
`tests/learner/test_loss_kernel.py`; only the normalization differs, and is undone here. What it
cannot compute as TRL does (`luspo`, the entropy and off-policy masks, sequence level with
cispo/sapo/vespo) the config refuses with this kernel.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from grpo_ray.algo.losses import (Aggregation, max_length_mean, policy_loss, sequence_mean,
                                  token_mean)

# How Liger normalizes each of our aggregations, as the factor (its rows b, the whole batch's
# sequences) that turns its micro-batch loss into this micro-batch's share of the batch's loss.
_SHARE: dict[Aggregation, Callable[[int, int], float]] = {
    sequence_mean: lambda b, num_sequences: b / num_sequences,  # Liger: / its rows
    max_length_mean: lambda b, num_sequences: b / num_sequences,  # / its rows x max length
    token_mean: lambda b, num_sequences: 1.0,  # / num_items_in_batch: the batch's tokens
}
_LIGER_LOSS_TYPE = {"bnpo": "dapo"}
"""Our loss types Liger computes under another name: its "bnpo" divides by the micro-batch's
tokens; its "dapo" by `num_items_in_batch`, the whole batch's, which is our "bnpo" too."""


def liger_arguments(loss_type: str, hyperparameters: dict[str, Any]) -> dict[str, Any]:
    """`LigerFusedLinearGRPOLoss`'s keyword arguments for our loss type and its
    `algorithm.*` hyperparameters: `epsilon` is its `epsilon_low`; `epsilon_high` None is
    epsilon; the others keep their names (`delta`, `sapo_temperature_pos`, `vespo_k_pos`, ...)."""
    out = dict(hyperparameters, loss_type=_LIGER_LOSS_TYPE.get(loss_type, loss_type))
    if "epsilon" in out:
        eps, high = out.pop("epsilon"), out.pop("epsilon_high", None)
        out.update(epsilon_low=eps, epsilon_high=eps if high is None else high)
    return out


def fused_grpo_loss(
    hidden: Tensor, weight: Tensor, targets: Tensor, mask: Tensor, advantages: Tensor,
    old_logp: Tensor | None, ref_logp: Tensor | None, is_weights: Tensor | None, *,
    loss_type: str, beta: float, num_sequences: int, num_tokens: int,
    max_completion_length: int, temperature: float, importance_sampling_level: str = "token",
    use_bias_correction_kl: bool = False, **hyperparameters: Any,
) -> Tensor:
    """`grpo_loss`'s loss of one micro-batch, from hidden states instead of log-probs: a scalar,
    this micro-batch's share of the batch's loss (differentiable).

    hidden (b, T, H): the last hidden states at the positions that predict `targets` (b, T);
    weight (V, H): the lm_head's; mask, old_logp, ref_logp (b, T); is_weights (b, T) or (b, 1);
    advantages (b,). old_logp None: the update's own log-probs, detached (ratio exactly 1, TRL's
    first iteration). ref_logp is required when beta > 0. num_sequences and num_tokens count the
    WHOLE batch, as `aggregate_loss`'s; `hyperparameters` are the loss's (`grpo_loss`'s).

    Liger normalizes "grpo" and "sapo" (the sum of per-sequence means) by the micro-batch's rows
    b, "dr_grpo" by b * max_completion_length: its loss is rescaled by b / num_sequences, which
    turns it into this micro-batch's share of the whole batch's loss. The token means (our
    "bnpo", "dapo", "cispo", "vespo") get the whole batch's tokens as Liger's
    `num_items_in_batch` and need nothing. Summed over micro-batches, the loss and its gradient
    are the whole batch's, exactly as `aggregate_loss`; the rescaling reaches the gradient
    through the backward's grad_output (Liger scales the gradients it computed in the forward by
    it). Liger's own metrics are not used: the learner computes them with `grpo_loss` from the
    log-probs of a pass without gradients.

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

    share = _SHARE.get(policy_loss(loss_type).aggregate)
    if share is None:
        raise ValueError(f"fused_grpo_loss: Liger does not compute loss_type={loss_type} as TRL "
                         "does")
    if beta > 0 and ref_logp is None:
        raise ValueError("fused_grpo_loss: beta > 0 needs ref_logp (the reference's log-probs)")
    b = hidden.shape[0]
    fused = LigerFusedLinearGRPOLoss(
        beta=beta, compiled=False, use_ref_model=beta > 0,
        chunk_size=b,  # one chunk: Liger bounds the logits by its own 2048 x 4096 tiles
        max_completion_length=max_completion_length, temperature=temperature,
        importance_sampling_level=importance_sampling_level,
        use_bias_correction_kl=use_bias_correction_kl,
        **liger_arguments(loss_type, hyperparameters))
    loss, _ = fused(hidden.to(weight.dtype), weight, targets, mask.to(torch.float32), advantages,
                    ref_per_token_logps=ref_logp if beta > 0 else None,
                    old_per_token_logps=old_logp, vllm_is_ratio=is_weights,
                    num_items_in_batch=num_tokens)
    return loss * share(b, num_sequences)
