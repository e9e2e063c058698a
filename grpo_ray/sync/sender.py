"""The learner's half of the weight sync: the LoRA adapter of a PEFT model as a payload that
travels to the engines (`sync.receiver` is the engines' half, `sync.broadcast` the
driver's). Only the adapter ever travels, never base weights.

Three forms, one per transport; each has `materialize(device) -> {name: tensor}`:
- `AdapterPayload` (contracts): a dict of CPU tensors, for files and checkpoints;
- `PackedAdapter`: the tensors cast to the engines' dtype and laid back to back in one byte
  buffer (a few MB to a few hundred MB). Ray keeps a numpy buffer out of band (one copy into the
  object store, none out of it) where it pickles a dict of torch tensors one by one, ~25x slower;
- `CudaIpcAdapter`: a handle to one buffer in the learner's GPU memory, for engines on that GPU
  (the colocated layout): each engine copies it device to device.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterable

from grpo_ray.contracts import AdapterPayload
from grpo_ray.sync.digest import tensor_digest
from grpo_ray.sync.files import vllm_lora_name


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
    exported = {k: v.detach().to(cast or v.dtype)
                for k, v in _lora_state(peft_model, adapter_name).items()}
    digest = tensor_digest(exported)  # where they live: no extra copy to the host
    # A copy even for CPU tensors: the payload must not alias parameters the optimizer updates.
    tensors = {k: v.to("cpu", copy=True).contiguous() for k, v in exported.items()}
    return AdapterPayload(version=version, tensors=tensors,
                          peft_config=_adapter_config(peft_model, adapter_name), digest=digest)


def lora_modules(names: Iterable[str]) -> int:
    """How many LoRA modules (A/B pairs) an adapter with these tensor names applies to: what
    every engine must serve it on (`RolloutWorker.adapter_identity`)."""
    parts: dict[str, set[str]] = {}
    for name in names:
        prefix, _, rest = name.rpartition(".lora_")
        parts.setdefault(prefix, set()).add(rest[:1])
    return sum(found == {"A", "B"} for found in parts.values())


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
class FlatLayout:
    """An adapter's tensors laid back to back in one buffer: what the buffer holds, in order."""

    version: int
    peft_config: dict[str, Any]
    names: list[str]
    """PEFT-format tensor names, in buffer order."""
    shapes: list[tuple[int, ...]]
    dtype: str
    """torch dtype name of every tensor (`bfloat16`, `float32`)."""
    digest: str
    """`sync.digest.tensor_digest` of the tensors, computed by the learner on its device:
    what each engine must report after loading them (`RolloutWorker.adapter_identity`)."""


@dataclass
class PackedAdapter(FlatLayout):
    """An adapter as one flat byte buffer and its layout: the form AdapterSync ships.

    Ray stores a numpy buffer out of band, so sending it costs one copy into the object store
    and reading it none (the reader maps it); a dict of torch tensors is pickled tensor by tensor
    instead (240 MB on 2 CPU cores: 32 ms put + 4 ms get, against 870 + 150 ms).
    """

    buffer: Any
    """numpy uint8 array: the tensors' bytes back to back."""

    @property
    def num_bytes(self) -> int:
        return int(self.buffer.nbytes)

    def materialize(self, device: str = "cpu") -> dict[str, Any]:
        """name -> tensor, views of one copy of the buffer on `device` (no copy on the CPU,
        one host-to-device copy otherwise)."""
        import torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only when mapped from the object store
            flat = torch.from_numpy(self.buffer)
        return split_flat(flat.to(device).view(getattr(torch, self.dtype)), self.names, self.shapes)

    def payload(self) -> AdapterPayload:
        return AdapterPayload(self.version, self.materialize("cpu"), self.peft_config, self.digest)


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
    shapes = [tuple(t.shape) for t in tensors.values()]
    digest = tensor_digest(split_flat(flat, names, shapes))  # on the learner's device
    if flat.device.type != "cpu":
        host = torch.empty(flat.shape, dtype=cast, pin_memory=True)
        host.copy_(flat)
        flat = host
    return PackedAdapter(version, peft_config, names, shapes, str(cast).removeprefix("torch."),
                         digest, flat.view(torch.uint8).numpy())


def packed_adapter(peft_model: Any, version: int, dtype: str | None = None,
                   adapter_name: str = "default") -> PackedAdapter:
    """`adapter_payload` in the packed form that AdapterSync ships."""
    return pack_tensors(_lora_state(peft_model, adapter_name), version,
                        _adapter_config(peft_model, adapter_name), dtype)


@dataclass
class CudaIpcAdapter(FlatLayout):
    """An adapter left in the learner's GPU memory for engines on the same GPU (the colocated
    layout): only a CUDA IPC handle to the buffer travels, and each engine copies the buffer
    device to device. About 200 ms through the object store become a few ms for rank 64 on 3B."""

    device_uuid: str
    """UUID of the GPU that holds the buffer; a reader elsewhere refuses it."""
    handle: tuple[Any, tuple[Any, ...]]
    """`torch.multiprocessing`'s reduction of the buffer: (rebuild function, its arguments)."""
    num_bytes: int

    def materialize(self, device: str = "cuda") -> dict[str, Any]:
        """name -> tensor, views of this process's own copy of the learner's buffer on `device`
        (the learner overwrites its buffer with the next version)."""
        global _ipc_mapping
        uuid_here = gpu_uuid()
        if uuid_here != self.device_uuid:
            raise ValueError(f"CUDA IPC adapter of GPU {self.device_uuid} cannot be read on "
                             f"{uuid_here or 'a process without a GPU'}")
        rebuild, args = self.handle
        # keep the mapping open across versions: the learner refreshes the same buffer
        _ipc_mapping = rebuild(*args)
        return split_flat(_ipc_mapping.to(device, copy=True), self.names, self.shapes)


_ipc_mapping: Any = None
"""The learner's CUDA IPC buffer as mapped into this (engine) process, kept open."""


def lora_parameters(peft_model: Any, adapter_name: str = "default") -> dict[str, Any] | None:
    """PEFT-format name -> the LoRA `Parameter` that `get_peft_model_state_dict` reads it from,
    found once; None where a tensor of the state dict is not a parameter's own storage (a
    derived tensor: then the state dict must be built each time).

    Ours because the sync runs every step: `get_peft_model_state_dict` walks the whole model's
    state dict on every call (on a 4-bit model it packs every layer's quantization state into
    tensors: 101 ms of each sync for the 3B learner on an H200, docs/benchmarks.md), while the
    adapter's parameters stay the same objects for the learner's life: the optimizer and a
    checkpoint restore (`load_state_dict`) write into them in place."""
    state = _lora_state(peft_model, adapter_name)
    by_storage = {(p.data_ptr(), tuple(p.shape), p.dtype): p for p in peft_model.parameters()}
    params = {name: by_storage.get((t.data_ptr(), tuple(t.shape), t.dtype))
              for name, t in state.items()}
    return None if any(p is None for p in params.values()) else params


class CudaIpcExport:
    """The learner's side of CUDA IPC: one persistent GPU buffer, refreshed in place for every
    version (engines read it before the next version is written: `sync` is sequential), from
    the adapter's parameters found at the first export (`lora_parameters`)."""

    def __init__(self) -> None:
        self.buffer: Any = None
        self._model: Any = None
        self._params: dict[str, Any] | None = None

    def export(self, peft_model: Any, version: int, dtype: str,
               adapter_name: str = "default") -> CudaIpcAdapter:
        import torch
        from torch.multiprocessing.reductions import reduce_tensor

        if peft_model is not self._model:
            self._model, self._params = peft_model, lora_parameters(peft_model, adapter_name)
        state = ({k: p.detach() for k, p in self._params.items()} if self._params is not None
                 else _lora_state(peft_model, adapter_name))
        device = next(iter(state.values())).device
        if device.type != "cuda":
            raise ValueError(f"CUDA IPC needs the adapter on a GPU, it is on {device}")
        cast, size = getattr(torch, dtype), sum(t.numel() for t in state.values())
        if self.buffer is None or self.buffer.numel() != size or self.buffer.dtype != cast:
            self.buffer = torch.empty(size, dtype=cast, device=device)
        with torch.no_grad():  # one call: cast and copy every tensor into the buffer
            torch.cat([t.reshape(-1) for t in state.values()], out=self.buffer)
        names, shapes = list(state), [tuple(t.shape) for t in state.values()]
        digest = tensor_digest(split_flat(self.buffer, names, shapes))
        torch.cuda.synchronize(device)  # engines read the buffer as soon as this returns
        return CudaIpcAdapter(version, _adapter_config(peft_model, adapter_name), names, shapes,
                              dtype, digest, gpu_uuid(device), reduce_tensor(self.buffer),
                              size * self.buffer.element_size())


def gpu_uuid(device: Any = None) -> str | None:
    """UUID of this process's current (or the given) CUDA device; None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    return str(torch.cuda.get_device_properties(
        torch.cuda.current_device() if device is None else device).uuid)
