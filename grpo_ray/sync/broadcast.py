"""The driver's half of the weight sync, and its one owner: a new adapter version goes from the
learner actor to every rollout engine, and every engine proves it serves it.

export -> transport -> load -> verify -> repair, all in `AdapterBroadcast.sync`; the training
loop never sees how the tensors travel (`sync.sender` makes the payloads,
`sync.receiver` / `sync.merged` load them) nor how they are checked:

1. identity, exact: each engine's (version, digest of the tensors it handed to vLLM, computed on
   the engine) must equal the learner's (version, digest of what it exported)
   (`sync.digest`). Catches a missed load, an older version, damaged tensors;
2. the probe, for gross faults the identity cannot see (an adapter not applied in the forward
   pass, weights damaged after loading), judged against the learner's movement
   (`sync.probe`);
3. an engine that fails either is reloaded once, then replaced in its placement bundle
   (`EngineGroup.replace`, which calls back `after_replace` to check the new engine); one that
   still disagrees ends the run with `SyncCheckError` (an InfraError: checkpoint, exit 3), whose
   message gives what was measured and the setting that decides.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

from grpo_ray.faults import InfraError, first_line
from grpo_ray.sync.probe import (
    ProbeRule,
    ProbeStats,
    SyncProbe,
    default_min_movement,
    flatten,
    probe_stats,
)


class SyncCheckError(InfraError):
    """An engine, started anew, still does not serve the learner's adapter."""

    kind = "sync check failed"


class AdapterBroadcast:
    """Two transports, chosen at the first sync: `cuda-ipc` when every engine computes on the
    learner's GPU (the colocated layout), else `object-store` (a `PackedAdapter` in the engines'
    dtype, one object the engines of a node share). A failing CUDA IPC sync falls back to the
    object store for good, said once through `notify` and in the metrics
    (`fallback_object_store` 1 from then on).

    `attach` turns the verification on (the trainer does; a bare broadcast only moves adapters).
    """

    def __init__(self, notify: Callable[[str], None] = print) -> None:
        self.notify = notify
        self._dtype: str | None = None  # the engines' LoRA dtype, asked once
        self.transport: str | None = None
        """`cuda-ipc` or `object-store`, once the first sync has chosen."""
        self.fell_back = False
        """True once a CUDA IPC sync failed and the object store took over."""
        self.repairs = 0
        """Engines reloaded or replaced because they failed the sync check."""
        self.rule: ProbeRule | None = None
        self.probe: SyncProbe | None = None
        self._learner: Any = None
        self._engines: Any = None
        self._payload: Any = None  # ObjectRef of the newest payload
        self._expected: tuple[int, str | None, int] = (0, None, 0)  # what every engine must report
        self._learner_now: list[float] = []  # the learner's probe log-probs at that version
        self._checked: dict[int, ProbeStats | None] = {}  # a replacement's figures
        self._ask: Callable[..., Any] = self._ask_without_deadline

    # ---- set-up ------------------------------------------------------------------------------
    def attach(self, learner: Any, engines: Any,
               probe_ids: tuple[list[list[int]], list[list[int]]] | None = None,
               rule: ProbeRule | None = None, ask: Callable[..., Any] | None = None) -> None:
        """Verify every later sync of `engines` (an EngineGroup, all at version 0) against
        `learner` (an actor handle), and every engine the group starts anew. With `probe_ids`
        (`probe.probe_sequences`) both sides score the probe now, with their base models, and
        `rule` judges it (None: the defaults of `cluster.sync_probe_*`). `ask(what, method,
        *args)` makes the check's learner calls (the trainer's `learner_call`: a deadline, and a
        hung or lost learner started again); None: plain calls to `learner`, without one."""
        from grpo_ray.config import ClusterConfig

        self._learner, self._engines = learner, engines
        self._ask = ask or self._ask_without_deadline
        self.rule = rule or ProbeRule.of(ClusterConfig())
        if self.rule.min_movement is None:
            self.rule = dataclasses.replace(
                self.rule, min_movement=default_min_movement(engines.lora_dtype()))
        if probe_ids is not None:
            prompts, completions = probe_ids
            learner_base = flatten(self._ask("the sync probe", "sequence_logprobs", prompts,
                                             completions, 1.0))
            engine_base = [flatten(s) for s in engines.score(prompts, completions)]
            self.probe = SyncProbe(prompts, completions, learner_base, engine_base)
            self._learner_now = learner_base
        engines.after_replace = self._check_replacement

    def _ask_without_deadline(self, what: str, method: str, *args: Any) -> Any:
        import ray

        return ray.get(getattr(self._learner, method).remote(*args))

    # ---- the sync ----------------------------------------------------------------------------
    def sync(self, learner: Any, engines: Any, version: int, force: bool = False,
             wait_export: Callable[[Any], None] | None = None) -> dict[str, float]:
        """Export adapter `version` on `learner` (an actor handle), load it on every engine of
        `engines` (an EngineGroup) and, once `attach`ed, verify and repair them. `force`: the
        engines accept an older version too (a learner restored from a checkpoint).
        `wait_export(ref)` waits for the export (default: without a deadline); the trainer's
        waits with one and replaces a learner lost on the way.

        Returns seconds `export_s` (learner side, until the payload is in the object store),
        `load_s` (slowest engine's unpack + register), `total_s`, `bytes` (the adapter's
        tensors; what the object store holds for `object-store`), `fallback_object_store`, and
        the check's figures (`verify`).
        """
        import ray

        if self.transport is None:
            self._dtype = engines.lora_dtype()
            learner_gpu = (self._ask("the first sync", "__ray_call__", _gpu_uuid)
                           if engines is self._engines else
                           ray.get(learner.__ray_call__.remote(_gpu_uuid)))
            same_gpu = learner_gpu is not None and set(engines.gpu_uuids()) == {learner_gpu}
            self.transport = "cuda-ipc" if same_gpu else "object-store"
        out = None
        if self.transport == "cuda-ipc":
            try:
                out = self._sync(learner, engines, version, "cuda-ipc", force, wait_export)
            except InfraError:  # the learner or an engine lost for good: not the transport
                raise
            except Exception as e:  # noqa: BLE001 - any failure of IPC: the object store works
                self.notify(f"CUDA IPC adapter sync failed, using Ray's object store from now "
                            f"on (slower; metric sync/fallback_object_store): {first_line(e)}")
                self.transport, self.fell_back = "object-store", True
        if out is None:
            out = self._sync(learner, engines, version, "packed", force, wait_export)
        out["fallback_object_store"] = float(self.fell_back)
        if engines is self._engines:
            self._learner = learner  # the current one (a restarted learner is another actor)
            out.update(self.verify(version))
        return out

    def to_base(self, learner: Any, engines: Any) -> None:
        """Every engine back to the base model (version 0) and the check with it: where the
        engines follow a learner restarted before any checkpoint (`learner` is the new one)."""
        engines.load_adapter(None, force=True)
        self._payload, self._expected = None, (0, None, 0)
        if engines is self._engines:
            self._learner = learner
            if self.probe is not None:
                self._learner_now = self.probe.learner_base

    def _sync(self, learner: Any, engines: Any, version: int, form: str, force: bool = False,
              wait_export: Callable[[Any], None] | None = None) -> dict[str, float]:
        import ray

        start = time.perf_counter()
        payload_ref = learner.export_adapter.remote(version, form, self._dtype)
        if wait_export is None:
            ray.wait([payload_ref], fetch_local=False)
        else:
            wait_export(payload_ref)
        export_s = time.perf_counter() - start
        load_times = engines.load_adapter(payload_ref, force=force)
        self._payload = payload_ref
        total_s = time.perf_counter() - start
        size = (ray.get(payload_ref).num_bytes if form == "cuda-ipc"  # a small handle
                else _object_bytes(payload_ref))
        return {"export_s": export_s, "load_s": max(load_times, default=0.0),
                "total_s": total_s, "bytes": float(size)}

    # ---- verify and repair -------------------------------------------------------------------
    def verify(self, version: int) -> dict[str, float]:
        """After the load of `version`: every engine's identity, then its probe; a failing one
        is repaired (reloaded, then replaced) or the run ends (`SyncCheckError`). Returns
        `probe_s` (of which `probe_learner_s`: the learner's identity and probe log-probs,
        `probe_engines_s`: the engines'), the learner's `probe/movement` and each engine's
        `probe/slope`, `probe/slope_se`, `probe/gap` (`/engine_<i>`)."""
        start = time.perf_counter()
        engines, p = self._engines, self.probe
        identity = tuple(self._ask("the sync check", "exported_identity"))
        if identity[0] != version:
            raise RuntimeError(f"the learner's last export is version {identity[0]}, not {version}")
        self._expected = identity  # type: ignore[assignment]
        if p is not None:
            self._learner_now = flatten(self._ask("the sync probe", "sequence_logprobs",
                                                  p.prompt_ids, p.completion_ids, 1.0))
        engines_start = time.perf_counter()
        identities = engines.adapter_identities()
        scores = (engines.score(p.prompt_ids, p.completion_ids) if p is not None
                  else [None] * len(identities))
        out = {"probe_learner_s": engines_start - start,
               "probe_engines_s": time.perf_counter() - engines_start}
        for i, (held, score) in enumerate(zip(identities, scores)):
            problem, stats = self._judge(i, tuple(held), score)
            if problem is not None:
                stats = self._repair(i, problem)
            if stats is not None:
                out.update(_figures(i, stats))
        out["probe_s"] = time.perf_counter() - start
        return out

    def _judge(self, i: int, held: tuple, score: list[list[float]] | None
               ) -> tuple[str | None, ProbeStats | None]:
        """(what is wrong with engine i, or None; its probe figures)."""
        stats = None
        if score is not None and self.probe is not None:
            stats = probe_stats(flatten(score), self.probe.engine_base[i], self._learner_now,
                                self.probe.learner_base)
        if held != self._expected:
            return (f"it holds adapter version {held[0]} with digest {_short(held[1])}, the "
                    f"learner exported version {self._expected[0]} with digest "
                    f"{_short(self._expected[1])} (an exact check: no setting relaxes it)"), stats
        if stats is not None and self.rule is not None and stats.fails(self.rule):
            return (f"its probe log-probs do not move as the learner's: {stats.describe()} "
                    f"(fails outside slope [{self.rule.min_slope:g}, {self.rule.max_slope:g}] "
                    f"by {self.rule.z:g} standard errors, once the learner moved "
                    f">= {self.rule.min_movement:g}: cluster.sync_probe_min_slope, "
                    "_max_slope, _z, _min_movement)"), stats
        return None, stats

    def _check_engine(self, i: int) -> tuple[str | None, ProbeStats | None]:
        import ray

        engine, p, timeout = self._engines.engines[i], self.probe, self._call_timeout_s()
        held = ray.get(engine.adapter_identity.remote(), timeout=timeout)
        score = (ray.get(engine.score.remote(p.prompt_ids, p.completion_ids), timeout=timeout)
                 if p is not None else None)
        return self._judge(i, tuple(held), score)

    def _repair(self, i: int, problem: str) -> ProbeStats | None:
        """Reload engine i's adapter once; if it still fails, replace the engine (its check runs
        in `_check_replacement`). The figures it ends with."""
        import ray

        what = (f"rollout engine {i} failed the sync check at adapter version "
                f"{self._expected[0]}: {problem}")
        self.repairs += 1
        engine = self._engines.engines[i]
        try:  # a hung engine passes cluster.call_timeout_s here, and is replaced below
            held_version = ray.get(engine.adapter_identity.remote(),
                                   timeout=self._call_timeout_s())[0]
            ray.get(engine.load_adapter.remote(self._payload,
                                               reload=held_version == self._expected[0]),
                    timeout=self._call_timeout_s())
            again, stats = self._check_engine(i)
        except Exception as e:  # noqa: BLE001 - whatever broke the reload, a restart follows
            again, stats = f"the reload failed ({first_line(e)})", None
        if again is None:
            self.notify(f"{what}; adapter reloaded, the engine agrees now")
            return stats
        try:
            self._engines.replace(i, f"{what}; reloaded, still: {again}")
        except SyncCheckError as e:
            raise SyncCheckError(f"{what}; reloaded, still failing; replaced, and {e}") from None
        return self._checked.pop(i, None)

    def _call_timeout_s(self) -> float:
        """The deadline of the check's own engine calls (`cluster.call_timeout_s`): a hang in a
        repair raises, and the engine is replaced or the run ends, instead of waiting forever."""
        return self._engines.cluster.call_timeout_s

    def _check_replacement(self, i: int) -> None:
        """`EngineGroup.after_replace`: the new engine i (holding the group's adapter) must pass
        the same check as the others."""
        problem, stats = self._check_engine(i)
        if problem is not None:
            raise SyncCheckError(f"the new rollout engine {i} disagrees too: {problem}")
        self._checked[i] = stats


def _figures(i: int, stats: ProbeStats) -> dict[str, float]:
    import math

    out = {f"probe/gap/engine_{i}": stats.gap, "probe/movement": stats.movement}
    if math.isfinite(stats.slope):  # NaN while the learner has not moved at all
        out[f"probe/slope/engine_{i}"] = stats.slope
        out[f"probe/slope_se/engine_{i}"] = stats.slope_se
    return out


def _short(digest: str | None) -> str:
    return "none (the base model)" if digest is None else digest[:12]


def _gpu_uuid(actor: Any) -> str | None:
    """Run through `actor.__ray_call__`: the GPU the actor computes on."""
    from grpo_ray.sync.sender import gpu_uuid

    return gpu_uuid()


def _object_bytes(ref: Any) -> int:
    """Serialized size of an object without fetching it to the driver (small inlined objects,
    which the object store does not size, are cheap to fetch)."""
    import ray

    size = ray.experimental.get_object_locations([ref]).get(ref, {}).get("object_size")
    return int(size) if size else ray.get(ref).num_bytes
