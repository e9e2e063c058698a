"""The learner actor: base model + LoRA adapter (QLoRA on GPU), one GRPO update per step.

The reference policy is the same model with the adapter disabled, so the learner holds one copy
of the base weights. Log-probabilities come from the decoder body's last hidden states through
`token_logprobs`, so the vocabulary logits of the batch never exist at once.

A plain class: `ray.remote` is applied where it is placed, and tests build it directly.
"""
from __future__ import annotations

import importlib.util
import math
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from grpo_ray.algo.grpo import grpo_loss, probability_gap, truncated_is_weights
from grpo_ray.config import AlgorithmConfig, LearnerConfig, LoraConfig, ModelConfig
from grpo_ray.contracts import AdapterPayload, TrainBatch
from grpo_ray.learner.logprobs import token_logprobs
from grpo_ray.weight_sync.adapter import (CudaIpcAdapter, CudaIpcExport, PackedAdapter,
                                          packed_adapter)


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


class LearnerWorker:
    def __init__(self, model_path: str, model: ModelConfig, lora: LoraConfig,
                 learner: LearnerConfig, algorithm: AlgorithmConfig, max_completion_length: int,
                 temperature: float = 1.0) -> None:
        from transformers import get_scheduler

        torch.manual_seed(algorithm.seed)
        self.learner, self.algorithm = learner, algorithm
        self.max_completion_length, self.temperature = max_completion_length, temperature
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if learner.backend == "unsloth":
            self.model = _load_unsloth(model_path, lora, learner, algorithm.seed)
            self._compute_dtype = torch.bfloat16  # autocast as TRL + Unsloth run it (bf16=True)
        else:
            self.model, self._compute_dtype = _load_peft(model_path, model, lora, learner,
                                                         self.device)
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

        mbs = prepared.micro_batches
        gap = ({"mean_abs_diff": 0.0, "kl": 0.0} if not prepared.num_tokens else probability_gap(
            _cat_padded([m.old_logp for m in mbs]), _cat_padded([m.sampling_logp for m in mbs]),
            _cat_padded([m.mask for m in mbs])))
        peak = torch.cuda.max_memory_allocated() / 2**30 if self.device.type == "cuda" else 0.0
        return {**totals, "learning_rate": lr, "gap_mean_abs_diff": float(gap["mean_abs_diff"]),
                "gap_kl": float(gap["kl"]), "num_tokens": float(prepared.num_tokens),
                "time_logprobs_s": time_logprobs, "time_update_s": time_update,
                "peak_memory_gb": peak}

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
        return _Prepared(mbs, len(rows), sum(len(batch.completion_ids[i]) for i in rows))

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
    def export_adapter(self, version: int) -> AdapterPayload:
        from grpo_ray.weight_sync.adapter import adapter_payload

        return adapter_payload(self.model, version)

    def export_packed_adapter(self, version: int, dtype: str | None = None) -> PackedAdapter:
        """The adapter as AdapterBroadcast ships it: one buffer, cast to the engines' `dtype`
        on this learner's device before the single copy to the CPU."""
        return packed_adapter(self.model, version, dtype)

    def export_cuda_ipc_adapter(self, version: int, dtype: str) -> CudaIpcAdapter:
        """For engines on this learner's GPU: the adapter, cast to `dtype`, stays in one GPU
        buffer refreshed in place for every version; only a CUDA IPC handle to it travels."""
        if getattr(self, "_ipc_export", None) is None:
            self._ipc_export = CudaIpcExport()
        return self._ipc_export.export(self.model, version, dtype)

    def save_adapter(self, path: str) -> str:
        self.model.save_pretrained(path)
        return path

    def lora_parameter_norm(self) -> float:
        with torch.no_grad():
            return math.sqrt(sum(p.float().pow(2).sum().item() for p in self.params))

    # ---- checkpoint state ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed learner needs, as CPU tensors and plain Python values (loadable
        with `torch.load(weights_only=True)`): the trainable LoRA parameters by name, optimizer
        and scheduler state, and the torch / CUDA / `random` / numpy RNG states."""
        import random

        import numpy as np

        np_state = np.random.get_state()
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
               "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype("int64")),
                         "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                         "cached_gaussian": float(np_state[4])}}
        if torch.cuda.is_available():
            rng["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
        with torch.no_grad():
            lora = {n: p.detach().to("cpu", copy=True) for n, p in self.model.named_parameters()
                    if p.requires_grad}
        return {"lora": lora, "optimizer": _to_cpu(self.optimizer.state_dict()),
                "scheduler": self.scheduler.state_dict(), "rng": rng}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned; tensors go back to this learner's device."""
        import random

        import numpy as np

        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        missing = sorted(set(params) - set(state["lora"]))
        unexpected = sorted(set(state["lora"]) - set(params))
        if missing or unexpected:
            raise ValueError(f"checkpoint LoRA parameters do not match this learner's adapter "
                             f"(lora.target_modules changed?): {len(missing)} missing "
                             f"{missing[:1]}, {len(unexpected)} unexpected {unexpected[:1]}")
        for name, p in params.items():
            t = state["lora"][name]
            if t.shape != p.shape:
                raise ValueError(f"checkpoint LoRA parameter {name} has shape {tuple(t.shape)}, "
                                 f"this learner's has {tuple(p.shape)} (lora.r changed?)")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state["lora"][name].to(p.device, p.dtype))
        # Optimizer.load_state_dict moves each state tensor to its parameter's device.
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        n = rng["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                             n["has_gauss"], n["cached_gaussian"]))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])


# ---- helpers -------------------------------------------------------------------------------------
def _active_rows(batch: TrainBatch) -> list[int]:
    """Indices of the rows that take part in the loss, after checking the batch's shape."""
    n = len(batch.completion_ids)
    for name in ["prompt_ids", "advantages", "sampling_logprobs"]:
        if len(getattr(batch, name)) != n:
            raise ValueError(f"TrainBatch.{name} has {len(getattr(batch, name))} rows, "
                             f"completion_ids has {n}")
    if batch.mask and len(batch.mask) != n:
        raise ValueError(f"TrainBatch.mask has {len(batch.mask)} rows, completion_ids has {n}")
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


def _to_cpu(value: Any) -> Any:
    """A copy of a nested dict/list/tuple with every tensor moved to the CPU."""
    if isinstance(value, Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def _cat_padded(parts: list[Tensor]) -> Tensor:
    """Stack (b_i, T_i) tensors into (sum b_i, max T_i), zero/False-padded on the right."""
    T = max(p.size(1) for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, T - p.size(1))) for p in parts])


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def _use_4bit(setting: bool | None, device: torch.device) -> bool:
    if setting is False:
        return False
    usable = device.type == "cuda" and importlib.util.find_spec("bitsandbytes") is not None
    if setting and not usable:
        raise RuntimeError("learner.load_in_4bit=true needs CUDA and the bitsandbytes package")
    return usable


def _load_peft(model_path: str, model: ModelConfig, lora: LoraConfig, learner: LearnerConfig,
               device: torch.device) -> tuple[Any, torch.dtype]:
    """transformers + bitsandbytes NF4 (QLoRA) or full precision, then a fresh LoRA adapter
    (fp32, PEFT's default, so that small updates are not lost to bf16 rounding). Returns the
    PEFT model and its compute dtype."""
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    checkpointing = {"use_reentrant": False}  # needs no input grads, works with frozen embeddings
    dtype = _resolve_dtype(model.dtype, device)
    if _use_4bit(learner.load_in_4bit, device):
        dtype = torch.bfloat16
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        base = AutoModelForCausalLM.from_pretrained(
            model_path, quantization_config=quant, dtype=torch.bfloat16,
            device_map={"": torch.cuda.current_device()})
        base = peft.prepare_model_for_kbit_training(
            base, use_gradient_checkpointing=learner.gradient_checkpointing,
            gradient_checkpointing_kwargs=checkpointing)
    else:
        base = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=dtype).to(device)
        if learner.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    base.config.use_cache = False
    config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    return peft.get_peft_model(base, config), dtype


def _load_unsloth(model_path: str, lora: LoraConfig, learner: LearnerConfig, seed: int) -> Any:
    """Unsloth's 4-bit loader, kernels and gradient checkpointing (CUDA only)."""
    try:
        from unsloth import FastLanguageModel
    except ImportError as e:
        raise ImportError(f"learner.backend=unsloth: cannot import unsloth ({e})") from None
    from transformers import AutoConfig

    max_len = getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", 2048)
    base, _ = FastLanguageModel.from_pretrained(
        model_name=model_path, max_seq_length=max_len, dtype=None,
        load_in_4bit=learner.load_in_4bit is not False)
    return FastLanguageModel.get_peft_model(
        base, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules), random_state=seed,
        use_gradient_checkpointing="unsloth" if learner.gradient_checkpointing else False)
