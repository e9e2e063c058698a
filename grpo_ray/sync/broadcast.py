"""The driver's side of the adapter sync, and the protocol's one owner (`AdapterSync`): a new
adapter version goes from the learner to every rollout engine, and every engine proves it serves
it. The trainer builds one `AdapterSync` and only says what it wants: `send` a new version,
`reset` the engines to a restored version (or the base model), `admit` a new engine. It never sees
how the tensors travel (`Transport`: CUDA IPC or the object store; `sync.sender` makes the
payloads, `sync.receiver` / `sync.merged` load them) nor how they are checked:

1. identity, exact: each engine's identity of what it serves (version, digest of the tensors it
   handed to vLLM, computed on the engine, and what it reports of their use) must equal the
   learner's identity of what it exported (`sync.digest`). Catches a missed load, an older
   version, damaged tensors;
2. the probe, for gross faults the identity cannot see (an adapter not applied in the forward
   pass, weights damaged after loading), judged against the learner's movement (`sync.probe`);
3. an engine that fails either is reloaded once, then replaced in its placement bundle (the
   engine group starts it and calls back `admit`, which loads and checks it); one that still
   disagrees ends the run with `SyncCheckError` (an InfraError: checkpoint, exit 3), whose
   message gives what was measured and the setting that decides.

The learner is reached through its `LearnerHandle` (deadlines; a lost learner is started again
and `MemberRestarted` raised to the trainer), the engines through their `EngineGroup` only.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

from grpo_ray.faults import InfraError, first_line
from grpo_ray.sync.probe import (ProbeRule, ProbeStats, SyncProbe, default_min_movement,
                                 flatten, probe_stats)


class SyncCheckError(InfraError):
    """An engine, started anew, still does not serve the learner's adapter."""

    kind = "sync check failed"


class Transport:
    """How a payload travels from the learner to the engines: the learner's export `form`
    (`LearnerWorker.export_adapter`) and the size of what moved."""

    name = ""
    form = ""

    def size(self, ref: Any) -> int:
        raise NotImplementedError


class ObjectStore(Transport):
    """A `PackedAdapter` in the engines' dtype through Ray's object store: one object that the
    engines of a node share. Works in every layout."""

    name, form = "object-store", "packed"

    def size(self, ref: Any) -> int:
        """Serialized size without fetching the object to the driver (small inlined objects,
        which the object store does not size, are cheap to fetch)."""
        import ray

        size = ray.experimental.get_object_locations([ref]).get(ref, {}).get("object_size")
        return int(size) if size else ray.get(ref).num_bytes


class CudaIpc(Transport):
    """A handle to one buffer in the learner's GPU memory, for engines on the learner's GPU (the
    colocated layout): each engine copies it device to device."""

    name, form = "cuda-ipc", "cuda-ipc"

    def size(self, ref: Any) -> int:
        import ray

        return ray.get(ref).num_bytes  # a small handle; the bytes it points to


class AdapterSync:
    """The adapter sync of one run (module docstring). `probe_ids` (`probe.probe_sequences`):
    the probe's sequences (None: the identity check alone); `rule` judges the probe (None: the
    defaults of `cluster.sync_probe_*`). Call `start` once the engines and the learner are up."""

    def __init__(self, learner: Any, engines: Any,
                 probe_ids: tuple[list[list[int]], list[list[int]]] | None = None,
                 rule: ProbeRule | None = None, notify: Callable[[str], None] = print) -> None:
        self.learner, self.engines, self.notify = learner, engines, notify
        self._probe_ids, self.rule = probe_ids, rule
        self.probe: SyncProbe | None = None
        self.transport: Transport | None = None
        """Chosen at the first send: CUDA IPC where every engine computes on the learner's
        GPU, else the object store."""
        self.fell_back = False
        """True once a CUDA IPC sync failed and the object store took over for good."""
        self.repairs = 0
        """Engines reloaded or replaced because they failed the sync check."""
        self.version = 0
        """The version every engine holds."""
        self._dtype: str | None = None  # the engines' LoRA dtype, asked once
        self._payload: Any = None  # ObjectRef of the version every engine holds (None: base)
        self._expected: tuple = (0, None)  # the identity every engine must report
        self._learner_now: list[float] = []  # the learner's probe log-probs at that version
        self._checked: dict[int, ProbeStats | None] = {}  # an admitted engine's figures

    def start(self) -> None:
        """Before any training: both sides score the probe with their base models (the
        reference of every later check), and the rule's default is resolved."""
        from grpo_ray.config import ClusterConfig

        self._dtype = self.engines.lora_dtype()
        self._expected = self._base_identity()
        rule = self.rule or ProbeRule.of(ClusterConfig())
        if rule.min_movement is None:
            rule = dataclasses.replace(rule, min_movement=default_min_movement(self._dtype))
        self.rule = rule
        if self._probe_ids is not None:
            prompts, completions = self._probe_ids
            learner_base = flatten(self.learner.call("the sync probe", "sequence_logprobs",
                                                     prompts, completions, 1.0))
            engine_base = [flatten(s) for s in self.engines.score(prompts, completions)]
            self.probe = SyncProbe(prompts, completions, learner_base, engine_base)
            self._learner_now = learner_base

    # ---- what the trainer asks for -------------------------------------------------------------
    def send(self, version: int, force: bool = False) -> dict[str, float]:
        """Export adapter `version` on the learner, load it on every engine, verify and repair
        them. `force`: the engines accept an older version too (a restored learner).

        Returns seconds `export_s` (learner side, until the payload is in the object store),
        `load_s` (slowest engine's unpack + register), `total_s`, `bytes` (the adapter's tensors;
        what the object store holds for `object-store`), `fallback_object_store`, and the check's
        figures (`verify`)."""
        from grpo_ray.cluster.group import MemberRestarted

        transport = self.transport or self._choose()
        out = None
        if isinstance(transport, CudaIpc):
            try:
                out = self._move(version, transport, force)
            except (InfraError, MemberRestarted):  # the learner or an engine lost for good
                raise
            except Exception as e:  # noqa: BLE001 - any failure of IPC: the object store works
                self.notify(f"CUDA IPC adapter sync failed, using Ray's object store from now "
                            f"on (slower; metric sync/fallback_object_store): {first_line(e)}")
                self.transport, self.fell_back = ObjectStore(), True
        if out is None:
            out = self._move(version, self.transport, force)
        out["fallback_object_store"] = float(self.fell_back)
        out.update(self.verify(version))
        return out

    def reset(self, version: int) -> dict[str, float]:
        """Every engine to `version` of a restored learner, older versions included; 0: back to
        the base model (a learner restarted before any checkpoint), with the check's state."""
        if version > 0:
            return self.send(version, force=True)
        self.engines.load_adapter(None, force=True)
        self._payload, self._expected, self.version = None, self._base_identity(), 0
        if self.probe is not None:
            self._learner_now = self.probe.learner_base
        return {}

    def admit(self, i: int) -> str:
        """A new engine i (a replacement, up with the base model): it loads the version every
        engine holds and must pass the same check as the others; SyncCheckError if it does not.
        What to add to its start line."""
        if self._payload is not None:
            self.engines.admission_call(i, "load_adapter", self._payload)
        problem, stats = self._check_new(i)
        if problem is not None:
            raise SyncCheckError(f"the new rollout engine {i} disagrees too: {problem}")
        self._checked[i] = stats
        return f"with adapter version {self.version}"

    def _base_identity(self) -> tuple:
        """The identity of the base model (version 0), as the learner states it before any
        export: what an engine without an adapter reports."""
        return tuple(self.learner.call("the sync check", "exported_identity"))

    # ---- moving the adapter --------------------------------------------------------------------
    def _choose(self) -> Transport:
        self._dtype = self._dtype or self.engines.lora_dtype()
        learner_gpu = self.learner.call("the first sync", "__ray_call__", _gpu_uuid)
        same_gpu = learner_gpu is not None and set(self.engines.gpu_uuids()) == {learner_gpu}
        self.transport = CudaIpc() if same_gpu else ObjectStore()
        return self.transport

    def _move(self, version: int, transport: Transport, force: bool) -> dict[str, float]:
        start = time.perf_counter()
        ref = self.learner.export(version, transport.form, self._dtype)
        export_s = time.perf_counter() - start
        load_times = self.engines.load_adapter(ref, force=force)
        self._payload, self.version = ref, version
        load_times = [t for t in load_times if t is not None]  # None: an engine dropped
        return {"export_s": export_s, "load_s": max(load_times, default=0.0),
                "total_s": time.perf_counter() - start, "bytes": float(transport.size(ref))}

    # ---- verify and repair ---------------------------------------------------------------------
    def verify(self, version: int) -> dict[str, float]:
        """After the load of `version`: every engine's identity, then its probe; a failing one
        is repaired (reloaded, then replaced) or the run ends (`SyncCheckError`). Returns
        `probe_s` (of which `probe_learner_s`: the learner's identity and probe log-probs,
        `probe_engines_s`: the engines'), the learner's `probe/movement` and each engine's
        `probe/slope`, `probe/slope_se`, `probe/gap` (`/engine_<i>`)."""
        start = time.perf_counter()
        p = self.probe
        identity = tuple(self.learner.call("the sync check", "exported_identity"))
        if identity[0] != version:
            raise RuntimeError(f"the learner's last export is version {identity[0]}, not {version}")
        self._expected = identity
        if p is not None:
            self._learner_now = flatten(self.learner.call(
                "the sync probe", "sequence_logprobs", p.prompt_ids, p.completion_ids, 1.0))
        engines_start = time.perf_counter()
        serving = self.engines.serving()
        identities = self.engines.adapter_identities(serving)
        scores = (self.engines.score(p.prompt_ids, p.completion_ids, serving) if p is not None
                  else [None] * len(identities))
        out = {"probe_learner_s": engines_start - start,
               "probe_engines_s": time.perf_counter() - engines_start}
        for i, held, score in zip(serving, identities, scores):
            if held is None:  # dropped meanwhile (an elastic fleet without room for it)
                continue
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
            stats = probe_stats(flatten(score), self.probe.engine_base_of(i), self._learner_now,
                                self.probe.learner_base)
        if held != self._expected:
            return (f"it holds {_describe(held)}, the learner exported "
                    f"{_describe(self._expected)} (an exact check: no setting relaxes it)"), stats
        if stats is not None and stats.fails(self.rule):
            return (f"its probe log-probs do not move as the learner's: {stats.describe()} "
                    f"(fails outside slope [{self.rule.min_slope:g}, {self.rule.max_slope:g}] "
                    f"by {self.rule.z:g} standard errors, once the learner moved "
                    f">= {self.rule.min_movement:g}: cluster.sync_probe_min_slope, "
                    "_max_slope, _z, _min_movement)"), stats
        return None, stats

    def _check_new(self, i: int) -> tuple[str | None, ProbeStats | None]:
        """Engine i's identity and probe, asked without replacing it (`admission_call`)."""
        p = self.probe
        held = self.engines.admission_call(i, "adapter_identity")
        score = (self.engines.admission_call(i, "score", p.prompt_ids, p.completion_ids)
                 if p is not None else None)
        return self._judge(i, tuple(held), score)

    def _repair(self, i: int, problem: str) -> ProbeStats | None:
        """Reload engine i's adapter once; if it still fails, replace the engine (the new one
        is checked in `admit`). The figures it ends with."""
        what = (f"rollout engine {i} failed the sync check at adapter version "
                f"{self._expected[0]}: {problem}")
        self.repairs += 1
        try:  # a hung engine passes cluster.call_timeout_s here, and is replaced below
            held_version = self.engines.admission_call(i, "adapter_identity")[0]
            self.engines.admission_call(i, "load_adapter", self._payload,
                                        reload=held_version == self._expected[0])
            again, stats = self._check_new(i)
        except Exception as e:  # noqa: BLE001 - whatever broke the reload, a restart follows
            again, stats = f"the reload failed ({first_line(e)})", None
        if again is None:
            self.notify(f"{what}; adapter reloaded, the engine agrees now")
            return stats
        try:
            self.engines.replace(i, f"{what}; reloaded, still: {again}")
        except SyncCheckError as e:
            raise SyncCheckError(f"{what}; reloaded, still failing; replaced, and {e}") from None
        return self._checked.pop(i, None)


def _figures(i: int, stats: ProbeStats) -> dict[str, float]:
    import math

    out = {f"probe/gap/engine_{i}": stats.gap, "probe/movement": stats.movement}
    if math.isfinite(stats.slope):  # NaN while the learner has not moved at all
        out[f"probe/slope/engine_{i}"] = stats.slope
        out[f"probe/slope_se/engine_{i}"] = stats.slope_se
    return out


def _describe(identity: tuple) -> str:
    """An adapter identity (version, digest, modules it applies to) in words."""
    version, digest, modules = identity
    if digest is None:
        return f"adapter version {version} with digest none (the base model)"
    return f"adapter version {version} with digest {digest[:12]} applied to {modules} modules"


def _gpu_uuid(actor: Any) -> str | None:
    """Run through `actor.__ray_call__`: the GPU the actor computes on."""
    from grpo_ray.sync.sender import gpu_uuid

    return gpu_uuid()
