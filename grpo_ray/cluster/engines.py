"""The rollout engines of a run as one group: the only place that calls an engine to generate.

`EngineGroup` owns the engine actors (placed by `cluster.placement`), splits a batch of prompts
over them in even contiguous slices, gathers the parts with one `ray.get` and checks that every
engine sampled with the adapter version the caller expects (in the manner of OpenRLHF's
`RayActorGroup`). Evaluation, training and the adapter sync all go through it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

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


class EngineGroup:
    """Handles of the rollout engines (RolloutWorker actors), and how to start engine i again."""

    def __init__(self, engines: list[Any], start: Callable[[int], Any] | None = None,
                 on_shutdown: Callable[[], None] | None = None) -> None:
        if not engines:
            raise ValueError("EngineGroup: needs at least one engine")
        self.engines = list(engines)
        self._start = start
        self._on_shutdown = on_shutdown

    def __len__(self) -> int:
        return len(self.engines)

    def generate(self, batch: PromptBatch, sampling: Sampling,
                 expect_version: int | None = None) -> Rollout:
        """`sampling.n` completions of every prompt of `batch`, prompt-major, from all engines at
        once. With `expect_version`, a RuntimeError when any engine sampled with another adapter
        version (an engine that missed a sync must never train the learner silently)."""
        import ray

        refs = []
        for engine, (a, b) in zip(self.engines, even_slices(len(batch), len(self.engines))):
            seed = None if sampling.seed is None else sampling.seed + a
            refs.append(engine.generate.remote(batch.prompt_ids[a:b],
                                               dataclasses.replace(sampling, seed=seed)))
        parts = ray.get(refs)
        if expect_version is not None:
            versions = [p.adapter_version for p in parts]
            if any(v != expect_version for v in versions):
                raise RuntimeError(f"engines sampled with adapter versions {versions}, the "
                                   f"learner is at {expect_version}")
        return Rollout.concat(parts)

    def load_adapter(self, payload: Any) -> list[float]:
        """Load `payload` (an ObjectRef of one, so Ray ships it once per node) on every engine;
        seconds each engine took."""
        import ray

        return ray.get([e.load_adapter.remote(payload) for e in self.engines])

    def adapter_versions(self) -> list[int]:
        import ray

        return ray.get([e.adapter_version.remote() for e in self.engines])

    def gpu_uuids(self) -> list[str | None]:
        import ray

        return ray.get([e.gpu_uuid.remote() for e in self.engines])

    def lora_dtype(self) -> str:
        import ray

        return ray.get(self.engines[0].lora_dtype.remote())

    def score(self, prompt_ids: list[list[int]],
              completion_ids: list[list[int]]) -> list[list[list[float]]]:
        """Every engine's log-probs of the same completions (`RolloutWorker.score`), per engine."""
        import ray

        return ray.get([e.score.remote(prompt_ids, completion_ids) for e in self.engines])

    def shutdown(self) -> None:
        import ray

        for engine in self.engines:
            ray.kill(engine)
        if self._on_shutdown is not None:
            self._on_shutdown()
