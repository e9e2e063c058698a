"""The rollout fleet's decisions, as pure code: no Ray. Between two steps the driver tells the
fleet what it sees (the engines whose placement came or whose process came up, the nodes being
drained) and `Fleet.decide` says what to do; `cluster.engines.EngineGroup` performs it on real
actors, `benchmarks/elastic_sim.py` on a simulated trace of nodes arriving and leaving.

An engine's life (`health.State`, one slot per engine for its whole life):

    asked ──placement came──► starting ──up──► stale ──admitted (the sync check passed)──► admitted
      │                                          └── refused ──► gone ◄── left (node draining)
      └── (waits for room; an autoscaler's demand)

Only admitted engines are given work, and the fleet changes only between steps, so a step's
slices are cut over engines that do not move under them. The rules (`decide`):

1. an admitted engine on a draining node (a preemption notice, `ray drain-node`) leaves: it has
   finished its slice of the step just done and is given no other;
2. an engine that is up is admitted: it loads the current adapter and must pass the identity
   check and the probe (`sync.broadcast.AdapterSync.admit`); one that fails leaves;
3. while admitted + asked-for engines are fewer than `max_engines`, one more is asked for: its
   placement waits for room (a node that joins, or one the autoscaler adds);
4. a lost engine whose replacement finds no room within `cluster.replace_timeout_s` is dropped
   while `min_engines` stay admitted, else the run ends (`health.CallHealth.no_room`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from grpo_ray.cluster.health import GroupHealth, State


@dataclass
class Decision:
    """What to do between two steps, in this order: `leave` (engine -> reason), `admit`
    (engines), `ask` (how many more engines to ask for)."""

    leave: dict[int, str] = field(default_factory=dict)
    admit: list[int] = field(default_factory=list)
    ask: int = 0

    def __bool__(self) -> bool:
        return bool(self.leave or self.admit or self.ask)


class Fleet(GroupHealth):
    """The rollout engines' states and the rules that grow and shrink them (module docstring):
    `engines` at the start, `min_engines` <= that <= `max_engines`."""

    def __init__(self, engines: int, min_engines: int, max_engines: int, max_restarts: int,
                 can_start: bool = True) -> None:
        if not 1 <= min_engines <= engines <= max_engines:
            raise ValueError(f"fleet: needs 1 <= min_engines ({min_engines}) <= engines "
                             f"({engines}) <= max_engines ({max_engines})")
        super().__init__("rollout engine", engines, max_restarts, can_start,
                         min_members=min_engines)
        self.max_members = max_engines
        self.nodes: dict[int, str] = {}
        """The node each engine runs on, where known."""
        self.waiting: set[int] = set()
        """Engines asked for whose placement has not come (no room yet)."""
        self.joins = 0
        """Engines admitted after the start (not replacements)."""
        self.leaves = 0
        """Engines that left (a draining node, a failed admission) or were dropped."""

    def ask(self) -> int:
        """One more engine is asked for: its slot (it waits for room)."""
        i = self.add()
        self.waiting.add(i)
        return i

    def placed(self, i: int, node: str | None = None) -> None:
        """Engine i's placement came: its process starts (on `node`)."""
        self.waiting.discard(i)
        if node is not None:
            self.nodes[i] = node

    def joined(self, i: int) -> None:
        """Engine i (up, not a replacement) passed its admission."""
        self.admit(i, replacement=False)
        self.joins += 1

    def gone(self, i: int) -> None:
        """Engine i is stopped for good (it left, was refused or dropped)."""
        if self.states[i] is not State.GONE:
            self.leaves += 1
        super().gone(i)
        self.waiting.discard(i)

    left = gone

    def decide(self, draining: set[str] = frozenset()) -> Decision:
        """What to do between two steps; `draining` names the nodes being drained."""
        d = Decision()
        for i, state in enumerate(self.states):
            node = self.nodes.get(i)
            if state is State.ADMITTED and node is not None and node in draining:
                d.leave[i] = f"its node {node[:12]} is draining"
            elif state is State.STALE and i in self.joining:
                d.admit.append(i)
        staying = len(self.admitted()) - len(d.leave)
        coming = sum(s in (State.STARTING, State.STALE) for s in self.states)
        d.ask = max(0, self.max_members - staying - coming)
        return d
