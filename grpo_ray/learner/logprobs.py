"""Log-probabilities of chosen tokens without materializing the vocabulary logits of a batch.

With Qwen2.5's 152k vocabulary, fp32 logits of 16 x 416 positions take 4 GB, and autograd keeps
them (and their softmax) for backward: most of a naive learner's peak memory. Here positions go
through the lm_head a chunk at a time, and each chunk is checkpointed, so backward recomputes
one chunk's logits at a time too.

TRL components: `trl.trainer.utils.selective_log_softmax`, on each chunk's logits (TRL's Triton
kernel on a GPU), and `entropy_from_logits` for the entropies of the same chunk's logits (for
`algorithm.top_entropy_quantile`). The chunking stays ours on purpose: TRL's function takes a
batch's full logits, and TRL's hidden-states kernel (`trl.kernels.ChunkedLogProbFunction`) always
multiplies in the hidden states' dtype, where this multiplies in the dtype the caller asks for:
the compute dtype (bf16 on a GPU, as TRL) or fp32 (TRL's `cast_lm_head_to_fp32`).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# Bound at import: the learner may load Unsloth later, which patches TRL as it loads.
from trl.trainer.utils import entropy_from_logits, selective_log_softmax


def _chunk_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float,
                    with_entropy: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """hidden (N, H), weight (V, H), targets (N,) -> (N,) log p(target), and with `with_entropy`
    (N,) the entropy of each position's distribution, from the same logits; the matmul in the
    weight's dtype."""
    # The caller's autocast would turn fp32 logits into bf16.
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        logits = hidden.to(weight.dtype) @ weight.T
        # At least fp32: bf16 logits lose the small differences that log-prob ratios are made of.
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        logp = selective_log_softmax(logits, targets, temperature)
        if not with_entropy:
            return logp
        with torch.no_grad():
            return logp, entropy_from_logits(logits / temperature)


def token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int,
                   temperature: float = 1.0, dtype: torch.dtype | None = None,
                   with_entropy: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """log softmax((hidden @ weight.T) / temperature) gathered at `targets`, chunk by chunk.

    hidden (B, T, H): last hidden states at the positions that predict `targets`;
    weight (V, H): the lm_head weight; targets (B, T) token ids -> (B, T) fp32 (or fp64) log-probs.
    The matmul runs in `dtype` (None: the weight's), the softmax in at least fp32. At most
    `chunk_size` positions (of the flattened B*T) have their V logits alive at once, in forward
    and in backward. `with_entropy` (passes without gradients only): also the (B, T) entropies
    of the tempered distributions, computed from each chunk's logits while they exist.
    """
    if hidden.dim() != 3 or targets.shape != hidden.shape[:2]:
        raise ValueError(f"token_logprobs: hidden {tuple(hidden.shape)} must be (B, T, H) and "
                         f"targets {tuple(targets.shape)} must be (B, T)")
    if chunk_size < 1 or temperature <= 0:
        raise ValueError(f"token_logprobs: chunk_size ({chunk_size}) and temperature "
                         f"({temperature}) must be positive")
    B, T, H = hidden.shape
    if dtype is not None:
        weight = weight.to(dtype)  # once per call, not per chunk
    flat_hidden, flat_targets = hidden.reshape(B * T, H), targets.reshape(B * T)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if needs_grad and with_entropy:
        raise ValueError("token_logprobs: with_entropy is for passes without gradients")
    out = []
    for start in range(0, B * T, chunk_size):
        args = (flat_hidden[start:start + chunk_size], weight,
                flat_targets[start:start + chunk_size], temperature)
        out.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False) if needs_grad
                   else _chunk_logprobs(*args, with_entropy))
    if not out:
        empty = hidden.new_zeros(B, T, dtype=torch.promote_types(hidden.dtype, torch.float32))
        return (empty, empty.clone()) if with_entropy else empty
    if with_entropy:
        return tuple(torch.cat(parts).view(B, T) for parts in zip(*out))
    return torch.cat(out).view(B, T)
