"""The learning benchmark, shortened: GRPO through the whole pipeline (local Ray, vLLM CPU engine,
reward actors, PEFT learner, adapter sync every step) raises held-out correctness of the
warmed-up tiny model clearly, and the format survives.

Held-out correctness is sampled (temperature 1, 4 completions of each of 256 held-out prompts,
the same seeds before and after), so the figures move with the policy rather than with a few
greedy flips. Every seed is fixed: warm-up, adapter init, per-step sampling, evaluation.
"""
from __future__ import annotations

import csv
import importlib.util
import math
import sys
from pathlib import Path

import pytest

from grpo_ray.config import load_config

ROOT = Path(__file__).resolve().parents[2]
STEPS = 80
SAMPLES = 4


def _benchmark_module():
    spec = importlib.util.spec_from_file_location("learning_benchmark",
                                                  ROOT / "scripts" / "learning_benchmark.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(ray_local, tmp_path_factory):
    bench = _benchmark_module()
    out = tmp_path_factory.mktemp("learning")
    cfg = load_config(ROOT / "configs" / "learn-cpu.yaml",
                      [f"output.dir={out}", f"algorithm.total_steps={STEPS}",
                       "logging.progress_bar=false"])
    lines: list[str] = []
    assert cfg.eval.samples == SAMPLES and cfg.eval.temperature == 1.0
    result = bench.run_benchmark(cfg, eval_every=STEPS, print_fn=lines.append)
    return bench, cfg, result, out


@pytest.mark.slow
def test_grpo_raises_held_out_correctness(run):
    bench, cfg, result, out = run
    before, after = result.before, result.after
    assert before["num_completions"] == after["num_completions"] == 256 * SAMPLES
    assert after["adapter_version"] == STEPS and before["adapter_version"] == 0
    # the start: the warm-up gave the format, correctness is low but not zero
    assert 0.05 < before["accuracy"] < 0.35
    assert before["strict_format"] > 0.9
    rise = after["accuracy"] - before["accuracy"]
    print(f"held-out accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f} "
          f"({rise:+.3f}), strict format {before['strict_format']:.3f} -> "
          f"{after['strict_format']:.3f}, {STEPS} steps in {result.train_s:.0f} s")
    assert rise >= 0.10, f"held-out accuracy {before['accuracy']:.3f} -> " \
                         f"{after['accuracy']:.3f} after {STEPS} steps"
    assert after["strict_format"] >= 0.8, "the format collapsed"


@pytest.mark.slow
def test_curve_csv_and_plot(run):
    bench, cfg, result, out = run
    assert [r["step"] for r in result.curve] == list(range(STEPS + 1))
    for row in result.curve[1:]:
        assert math.isfinite(row["reward_mean"]) and 0 <= row["accuracy"] <= 1
    held = [r["step"] for r in result.curve if r["heldout_accuracy"] is not None]
    assert held == [0, STEPS]
    path = bench.write_csv(result.curve, out / "curve.csv")
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == bench.CSV_COLUMNS and len(rows) == STEPS + 1
    assert float(rows[-1]["heldout_accuracy"]) == result.after["accuracy"]
    png = bench.plot(result, out / "curve.png", bench.held_out_label(cfg))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
