"""The rollout engines of a run as one group: the only place that calls an engine.

`EngineGroup` owns the engine actors (placed by `cluster.placement`), splits a batch of prompts
over them in even contiguous slices, gathers the parts and checks that every engine sampled with
the adapter version the caller expects (in the manner of OpenRLHF's `RayActorGroup`).
Evaluation, training and the adapter sync all go through it, and so does fault handling, so
that callers never branch on it:

- every call goes through the role-neutral `ActorGroup` (`cluster.group`), with a deadline: an
  engine whose process died or whose call ran past its deadline (a hang) is started again in its
  own placement bundle, gets the adapter every engine holds (and passes the sync probe), and the
  lost call is repeated with the same arguments: sampling seeds come from the caller, so the
  regenerated slice is what the lost engine would have returned;
- the weight sync (`sync.broadcast`) checks every engine after each sync and a new engine
  through `after_replace`.
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
    ActorLostError). `cluster` gives the restart bound and the deadlines (`ClusterConfig`:
    `max_restarts`, `restart_timeout_s`, `generate_floor_tokens_per_s`, `deadline_slack_s`,
    `call_timeout_s`). `notify` receives one line per fault handled (the trainer passes its
    printer)."""

    def __init__(self, engines: list[Any], start: Callable[[int], Any] | None = None,
                 on_shutdown: Callable[[], None] | None = None,
                 cluster: ClusterConfig | None = None,
                 notify: Callable[[str], None] = print) -> None:
        if not engines:
            raise ValueError("EngineGroup: needs at least one engine")
        self.cluster = cluster = cluster or ClusterConfig()
        self.group = ActorGroup("rollout engine", list(engines), start, cluster.max_restarts,
                                cluster.restart_timeout_s, after_start=self._after_replace,
                                notify=notify)
        self.engines = self.group.members
        """The engine handles (a replacement takes its predecessor's place in this list)."""
        self._on_shutdown = on_shutdown
        self.after_replace: Callable[[int], None] | None = None
        """Called with i once a replacement engine i has started and holds the group's adapter:
        the weight sync checks it there (raising an InfraError when it disagrees)."""
        self._payload: Any = None  # the adapter every engine holds (None: the base model)
        self._version = 0

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

    def load_adapter(self, payload: Any, force: bool = False) -> list[float]:
        """Load `payload` (an ObjectRef of one, so Ray ships it once per node) on every engine;
        seconds each engine took. The group keeps it for engines it starts later. `force`
        accepts any version, an older one included, and None for the base model (version 0):
        how the engines follow a learner restored from a checkpoint."""
        # An engine lost during the load is replaced with the previous adapter (what the others
        # still hold if this load fails), then loads this one like the rest.
        times = self._call("adapter load",
                           lambda i: self.engines[i].load_adapter.remote(payload, force=force))
        self._payload = payload
        self._version = self.adapter_versions()[0]
        return times

    def score(self, prompt_ids: list[list[int]],
              completion_ids: list[list[int]]) -> list[list[list[float]]]:
        """Every engine's log-probs of the same completions (`RolloutWorker.score`), per engine."""
        return self._call("scoring",
                          lambda i: self.engines[i].score.remote(prompt_ids, completion_ids))

    def adapter_versions(self) -> list[int]:
        return self._call("version query", lambda i: self.engines[i].adapter_version.remote())

    def adapter_identities(self) -> list[tuple[int, str | None]]:
        """Each engine's (version, digest) (`RolloutWorker.adapter_identity`)."""
        return self._call("identity query", lambda i: self.engines[i].adapter_identity.remote())

    def gpu_uuids(self) -> list[str | None]:
        return self._call("GPU query", lambda i: self.engines[i].gpu_uuid.remote())

    def lora_dtype(self) -> str:
        return self._call("dtype query", lambda i: self.engines[i].lora_dtype.remote(), [0])[0]

    # ---- lost engines --------------------------------------------------------------------------
    def replace(self, i: int, reason: str) -> None:
        """Start engine i again in its bundle, load the adapter the others hold, check it
        (`after_replace`), and say so through `notify`. ActorLostError when it cannot."""
        self.group.replace(i, reason)

    def _after_replace(self, i: int) -> str:
        """The engine role's hook on a new engine i (`ActorGroup.after_start`): the group's
        adapter, then the sync's check (`after_replace`); what to add to the restart line."""
        import ray

        if self._payload is not None:
            ray.get(self.engines[i].load_adapter.remote(self._payload),
                    timeout=self.cluster.call_timeout_s)
        if self.after_replace is not None:
            self.after_replace(i)  # an InfraError when the new engine disagrees too
        return f"with adapter version {self._version}"

    def shutdown(self) -> None:
        import ray

        for engine in self.engines:
            ray.kill(engine)
        if self._on_shutdown is not None:
            self._on_shutdown()
