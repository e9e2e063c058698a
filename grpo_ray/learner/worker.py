"""The learner actor: base model + LoRA adapter (QLoRA on GPU), one GRPO update per step.

The reference policy is the same model with the adapter disabled, so the learner holds one copy
of the base weights. Log-probabilities come from the decoder body's last hidden states through
`token_logprobs`, so the vocabulary logits of the batch never exist at once; with
`learner.loss_kernel=liger` the update's loss comes from them through Liger's fused linear GRPO
loss (`fused_loss.fused_grpo_loss`) instead.

TRL components: `use_adapter` (the reference pass with the adapter off), `get_peak_flops` and
`compute_mfu` (MFU), from `trl.trainer.utils`; `selective_log_softmax` through `token_logprobs`.

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
from trl.trainer.utils import compute_mfu, get_peak_flops, use_adapter

from grpo_ray.algo.grpo import grpo_loss, probability_gap, truncated_is_weights
from grpo_ray.config import AlgorithmConfig, LearnerConfig, LoraConfig, ModelConfig
from grpo_ray.contracts import TrainBatch
from grpo_ray.learner.batching import (MicroBatch, active_rows, cat_padded, check_prompts, pad_rows,
                                       padding_fraction, plan_micro_batches)
from grpo_ray.learner.fused_loss import LossShare, fused_grpo_loss
from grpo_ray.learner.logprobs import token_logprobs
from grpo_ray.learner.model import import_backend, load_policy
from grpo_ray.learner.state import learner_state, load_learner_state
from grpo_ray.learner.throughput import Stopwatch, linear_params, step_flops


@dataclass
class _Prepared:
    micro_batches: list[MicroBatch]
    num_sequences: int
    num_tokens: int
    lengths: list[int]  # prompt + completion tokens of each active row
    padding_fraction: float
    separate_pass: bool  # old and reference log-probs computed before the update
    # (num_iterations > 1); else the update computes them (old = its own log-probs, detached)
    order: list[int]  # the batch row of each micro-batch row, micro-batch after micro-batch


class LearnerWorker:
    def __init__(self, model_path: str, model: ModelConfig, lora: LoraConfig,
                 learner: LearnerConfig, algorithm: AlgorithmConfig, max_completion_length: int,
                 temperature: float = 1.0, defer_load: bool = False) -> None:
        """Loads the policy, or with `defer_load` only imports what loading it takes (without
        touching the GPU's memory) and leaves the load to `load()`: on a GPU shared with engines
        that size their KV cache from the memory they see free, the learner's imports (Unsloth's
        take tens of seconds) run while the engines start, and its weights arrive after."""
        self._load_args = (model_path, model, lora, learner, algorithm, max_completion_length,
                           temperature)
        if defer_load:
            import_backend(learner, _device())
        else:
            self.load()

    def load(self) -> float:
        """Load the policy (base + fresh adapter), its optimizer and schedule; the seconds it
        took."""
        from transformers import get_scheduler

        start = time.perf_counter()
        (model_path, model, lora, learner, algorithm, max_completion_length,
         temperature) = self._load_args
        torch.manual_seed(algorithm.seed)
        self.learner, self.algorithm = learner, algorithm
        self.max_completion_length, self.temperature = max_completion_length, temperature
        self.device = _device()
        self.model, self._compute_dtype, self.description = load_policy(
            model_path, model, lora, learner, algorithm.seed, self.device)
        self._ipc_export: Any = None
        self._exported: tuple[int, str | None, int] = (0, None, 0)  # `exported_identity`
        causal_lm = self.model.get_base_model()
        self._decoder = causal_lm.get_decoder()
        self._lm_head = causal_lm.get_output_embeddings()
        self._linear = linear_params(self._decoder)  # (frozen, trainable) for the FLOPs estimate
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=learner.learning_rate, betas=(learner.adam_beta1, learner.adam_beta2),
            weight_decay=learner.weight_decay, fused=self.device.type == "cuda")
        self.scheduler = get_scheduler(
            learner.lr_scheduler_type, self.optimizer,
            num_warmup_steps=math.ceil(learner.warmup_ratio * algorithm.total_steps),
            num_training_steps=algorithm.total_steps)
        return time.perf_counter() - start

    # ---- one GRPO step -------------------------------------------------------------------------
    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """`num_iterations` optimizer steps over the batch (gradients accumulated over
        micro-batches), then one scheduler step. Rows whose mask is False take no part in
        anything, metrics included.

        With `num_iterations` 1 each micro-batch gets one forward + backward with the adapter and,
        when beta > 0, one forward without it (the reference) just before: the "old" log-probs
        are the update's own, detached (TRL's choice), so the ratio is exactly 1 and no separate
        pass over the batch computes them. They are computed in train mode: with LoRA dropout > 0
        they carry that step's dropout, as in TRL. With more iterations the old log-probs (eval
        mode) and the reference's come from one pass before the first optimizer step."""
        a = self.algorithm
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ref_watch = Stopwatch(self.device)
        start = time.perf_counter()
        prepared = self._prepare(batch, ref_watch)
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # the separate pass's time, not only its launches
        time_prepare = time.perf_counter() - start

        lr = self.optimizer.param_groups[0]["lr"]
        totals = {"loss": 0.0, "grad_norm": 0.0, "kl": 0.0, "clip_fraction": 0.0}
        start_update = time.perf_counter()
        if prepared.num_tokens:
            for _ in range(a.num_iterations):
                stats = self._accumulate_gradients(prepared, ref_watch)
                grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.learner.max_grad_norm)
                self.optimizer.step()
                stats["grad_norm"] = grad_norm.item()
                for k in totals:
                    totals[k] += stats[k] / a.num_iterations
        else:  # every row masked or empty: a no-op optimizer step keeps the schedule in step
            self.optimizer.zero_grad(set_to_none=True)
            self.optimizer.step()
        self.scheduler.step()
        time_ref = ref_watch.seconds()
        time_step = time.perf_counter() - start
        ref_in_update = 0.0 if prepared.separate_pass else time_ref

        flops = step_flops(tokens=sum(prepared.lengths), completion_tokens=prepared.num_tokens,
                           frozen=self._linear[0], trainable=self._linear[1],
                           lm_head=self._lm_head.weight.numel(), iterations=a.num_iterations,
                           old_pass=prepared.separate_pass, ref_pass=a.beta > 0)
        return {**totals, "learning_rate": lr, **_gaps(prepared, batch.engine_index),
                "num_tokens": float(prepared.num_tokens),
                "padding_fraction": prepared.padding_fraction,
                # all no-grad log-prob passes (old and reference), wherever they ran
                "time_logprobs_s": time_prepare + ref_in_update, "time_ref_s": time_ref,
                "time_update_s": time.perf_counter() - start_update - ref_in_update,
                "tflops": flops / 1e12,
                **self._device_figures(flops, sum(prepared.lengths), time_step)}

    def _device_figures(self, flops: float, tokens: int, seconds: float) -> dict[str, float]:
        """Peak memory, achieved TFLOP/s and MFU (a fraction) on CUDA (`throughput`: model FLOPs
        of the step over its wall time; MFU against TRL's dense peak of the device in the compute
        dtype, absent where TRL knows none). On CPU only the peak memory key, 0: timings there
        say little, and figures that vary from run to run would set apart a resumed run's logs."""
        if self.device.type != "cuda":
            return {"peak_memory_gb": 0.0}
        out = {"peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30,
               "tflops_per_s": flops / seconds / 1e12}
        dtype = str(self._compute_dtype).removeprefix("torch.")
        peak = get_peak_flops(torch.cuda.get_device_name(), dtype)
        if peak is not None and tokens:
            out["mfu"] = compute_mfu(flops_per_token=flops / tokens,
                                     tokens_per_second=tokens / seconds, world_size=1,
                                     peak_flops_per_device=peak) / 100  # TRL's is a percentage
        return out

    def _plan(self, lengths: list[int]) -> list[list[int]]:
        return plan_micro_batches(lengths, self.learner.micro_batch_size,
                                  self.learner.max_tokens_per_micro_batch)

    def _prepare(self, batch: TrainBatch, ref_watch: Stopwatch | None = None) -> _Prepared:
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
        separate = self.algorithm.num_iterations > 1
        if separate:
            with torch.no_grad():
                for mb in mbs:
                    mb.old_logp = self._logprobs(mb, train=False)
                    if self.algorithm.beta:
                        mb.ref_logp = self._reference_logprobs(mb, ref_watch)
        return _Prepared(mbs, len(rows), sum(len(batch.completion_ids[i]) for i in rows),
                         lengths, padding_fraction(lengths, plan), separate,
                         [rows[j] for mb in plan for j in mb])

    def _accumulate_gradients(self, prepared: _Prepared,
                              ref_watch: Stopwatch | None = None) -> dict[str, float]:
        """Zero the gradients, then backward every micro-batch's share of the batch loss: the
        accumulated gradient is that of the whole batch's loss, whatever the micro-batches.
        Without a separate pass, the reference forward of each micro-batch runs here, and its
        old log-probs are set to this forward's, detached (kept for the step's metrics)."""
        a = self.algorithm
        ref_watch = ref_watch or Stopwatch(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        # Tensors, not floats: .item() per micro-batch would wait for the GPU each time.
        loss = kl = clipped = torch.zeros((), device=self.device)
        for mb in prepared.micro_batches:
            if a.beta and not prepared.separate_pass:
                mb.ref_logp = self._reference_logprobs(mb, ref_watch)
            hidden = self._hidden(mb, train=True)
            if self.learner.loss_kernel == "liger":
                out = self._fused_loss(hidden, mb, prepared)
            else:
                out = self._chunked_loss(hidden, mb, prepared)
            out.loss.backward()
            loss = loss + out.loss.detach()
            kl = kl + out.kl_sum
            clipped = clipped + out.clipped_sum
        n = max(prepared.num_tokens, 1)
        return {"loss": loss.item(), "kl": kl.item() / n, "clip_fraction": clipped.item() / n}

    def _chunked_loss(self, hidden: Tensor, mb: MicroBatch, prepared: _Prepared) -> LossShare:
        """The micro-batch's loss through `token_logprobs` and `grpo_loss` (loss_kernel chunked)."""
        a = self.algorithm
        logp = self._token_logprobs(hidden, mb)
        if not prepared.separate_pass:
            mb.old_logp = logp.detach()
        out = grpo_loss(logp, mb.old_logp, mb.ref_logp, mb.advantages, mb.mask,
                        beta=a.beta, epsilon=a.epsilon, epsilon_high=a.epsilon_high,
                        loss_type=a.loss_type, num_sequences=prepared.num_sequences,
                        num_tokens=prepared.num_tokens,
                        max_completion_length=self.max_completion_length,
                        is_weights=self._is_weights(mb))
        return LossShare(out.loss, (out.per_token_kl * mb.mask).sum(),
                         (out.clipped & mb.mask).sum())

    def _fused_loss(self, hidden: Tensor, mb: MicroBatch, prepared: _Prepared) -> LossShare:
        """The micro-batch's loss through Liger's fused linear GRPO loss (loss_kernel liger).
        It returns no per-token log-probs, and the importance weights and the gap metrics need
        the old ones: without a separate pass they come from one more lm_head pass over the
        update's hidden states, without gradients (no decoder forward; a third more lm_head
        work than the chunked update, docs/design.md). Liger then takes the old log-probs as
        its own, detached (old_logp None), so the ratio is exactly 1 as in the chunked path."""
        a = self.algorithm
        if not prepared.separate_pass:
            with torch.no_grad():
                mb.old_logp = self._token_logprobs(hidden.detach(), mb)
        weight = self._lm_head.weight
        return fused_grpo_loss(
            hidden, weight.to(self._lm_head_dtype() or weight.dtype), mb.targets, mb.mask,
            mb.advantages,
            mb.old_logp if prepared.separate_pass else None, mb.ref_logp, self._is_weights(mb),
            beta=a.beta, epsilon=a.epsilon, epsilon_high=a.epsilon_high, loss_type=a.loss_type,
            num_sequences=prepared.num_sequences, num_tokens=prepared.num_tokens,
            max_completion_length=self.max_completion_length, temperature=self.temperature)

    def _is_weights(self, mb: MicroBatch) -> Tensor | None:
        a = self.algorithm
        return (truncated_is_weights(mb.old_logp, mb.sampling_logp, a.importance_sampling_cap)
                if a.importance_sampling_correction else None)

    def set_loss_kernel(self, kernel: str) -> None:
        """Switch `learner.loss_kernel` (validated as in the config), for a benchmark that times
        both kernels on the same actor."""
        self.learner = LearnerConfig.model_validate({**self.learner.model_dump(),
                                                     "loss_kernel": kernel})

    # ---- log-probabilities ---------------------------------------------------------------------
    def _logprobs(self, mb: MicroBatch, train: bool, temperature: float | None = None) -> Tensor:
        """(b, T) log-probs of the completion tokens under the model as it is now (the adapter
        is whatever is enabled), at `temperature` (None: the rollout's). Eval mode for the
        passes without gradients (the reference, a separate pass's old log-probs: deterministic
        even with LoRA dropout); train mode (dropout, gradient checkpointing) for the update's."""
        return self._token_logprobs(self._hidden(mb, train), mb, temperature)

    def _hidden(self, mb: MicroBatch, train: bool) -> Tensor:
        """(b, T, H) last hidden states at the positions that predict the completion tokens."""
        self.model.train(train)
        with self._autocast():
            hidden = self._decoder(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                                   use_cache=False).last_hidden_state
        # Only the positions that predict completion tokens go through the lm_head.
        return hidden.gather(1, mb.positions.unsqueeze(-1).expand(-1, -1, hidden.size(-1)))

    def _token_logprobs(self, hidden: Tensor, mb: MicroBatch,
                        temperature: float | None = None) -> Tensor:
        return token_logprobs(hidden, self._lm_head.weight, mb.targets,
                              self.learner.logprob_chunk_size,
                              self.temperature if temperature is None else temperature,
                              self._lm_head_dtype())

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

    def describe(self) -> str:
        """What was loaded and why (`learner.model.load_policy`), for the start-up line."""
        return self.description

    # ---- the adapter ---------------------------------------------------------------------------
    def export_adapter(self, version: int, transport: str = "tensors",
                       dtype: str | None = None) -> Any:
        """The adapter, for `weight_sync`: `tensors` (an AdapterPayload of CPU tensors, for
        checkpoints and files), `packed` (one buffer cast to the engines' `dtype` on this device,
        then copied once to the CPU: what the object store ships) or `cuda-ipc` (for engines on
        this GPU: one GPU buffer refreshed in place every version; only a handle travels)."""
        from grpo_ray.sync import sender

        if transport == "tensors":
            payload = sender.adapter_payload(self.model, version, dtype=dtype)
        elif transport == "packed":
            payload = sender.packed_adapter(self.model, version, dtype)
        elif transport == "cuda-ipc":
            if self._ipc_export is None:
                self._ipc_export = sender.CudaIpcExport()
            payload = self._ipc_export.export(self.model, version, dtype)
        else:
            raise ValueError(f"unknown adapter transport {transport!r}")
        names = payload.tensors if transport == "tensors" else payload.names
        self._exported = (version, payload.digest, sender.lora_modules(names))
        return payload

    def exported_identity(self) -> tuple[int, str | None, int]:
        """(version, digest, LoRA modules) of the last `export_adapter`: what every engine must
        report after loading it (`RolloutWorker.adapter_identity`; the driver asks for these few
        bytes instead of fetching the payload). (0, None, 0): the base model, nothing exported."""
        return self._exported

    # ---- checkpoint state ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """LoRA parameters, optimizer, scheduler and RNG states (`learner.state`)."""
        return learner_state(self.model, self.optimizer, self.scheduler)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned, on this run's lr plan (`learner.state`)."""
        load_learner_state(self.model, self.optimizer, self.scheduler, state)


# ---- helpers -------------------------------------------------------------------------------------
def _gaps(prepared: _Prepared, engine_index: list[int]) -> dict[str, float]:
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


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
