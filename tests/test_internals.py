"""The private parts of vLLM and Ray that grpo-ray relies on (`grpo_ray.internals`), run against
the installed versions: each test fails naming the attribute or variable that moved."""
from __future__ import annotations

import inspect
import sys

import pytest
import ray.cloudpickle

from grpo_ray.internals import MovedInternal, vllm_lora_bound_modules

# Ray's workers cannot import this test module: ship its functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_a_missing_internal_is_named_with_the_installed_version():
    import vllm

    with pytest.raises(MovedInternal, match=rf"^vllm {vllm.__version__}: object.lora_manager "
                                            "is not there any more"):
        vllm_lora_bound_modules(object(), 1)


def _lora_manager_facts(worker) -> dict:
    manager = worker.model_runner.lora_manager
    return {"loader": hasattr(manager, "_lora_model_cls"),
            "load_source": inspect.getsource(type(manager)._load_adapter)}


def test_vllm_loads_adapters_through_the_model_class_that_is_swapped(served_engine):
    """`vllm_add_lora_from_tensors` replaces `WorkerLoRAManager._lora_model_cls` for one load:
    vLLM must still build adapters through its `from_local_checkpoint`."""
    (facts,) = served_engine.worker.llm.collective_rpc(_lora_manager_facts)
    assert facts["loader"], "vLLM's WorkerLoRAManager has no _lora_model_cls any more"
    assert "self._lora_model_cls.from_local_checkpoint(" in facts["load_source"], (
        "vLLM's WorkerLoRAManager._load_adapter no longer builds adapters through "
        "self._lora_model_cls.from_local_checkpoint: grpo_ray.internals."
        "vllm_add_lora_from_tensors would load nothing from memory")


def _bound(worker, lora_id: int) -> int:
    return vllm_lora_bound_modules(worker.get_model(), lora_id)


def test_an_adapter_added_from_memory_is_bound_to_every_module_it_names(served_engine,
                                                                       tiny_model_path):
    """Through the two internals: 14 modules (2 layers x 7 projections; q/k/v and gate/up
    packed by vLLM) bound while the adapter holds a slot, none once vLLM removed it."""
    from helpers import peft_model

    from grpo_ray.sync.sender import packed_adapter

    w = served_engine.worker
    model = peft_model(tiny_model_path, seed=5)
    version = served_engine.load(packed_adapter(model, served_engine.next_version, "float32"),
                                 model)  # in memory: `grpo_add_lora`
    assert w.adapter.in_memory
    assert w.llm.collective_rpc(_bound, args=(version,)) == [14]
    assert w.llm.collective_rpc(_bound, args=(version + 100,)) == [0]  # no such adapter


class _Printer:
    def say(self, text: str) -> int:
        import os

        print(text, flush=True)
        return os.getpid()


def test_ray_runs_the_setup_hook_that_its_private_variable_names(ray_local, tmp_path):
    """The hook the private variable names runs in an actor's process before anything else
    (its output lands in the log file); the public key in an actor's runtime_env still does not
    run it (once it does, `internals.ray_setup_hook_env` should give way to it)."""
    from grpo_ray.logs import LOG_DIR_ENV, LOG_NAME_ENV, actor_env_vars, worker_logs_in

    printer = ray_local.remote(_Printer)
    with worker_logs_in(tmp_path / "logs") as log_dir:
        private = {"env_vars": actor_env_vars({}, "private")}
    public = {"worker_process_setup_hook": "grpo_ray.logs.redirect_output",
              "env_vars": {LOG_DIR_ENV: str(log_dir), LOG_NAME_ENV: "public"}}
    actors = [printer.options(num_cpus=0, runtime_env=env).remote() for env in (private, public)]
    pids = ray_local.get([a.say.remote(f"from the {n} actor") for a, n in
                          zip(actors, ("private", "public"))], timeout=120)
    for actor in actors:
        ray_local.kill(actor)
    written = {p.name: p.read_text() for p in log_dir.iterdir()}
    assert "from the private actor" in written.get(f"private-{pids[0]}.log", "").splitlines(), (
        f"Ray no longer runs the setup hook named by its private variable "
        f"(grpo_ray.internals.ray_setup_hook_env): files {sorted(written)}")
    assert f"public-{pids[1]}.log" not in written, (
        "Ray now runs worker_process_setup_hook from an actor's runtime_env: use that public key "
        "instead of the private variable (grpo_ray.internals.ray_setup_hook_env)")


def test_ray_lists_no_draining_node_in_a_healthy_cluster(ray_local):
    """`ray_draining_nodes` reads the GCS's draining list (a drained node's case runs in
    tests/cluster/test_elastic.py, on a cluster of several nodes)."""
    from grpo_ray.internals import ray_draining_nodes

    assert ray_draining_nodes() == set()
    assert ray_local.nodes()[0]["Alive"]
