"""The learner actor: base model + LoRA adapter (QLoRA on GPU), one GRPO update per step.

The reference policy is the same model with the adapter disabled, so the learner holds one copy
of the base weights. Log-probabilities come from the decoder body's last hidden states through
`token_logprobs` (the forward passes: `passes.PolicyPasses`, this class's base), so the
vocabulary logits of the batch never exist at once, and the loss is
`algo.grpo.grpo_loss` with the `algorithm.loss_type` registered in `algo.losses`; with
`learner.loss_kernel=liger` the update's loss comes from the hidden states through Liger's fused
linear GRPO loss (`fused_loss.fused_grpo_loss`) instead, and its logged figures from
`grpo_loss` on the log-probs of a pass without gradients.

TRL components: `get_peak_flops` and `compute_mfu` (MFU), from `trl.trainer.utils`; the passes'
own in `passes`.

A plain class: `ray.remote` is applied where it is placed, and tests build it directly.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from trl.trainer.utils import compute_mfu, get_peak_flops

from grpo_ray.algo.grpo import entropy_threshold, grpo_loss, high_entropy_mask, importance_weights
from grpo_ray.algo.losses import Stat, policy_loss
from grpo_ray.config import AlgorithmConfig, LearnerConfig, LoraConfig, ModelConfig
from grpo_ray.contracts import TrainBatch
from grpo_ray.learner.batching import MicroBatch, cat_padded
from grpo_ray.learner.fused_loss import fused_grpo_loss
from grpo_ray.learner.model import import_backend, load_policy
from grpo_ray.learner.passes import PolicyPasses, Prepared, probability_gaps
from grpo_ray.learner.state import learner_state, load_learner_state
from grpo_ray.learner.throughput import Stopwatch, linear_params, step_flops


@dataclass
class LossShare:
    """One micro-batch's part of the step, whichever loss kernel computed it."""

    loss: Tensor
    """Scalar, this micro-batch's share of the batch loss (differentiable)."""
    stats: dict[str, Stat]
    """Its logged figures (`LossOutputs.stats`), merged over the micro-batches."""


class LearnerWorker(PolicyPasses):
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
        mode) and the reference's come from one pass before the first optimizer step; so do
        they with an entropy mask (`top_entropy_quantile` < 1), whose entropies come from that
        pass and, before each later optimizer step, from one more pass without gradients."""
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
            for iteration in range(a.num_iterations):
                if iteration and a.top_entropy_quantile < 1:  # the entropies of the new adapter
                    self._entropy_pass(prepared)
                stats = self._accumulate_gradients(prepared, ref_watch)
                grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.learner.max_grad_norm)
                self.optimizer.step()
                stats["grad_norm"] = grad_norm.item()
                for k, v in stats.items():  # each figure's mean over the iterations
                    totals[k] = totals.get(k, 0.0) + v / a.num_iterations
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
        return {**totals, "learning_rate": lr,
                **probability_gaps(prepared, batch.engine_index),
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

    def _accumulate_gradients(self, prepared: Prepared,
                              ref_watch: Stopwatch | None = None) -> dict[str, float]:
        """Zero the gradients, then backward every micro-batch's share of the batch loss: the
        accumulated gradient is that of the whole batch's loss, whatever the micro-batches.
        Without a separate pass, the reference forward of each micro-batch runs here, and its
        old log-probs are set to this forward's, detached (kept for the step's metrics)."""
        a = self.algorithm
        ref_watch = ref_watch or Stopwatch(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        threshold = None
        if a.top_entropy_quantile < 1:  # one threshold for the whole batch's tokens
            mbs = prepared.micro_batches
            threshold = entropy_threshold(cat_padded([mb.entropies for mb in mbs]),
                                          cat_padded([mb.mask for mb in mbs]),
                                          a.top_entropy_quantile)
        # Tensors, not floats: .item() per micro-batch would wait for the GPU each time.
        loss = torch.zeros((), device=self.device)
        stats: dict[str, Stat] = {}
        for mb in prepared.micro_batches:
            if a.beta and not prepared.separate_pass:
                mb.ref_logp = self._reference_logprobs(mb, ref_watch)
            hidden = self._hidden(mb, train=True)
            if self.learner.loss_kernel == "liger":
                out = self._fused_loss(hidden, mb, prepared)
            else:
                out = self._chunked_loss(hidden, mb, prepared, threshold)
            out.loss.backward()
            loss = loss + out.loss.detach()
            if mb.entropies is not None:
                out.stats["entropy"] = Stat.mean(mb.entropies, mb.mask.to(mb.entropies))
            for k, s in out.stats.items():
                stats[k] = stats[k].merge(s) if k in stats else s
        return {"loss": loss.item(), **{k: s.value() for k, s in stats.items()}}

    def _loss_arguments(self, prepared: Prepared) -> dict[str, Any]:
        """What `grpo_loss` and `fused_grpo_loss` both take, from the algorithm's settings: the
        loss type, its hyperparameters (those its registered function names), the counts."""
        a = self.algorithm
        params = {p: getattr(a, p) for p in policy_loss(a.loss_type).params}
        return dict(loss_type=a.loss_type, beta=a.beta, num_sequences=prepared.num_sequences,
                    num_tokens=prepared.num_tokens,
                    max_completion_length=self.max_completion_length,
                    importance_sampling_level=a.importance_sampling_level,
                    use_bias_correction_kl=a.use_bias_correction_kl, **params)

    def _chunked_loss(self, hidden: Tensor, mb: MicroBatch, prepared: Prepared,
                      threshold: Tensor | None) -> LossShare:
        """The micro-batch's loss through `token_logprobs` and `grpo_loss` (loss_kernel chunked);
        `threshold`: the batch's entropy threshold (an entropy mask), else None."""
        a = self.algorithm
        logp = self._token_logprobs(hidden, mb)
        if not prepared.separate_pass:
            mb.old_logp = logp.detach()
        out = grpo_loss(logp, mb.old_logp, mb.ref_logp, mb.advantages, mb.mask,
                        is_weights=self._is_weights(mb),
                        entropy_mask=None if threshold is None else high_entropy_mask(
                            mb.entropies, mb.mask, threshold),
                        off_policy_threshold=a.off_policy_mask_threshold,
                        sampling_logp=mb.sampling_logp, **self._loss_arguments(prepared))
        return LossShare(out.loss, out.stats)

    def _fused_loss(self, hidden: Tensor, mb: MicroBatch, prepared: Prepared) -> LossShare:
        """The micro-batch's loss through Liger's fused linear GRPO loss (loss_kernel liger).
        It returns no per-token log-probs, and the importance weights, the gap metrics and the
        logged figures need them: they come from one more lm_head pass over the update's hidden
        states, without gradients (no decoder forward; a third more lm_head work than the
        chunked update, docs/design.md), and the figures from `grpo_loss` on them. Without a
        separate pass they are the old log-probs too, and Liger takes the old log-probs as its
        own, detached (old_logp None), so the ratio is exactly 1 as in the chunked path."""
        with torch.no_grad():
            current = self._token_logprobs(hidden.detach(), mb)
        if not prepared.separate_pass:
            mb.old_logp = current
        weight, arguments = self._lm_head.weight, self._loss_arguments(prepared)
        is_weights = self._is_weights(mb)
        loss = fused_grpo_loss(
            hidden, weight.to(self._lm_head_dtype() or weight.dtype), mb.targets, mb.mask,
            mb.advantages, mb.old_logp if prepared.separate_pass else None, mb.ref_logp,
            is_weights, temperature=self.temperature, **arguments)
        with torch.no_grad():
            stats = grpo_loss(current, mb.old_logp, mb.ref_logp, mb.advantages, mb.mask,
                              is_weights=is_weights, **arguments).stats
        return LossShare(loss, stats)

    def _is_weights(self, mb: MicroBatch) -> Tensor | None:
        a = self.algorithm
        if not a.importance_sampling_correction:
            return None
        return importance_weights(mb.old_logp, mb.sampling_logp, mb.mask,
                                  a.importance_sampling_mode, a.importance_sampling_cap,
                                  a.importance_sampling_min)

    def set_loss_kernel(self, kernel: str) -> None:
        """Switch `learner.loss_kernel` (validated as in the config), for a benchmark that times
        both kernels on the same actor."""
        self.learner = LearnerConfig.model_validate({**self.learner.model_dump(),
                                                     "loss_kernel": kernel})

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
def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
