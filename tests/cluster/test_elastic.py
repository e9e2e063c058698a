"""An elastic fleet of rollout engines on real processes (local Ray, vLLM CPU engines, reward
actors, PEFT learner): engines join as the cluster has room and leave as nodes go, each admitted
only once it serves the current adapter, without a restart of the run; and the run trains as a
fixed fleet of the same config does (the same adapter), since every prompt samples with its own
seed whichever engine answers it.

- (fast) on one node with room for two engines, a run that starts with one grows to two between
  steps, without stalling the steps while the new engine starts, and ends with the adapter of a
  run on one engine;
- (slow, a local multi-node cluster, `ray.cluster_utils.Cluster`) a node added mid-run gets an
  engine admitted, a node drained mid-run loses it without losing a slice; a node killed with no
  room left shrinks the fleet and the run finishes; below `rollout.min_engines` the run ends
  with a checkpoint.
"""
from __future__ import annotations

import json
import re
import time

import pytest
import ray
import torch
from safetensors.torch import load_file

from grpo_ray.config import load_config
from grpo_ray.driver.trainer import Trainer

REWARDS = "reward.functions=[{name: correctness}, {name: 'rewards_for_tests:text_length'}]"
TIMING = ("time", "sync/", "rollout/tokens_per_s", "learner/time_", "learner/peak_memory",
          "rollout/engine", "probe/", "learner/gap_kl/", "learner/gap_mean_abs_diff/")
"""Metrics that differ between fleets of another size or by the clock, not by what is trained
(per-engine figures, timings)."""


def run_overrides(out, model_path, steps: int) -> list[str]:
    """The overrides of configs/tiny-cpu.yaml every run here shares."""
    return [f"output.dir={out}", f"model.path={model_path}", f"algorithm.total_steps={steps}",
            "learner.learning_rate=5e-3", "learner.warmup_ratio=0", "logging.tensorboard=false",
            "logging.progress_bar=false", "eval.num_samples=2", "output.save_every=0",
            "rollout.prompts_per_step=4", "learner.num_cpus=0.25", "reward.cpus_per_worker=0.25",
            REWARDS]


MULTI_NODE = ["rollout.num_engines=2", "rollout.cpus_per_engine=1", "cluster.num_cpus=null",
              "cluster.placement_strategy=SPREAD"]
"""Two engines of 1 CPU each, spread over the nodes of the `cluster` fixture."""


def build(out, model_path, steps: int, *overrides: str, lines: list | None = None) -> Trainer:
    cfg = load_config("configs/tiny-cpu.yaml", run_overrides(out, model_path, steps) + [*overrides])
    return Trainer(cfg, print_fn=(lines if lines is not None else []).append).setup()


def jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def trained(out) -> dict:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def assert_same_training(a_out, b_out) -> None:
    """The same adapter (fp32, atol 1e-6) and the same per-step figures (the rollout's log-probs
    and what depends on them within rounding: an engine's kernels may sum in another order in a
    batch of another composition)."""
    a, b = trained(a_out), trained(b_out)
    assert sorted(a) == sorted(b)
    assert any(t.abs().max() > 0 for n, t in a.items() if "lora_B" in n)
    for name, tensor in a.items():
        torch.testing.assert_close(b[name], tensor, rtol=0, atol=1e-6, msg=name)
    figures = [[{k: v for k, v in row.items() if not k.startswith(TIMING)}
                for row in jsonl(out / "metrics.jsonl")] for out in (a_out, b_out)]
    assert len(figures[0]) == len(figures[1])
    for a_row, b_row in zip(*figures):  # the engines' log-probs may differ in the last bits
        assert b_row == pytest.approx(a_row, rel=1e-5, abs=1e-7)


def test_the_fleet_grows_between_steps_without_stalling_them_and_trains_as_a_fixed_one(
        ray_local, tiny_model_path, tmp_path):
    steps = 4
    fixed = build(tmp_path / "fixed", tiny_model_path, steps)
    try:
        drive(fixed, {})
    finally:
        fixed.close()

    lines: list[str] = []
    elastic = build(tmp_path / "elastic", tiny_model_path, steps, "rollout.max_engines=2",
                    lines=lines)
    try:
        # engine 1 is asked for before step 1 and starts (~10 s) while steps 1 and 2 run on
        # engine 0; after step 2 the test lets the fleet move until it is admitted
        drive(elastic, {2: lambda: wait_for(lambda: 1 in elastic.engines.serving(), elastic,
                                            "engine 1 admitted")})
        rows = jsonl(tmp_path / "elastic" / "metrics.jsonl")
    finally:
        elastic.close()
    joined = [line for line in lines if " joined on node " in line]
    assert len(joined) == 1 and joined[0].startswith("rollout engine 1 joined on node "), lines
    assert "with adapter version 2" in joined[0] and joined[0].endswith("; 2 engine(s) serve")
    assert [r["rollout/engines"] for r in rows] == [1, 1, 2, 2]
    assert rows[-1]["rollout/engine_joins"] == 1 and rows[-1]["rollout/engine_leaves"] == 0
    assert all("learner/gap_kl/engine_1" in r for r in rows[2:])  # both engines generated
    assert_same_training(tmp_path / "fixed", tmp_path / "elastic")



def test_autoscale_asks_for_the_whole_fleet_and_withdraws_at_the_end(ray_local):
    """`cluster.autoscale`: the autoscaler is asked for the learner's bundle, `max_engines`
    engine bundles and the reward workers', and the request is withdrawn when the run ends (read
    back where Ray's autoscaler reads it: the v1 autoscaler's request in the GCS's KV store)."""
    from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.experimental.internal_kv import _internal_kv_get

    from grpo_ray.cluster.elastic import request_resources, withdraw_resources
    from grpo_ray.cluster.plan import plan_placement

    cfg = load_config("configs/tiny-cpu.yaml", ["rollout.max_engines=4", "cluster.autoscale=true",
                                                "rollout.prompts_per_step=4"])
    plan = plan_placement(cfg, use_gpu=False)

    def asked() -> list[dict]:
        return json.loads(_internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL) or b"[]")

    request_resources(plan, cfg.fleet_bounds[1])
    assert asked() == ([plan.learner] + [plan.engine] * 4 + [plan.reward] * plan.reward_workers)
    assert plan.engine and plan.reward_workers >= 1
    withdraw_resources()
    assert asked() == []

def drive(trainer: Trainer, events: dict) -> None:
    """The run's steps, with `events[step]()` run after that step (between two steps), then its
    adapter saved."""
    while trainer.step < trainer.cfg.algorithm.total_steps:
        trainer.engines.between_steps()
        trainer.run_step()
        if trainer.step in events:
            events[trainer.step]()
    trainer.save_adapter(trainer.out / "adapter")


def wait_for(condition, trainer: Trainer, what: str, bound_s: float = 240) -> None:
    """Between two steps, let the fleet move until `condition()` holds."""
    deadline = time.monotonic() + bound_s
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {bound_s:g} s"
        time.sleep(0.5)
        trainer.engines.between_steps()


# ---- a local multi-node cluster ------------------------------------------------------------------
@pytest.fixture
def cluster():
    """A head without CPUs (the driver: this test), node A with room for the learner, the reward
    workers and one engine (engines take 1 CPU here), node B with room for one engine."""
    from ray.cluster_utils import Cluster

    ray.shutdown()  # the session's local Ray, if a module before this one started it
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [c.add_node(num_cpus=2), c.add_node(num_cpus=1)]
    ray.init(address=c.address, log_to_driver=False)
    c.wait_for_nodes()
    yield c, nodes
    ray.shutdown()
    c.shutdown()


def multi_node(out, model_path, steps: int, *overrides: str, lines: list) -> Trainer:
    return build(out, model_path, steps, *MULTI_NODE, *overrides, lines=lines)


def node_of(trainer: Trainer, i: int) -> str:
    return trainer.engines.fleet.nodes[i]


@pytest.mark.slow
def test_a_node_added_gets_an_engine_and_a_drained_one_loses_it_and_the_run_is_unchanged(
        cluster, tiny_model_path, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    c, _ = cluster
    steps = 9
    fixed = multi_node(tmp_path / "fixed", tiny_model_path, steps, lines=[])
    try:
        drive(fixed, {})
    finally:
        fixed.close()

    lines: list[str] = []
    t = multi_node(tmp_path / "elastic", tiny_model_path, steps, "rollout.min_engines=1",
                   "rollout.max_engines=3", lines=lines)
    ray_bin = Path(sys.executable).parent / "ray"

    def add_a_node() -> None:  # the cluster grows: engine 2 is placed there and admitted
        c.add_node(num_cpus=1)
        wait_for(lambda: 2 in t.engines.serving(), t, "engine 2 admitted")

    def drain_engine_1s_node() -> None:  # a preemption notice for engine 1's node
        subprocess.run([str(ray_bin), "drain-node", "--address", c.address, "--node-id",
                        node_of(t, 1), "--reason", "DRAIN_NODE_REASON_PREEMPTION",
                        "--reason-message", "spot instance reclaimed",
                        "--deadline-remaining-seconds", "600"], check=True)

    try:
        drive(t, {3: add_a_node, 6: drain_engine_1s_node})
        rows = jsonl(tmp_path / "elastic" / "metrics.jsonl")
    finally:
        t.close()
    assert [r["rollout/engines"] for r in rows] == [2, 2, 2, 3, 3, 3, 2, 2, 2]
    joined = [line for line in lines if " joined on node " in line]
    left = [line for line in lines if " left: " in line]
    assert len(joined) == 1 and joined[0].startswith("rollout engine 2 joined"), lines
    assert len(left) == 1 and left[0].startswith("rollout engine 1 left: its node "), lines
    assert left[0].endswith("is draining; 2 rollout engine(s) go on")
    assert rows[-1]["rollout/engine_joins"] == 1 and rows[-1]["rollout/engine_leaves"] == 1
    assert_same_training(tmp_path / "fixed", tmp_path / "elastic")


@pytest.mark.slow
@pytest.mark.parametrize("min_engines", [1, 2])
def test_a_node_killed_without_room_shrinks_the_fleet_or_ends_the_run_below_min(
        cluster, tiny_model_path, tmp_path, min_engines):
    import threading

    from grpo_ray.driver.checkpoint import latest_checkpoint
    from grpo_ray.faults import ActorLostError

    c, nodes = cluster
    steps = 5
    lines: list[str] = []
    t = multi_node(tmp_path / "run", tiny_model_path, steps, f"rollout.min_engines={min_engines}",
                   "rollout.max_engines=3", "cluster.replace_timeout_s=5", lines=lines)
    doomed = next(n for n in nodes if n.node_id == node_of(t, 1))

    def kill_engine_1s_node_after_step_2() -> None:  # a crash: no room is left for engine 1
        while t.step < 2:
            time.sleep(0.05)
        c.remove_node(doomed, allow_graceful=False)

    killer = threading.Thread(target=kill_engine_1s_node_after_step_2, daemon=True)
    killer.start()
    try:
        if min_engines == 2:  # the run ends, with a checkpoint of its last completed step
            with pytest.raises(ActorLostError, match=r"no room for it came within cluster\."
                                                     r"replace_timeout_s=5 s; 1 rollout "
                                                     r"engine\(s\) left, fewer than 2"):
                t.fit()
            saved = json.loads((latest_checkpoint(t.checkpoints) / "trainer_state.json")
                               .read_text())["step"]
            assert saved == t.step >= 2
            return
        t.fit()
        rows = jsonl(tmp_path / "run" / "metrics.jsonl")
    finally:
        killer.join(timeout=5)
        t.close()
    dropped = [line for line in lines if ": dropped; " in line]
    assert len(dropped) == 1 and dropped[0].startswith("rollout engine 1 lost during "), lines
    engines = [r["rollout/engines"] for r in rows]
    assert engines[:2] == [2, 2] and engines[-1] == 1 and t.step == steps, engines


def cli_run(out, model_path, cluster_address: str, steps: int, *overrides: str):
    """`grpo-ray train` as a user starts it, on the cluster at `cluster_address`."""
    import os
    import subprocess
    import sys

    args = [*run_overrides(out, model_path, steps), f"cluster.address={cluster_address}",
            *MULTI_NODE, *overrides]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.Popen([sys.executable, "-m", "grpo_ray", "train", "--config",
                             "configs/tiny-cpu.yaml", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


@pytest.mark.slow
def test_grpo_ray_train_on_three_nodes_grows_at_step_3_shrinks_at_step_6_as_a_fixed_run(
        cluster, tiny_model_path, tmp_path):
    """The issue's run: `grpo-ray train` on a local cluster of three nodes (a head for the
    driver, two for the run), a node added once step 3 is logged and engine 1's node drained once
    step 6 is: every step finishes, the join and the leave are logged, and the adapter is the
    one a fixed fleet trains on the same cluster."""
    import subprocess
    import sys
    from pathlib import Path

    c, nodes = cluster
    steps = 40  # a new engine takes ~20-30 s to start on 2 cores, a step ~1-2 s
    fixed = cli_run(tmp_path / "fixed", tiny_model_path, c.address, steps)
    assert fixed.wait(timeout=900) == 0, fixed.stdout.read()

    run = cli_run(tmp_path / "elastic", tiny_model_path, c.address, steps,
                  "rollout.min_engines=1", "rollout.max_engines=3")
    metrics, events = tmp_path / "elastic" / "metrics.jsonl", []
    deadline = time.monotonic() + 900
    while run.poll() is None and time.monotonic() < deadline:
        done = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        if done >= 3 and not events:
            events.append(c.add_node(num_cpus=1))
        if done >= 6 and len(events) == 1:
            # engines take 1 CPU: node A holds the learner, the rewards and one engine, node B
            # (1 CPU) the other; B gets the preemption notice
            subprocess.run([str(Path(sys.executable).parent / "ray"), "drain-node", "--address",
                            c.address, "--node-id", nodes[1].node_id, "--reason",
                            "DRAIN_NODE_REASON_PREEMPTION", "--reason-message",
                            "spot instance reclaimed", "--deadline-remaining-seconds", "600"],
                           check=True)
            events.append("drained")
        time.sleep(0.2)
    output = run.stdout.read()
    assert run.wait(timeout=60) == 0, output
    assert len(events) == 2, output
    joined = [line for line in output.splitlines() if " joined on node " in line]
    left = [line for line in output.splitlines() if " left: its node " in line]
    assert len(joined) == 1 and joined[0].startswith("rollout engine 2 joined"), output
    assert len(left) == 1 and re.search(r"is draining; [12] rollout engine\(s\) go on$",
                                        left[0]), output
    rows = jsonl(metrics)
    # the new engine starts in ~20-30 s on 2 cores: it joins after the drained one left
    engines = [r["rollout/engines"] for r in rows]
    print("\nengines by step:", engines)
    assert len(rows) == steps and engines[:3] == [2, 2, 2] and engines[-1] == 2, engines
    assert rows[-1]["rollout/engine_joins"] == 1 and rows[-1]["rollout/engine_leaves"] == 1
    assert_same_training(tmp_path / "fixed", tmp_path / "elastic")
