"""The sync probe's statistic: the slope of the engine's movement against the learner's, judged
by its standard error, never while the learner has barely moved."""
from __future__ import annotations

import math
import random

import pytest

from grpo_ray.sync.probe import ProbeRule, ProbeStats, probe_sequences, probe_stats

RULE = ProbeRule(min_slope=0.5, max_slope=1.5, z=4.0, min_movement=1e-3)


def test_hand_computed_slope_error_gap_and_movement():
    # engine and learner both 0.3 nats/token below the other on every token (a 4-bit learner):
    # the offsets cancel, the engine moved exactly as the learner
    s = probe_stats([-1.0, -2.0], [-1.5, -2.5], [-1.3, -2.3], [-1.8, -2.8])
    assert (s.slope, s.slope_se, s.gap, s.movement, s.tokens) == pytest.approx((1, 0, 0, 0.5, 2))
    # the engine kept its base model while the learner moved by 0.4 and -0.2
    s = probe_stats([-1.5, -2.5], [-1.5, -2.5], [-1.4, -3.0], [-1.8, -2.8])
    assert (s.slope, s.slope_se, s.gap, s.movement) == pytest.approx((0, 0, 0.3, 0.3))
    assert s.fails(RULE)
    # de = (0.1, 0.3, 0.2), dl = (0.1, 0.2, 0.3): <de,dl> = 0.13, <dl,dl> = 0.14,
    # residuals de - s*dl, their sum of squares / (n - 1), over <dl,dl>
    s = probe_stats([0.1, 0.3, 0.2], [0, 0, 0], [0.1, 0.2, 0.3], [0, 0, 0])
    slope = 0.13 / 0.14
    res = [0.1 - slope * 0.1, 0.3 - slope * 0.2, 0.2 - slope * 0.3]
    assert s.slope == pytest.approx(slope)
    assert s.slope_se == pytest.approx(math.sqrt(sum(r * r for r in res) / 2 / 0.14))
    assert s.gap == pytest.approx(0.2 / 3) and s.movement == pytest.approx(0.2)
    assert not s.fails(RULE)
    with pytest.raises(ValueError, match="lengths 2, 2, 1, 2"):
        probe_stats([0.0, 0.0], [0.0, 0.0], [0.0], [0.0, 0.0])


def noisy(seed: int, n: int, movement: float, slope: float, noise: float):
    """Engine and learner log-probs of n tokens: the learner moved by ~`movement` per token, the
    engine by `slope` times that, each side with its own kernel noise of `noise`."""
    rng = random.Random(seed)
    dl = [rng.gauss(0, movement) for _ in range(n)]
    base = [rng.uniform(-5, 0) for _ in range(n)]
    engine_base = [b + rng.gauss(0, noise) for b in base]
    engine = [b + slope * d + rng.gauss(0, noise) for b, d in zip(base, dl)]
    return engine, engine_base, [b + d for b, d in zip(base, dl)], base


def test_base_engine_fails_healthy_engine_with_noise_passes():
    for seed in range(20):
        # the 3B shape's figures: kernel noise 0.04 nats/token, a few steps of movement
        healthy = probe_stats(*noisy(seed, 300, movement=0.1, slope=1.0, noise=0.04))
        assert not healthy.fails(RULE), healthy
        base = probe_stats(*noisy(seed, 300, movement=0.1, slope=0.0, noise=0.04))
        assert base.fails(RULE) and abs(base.slope) < 0.3, base
        doubled = probe_stats(*noisy(seed, 300, movement=0.1, slope=2.5, noise=0.04))
        assert doubled.fails(RULE), doubled
        # fp32 engines (CPU): tiny noise, so even a small movement is judged
        assert probe_stats(*noisy(seed, 300, movement=0.01, slope=0.0, noise=1e-6)).fails(RULE)
        assert not probe_stats(*noisy(seed, 300, movement=0.01, slope=1.0, noise=1e-6)).fails(RULE)


def test_a_learner_that_barely_moved_never_fails_an_engine():
    for seed in range(20):
        # one step's movement below the noise: the error is wide, nothing can fail
        s = probe_stats(*noisy(seed, 300, movement=0.01, slope=0.0, noise=0.04))
        assert s.slope_se > 0.1 and not s.fails(RULE), s
    # below min_movement: no judgement even with no noise at all
    s = probe_stats(*noisy(0, 300, movement=1e-4, slope=0.0, noise=0.0))
    assert s.movement < 1e-3 and s.slope_se == 0 and not s.fails(RULE)
    # not moved at all: no slope
    s = probe_stats([-1.0, -2.0], [-1.0, -2.0], [-1.1, -2.1], [-1.1, -2.1])
    assert math.isnan(s.slope) and s.slope_se == math.inf and not s.fails(RULE)


def test_probe_sequences_are_a_few_hundred_tokens_in_the_recipe_format(tokenizer):
    prompts, completions = probe_sequences(tokenizer)
    assert len(prompts) == len(completions) == 4
    assert 150 <= sum(len(c) for c in completions) <= 600
    assert all(tokenizer.decode(c).startswith("<reasoning>\n") for c in completions)


def test_default_min_movement_by_the_engines_dtype():
    from grpo_ray.config import ClusterConfig
    from grpo_ray.sync.probe import default_min_movement

    assert default_min_movement("float32") == 1e-3
    assert default_min_movement("bfloat16") == default_min_movement("float16") == 0.05
    assert ProbeRule.of(ClusterConfig()).min_movement is None  # resolved at attach
    # the H200 case that stopped a healthy Unsloth run at version 2: slope 0.2 +- 0.049 at
    # movement 0.0117; below the 16-bit floor it is not judged
    stats = ProbeStats(0.2, 0.049, 0.0154, 0.0117, 368)
    assert stats.fails(ProbeRule(0.5, 1.5, 4.0, 1e-3))
    assert not stats.fails(ProbeRule(0.5, 1.5, 4.0, default_min_movement("bfloat16")))
