"""The engine group's fault handling with real vLLM CPU engines in a real placement group: an
engine killed with SIGKILL is started again in its own bundle with the group's adapter and
regenerates exactly what it would have (kills in the middle of a call: tests/integration/
test_faults.py); the sync probe repairs, then replaces, then refuses an engine whose log-probs
are not the learner's."""
from __future__ import annotations

import os
import signal

import pytest

from grpo_ray.cluster.engines import even_slices
from grpo_ray.config import load_config
from grpo_ray.contracts import PromptBatch, Sampling
from grpo_ray.faults import ActorLostError
from grpo_ray.weight_sync.probe import SyncProbe, probe_gap, probe_sequence


def test_even_slices_cover_every_prompt():
    assert even_slices(5, 2) == [(0, 3), (3, 5)]
    assert even_slices(1, 3) == [(0, 1)]
    with pytest.raises(ValueError):
        even_slices(3, 0)


def test_probe_gap_removes_each_sides_base_offset():
    # a 4-bit learner's log-probs sit 0.3 nats below a bf16 engine's on every token: no gap
    assert probe_gap([-1.0, -2.0], [-1.5, -2.5], [-1.3, -2.3], [-1.8, -2.8]) == pytest.approx(0)
    # the engine kept its base model while the learner moved by 0.4 and 0.2 nats
    assert probe_gap([-1.5, -2.5], [-1.5, -2.5], [-1.4, -3.0], [-1.8, -2.8]) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="lengths 2, 2, 1, 2"):
        probe_gap([0.0, 0.0], [0.0, 0.0], [0.0], [0.0, 0.0])


@pytest.fixture(scope="module")
def setting(ray_local, tiny_model_path, tokenizer):
    """One engine placed as training places it, a PEFT model standing for the learner (its
    log-probs computed by transformers in this process), and the probe on both."""
    from helpers import chat_prompts, hf_model, naive_logprobs, peft_model

    from grpo_ray.cluster.placement import place_engines
    from grpo_ray.rollout.worker import RolloutWorker
    from grpo_ray.weight_sync.sender import packed_adapter

    cfg = load_config("configs/tiny-cpu.yaml", ["cluster.max_restarts=1",
                                                "cluster.restart_timeout_s=120"])
    engines = place_engines(cfg, RolloutWorker, [(tiny_model_path, cfg.rollout, 8, "auto", 0, 0)])
    lines: list[str] = []
    engines.notify = lines.append
    prompt, completion = probe_sequence(tokenizer)
    base, learner = hf_model(tiny_model_path), peft_model(tiny_model_path, seed=1)
    engines.set_probe(SyncProbe(prompt, completion, naive_logprobs(base, prompt, completion),
                                tolerance=0.01))
    # the form the trainer sends: one buffer in the object store, read in place on the CPU
    payload = packed_adapter(learner, 1, "float32")
    engines.load_adapter(ray_local.put(payload))
    assert engines.verify(naive_logprobs(learner, prompt, completion))[0] < 1e-4
    # vLLM scales lora_B in place as it activates an adapter: the engine must have copied it
    assert (ray_local.get(engines._payload).buffer == payload.buffer).all()
    batch = PromptBatch(chat_prompts(tokenizer), [[], []], ["", ""], ["", ""])
    yield engines, lines, batch, packed_adapter
    engines.shutdown()


def engine_pid(ray, engine) -> int:
    return ray.get(engine.__ray_call__.remote(lambda self: os.getpid()))


def _where(self):
    import ray

    return os.getpid(), ray.get_runtime_context().get_placement_group_id()


def test_killed_engine_comes_back_and_regenerates_the_same_completions(ray_local, setting):
    engines, lines, batch, _ = setting
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
    assert lines[0].endswith("s with adapter version 1, sync probe gap " + lines[0].split()[-1])
    assert float(lines[0].split()[-1]) < 1e-4


def _serve_noise(self, noisy):
    """From now on every adapter this engine loads is `noisy` (a stand-in for weights that
    arrive damaged), whatever version it is sent."""
    import dataclasses

    load = self.adapter.load
    self.adapter.load = lambda payload, *a, **k: load(
        dataclasses.replace(noisy, version=payload.version), *a, **k)


def test_sync_probe_repairs_then_replaces_then_refuses(ray_local, tiny_model_path, setting):
    from helpers import peft_model

    engines, lines, _, packed_adapter = setting
    learner_now = engines._learner_now
    noisy = packed_adapter(peft_model(tiny_model_path, seed=2), 1, "float32")
    lines[:] = []

    # damaged weights under the right version: the reload repairs them
    ray_local.get(engines.engines[0].load_adapter.remote(noisy, reload=True))
    gaps = engines.verify(learner_now)
    assert gaps[0] < 1e-4 and engines.repairs == 1
    assert lines[-1].startswith("rollout engine 0 failed the sync probe at adapter version 1 "
                                "(gap ") and "adapter reloaded, gap now" in lines[-1]

    # every load damaged: the reload fails the probe again, a new engine passes it
    restarts = engines.restarts
    ray_local.get(engines.engines[0].__ray_call__.remote(_serve_noise, noisy))
    ray_local.get(engines.engines[0].load_adapter.remote(noisy, reload=True))
    assert engines.verify(learner_now)[0] < 1e-4
    assert engines.repairs == 2 and engines.restarts == restarts + 1
    assert "started again in its placement bundle" in lines[-1]

    # the learner's log-probs are not what any engine serves: a clear error, not a loop
    wrong = [x + 0.5 for x in learner_now]
    with pytest.raises(ActorLostError, match=r"rollout engine 0 failed the sync probe at adapter "
                                             r"version 1 \(gap 0.5 .*a new engine disagrees too"):
        engines.verify(wrong)
    assert engines.verify(learner_now)[0] < 1e-4  # the group goes on with a good engine


def test_an_engine_that_cannot_start_again_is_a_clear_error(ray_local, setting):
    engines, _, batch, _ = setting
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
