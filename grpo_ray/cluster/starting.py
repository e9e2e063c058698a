"""Runs in the driver: how one actor is started in its placement bundle, and started again after
its node was lost (the placement of every actor: `cluster.placement`, `cluster.elastic`)."""
from __future__ import annotations

import time
from typing import Any, Callable

from grpo_ray.logs import actor_env_vars

# Environment of every actor we start: vLLM's engine core in the actor's own process (simpler to
# place and to clean up than its default subprocess), quiet tokenizers. `actor_env_vars` adds
# where the actor's output goes (grpo_ray/logs.py).
ACTOR_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}


def start_until_up(start: Callable[[], Any], timeout_s: float) -> Any:
    """`start()` an actor (a replacement) and wait until it is up. One that dies before it is up
    from a failure of the machines, not of its own constructor, is started again every second
    until `timeout_s`: after a node is lost, Ray marks it dead only after its health checks
    fail (seconds), and until then a placement bundle of that node is not placed again, so an
    actor started in it dies with the node. Returns the last actor started, up or not (the
    caller's own wait reports a constructor's error or a timeout)."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    deadline = time.monotonic() + timeout_s
    while True:
        actor = start()
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=max(0.1, deadline - time.monotonic()))
            return actor
        except GetTimeoutError:
            return actor
        except RayActorError as e:
            if e.actor_init_failed or time.monotonic() + 1.0 >= deadline:
                return actor
        ray.kill(actor)
        time.sleep(1.0)


def actor_options(pg: Any, resources: dict[str, float], bundle: int,
                  name: str) -> dict[str, Any]:
    """Options of the actor `name` (its log file's name) in bundle `bundle` of `pg`."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return dict(num_cpus=resources.get("CPU", 0), num_gpus=resources.get("GPU", 0),
                runtime_env={"env_vars": actor_env_vars(ACTOR_ENV, name)},
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=bundle))
