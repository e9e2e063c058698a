"""What the actors of a run need and whether the cluster holds it: pure code (no Ray), run in
the driver before anything is reserved, so that a run the cluster cannot hold fails in one line.

Three layouts, chosen from the config and the cluster:
- `cpu`: no GPUs anywhere (development, CI); bundles hold CPUs only.
- `dedicated`: the learner on its own GPU(s), each engine on its own `gpus_per_engine` GPUs.
- `colocated` (`cluster.colocate`): one GPU bundle shared by the learner and the engines through
  fractional GPU resources; vLLM's `gpu_memory_utilization` bounds each engine's memory.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from grpo_ray.config import Config, UserError


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


def check_fits(plan: Plan, nodes: list[dict[str, float]]) -> list[int]:
    """The node each bundle fits on (first fit, largest bundle first), in the plan's bundle
    order; PlacementError naming the first bundle that fits nowhere and what the cluster has, or
    when the reward workers do not fit in the CPUs left."""
    free = [dict(n) for n in nodes]
    order = sorted(range(len(plan.bundles)),
                   key=lambda i: (-plan.bundles[i].get("GPU", 0), -plan.bundles[i].get("CPU", 0)))
    where = [0] * len(plan.bundles)
    for i in order:
        bundle = plan.bundles[i]
        fit = [j for j, n in enumerate(free)
               if all(n.get(k, 0) + 1e-9 >= v for k, v in bundle.items())]
        node = free[fit[0]] if fit else None
        if node is None:
            total = plan.total()
            have = {k: sum(n.get(k, 0) for n in nodes) for k in ("CPU", "GPU")}
            raise PlacementError(
                f"cannot place {plan.labels[i]} ({_fmt(bundle)}): the {plan.layout} layout needs "
                f"{_fmt(total)} in all, the cluster has {_fmt(have)} on {len(nodes)} node(s) "
                f"(largest node: {_fmt(max(nodes, key=lambda n: n.get('GPU', 0)) if nodes else {})})"
                + ("; set cluster.colocate=true to share one GPU" if plan.layout == "dedicated"
                   and have["GPU"] >= 1 else ""))
        where[i] = fit[0]
        for k, v in bundle.items():
            node[k] -= v
    reward_cpus = plan.reward.get("CPU", 0) * plan.reward_workers
    left = sum(n.get("CPU", 0) for n in free)
    if reward_cpus > left + 1e-9:
        raise PlacementError(f"cannot place {plan.reward_workers} reward workers "
                             f"({_fmt(plan.reward)} each): {left:g} CPUs left after the learner "
                             "and the engines; lower reward.num_workers or reward.cpus_per_worker")
    return where


def _fmt(resources: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(resources.items())
                     if k in ("CPU", "GPU")) or "nothing"


def engines_plan(full: Plan, n: int) -> Plan:
    """The engines of `full` alone, each in its own bundle (`placement.place_engines`)."""
    return Plan(full.layout, [dict(full.engine) for _ in range(n)], -1, {}, list(range(n)),
                full.engine, 0, full.reward, [f"rollout engine {i}" for i in range(n)])


def fit_to_machine(cfg: Config, engines_only: bool = False) -> str | None:
    """Before an embedded local Ray starts (no `cluster.address`, no RAY_ADDRESS): the plan
    checked against this machine (`cluster.num_cpus`/`num_gpus`, else its own CPUs and GPUs),
    so that a placement it cannot hold fails now, naming what is missing, rather than after Ray
    and the model have started. On a machine without GPUs whose CPUs cannot hold the default
    CPU shares (learner 1, each engine 1, each reward worker 0.25: 2.5 CPUs, more than a 2-core
    laptop has), the shares still at their defaults are scaled down, in `cfg`, to fit; Ray's
    CPUs place actors, they do not bound their threads. Returns a line saying so, or None.
    `engines_only`: the plan of `placement.place_engines` (evaluation)."""
    import os

    if cfg.cluster.address or os.environ.get("RAY_ADDRESS"):
        return None  # the cluster's own resources are checked once joined (`place_actors`)
    cpus = cfg.cluster.num_cpus or len(os.sched_getaffinity(0))
    gpus = cfg.cluster.num_gpus if cfg.cluster.num_gpus is not None else _visible_gpus()
    node = {"CPU": float(cpus), "GPU": float(gpus)}
    gpu = use_gpu(cfg, [node])
    note = None if gpu else _scale_cpu_shares(cfg, cpus, engines_only)
    plan = plan_placement(cfg, gpu)
    check_fits(engines_plan(plan, cfg.rollout.num_engines) if engines_only else plan, [node])
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


def use_gpu(cfg: Config, nodes: list[dict[str, float]]) -> bool:
    has_gpu = any(n.get("GPU", 0) > 0 for n in nodes)
    use_gpu = has_gpu if cfg.cluster.use_gpu is None else cfg.cluster.use_gpu
    if use_gpu and not has_gpu:
        raise PlacementError("cluster.use_gpu is true but the Ray cluster has no GPUs "
                             f"({len(nodes)} node(s), {_fmt({'CPU': sum(n.get('CPU', 0) for n in nodes)})})")
    return use_gpu
