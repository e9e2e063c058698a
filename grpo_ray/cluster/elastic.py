"""Runs in the driver: the placement of an elastic fleet of rollout engines
(`rollout.min_engines` < `max_engines`, docs/elastic.md). Each engine has a placement group of
its own, asked for whenever the fleet is short and reserved by Ray as soon as a node has room (a
node that joined, or one the autoscaler added: `cluster.autoscale` asks it for the whole fleet).
The fleet's decisions are `cluster.fleet`'s; `cluster.engines.EngineGroup.between_steps`
performs them with an `EnginePlacer`."""
from __future__ import annotations

import time
from typing import Any, Callable

from grpo_ray.cluster.engines import EngineGroup
from grpo_ray.cluster.fleet import Fleet
from grpo_ray.cluster.group import NoRoom
from grpo_ray.cluster.plan import PlacementError, Plan, _fmt
from grpo_ray.cluster.starting import actor_options, start_until_up
from grpo_ray.config import Config


class EnginePlacer:
    """Each engine of an elastic fleet in a placement group of its own, so that one is added or
    removed without touching the others or the learner. `request(i)` asks for engine i's bundle
    and returns at once; `placed(i)` says on which node it came; `start(i)` starts the engine
    there. A lost engine gets a new group, placed on any node with room: `start_again(i)` waits
    for that at most `cluster.replace_timeout_s`, then raises `NoRoom`."""

    def __init__(self, cfg: Config, bundle: dict[str, float], engine_cls: type,
                 engine_args: Callable[[int], tuple]) -> None:
        self.cfg, self.bundle = cfg, bundle
        self.engine_cls, self.engine_args = engine_cls, engine_args
        self.groups: dict[int, Any] = {}

    def request(self, i: int) -> None:
        from ray.util.placement_group import placement_group

        self.groups[i] = placement_group([dict(self.bundle)], name=f"grpo-ray-engine-{i}")

    def placed(self, i: int) -> str | None:
        """The node engine i's bundle is reserved on; None while it waits for room."""
        from ray.util.placement_group import placement_group_table

        # the table, not `group.wait(0)`: a zero timeout answers False even once it is placed
        table = placement_group_table(self.groups[i])
        return table["bundles_to_node_id"][0] if table["state"] == "CREATED" else None

    def start(self, i: int) -> Any:
        """Engine i in its reserved bundle, starting (not waited for)."""
        import ray

        options = actor_options(self.groups[i], self.bundle, 0, f"rollout-{i}")
        return ray.remote(self.engine_cls).options(**options).remote(*self.engine_args(i))

    def start_again(self, i: int) -> Any:
        """A replacement of lost engine i, in a placement group asked for anew (the old one may
        still be reserved on the node just lost, until Ray notices), up within
        `cluster.restart_timeout_s`. `NoRoom`, its request withdrawn, when no node has room for
        it within `cluster.replace_timeout_s`."""
        c = self.cfg.cluster
        self.release(i)
        self.request(i)
        deadline = time.monotonic() + c.replace_timeout_s
        while self.placed(i) is None:
            if time.monotonic() > deadline:
                self.release(i)
                raise NoRoom(f"no room for it came within cluster.replace_timeout_s="
                             f"{c.replace_timeout_s:g} s")
            time.sleep(0.2)
        return start_until_up(lambda: self.start(i), c.restart_timeout_s)

    def draining(self) -> set[str]:
        """The nodes being drained (a preemption notice, `ray drain-node`)."""
        from grpo_ray.internals import ray_draining_nodes

        return ray_draining_nodes()

    def release(self, i: int) -> None:
        from ray.util.placement_group import remove_placement_group

        group = self.groups.pop(i, None)
        if group is not None:
            remove_placement_group(group)

    def shutdown(self) -> None:
        for i in list(self.groups):
            self.release(i)


def elastic_engines(cfg: Config, plan: Plan, engine_cls: type,
                    engine_args: Callable[[int], tuple], n: int,
                    notify: Callable[[str], None]) -> EngineGroup:
    """The first `n` engines of an elastic fleet, each placed in a group of its own (within
    `cluster.placement_timeout_s`) and started (not waited for)."""
    placer = EnginePlacer(cfg, plan.engine, engine_cls, engine_args)
    for i in range(n):
        placer.request(i)
    for i in range(n):
        if not placer.groups[i].wait(cfg.cluster.placement_timeout_s):
            placer.shutdown()
            raise PlacementError(f"rollout engine {i}'s bundle ({_fmt(plan.engine)}) not "
                                 f"placed within {cfg.cluster.placement_timeout_s:g} s "
                                 "(cluster.placement_timeout_s)")
    low, high = cfg.fleet_bounds
    fleet = Fleet(n, low, high, cfg.cluster.max_restarts)
    for i in range(n):
        fleet.nodes[i] = placer.placed(i)

    def start_again(i: int) -> Any:  # a lost engine's replacement, wherever it finds room
        engine = placer.start_again(i)
        fleet.nodes[i] = placer.placed(i)
        return engine

    return EngineGroup([placer.start(i) for i in range(n)], start_again, None, cfg.cluster,
                       notify, fleet=fleet, placer=placer)


def request_resources(plan: Plan, engines: int) -> None:
    """Ask Ray's autoscaler for the learner's bundle, `engines` engine bundles and the reward
    workers' CPUs (`cluster.autoscale`); `withdraw_resources` ends the request."""
    from ray.autoscaler.sdk import request_resources as request

    request(bundles=[dict(plan.learner)] + [dict(plan.engine)] * engines
            + [dict(plan.reward)] * plan.reward_workers)


def withdraw_resources() -> None:
    """End the autoscaler request of `request_resources` (the run is over)."""
    from ray.autoscaler.sdk import request_resources as request

    request(bundles=[])
