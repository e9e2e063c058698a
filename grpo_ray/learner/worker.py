"""The learner actor: base model + LoRA adapter (QLoRA on GPU), one GRPO update per step.

The reference policy is the same model with the adapter disabled, so the learner holds one copy
of the base weights. Log-probabilities come from the decoder body's last hidden states through
`token_logprobs`, so the vocabulary logits of the batch never exist at once.

A plain class: `ray.remote` is applied where it is placed, and tests build it directly.
"""
from __future__ import annotations

import math
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from grpo_ray.algo.grpo import grpo_loss, probability_gap, truncated_is_weights
from grpo_ray.config import AlgorithmConfig, LearnerConfig, LoraConfig, ModelConfig
from grpo_ray.contracts import TrainBatch
from grpo_ray.learner.logprobs import token_logprobs
from grpo_ray.learner.model import load_policy
from grpo_ray.learner.state import learner_state, load_learner_state


@dataclass
class _MicroBatch:
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


@dataclass
class _Prepared:
    micro_batches: list[_MicroBatch]
    num_sequences: int
    num_tokens: int
    rows: list[int]  # the batch rows of the micro-batches' rows, in order


class LearnerWorker:
    def __init__(self, model_path: str, model: ModelConfig, lora: LoraConfig,
                 learner: LearnerConfig, algorithm: AlgorithmConfig, max_completion_length: int,
                 temperature: float = 1.0) -> None:
        from transformers import get_scheduler

        torch.manual_seed(algorithm.seed)
        self.learner, self.algorithm = learner, algorithm
        self.max_completion_length, self.temperature = max_completion_length, temperature
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self._compute_dtype, self.description = load_policy(
            model_path, model, lora, learner, algorithm.seed, self.device)
        self._ipc_export: Any = None
        causal_lm = self.model.get_base_model()
        self._decoder = causal_lm.get_decoder()
        self._lm_head = causal_lm.get_output_embeddings()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=learner.learning_rate, betas=(learner.adam_beta1, learner.adam_beta2),
            weight_decay=learner.weight_decay, fused=self.device.type == "cuda")
        self.scheduler = get_scheduler(
            learner.lr_scheduler_type, self.optimizer,
            num_warmup_steps=math.ceil(learner.warmup_ratio * algorithm.total_steps),
            num_training_steps=algorithm.total_steps)

    # ---- one GRPO step -------------------------------------------------------------------------
    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """Old and reference log-probs once, then `num_iterations` optimizer steps over the batch
        (gradients accumulated over micro-batches), then one scheduler step. Rows whose mask is
        False take no part in anything, metrics included."""
        a = self.algorithm
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        prepared = self._prepare(batch)
        time_logprobs = time.perf_counter() - start

        lr = self.optimizer.param_groups[0]["lr"]
        totals = {"loss": 0.0, "grad_norm": 0.0, "kl": 0.0, "clip_fraction": 0.0}
        start = time.perf_counter()
        if prepared.num_tokens:
            for _ in range(a.num_iterations):
                stats = self._accumulate_gradients(prepared)
                grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.learner.max_grad_norm)
                self.optimizer.step()
                stats["grad_norm"] = grad_norm.item()
                for k in totals:
                    totals[k] += stats[k] / a.num_iterations
        else:  # every row masked or empty: a no-op optimizer step keeps the schedule in step
            self.optimizer.zero_grad(set_to_none=True)
            self.optimizer.step()
        self.scheduler.step()
        time_update = time.perf_counter() - start

        peak = torch.cuda.max_memory_allocated() / 2**30 if self.device.type == "cuda" else 0.0
        return {**totals, "learning_rate": lr, **self._gaps(prepared, batch.engine_index),
                "num_tokens": float(prepared.num_tokens),
                "time_logprobs_s": time_logprobs, "time_update_s": time_update,
                "peak_memory_gb": peak}

    @staticmethod
    def _gaps(prepared: _Prepared, engine_index: list[int]) -> dict[str, float]:
        """The rollout/learner probability gap of the batch (`gap_mean_abs_diff`, `gap_kl`) and,
        with `engine_index`, of each engine's rows (`gap_kl/engine_<i>`, ...): an engine that
        samples with other weights than the learner's stands out there."""
        if not prepared.num_tokens:
            return {"gap_mean_abs_diff": 0.0, "gap_kl": 0.0}
        mbs = prepared.micro_batches
        old, sampling, mask = (_cat_padded([m.old_logp for m in mbs]),
                               _cat_padded([m.sampling_logp for m in mbs]),
                               _cat_padded([m.mask for m in mbs]))
        groups = {"": torch.ones(len(prepared.rows), dtype=torch.bool)}
        if engine_index:
            labels = torch.tensor([engine_index[i] for i in prepared.rows])
            groups.update({f"/engine_{e}": labels == e for e in sorted(set(labels.tolist()))})
        out = {}
        for suffix, rows in groups.items():
            rows = rows.to(old.device)
            gap = probability_gap(old[rows], sampling[rows], mask[rows])
            out[f"gap_mean_abs_diff{suffix}"] = float(gap["mean_abs_diff"])
            out[f"gap_kl{suffix}"] = float(gap["kl"])
        return out

    def _prepare(self, batch: TrainBatch) -> _Prepared:
        """Pad the active rows into micro-batches and attach their old and reference log-probs."""
        rows = _active_rows(batch)
        size = self.learner.micro_batch_size
        mbs = [self._pad([batch.prompt_ids[i] for i in chunk],
                         [batch.completion_ids[i] for i in chunk],
                         [batch.advantages[i] for i in chunk],
                         [batch.sampling_logprobs[i] for i in chunk])
               for chunk in (rows[s:s + size] for s in range(0, len(rows), size))]
        with torch.no_grad():
            for mb in mbs:
                mb.old_logp = self._logprobs(mb, train=False)
                if self.algorithm.beta:
                    with self.model.disable_adapter():
                        mb.ref_logp = self._logprobs(mb, train=False)
        return _Prepared(mbs, len(rows), sum(len(batch.completion_ids[i]) for i in rows), rows)

    def _accumulate_gradients(self, prepared: _Prepared) -> dict[str, float]:
        """Zero the gradients, then backward every micro-batch's share of the batch loss: the
        accumulated gradient is that of the whole batch's loss, whatever the micro-batch size."""
        a = self.algorithm
        self.optimizer.zero_grad(set_to_none=True)
        # Tensors, not floats: .item() per micro-batch would wait for the GPU each time.
        loss = kl = clipped = torch.zeros((), device=self.device)
        for mb in prepared.micro_batches:
            logp = self._logprobs(mb, train=True)
            is_weights = (truncated_is_weights(mb.old_logp, mb.sampling_logp,
                                               a.importance_sampling_cap)
                          if a.importance_sampling_correction else None)
            out = grpo_loss(logp, mb.old_logp, mb.ref_logp, mb.advantages, mb.mask,
                            beta=a.beta, epsilon=a.epsilon, epsilon_high=a.epsilon_high,
                            loss_type=a.loss_type, num_sequences=prepared.num_sequences,
                            num_tokens=prepared.num_tokens,
                            max_completion_length=self.max_completion_length,
                            is_weights=is_weights)
            out.loss.backward()
            loss = loss + out.loss.detach()
            kl = kl + (out.per_token_kl * mb.mask).sum()
            clipped = clipped + (out.clipped & mb.mask).sum()
        n = max(prepared.num_tokens, 1)
        return {"loss": loss.item(), "kl": kl.item() / n, "clip_fraction": clipped.item() / n}

    # ---- log-probabilities ---------------------------------------------------------------------
    def _logprobs(self, mb: _MicroBatch, train: bool) -> Tensor:
        """(b, T) log-probs of the completion tokens under the model as it is now (the adapter
        is whatever is enabled). Eval mode without gradients, so old log-probs are deterministic
        even with LoRA dropout; train mode (dropout, gradient checkpointing) with them."""
        self.model.train(train)
        with self._autocast():
            hidden = self._decoder(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                                   use_cache=False).last_hidden_state
        # Only the positions that predict completion tokens go through the lm_head.
        hidden = hidden.gather(1, mb.positions.unsqueeze(-1).expand(-1, -1, hidden.size(-1)))
        return token_logprobs(hidden, self._lm_head.weight, mb.targets,
                              self.learner.logprob_chunk_size, self.temperature)

    def _autocast(self) -> AbstractContextManager:
        """bf16 matmuls on GPU, as HF Trainer's `bf16=True`: without it the fp32 norms of a
        k-bit-prepared model turn every activation fp32, and fp32 LoRA weights run fp32 matmuls."""
        if self.device.type == "cuda" and self._compute_dtype in (torch.bfloat16, torch.float16):
            return torch.autocast("cuda", dtype=self._compute_dtype)
        return nullcontext()

    def _pad(self, prompts: list[list[int]], completions: list[list[int]],
             advantages: list[float], sampling: list[list[float]]) -> _MicroBatch:
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
        to = lambda t: t.to(self.device, non_blocking=True)  # noqa: E731
        return _MicroBatch(to(input_ids), to(attention_mask), to(positions), to(targets), to(mask),
                           to(torch.tensor(advantages, dtype=torch.float32)), to(sampling_logp))

    def sequence_logprobs(self, prompt_ids: list[list[int]],
                          completion_ids: list[list[int]]) -> list[list[float]]:
        """Log-probs of each completion token under the current adapter (no gradient)."""
        out: list[list[float]] = []
        size = self.learner.micro_batch_size
        with torch.no_grad():
            for s in range(0, len(prompt_ids), size):
                ps, cs = prompt_ids[s:s + size], completion_ids[s:s + size]
                _check_prompts(ps, range(s, s + len(ps)))
                mb = self._pad(ps, cs, [0.0] * len(ps), [[0.0] * len(c) for c in cs])
                logp = self._logprobs(mb, train=False).cpu()
                out += [logp[i, :len(c)].tolist() for i, c in enumerate(cs)]
        return out

    # ---- the adapter ---------------------------------------------------------------------------
    def export_adapter(self, version: int, transport: str = "tensors",
                       dtype: str | None = None) -> Any:
        """The adapter, for `weight_sync`: `tensors` (an AdapterPayload of CPU tensors, for
        checkpoints and files), `packed` (one buffer cast to the engines' `dtype` on this device,
        then copied once to the CPU: what the object store ships) or `cuda-ipc` (for engines on
        this GPU: one GPU buffer refreshed in place every version; only a handle travels)."""
        from grpo_ray.weight_sync import sender

        if transport == "tensors":
            return sender.adapter_payload(self.model, version, dtype=dtype)
        if transport == "packed":
            return sender.packed_adapter(self.model, version, dtype)
        if transport == "cuda-ipc":
            if self._ipc_export is None:
                self._ipc_export = sender.CudaIpcExport()
            return self._ipc_export.export(self.model, version, dtype)
        raise ValueError(f"unknown adapter transport {transport!r}")

    # ---- checkpoint state ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """LoRA parameters, optimizer, scheduler and RNG states (`learner.state`)."""
        return learner_state(self.model, self.optimizer, self.scheduler)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned, on this run's lr plan (`learner.state`)."""
        load_learner_state(self.model, self.optimizer, self.scheduler, state)


# ---- helpers -------------------------------------------------------------------------------------
def _active_rows(batch: TrainBatch) -> list[int]:
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
    _check_prompts([batch.prompt_ids[i] for i in rows], rows)
    for i in rows:
        if len(batch.sampling_logprobs[i]) != len(batch.completion_ids[i]):
            raise ValueError(f"TrainBatch.sampling_logprobs[{i}] has "
                             f"{len(batch.sampling_logprobs[i])} values for "
                             f"{len(batch.completion_ids[i])} completion tokens")
        if not math.isfinite(batch.advantages[i]):
            raise ValueError(f"TrainBatch.advantages[{i}] is {batch.advantages[i]} on a row "
                             "whose mask is True")
    return rows


def _check_prompts(prompts: list[list[int]], rows: list[int] | range) -> None:
    for p, i in zip(prompts, rows):
        if not p:  # the first completion token needs a position to be predicted from
            raise ValueError(f"prompt_ids[{i}] is empty")


def _cat_padded(parts: list[Tensor]) -> Tensor:
    """Stack (b_i, T_i) tensors into (sum b_i, max T_i), zero/False-padded on the right."""
    T = max(p.size(1) for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, T - p.size(1))) for p in parts])
