"""benchmarks/learner_step.py on the tiny model: each variant's settings reach the learner it
switches, and every variant's figures are written."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import learner_step  # noqa: E402


def test_each_variant_runs_on_the_loaded_learner_with_its_settings(tiny_model_path, tmp_path,
                                                                   monkeypatch):
    from grpo_ray.learner.worker import LearnerWorker

    seen = []  # (the setting the learner steps with, rows), step by step

    step = LearnerWorker.train_step
    monkeypatch.setattr(LearnerWorker, "train_step", lambda self, batch: (
        seen.append((self.learner.cast_lm_head_to_fp32, len(batch))), step(self, batch))[1])
    out = tmp_path / "ab.json"
    assert learner_step.main([
        "--model", tiny_model_path, "--shape", "2x2x8", "--steps", "1", "--json", str(out),
        "--variant", "learner.cast_lm_head_to_fp32=null",
        "--variant", "learner.cast_lm_head_to_fp32=false", "learner.load_in_4bit=false"]) == 0
    assert seen == [(None, 4), (None, 4), (False, 4), (False, 4)]  # a warm-up, then 1 timed
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["learner.cast_lm_head_to_fp32=null",
                                            "learner.cast_lm_head_to_fp32=false"]
    assert all(r["update_s"] > 0 and len(r["update_all_s"]) == 1 for r in rows)
    with pytest.raises(SystemExit, match="learner.key=value"):
        learner_step._settings("rollout.kv_cache_gb=8")
