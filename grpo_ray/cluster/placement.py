"""Where every actor sits: one placement group for the learner and the rollout engines, plain CPU
actors for the reward pool, and a start-up check that refuses what the cluster cannot hold.

Three layouts, chosen from the config and the cluster:
- `cpu`: no GPUs anywhere (development, CI); bundles hold CPUs only.
- `dedicated`: the learner on its own GPU(s), each engine on its own `gpus_per_engine` GPUs.
- `colocated` (`cluster.colocate`): one GPU bundle shared by the learner and the engines through
  fractional GPU resources; vLLM's `gpu_memory_utilization` bounds each engine's memory.
"""
from __future__ import annotations

import math
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from grpo_ray.cluster.engines import EngineGroup
from grpo_ray.config import Config, UserError
from grpo_ray.logs import actor_env_vars

# Environment of every actor we start: vLLM's engine core in the actor's own process (simpler to
# place and to clean up than its default subprocess), quiet tokenizers. `actor_env_vars` adds
# where the actor's output goes (grpo_ray/logs.py).
ACTOR_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}


class PlacementError(UserError, RuntimeError):
    """The cluster cannot hold the requested actors; the message says what is missing."""

    kind = "placement error"


class ClusterError(UserError, ConnectionError):
    """The Ray cluster named by cluster.address or RAY_ADDRESS does not answer."""

    kind = "cluster error"


@dataclass
class Plan:
    """The resources of each actor; `bundles[i]` is one placement-group bundle."""

    layout: str
    bundles: list[dict[str, float]]
    learner_bundle: int
    learner: dict[str, float]
    engine_bundles: list[int]
    engine: dict[str, float]
    reward_workers: int
    reward: dict[str, float]
    labels: list[str] = field(default_factory=list)
    """What each bundle is for, for error messages."""

    def total(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for b in self.bundles + [self.reward] * self.reward_workers:
            for k, v in b.items():
                out[k] = out.get(k, 0.0) + v
        return out


def plan_placement(cfg: Config, use_gpu: bool) -> Plan:
    """Resources of the learner, the engines and the reward workers (pure; no Ray)."""
    r, lr = cfg.rollout, cfg.learner
    reward = {"CPU": cfg.reward.cpus_per_worker}
    if not use_gpu:
        learner, engine = {"CPU": lr.num_cpus}, {"CPU": r.cpus_per_engine}
        bundles = [dict(learner)] + [dict(engine) for _ in range(r.num_engines)]
        return Plan("cpu", bundles, 0, learner, list(range(1, r.num_engines + 1)), engine,
                    cfg.reward.num_workers, reward,
                    ["learner"] + [f"rollout engine {i}" for i in range(r.num_engines)])
    if cfg.cluster.colocate:
        learner_share, engine_share = cfg.colocated_gpu_shares
        learner = {"CPU": lr.num_cpus, "GPU": learner_share}
        engine = {"CPU": r.cpus_per_engine, "GPU": engine_share}
        bundle = {"CPU": lr.num_cpus + r.cpus_per_engine * r.num_engines, "GPU": 1.0}
        return Plan("colocated", [bundle], 0, learner, [0] * r.num_engines, engine,
                    cfg.reward.num_workers, reward,
                    [f"learner + {r.num_engines} rollout engine(s) (shared GPU)"])
    learner = {"CPU": lr.num_cpus, "GPU": 1.0}  # the learner computes on one device
    engine = {"CPU": r.cpus_per_engine, "GPU": float(r.gpus_per_engine)}
    bundles = [dict(learner)] + [dict(engine) for _ in range(r.num_engines)]
    return Plan("dedicated", bundles, 0, learner, list(range(1, r.num_engines + 1)), engine,
                cfg.reward.num_workers, reward,
                ["learner"] + [f"rollout engine {i}" for i in range(r.num_engines)])


def check_fits(plan: Plan, nodes: list[dict[str, float]]) -> None:
    """Raise PlacementError unless every bundle fits on some node (first fit, largest first),
    naming the first bundle that does not and what the cluster has."""
    free = [dict(n) for n in nodes]
    order = sorted(range(len(plan.bundles)),
                   key=lambda i: (-plan.bundles[i].get("GPU", 0), -plan.bundles[i].get("CPU", 0)))
    for i in order:
        bundle = plan.bundles[i]
        node = next((n for n in free if all(n.get(k, 0) + 1e-9 >= v for k, v in bundle.items())),
                    None)
        if node is None:
            total = plan.total()
            have = {k: sum(n.get(k, 0) for n in nodes) for k in ("CPU", "GPU")}
            raise PlacementError(
                f"cannot place {plan.labels[i]} ({_fmt(bundle)}): the {plan.layout} layout needs "
                f"{_fmt(total)} in all, the cluster has {_fmt(have)} on {len(nodes)} node(s) "
                f"(largest node: {_fmt(max(nodes, key=lambda n: n.get('GPU', 0)) if nodes else {})})"
                + ("; set cluster.colocate=true to share one GPU" if plan.layout == "dedicated"
                   and have["GPU"] >= 1 else ""))
        for k, v in bundle.items():
            node[k] -= v
    reward_cpus = plan.reward.get("CPU", 0) * plan.reward_workers
    left = sum(n.get("CPU", 0) for n in free)
    if reward_cpus > left + 1e-9:
        raise PlacementError(f"cannot place {plan.reward_workers} reward workers "
                             f"({_fmt(plan.reward)} each): {left:g} CPUs left after the learner "
                             "and the engines; lower reward.num_workers or reward.cpus_per_worker")


def _fmt(resources: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(resources.items())
                     if k in ("CPU", "GPU")) or "nothing"


def fit_to_machine(cfg: Config, engines_only: bool = False) -> str | None:
    """Before an embedded local Ray starts (no `cluster.address`, no RAY_ADDRESS): the plan
    checked against this machine (`cluster.num_cpus`/`num_gpus`, else its own CPUs and GPUs),
    so that a placement it cannot hold fails now, naming what is missing, rather than after Ray
    and the model have started. On a machine without GPUs whose CPUs cannot hold the default
    CPU shares (learner 1, each engine 1, each reward worker 0.25: 2.5 CPUs, more than a 2-core
    laptop has), the shares still at their defaults are scaled down, in `cfg`, to fit; Ray's
    CPUs place actors, they do not bound their threads. Returns a line saying so, or None.
    `engines_only`: the plan of `place_engines` (evaluation)."""
    import os

    if cfg.cluster.address or os.environ.get("RAY_ADDRESS"):
        return None  # the cluster's own resources are checked once joined (`place_actors`)
    cpus = cfg.cluster.num_cpus or len(os.sched_getaffinity(0))
    gpus = cfg.cluster.num_gpus if cfg.cluster.num_gpus is not None else _visible_gpus()
    node = {"CPU": float(cpus), "GPU": float(gpus)}
    use_gpu = _use_gpu(cfg, [node])
    note = None if use_gpu else _scale_cpu_shares(cfg, cpus, engines_only)
    plan = plan_placement(cfg, use_gpu)
    check_fits(_engines_plan(plan, cfg.rollout.num_engines) if engines_only else plan, [node])
    return note


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def _scale_cpu_shares(cfg: Config, cpus: int, engines_only: bool) -> str | None:
    """Scale the CPU shares left at their defaults so that the CPU layout's total fits `cpus`
    (`fit_to_machine`); a line naming the values set, or None where nothing was changed."""
    from grpo_ray.config import LearnerConfig, RewardConfig, RolloutConfig

    shares = [(cfg.rollout, "cpus_per_engine", RolloutConfig, cfg.rollout.num_engines)]
    if not engines_only:
        shares += [(cfg.learner, "num_cpus", LearnerConfig, 1),
                   (cfg.reward, "cpus_per_worker", RewardConfig, cfg.reward.num_workers)]
    total = sum(getattr(section, name) * n for section, name, _, n in shares)
    scalable = [(section, name, n) for section, name, model, n in shares
                if getattr(section, name) == model.model_fields[name].default]
    defaults = sum(getattr(section, name) * n for section, name, n in scalable)
    free = cpus - (total - defaults)  # what the shares a user set leave
    if total <= cpus + 1e-9 or not defaults or free <= 0:
        return None  # fits, or nothing to scale (`check_fits` says what is missing)
    factor = free / defaults
    keys = {RolloutConfig: "rollout", LearnerConfig: "learner", RewardConfig: "reward"}
    set_to = []
    for section, name, _ in scalable:
        value = math.floor(getattr(section, name) * factor * 100) / 100
        setattr(section, name, value)
        set_to.append(f"{keys[type(section)]}.{name}={value:g}")
    return (f"this machine has {cpus} CPU{'s' * (cpus != 1)} and the default CPU shares of "
            f"the actors need "
            f"{total:g}: {', '.join(set_to)} here (set them, or cluster.num_cpus, to choose)")


def _engines_plan(full: Plan, n: int) -> Plan:
    """The engines of `full` alone, each in its own bundle (`place_engines`)."""
    return Plan(full.layout, [dict(full.engine) for _ in range(n)], -1, {}, list(range(n)),
                full.engine, 0, full.reward, [f"rollout engine {i}" for i in range(n)])


def cluster_nodes() -> list[dict[str, float]]:
    """Total CPU/GPU resources of each alive node of the connected Ray cluster."""
    import ray

    return [{k: v for k, v in n["Resources"].items() if k in ("CPU", "GPU")}
            for n in ray.nodes() if n.get("Alive")]


@dataclass
class Actors:
    """Handles of every actor of a run, and the placement group that holds them."""

    learner: Any
    engines: EngineGroup
    reward_workers: list[Any]
    placement_group: Any
    plan: Plan
    start_reward_worker: Callable[[], Any] | None = None
    """Starts one more reward worker like the others (the pool's replacement of a lost one)."""
    start_learner: Callable[[int], Any] | None = None
    """Starts the learner again in its bundle (`start_learner(0)`: the learner group's `start`)."""
    startup: dict[str, float] = field(default_factory=dict)
    """Seconds of the start: `placement_s` (the reservation), `engines_s` (from their start
    until the last was up), `learner_s` (likewise), `learner_after_engines` (1.0 where the
    learner's load waited for the engines: a shared GPU without `rollout.kv_cache_gb`; then
    `learner_imports_s` is its constructor's imports beside the engines and `learner_s` its
    load after them)."""

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in [self.learner, *self.reward_workers]:
            ray.kill(actor)
        self.engines.shutdown()
        remove_placement_group(self.placement_group)


def place_actors(cfg: Config, learner_cls: type, learner_args: tuple, engine_cls: type,
                 engine_args: list[tuple]) -> Actors:
    """Check the plan against the cluster, reserve one placement group for the learner and the
    engines, start them there, start the reward workers (plain CPU actors) and wait until all
    are ready. `engine_args[i]` are engine i's constructor arguments. Where the learner must
    load after the engines, it is started first as `learner_cls(*learner_args,
    defer_load=True)`, which only imports, and its `load()` is called once they are up."""
    from grpo_ray.reward.pool import build_reward_workers, reward_worker_starter

    import ray
    from ray.util.placement_group import remove_placement_group

    nodes = cluster_nodes()
    plan = plan_placement(cfg, _use_gpu(cfg, nodes))
    check_fits(plan, nodes)
    start = time.monotonic()
    pg = _reserve(plan, cfg.cluster.placement_timeout_s, "grpo-ray",
                  cfg.cluster.placement_strategy)
    engines_start = time.monotonic()
    # vLLM sizes its KV cache from the GPU memory it sees free while it starts: on a shared GPU
    # each engine finishes starting before the next one, and all before the learner loads,
    # unless the KV cache is given in bytes (rollout.kv_cache_gb): then all start at once. The
    # learner's imports, which take no GPU memory, run beside the engines in either case.
    one_by_one = plan.layout == "colocated" and cfg.rollout.kv_cache_gb is None

    def start_learner(i: int = 0, defer_load: bool = False) -> Any:
        return ray.remote(learner_cls).options(
            **_actor_options(pg, plan.learner, plan.learner_bundle, "learner")
        ).remote(*learner_args, **({"defer_load": True} if defer_load else {}))

    rewards: list[Any] = []
    try:  # a constructor's error, or a stop, leaves nothing behind: the group's actors go with it
        learner_start = time.monotonic()
        learner = start_learner(defer_load=one_by_one)
        learner_up = _when_up(learner)
        engines = _engine_group(cfg, pg, plan, engine_cls, engine_args, one_by_one=one_by_one,
                                watch=learner)
        loaded = learner.load.remote() if one_by_one else None
        reward_env = {"env_vars": actor_env_vars(ACTOR_ENV, "reward")}
        rewards = build_reward_workers(cfg.reward.functions, cfg.reward.mode, plan.reward_workers,
                                       plan.reward["CPU"], runtime_env=reward_env)
        # constructors run remotely: surface their errors (a bad model path, say) here, at once
        up = _wait_up([learner, *engines.engines])
        startup = {"placement_s": engines_start - start, "engines_s": max(up[1:]) - engines_start,
                   "learner_s": learner_up.result() - learner_start,
                   "learner_after_engines": float(one_by_one)}
        if loaded is not None:  # the constructor imported; the load is its own time
            startup |= {"learner_imports_s": startup["learner_s"], "learner_s": ray.get(loaded)}
    except BaseException:
        for actor in rewards:
            ray.kill(actor)
        remove_placement_group(pg)
        raise
    start_reward = reward_worker_starter(cfg.reward.functions, cfg.reward.mode,
                                         plan.reward["CPU"], reward_env)
    return Actors(learner, engines, rewards, pg, plan,
                  lambda: start_until_up(start_reward, cfg.cluster.restart_timeout_s),
                  lambda i=0: start_until_up(start_learner, cfg.cluster.restart_timeout_s),
                  startup)


def _when_up(actor: Any) -> Future:
    """A future of when (`time.monotonic`) `actor`'s constructor has run, set as it happens;
    whoever waits on it, or on the actor, sees its error."""
    out: Future = Future()
    ready = actor.__ray_ready__.remote().future()
    ready.add_done_callback(lambda _: out.set_result(time.monotonic()))
    return out


def _wait_up(actors: list[Any]) -> list[float]:
    """Wait until every actor's constructor has run; when each was up (`time.monotonic`), in
    `actors`' order. The first constructor error is raised as soon as it is known."""
    import ray

    refs = {a.__ray_ready__.remote(): i for i, a in enumerate(actors)}
    up, pending = [0.0] * len(actors), list(refs)
    while pending:
        (ref,), pending = ray.wait(pending, num_returns=1)
        ray.get(ref)
        up[refs[ref]] = time.monotonic()
    return up


def place_engines(cfg: Config, engine_cls: type, engine_args: list[tuple]) -> EngineGroup:
    """Rollout engines alone (evaluation), each with the resources training gives it, in their
    own placement group (removed by the group's `shutdown`). Returns once every engine has
    started."""
    import ray
    from ray.util.placement_group import remove_placement_group

    nodes = cluster_nodes()
    plan = _engines_plan(plan_placement(cfg, _use_gpu(cfg, nodes)), len(engine_args))
    check_fits(plan, nodes)
    pg = _reserve(plan, cfg.cluster.placement_timeout_s, "grpo-ray-engines",
                  cfg.cluster.placement_strategy)
    group = _engine_group(cfg, pg, plan, engine_cls, engine_args,
                          on_shutdown=lambda: remove_placement_group(pg))
    try:
        ray.get([e.__ray_ready__.remote() for e in group.engines])
    except BaseException:
        group.shutdown()
        raise
    return group


def _engine_group(cfg: Config, pg: Any, plan: Plan, engine_cls: type, engine_args: list[tuple],
                  on_shutdown: Any = None, one_by_one: bool = False,
                  watch: Any = None) -> EngineGroup:
    """The engines started in their bundles (`one_by_one`: each ready before the next starts,
    and the constructor of the actor `watch` raising meanwhile raises at once); the group can
    start engine i again in its own."""
    import ray

    watched = [watch.__ray_ready__.remote()] if watch is not None else []

    def wait_ready(engine: Any) -> None:
        ready = engine.__ray_ready__.remote()
        while True:
            done, _ = ray.wait([ready, *watched], num_returns=1)
            ray.get(done[0])
            if done[0] == ready:
                return
            watched.clear()  # up: only the engine is left to wait for

    def start(i: int) -> Any:
        options = _actor_options(pg, plan.engine, plan.engine_bundles[i], f"rollout-{i}")
        return ray.remote(engine_cls).options(**options).remote(*engine_args[i])

    def start_again(i: int) -> Any:  # a replacement: its bundle may be on a node just lost
        return start_until_up(lambda: start(i), cfg.cluster.restart_timeout_s)

    engines = []
    for i in range(len(engine_args)):
        engines.append(start(i))
        if one_by_one:
            wait_ready(engines[-1])
    return EngineGroup(engines, start_again, on_shutdown, cfg.cluster)


def start_until_up(start: Callable[[], Any], timeout_s: float) -> Any:
    """`start()` an actor (a replacement) and wait until it is up. One that dies before it is up
    from a failure of the machines, not of its own constructor, is started again every second
    until `timeout_s`: after a node is lost, Ray marks it dead only after its health checks
    fail (seconds), and until then a placement bundle of that node is not placed again, so an
    actor started in it dies with the node. Returns the last actor started, up or not (the
    caller's own wait reports a constructor's error or a timeout)."""
    import time

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


def _use_gpu(cfg: Config, nodes: list[dict[str, float]]) -> bool:
    has_gpu = any(n.get("GPU", 0) > 0 for n in nodes)
    use_gpu = has_gpu if cfg.cluster.use_gpu is None else cfg.cluster.use_gpu
    if use_gpu and not has_gpu:
        raise PlacementError("cluster.use_gpu is true but the Ray cluster has no GPUs "
                             f"({len(nodes)} node(s), {_fmt({'CPU': sum(n.get('CPU', 0) for n in nodes)})})")
    return use_gpu


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


def _actor_options(pg: Any, resources: dict[str, float], bundle: int,
                   name: str) -> dict[str, Any]:
    """Options of the actor `name` (its log file's name) in bundle `bundle` of `pg`."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return dict(num_cpus=resources.get("CPU", 0), num_gpus=resources.get("GPU", 0),
                runtime_env={"env_vars": actor_env_vars(ACTOR_ENV, name)},
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=bundle))
