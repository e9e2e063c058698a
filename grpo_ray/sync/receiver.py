"""The engines' half of the weight sync: a new adapter version goes into a live vLLM engine, in
memory, and becomes the adapter of the next `generate` (`sync.sender` makes the payloads,
`sync.broadcast` moves them).

vLLM's own adapter loading does the work (its config checks, name mapping and q/k/v packing in
`WorkerLoRAManager._load_adapter`), with the weights taken from memory instead of a safetensors
file: only the adapter's config is written, to tmpfs (`/dev/shm`), where vLLM reads it. An engine
core in another process (or `from_file`) writes the weights too and lets vLLM read the file, as
plain vLLM does. On vLLM's workers this runs as methods of `LoraExtension` (vLLM's
`worker_extension_cls`); no public API of vLLM takes an adapter from memory, so the one private
step is `internals.vllm_add_lora_from_tensors`. After every load the engine reports how many LoRA
modules vLLM bound, read back from vLLM (`served_modules`): an adapter whose names match none of
the model's modules binds none, however right its digest.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any

from grpo_ray.contracts import AdapterPayload
from grpo_ray.sync.digest import tensor_digest
from grpo_ray.sync.files import tmpfs_root, write_adapter

_DIR_PREFIX = "grpo_ray-adapters-pid"


class VllmAdapterSlot:
    """One vLLM engine's adapter slot: the LoRA request that `generate` passes (None = the base
    model), its version and digest. A new version is added before the old one is removed, so a
    bad adapter raises and the previous one stays in use."""

    def __init__(self, llm: Any, engine_index: int, in_memory: bool, device: str) -> None:
        self.llm, self.in_memory, self.device = llm, in_memory, device
        self.version = 0
        self.digest: str | None = None
        """`tensor_digest` of the tensors handed to vLLM for `version` (None: the base model)."""
        self.request: Any = None
        root = tmpfs_root()
        _remove_dead_workers_dirs(root)
        self._root = tempfile.mkdtemp(
            prefix=f"{_DIR_PREFIX}{os.getpid()}-engine{engine_index}-", dir=root)
        # tmpfs is memory: remove the adapters when the slot is closed or collected (a killed
        # actor leaves its directory to the next engine started on the node).
        self.close = weakref.finalize(self, shutil.rmtree, self._root, True)

    def load(self, payload: Any, from_file: bool = False, reload: bool = False,
             force: bool = False) -> float:
        """Make `payload` (any form with `version`, `peft_config`, `materialize(device)`) the
        adapter of the next `generate`; returns the seconds it took. `reload` loads the current
        version again (the sync probe's repair of an engine whose weights disagree). `force`
        accepts any version, an older one included (a learner restored from a checkpoint), and
        None: the base model, version 0."""
        from vllm.lora.request import LoRARequest

        engine = self.llm.llm_engine
        if force:  # drop what the engine holds; its cached prefixes came from those weights
            start = time.perf_counter()
            if self.request is not None:
                engine.remove_lora(self.request.lora_int_id)
                shutil.rmtree(self.request.lora_path, ignore_errors=True)
            self.request, self.version, self.digest = None, 0, None
            self.llm.reset_prefix_cache()
            if payload is None:
                return time.perf_counter() - start
        elif reload:
            if payload.version != self.version:
                raise ValueError(f"reload: adapter version {payload.version} is not the engine's "
                                 f"current version {self.version}")
            # vLLM holds one adapter per id: drop the suspect copy first (until the new one is
            # in, the slot says version 0, so a failed reload cannot pass as version N)
            if payload.version in engine.list_loras():  # LoRA ids are versions
                engine.remove_lora(payload.version)
            self.request, self.version, self.digest = None, 0, None
            # cached prefixes were computed with the suspect weights under the same adapter id
            self.llm.reset_prefix_cache()
        elif payload.version <= self.version:
            raise ValueError(f"adapter version {payload.version} is not newer than the engine's "
                             f"current version {self.version}")
        start = time.perf_counter()
        in_memory = self.in_memory and not from_file
        tensors = payload.materialize(self.device if in_memory else "cpu")
        digest = tensor_digest(tensors)  # of exactly what vLLM gets, on the engine's device
        path = write_adapter(AdapterPayload(payload.version, tensors, payload.peft_config),
                             os.path.join(self._root, f"v{payload.version}"),
                             weights=not in_memory)
        request = LoRARequest(f"adapter-v{payload.version}", payload.version, str(path))
        added = (all(self.llm.collective_rpc("grpo_add_lora", args=(request, tensors)))
                 if in_memory else engine.add_lora(request))
        if not added:
            raise RuntimeError(f"vLLM refused adapter version {payload.version} at {path}")
        previous, self.request = self.request, request
        self.version, self.digest = payload.version, digest
        if previous is not None:
            if previous.lora_int_id in engine.list_loras():
                engine.remove_lora(previous.lora_int_id)
            # loaded into engine memory already; keep only the newest version on tmpfs
            shutil.rmtree(previous.lora_path, ignore_errors=True)
        return time.perf_counter() - start

    def served_modules(self) -> int:
        """How many LoRA modules (A/B pairs) the adapter of the next `generate` applies, read back
        from vLLM's LoRA manager now (`LoraExtension.grpo_bound_modules`): an adapter whose
        names match none of the model's modules binds none. 0 for the base model."""
        if self.request is None:
            return 0
        return min(self.llm.collective_rpc("grpo_bound_modules",
                                           args=(self.request.lora_int_id,)))


class LoraExtension:
    """Methods of vLLM's workers in a LoRA engine (mixed in through `worker_extension_cls`,
    called by `collective_rpc` name)."""

    def grpo_add_lora(self, request: Any, tensors: dict[str, Any]) -> bool:
        """vLLM's own adapter loading with the weights from `tensors`
        (`internals.vllm_add_lora_from_tensors`)."""
        from grpo_ray.internals import vllm_add_lora_from_tensors

        return vllm_add_lora_from_tensors(self, request, tensors)

    def grpo_bound_modules(self, lora_id: int) -> int:
        """How many LoRA modules vLLM bound for adapter `lora_id`
        (`internals.vllm_lora_bound_modules`)."""
        from grpo_ray.internals import vllm_lora_bound_modules

        return vllm_lora_bound_modules(self.get_model(), lora_id)  # type: ignore[attr-defined]


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
