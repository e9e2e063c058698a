"""The driver's half of the weight sync: a new adapter version goes from the learner actor to
every rollout engine. The training loop calls only `AdapterBroadcast.sync`; it never sees how
the tensors travel (`weight_sync.sender` makes the payloads, `weight_sync.receiver` loads them).
"""
from __future__ import annotations

import time
import warnings
from typing import Any, Callable


class AdapterBroadcast:
    """Two transports, chosen at the first sync: `cuda-ipc` when every engine computes on the
    learner's GPU (the colocated layout), else `object-store` (a `PackedAdapter` in the engines'
    dtype, one object the engines of a node share). A failing CUDA IPC sync warns once and falls
    back to the object store."""

    def __init__(self) -> None:
        self._dtype: str | None = None  # the engines' LoRA dtype, asked once
        self.transport: str | None = None
        """`cuda-ipc` or `object-store`, once the first sync has chosen."""

    def sync(self, learner: Any, engines: Any, version: int, force: bool = False,
             wait_export: Callable[[Any], None] | None = None) -> dict[str, float]:
        """Export adapter `version` on `learner` (an actor handle) and load it on every engine of
        `engines` (an EngineGroup). `force`: the engines accept an older version too (a learner
        restored from a checkpoint). `wait_export(ref)` waits for the export (default: without a
        deadline); the trainer's waits with one and replaces a learner lost on the way.

        Returns seconds `export_s` (learner side, until the payload is in the object store),
        `load_s` (slowest engine's unpack + register), `total_s`, and `bytes` (the adapter's
        tensors; what the object store holds for `object-store`).
        """
        import ray

        if self.transport is None:
            self._dtype = engines.lora_dtype()
            learner_gpu = ray.get(learner.__ray_call__.remote(_gpu_uuid))
            same_gpu = learner_gpu is not None and set(engines.gpu_uuids()) == {learner_gpu}
            self.transport = "cuda-ipc" if same_gpu else "object-store"
        if self.transport == "cuda-ipc":
            try:
                return self._sync(learner, engines, version, "cuda-ipc", force, wait_export)
            except Exception as e:  # noqa: BLE001 - any failure of IPC: the object store works
                warnings.warn(f"CUDA IPC adapter sync failed, using Ray's object store from now "
                              f"on: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
                self.transport = "object-store"
        return self._sync(learner, engines, version, "packed", force, wait_export)

    def _sync(self, learner: Any, engines: Any, version: int, form: str, force: bool = False,
              wait_export: Callable[[Any], None] | None = None) -> dict[str, float]:
        import ray

        start = time.perf_counter()
        payload_ref = learner.export_adapter.remote(version, form, self._dtype)
        if wait_export is None:
            ray.wait([payload_ref], fetch_local=False)
        else:
            wait_export(payload_ref)
        export_s = time.perf_counter() - start
        load_times = engines.load_adapter(payload_ref, force=force)
        total_s = time.perf_counter() - start
        size = (ray.get(payload_ref).num_bytes if form == "cuda-ipc"  # a small handle
                else _object_bytes(payload_ref))
        return {"export_s": export_s, "load_s": max(load_times, default=0.0),
                "total_s": total_s, "bytes": float(size)}


def _gpu_uuid(actor: Any) -> str | None:
    """Run through `actor.__ray_call__`: the GPU the actor computes on."""
    from grpo_ray.weight_sync.sender import gpu_uuid

    return gpu_uuid()


def _object_bytes(ref: Any) -> int:
    """Serialized size of an object without fetching it to the driver (small inlined objects,
    which the object store does not size, are cheap to fetch)."""
    import ray

    size = ray.experimental.get_object_locations([ref]).get(ref, {}).get("object_size")
    return int(size) if size else ray.get(ref).num_bytes
