"""The learner's micro-batches: which rows go through one forward/backward together, and the
right-padded tensors of one micro-batch.

A micro-batch holds `micro_batch_size` rows in batch order, or, with a budget of padded tokens,
rows of like lengths (longest first) as many as the budget allows: memory is bounded by the
budget, whatever the completions' lengths, and little of each micro-batch is padding. Gradient
accumulation stays exact either way: every loss's aggregation (`algo.losses`) normalizes each
micro-batch by whole-batch counts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from grpo_ray.contracts import TrainBatch


def plan_micro_batches(lengths: list[int], max_rows: int,
                       max_tokens: int | None = None) -> list[list[int]]:
    """Indices into `lengths` (each row's prompt + completion tokens) grouped into micro-batches;
    every index appears once.

    `max_tokens` None: consecutive groups of `max_rows` rows, in order. Otherwise rows sorted by
    length, longest first (ties keep their order), each micro-batch filled while
    rows x its longest row <= `max_tokens`; `max_rows` is not used. A row longer than
    `max_tokens` gets a micro-batch of its own (a sequence cannot be split: its positions attend
    to each other). Longest first: a budget too large for the device fails on the first
    micro-batch, not late in the step.
    """
    if max_tokens is None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        return [list(range(s, min(s + max_rows, len(lengths))))
                for s in range(0, len(lengths), max_rows)]
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    plan: list[list[int]] = []
    for i in order:
        # Sorted longest first, so the first row of the open micro-batch is its longest.
        if plan and (len(plan[-1]) + 1) * lengths[plan[-1][0]] <= max_tokens:
            plan[-1].append(i)
        else:
            plan.append([i])
    return plan


def padding_fraction(lengths: list[int], plan: list[list[int]]) -> float:
    """Padded positions / all positions the decoder computes (rows x longest row of each
    micro-batch); 0 for an empty plan."""
    total = sum(len(mb) * max(lengths[i] for i in mb) for mb in plan if mb)
    return 1 - sum(lengths[i] for mb in plan for i in mb) / total if total else 0.0


@dataclass
class MicroBatch:
    """Right-padded rows of one forward/backward (b rows, L = longest prompt + completion,
    T = longest completion)."""

    input_ids: Tensor  # (b, L) prompt + completion, 0 after the end
    attention_mask: Tensor  # (b, L)
    positions: Tensor  # (b, T) index of the hidden state that predicts each completion token
    targets: Tensor  # (b, T) completion ids, 0 after the end
    mask: Tensor  # (b, T) bool, True on completion tokens
    advantages: Tensor  # (b,)
    sampling_logp: Tensor  # (b, T) the rollout engine's log-probs, 0 after the end
    old_logp: Tensor | None = None  # (b, T) current adapter, before this step's update
    ref_logp: Tensor | None = None  # (b, T) adapter disabled; None when beta == 0
    entropies: Tensor | None = None  # (b, T) current adapter, before this optimizer pass;
    # None unless algorithm.top_entropy_quantile < 1


def pad_rows(prompts: list[list[int]], completions: list[list[int]], advantages: list[float],
             sampling: list[list[float]], device: torch.device) -> MicroBatch:
    """One MicroBatch of these rows on `device`; every prompt must be non-empty."""
    b = len(prompts)
    L = max(len(p) + len(c) for p, c in zip(prompts, completions))
    T = max(1, max(len(c) for c in completions))
    input_ids = torch.zeros(b, L, dtype=torch.long)
    attention_mask = torch.zeros(b, L, dtype=torch.long)
    positions = torch.zeros(b, T, dtype=torch.long)
    targets = torch.zeros(b, T, dtype=torch.long)
    mask = torch.zeros(b, T, dtype=torch.bool)
    sampling_logp = torch.zeros(b, T, dtype=torch.float32)
    for i, (p, c, s) in enumerate(zip(prompts, completions, sampling)):
        n = len(p) + len(c)
        input_ids[i, :n] = torch.tensor(p + c)
        attention_mask[i, :n] = 1
        # The hidden state at position k predicts token k + 1.
        positions[i, :len(c)] = torch.arange(len(p) - 1, n - 1)
        targets[i, :len(c)] = torch.tensor(c, dtype=torch.long)
        mask[i, :len(c)] = True
        sampling_logp[i, :len(c)] = torch.tensor(s, dtype=torch.float32)
    to = lambda t: t.to(device, non_blocking=True)  # noqa: E731
    return MicroBatch(to(input_ids), to(attention_mask), to(positions), to(targets), to(mask),
                      to(torch.tensor(advantages, dtype=torch.float32)), to(sampling_logp))


def cat_padded(parts: list[Tensor]) -> Tensor:
    """Stack (b_i, T_i) tensors into (sum b_i, max T_i), zero/False-padded on the right."""
    T = max(p.size(1) for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, T - p.size(1))) for p in parts])


def active_rows(batch: TrainBatch) -> list[int]:
    """Indices of the rows that take part in the loss, after checking the batch's shape."""
    n = len(batch.completion_ids)
    for name in ["prompt_ids", "advantages", "sampling_logprobs"]:
        if len(getattr(batch, name)) != n:
            raise ValueError(f"TrainBatch.{name} has {len(getattr(batch, name))} rows, "
                             f"completion_ids has {n}")
    for name in ["mask", "engine_index"]:  # optional: empty, or one per row
        if getattr(batch, name) and len(getattr(batch, name)) != n:
            raise ValueError(f"TrainBatch.{name} has {len(getattr(batch, name))} rows, "
                             f"completion_ids has {n}")
    rows = [i for i in range(n) if not batch.mask or batch.mask[i]]
    check_prompts([batch.prompt_ids[i] for i in rows], rows)
    for i in rows:
        if len(batch.sampling_logprobs[i]) != len(batch.completion_ids[i]):
            raise ValueError(f"TrainBatch.sampling_logprobs[{i}] has "
                             f"{len(batch.sampling_logprobs[i])} values for "
                             f"{len(batch.completion_ids[i])} completion tokens")
        if not math.isfinite(batch.advantages[i]):
            raise ValueError(f"TrainBatch.advantages[{i}] is {batch.advantages[i]} on a row "
                             "whose mask is True")
    return rows


def check_prompts(prompts: list[list[int]], rows: list[int] | range) -> None:
    for p, i in zip(prompts, rows):
        if not p:  # the first completion token needs a position to be predicted from
            raise ValueError(f"prompt_ids[{i}] is empty")
