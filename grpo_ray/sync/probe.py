"""The sync probe: after every sync, each engine and the learner score a few fixed completions,
and an engine whose log-probs did not move as the learner's did is caught.

It only has to catch gross faults: the identity check (`sync.digest`) already proves that
every engine holds exactly the learner's tensors, so the probe is left with what the identity
cannot see, an adapter not applied in the forward pass or weights damaged after they were
received. It must never fire on a healthy engine, whose log-probs differ from the learner's by
kernel noise (bf16 engine against a 4-bit learner: 0.03-0.05 nats per token on the 3B shape,
more than one step's movement), so it is judged against the learner's movement over the whole
run, averaged over a few hundred tokens.

With e, e0 the engine's log-probs of the probe's tokens now and at version 0 (its base model),
l, l0 the learner's, de = e - e0 and dl = l - l0 per token (each side's own base offset, the
quantization error included, cancels):

    slope s = <de, dl> / <dl, dl>        1 for an engine that serves the adapter, 0 for one
                                         serving the base model
    SE = rms(de - s * dl) / sqrt(<dl, dl>)   its standard error, from the residuals

An engine fails when s is confidently outside [min_slope, max_slope] (s + z * SE < min_slope or
s - z * SE > max_slope), once the learner has moved at least `min_movement` nats per token on
average (mean |dl|). While the learner has barely moved, SE is large and nothing can fail.

Both sides score at temperature 1: vLLM's prompt log-probs skip the sampling processors (its
`_get_prompt_logprobs_dict`), so the learner scores the probe at 1 too, whatever
`rollout.temperature` (a learner at 0.7 against an engine at 1 is what made tiny-cpu stop at
version 2 with the old absolute tolerance).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from grpo_ray.answer_format import chat_ids, chat_messages
from grpo_ray.config import ClusterConfig

PROBE_EXAMPLES: list[tuple[str, str]] = [
    ("Tom has 3 boxes with 12 apples in each box. He gives away 9 apples. How many apples "
     "does he have left?",
     "<reasoning>\nTom has 3 * 12 = 36 apples. After giving away 9 he has 36 - 9 = 27 apples."
     "\n</reasoning>\n<answer>\n27\n</answer>\n"),
    ("A train travels 60 miles per hour for 4 hours, then 45 miles per hour for 2 hours. How "
     "far does it travel in total?",
     "<reasoning>\nFirst part: 60 * 4 = 240 miles. Second part: 45 * 2 = 90 miles. In total "
     "240 + 90 = 330 miles.\n</reasoning>\n<answer>\n330\n</answer>\n"),
    ("Sara buys 5 notebooks at $4 each and 2 pens at $3 each. She pays with a $50 bill. How "
     "much change does she get?",
     "<reasoning>\nThe notebooks cost 5 * 4 = 20 dollars and the pens 2 * 3 = 6 dollars, so "
     "she spends 20 + 6 = 26 dollars. Her change is 50 - 26 = 24 dollars.\n</reasoning>\n"
     "<answer>\n24\n</answer>\n"),
    ("A class has 28 students. Half of them play football and 5 of the others play chess. "
     "How many students play neither?",
     "<reasoning>\nHalf of 28 is 14, so 14 play football and 28 - 14 = 14 do not. Of those, "
     "5 play chess, which leaves 14 - 5 = 9 students who play neither.\n</reasoning>\n"
     "<answer>\n9\n</answer>\n"),
]
"""Fixed question/answer pairs in the recipe's XML format (a few hundred tokens in all): every
token is of the kind the policy is trained on, so training moves their log-probs."""


@dataclass
class ProbeRule:
    """When an engine fails the probe (module docstring); `of(cluster)` reads it from the
    `cluster.sync_probe_*` settings."""

    min_slope: float
    max_slope: float
    z: float
    min_movement: float | None
    """None: `default_min_movement` of the engines' dtype."""

    @classmethod
    def of(cls, cluster: ClusterConfig) -> "ProbeRule":
        return cls(cluster.sync_probe_min_slope, cluster.sync_probe_max_slope,
                   cluster.sync_probe_z, cluster.sync_probe_min_movement)


def default_min_movement(engine_dtype: str) -> float:
    """Learner movement (mean |dl|, nats/token) below which the probe does not judge: 1e-3 for
    fp32 engines (they agree with the learner to ~1e-6), 0.05 for 16-bit ones. A 16-bit engine
    rounds part of a young adapter's tiny deltas away and moves less than the learner: measured
    on one H200 (learn-gpu.yaml, bf16 engine, 4-bit learner) slopes of 0.33 (PEFT) and 0.2
    (Unsloth) at movement 0.010-0.012 (version 2), 0.78 at 0.027, 0.90 at 0.041 and 0.91-1.02
    from 0.06 on, over 200 steps (movement up to 1.09)."""
    return 1e-3 if engine_dtype == "float32" else 0.05


@dataclass
class ProbeStats:
    """One engine's probe figures against the learner's (module docstring)."""

    slope: float
    """<de, dl> / <dl, dl>; NaN while the learner has not moved at all."""
    slope_se: float
    """Standard error of `slope` (inf while the learner has not moved)."""
    gap: float
    """mean |de - dl|, nats per token (the old absolute rule's figure)."""
    movement: float
    """mean |dl|: how far the learner has moved from its base on the probe, nats per token."""
    tokens: int

    def fails(self, rule: ProbeRule) -> bool:
        """True when the engine confidently does not move as the learner does."""
        if not self.movement >= rule.min_movement or not math.isfinite(self.slope_se):
            return False
        return (self.slope + rule.z * self.slope_se < rule.min_slope
                or self.slope - rule.z * self.slope_se > rule.max_slope)

    def describe(self) -> str:
        return (f"slope {self.slope:.3g} +- {self.slope_se:.2g} (1 = the learner's adapter, "
                f"0 = the base model), gap {self.gap:.3g} nats/token, learner movement "
                f"{self.movement:.3g} nats/token over {self.tokens} tokens")


def probe_stats(engine: list[float], engine_base: list[float], learner: list[float],
                learner_base: list[float]) -> ProbeStats:
    """The engine's move from its base (`engine` - `engine_base`) against the learner's
    (`learner` - `learner_base`): four lists of one log-prob per probe token."""
    n = len(engine)
    if not n or not len(engine_base) == len(learner) == len(learner_base) == n:
        raise ValueError(f"probe_stats: log-prob lists of lengths {len(engine)}, "
                         f"{len(engine_base)}, {len(learner)}, {len(learner_base)}")
    de = [e - e0 for e, e0 in zip(engine, engine_base)]
    dl = [x - x0 for x, x0 in zip(learner, learner_base)]
    gap = sum(abs(a - b) for a, b in zip(de, dl)) / n
    movement = sum(abs(b) for b in dl) / n
    dl2 = sum(b * b for b in dl)
    if dl2 == 0:
        return ProbeStats(math.nan, math.inf, gap, movement, n)
    slope = sum(a * b for a, b in zip(de, dl)) / dl2
    residual = sum((a - slope * b) ** 2 for a, b in zip(de, dl)) / max(n - 1, 1)
    return ProbeStats(slope, math.sqrt(residual / dl2), gap, movement, n)


@dataclass
class SyncProbe:
    """The fixed completions and both sides' log-probs of them at version 0."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    learner_base: list[float]
    """The learner's log-probs of every completion token, completions back to back, at
    adapter version 0 (its base model)."""
    engine_base: list[list[float]]
    """Each engine's, likewise (a replacement engine is the same model: it takes its slot's)."""

    def engine_base_of(self, i: int) -> list[float]:
        """Engine i's base log-probs; an engine that joined after the start (a slot the probe
        did not score) is the same model as the first one, in the same dtype: its."""
        return self.engine_base[i] if i < len(self.engine_base) else self.engine_base[0]


def probe_sequences(tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, completion ids) of the probe's examples, with the recipe's chat template and
    system prompt (any fixed text would do: it only has to be the same for engine and learner)."""
    prompts = [list(chat_ids(tokenizer, chat_messages(q))) for q, _ in PROBE_EXAMPLES]
    completions = [list(tokenizer.encode(a, add_special_tokens=False)) for _, a in PROBE_EXAMPLES]
    return prompts, completions


def flatten(per_sequence: list[list[float]]) -> list[float]:
    return [x for row in per_sequence for x in row]
