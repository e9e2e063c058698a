"""Shared fixtures: one real local Ray for the whole session, and the tiny model built once."""
from __future__ import annotations

import os
import sys

import pytest

# vLLM's engine core runs in the calling process (a Ray actor or the test itself): simpler to
# place and to clean up than its default subprocess.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray workers of every cluster a test starts inherit this: user reward modules of the tests
# (tests/rewards_for_tests.py) import by path there, as a user's own module would.
_here = os.path.dirname(os.path.abspath(__file__))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_here, os.environ.get("PYTHONPATH")) if p)
sys.path.insert(0, _here)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """A tiny Qwen2-architecture model + tokenizer saved as a Hugging Face directory."""
    from grpo_ray.driver.models.tiny import save_tiny

    return str(save_tiny(tmp_path_factory.mktemp("tiny-model")))


@pytest.fixture(scope="session")
def tokenizer(tiny_model_path):
    from grpo_ray.driver.data.prompts import load_tokenizer

    return load_tokenizer(tiny_model_path)


def start_local_ray():
    """A real local Ray cluster of 2 CPUs in this process (once; see `ray_local`)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                                       "TOKENIZERS_PARALLELISM": "false"}})
    return ray


@pytest.fixture(scope="session")
def _ray_session():
    yield
    import ray

    ray.shutdown()


@pytest.fixture(scope="module")
def ray_local(_ray_session):
    """The session's local Ray (2 CPUs), started on first use and shared by every module: a
    module that needs another cluster shuts it down and the next user starts it again."""
    import ray

    if not ray.is_initialized():
        start_local_ray()
    yield ray


class ServedEngine:
    """A RolloutWorker on the tiny model (vLLM's CPU engine in this process, no Ray) and the
    transformers model whose probabilities it should serve: the base model, then the PEFT model
    of each adapter a test loads. Tests load `next_version` whatever ran before them."""

    def __init__(self, worker, base_model):
        self.worker, self.model = worker, base_model

    @property
    def next_version(self) -> int:
        return self.worker.adapter_version() + 1

    def load(self, payload, model, **kwargs) -> int:
        self.worker.load_adapter(payload, **kwargs)
        self.model = model
        return payload.version


@pytest.fixture(scope="session")
def served_engine(tiny_model_path):
    """One tiny vLLM engine for the session's direct (Ray-less) rollout tests."""
    from helpers import hf_model

    from grpo_ray.config import RolloutConfig
    from grpo_ray.rollout.worker import RolloutWorker

    rollout = RolloutConfig(num_generations=4, max_completion_length=12, max_model_len=512,
                            enforce_eager=True)
    worker = RolloutWorker(tiny_model_path, rollout, max_lora_rank=8, seed=0)
    yield ServedEngine(worker, hf_model(tiny_model_path))
    worker.close()
