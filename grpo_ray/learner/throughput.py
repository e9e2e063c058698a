"""What a learner step costs: an estimate of its model FLOPs and a stopwatch for work queued on a
GPU. The learner divides the FLOPs by TRL's peak of the device (`trl.trainer.utils.compute_mfu`
and `get_peak_flops`: model FLOPs utilization, MFU).

Model FLOPs count the matrix multiplications the algorithm needs, on real tokens only: padding,
gradient checkpointing's recomputed forwards and the chunked lm_head's recomputation are not
counted, so MFU falls when the learner wastes work on them (PaLM's definition). Attention's
score and value products (4 x layers x sequence x width per token, a few percent at a few hundred
tokens on a 3B model), norms and activations are left out too.

TRL components: none here. TRL's `compute_flops_per_token` is not used on purpose: it counts a full
fine-tune (3 x forward), where a LoRA step skips the frozen weights' gradients and adds the
reference and old-log-prob passes (`step_flops`).
"""
from __future__ import annotations

import time

import torch


def linear_params(module: torch.nn.Module) -> tuple[int, int]:
    """(frozen, trainable) weights of the matrix multiplications in `module`: every
    `nn.Linear` (bitsandbytes' 4-bit layers and PEFT's LoRA A/B are ones), counted as
    in_features x out_features, since a 4-bit weight's storage holds two values per element."""
    frozen = trainable = 0
    for m in module.modules():
        if isinstance(m, torch.nn.Linear):
            n = m.in_features * m.out_features
            if m.weight.requires_grad:
                trainable += n
            else:
                frozen += n
    return frozen, trainable


def step_flops(*, tokens: int, completion_tokens: int, frozen: int, trainable: int,
               lm_head: int, iterations: int, old_pass: bool, ref_pass: bool) -> float:
    """Model FLOPs of one GRPO step of the learner.

    tokens: prompt + completion tokens of the rows that take part; completion_tokens: those of
    the completions (the lm_head runs on them only); frozen / trainable: weights of the
    decoder's matmuls (`linear_params`), lm_head: its V x H weights (frozen).
    A matmul with n weights costs 2n per token forward. Backward costs 2n for the input's
    gradient, plus 2n for the weight's gradient only where the weight trains (LoRA): the frozen
    base needs no weight gradients, so the usual "backward = 2 x forward" would overstate this
    learner's work by half. Per iteration one forward + backward with the adapter; `old_pass`:
    one more forward with it (log-probs before the first update, num_iterations > 1);
    `ref_pass`: one forward without it (the reference, beta > 0).
    """
    decoder, lora, head = 2 * tokens * frozen, 2 * tokens * trainable, 2 * completion_tokens * lm_head
    forward = decoder + lora + head
    backward = decoder + 2 * lora + head
    return float(iterations * (forward + backward) + old_pass * forward
                 + ref_pass * (decoder + head))


class Stopwatch:
    """Time spent inside `with watch:` blocks, summed. On CUDA each block is timed with events
    on the current stream, read once by `seconds()` (one synchronization), so timing a forward
    inside the update's micro-batch loop does not stall the GPU's queue every micro-batch."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._cpu_s, self._start = 0.0, 0.0

    def __enter__(self) -> "Stopwatch":
        if self.cuda:
            self._events.append((torch.cuda.Event(enable_timing=True),
                                 torch.cuda.Event(enable_timing=True)))
            self._events[-1][0].record()
        else:
            self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self._events[-1][1].record()
        else:
            self._cpu_s += time.perf_counter() - self._start

    def seconds(self) -> float:
        if not self.cuda:
            return self._cpu_s
        torch.cuda.synchronize()
        return sum(start.elapsed_time(end) for start, end in self._events) / 1000
