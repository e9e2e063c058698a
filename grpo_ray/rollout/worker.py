"""The rollout actor: one vLLM engine that samples completions with the newest LoRA adapter.

A plain class; `ray.remote(RolloutWorker)` is applied where the engines are placed. The engine
starts once and lives across steps (a start costs a minute on GPU); only the adapter changes.
"""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
import time
import typing
import weakref
from pathlib import Path
from typing import Any

from grpo_ray.config import LoraConfig, RolloutConfig
from grpo_ray.contracts import AdapterPayload, Rollout
from grpo_ray.weight_sync.adapter import (CudaIpcAdapter, PackedAdapter, split_flat, tmpfs_root,
                                          write_adapter)


def _engine_lora_rank(rank: int) -> int:
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


def engine_kwargs(rollout: RolloutConfig, lora: LoraConfig, dtype: str, seed: int,
                  on_cuda: bool) -> dict[str, Any]:
    """Arguments of `vllm.LLM` for one rollout engine (also what the throughput benchmark gives
    plain vLLM). `dtype` is resolved (no `auto`)."""
    from vllm.engine.arg_utils import EngineArgs

    kwargs: dict[str, Any] = dict(
        enable_lora=True, max_loras=1,
        max_lora_rank=_engine_lora_rank(rollout.max_lora_rank or lora.r),
        max_model_len=rollout.max_model_len,
        gpu_memory_utilization=rollout.gpu_memory_utilization,
        enforce_eager=rollout.enforce_eager, seed=seed, dtype=dtype,
        enable_prefix_caching=True)
    if on_cuda:
        kwargs["tensor_parallel_size"] = rollout.gpus_per_engine
    if "logprobs_mode" in {f.name for f in dataclasses.fields(EngineArgs)}:
        # Logprobs after temperature/top-k/top-p, as the learner's log_softmax(logits / T).
        kwargs["logprobs_mode"] = "processed_logprobs"
    return kwargs


def _add_lora_from_tensors(worker: Any, request: Any, tensors: dict[str, Any]) -> bool:
    """Runs on each vLLM worker (through `LLM.collective_rpc`): vLLM's own adapter loading (its
    config checks, name mapping and q/k/v packing in `WorkerLoRAManager._load_adapter`), with the
    weights taken from `tensors` instead of a safetensors file at `request.lora_path` (which holds
    only the adapter's config)."""
    import inspect

    manager = worker.model_runner.lora_manager
    loader = manager._lora_model_cls
    weights = {k: v.to(manager.device) for k, v in tensors.items()}
    accepted = inspect.signature(loader.from_lora_tensors).parameters

    class _FromTensors(loader):  # type: ignore[misc, valid-type]
        @classmethod
        def from_local_checkpoint(cls, lora_dir, expected_lora_modules, peft_helper=None,
                                  **kwargs):
            modules = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in weights}
            unexpected = sorted(modules - set(expected_lora_modules))
            if unexpected:
                raise ValueError(f"adapter targets modules {unexpected} that this engine's model "
                                 f"cannot apply LoRA to (expected {sorted(expected_lora_modules)})")
            kwargs = {k: v for k, v in kwargs.items() if k in accepted}
            kwargs["device"] = str(manager.device)
            return loader.from_lora_tensors(tensors=weights, peft_helper=peft_helper, **kwargs)

    manager._lora_model_cls = _FromTensors
    try:
        return manager.add_adapter(request)
    finally:
        manager._lora_model_cls = loader


_DIR_PREFIX = "grpo_ray-adapters-pid"


def _remove_dead_workers_dirs(root: Path) -> None:
    """Delete adapter directories left on tmpfs by worker processes that no longer exist."""
    for d in root.glob(f"{_DIR_PREFIX}*"):
        pid = d.name[len(_DIR_PREFIX):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class RolloutWorker:
    """One vLLM engine (LoRA enabled, one adapter slot) and the adapter version it samples with."""

    def __init__(self, model_path: str, rollout: RolloutConfig, lora: LoraConfig,
                 dtype: str = "auto", seed: int = 0, engine_index: int = 0) -> None:
        import torch

        on_cuda = torch.cuda.is_available()
        # Engine core in this process (unless the placer says otherwise): required inside Ray
        # actors on CPU, and simpler to place and to clean up everywhere.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if not on_cuda:
            # Read by vLLM when the engine starts; whole GiB only.
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(rollout.kv_cache_space_gb)))
        from vllm import LLM

        self.rollout = rollout
        self.engine_index = engine_index
        if dtype == "auto":
            dtype = "bfloat16" if on_cuda else "float32"
        self._dtype = dtype
        self.llm = LLM(model_path, **engine_kwargs(rollout, lora, dtype, seed + engine_index,
                                                   on_cuda))
        # Adapters go to the engine in memory when its workers can be called in this process's
        # engine core; a separate engine-core process would need them pickled: files then.
        self._in_memory = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
        # One engine GPU: unpack straight onto it (one host-to-device copy of the whole buffer).
        self._unpack_device = "cuda" if on_cuda and rollout.gpus_per_engine == 1 else "cpu"
        self._ipc_mapped: Any = None  # the learner's buffer, for CUDA IPC adapters
        self._version = 0
        self._lora_request: Any = None
        root = tmpfs_root()
        _remove_dead_workers_dirs(root)
        self._adapter_root = tempfile.mkdtemp(
            prefix=f"{_DIR_PREFIX}{os.getpid()}-engine{engine_index}-", dir=root)
        # tmpfs is memory: remove the adapters when the worker is closed or collected (a killed
        # actor leaves its directory to the next worker started on the node).
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._adapter_root, True)

    def ready(self) -> bool:
        return True

    def lora_dtype(self) -> str:
        """dtype in which the engine holds LoRA weights (its model dtype): the learner casts to it
        before sending, so that half the bytes travel from an fp32 adapter to a bf16 engine."""
        return self._dtype

    def adapter_version(self) -> int:
        """Version of the adapter the next `generate` samples with (0 = base model)."""
        return self._version

    def generate(self, prompt_ids: list[list[int]], n: int | None = None,
                 temperature: float | None = None, max_tokens: int | None = None,
                 stop: list[str] | None = None, seed: int | None = None) -> Rollout:
        """Sample `n` completions of each prompt with the current adapter, prompt-major.

        Defaults come from the RolloutConfig. `temperature=0` is greedy decoding with one
        completion per prompt (evaluation). A `seed` makes sampling reproducible; prompt i uses
        seed + i so that equal prompts still get different groups.
        """
        from vllm import SamplingParams

        r = self.rollout
        temperature = r.temperature if temperature is None else temperature
        if temperature == 0:
            if n not in (None, 1):
                raise ValueError(f"n={n}: greedy decoding (temperature=0) gives one completion")
            n = 1
        n = r.num_generations if n is None else n
        max_tokens = r.max_completion_length if max_tokens is None else max_tokens
        for i, ids in enumerate(prompt_ids):
            if not ids:
                raise ValueError(f"prompt_ids[{i}] is empty")
        greedy = temperature == 0
        params = [SamplingParams(n=n, temperature=temperature, max_tokens=max_tokens,
                                 top_p=1.0 if greedy else r.top_p, top_k=-1 if greedy else r.top_k,
                                 logprobs=0, stop=stop, include_stop_str_in_output=bool(stop),
                                 seed=None if seed is None else seed + i)
                  for i in range(len(prompt_ids))]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params,
                                    lora_request=self._lora_request, use_tqdm=False)
        out = Rollout([], [], [], [], [], [], self._version)
        for i, (ids, request) in enumerate(zip(prompt_ids, outputs)):
            for c in sorted(request.outputs, key=lambda c: c.index):
                tokens = list(c.token_ids)
                out.prompt_index.append(i)
                out.prompt_ids.append(list(ids))
                out.completion_ids.append(tokens)
                out.completion_texts.append(c.text)
                out.sampling_logprobs.append([float(lp[t].logprob)
                                              for t, lp in zip(tokens, c.logprobs)])
                out.finish_reasons.append("length" if c.finish_reason == "length" else "stop")
        return out

    def score(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[list[float]]:
        """The engine's log-probability of each given completion token after its prompt, under
        the current adapter (at temperature 1): how a test sees that an adapter arrived."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        outputs = self.llm.generate([{"prompt_token_ids": p + c}
                                     for p, c in zip(prompt_ids, completion_ids)],
                                    params, lora_request=self._lora_request, use_tqdm=False)
        return [[float(lp[t].logprob) for t, lp in zip(c, o.prompt_logprobs[len(p):])]
                for p, c, o in zip(prompt_ids, completion_ids, outputs)]

    def load_adapter(self, payload: AdapterPayload | PackedAdapter | CudaIpcAdapter,
                     from_file: bool = False) -> float:
        """Make `payload` the adapter of the next `generate`; returns the seconds it took.

        The tensors go to vLLM's LoRA manager in memory (only the config is written, to tmpfs);
        `from_file` (or an engine core in another process) writes the safetensors file too and
        lets vLLM read it, as plain vLLM does.
        """
        from vllm.lora.request import LoRARequest

        if payload.version <= self._version:
            raise ValueError(f"adapter version {payload.version} is not newer than the engine's "
                             f"current version {self._version}")
        start = time.perf_counter()
        in_memory = self._in_memory and not from_file
        device = self._unpack_device if in_memory else "cpu"
        if isinstance(payload, CudaIpcAdapter):
            # Keep the mapping open across versions (the learner refreshes the same buffer); the
            # engine keeps its own copy, as the learner overwrites that buffer next version.
            self._ipc_mapped = payload.open()
            tensors = split_flat(self._ipc_mapped.to(device, copy=True), payload.names,
                                 payload.shapes)
        elif isinstance(payload, PackedAdapter):
            tensors = payload.tensors(device)
        else:
            tensors = payload.tensors
        path = write_adapter(AdapterPayload(payload.version, tensors, payload.peft_config),
                             os.path.join(self._adapter_root, f"v{payload.version}"),
                             weights=not in_memory)
        request = LoRARequest(f"adapter-v{payload.version}", payload.version, str(path))
        engine = self.llm.llm_engine
        # Add first: a bad adapter raises here and the previous one stays in use.
        added = (all(self.llm.collective_rpc(_add_lora_from_tensors, args=(request, tensors)))
                 if in_memory else engine.add_lora(request))
        if not added:
            raise RuntimeError(f"vLLM refused adapter version {payload.version} at {path}")
        previous = self._lora_request
        self._lora_request, self._version = request, payload.version
        if previous is not None:
            if previous.lora_int_id in engine.list_loras():
                engine.remove_lora(previous.lora_int_id)
            # Loaded into engine memory already; keep only the newest version on tmpfs.
            shutil.rmtree(previous.lora_path, ignore_errors=True)
        return time.perf_counter() - start

    def close(self) -> None:
        """Stop the engine and free its adapter files (a Ray actor is simply killed instead)."""
        engine = getattr(getattr(self, "llm", None), "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        self.llm = None
        self._cleanup()
