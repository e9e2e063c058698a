"""The rollout engines of a run as one group: the only place that calls an engine.

`EngineGroup` owns the engine actors (placed by `cluster.placement`), splits a batch of prompts
over them in even contiguous slices, gathers the parts and checks that every engine sampled with
the adapter version the caller expects (in the manner of OpenRLHF's `RayActorGroup`).
Evaluation, training and the adapter sync all go through it, and so does fault handling, so
that callers never branch on it:

- every call goes through the role-neutral `ActorGroup` (`cluster.group`), with a deadline: an
  engine whose process died or whose call ran past its deadline (a hang) is started again in its
  own placement bundle, admitted by the adapter sync (`admit`: the adapter every engine holds,
  the identity check and the probe), and the lost call is repeated with the same arguments:
  sampling seeds come from the caller, so the regenerated slice is what the lost engine would
  have returned;
- the adapter sync (`sync.broadcast.AdapterSync`) reaches the engines only through this group:
  its loads, identity queries and probe scores on every engine, and `admission_call` for the
  checks of a new engine (no replacement from inside an admission).
"""
from __future__ import annotations

import dataclasses
import time
from collections import Counter
from typing import Any, Callable, Iterator

from grpo_ray.cluster.fleet import Fleet
from grpo_ray.cluster.group import ActorGroup, work_deadline
from grpo_ray.config import ClusterConfig
from grpo_ray.contracts import PromptBatch, Rollout, Sampling
from grpo_ray.faults import first_line


def even_slices(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges covering n items, sizes differing by at most one, empty
    ranges left out (nothing is dropped: every prompt of a batch is answered)."""
    if parts < 1:
        raise ValueError(f"even_slices: needs at least one part (got {parts})")
    size, extra = divmod(n, parts)
    bounds, start = [], 0
    for k in range(parts):
        end = start + size + (k < extra)
        if end > start:
            bounds.append((start, end))
        start = end
    return bounds


class PendingGeneration:
    """A generation in flight on every serving engine of a group, each on its even slice of the
    batch.

    Prompt j of the batch samples with seed `sampling.seed + j` whichever engine answers it, so a
    slice generated again by a replacement engine, or by another engine once its own is dropped,
    is what the lost one would have returned, and a fleet of any size samples the same batch.
    Its deadline follows from the largest slice's tokens (`EngineGroup.generate_deadline`)."""

    def __init__(self, group: "EngineGroup", batch: PromptBatch, sampling: Sampling) -> None:
        self.group, self.batch, self.sampling = group, batch, sampling
        serving = group.serving()
        self.slices = even_slices(len(batch), len(serving))
        self.engine_of = {k: serving[k] for k in range(len(self.slices))}
        """The engine (slot) generating each slice."""
        self.deadline_s = group.generate_deadline(max(b - a for a, b in self.slices), sampling)
        # every slice is submitted now; the caller collects them as they arrive
        self._stream = group.group.stream(
            "generation", self._submit, self.deadline_s, range(len(self.slices)),
            setting="cluster.generate_floor_tokens_per_s, cluster.deadline_slack_s",
            route=self._route)

    def _route(self, k: int) -> int:
        """The engine of slice k; once that engine is dropped, the serving engine with the
        fewest slices of this batch."""
        i = self.engine_of[k]
        if self.group.engines[i] is None:
            load = Counter(self.engine_of.values())
            i = self.engine_of[k] = min(self.group.serving(), key=lambda j: load[j])
        return i

    def _submit(self, k: int) -> Any:
        a, b = self.slices[k]
        seed = None if self.sampling.seed is None else self.sampling.seed + a
        return self.group.engines[self._route(k)].generate.remote(
            self.batch.prompt_ids[a:b], dataclasses.replace(self.sampling, seed=seed))

    def arrivals(self) -> Iterator[tuple[int, Rollout]]:
        """(k, part) for each slice k as soon as its engine returns it; a lost or hung engine is
        replaced and its slice generated again (`ActorGroup.stream`)."""
        for k, part in self._stream:
            part.engine_index = [self.engine_of[k]] * len(part)
            yield k, part

    def result(self, expect_version: int | None = None) -> Rollout:
        """Every slice, joined in prompt order (see `EngineGroup.generate`)."""
        parts = dict(self.arrivals())
        ordered = [parts[k] for k in range(len(self.slices))]
        check_versions([p.adapter_version for p in ordered], expect_version)
        return Rollout.concat(ordered)


def check_versions(versions: list[int], expect: int | None) -> None:
    """RuntimeError when an engine sampled with another adapter version than `expect`."""
    if expect is not None and any(v != expect for v in versions):
        raise RuntimeError(f"engines sampled with adapter versions {versions}, the learner is "
                           f"at {expect}")


class EngineGroup:
    """Handles of the rollout engines (RolloutWorker actors), and how to start engine i again.

    `start(i)` starts engine i in its placement bundle (None: a lost engine ends the call with
    ActorLostError). `admit(i)` readies a new engine i for work (the adapter sync's `admit`,
    which returns text for the restart line and raises when the engine disagrees; None: any
    engine that is up). `cluster` gives the restart bound and the deadlines (`ClusterConfig`:
    `max_restarts`, `restart_timeout_s`, `generate_floor_tokens_per_s`, `deadline_slack_s`,
    `call_timeout_s`). `notify` receives one line per fault handled (the trainer passes its
    printer)."""

    def __init__(self, engines: list[Any], start: Callable[[int], Any] | None = None,
                 on_shutdown: Callable[[], None] | None = None,
                 cluster: ClusterConfig | None = None,
                 notify: Callable[[str], None] = print,
                 admit: Callable[[int], str | None] | None = None,
                 fleet: Fleet | None = None, placer: Any = None) -> None:
        if not engines:
            raise ValueError("EngineGroup: needs at least one engine")
        self.cluster = cluster = cluster or ClusterConfig()
        self.admit = admit
        self.fleet = fleet or Fleet(len(engines), len(engines), len(engines),
                                    cluster.max_restarts, start is not None)
        """The engines' states and the rules of an elastic fleet (`cluster.fleet`)."""
        self.placer = placer
        """Where new engines are asked for and started (`placement.EnginePlacer`; None: a
        fixed fleet)."""
        self.group = ActorGroup("rollout engine", list(engines), start, cluster.max_restarts,
                                cluster.restart_timeout_s,
                                after_start=lambda i: self.admit(i) if self.admit else None,
                                notify=notify, health=self.fleet)
        self.engines = self.group.members
        """The engine handles by slot (a replacement takes its predecessor's place in this list;
        an engine gone for good leaves None)."""
        self._on_shutdown = on_shutdown
        self._coming: dict[int, tuple[Any, float]] = {}  # slot -> (ready ref, asked at)

    def __len__(self) -> int:
        return len(self.serving())

    def serving(self) -> list[int]:
        """The slots of the engines that are given work (`GroupHealth.working`)."""
        return self.fleet.working()

    @property
    def restarts(self) -> int:
        """Engines started again over the group's life (lost or hung)."""
        return self.group.restarts

    @property
    def notify(self) -> Callable[[str], None]:
        return self.group.notify

    @notify.setter
    def notify(self, fn: Callable[[str], None]) -> None:
        self.group.notify = fn

    # ---- deadlines -----------------------------------------------------------------------------
    def generate_deadline(self, prompts: int, sampling: Sampling) -> float:
        """Seconds one engine may take to answer `prompts` prompts (`sampling.n` completions of up
        to `sampling.max_tokens` each) before it counts as hung."""
        c = self.cluster
        return work_deadline(prompts * sampling.n * sampling.max_tokens,
                             c.generate_floor_tokens_per_s, c.deadline_slack_s)

    def _call(self, what: str, submit: Callable[[int], Any], indices: Any = None) -> list[Any]:
        """A small call on the engines `indices` (default all), with `call_timeout_s`."""
        return self.group.call(what, submit, self.cluster.call_timeout_s, indices,
                               setting="cluster.call_timeout_s")

    # ---- calls ---------------------------------------------------------------------------------
    def generate(self, batch: PromptBatch, sampling: Sampling,
                 expect_version: int | None = None) -> Rollout:
        """`sampling.n` completions of every prompt of `batch`, prompt-major, from all engines at
        once (`Rollout.engine_index` says which engine sampled each row). With
        `expect_version`, a RuntimeError when any engine sampled with another adapter version
        (an engine that missed a sync must never train the learner silently)."""
        return self.submit(batch, sampling).result(expect_version)

    def submit(self, batch: PromptBatch, sampling: Sampling) -> "PendingGeneration":
        """Start `generate` on every engine and return at once: the caller collects the parts
        as they arrive (`PendingGeneration.arrivals`) or all together (`.result`)."""
        return PendingGeneration(self, batch, sampling)

    def load_adapter(self, payload: Any, force: bool = False, reload: bool = False,
                     indices: list[int] | None = None) -> list[float]:
        """Load `payload` (an ObjectRef of one, so Ray ships it once per node) on the engines
        `indices` (default all); seconds each engine took. `force` accepts any version, an older
        one included, and None for the base model (version 0): how the engines follow a learner
        restored from a checkpoint; `reload` loads the version an engine holds again (a repair).
        An engine lost during the load is replaced (and admitted with what the sync held before),
        then loads this one like the rest."""
        return self._call("adapter load", lambda i: self.engines[i].load_adapter.remote(
            payload, force=force, reload=reload), indices)

    def score(self, prompt_ids: list[list[int]], completion_ids: list[list[int]],
              indices: list[int] | None = None) -> list[list[list[float]]]:
        """The engines' (default all) log-probs of the same completions
        (`RolloutWorker.score`), per engine."""
        return self._call("scoring", lambda i: self.engines[i].score.remote(
            prompt_ids, completion_ids), indices)

    def adapter_versions(self) -> list[int]:
        return self._call("version query", lambda i: self.engines[i].adapter_version.remote())

    def adapter_identities(self, indices: list[int] | None = None) -> list[tuple]:
        """The engines' (default all) identity of the adapter they serve
        (`RolloutWorker.adapter_identity`: version, digest, ...)."""
        return self._call("identity query", lambda i: self.engines[i].adapter_identity.remote(),
                          indices)

    def admission_call(self, i: int, method: str, *args: Any, **kwargs: Any) -> Any:
        """`engine_i.<method>(...)` with `cluster.call_timeout_s`, without replacing the engine
        when it fails: for the checks of a new engine, whose failure ends its admission (and so
        its replacement) instead of starting another one from inside it."""
        import ray

        return ray.get(getattr(self.engines[i], method).remote(*args, **kwargs),
                       timeout=self.cluster.call_timeout_s)

    def gpu_uuids(self) -> list[str | None]:
        return self._call("GPU query", lambda i: self.engines[i].gpu_uuid.remote())

    def lora_dtype(self) -> str:
        return self._call("dtype query", lambda i: self.engines[i].lora_dtype.remote(),
                          self.serving()[:1])[0]

    # ---- lost engines --------------------------------------------------------------------------
    def replace(self, i: int, reason: str) -> None:
        """Start engine i again in its bundle, admit it (`admit`), and say so through `notify`.
        ActorLostError when it cannot come back; the sync's error when it disagrees."""
        self.group.replace(i, reason)

    # ---- an elastic fleet ----------------------------------------------------------------------
    def between_steps(self) -> None:
        """Grow and shrink the fleet by `cluster.fleet`'s rules, between two steps (nothing runs
        on the engines then): engines whose placement came are started, engines that came up are
        admitted, engines on draining nodes leave, missing ones are asked for. Each join and
        leave is said through `notify`. Nothing to do for a fixed fleet."""
        import ray

        if self.placer is None:
            return
        fleet, now = self.fleet, time.monotonic()
        for i in sorted(fleet.waiting):
            node = self.placer.placed(i)
            if node is not None:
                fleet.placed(i, node)
                self.engines[i] = self.placer.start(i)
                self._coming[i] = (self.engines[i].__ray_ready__.remote(), self._coming[i][1])
        for i, (ready, _) in list(self._coming.items()):
            if i in fleet.waiting or not ray.wait([ready], timeout=0)[0]:
                continue
            try:
                ray.get(ready)
                fleet.up(i)
            except Exception as e:  # noqa: BLE001 - its constructor failed: it never serves
                self._leave(i, f"its start failed ({first_line(e)})")
        decision = fleet.decide(self.placer.draining())
        for i, why in decision.leave.items():
            self._leave(i, why)
        for i in decision.admit:
            asked = self._coming.pop(i)[1]
            try:
                said = self.admit(i) if self.admit else ""
            except Exception as e:  # noqa: BLE001 - refused: the fleet goes on without it
                self._leave(i, f"refused at its admission: {first_line(e)}")
                continue
            fleet.joined(i)
            self.notify(f"rollout engine {i} joined on node {fleet.nodes.get(i, '?')[:12]}: "
                        f"{time.monotonic() - asked:.0f} s from its request, {said}; "
                        f"{len(self)} engine(s) serve")
        for _ in range(decision.ask):
            i = fleet.ask()
            self.engines.append(None)
            self.placer.request(i)
            self._coming[i] = (None, now)

    def _leave(self, i: int, why: str) -> None:
        """Engine i stops for good: its actor and its placement go."""
        self._coming.pop(i, None)
        self.group.drop(i, f"rollout engine {i} left: {why}")
        self.placer.release(i)

    def shutdown(self) -> None:
        import ray

        for engine in self.engines:
            if engine is not None:
                ray.kill(engine)
        if self.placer is not None:
            self.placer.shutdown()
        if self._on_shutdown is not None:
            self._on_shutdown()
