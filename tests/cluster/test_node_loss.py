"""A whole training run on a real local multi-node Ray cluster (`ray.cluster_utils.Cluster`, CPU
only): a head with no CPUs (the driver: this test) and two worker nodes. The run's own placement
(`cluster.placement_strategy=SPREAD`) puts the learner on one node and the engine on the other.
Mid-run the engine's node is killed (its raylet and every process on it, SIGKILL): the engine
comes back on the surviving node in its own placement bundle, which Ray places again there, and
the run finishes with the adapter of an uninterrupted run on the same cluster.

The sync between the nodes uses no path that the other node would have to see: the adapter
travels through Ray's object store (`PackedAdapter`, bytes), and the only file an engine reads
(the adapter's config, on tmpfs) is written by the engine's own process on its own node.
"""
from __future__ import annotations

import os
import sys
import threading
import time

import pytest
import ray
import torch
from ray.cluster_utils import Cluster
from safetensors.torch import load_file

from grpo_ray.config import load_config
from grpo_ray.driver.trainer import Trainer
from grpo_ray.sync.sender import PackedAdapter

STEPS = 6


def _where(actor) -> dict:
    """Run in an actor (`__ray_call__`): its node, process, and the adapter file it serves."""
    request = getattr(getattr(actor, "adapter", None), "request", None)
    return {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
            "lora_path": None if request is None else request.lora_path}


# test modules are not importable on Ray's workers: ship this one's functions by value
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def where(actor) -> dict:
    return ray.get(actor.__ray_call__.remote(_where))


@pytest.fixture(scope="module")
def three_nodes():
    ray.shutdown()  # the session's local Ray, if a module before this one started it
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


def build(out, model_path, lines: list) -> Trainer:
    cfg = load_config("configs/tiny-cpu.yaml", [
        f"output.dir={out}", f"model.path={model_path}", f"algorithm.total_steps={STEPS}",
        "cluster.placement_strategy=SPREAD", "output.save_every=2", "learner.warmup_ratio=0",
        "learner.learning_rate=5e-3", "logging.tensorboard=false", "logging.progress_bar=false",
        "eval.num_samples=2"])

    def stamped(line: str) -> None:
        lines.append((time.monotonic(), line))
    return Trainer(cfg, print_fn=stamped).setup()


def lora_of(out) -> dict:
    return load_file(out / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow
def test_the_engines_node_is_lost_mid_run_and_the_run_finishes(three_nodes, tiny_model_path,
                                                                tmp_path):
    cluster, workers = three_nodes
    # the run to match, uninterrupted, on the same cluster
    a = build(tmp_path / "a", tiny_model_path, [])
    try:
        a.fit()
    finally:
        a.close()

    lines: list = []
    b = build(tmp_path / "b", tiny_model_path, lines)
    try:
        learner, engine = where(b.learner.actor), where(b.engines.engines[0])
        assert learner["node"] != engine["node"]  # SPREAD: one role per node
        doomed = next(n for n in workers if n.node_id == engine["node"])
        removed: list[float] = []

        def remove_after_step_2() -> None:
            while b.step < 2:
                time.sleep(0.05)
            removed.append(time.monotonic())
            cluster.remove_node(doomed, allow_graceful=False)  # a crash, not a drain

        killer = threading.Thread(target=remove_after_step_2, daemon=True)
        killer.start()
        b.fit()
        killer.join(timeout=5)

        assert removed and b.step == STEPS
        restarted = [(t, line) for t, line in lines
                     if line.startswith("rollout engine 0 lost") and "started again" in line]
        assert restarted, [line for _, line in lines]
        assert b.engines.restarts >= 1
        now = where(b.engines.engines[0])
        assert now["node"] == learner["node"]  # the one survivor with room
        # no path crosses nodes: the adapter came as bytes through the object store, and the
        # file vLLM reads was written by the engine's own process (its pid names the directory)
        assert b.sync.transport.name == "object-store"
        payload = ray.get(b.sync._payload)
        assert isinstance(payload, PackedAdapter) and payload.num_bytes > 0
        assert f"grpo_ray-adapters-pid{now['pid']}-engine0-" in now["lora_path"]
        recovery_s = restarted[0][0] - removed[0]
    finally:
        b.close()

    a_lora, b_lora = lora_of(tmp_path / "a"), lora_of(tmp_path / "b")
    assert sorted(a_lora) == sorted(b_lora)
    assert any(t.abs().max() > 0 for n, t in a_lora.items() if "lora_B" in n)
    for name, t in a_lora.items():  # the lost slice was generated again with the same seeds
        torch.testing.assert_close(b_lora[name], t, rtol=0, atol=1e-6, msg=name)
    print(f"\nnode lost after step 2: engine serving again on the surviving node "
          f"{recovery_s:.1f} s after the node was killed; {restarted[0][1]}")
