"""Send only the LoRA adapter from the learner to every rollout engine.

Transport: Ray's object store, in memory. The learner returns a `PackedAdapter` (the LoRA
tensors cast to the engines' dtype and laid back to back in one byte buffer, plus the adapter
config: a few MB to a few hundred MB); the driver passes the *reference* to every engine, so Ray
ships it once per node and the driver never holds it. One buffer matters: Ray keeps a numpy buffer
out of band (one copy into the object store, none out of it) where it pickles a dict of torch
tensors one by one, ~25x slower. No base weights ever move. Each engine hands the tensors to
vLLM's LoRA manager in memory (`RolloutWorker.load_adapter`); only the adapter's config is
written, to tmpfs (`/dev/shm`, else the temp dir), where vLLM reads it.

Names: vLLM reads PEFT's format as-is (`base_model.model.<module>.lora_A.weight`; it strips the
`base_model.model.` prefix and packs q/k/v and gate/up itself), so `vllm_lora_name` is the
identity on PEFT's names plus a check of their format.
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpo_ray.atomic import replace_directory
from grpo_ray.contracts import AdapterPayload

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
_LORA_NAME = re.compile(r"^base_model\.model\.(?P<module>[\w.]+?)\.lora_(?P<ab>[AB])\.weight$")


def vllm_lora_name(peft_name: str) -> str:
    """PEFT's state-dict name of a LoRA tensor -> the name vLLM's loader expects (the same).

    Raises ValueError for anything that is not `base_model.model.<module>.lora_{A,B}.weight`
    (a `modules_to_save` copy, a bias, DoRA's magnitude, an unstripped adapter name such as
    `.lora_A.default.weight`): vLLM would reject or silently ignore it.
    """
    if not _LORA_NAME.match(peft_name):
        raise ValueError(f"{peft_name}: not a LoRA tensor name "
                         "(expected base_model.model.<module>.lora_A.weight / .lora_B.weight)")
    return peft_name


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):  # target_modules is a set once PEFT resolved it
        return sorted(value, key=str)
    raise TypeError(f"adapter config value {value!r} ({type(value).__name__}) is not JSON-able")


def adapter_payload(peft_model: Any, version: int, adapter_name: str = "default",
                    dtype: str | None = None) -> AdapterPayload:
    """Snapshot the adapter of a PEFT model: its LoRA tensors (CPU copies, in `dtype`, a torch
    dtype name, cast where they live; None keeps theirs) and config."""
    import torch

    cast = getattr(torch, dtype) if dtype else None
    # A copy even for CPU tensors: the payload must not alias parameters the optimizer updates.
    tensors = {k: v.detach().to(cast or v.dtype).to("cpu", copy=True).contiguous()
               for k, v in _lora_state(peft_model, adapter_name).items()}
    return AdapterPayload(version=version, tensors=tensors,
                          peft_config=_adapter_config(peft_model, adapter_name))


def _lora_state(peft_model: Any, adapter_name: str) -> dict[str, Any]:
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    if not state:
        raise ValueError(f"adapter {adapter_name!r} has no LoRA tensors")
    return {vllm_lora_name(k): v for k, v in state.items()}


def _adapter_config(peft_model: Any, adapter_name: str) -> dict[str, Any]:
    config = json.loads(json.dumps(peft_model.peft_config[adapter_name].to_dict(),
                                   default=_jsonable))
    config["inference_mode"] = True  # what PeftModel.save_pretrained writes
    return config


@dataclass
class PackedAdapter:
    """An adapter as one flat byte buffer and its layout: the form AdapterBroadcast ships.

    Ray stores a numpy buffer out of band, so sending it costs one copy into the object store
    and reading it none (the reader maps it); a dict of torch tensors is pickled tensor by tensor
    instead (240 MB on 2 CPU cores: 32 ms put + 4 ms get, against 870 + 150 ms).
    """

    version: int
    peft_config: dict[str, Any]
    names: list[str]
    """PEFT-format tensor names, in buffer order."""
    shapes: list[tuple[int, ...]]
    dtype: str
    """torch dtype name of every tensor (`bfloat16`, `float32`)."""
    buffer: Any
    """numpy uint8 array: the tensors' bytes back to back."""

    @property
    def num_bytes(self) -> int:
        return int(self.buffer.nbytes)

    def tensors(self, device: str = "cpu") -> dict[str, Any]:
        """name -> tensor, views of one copy of the buffer on `device` (no copy on the CPU,
        one host-to-device copy otherwise)."""
        import torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only when mapped from the object store
            flat = torch.from_numpy(self.buffer)
        return split_flat(flat.to(device).view(getattr(torch, self.dtype)), self.names, self.shapes)

    def payload(self) -> AdapterPayload:
        return AdapterPayload(self.version, self.tensors("cpu"), self.peft_config)


def split_flat(flat: Any, names: list[str], shapes: list[tuple[int, ...]]) -> dict[str, Any]:
    """name -> view of the 1-D tensor `flat`, the tensors laid back to back in `names` order."""
    out, offset = {}, 0
    for name, shape in zip(names, shapes):
        size = math.prod(shape)
        out[name] = flat[offset:offset + size].view(shape)
        offset += size
    return out


def pack_tensors(tensors: dict[str, Any], version: int, peft_config: dict[str, Any],
                 dtype: str | None = None) -> PackedAdapter:
    """Cast the tensors to `dtype` where they live (on the GPU: before the copy, halving it for
    fp32 -> bf16), concatenate them and copy the result to the CPU once (pinned from CUDA)."""
    import torch

    if not tensors:
        raise ValueError("pack_tensors: no tensors")
    names = [vllm_lora_name(k) for k in tensors]
    cast = getattr(torch, dtype) if dtype else next(iter(tensors.values())).dtype
    # cat copies: the buffer never aliases parameters the optimizer updates
    flat = torch.cat([t.detach().reshape(-1).to(cast) for t in tensors.values()])
    if flat.device.type != "cpu":
        host = torch.empty(flat.shape, dtype=cast, pin_memory=True)
        host.copy_(flat)
        flat = host
    return PackedAdapter(version, peft_config, names, [tuple(t.shape) for t in tensors.values()],
                         str(cast).removeprefix("torch."), flat.view(torch.uint8).numpy())


def packed_adapter(peft_model: Any, version: int, dtype: str | None = None,
                   adapter_name: str = "default") -> PackedAdapter:
    """`adapter_payload` in the packed form that AdapterBroadcast ships."""
    return pack_tensors(_lora_state(peft_model, adapter_name), version,
                        _adapter_config(peft_model, adapter_name), dtype)


@dataclass
class CudaIpcAdapter:
    """An adapter left in the learner's GPU memory for engines on the same GPU (the colocated
    layout): only a CUDA IPC handle to the buffer travels, and each engine copies the buffer
    device to device. About 200 ms through the object store become a few ms for rank 64 on 3B."""

    version: int
    peft_config: dict[str, Any]
    names: list[str]
    shapes: list[tuple[int, ...]]
    dtype: str
    device_uuid: str
    """UUID of the GPU that holds the buffer; a reader elsewhere refuses it."""
    handle: tuple[Any, tuple[Any, ...]]
    """`torch.multiprocessing`'s reduction of the buffer: (rebuild function, its arguments)."""
    num_bytes: int

    def open(self) -> Any:
        """The learner's buffer, mapped into this process (no copy; read it before the learner's
        next export overwrites it)."""
        uuid_here = gpu_uuid()
        if uuid_here != self.device_uuid:
            raise ValueError(f"CUDA IPC adapter of GPU {self.device_uuid} cannot be read on "
                             f"{uuid_here or 'a process without a GPU'}")
        rebuild, args = self.handle
        return rebuild(*args)


class CudaIpcExport:
    """The learner's side of CUDA IPC: one persistent GPU buffer, refreshed in place for every
    version (engines read it before the next version is written: `sync` is sequential)."""

    def __init__(self) -> None:
        self.buffer: Any = None

    def export(self, peft_model: Any, version: int, dtype: str,
               adapter_name: str = "default") -> CudaIpcAdapter:
        import torch
        from torch.multiprocessing.reductions import reduce_tensor

        state = _lora_state(peft_model, adapter_name)
        device = next(iter(state.values())).device
        if device.type != "cuda":
            raise ValueError(f"CUDA IPC needs the adapter on a GPU, it is on {device}")
        cast, size = getattr(torch, dtype), sum(t.numel() for t in state.values())
        if self.buffer is None or self.buffer.numel() != size or self.buffer.dtype != cast:
            self.buffer = torch.empty(size, dtype=cast, device=device)
        offset = 0
        with torch.no_grad():
            for t in state.values():
                self.buffer[offset:offset + t.numel()].copy_(t.reshape(-1))
                offset += t.numel()
        torch.cuda.synchronize(device)  # engines read the buffer as soon as this returns
        return CudaIpcAdapter(version, _adapter_config(peft_model, adapter_name), list(state),
                              [tuple(t.shape) for t in state.values()], dtype,
                              gpu_uuid(device), reduce_tensor(self.buffer),
                              size * self.buffer.element_size())


def gpu_uuid(device: Any = None) -> str | None:
    """UUID of this process's current (or the given) CUDA device; None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    return str(torch.cuda.get_device_properties(
        torch.cuda.current_device() if device is None else device).uuid)


def _actor_gpu_uuid(actor: Any) -> str | None:
    """Run through `actor.__ray_call__`: the GPU the actor computes on."""
    return gpu_uuid()


def write_adapter(payload: AdapterPayload, directory: str | Path, weights: bool = True) -> Path:
    """Write `adapter_model.safetensors` + `adapter_config.json` (PEFT format) into `directory`
    (only the config with `weights=False`: an engine that takes the tensors from memory).

    Atomic for readers: the files are written into a temporary sibling directory that is then
    renamed into place, so `directory` is either absent, the previous complete adapter, or the new
    complete one; a failed write leaves the previous one untouched and no temporary behind.
    """
    from safetensors.torch import save_file

    def fill(tmp: Path) -> None:
        if weights:
            save_file({vllm_lora_name(k): v for k, v in payload.tensors.items()},
                      str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(payload.peft_config, indent=2, sort_keys=True))

    return replace_directory(directory, fill)



def read_adapter(directory: str | Path, version: int = 1) -> AdapterPayload:
    """The inverse of `write_adapter`: a PEFT-format adapter directory (ours, or any PEFT
    `save_pretrained` of a LoRA adapter) as a payload of the given version, CPU tensors."""
    from safetensors.torch import load_file

    directory = Path(directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory}: no {name} (not a PEFT adapter directory)")
    config = json.loads((directory / CONFIG_NAME).read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{directory / CONFIG_NAME}: peft_type {config.get('peft_type')!r}, "
                         "only LoRA adapters can be loaded")
    tensors = {vllm_lora_name(k): v for k, v in load_file(str(directory / WEIGHTS_NAME)).items()}
    return AdapterPayload(version=version, tensors=tensors, peft_config=config)

def tmpfs_root() -> Path:
    """`/dev/shm` where it is a writable directory (memory-backed), else the temp dir."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm
    return Path(tempfile.gettempdir())


class AdapterBroadcast:
    """Moves a new adapter version from the learner actor to every rollout engine actor.

    The training loop calls only `sync`; it never sees how the tensors travel.

    Two transports, chosen at the first sync: `cuda-ipc` when every engine computes on the
    learner's GPU (the colocated layout), else `object-store` (a `PackedAdapter` in the engines'
    dtype). A failing CUDA IPC sync warns once and falls back to the object store.
    """

    def __init__(self) -> None:
        self._dtype: str | None = None  # the engines' LoRA dtype, asked once
        self.transport: str | None = None
        """`cuda-ipc` or `object-store`, once the first sync has chosen."""

    def sync(self, learner: Any, engines: list, version: int) -> dict[str, float]:
        """Export adapter `version` on `learner` and load it on every engine (Ray actor handles).

        Returns seconds `export_s` (learner side, until the payload is in the object store),
        `load_s` (slowest engine's unpack + register), `total_s`, and `bytes` (the adapter's
        tensors; what the object store holds for `object-store`).
        """
        import ray

        if self.transport is None:
            self._dtype = ray.get(engines[0].lora_dtype.remote()) if engines else None
            uuids = ray.get([a.__ray_call__.remote(_actor_gpu_uuid)
                             for a in [learner, *engines]])
            same_gpu = bool(engines) and uuids[0] is not None and len(set(uuids)) == 1
            self.transport = "cuda-ipc" if same_gpu else "object-store"
        if self.transport == "cuda-ipc":
            try:
                return self._sync(learner.export_cuda_ipc_adapter, engines, version)
            except Exception as e:  # noqa: BLE001 - any failure of IPC: the object store works
                warnings.warn(f"CUDA IPC adapter sync failed, using Ray's object store from now "
                              f"on: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
                self.transport = "object-store"
        return self._sync(learner.export_packed_adapter, engines, version)

    def _sync(self, export: Any, engines: list, version: int) -> dict[str, float]:
        import ray

        start = time.perf_counter()
        payload_ref = export.remote(version, self._dtype)
        ray.wait([payload_ref], fetch_local=False)
        export_s = time.perf_counter() - start
        load_times = ray.get([e.load_adapter.remote(payload_ref) for e in engines])
        total_s = time.perf_counter() - start
        size = (ray.get(payload_ref).num_bytes if self.transport == "cuda-ipc"  # a small handle
                else _object_bytes(payload_ref))
        return {"export_s": export_s, "load_s": max(load_times, default=0.0),
                "total_s": total_s, "bytes": float(size)}


def _object_bytes(ref: Any) -> int:
    """Serialized size of an object without fetching it to the driver (small inlined objects,
    which the object store does not size, are cheap to fetch)."""
    import ray

    size = ray.experimental.get_object_locations([ref]).get(ref, {}).get("object_size")
    return int(size) if size else ray.get(ref).num_bytes
