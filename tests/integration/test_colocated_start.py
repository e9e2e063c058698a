"""The one-GPU layout's start order with the real actors: a local Ray that declares one GPU it
does not have (Ray schedules logical resources), so the trainer places the learner and the engine
in one shared-GPU bundle, and both compute on CPU (vLLM's CPU engine, a PEFT learner)."""
import math

import pytest
import ray

from grpo_ray.config import load_config
from grpo_ray.driver.trainer import Trainer


@pytest.fixture(scope="module")
def ray_one_gpu():
    ray.shutdown()  # the session's local Ray, if a module before this one started it
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_a_shared_gpu_run_imports_the_learner_beside_the_engine_loads_it_after_and_trains(
        ray_one_gpu, tiny_model_path, tmp_path):
    cfg = load_config("configs/tiny-cpu.yaml", [
        f"output.dir={tmp_path}", f"model.path={tiny_model_path}", "cluster.colocate=true",
        "learner.num_gpus=0.5", "algorithm.total_steps=1"])
    lines: list[str] = []
    trainer = Trainer(cfg, print_fn=lines.append).setup()
    try:
        parts = trainer.startup
        assert trainer.actors.plan.layout == "colocated"
        # without rollout.kv_cache_gb the engine measures free memory while it starts
        assert parts["learner_after_engines"] == 1.0, parts
        assert parts["learner_imports_s"] > 0 and parts["learner_s"] > 0, parts
        placed = next(line for line in lines if line.startswith("placed:"))
        assert f"engines {parts['engines_s']:.0f} s beside the learner's imports " in placed, placed
        stats = trainer.run_step()  # the learner loaded after its imports does a whole step
        assert trainer.version == 1 and math.isfinite(stats["learner/loss"]), stats
    finally:
        trainer.close()
