"""Where each training step's scored rollout comes from: prompts, generation on the engine group,
rewards, and the two things between them that a loop should not have to spell out:

- one step off policy (`algorithm.max_staleness=1`): `prefetch(s)` starts the engines on step
  s's batch with the adapter they hold and returns at once; the trainer updates the learner
  meanwhile, then `complete()` collects the batch (before the next sync: a sync never lands
  inside a generate call) and `take(s)` hands it over. On policy, `take(s)` generates there and
  then.
- DAPO's dynamic sampling (`algorithm.filter_zero_variance_groups`): groups whose rewards are all
  equal carry no gradient; they are dropped and the batch refilled from the next prompts (whole
  batches, at most `algorithm.max_refill_rounds`), all with the same adapter version.

Rewards are scored as each engine's completions arrive, while the others still generate.
Sampling seeds derive from the step (and the refill round), so a resumed run, or a slice
generated again by a replacement engine, samples what an uninterrupted run did.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from grpo_ray.config import Config
from grpo_ray.contracts import PromptBatch, Rollout, Sampling, Scores

_REFILL_SEED_STRIDE = 1_000_000_007
"""Seeds of refill round r are offset by r times this (prime) from the step's own."""


@dataclass
class ScoredBatch:
    """One step's prompts, their groups of completions and rewards, and what it cost."""

    batch: PromptBatch
    rollout: Rollout
    scores: Scores
    metrics: dict[str, float] = field(default_factory=dict)
    """`time/generate_s`, `time/reward_s`, `dynamic/...` of producing it."""

    @property
    def version(self) -> int:
        """The adapter version every completion was sampled with."""
        return self.rollout.adapter_version


class RolloutSource:
    """Produces the `ScoredBatch` of each step from the prompt iterator, the engine group and
    the reward pool (see the module's docstring)."""

    def __init__(self, cfg: Config, prompts: Any, engines: Any, rewards: Any) -> None:
        self.cfg, self.prompts, self.engines, self.rewards = cfg, prompts, engines, rewards
        self._pending: tuple[int, PromptBatch, Any, float] | None = None
        self._ready: ScoredBatch | None = None
        self._ready_step: int | None = None

    def seed(self, step: int, refill_round: int = 0) -> int:
        """Prompt j of step s samples with seed `base + s * prompts_per_step + j` (plus a
        stride per refill round), whatever the number of engines."""
        base = self.cfg.algorithm.seed * 1_000_003 + step * self.cfg.rollout.prompts_per_step
        return base + refill_round * _REFILL_SEED_STRIDE

    def take(self, step: int) -> ScoredBatch:
        """Step `step`'s batch: the one prefetched for it, else generated and scored now."""
        if self._ready is not None:
            if self._ready_step != step:
                raise RuntimeError(f"the rollout prefetched for step {self._ready_step} was "
                                   f"asked for step {step}")
            out, self._ready, self._ready_step = self._ready, None, None
            return out
        self.prefetch(step)
        self.complete()
        return self.take(step)

    def prefetch(self, step: int) -> None:
        """Draw step `step`'s prompts and start the engines on them; returns at once."""
        if self._pending is not None or self._ready is not None:
            raise RuntimeError("a rollout is already in flight: complete and take it first")
        batch = self.prompts.next_batch()
        pending = self.engines.submit(batch, self._sampling(step, 0))
        self._pending = (step, batch, pending, time.perf_counter())

    def complete(self) -> None:
        """Collect the batch in flight (scoring each engine's part as it arrives), refill dropped
        groups, and keep it for `take`. Does nothing when nothing is in flight."""
        if self._pending is None:
            return
        step, batch, pending, start = self._pending
        self._pending = None
        rollout, scores, reward_s = self._collect(batch, pending)
        metrics = {"time/generate_s": time.perf_counter() - start - reward_s}
        if self.cfg.algorithm.filter_zero_variance_groups:
            batch, rollout, scores, dynamic = self._refill(step, batch, rollout, scores)
            metrics.update(dynamic)
        else:
            metrics["dynamic/zero_variance_fraction"] = _zero_fraction(
                scores, self.cfg.rollout.num_generations)
        self.rewards.check_unscored(scores)  # the whole batch, once (its parts were not)
        metrics["time/reward_s"] = reward_s
        self._ready, self._ready_step = ScoredBatch(batch, rollout, scores, metrics), step

    # ---- pieces --------------------------------------------------------------------------------
    def _sampling(self, step: int, refill_round: int) -> Sampling:
        return Sampling.training(self.cfg.rollout, self.seed(step, refill_round))

    def _collect(self, batch: PromptBatch, pending: Any) -> tuple[Rollout, Scores, float]:
        """Every slice of a generation in flight with its rewards, each scored as it arrives;
        (rollout, scores, seconds spent scoring)."""
        rollouts: dict[int, Rollout] = {}
        scores: dict[int, Scores] = {}
        reward_s = 0.0
        for k, part in pending.arrivals():
            a, b = pending.slices[k]
            start = time.perf_counter()
            scores[k] = self.rewards.score(batch.select(list(range(a, b))), part,
                                           check_unscored=False)
            reward_s += time.perf_counter() - start
            rollouts[k] = part
        order = sorted(rollouts)
        versions = [rollouts[k].adapter_version for k in order]
        if len(set(versions)) != 1:
            raise RuntimeError(f"engines sampled one batch with adapter versions {versions}")
        return (Rollout.concat([rollouts[k] for k in order]),
                Scores.concat([scores[k] for k in order]), reward_s)

    def _refill(self, step: int, batch: PromptBatch, rollout: Rollout,
                scores: Scores) -> tuple[PromptBatch, Rollout, Scores, dict[str, float]]:
        """Drop the zero-variance groups and fill up to `prompts_per_step` groups from up to
        `max_refill_rounds` more batches (same adapter version)."""
        a, n = self.cfg.algorithm, self.cfg.rollout.num_generations
        want = len(batch)
        parts = [(batch, rollout, scores)]
        kept = [_varied_prompts(scores, n)]
        generated, rounds = len(batch), 0
        while sum(map(len, kept)) < want and rounds < a.max_refill_rounds:
            rounds += 1
            extra = self.prompts.next_batch()
            extra_rollout, extra_scores, _ = self._collect(
                extra, self.engines.submit(extra, self._sampling(step, rounds)))
            parts.append((extra, extra_rollout, extra_scores))
            kept.append(_varied_prompts(extra_scores, n))
            generated += len(extra)
        picked: list[tuple[int, list[int]]] = []
        room = want
        for k, prompts in enumerate(kept):
            picked.append((k, prompts[:room]))
            room -= len(picked[-1][1])
        selected = [(parts[k][0].select(p), parts[k][1].select_prompts(p),
                     parts[k][2].select(parts[k][1].rows_of(p))) for k, p in picked if p]
        dropped = generated - sum(map(len, kept))
        metrics = {"dynamic/zero_variance_fraction": dropped / generated,
                   "dynamic/extra_prompts": float(generated - want),
                   "dynamic/refill_rounds": float(rounds),
                   "dynamic/groups": float(want - room)}
        if not selected:  # nothing teaches: keep the first batch (its advantages are all 0)
            return batch, rollout, scores, metrics
        return (PromptBatch.concat([s[0] for s in selected]),
                Rollout.concat([s[1] for s in selected]),
                Scores.concat([s[2] for s in selected]), metrics)

    def reset(self) -> None:
        """Forget the batch in flight or ready (the run goes back to a checkpoint): a generation
        still running finishes on the engines and its result is dropped."""
        self._pending = self._ready = self._ready_step = None

    # ---- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any] | None:
        """The batch prefetched for the next step (one step off), as plain JSON values: a
        resumed run trains on exactly it. None when there is none."""
        if self._pending is not None:
            raise RuntimeError("checkpoint taken while a generation is in flight")
        if self._ready is None:
            return None
        return {"step": self._ready_step, **asdict(self._ready)}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state is None:
            self._ready = self._ready_step = None
            return
        self._ready = ScoredBatch(PromptBatch(**state["batch"]), Rollout(**state["rollout"]),
                                  Scores(**state["scores"]), state["metrics"])
        self._ready_step = state["step"]


def _varied_prompts(scores: Scores, group_size: int) -> list[int]:
    """Indices of the prompts whose group carries a gradient (`zero_variance_groups`)."""
    import torch

    from grpo_ray.algo.grpo import zero_variance_groups

    rewards = torch.tensor([math.nan if s is None else s for s in scores.total],
                           dtype=torch.float64)
    zero = zero_variance_groups(rewards, group_size)
    return [p for p, z in enumerate(zero.tolist()) if not z]


def _zero_fraction(scores: Scores, group_size: int) -> float:
    groups = len(scores.total) // group_size
    return 1 - len(_varied_prompts(scores, group_size)) / groups if groups else 0.0
