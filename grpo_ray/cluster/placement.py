"""Runs in the driver: where every actor sits. One placement group for the learner and the
rollout engines, plain CPU actors for the reward pool, every start with a deadline, after the plan
(`cluster.plan`: the layout and its check against the cluster, pure) says the cluster holds
them."""
from __future__ import annotations

import dataclasses
import math
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from grpo_ray.cluster.engines import EngineGroup
from grpo_ray.cluster.elastic import elastic_engines, request_resources, withdraw_resources
from grpo_ray.cluster.learner import LearnerHandle
from grpo_ray.cluster.plan import (PlacementError, Plan, _fmt, check_fits, engines_plan,
                                   plan_placement, use_gpu)
from grpo_ray.config import Config
from grpo_ray.faults import ActorLostError
from grpo_ray.cluster.starting import ACTOR_ENV, actor_options, start_until_up
from grpo_ray.logs import actor_env_vars

def cluster_nodes() -> list[dict[str, float]]:
    """Total CPU/GPU resources of each alive node of the connected Ray cluster."""
    import ray

    return [{k: v for k, v in n["Resources"].items() if k in ("CPU", "GPU")}
            for n in ray.nodes() if n.get("Alive")]


@dataclass
class Actors:
    """Handles of every actor of a run, and the placement group that holds them."""

    learner: LearnerHandle
    engines: EngineGroup
    reward_workers: list[Any]
    placement_group: Any
    plan: Plan
    start_reward_worker: Callable[[], Any] | None = None
    """Starts one more reward worker like the others (the pool's replacement of a lost one)."""
    autoscale: bool = False
    """An autoscaler request stands for the run (`cluster.autoscale`): withdrawn at the end."""
    startup: dict[str, float] = field(default_factory=dict)
    """Seconds of the start: `placement_s` (the reservation), `engines_s` (from their start
    until the last was up), `learner_s` (likewise), `learner_after_engines` (1.0 where the
    learner's load waited for the engines: a shared GPU without `rollout.kv_cache_gb`; then
    `learner_imports_s` is its constructor's imports beside the engines and `learner_s` its
    load after them)."""

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        self.learner.kill()
        for actor in self.reward_workers:
            ray.kill(actor)
        self.engines.shutdown()
        remove_placement_group(self.placement_group)
        if self.autoscale:
            withdraw_resources()


def place_actors(cfg: Config, learner_cls: type, learner_args: tuple, engine_cls: type,
                 engine_args: list[tuple] | Callable[[int], tuple],
                 notify: Callable[[str], None] = print) -> Actors:
    """Check the plan against the cluster, reserve one placement group for the learner and the
    engines (an elastic fleet: the learner's, and one per engine, `EnginePlacer`), start them
    there, start the reward workers (plain CPU actors) and wait until all are ready, each within
    `cluster.restart_timeout_s`. `engine_args(i)` (or `[i]`) are engine i's constructor
    arguments. Where the learner must load after the engines, it is started first as
    `learner_cls(*learner_args, defer_load=True)`, which only imports, and its `load()` is
    called once they are up. `notify` gets the groups' lines (a member replaced)."""
    import ray
    from ray.util.placement_group import remove_placement_group

    from grpo_ray.cluster.rewards import build_reward_workers, reward_worker_starter

    args_of = engine_args if callable(engine_args) else engine_args.__getitem__
    n = cfg.rollout.num_engines if callable(engine_args) else len(engine_args)
    nodes = cluster_nodes()
    plan = plan_placement(cfg, use_gpu(cfg, nodes))
    check_fits(plan, nodes)
    if cfg.cluster.autoscale:  # the demand of the whole fleet, for the autoscaler to meet
        request_resources(plan, cfg.fleet_bounds[1])
    start = time.monotonic()
    own = dataclasses.replace(plan, bundles=[plan.bundles[plan.learner_bundle]], learner_bundle=0,
                              labels=["learner"]) if cfg.elastic else plan
    pg = _reserve(own, cfg.cluster.placement_timeout_s, "grpo-ray",
                  cfg.cluster.placement_strategy)
    engines_start = time.monotonic()
    # vLLM sizes its KV cache from the GPU memory it sees free while it starts: on a shared GPU
    # each engine finishes starting before the next one, and all before the learner loads,
    # unless the KV cache is given in bytes (rollout.kv_cache_gb): then all start at once. The
    # learner's imports, which take no GPU memory, run beside the engines in either case.
    one_by_one = plan.layout == "colocated" and cfg.rollout.kv_cache_gb is None

    def start_learner(i: int = 0, defer_load: bool = False) -> Any:
        return ray.remote(learner_cls).options(
            **actor_options(pg, plan.learner, plan.learner_bundle, "learner")
        ).remote(*learner_args, **({"defer_load": True} if defer_load else {}))

    rewards: list[Any] = []
    deadline = time.monotonic() + cfg.cluster.restart_timeout_s
    try:  # a constructor's error, or a stop, leaves nothing behind: the group's actors go with it
        learner_start = time.monotonic()
        learner = start_learner(defer_load=one_by_one)
        learner_up = _when_up(learner)
        if cfg.elastic:
            engines = elastic_engines(cfg, plan, engine_cls, args_of, n, notify)
        else:
            engines = _engine_group(cfg, pg, plan, engine_cls, [args_of(i) for i in range(n)],
                                    one_by_one=one_by_one, watch=learner, deadline=deadline,
                                    notify=notify)
        loaded = learner.load.remote() if one_by_one else None
        reward_env = {"env_vars": actor_env_vars(ACTOR_ENV, "reward")}
        rewards = build_reward_workers(cfg.reward.functions, cfg.reward.mode, plan.reward_workers,
                                       plan.reward["CPU"], runtime_env=reward_env,
                                       ready_timeout_s=cfg.cluster.restart_timeout_s)
        # constructors run remotely: surface their errors (a bad model path, say) here, at once
        up = _wait_up([learner, *engines.engines], deadline,
                      ["learner"] + [f"rollout engine {i}" for i in range(len(engines))])
        startup = {"placement_s": engines_start - start, "engines_s": max(up[1:]) - engines_start,
                   "learner_s": learner_up.result() - learner_start,
                   "learner_after_engines": float(one_by_one)}
        if loaded is not None:  # the constructor imported; the load is its own time
            startup |= {"learner_imports_s": startup["learner_s"],
                        "learner_s": _get_by(loaded, deadline, "the learner's load")}
    except BaseException:
        for actor in rewards:
            ray.kill(actor)
        if cfg.elastic and "engines" in locals():
            engines.shutdown()
        remove_placement_group(pg)
        raise
    start_reward = reward_worker_starter(cfg.reward.functions, cfg.reward.mode,
                                         plan.reward["CPU"], reward_env)
    handle = LearnerHandle(
        learner, lambda i=0: start_until_up(start_learner, cfg.cluster.restart_timeout_s),
        cfg.cluster, notify)
    return Actors(handle, engines, rewards, pg, plan,
                  lambda: start_until_up(start_reward, cfg.cluster.restart_timeout_s),
                  cfg.cluster.autoscale, startup)


def _when_up(actor: Any) -> Future:
    """A future of when (`time.monotonic`) `actor`'s constructor has run, set as it happens;
    whoever waits on it, or on the actor, sees its error."""
    out: Future = Future()
    ready = actor.__ray_ready__.remote().future()
    ready.add_done_callback(lambda _: out.set_result(time.monotonic()))
    return out


def _wait_up(actors: list[Any], deadline: float, names: list[str]) -> list[float]:
    """Wait until every actor's constructor has run; when each was up (`time.monotonic`), in
    `actors`' order. The first constructor error is raised as soon as it is known; an actor not
    up by `deadline` (`time.monotonic`) is a hung start (`ActorLostError`, naming it)."""
    import ray

    refs = {a.__ray_ready__.remote(): i for i, a in enumerate(actors)}
    up, pending = [0.0] * len(actors), list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1,
                                 timeout=max(0.0, deadline - time.monotonic()))
        if not done:
            late = ", ".join(names[refs[r]] for r in pending)
            raise ActorLostError(f"{late}: not started within cluster.restart_timeout_s (hung "
                                 "at start-up: see the Ray logs of its node)")
        ray.get(done[0])
        up[refs[done[0]]] = time.monotonic()
    return up


def _get_by(ref: Any, deadline: float, what: str) -> Any:
    """`ray.get(ref)` by `deadline` (`time.monotonic`), else a hung start (`ActorLostError`)."""
    import ray

    try:
        return ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
    except ray.exceptions.GetTimeoutError:
        raise ActorLostError(f"{what}: not done within cluster.restart_timeout_s (hung at "
                             "start-up: see the Ray logs of its node)") from None


def place_engines(cfg: Config, engine_cls: type, engine_args: list[tuple]) -> EngineGroup:
    """Rollout engines alone (evaluation), each with the resources training gives it, in their
    own placement group (removed by the group's `shutdown`). Returns once every engine has
    started."""
    from ray.util.placement_group import remove_placement_group

    nodes = cluster_nodes()
    n = len(engine_args)
    plan = engines_plan(plan_placement(cfg, use_gpu(cfg, nodes)), n)
    check_fits(plan, nodes)
    pg = _reserve(plan, cfg.cluster.placement_timeout_s, "grpo-ray-engines",
                  cfg.cluster.placement_strategy)
    deadline = time.monotonic() + cfg.cluster.restart_timeout_s
    group = _engine_group(cfg, pg, plan, engine_cls, engine_args,
                          on_shutdown=lambda: remove_placement_group(pg))
    try:
        _wait_up(group.engines, deadline, [f"rollout engine {i}" for i in range(n)])
    except BaseException:
        group.shutdown()
        raise
    return group


def _engine_group(cfg: Config, pg: Any, plan: Plan, engine_cls: type, engine_args: list[tuple],
                  on_shutdown: Any = None, one_by_one: bool = False, watch: Any = None,
                  deadline: float = math.inf,
                  notify: Callable[[str], None] = print) -> EngineGroup:
    """The engines started in their bundles (`one_by_one`: each ready before the next starts,
    by `deadline`, and the constructor of the actor `watch` raising meanwhile raises at once);
    the group can start engine i again in its own."""
    import ray

    watched = [watch.__ray_ready__.remote()] if watch is not None else []

    def wait_ready(engine: Any, i: int) -> None:
        ready = engine.__ray_ready__.remote()
        while True:
            done, _ = ray.wait([ready, *watched], num_returns=1,
                               timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                raise ActorLostError(f"rollout engine {i}: not started within "
                                     "cluster.restart_timeout_s (hung at start-up: see the Ray "
                                     "logs of its node)")
            ray.get(done[0])
            if done[0] == ready:
                return
            watched.clear()  # up: only the engine is left to wait for

    def start(i: int) -> Any:
        options = actor_options(pg, plan.engine, plan.engine_bundles[i], f"rollout-{i}")
        return ray.remote(engine_cls).options(**options).remote(*engine_args[i])

    def start_again(i: int) -> Any:  # a replacement: its bundle may be on a node just lost
        return start_until_up(lambda: start(i), cfg.cluster.restart_timeout_s)

    engines = []
    for i in range(len(engine_args)):
        engines.append(start(i))
        if one_by_one:
            wait_ready(engines[-1], i)
    return EngineGroup(engines, start_again, on_shutdown, cfg.cluster, notify)


def _reserve(plan: Plan, timeout_s: float, name: str, strategy: str = "PACK") -> Any:
    """A ready placement group of the plan's bundles, or PlacementError after `timeout_s`.
    `strategy` (`cluster.placement_strategy`): PACK keeps bundles on one node but spreads over
    nodes when one is too small; SPREAD puts them on different nodes where it can. Neither is
    strict, so Ray can place a lost node's bundle again beside the others on a survivor."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group(plan.bundles, strategy=strategy, name=name)
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise PlacementError(f"placement group {_fmt(plan.total())} not ready after "
                             f"{timeout_s:g} s (cluster.placement_timeout_s): "
                             "other jobs hold those resources, or the autoscaler could not add "
                             "them") from None
    return pg
