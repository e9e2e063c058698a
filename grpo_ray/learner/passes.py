"""Runs in the learner actor: the forward passes over a batch that the GRPO update stands on (the
base class of `worker.LearnerWorker`). The batch's active rows padded into token-budget
micro-batches (`Prepared`); the decoder's last hidden states at the completion positions; the
completion tokens' log-probs (and entropies) through `token_logprobs`, with the adapter or
without it (the reference), at a temperature; the separate pass of old and reference log-probs
before an update of several iterations; and the gap of the old log-probs to the rollout's.

It reads what `LearnerWorker.load` sets: `model` (PEFT), `_decoder` and `_lm_head` (its base's),
`_compute_dtype`, `device`, `learner`, `algorithm` and `temperature`.

TRL components: `use_adapter` (the reference pass with the adapter off), from `trl.trainer.utils`;
`selective_log_softmax` through `token_logprobs`.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from trl.trainer.utils import use_adapter

from grpo_ray.algo.grpo import probability_gap
from grpo_ray.contracts import TrainBatch
from grpo_ray.learner.batching import (MicroBatch, active_rows, cat_padded, check_prompts,
                                       pad_rows, padding_fraction, plan_micro_batches)
from grpo_ray.learner.logprobs import token_logprobs
from grpo_ray.learner.throughput import Stopwatch


@dataclass
class Prepared:
    """A batch ready for the update (`PolicyPasses._prepare`)."""

    micro_batches: list[MicroBatch]
    num_sequences: int  # every row of the batch, masked ones included (TRL's batch size)
    num_tokens: int  # completion tokens of the active rows
    lengths: list[int]  # prompt + completion tokens of each active row
    padding_fraction: float
    separate_pass: bool  # old and reference log-probs (and entropies) computed before the
    # update (num_iterations > 1, or an entropy mask); else the update computes them (old = its
    # own log-probs, detached)
    order: list[int]  # the batch row of each micro-batch row, micro-batch after micro-batch


class PolicyPasses:
    """The learner's forward passes (module docstring); `LearnerWorker` adds the update."""

    def _plan(self, lengths: list[int]) -> list[list[int]]:
        return plan_micro_batches(lengths, self.learner.micro_batch_size,
                                  self.learner.max_tokens_per_micro_batch)

    def _prepare(self, batch: TrainBatch, ref_watch: Stopwatch | None = None) -> Prepared:
        """Pad the active rows into micro-batches; with num_iterations > 1 attach their old and
        reference log-probs (one pass, before any optimizer step)."""
        ref_watch = ref_watch or Stopwatch(self.device)
        rows = active_rows(batch)
        lengths = [len(batch.prompt_ids[i]) + len(batch.completion_ids[i]) for i in rows]
        plan = self._plan(lengths)
        mbs = [pad_rows([batch.prompt_ids[rows[j]] for j in mb],
                        [batch.completion_ids[rows[j]] for j in mb],
                        [batch.advantages[rows[j]] for j in mb],
                        [batch.sampling_logprobs[rows[j]] for j in mb], self.device)
               for mb in plan]
        a = self.algorithm
        separate = a.num_iterations > 1 or a.top_entropy_quantile < 1
        if separate:
            with torch.no_grad():
                for mb in mbs:
                    self._old_logprobs(mb)
                    if a.beta:
                        mb.ref_logp = self._reference_logprobs(mb, ref_watch)
        return Prepared(mbs, len(batch), sum(len(batch.completion_ids[i]) for i in rows),
                        lengths, padding_fraction(lengths, plan), separate,
                        [rows[j] for mb in plan for j in mb])

    def _old_logprobs(self, mb: MicroBatch) -> None:
        """The micro-batch's log-probs under the adapter as it is now (eval mode, no gradient),
        and with an entropy mask their entropies, from the same chunked lm_head pass."""
        if self.algorithm.top_entropy_quantile < 1:
            mb.old_logp, mb.entropies = self._logprobs(mb, train=False, with_entropy=True)
        else:
            mb.old_logp = self._logprobs(mb, train=False)

    def _entropy_pass(self, prepared: Prepared) -> None:
        """The entropies of every micro-batch under the adapter as it is now, before a later
        optimizer pass of the same batch (TRL computes them in each pass's own forward)."""
        with torch.no_grad():
            for mb in prepared.micro_batches:
                _, mb.entropies = self._logprobs(mb, train=False, with_entropy=True)

    def _logprobs(self, mb: MicroBatch, train: bool, temperature: float | None = None,
                  with_entropy: bool = False) -> Any:
        """(b, T) log-probs of the completion tokens under the model as it is now (the adapter
        is whatever is enabled), at `temperature` (None: the rollout's); `with_entropy` (no
        gradient): and their (b, T) entropies. Eval mode for the passes without gradients (the
        reference, a separate pass's old log-probs: deterministic even with LoRA dropout); train
        mode (dropout, gradient checkpointing) for the update's."""
        return self._token_logprobs(self._hidden(mb, train), mb, temperature, with_entropy)

    def _hidden(self, mb: MicroBatch, train: bool) -> Tensor:
        """(b, T, H) last hidden states at the positions that predict the completion tokens."""
        self.model.train(train)
        with self._autocast():
            hidden = self._decoder(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                                   use_cache=False).last_hidden_state
        # Only the positions that predict completion tokens go through the lm_head.
        return hidden.gather(1, mb.positions.unsqueeze(-1).expand(-1, -1, hidden.size(-1)))

    def _token_logprobs(self, hidden: Tensor, mb: MicroBatch, temperature: float | None = None,
                        with_entropy: bool = False) -> Any:
        return token_logprobs(hidden, self._lm_head.weight, mb.targets,
                              self.learner.logprob_chunk_size,
                              self.temperature if temperature is None else temperature,
                              self._lm_head_dtype(), with_entropy)

    def _lm_head_dtype(self) -> torch.dtype | None:
        """The log-prob matmul's dtype (`cast_lm_head_to_fp32`; None: the weight's)."""
        cast = self.learner.cast_lm_head_to_fp32
        return None if cast is None else torch.float32 if cast else self._compute_dtype

    def _autocast(self) -> AbstractContextManager:
        """bf16 matmuls on GPU, as HF Trainer's `bf16=True`: without it the fp32 norms of a
        k-bit-prepared model turn every activation fp32, and fp32 LoRA weights run fp32 matmuls."""
        if self.device.type == "cuda" and self._compute_dtype in (torch.bfloat16, torch.float16):
            return torch.autocast("cuda", dtype=self._compute_dtype)
        return nullcontext()

    def _reference_logprobs(self, mb: MicroBatch, watch: Stopwatch) -> Tensor:
        """(b, T) log-probs with the adapter disabled: the base model, the KL's reference."""
        with watch, torch.no_grad(), use_adapter(self.model, None):
            return self._logprobs(mb, train=False)

    def sequence_logprobs(self, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                          temperature: float | None = None) -> list[list[float]]:
        """Log-probs of each completion token under the current adapter (no gradient), in the
        rows' order, micro-batched as the update is; at `temperature` (None: the rollout's, as
        the update; the sync probe asks for 1, as vLLM scores prompt tokens)."""
        check_prompts(prompt_ids, range(len(prompt_ids)))
        out: list[list[float]] = [[] for _ in prompt_ids]
        with torch.no_grad():
            for plan in self._plan([len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)]):
                cs = [completion_ids[i] for i in plan]
                mb = pad_rows([prompt_ids[i] for i in plan], cs, [0.0] * len(cs),
                              [[0.0] * len(c) for c in cs], self.device)
                logp = self._logprobs(mb, train=False, temperature=temperature).cpu()
                for k, i in enumerate(plan):
                    out[i] = logp[k, :len(completion_ids[i])].tolist()
        return out


def probability_gaps(prepared: Prepared, engine_index: list[int]) -> dict[str, float]:
    """The rollout/learner probability gap of the batch (`gap_mean_abs_diff`, `gap_kl`) and,
    with `engine_index`, of each engine's rows (`gap_kl/engine_<i>`, ...): an engine that
    samples with other weights than the learner's stands out there."""
    if not prepared.num_tokens:
        return {"gap_mean_abs_diff": 0.0, "gap_kl": 0.0}
    old, sampling, mask = (cat_padded([getattr(m, k) for m in prepared.micro_batches])
                           for k in ("old_logp", "sampling_logp", "mask"))
    groups = {"": torch.ones(len(prepared.order), dtype=torch.bool)}
    if engine_index:
        labels = torch.tensor([engine_index[i] for i in prepared.order])
        groups.update({f"/engine_{e}": labels == e for e in sorted(set(labels.tolist()))})
    out = {}
    for suffix, rows in groups.items():
        gap = probability_gap(*(t[rows.to(t.device)] for t in (old, sampling, mask)))
        out[f"gap_mean_abs_diff{suffix}"], out[f"gap_kl{suffix}"] = gap["mean_abs_diff"], gap["kl"]
    return out
