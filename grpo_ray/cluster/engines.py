"""The rollout engines of a run as one group: the only place that calls an engine.

`EngineGroup` owns the engine actors (placed by `cluster.placement`), splits a batch of prompts
over them in even contiguous slices, gathers the parts and checks that every engine sampled with
the adapter version the caller expects (in the manner of OpenRLHF's `RayActorGroup`).
Evaluation, training and the adapter sync all go through it, and so does fault handling, so
that callers never branch on it:

- an engine whose process died (during a generation, an adapter load or a probe) is started
  again in its own placement bundle, gets the adapter every engine holds (and is checked by
  `after_replace`, which the weight sync sets), and the lost call is repeated with the same
  arguments: sampling seeds come from the caller, so the regenerated slice is what the lost
  engine would have returned.

Whether engines serve the learner's adapter is the weight sync's business
(`weight_sync.broadcast.AdapterBroadcast`): it verifies and repairs them through `replace`.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterator

from grpo_ray.contracts import PromptBatch, Rollout, Sampling
from grpo_ray.faults import ActorLostError, first_line, is_lost_actor


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
    a replacement engine is what the lost one would have returned."""

    def __init__(self, group: "EngineGroup", batch: PromptBatch, sampling: Sampling) -> None:
        self.group, self.batch, self.sampling = group, batch, sampling
        self.slices = even_slices(len(batch), len(group.engines))
        self._refs = {k: self._submit(k) for k in range(len(self.slices))}
        self._restarts = 0

    def _submit(self, k: int) -> Any:
        a, b = self.slices[k]
        seed = None if self.sampling.seed is None else self.sampling.seed + a
        return self.group.engines[k].generate.remote(self.batch.prompt_ids[a:b],
                                                     dataclasses.replace(self.sampling, seed=seed))

    def arrivals(self) -> Iterator[tuple[int, Rollout]]:
        """(k, part) for each slice k as soon as its engine returns it; an engine whose process
        is gone is replaced and its slice generated again (at most `max_restarts` times)."""
        import ray

        while self._refs:
            ready, _ = ray.wait(list(self._refs.values()), num_returns=1)
            k = next(k for k, ref in self._refs.items() if ref == ready[0])
            del self._refs[k]
            try:
                part = ray.get(ready[0])
            except Exception as e:  # noqa: BLE001 - lost engines are replaced, else raise
                if not is_lost_actor(e):
                    raise
                self._restarts += 1
                if self._restarts > self.group.max_restarts:
                    raise ActorLostError(
                        f"rollout engine {k} lost during generation ({first_line(e)}) after "
                        f"{self.group.max_restarts} restart(s) in the same call "
                        "(cluster.max_restarts); see the Ray logs of its node") from None
                self.group.replace(k, f"rollout engine {k} lost during generation "
                                      f"({first_line(e)})")
                self._refs[k] = self._submit(k)
                continue
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
    ActorLostError). `max_restarts`: engines started again within one call before it fails;
    `ready_timeout_s`: how long a replacement may take to start. `notify` receives one line per
    fault handled (the trainer passes its printer)."""

    def __init__(self, engines: list[Any], start: Callable[[int], Any] | None = None,
                 on_shutdown: Callable[[], None] | None = None, max_restarts: int = 2,
                 ready_timeout_s: float = 600.0,
                 notify: Callable[[str], None] = print) -> None:
        if not engines:
            raise ValueError("EngineGroup: needs at least one engine")
        self.engines = list(engines)
        self._start, self._on_shutdown = start, on_shutdown
        self.max_restarts, self.ready_timeout_s, self.notify = max_restarts, ready_timeout_s, notify
        self.restarts = 0
        """Engines started again over the group's life."""
        self.after_replace: Callable[[int], None] | None = None
        """Called with i once a replacement engine i has started and holds the group's adapter:
        the weight sync checks it there (raising an InfraError when it disagrees)."""
        self._payload: Any = None  # the adapter every engine holds (None: the base model)
        self._version = 0

    def __len__(self) -> int:
        return len(self.engines)

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

    def load_adapter(self, payload: Any) -> list[float]:
        """Load `payload` (an ObjectRef of one, so Ray ships it once per node) on every engine;
        seconds each engine took. The group keeps it for engines it starts later."""
        # An engine lost during the load is replaced with the previous adapter (what the others
        # still hold if this load fails), then loads this one like the rest.
        times = self._gather("adapter load", lambda i: self.engines[i].load_adapter.remote(payload))
        self._payload = payload
        self._version = self.adapter_versions()[0]
        return times

    def score(self, prompt_ids: list[list[int]],
              completion_ids: list[list[int]]) -> list[list[list[float]]]:
        """Every engine's log-probs of the same completions (`RolloutWorker.score`), per engine."""
        return self._gather("scoring",
                            lambda i: self.engines[i].score.remote(prompt_ids, completion_ids))

    def adapter_versions(self) -> list[int]:
        return self._gather("version query", lambda i: self.engines[i].adapter_version.remote())

    def adapter_identities(self) -> list[tuple[int, str | None]]:
        """Each engine's (version, digest) (`RolloutWorker.adapter_identity`)."""
        return self._gather("identity query",
                            lambda i: self.engines[i].adapter_identity.remote())

    def gpu_uuids(self) -> list[str | None]:
        return self._gather("GPU query", lambda i: self.engines[i].gpu_uuid.remote())

    def lora_dtype(self) -> str:
        return self._gather("dtype query", lambda i: self.engines[i].lora_dtype.remote(), [0])[0]

    # ---- lost engines --------------------------------------------------------------------------
    def _gather(self, what: str, submit: Callable[[int], Any],
                indices: Any = None) -> list[Any]:
        """`submit(i)` (an ObjectRef) on engines `indices` (default all) at once, then the
        results in that order. An engine whose process is gone is replaced and its call
        submitted again, at most `max_restarts` times in this call."""
        import ray

        indices = list(range(len(self.engines)) if indices is None else indices)
        results: dict[int, Any] = {}
        pending, restarts = indices, 0
        while pending:
            refs = [submit(i) for i in pending]
            ray.wait(refs, num_returns=len(refs))  # all done, results or errors
            lost: list[tuple[int, BaseException]] = []
            for i, ref in zip(pending, refs):
                try:
                    results[i] = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - sorted just below
                    if not is_lost_actor(e):
                        raise
                    lost.append((i, e))
            for i, e in lost:
                restarts += 1
                if restarts > self.max_restarts:
                    raise ActorLostError(
                        f"rollout engine {i} lost during {what} ({first_line(e)}) after "
                        f"{self.max_restarts} restart(s) in the same call "
                        "(cluster.max_restarts); see the Ray logs of its node") from None
                self.replace(i, f"rollout engine {i} lost during {what} ({first_line(e)})")
            pending = [i for i, _ in lost]
        return [results[i] for i in indices]

    def replace(self, i: int, reason: str) -> None:
        """Start engine i again in its bundle, load the adapter the others hold, check it
        (`after_replace`), and say so through `notify`. ActorLostError when it cannot."""
        import ray

        if self._start is None:
            raise ActorLostError(f"{reason}; this engine group cannot start engines")
        start = time.perf_counter()
        ray.kill(self.engines[i], no_restart=True)  # already dead, or failing the probe
        self.engines[i] = engine = self._start(i)
        try:
            ray.get(engine.__ray_ready__.remote(), timeout=self.ready_timeout_s)
            if self._payload is not None:
                ray.get(engine.load_adapter.remote(self._payload))
        except Exception as e:  # noqa: BLE001 - any failure to come back ends the run
            raise ActorLostError(f"{reason}; starting it again failed: {first_line(e)} "
                                 f"(cluster.restart_timeout_s={self.ready_timeout_s:g})") from None
        if self.after_replace is not None:
            self.after_replace(i)  # an InfraError when the new engine disagrees too
        self.restarts += 1
        self.notify(f"{reason}: started again in its placement bundle in "
                    f"{time.perf_counter() - start:.1f} s with adapter version {self._version}")

    def shutdown(self) -> None:
        import ray

        for engine in self.engines:
            ray.kill(engine)
        if self._on_shutdown is not None:
            self._on_shutdown()
