"""The rollout actor: one vLLM engine that samples completions with the newest LoRA adapter.

A plain class; `ray.remote(RolloutWorker)` is applied where the engines are placed
(`cluster.engines.EngineGroup` owns them). The engine starts once and lives across steps (a start
costs a minute on GPU); only the adapter changes (`sync.receiver`).
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from typing import Any

from grpo_ray.config import RolloutConfig
from grpo_ray.contracts import Rollout, Sampling
from grpo_ray.sync.merged import MergedWeightsExtension, VllmMergedWeights
from grpo_ray.sync.receiver import LoraExtension, VllmAdapterSlot

CPU_BATCHED_TOKENS = 4096
"""vLLM's default `max_num_batched_tokens`: the prompt tokens one scheduler step takes."""


class EngineExtension(LoraExtension, MergedWeightsExtension):
    """What vLLM's workers of a rollout engine do besides vLLM's own work: the sync's engine side
    (`sync.receiver`, `sync.merged`). vLLM mixes it into its worker class
    (`worker_extension_cls`) and `LLM.collective_rpc("grpo_...")` calls its methods."""


def engine_lora_rank(rank: int) -> int:
    """vLLM accepts only some max_lora_rank values (1, 8, 16, ...): the smallest one >= rank."""
    try:
        from vllm.config.lora import MaxLoRARanks
    except ImportError:
        return rank
    allowed = sorted(typing.get_args(MaxLoRARanks))
    fits = [a for a in allowed if a >= rank]
    if not fits:
        raise ValueError(f"LoRA rank {rank} exceeds vLLM's largest max_lora_rank {allowed[-1]}")
    return fits[0]


def engine_kwargs(rollout: RolloutConfig, max_lora_rank: int, dtype: str, seed: int,
                  on_cuda: bool) -> dict[str, Any]:
    """Arguments of `vllm.LLM` for one rollout engine (also what the throughput benchmark gives
    plain vLLM). `dtype` is resolved (no `auto`)."""
    from vllm.engine.arg_utils import EngineArgs

    lora = {} if rollout.merge_adapter else dict(
        enable_lora=True, max_loras=1, max_lora_rank=engine_lora_rank(max_lora_rank))
    kwargs: dict[str, Any] = dict(
        **lora, max_model_len=rollout.max_model_len,
        gpu_memory_utilization=rollout.gpu_memory_utilization,
        enforce_eager=rollout.enforce_eager, seed=seed, dtype=dtype,
        enable_prefix_caching=True,
        worker_extension_cls=f"{EngineExtension.__module__}.{EngineExtension.__qualname__}")
    if on_cuda:
        kwargs["tensor_parallel_size"] = rollout.gpus_per_engine
        if rollout.kv_cache_gb is not None:
            kwargs["kv_cache_memory_bytes"] = int(rollout.kv_cache_gb * 2**30)
    if "logprobs_mode" in {f.name for f in dataclasses.fields(EngineArgs)}:
        # Logprobs after temperature/top-k/top-p, as the learner's log_softmax(logits / T).
        kwargs["logprobs_mode"] = "processed_logprobs"
    return kwargs


def request_calls(prompt_lengths: list[int], n: int, budget: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges of prompts whose prompt tokens (each prompt counted once
    per completion) fit `budget`; a prompt larger than the budget alone gets its own call.

    vLLM's CPU engine fails a seeded request whose prompt is split over scheduler steps
    ("CPU Generator does not use offset"): calls that fit one step never split a prompt."""
    calls, start, tokens = [], 0, 0
    for i, length in enumerate(prompt_lengths):
        if i > start and tokens + length * n > budget:
            calls.append((start, i))
            start, tokens = i, 0
        tokens += length * n
    if prompt_lengths:
        calls.append((start, len(prompt_lengths)))
    return calls


def sampling_params(s: Sampling, index: int = 0) -> Any:
    """vLLM's `SamplingParams` for prompt `index` of a `generate` call: the sampled tokens'
    log-probs, flat; text only where stop strings need it (`RolloutWorker.generate`)."""
    from vllm import SamplingParams

    greedy = s.temperature == 0
    return SamplingParams(n=s.n, temperature=s.temperature, max_tokens=s.max_tokens,
                          top_p=1.0 if greedy else s.top_p, top_k=-1 if greedy else s.top_k,
                          logprobs=0, flat_logprobs=True, detokenize=bool(s.stop), stop=s.stop,
                          include_stop_str_in_output=bool(s.stop),
                          seed=None if s.seed is None else s.seed + index)


def sampled_logprobs(logprobs: Any, tokens: list[int]) -> list[float]:
    """The log-prob of each sampled token from vLLM's `FlatLogprobs` of a completion sampled with
    `logprobs=0` (vLLM puts the sampled token first at every position)."""
    starts = logprobs.start_indices
    if len(starts) != len(tokens) or any(logprobs.token_ids[k] != t
                                         for k, t in zip(starts, tokens)):
        raise RuntimeError("vLLM returned log-probs that do not match the sampled tokens")
    return [logprobs.logprobs[k] for k in starts]


def decode_completions(tokenizer: Any, completion_ids: list[list[int]]) -> list[str]:
    """Completion texts as vLLM's detokenizer gives them: special tokens skipped, no clean-up of
    spaces, and a trailing incomplete UTF-8 character left out (vLLM holds its bytes back until
    the character completes; `decode` would end the text with U+FFFD instead)."""
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True,
                                   clean_up_tokenization_spaces=False)
    return [t.rstrip("\ufffd") for t in texts]


class RolloutWorker:
    """One vLLM engine (LoRA enabled, one adapter slot) and the adapter version it samples with."""

    def __init__(self, model_path: str, rollout: RolloutConfig, max_lora_rank: int,
                 dtype: str = "auto", seed: int = 0, engine_index: int = 0) -> None:
        import torch

        self.on_cuda = torch.cuda.is_available()
        # Engine core in this process (unless the placer says otherwise): required inside Ray
        # actors on CPU, and simpler to place and to clean up everywhere.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if not self.on_cuda:
            # Read by vLLM when the engine starts; whole GiB only.
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(rollout.kv_cache_space_gb)))
        from vllm import LLM

        self.rollout = rollout
        self.engine_index = engine_index
        if dtype == "auto":
            dtype = "bfloat16" if self.on_cuda else "float32"
        self._dtype = dtype
        self.llm = LLM(model_path, **engine_kwargs(rollout, max_lora_rank, dtype,
                                                   seed + engine_index, self.on_cuda))
        # Adapters go to the engine in memory when its workers can be called in this process's
        # engine core; a separate engine-core process would need them pickled: files then.
        # One engine GPU: unpack straight onto it (one host-to-device copy of the whole buffer).
        in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
        device = "cuda" if self.on_cuda and rollout.gpus_per_engine == 1 else "cpu"
        if rollout.merge_adapter:
            if not in_process:
                raise RuntimeError("rollout.merge_adapter needs vLLM's engine core in the "
                                   "actor's process (VLLM_ENABLE_V1_MULTIPROCESSING=0)")
            self.adapter: Any = VllmMergedWeights(self.llm, model_path, device)
        else:
            self.adapter = VllmAdapterSlot(self.llm, engine_index, in_process, device)

    def ready(self) -> bool:
        return True

    def lora_dtype(self) -> str:
        """dtype in which the engine holds LoRA weights (its model dtype): the learner casts to it
        before sending, so that half the bytes travel from an fp32 adapter to a bf16 engine."""
        return self._dtype

    def gpu_uuid(self) -> str | None:
        """The GPU this engine computes on (None on CPU): the sync uses CUDA IPC when it is the
        learner's."""
        from grpo_ray.sync.sender import gpu_uuid

        return gpu_uuid()

    def adapter_version(self) -> int:
        """Version of the adapter the next `generate` samples with (0 = base model)."""
        return self.adapter.version

    def adapter_identity(self) -> tuple[int, str | None, int]:
        """(version, digest, modules) of the adapter the next `generate` samples with: the digest
        (`sync.digest.tensor_digest`) of the tensors this engine handed to vLLM, computed here on
        the engine's device (None: the base model), and the number of LoRA modules (A/B pairs)
        the engine serves it on, read back from vLLM now: those its LoRA manager bound, or those
        whose merged weights are what the merge wrote (`served_modules`). The learner reports
        the same three for what it exported (`LearnerWorker.exported_identity`)."""
        return self.adapter.version, self.adapter.digest, self.adapter.served_modules()

    def load_adapter(self, payload: Any, from_file: bool = False, reload: bool = False,
                     force: bool = False) -> float:
        """Make `payload` the adapter of the next `generate` (`VllmAdapterSlot.load`); `force`
        accepts any version, an older one included, and None: the base model, version 0 (a
        learner restored from a checkpoint)."""
        return self.adapter.load(payload, from_file, reload, force=force)

    def generate(self, prompt_ids: list[list[int]], sampling: Sampling) -> Rollout:
        """`sampling.n` completions of each prompt with the current adapter, prompt-major.

        vLLM detokenizes only where stop strings need it (evaluation): otherwise the texts are
        decoded here in one batch after generation, and the log-probs come back flat
        (`flat_logprobs`). The engine's loop runs in this process, and decoding each new token
        and building a `Logprob` dict for it there made a 3B-shape batch 15% slower on an H200
        (docs/benchmarks.md, issue 20's table) and 35-40% on 2 CPU cores."""
        for i, ids in enumerate(prompt_ids):
            if not ids:
                raise ValueError(f"prompt_ids[{i}] is empty")
        s = sampling
        params = [sampling_params(s, i) for i in range(len(prompt_ids))]
        budget = math.inf if self.on_cuda else CPU_BATCHED_TOKENS
        outputs = []
        for a, b in request_calls([len(p) for p in prompt_ids], s.n, budget):
            outputs += self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids[a:b]],
                                         params[a:b], lora_request=self.adapter.request,
                                         use_tqdm=False)
        out = Rollout([], [], [], [], [], [], self.adapter.version)
        for i, (ids, request) in enumerate(zip(prompt_ids, outputs)):
            for c in sorted(request.outputs, key=lambda c: c.index):
                tokens = list(c.token_ids)
                out.prompt_index.append(i)
                out.prompt_ids.append(list(ids))
                out.completion_ids.append(tokens)
                out.completion_texts.append(c.text)
                out.sampling_logprobs.append(sampled_logprobs(c.logprobs, tokens))
                out.finish_reasons.append("length" if c.finish_reason == "length" else "stop")
        if not s.stop:
            out.completion_texts = decode_completions(self.llm.get_tokenizer(),
                                                      out.completion_ids)
        return out

    def score(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[list[float]]:
        """The engine's log-probability of each given completion token after its prompt, under
        the current adapter: how a test, or the sync's probe, sees which adapter the engine
        serves. At temperature 1 always: vLLM's prompt log-probs skip the sampling processors.
        Flat log-probs and no text, as for training (`sampling_params`): the same numbers, 19.6
        against 31.6 ms for the probe's sequences on 2 CPU cores."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0,
                                detokenize=False, flat_logprobs=True)
        outputs = self.llm.generate([{"prompt_token_ids": p + c}
                                     for p, c in zip(prompt_ids, completion_ids)],
                                    params, lora_request=self.adapter.request, use_tqdm=False)
        return [[float(lp[t].logprob) for t, lp in zip(c, o.prompt_logprobs[len(p):])]
                for p, c, o in zip(prompt_ids, completion_ids, outputs)]

    def close(self) -> None:
        """Stop the engine and free its adapter files (a Ray actor is simply killed instead)."""
        engine = getattr(getattr(self, "llm", None), "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        self.llm = None
        self.adapter.close()
