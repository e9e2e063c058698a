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
from typing import Any, Callable, Iterator

from grpo_ray.cluster.group import ActorGroup, work_deadline
from grpo_ray.config import ClusterConfig
from grpo_ray.contracts import PromptBatch, Rollout, Sampling


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
    """A generation in flight on every engine of a group, each on its even slice of the batch.

    Slice k (prompts a..b) samples with seed `sampling.seed + a`, so a slice generated again by
    a replacement engine is what the lost one would have returned. Its deadline follows from the
    largest slice's tokens (`EngineGroup.generate_deadline`)."""

    def __init__(self, group: "EngineGroup", batch: PromptBatch, sampling: Sampling) -> None:
        self.group, self.batch, self.sampling = group, batch, sampling
        self.slices = even_slices(len(batch), len(group.engines))
        self.deadline_s = group.generate_deadline(max(b - a for a, b in self.slices), sampling)
        # every slice is submitted now; the caller collects them as they arrive
        self._stream = group.group.stream(
            "generation", self._submit, self.deadline_s, range(len(self.slices)),
            setting="cluster.generate_floor_tokens_per_s, cluster.deadline_slack_s")

    def _submit(self, k: int) -> Any:
        a, b = self.slices[k]
        seed = None if self.sampling.seed is None else self.sampling.seed + a
        return self.group.engines[k].generate.remote(self.batch.prompt_ids[a:b],
                                                     dataclasses.replace(self.sampling, seed=seed))

    def arrivals(self) -> Iterator[tuple[int, Rollout]]:
        """(k, part) for each slice k as soon as its engine returns it; a lost or hung engine is
        replaced and its slice generated again (`ActorGroup.stream`)."""
        for k, part in self._stream:
            part.engine_index = [k] * len(part)
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
                 admit: Callable[[int], str | None] | None = None) -> None:
        if not engines:
            raise ValueError("EngineGroup: needs at least one engine")
        self.cluster = cluster = cluster or ClusterConfig()
        self.admit = admit
        self.group = ActorGroup("rollout engine", list(engines), start, cluster.max_restarts,
                                cluster.restart_timeout_s,
                                after_start=lambda i: self.admit(i) if self.admit else None,
                                notify=notify)
        self.engines = self.group.members
        """The engine handles (a replacement takes its predecessor's place in this list)."""
        self._on_shutdown = on_shutdown

    def __len__(self) -> int:
        return len(self.engines)

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
        return self._call("dtype query", lambda i: self.engines[i].lora_dtype.remote(), [0])[0]

    # ---- lost engines --------------------------------------------------------------------------
    def replace(self, i: int, reason: str) -> None:
        """Start engine i again in its bundle, admit it (`admit`), and say so through `notify`.
        ActorLostError when it cannot come back; the sync's error when it disagrees."""
        self.group.replace(i, reason)

    def shutdown(self) -> None:
        import ray

        for engine in self.engines:
            ray.kill(engine)
        if self._on_shutdown is not None:
            self._on_shutdown()
