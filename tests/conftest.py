"""Shared fixtures: a real local Ray and a real tiny model, built once per session."""
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
    from grpo_ray.models.tiny import save_tiny

    return str(save_tiny(tmp_path_factory.mktemp("tiny-model")))


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray cluster of 2 CPUs for the tests of one module."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                                       "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()
