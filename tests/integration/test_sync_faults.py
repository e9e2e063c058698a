"""Sync faults injected into a real run (local Ray, vLLM CPU engine, PEFT learner): an engine that
serves no adapter, the previous version, a version 5 steps old, or a damaged adapter (one tensor
zeroed or doubled) is caught at the sync where it happens (the line names that adapter version),
repaired by a reload or a new engine, and the run goes on; a fault that a new engine has too ends
the run with the measured figures. Healthy runs never fail the check, at rollout temperature 0.7
or 1, and a resumed run is checked by the same rule."""
from __future__ import annotations

import pytest
import ray
from helpers import inject, inject_into_new_engines, jsonl

from grpo_ray.config import load_config
from grpo_ray.driver.checkpoint import latest_checkpoint
from grpo_ray.driver.trainer import Trainer
from grpo_ray.sync.broadcast import SyncCheckError

CAUGHT = "rollout engine 0 failed the sync check at adapter version {}: {}"
RELOADED = "; adapter reloaded, the engine agrees now"


def build(out, model_path, lines: list[str], *overrides: str) -> Trainer:
    cfg = load_config("configs/tiny-cpu.yaml", [
        f"output.dir={out}", f"model.path={model_path}", "learner.learning_rate=5e-3",
        "learner.warmup_ratio=0", "logging.tensorboard=false", "eval.num_samples=2",
        "cluster.max_restarts=1",  # rewards that differ within a group: the adapter moves
        "reward.functions=[{name: correctness}, {name: 'rewards_for_tests:text_length'}]",
        *overrides])
    return Trainer(cfg, print_fn=lines.append).setup()


def inject_now(trainer: Trainer, fault: str, **kwargs) -> None:
    ray.get(trainer.engines.engines[0].__ray_call__.remote(inject, fault, **kwargs))


def failures(lines: list[str]) -> list[str]:
    return [line for line in lines if "failed the sync check" in line]


def assert_serves_the_learners_adapter(trainer: Trainer) -> None:
    expected = tuple(ray.get(trainer.learner.actor.exported_identity.remote()))
    assert [tuple(i) for i in trainer.engines.adapter_identities()] == [expected]
    assert expected[0] == trainer.version and expected[1] is not None


def test_faults_are_caught_at_their_sync_and_reloaded(ray_local, tiny_model_path, tmp_path):
    """The fast representative: a LoRA engine that ignores a load, one that gets a doubled
    tensor, one that serves the base model; each caught at its step's sync and reloaded."""
    lines: list[str] = []
    trainer = build(tmp_path, tiny_model_path, lines, "algorithm.total_steps=3")
    try:
        for step, fault in [(1, "previous"), (2, "double"), (3, "no-adapter")]:
            inject_now(trainer, fault)
            trainer.run_step()
            assert trainer.version == step
            assert_serves_the_learners_adapter(trainer)
        caught = failures(lines)
        assert len(caught) == 3, "\n".join(lines)
        assert caught[0].startswith(CAUGHT.format(1, "it holds adapter version 0 with digest "
                                                     "none (the base model), the learner "
                                                     "exported adapter version 1 with digest "))
        assert caught[1].startswith(CAUGHT.format(2, "it holds adapter version 2 with digest "))
        assert caught[2].startswith(CAUGHT.format(3, "its probe log-probs do not move as the "
                                                     "learner's: slope 0"))
        assert all(line.endswith(RELOADED) for line in caught)
        rows = jsonl(tmp_path / "metrics.jsonl")
        assert [r["faults/engine_repairs"] for r in rows] == [1.0, 2.0, 3.0]
        assert [r["faults/engine_restarts"] for r in rows] == [0.0, 0.0, 0.0]
        # after the repairs the engine serves the learner's adapter, measured
        for r in rows:
            assert r["sync/probe/slope/engine_0"] == pytest.approx(1, abs=1e-3)
            assert r["sync/probe/gap/engine_0"] < 1e-4 and r["sync/fallback_object_store"] == 0
            sides = r["sync/probe_learner_s"], r["sync/probe_engines_s"]
            assert min(sides) > 0 and sum(sides) <= r["sync/probe_s"]  # the check's two sides
        print("\nprobe movement by step:", [r["sync/probe/movement"] for r in rows])
    finally:
        trainer.close()


@pytest.mark.slow
@pytest.mark.parametrize("merge", [False, True], ids=["lora", "merged"])
def test_every_fault_is_caught_and_repaired_and_the_run_finishes(ray_local, tiny_model_path,
                                                                  tmp_path, merge):
    """Seven steps, a fault at six of them, on a LoRA and a merged engine: missing adapter,
    previous version, zeroed tensor, doubled tensor, a fault that the reload does not cure (a new
    engine does), and at step 7 the adapter of version 2, five steps old."""
    lines: list[str] = []
    trainer = build(tmp_path, tiny_model_path, lines, "algorithm.total_steps=7",
                    f"rollout.merge_adapter={str(merge).lower()}")
    try:
        old = None
        plan = {1: "previous", 2: "zero", 3: "no-adapter", 4: "double", 5: "persistent", 7: "old"}
        for step in range(1, 8):
            fault = plan.get(step)
            if fault == "persistent":
                inject_now(trainer, "zero", persistent=True)
            elif fault == "old":
                inject_now(trainer, "old", old=old)
            elif fault is not None:
                inject_now(trainer, fault)
            trainer.run_step()
            if step == 2:
                old = trainer.sync._payload  # ObjectRef of version 2's payload
            assert_serves_the_learners_adapter(trainer)
        caught = failures(lines)
        print("\n" + "\n".join(caught))
        versions = [int(line.split("adapter version ")[1].split(":")[0]) for line in caught]
        assert versions == [1, 2, 3, 4, 5, 7], lines
        # no adapter applied: a LoRA engine's identity holds (the probe sees it), a merged
        # engine's count of served modules drops
        assert ("it holds adapter version 3" if merge else "slope 0") in caught[2]
        assert "digest" in caught[3] and "digest" in caught[5]
        assert [line.endswith(RELOADED) for line in caught] == [True] * 4 + [False, True], \
            "\n".join(caught)
        assert "reloaded, still: it holds adapter version 5" in caught[4]
        assert trainer.engines.restarts == 1 and trainer.sync.repairs == 6
        restarted = [line for line in lines if "started again in its placement bundle" in line]
        assert len(restarted) == 1 and restarted[0].startswith(CAUGHT.format(5, ""))
        rows = jsonl(tmp_path / "metrics.jsonl")
        assert all(r["sync/probe/slope/engine_0"] == pytest.approx(1, abs=1e-3) for r in rows)
    finally:
        trainer.close()


@pytest.mark.slow
def test_a_fault_a_new_engine_has_too_ends_the_run_with_the_figures(ray_local, tiny_model_path,
                                                                    tmp_path):
    """An engine that serves the base model whatever it is sent, and so does every new one: the
    run ends at the sync where it started (an InfraError, after a checkpoint) with the measured
    slope, its error, the gap, the learner's movement and the settings that decide."""
    lines: list[str] = []
    trainer = build(tmp_path, tiny_model_path, lines, "algorithm.total_steps=4",
                    "eval.num_samples=0")
    try:
        trainer.run_step()
        trainer.run_step()
        inject_now(trainer, "no-adapter", persistent=True)
        inject_into_new_engines(trainer.engines, "no-adapter")
        with pytest.raises(SyncCheckError) as error:
            trainer.fit()
        message = str(error.value)
        print("\n" + message)
        assert message.startswith(CAUGHT.format(3, "its probe log-probs do not move as the "
                                                   "learner's: slope 0"))
        for figure in ("+-", "gap ", "learner movement ", "tokens", "cluster.sync_probe_min_slope",
                       "; reloaded, still failing; replaced, and the new rollout engine 0 "
                       "disagrees too: its probe log-probs do not move as the learner's: slope "):
            assert figure in message, figure
        assert latest_checkpoint(trainer.checkpoints).name == "step-000003"
    finally:
        trainer.close()


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_healthy_runs_pass_and_a_resumed_run_is_checked_by_the_same_rule(
        ray_local, tiny_model_path, tmp_path, temperature):
    """Four steps at rollout temperature 0.7 (which stopped main's tiny-cpu run at version 2:
    learner scored at 0.7, engine at 1) and 1.0, default settings: no failure; then the run
    resumed from its last checkpoint (step 4) passes the check at its resume sync, and a fault
    injected there is caught there."""
    lines: list[str] = []
    overrides = (f"rollout.temperature={temperature}", "algorithm.total_steps=4",
                 "output.save_every=2", "eval.num_samples=0")
    cfg_lr = "learner.learning_rate=5e-4"  # tiny-cpu's own
    trainer = build(tmp_path, tiny_model_path, lines, *overrides, cfg_lr)
    try:
        trainer.fit()
        assert not failures(lines) and trainer.sync.repairs == 0
        rows = jsonl(tmp_path / "metrics.jsonl")
        print("\nslope, se, gap, movement:", [
            tuple(round(r.get(k, float("nan")), 6) for k in (
                "sync/probe/slope/engine_0", "sync/probe/slope_se/engine_0",
                "sync/probe/gap/engine_0", "sync/probe/movement")) for r in rows])
        assert rows[-1]["sync/probe/slope/engine_0"] == pytest.approx(1, abs=1e-3)
    finally:
        trainer.close()

    resumed_lines: list[str] = []
    resumed = build(tmp_path, tiny_model_path, resumed_lines, *overrides, cfg_lr)
    try:
        inject_now(resumed, "no-adapter")
        resumed.restore(latest_checkpoint(resumed.checkpoints))
        caught = failures(resumed_lines)
        assert len(caught) == 1 and caught[0].startswith(CAUGHT.format(4, "its probe"))
        assert caught[0].endswith(RELOADED)
        assert_serves_the_learners_adapter(resumed)
    finally:
        resumed.close()
