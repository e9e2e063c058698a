"""Hangs and the learner's loss in a real run (local Ray, vLLM CPU engine, reward actors, PEFT
learner), each a real signal to a real actor process, each run ending where an uninterrupted run
ends (sampling seeds derive from the step, checkpoints restore the learner exactly):

- the rollout engine stopped (SIGSTOP) in step 2's generation: its deadline passes, it is killed,
  started again in its bundle and the slice generated again;
- the learner killed (SIGKILL) in step 3's update with `output.save_every=2`: started again in
  its bundle, checkpoint step-000002 restored, the engines brought back to its version, step 3
  trained again;
- (slow) the learner stopped (SIGSTOP) in step 2's update before any checkpoint: back to step 0
  and the base model;
- (slow) the learner stopped (SIGSTOP) in step 3's sync probe, after its update: the check's
  learner calls have the same deadline (`cluster.call_timeout_s`), and the run goes back to
  checkpoint step-000002.

Deadlines are shortened (`cluster.deadline_slack_s=10`) so that a hang is found in seconds."""
from __future__ import annotations

import os
import signal

import pytest
import ray
import torch
from helpers import figures, jsonl

from grpo_ray.config import load_config
from grpo_ray.driver.trainer import Trainer

STEPS = 3
REWARDS = "reward.functions=[{name: correctness}, {name: 'rewards_for_tests:text_length'}]"


def build(out, model_path, lines: list[str], *overrides: str) -> Trainer:
    cfg = load_config("configs/tiny-cpu.yaml", [
        f"output.dir={out}", f"model.path={model_path}", f"algorithm.total_steps={STEPS}",
        "learner.learning_rate=5e-3", "learner.warmup_ratio=0", "logging.tensorboard=false",
        "logging.samples_per_step=8", "eval.num_samples=2", "output.save_every=2",
        "cluster.deadline_slack_s=10", "cluster.call_timeout_s=60", REWARDS, *overrides])
    return Trainer(cfg, print_fn=lines.append).setup()


def _signal_in_generate(self, seed: int, signum: int):
    """This engine's process sends itself `signum` when it starts the generation whose first
    prompt samples with `seed` (one training step's slice; the probe and evaluations pass)."""
    original = self.llm.generate

    def generate(prompts, params, *args, **kwargs):
        if isinstance(params, list) and params and params[0].seed == seed:
            os.kill(os.getpid(), signum)
        return original(prompts, params, *args, **kwargs)

    self.llm.generate = generate


def _signal_in_update(self, nth: int, signum: int):
    """This learner's process sends itself `signum` in its `nth` update (`train_step`)."""
    original, calls = self._prepare, [0]

    def prepare(*args, **kwargs):
        calls[0] += 1
        if calls[0] == nth:
            os.kill(os.getpid(), signum)
        return original(*args, **kwargs)

    self._prepare = prepare


def _signal_in_sync_probe(self, version: int, signum: int):
    """This learner's process sends itself `signum` when the sync check has it score the probe
    (at temperature 1) after exporting adapter `version` (step `version`'s sync)."""
    original = self._logprobs

    def logprobs(mb, train, temperature=None):
        if temperature == 1.0 and self._exported[0] == version:
            os.kill(os.getpid(), signum)
        return original(mb, train, temperature)

    self._logprobs = logprobs


def finish(trainer: Trainer) -> dict:
    """The run's final LoRA tensors and what it wrote, then its actors are shut down."""
    try:
        lora = ray.get(trainer.learner.actor.state_dict.remote())["lora"]
        return {"lora": lora, "completions": jsonl(trainer.out / "completions.jsonl"),
                "figures": figures(trainer.out), "eval": [
                    {**r, "metrics": {k: v for k, v in r["metrics"].items() if k != "time_s"}}
                    for r in jsonl(trainer.out / "eval.jsonl")],
                "metrics": jsonl(trainer.out / "metrics.jsonl"),
                "sanity": trainer.sanity_answers["after"]}
    finally:
        trainer.close()


def assert_same_run(b: dict, a: dict) -> None:
    assert b["completions"] == a["completions"]
    assert b["figures"] == a["figures"] and len(a["figures"]) == STEPS
    assert any(r["reward/std"] > 0 for r in a["figures"])  # the updates had something to learn
    assert b["eval"] == a["eval"] and b["sanity"] == a["sanity"]
    assert any("lora_B" in n and t.abs().max() > 0 for n, t in a["lora"].items())
    for name, tensor in a["lora"].items():
        torch.testing.assert_close(b["lora"][name], tensor, rtol=0, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def uninterrupted(ray_local, tiny_model_path, tmp_path_factory):
    trainer = build(tmp_path_factory.mktemp("a"), tiny_model_path, [])
    trainer.fit()
    return finish(trainer)


def test_a_hung_engine_and_a_killed_learner_are_replaced_and_the_run_is_unchanged(
        ray_local, tiny_model_path, tmp_path, uninterrupted):
    lines: list[str] = []
    b = build(tmp_path, tiny_model_path, lines)
    ray.get(b.engines.engines[0].__ray_call__.remote(
        _signal_in_generate, b.rollouts.seed(1), signal.SIGSTOP))
    ray.get(b.learner.actor.__ray_call__.remote(_signal_in_update, 3, signal.SIGKILL))
    b.fit()
    faults = [line for line in lines if " started again " in line or "learner lost" in line]
    print("\n" + "\n".join(faults))  # the restart times, for docs/reliability.md
    assert len(faults) == 2, lines
    assert faults[0].startswith(
        "rollout engine 0 did not finish generation within its deadline of 11 s "
        "(cluster.generate_floor_tokens_per_s, cluster.deadline_slack_s): hung: started again "
        "in its placement bundle in ")
    assert faults[0].endswith(" with adapter version 1")  # checked by the sync, as every engine
    assert faults[1].startswith("learner lost at step 3: learner 0 lost during the update "
                                "(ActorDiedError")
    assert "restored checkpoint step-000002 (engines at adapter version 2)" in faults[1]
    assert faults[1].endswith(": 1 step to redo")
    assert b.engines.restarts == 1 and b.recovery.learner_restarts == 1
    result = finish(b)
    rows = result["metrics"]
    assert [r["faults/engine_restarts"] for r in rows] == [0.0, 1.0, 1.0]
    assert [r["faults/learner_restarts"] for r in rows] == [0.0, 0.0, 1.0]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert_same_run(result, uninterrupted)


def run_with_a_hung_learner(tmp_path, model_path, signal_in, at: int, *overrides: str):
    """A run whose learner SIGSTOPs itself (`signal_in(self, at, SIGSTOP)`): its one
    `learner lost` line and what it finished with."""
    lines: list[str] = []
    b = build(tmp_path, model_path, lines, *overrides)
    ray.get(b.learner.actor.__ray_call__.remote(signal_in, at, signal.SIGSTOP))
    b.fit()
    lost = [line for line in lines if line.startswith("learner lost")]
    print("\n" + "\n".join(lost))
    assert len(lost) == 1, lines
    return lost[0], finish(b)


@pytest.mark.slow
def test_a_hung_learner_before_any_checkpoint_goes_back_to_the_base_model(
        ray_local, tiny_model_path, tmp_path, uninterrupted):
    lost, result = run_with_a_hung_learner(tmp_path, tiny_model_path, _signal_in_update, 2,
                                           "output.save_every=0")
    assert lost.startswith("learner lost at step 2: learner 0 did not finish the update within "
                           "its deadline of ")
    assert ("no checkpoint yet: back to step 0 (engines at adapter version 0)" in lost
            and lost.endswith(": 2 steps to redo"))
    assert [r["faults/learner_restarts"] for r in result["metrics"]] == [1.0, 1.0, 1.0]
    assert_same_run(result, uninterrupted)


@pytest.mark.slow
def test_a_learner_hung_in_the_sync_check_is_replaced_and_the_run_is_unchanged(
        ray_local, tiny_model_path, tmp_path, uninterrupted):
    lost, result = run_with_a_hung_learner(tmp_path, tiny_model_path, _signal_in_sync_probe, 3,
                                           "cluster.call_timeout_s=15")
    assert lost.startswith("learner lost at step 3: learner 0 did not finish the sync probe "
                           "within its deadline of 15 s (cluster.call_timeout_s): hung")
    assert ("restored checkpoint step-000002 (engines at adapter version 2)" in lost
            and lost.endswith(": 1 step to redo"))
    assert [r["faults/learner_restarts"] for r in result["metrics"]] == [0.0, 0.0, 1.0]
    assert_same_run(result, uninterrupted)
