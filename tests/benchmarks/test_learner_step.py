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

    seen = []  # (which learner, the settings it steps with, rows), step by step
    step, init, loads = LearnerWorker.train_step, LearnerWorker.__init__, [0]

    def counted_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        loads[0] += 1
        self.serial = loads[0]

    monkeypatch.setattr(LearnerWorker, "__init__", counted_init)
    monkeypatch.setattr(LearnerWorker, "train_step", lambda self, batch: (
        seen.append((self.serial, self.learner.cast_lm_head_to_fp32,
                     self.learner.gradient_checkpointing, len(batch))), step(self, batch))[1])
    out = tmp_path / "ab.json"
    variants = ["learner.cast_lm_head_to_fp32=null", "learner.cast_lm_head_to_fp32=false",
                "learner.gradient_checkpointing=false", "learner.cast_lm_head_to_fp32=true",
                "learner.gradient_checkpointing=true"]  # what is loaded: the same learner
    assert learner_step.main([
        "--model", tiny_model_path, "--shape", "2x2x8", "--steps", "1", "--json", str(out),
        *[a for v in variants for a in ("--variant", v)], "learner.load_in_4bit=false"]) == 0
    # each variant: a warm-up, then 1 timed step; checkpointing off loads a fresh learner, and
    # the next variant, with it on again, another; the last restates it: no load
    assert [s[1:] for s in seen] == [(None, True, 4)] * 2 + [(False, True, 4)] * 2 + [
        (False, False, 4)] * 2 + [(True, True, 4)] * 2 + [(False, True, 4)] * 2
    assert [s[0] for s in seen[::2]] == [1, 1, 2, 3, 3]
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == variants
    assert all(r["update_s"] > 0 and len(r["update_all_s"]) == 1 for r in rows)
    assert all(r["probe_s"] > 0 for r in rows)  # the learner's side of the sync check, timed
    with pytest.raises(SystemExit, match="learner.key=value"):
        learner_step._settings("rollout.kv_cache_gb=8")
