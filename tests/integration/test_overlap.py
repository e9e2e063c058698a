"""One step off policy and dynamic sampling through the whole pipeline (local Ray, vLLM CPU
engine, reward actors, PEFT learner).

One step off, batch s+1 is generated with adapter version s while the learner trains on batch s:
the samples each step trains on are at most one version old, the truncated importance weights
are on, and a run resumed from a checkpoint equals an uninterrupted one. Dynamic sampling drops
exactly the groups whose rewards are all equal and fills the batch from the next prompts.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from grpo_ray.algo.advantages import zero_variance_groups
from grpo_ray.config import load_config
from grpo_ray.driver.checkpoint import latest_checkpoint, load_checkpoint
from grpo_ray.driver.trainer import Trainer

STEPS = 3
REWARDS = "reward.functions=[{name: correctness}, {name: 'rewards_for_tests:text_length'}]"


def build(out, model_path, *overrides: str, lines: list[str] | None = None) -> Trainer:
    cfg = load_config("configs/tiny-cpu.yaml", [
        f"output.dir={out}", f"model.path={model_path}", f"algorithm.total_steps={STEPS}",
        "learner.learning_rate=5e-3", "learner.warmup_ratio=0", "logging.tensorboard=false",
        "logging.samples_per_step=8", "eval.num_samples=2", "output.save_every=1",
        "algorithm.max_staleness=1", REWARDS, *overrides])
    return Trainer(cfg, print_fn=(lines if lines is not None else []).append).setup()


def record_batches(trainer) -> list[tuple[int, int]]:
    """(learner version, sampling version) of every batch the trainer trains on from now."""
    seen: list[tuple[int, int]] = []
    original = trainer.groups.train_batch

    def recorded(scored):
        seen.append((trainer.version, scored.version))
        batch = original(scored)
        # the loss gets the probabilities of the version each sample was drawn with
        assert batch.sampling_version == scored.version
        assert batch.sampling_logprobs is scored.rollout.sampling_logprobs
        return batch
    trainer.groups.train_batch = recorded
    return seen


def jsonl(path) -> list[dict]:
    """Rows of a log, without the `time` each was written at."""
    return [{k: v for k, v in json.loads(line).items() if k != "time"}
            for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def off_policy(ray_local, tiny_model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("one-step-off")
    trainer = build(out, tiny_model_path)
    try:
        assert trainer.cfg.algorithm.importance_sampling_correction  # on by default here
        versions = record_batches(trainer)
        history = trainer.fit()
    finally:
        trainer.close()
    return out, versions, history


def test_each_batch_is_at_most_one_version_behind(off_policy):
    out, versions, history = off_policy
    # batch 0 is generated before any update; batch s+1 while the learner makes version s+1
    assert versions == [(0, 0), (1, 0), (2, 1)]
    assert [m["rollout/staleness"] for m in history] == [0.0, 1.0, 1.0]
    assert [m["adapter_version"] for m in history] == [1.0, 2.0, 3.0]
    # the stale samples' probabilities are the older version's: the learner sees the gap
    assert history[1]["learner/gap_kl"] > 10 * history[0]["learner/gap_kl"]
    for m in history:
        for key in ("time/rollout_s", "time/update_s", "time/wait_rollout_s", "time/sync_s",
                    "time/generate_s", "time/reward_s", "dynamic/zero_variance_fraction"):
            assert key in m, key


def test_a_resumed_one_step_off_run_equals_the_uninterrupted_one(off_policy, tiny_model_path,
                                                                 tmp_path):
    """B starts from A's step-2 checkpoint, which holds the batch prefetched for step 3 (made
    with version 1), and trains step 3: A's completions, figures and adapter."""
    a_out, _, _ = off_policy
    b_out = tmp_path / "b"
    (b_out / "checkpoints").mkdir(parents=True)
    shutil.copytree(a_out / "checkpoints" / "step-000002", b_out / "checkpoints" / "step-000002")
    for name in ("metrics.jsonl", "completions.jsonl"):
        shutil.copy(a_out / name, b_out / name)
    lines: list[str] = []
    b = build(b_out, tiny_model_path, lines=lines)
    try:
        b.restore(latest_checkpoint(b_out / "checkpoints"))
        versions = record_batches(b)
        b.fit()
    finally:
        b.close()
    assert versions == [(2, 1)]  # the prefetched batch, from the checkpoint
    assert jsonl(b_out / "completions.jsonl") == jsonl(a_out / "completions.jsonl")
    timing = ("time/", "sync/", "rollout/tokens_per_s", "learner/time_", "learner/peak_memory")
    figures = [[{k: v for k, v in r.items() if not k.startswith(timing)}
                for r in jsonl(out / "metrics.jsonl")] for out in (a_out, b_out)]
    assert figures[0] == figures[1]
    lora_a = load_checkpoint(latest_checkpoint(a_out / "checkpoints"))[0]["lora"]
    lora_b = load_checkpoint(latest_checkpoint(b_out / "checkpoints"))[0]["lora"]
    for n, t in lora_a.items():
        torch.testing.assert_close(lora_b[n], t, rtol=0, atol=1e-6, msg=n)


def test_dynamic_sampling_drops_exactly_the_zero_variance_groups(ray_local, tiny_model_path,
                                                                 tmp_path):
    trainer = build(tmp_path, tiny_model_path, "algorithm.max_staleness=0",
                    "algorithm.filter_zero_variance_groups=true", "rollout.prompts_per_step=4",
                    "algorithm.max_refill_rounds=3",
                    "reward.functions=[{name: 'rewards_for_tests:length_unless_subtraction'}]")
    scored_parts = []  # every (questions, totals) the pool scored, in order
    score = trainer.rewards.score

    def recorded(batch, rollout, check_unscored=True):
        scores = score(batch, rollout, check_unscored)
        scored_parts.append(([batch.questions[i] for i in sorted(set(rollout.prompt_index))],
                             scores.total))
        return scores
    trainer.rewards.score = recorded
    n = trainer.cfg.rollout.num_generations
    try:
        for step in range(2):
            scored_parts.clear()
            scored = trainer.rollouts.submit(step).result()
            varied, zero = [], 0
            for questions, totals in scored_parts:
                flags = zero_variance_groups(torch.tensor(totals, dtype=torch.float64), n)
                varied += [q for q, z in zip(questions, flags.tolist()) if not z]
                zero += int(flags.sum())
            generated = sum(len(q) for q, _ in scored_parts)
            assert zero > 0, "the test reward gave no zero-variance group to drop"
            # the batch: the first groups that teach, in the order they were generated
            assert scored.batch.questions == varied[:4]
            assert len(scored.rollout) == 4 * n and len(scored.scores.total) == 4 * n
            assert not zero_variance_groups(torch.tensor(scored.scores.total,
                                                         dtype=torch.float64), n).any()
            m = scored.metrics
            assert m["dynamic/zero_variance_fraction"] == pytest.approx(zero / generated)
            assert m["dynamic/extra_prompts"] == generated - 4
            assert m["dynamic/refill_rounds"] == generated // 4 - 1
    finally:
        trainer.close()
