"""The engine group's fault handling with real vLLM CPU engines in a real placement group: an
engine killed with SIGKILL is started again in its own bundle with the group's adapter and
regenerates exactly what it would have (kills in the middle of a call: tests/integration/
test_faults.py); the adapter sync (`AdapterSync`: its `verify`, and its `admit` of every engine the
group starts) repairs, then replaces, then refuses an engine that does not serve the learner's
adapter."""
from __future__ import annotations

import os
import signal
import sys

import pytest

from grpo_ray.cluster.engines import even_slices
from grpo_ray.cluster.learner import LearnerHandle
from grpo_ray.config import load_config
from grpo_ray.contracts import PromptBatch, Sampling
from grpo_ray.faults import ActorLostError
from grpo_ray.sync.broadcast import AdapterSync, SyncCheckError
from grpo_ray.sync.probe import ProbeRule, probe_sequences


def test_even_slices_cover_every_prompt():
    assert even_slices(5, 2) == [(0, 3), (3, 5)]
    assert even_slices(1, 3) == [(0, 1)]
    with pytest.raises(ValueError):
        even_slices(3, 0)


class StandInLearner:
    """The learner's side of the sync on the tiny model: the base model until `train`, then a
    PEFT model with a random adapter (what the learner would hold after training)."""

    def __init__(self, model_path: str) -> None:
        from helpers import hf_model

        self.path, self.model, self.exported = model_path, hf_model(model_path), (0, None, 0)

    def train(self, seed: int) -> None:
        from helpers import peft_model

        self.model = peft_model(self.path, seed=seed)

    def export_adapter(self, version: int, transport: str = "packed", dtype: str | None = None):
        from grpo_ray.sync.sender import lora_modules, packed_adapter

        payload = packed_adapter(self.model, version, dtype)
        self.exported = (version, payload.digest, lora_modules(payload.names))
        return payload

    def exported_identity(self):
        return self.exported

    def sequence_logprobs(self, prompts, completions, temperature=None):
        from helpers import naive_logprobs

        return [naive_logprobs(self.model, p, c, temperature or 1.0)
                for p, c in zip(prompts, completions)]


# Ray's workers cannot import this test module: ship StandInLearner by value.
import ray.cloudpickle  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def setting(ray_local, tiny_model_path, tokenizer):
    """One engine placed as training places it, a stand-in learner actor, and the sync with its
    check attached: version 1 synced and verified."""
    from helpers import chat_prompts

    from grpo_ray.cluster.placement import place_engines
    from grpo_ray.rollout.worker import RolloutWorker

    cfg = load_config("configs/tiny-cpu.yaml", ["cluster.max_restarts=1",
                                                "cluster.restart_timeout_s=120"])
    engines = place_engines(cfg, RolloutWorker, [(tiny_model_path, cfg.rollout, 8, "auto", 0, 0)])
    lines: list[str] = []
    engines.notify = lines.append
    learner = ray_local.remote(StandInLearner).options(num_cpus=0).remote(tiny_model_path)
    sync = AdapterSync(LearnerHandle(learner, None, cfg.cluster), engines,
                       probe_sequences(tokenizer), ProbeRule.of(cfg.cluster), notify=lines.append)
    engines.admit = sync.admit
    sync.start()
    ray_local.get(learner.train.remote(seed=1))
    out = sync.send(1)
    # the engine serves the learner's adapter: slope 1, the old gap ~0
    assert out["probe/slope/engine_0"] == pytest.approx(1, abs=1e-3)
    assert out["probe/gap/engine_0"] < 1e-4 and out["probe/movement"] > 0.01
    assert out["fallback_object_store"] == 0 and sync.transport.name == "object-store"
    # vLLM scales lora_B in place as it activates an adapter: the engine must have copied it
    payload = ray_local.get(sync._payload)
    assert ray_local.get(engines.engines[0].adapter_identity.remote()) == (1, payload.digest, 14)
    batch = PromptBatch(chat_prompts(tokenizer), [[], []], ["", ""], ["", ""])
    yield engines, lines, batch, sync, learner
    engines.shutdown()


def engine_pid(ray, engine) -> int:
    return ray.get(engine.__ray_call__.remote(lambda self: os.getpid()))


def _where(self):
    import ray

    return os.getpid(), ray.get_runtime_context().get_placement_group_id()


def test_killed_engine_comes_back_and_regenerates_the_same_completions(ray_local, setting):
    engines, lines, batch, sync, _ = setting
    sampling = Sampling(n=2, max_tokens=16, temperature=1.0, seed=11)
    before = engines.generate(batch, sampling, expect_version=1)
    pid, group = ray_local.get(engines.engines[0].__ray_call__.remote(_where))
    restarts, lines[:] = engines.restarts, []

    os.kill(pid, signal.SIGKILL)  # between two calls: noticed by the next one
    after = engines.generate(batch, sampling, expect_version=1)
    new_pid, new_group = ray_local.get(engines.engines[0].__ray_call__.remote(_where))
    assert new_pid != pid and new_group == group  # same placement group (and bundle index)
    assert after == before  # same completions and log-probs, adapter version 1
    assert engines.restarts == restarts + 1 and len(lines) == 1
    assert lines[0].startswith("rollout engine 0 lost during generation (ActorDiedError")
    assert " started again in its placement bundle in " in lines[0]
    assert lines[0].endswith("s with adapter version 1")
    # the sync admitted the new engine (`admit`): it serves the adapter
    assert sync._checked.pop(0).slope == pytest.approx(1, abs=1e-3)


def test_sync_check_repairs_then_replaces_then_refuses(ray_local, tiny_model_path, setting):
    from helpers import inject

    engines, lines, _, sync, learner = setting
    lines[:] = []
    repairs, restarts = sync.repairs, engines.restarts

    # the engine serves the base model under the right version and digest: only the probe
    # sees it (slope 0), and the reload repairs it
    ray_local.get(engines.engines[0].__ray_call__.remote(inject, "no-adapter-now"))
    out = sync.verify(1)
    assert out["probe/slope/engine_0"] == pytest.approx(1, abs=1e-3)
    assert sync.repairs == repairs + 1 and engines.restarts == restarts
    assert lines[-1].startswith("rollout engine 0 failed the sync check at adapter version 1: "
                                "its probe log-probs do not move as the learner's: slope 0 ")
    assert lines[-1].endswith("; adapter reloaded, the engine agrees now")

    # every load damaged (one tensor doubled): the identity fails again after the reload, a new
    # engine passes
    ray_local.get(engines.engines[0].__ray_call__.remote(inject, "double", persistent=True))
    ray_local.get(engines.engines[0].load_adapter.remote(sync._payload, reload=True))
    sync.verify(1)
    assert sync.repairs == repairs + 2 and engines.restarts == restarts + 1
    assert "it holds adapter version 1 with digest " in lines[-1]
    assert "reloaded, still: it holds adapter version 1" in lines[-1]
    assert "started again in its placement bundle" in lines[-1]

    # the learner exported something no engine holds: a clear error with the digests, no loop
    right = ray_local.get(learner.exported_identity.remote())
    ray_local.get(learner.__ray_call__.remote(_set_exported, (1, "f" * 64, right[2])))
    try:
        with pytest.raises(SyncCheckError, match=(
                r"rollout engine 0 failed the sync check at adapter version 1: it holds adapter "
                rf"version 1 with digest {right[1][:12]} applied to 14 modules, the learner exported "
                r"adapter version 1 with digest ffffffffffff .*the new rollout engine 0 disagrees "
                r"too")):
            sync.verify(1)
    finally:
        ray_local.get(learner.__ray_call__.remote(_set_exported, right))
    assert "probe/slope/engine_0" in sync.verify(1)  # the group goes on with a good engine


def _set_exported(self, identity):
    self.exported = identity


def test_an_engine_that_cannot_start_again_is_a_clear_error(ray_local, setting):
    engines, _, batch, _, _ = setting
    start = engines.group.start
    engines.group.start = lambda i: _bad_engine(ray_local)
    try:
        ray_local.kill(engines.engines[0])
        with pytest.raises(ActorLostError, match="rollout engine 0 lost during generation "
                                                 r"\(ActorDiedError.*starting it again failed"):
            engines.generate(batch, Sampling(n=1, max_tokens=4, seed=0))
    finally:
        engines.group.start = start


def _bad_engine(ray):
    from grpo_ray.config import RolloutConfig
    from grpo_ray.rollout.worker import RolloutWorker

    return ray.remote(RolloutWorker).options(num_cpus=0).remote(
        "/nonexistent/model", RolloutConfig(), 8)
