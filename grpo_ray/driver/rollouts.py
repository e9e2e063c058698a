"""Runs in the driver: where each training step's scored rollout comes from. `Rollouts.submit(s)`
draws step s's prompts, starts every engine on them and returns at once a `PendingRollout`;
`.result()` collects it: each engine's part is scored on the reward pool as it arrives, while the
others still generate, and DAPO's dynamic sampling (`algorithm.filter_zero_variance_groups`)
drops the groups whose rewards are all equal and refills the batch from the next prompts (whole
batches, at most `algorithm.max_refill_rounds`), all with the same adapter version. The training
loop holds the pending rollout: on policy it asks for the result at once; one step off it submits
the next step's rollout beside the update (`driver.trainer.Trainer.run_step`).

Sampling seeds derive from the step (and the refill round), so a resumed run, or a slice
generated again by a replacement engine, samples what an uninterrupted run did.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from grpo_ray.config import Config
from grpo_ray.contracts import PromptBatch, Rollout, Sampling, ScoredBatch, Scores
from grpo_ray.driver.groups import Groups

_REFILL_SEED_STRIDE = 1_000_000_007
"""Seeds of refill round r are offset by r times this (prime) from the step's own."""


class PendingRollout:
    """Step `step`'s rollout, in flight on the engines (or already collected)."""

    def __init__(self, rollouts: "Rollouts", step: int, batch: PromptBatch | None = None,
                 scored: ScoredBatch | None = None) -> None:
        self.rollouts, self.step = rollouts, step
        self._scored = scored
        if scored is None:
            self._batch = batch
            self._generation = rollouts.engines.submit(batch, rollouts.sampling(step, 0))
            self._start = time.perf_counter()

    @property
    def collected(self) -> bool:
        """Whether `result` has the batch (a checkpoint keeps only a collected one)."""
        return self._scored is not None

    def result(self) -> ScoredBatch:
        """The scored batch (waits for the engines and the rewards the first time)."""
        if self._scored is None:
            self._scored = self.rollouts.collect(self.step, self._batch, self._generation,
                                                 self._start)
        return self._scored

    def state_dict(self) -> dict[str, Any]:
        """The collected batch as plain JSON values (a checkpoint: a resumed run trains on
        exactly it)."""
        return {"step": self.step, **asdict(self.result())}


class Rollouts:
    """Produces the scored batch of each step from the prompt iterator, the engine group and
    the reward pool (module docstring)."""

    def __init__(self, cfg: Config, prompts: Any, engines: Any, rewards: Any,
                 groups: Groups) -> None:
        self.cfg, self.prompts, self.engines, self.rewards = cfg, prompts, engines, rewards
        self.groups = groups

    def submit(self, step: int) -> PendingRollout:
        """Draw step `step`'s prompts and start the engines on them; returns at once."""
        return PendingRollout(self, step, self.prompts.next_batch())

    def restored(self, state: dict[str, Any] | None) -> PendingRollout | None:
        """A rollout collected before a checkpoint (`PendingRollout.state_dict`; None: none)."""
        if state is None:
            return None
        scored = ScoredBatch(PromptBatch(**state["batch"]), Rollout(**state["rollout"]),
                             Scores(**state["scores"]), state["metrics"])
        return PendingRollout(self, state["step"], scored=scored)

    def seed(self, step: int, refill_round: int = 0) -> int:
        """Prompt j of step s samples with seed `base + s * prompts_per_step + j` (plus a
        stride per refill round), whatever the number of engines."""
        base = self.cfg.algorithm.seed * 1_000_003 + step * self.cfg.rollout.prompts_per_step
        return base + refill_round * _REFILL_SEED_STRIDE

    def sampling(self, step: int, refill_round: int) -> Sampling:
        return Sampling.training(self.cfg.rollout, self.seed(step, refill_round))

    # ---- collecting ----------------------------------------------------------------------------
    def collect(self, step: int, batch: PromptBatch, generation: Any,
                start: float) -> ScoredBatch:
        """The batch of a generation in flight, scored, refilled where groups were dropped."""
        rollout, scores, reward_s = self._scored_parts(batch, generation)
        metrics = {"time/generate_s": time.perf_counter() - start - reward_s}
        if self.cfg.algorithm.filter_zero_variance_groups:
            batch, rollout, scores, dynamic = self._refill(step, batch, rollout, scores)
            metrics.update(dynamic)
        else:
            metrics["dynamic/zero_variance_fraction"] = self.groups.zero_fraction(scores)
        self.rewards.check_unscored(scores)  # the whole batch, once (its parts were not)
        metrics["time/reward_s"] = reward_s
        return ScoredBatch(batch, rollout, scores, metrics)

    def _scored_parts(self, batch: PromptBatch, generation: Any) -> tuple[Rollout, Scores, float]:
        """Every slice of a generation in flight with its rewards, each scored as it arrives;
        (rollout, scores, seconds spent scoring)."""
        rollouts: dict[int, Rollout] = {}
        scores: dict[int, Scores] = {}
        reward_s = 0.0
        for k, part in generation.arrivals():
            a, b = generation.slices[k]
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
        rounds_max = self.cfg.algorithm.max_refill_rounds
        want = len(batch)
        parts = [(batch, rollout, scores)]
        kept = [self.groups.varied(scores)]
        generated, rounds = len(batch), 0
        while sum(map(len, kept)) < want and rounds < rounds_max:
            rounds += 1
            extra = self.prompts.next_batch()
            extra_rollout, extra_scores, _ = self._scored_parts(
                extra, self.engines.submit(extra, self.sampling(step, rounds)))
            parts.append((extra, extra_rollout, extra_scores))
            kept.append(self.groups.varied(extra_scores))
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
