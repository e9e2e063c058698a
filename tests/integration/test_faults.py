"""Faults in a real run (local Ray, vLLM CPU engine, reward actors, PEFT learner), each a real
SIGKILL of a real actor process: the run goes on, loses nothing, and ends where an uninterrupted
run ends. Then a reward that returns NaN everywhere stops the run with one line naming it, after
checkpointing the last completed step."""
from __future__ import annotations

import os
import signal

import pytest
import ray
import torch
from helpers import figures, jsonl

from grpo_ray.config import RewardFunctionConfig, load_config
from grpo_ray.driver.checkpoint import check_checkpoint, latest_checkpoint
from grpo_ray.driver.trainer import Trainer

STEPS = 2
REWARDS = "reward.functions=[{name: correctness}, {name: 'rewards_for_tests:text_length'}]"


def build(out, model_path, lines: list[str]) -> Trainer:
    cfg = load_config("configs/tiny-cpu.yaml", [
        f"output.dir={out}", f"model.path={model_path}", f"algorithm.total_steps={STEPS + 1}",
        "learner.learning_rate=5e-3", "learner.warmup_ratio=0", "logging.tensorboard=false",
        "logging.samples_per_step=8", "eval.num_samples=2", REWARDS])
    return Trainer(cfg, print_fn=lines.append).setup()


def pid_of(actor) -> int:
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))


def _die_in_generate(self):
    """This engine's process SIGKILLs itself in the middle of its next generation."""
    self.llm.generate = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)


def _die_in_adapter_load(self):
    """This engine's process SIGKILLs itself when the next adapter version arrives."""
    self.adapter.load = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)


def run(trainer: Trainer, faults: bool) -> dict:
    """STEPS steps and the final evaluation; with `faults`, four processes are killed on the
    way: a reward worker (between steps), the engine during the first sync, the engine in the
    middle of the second step's generation, and the engine before the evaluation."""
    engines = trainer.engines
    if faults:
        os.kill(pid_of(trainer.rewards.workers[0]), signal.SIGKILL)
        ray.get(engines.engines[0].__ray_call__.remote(_die_in_adapter_load))
    trainer.run_step()
    if faults:
        ray.get(engines.engines[0].__ray_call__.remote(_die_in_generate))
    trainer.run_step()
    if faults:
        os.kill(pid_of(engines.engines[0]), signal.SIGKILL)
    return trainer.evaluate("after")


@pytest.fixture(scope="module")
def runs(ray_local, tiny_model_path, tmp_path_factory):
    """Run A uninterrupted; run B with the faults (kept open for the reward test)."""
    a_lines: list[str] = []
    a = build(tmp_path_factory.mktemp("a"), tiny_model_path, a_lines)
    try:
        a_eval = run(a, faults=False)
        a_lora = ray.get(a.learner.actor.state_dict.remote())["lora"]
    finally:
        a.close()
    b_lines: list[str] = []
    b = build(tmp_path_factory.mktemp("b"), tiny_model_path, b_lines)
    b_eval = run(b, faults=True)
    yield (a, a_eval, a_lora), (b, b_eval, b_lines)
    b.close()


def test_killed_actors_are_replaced_and_the_run_equals_an_uninterrupted_one(runs):
    (a, a_eval, a_lora), (b, b_eval, lines) = runs
    restarts = [line for line in lines if "started again in its placement bundle" in line
                or line.startswith("reward worker ")]
    print("\n" + "\n".join(restarts))  # the restart times, for docs/reliability.md
    assert len(restarts) == 4, lines
    assert restarts[0].startswith("reward worker 0 lost during scoring (ActorDiedError")
    assert restarts[1].startswith("rollout engine 0 lost during adapter load (ActorDiedError")
    assert restarts[2].startswith("rollout engine 0 lost during generation (ActorDiedError")
    assert restarts[3].startswith("rollout engine 0 lost during generation (ActorDiedError")
    assert b.engines.restarts == 3 and b.rewards.restarts == 1
    rows = jsonl(b.out / "metrics.jsonl")
    assert [r["faults/engine_restarts"] for r in rows] == [1.0, 2.0]
    assert [r["faults/reward_worker_restarts"] for r in rows] == [1.0, 1.0]
    assert all(r["sync/probe/gap/engine_0"] < 1e-4 for r in rows)
    assert all(r["learner/gap_kl/engine_0"] == r["learner/gap_kl"] for r in rows)

    # nothing lost, nothing different: the same completions, rewards, figures and adapter
    assert jsonl(b.out / "completions.jsonl") == jsonl(a.out / "completions.jsonl")
    assert figures(b.out) == figures(a.out)
    assert any(r["reward/std"] > 0 for r in rows)  # the updates had something to learn from
    a_eval, b_eval = ({k: v for k, v in e.items() if k != "time_s"} for e in (a_eval, b_eval))
    assert b_eval == a_eval and b_eval["adapter_version"] == STEPS
    assert b.sanity_answers["after"] == a.sanity_answers["after"]
    b_lora = ray.get(b.learner.actor.state_dict.remote())["lora"]
    assert any("lora_B" in n and t.abs().max() > 0 for n, t in a_lora.items())
    for name, tensor in a_lora.items():
        torch.testing.assert_close(b_lora[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_a_reward_that_returns_nan_everywhere_stops_the_run_with_a_checkpoint(runs):
    """Step 3 of run B with a reward returning NaN for every row: one line naming the function,
    and the 2 completed steps are checkpointed first (step 3 never reaches the learner)."""
    from grpo_ray.cluster.rewards import RewardError, RewardPool, build_reward_workers

    _, (b, _, lines) = runs
    functions = [RewardFunctionConfig("rewards_for_tests:nan_reward")]
    for worker in b.actors.reward_workers:
        ray.kill(worker)
    b.actors.reward_workers[:] = build_reward_workers(functions, "fixed", 2, 0.25)
    b.rewards = b.rollouts.rewards = RewardPool(
        b.actors.reward_workers, functions, 60,
        max_unscored_fraction=b.cfg.reward.max_unscored_fraction, notify=lines.append)
    with pytest.raises(RewardError) as error:
        b.fit()
    assert str(error.value) == (
        "nan_reward failed on 8 of 8 completions (returned a non-finite score (nan)), more "
        "than reward.max_unscored_fraction=0.5")
    assert lines[-2] == ("reward function 'nan_reward' failed on 8 of 8 completions: returned a "
                         "non-finite score (nan) (its rows are unscored; counted in "
                         "reward/nan_reward/failed, told once)")
    path = latest_checkpoint(b.checkpoints)
    assert lines[-1] == f"checkpoint of step 2 written to {path}" and path.name == "step-000002"
    check_checkpoint(path)
    assert [r["step"] for r in jsonl(b.out / "metrics.jsonl")] == [1, 2]  # step 3 never logged
