"""The elastic rollout fleet on paper, at scale: the fleet's own decisions (`Fleet`, the code the
driver runs) driven by a seeded trace of GPU nodes that arrive and leave, each step's time from
benchmarks/scaling_model.py's model. `python benchmarks/elastic_sim.py` prints docs/elastic.md's
table.

The clock counts steps of the full fleet (a step of fewer engines takes longer, as the model
says); every duration is given in those steps. The cluster (a spot pool, the autoscaler) asks
for a node whenever it holds fewer than `max_nodes`; each comes after an exponential delay and
lives an exponential life, which ends with a notice (a drain) or without one (lost at once).

Between two steps, as the engine group does with real actors: the engines whose start is over
are reported up, then `Fleet.decide` runs with the draining nodes; an engine asked for is placed
on the first node with a free GPU that is not draining, and is up `start_steps` later. Below
`min_engines` the run waits up to the replace timeout, then ends. During a step, a node lost
(without notice, or when its notice ends first) loses the slices its admitted engines have not
finished (samples lost). Each engine is replaced as `CallHealth.judge` says: on a free GPU (the
step waits for its start), else on the first node to arrive within the replace timeout, else
`CallHealth.no_room` drops it (its slice goes to another engine) or ends the run. An engine lost
after its slice, or between steps, goes with nothing in flight.

Simplifications: one engine per GPU, every admission passes, a lost slice costs one more slice's
generation on top of the step, and stage times scale with the prompts per step.
"""
from __future__ import annotations

import argparse
import heapq
import itertools
import math
import random
from dataclasses import dataclass, field, replace

from scaling_model import MEASURED, StageTimes, predict

from grpo_ray.cluster.fleet import Fleet
from grpo_ray.cluster.health import Action, Outcome, State, lost_reason

ARRIVE, NOTICE, LOSE = "arrive", "notice", "lose"
GENERATIONS = 8


@dataclass(frozen=True)
class Scenario:
    name: str
    engines: int  # at the start (rollout.num_engines), on the nodes up at the start
    min_engines: int
    max_engines: int
    nodes: int  # up at the start
    max_nodes: int  # what the cluster keeps asking for (a worker group's maxReplicas)
    gpus_per_node: int = 1
    arrive_steps: float = math.inf  # mean delay of a node asked for (inf: none comes)
    life_steps: float = math.inf  # mean life of a node (inf: never preempted)
    notice_share: float = 1.0  # preemptions with a notice; the others lose the node at once
    notice_steps: float = 10.0
    start_steps: float = 7.0  # from an engine's placement to its process up (vLLM: ~70 s)
    replace_timeout_steps: float = 30.0  # cluster.replace_timeout_s
    max_restarts: int = 2  # cluster.max_restarts
    prompts: int = 64
    steps: int = 1000
    times: StageTimes = MEASURED["Unsloth"]  # of 16 prompts, scaled to `prompts`
    overlap: bool = False  # one step off (algorithm.max_staleness=1)
    drop_lost: bool = False
    """A lost engine is dropped at once (its slice goes to another engine, a new one is asked for
    between steps) instead of waiting for its replacement: not what the engine group does; for
    comparison."""


@dataclass
class Result:
    scenario: Scenario
    ended: str = ""  # why the run ended before its last step
    engines: list[int] = field(default_factory=list)  # generating, each step
    samples: int = 0
    lost: int = 0  # samples lost with their engine mid-step (generated again)
    stalled: float = 0.0  # steps waited, within steps, for replacements
    below_min: float = 0.0  # steps waited, between steps, with fewer than min_engines
    serving_time: float = 0.0
    gpu_time: float = 0.0  # GPU-steps of the nodes up (serving, starting, idle, stalled)
    seconds: float = 0.0
    joins: int = 0
    leaves: int = 0
    drops: int = 0
    restarts: int = 0


class Sim:
    def __init__(self, sc: Scenario, seed: int = 0) -> None:
        self.sc, self.rng = sc, random.Random(seed)
        self.fleet = Fleet(sc.engines, sc.min_engines, sc.max_engines, sc.max_restarts)
        scale = sc.prompts / 16
        self.times = replace(sc.times, generate=sc.times.generate * scale,
                             reward=sc.times.reward * scale, learner=sc.times.learner * scale)
        self.unit_s = self.step_s(sc.max_engines)
        self.t = 0.0
        self.events: list[tuple[float, int, str, str]] = []
        self.order, self.names = itertools.count(), (f"node-{k}" for k in itertools.count())
        self.nodes: dict[str, set[int]] = {}
        """The nodes up and the engines on each."""
        self.draining: set[str] = set()
        self.up_at: dict[int, float] = {}
        """Engines placed between steps, and when each is up."""
        self.r = Result(sc)
        for _ in range(sc.nodes):
            self.add_node()
        for _ in range(sc.max_nodes - sc.nodes):
            self.ask_node()
        for i in range(sc.engines):
            if (node := self.free_node()) is None:
                raise ValueError(f"{sc.name}: {sc.nodes} node(s) cannot hold {sc.engines} engines")
            self.place(i, node)

    # ---- the cluster ---------------------------------------------------------------------------
    def at(self, time: float, kind: str, node: str = "") -> None:
        heapq.heappush(self.events, (time, next(self.order), kind, node))

    def add_node(self) -> None:
        name = next(self.names)
        self.nodes[name] = set()
        if self.sc.life_steps < math.inf:
            end = NOTICE if self.rng.random() < self.sc.notice_share else LOSE
            self.at(self.t + self.rng.expovariate(1 / self.sc.life_steps), end, name)

    def ask_node(self) -> None:
        if self.sc.arrive_steps < math.inf:
            self.at(self.t + self.rng.expovariate(1 / self.sc.arrive_steps), ARRIVE)

    def free_node(self) -> str | None:
        return next((n for n, on in self.nodes.items()
                     if n not in self.draining and len(on) < self.sc.gpus_per_node), None)

    def place(self, i: int, node: str) -> None:
        self.fleet.placed(i, node)
        self.nodes[node].add(i)

    def tick(self, to: float) -> None:
        self.r.gpu_time += len(self.nodes) * self.sc.gpus_per_node * (to - self.t)
        self.t = to

    def next_event(self, until: float, inclusive: bool) -> tuple[set[int], str] | None:
        """Moves the clock to the next event due by `until` and applies it: the engines of a
        node lost, and the node."""
        due = self.events[0][0] if self.events else math.inf
        if due > until or (due == until and not inclusive):
            return None
        time, _, kind, node = heapq.heappop(self.events)
        self.tick(time)
        if kind == ARRIVE:
            self.add_node()
        elif kind == NOTICE:
            self.draining.add(node)
            self.at(self.t + self.sc.notice_steps, LOSE, node)
        else:
            self.draining.discard(node)
            self.ask_node()
            return self.nodes.pop(node), node
        return set(), node

    def gone(self, i: int) -> None:
        self.fleet.gone(i)
        self.up_at.pop(i, None)

    # ---- between two steps ---------------------------------------------------------------------
    def between_steps(self) -> None:
        """The events due, the engines up, then the fleet's decision and placements."""
        while (ev := self.next_event(self.t, inclusive=True)) is not None:
            for i in ev[0]:
                self.gone(i)
        for i, when in sorted(self.up_at.items()):
            if when <= self.t:
                self.fleet.up(i)
                del self.up_at[i]
        d = self.fleet.decide(self.draining)
        for i in d.leave:
            self.fleet.left(i)
            self.nodes[self.fleet.nodes[i]].discard(i)
        for i in d.admit:
            self.fleet.joined(i)
        for _ in range(d.ask):
            self.fleet.ask()
        for i in sorted(self.fleet.waiting):
            if (node := self.free_node()) is None:
                break
            self.place(i, node)
            self.up_at[i] = self.t + self.sc.start_steps

    def wait_for_min(self) -> bool:
        """Waits up to the replace timeout for `min_engines` (False: the run ends)."""
        start, deadline = self.t, self.t + self.sc.replace_timeout_steps
        while len(self.fleet.admitted()) < self.sc.min_engines:
            due = min([e[0] for e in self.events[:1]] + list(self.up_at.values()), default=math.inf)
            if due > deadline:
                self.tick(deadline)
                self.r.ended = (f"fewer than rollout.min_engines={self.sc.min_engines} for "
                                f"{self.sc.replace_timeout_steps:g} steps")
                break
            self.tick(due)
            self.between_steps()
        self.r.below_min += self.t - start
        return not self.r.ended

    # ---- a step --------------------------------------------------------------------------------
    def step_s(self, engines: int, lost_slices: int = 0) -> float:
        """The model's step time; each lost slice adds one slice's generation."""
        times = replace(self.times, generate=self.times.generate * (1 + lost_slices))
        return predict(times, engines, self.sc.overlap, self.sc.prompts).step_s

    def generate(self) -> bool:
        """One step's generation over the admitted engines (False: the run ends)."""
        sc, fleet = self.sc, self.fleet
        serving = fleet.admitted()
        n, p = len(serving), sc.prompts
        share = {i: (p // n + (k < p % n)) * GENERATIONS for k, i in enumerate(serving)}
        call, start, lost = fleet.call(), self.t, 0
        self.r.samples += p * GENERATIONS
        no_room: dict[int, tuple[float, str]] = {}  # lost engines -> (deadline for room, why)
        coming: dict[int, float] = {}  # their replacements -> when they are up
        while True:
            end = start + self.step_s(n, lost) / self.unit_s
            horizon = max([end, *(d for d, _ in no_room.values()), *coming.values()])
            if (ev := self.next_event(horizon, inclusive=False)) is None:
                break
            engines, node = ev
            for i in sorted(engines):
                admitted = fleet.states[i] is State.ADMITTED
                if i not in share or (admitted and self.t >= end):  # nothing in flight
                    self.gone(i)
                    continue
                why = lost_reason("rollout engine", i, "generation", f"node {node} lost")
                verdict = call.no_room(i, why) if sc.drop_lost else call.judge(i, Outcome.LOST,
                                                                              why)
                if verdict.action is Action.GIVE_UP:
                    self.r.ended = verdict.reason
                    return False
                if admitted:
                    lost += 1
                    self.r.lost += share[i]
                if verdict.action is Action.DROP:
                    self.gone(i)
                    self.r.drops += 1
                    continue
                if admitted:
                    fleet.replacing(i)
                coming.pop(i, None)
                no_room[i] = self.t + sc.replace_timeout_steps, why
            for i in sorted(no_room, key=no_room.get):  # after a loss, or a node that came
                if (node := self.free_node()) is not None:
                    del no_room[i]
                    self.place(i, node)
                    coming[i] = self.t + sc.start_steps
        for _, dropped, i in sorted([(t, False, i) for i, t in coming.items()]
                                    + [(t, True, i) for i, (t, _) in no_room.items()]):
            if not dropped:
                fleet.up(i)
                fleet.admit(i)
                continue
            verdict = call.no_room(i, f"{no_room[i][1]}; no room for it came within "
                                      f"{sc.replace_timeout_steps:g} steps")
            if verdict.action is Action.GIVE_UP:
                self.r.ended = verdict.reason
                return False
            self.gone(i)
            self.r.drops += 1
        self.tick(horizon)
        self.r.stalled += horizon - end
        self.r.serving_time += n * (end - start)
        self.r.engines.append(n)
        return True

    def run(self) -> Result:
        while len(self.r.engines) < self.sc.steps:
            self.between_steps()
            if len(self.fleet.admitted()) < self.sc.min_engines and not self.wait_for_min():
                break
            if not self.generate():
                break
        f = self.fleet
        self.r.joins, self.r.leaves, self.r.restarts = f.joins, f.leaves, f.restarts
        self.r.seconds = self.t * self.unit_s
        return self.r


def scenarios(start_steps: float = 7.0, steps: int = 1000) -> list[Scenario]:
    """A stable cluster, spot clusters with and without notices (elastic and fixed fleets), and a
    cluster that grows from 1 to 64 GPU nodes."""
    spot = dict(engines=16, min_engines=4, max_engines=16, nodes=16, max_nodes=16,
                arrive_steps=40, life_steps=300, start_steps=start_steps, steps=steps)
    big = {**spot, "engines": 64, "min_engines": 16, "max_engines": 64, "nodes": 8,
           "max_nodes": 8, "gpus_per_node": 8, "notice_share": 0.5}
    return [
        Scenario("stable", engines=8, min_engines=4, max_engines=8, nodes=8, max_nodes=8,
                 start_steps=start_steps, steps=steps),
        Scenario("spot, with notice", **spot),
        Scenario("spot, no notice", notice_share=0.0, **spot),
        Scenario("spot, no notice, lost engines dropped at once", notice_share=0.0,
                 drop_lost=True, **spot),
        Scenario("spot, no notice, fixed fleet", notice_share=0.0,  # cluster.restart_timeout_s
                 **{**spot, "min_engines": 16, "replace_timeout_steps": 60}),
        Scenario("spot, 8 GPUs a node, half with notice", **big),
        Scenario("spot, 8 GPUs a node, half with notice, dropped at once", drop_lost=True,
                 **big),
        Scenario("growing, 1 to 64", engines=1, min_engines=1, max_engines=64, nodes=1,
                 max_nodes=64, arrive_steps=200, start_steps=start_steps, steps=steps),
    ]


def table(start_steps: float = 7.0, seed: int = 0, steps: int = 1000) -> str:
    """docs/elastic.md's table, then why each run that ended early ended."""
    rows = ["| scenario | engines: start (min-max) | steps done | mean engines | served / max | "
            "GPU time serving | samples lost | joins / leaves / drops / restarts | stalled, steps "
            "| waited below min, steps | steps at max | mean step s |", "|---" * 12 + "|"]
    ended = []
    for sc in scenarios(start_steps, steps):
        r = Sim(sc, seed).run()
        done, served = max(len(r.engines), 1), sum(r.engines)
        step_s = f"{r.seconds / len(r.engines):.2f}" if r.engines else "-"
        rows.append(
            f"| {sc.name} | {sc.engines} ({sc.min_engines}-{sc.max_engines}) | {len(r.engines)} "
            f"| {served / done:.1f} | {served / (done * sc.max_engines):.0%} | "
            f"{r.serving_time / r.gpu_time:.0%} | {r.lost:,} ({r.lost / max(r.samples, 1):.2%}) "
            f"| {r.joins} / {r.leaves} / {r.drops} / {r.restarts} | {r.stalled:.0f} | "
            f"{r.below_min:.0f} | {r.engines.count(sc.max_engines)} | {step_s} |")
        if r.ended:
            ended.append(f"- {sc.name}: ended with {len(r.engines)} step(s) done: {r.ended}")
    return "\n".join(rows + ([""] + ended if ended else []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--start-steps", type=float, default=7.0,
                        help="an engine's start, in steps (default 7: ~70 s of ~10 s steps)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args()
    print(table(args.start_steps, args.seed, args.steps))


if __name__ == "__main__":
    main()
