"""Send only the LoRA adapter from the learner to every rollout engine.

Transport: Ray's object store, in memory. The learner returns an `AdapterPayload` (the LoRA
tensors and the adapter config, a few MB to a few hundred MB); the driver passes the *reference*
to every engine, so Ray ships the tensors once per node and the driver never holds them. No base
weights ever move. vLLM loads LoRA adapters from a directory, so each engine writes the payload
to tmpfs (`/dev/shm`, else the temp dir) in PEFT format and registers it with its engine.

Names: vLLM reads PEFT's format as-is (`base_model.model.<module>.lora_A.weight`; it strips the
`base_model.model.` prefix and packs q/k/v and gate/up itself), so `vllm_lora_name` is the
identity on PEFT's names plus a check of their format.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

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


def adapter_payload(peft_model: Any, version: int,
                    adapter_name: str = "default") -> AdapterPayload:
    """Snapshot the adapter of a PEFT model: its LoRA tensors (CPU copies, dtype kept), config."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    # A copy even for CPU tensors: the payload must not alias parameters the optimizer updates.
    tensors = {vllm_lora_name(k): v.detach().to("cpu", copy=True).contiguous()
               for k, v in state.items()}
    if not tensors:
        raise ValueError(f"adapter {adapter_name!r} has no LoRA tensors")
    config = json.loads(json.dumps(peft_model.peft_config[adapter_name].to_dict(),
                                   default=_jsonable))
    config["inference_mode"] = True  # what PeftModel.save_pretrained writes
    return AdapterPayload(version=version, tensors=tensors, peft_config=config)


def write_adapter(payload: AdapterPayload, directory: str | Path) -> Path:
    """Write `adapter_model.safetensors` + `adapter_config.json` (PEFT format) into `directory`.

    Atomic for readers: the files are written into a temporary sibling directory that is then
    renamed into place, so `directory` is either absent, the previous complete adapter, or the new
    complete one; a failed write leaves the previous one untouched and no temporary behind.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        save_file({vllm_lora_name(k): v for k, v in payload.tensors.items()},
                  str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(payload.peft_config, indent=2, sort_keys=True))
        if directory.exists():
            # rename() cannot replace a non-empty directory: move the old one aside first.
            old = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(directory, old)
            os.rename(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def tmpfs_root() -> Path:
    """`/dev/shm` where it is a writable directory (memory-backed), else the temp dir."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm
    return Path(tempfile.gettempdir())


class AdapterBroadcast:
    """Moves a new adapter version from the learner actor to every rollout engine actor.

    The training loop calls only `sync`; it never sees how the tensors travel.
    """

    def sync(self, learner: Any, engines: list, version: int) -> dict[str, float]:
        """Export adapter `version` on `learner` and load it on every engine (Ray actor handles).

        Returns seconds `export_s` (learner side, until the payload is in the object store),
        `load_s` (slowest engine's write + register), `total_s`, and `bytes` (serialized payload).
        """
        import ray

        start = time.perf_counter()
        payload_ref = learner.export_adapter.remote(version)
        ray.wait([payload_ref], fetch_local=False)
        export_s = time.perf_counter() - start
        load_times = ray.get([e.load_adapter.remote(payload_ref) for e in engines])
        total_s = time.perf_counter() - start
        return {"export_s": export_s, "load_s": max(load_times, default=0.0),
                "total_s": total_s, "bytes": float(_object_bytes(payload_ref))}


def _object_bytes(ref: Any) -> int:
    """Serialized size of an object without fetching it to the driver (small inlined objects,
    which the object store does not size, are cheap to fetch)."""
    import ray

    size = ray.experimental.get_object_locations([ref]).get(ref, {}).get("object_size")
    return int(size) if size else ray.get(ref).num_bytes
