"""Rollout: one vLLM engine per actor, sampling with the newest LoRA adapter.
Nothing heavy is imported here (vLLM loads when a RolloutWorker is built)."""
from grpo_ray.rollout.worker import RolloutWorker

__all__ = ["RolloutWorker"]
