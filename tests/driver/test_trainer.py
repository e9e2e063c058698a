"""The trainer's pieces that need no actors."""
from __future__ import annotations

from grpo_ray.driver.trainer import describe_startup


def test_start_up_line_says_when_the_learner_waited_for_the_engines():
    parts = {"placement_s": 0.4, "engines_s": 66.2, "learner_s": 36.4, "probe_base_s": 2.6,
             "total_s": 106.0}
    # a shared GPU without rollout.kv_cache_gb: the imports beside the engines, the load after
    assert describe_startup(parts | {"learner_after_engines": 1.0, "learner_imports_s": 29.6,
                                     "learner_s": 6.4, "total_s": 76.0}) == (
        "up in 76 s: engines 66 s beside the learner's imports 30 s, then its load 6 s "
        "(rollout.kv_cache_gb would load them together); the sync probe's first scores 3 s")
    assert describe_startup(parts | {"learner_after_engines": 0.0, "total_s": 70.0}) == (
        "up in 70 s: engines 66 s beside the learner 36 s; the sync probe's first scores 3 s")
