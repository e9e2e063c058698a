"""How a step's time and the GPUs' use scale with the number of rollout engines, with and without
one-step-off overlap (`algorithm.max_staleness=1`): a model built from measured per-stage times
of one step (docs/scaling.md has the figures and the table).

On-policy, the stages run one after another: generate (split evenly over the engines), score,
update, sync. One step off, the engines generate batch s+1 while the learner trains on batch s,
so a step takes the longer of the two, plus the sync that must happen between generate calls.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class StageTimes:
    """Seconds of one step's stages, measured with one engine on its own GPU."""

    generate: float
    """The whole batch on one engine; N engines take `generate / N` (even split)."""
    reward: float
    learner: float
    """Log-probs, update and optimizer step on the learner's GPU."""
    sync: float


@dataclass(frozen=True)
class Prediction:
    engines: int
    overlap: bool
    step_s: float
    learner_busy: float
    """Share of the step the learner's GPU computes (1.0: the learner is the limit)."""
    engine_busy: float
    """Share of the step each engine's GPU generates."""
    tokens_per_s_per_gpu: float


def predict(times: StageTimes, engines: int, overlap: bool, tokens: int) -> Prediction:
    """Step time and GPU use for `engines` engines on GPUs of their own and the learner on one,
    `tokens` completion tokens a step."""
    if engines < 1 or min(times.generate, times.reward, times.learner, times.sync) < 0:
        raise ValueError(f"predict: needs engines >= 1 and stage times >= 0 (got {engines}, "
                         f"{times})")
    generate = times.generate / engines
    rollout = generate + times.reward
    if overlap:
        step = max(rollout, times.learner) + times.sync
    else:
        step = rollout + times.learner + times.sync
    return Prediction(engines, overlap, step, times.learner / step, generate / step,
                      tokens / step / (engines + 1))


def engines_to_saturate(times: StageTimes) -> int:
    """The fewest engines for which, one step off, generation no longer sets the pace: the
    learner is then the limit and more engines only idle."""
    if times.learner <= times.reward:
        raise ValueError("the learner is faster than scoring alone: engines never saturate it")
    return max(1, math.ceil(times.generate / (times.learner - times.reward)))


MEASURED = {
    "Unsloth": StageTimes(generate=2.1, reward=0.01, learner=2.55, sync=0.14),
    "bnb + PEFT": StageTimes(generate=2.9, reward=0.01, learner=6.0, sync=0.12),
}
"""Stage times of 16 prompts x 8 completions x 256 tokens on the 3B shape (one NVIDIA H200,
2026-12-01, docs/benchmarks.md): Unsloth 4-bit learner with the merged rollout; bnb + PEFT with
the LoRA rollout."""


def table(measured: dict[str, StageTimes] = MEASURED, engines: tuple[int, ...] = (1, 2, 3, 4),
          tokens: int = 16 * 8 * 256) -> str:
    """docs/scaling.md's table: the model's prediction for each learner and number of engines,
    serial and one step off."""
    rows = ["| learner | engines | serial step s | one step off s | learner busy (serial / off) "
            "| each engine busy (serial / off) | completion tokens/s per GPU (serial / off) |",
            "|---|---|---|---|---|---|---|"]
    for name, times in measured.items():
        for n in engines:
            s, o = predict(times, n, False, tokens), predict(times, n, True, tokens)
            rows.append(f"| {name} | {n} | {s.step_s:.2f} | {o.step_s:.2f} | "
                        f"{s.learner_busy:.0%} / {o.learner_busy:.0%} | "
                        f"{s.engine_busy:.0%} / {o.engine_busy:.0%} | "
                        f"{s.tokens_per_s_per_gpu:,.0f} / {o.tokens_per_s_per_gpu:,.0f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
