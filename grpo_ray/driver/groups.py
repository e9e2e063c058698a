"""Runs in the driver: the one reader of the group size. A step's completions come back flat and
prompt-major (`contracts`), `rollout.num_generations` of each prompt side by side; this module
turns their rewards (each function's, aggregated as `algorithm.multi_objective_aggregation`
says) into the group-relative advantages the learner trains on, and tells which
groups carry no gradient (DAPO's dynamic sampling drops them). The math is in `algo.advantages`."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from grpo_ray.contracts import ScoredBatch, Scores, TrainBatch

if TYPE_CHECKING:
    from torch import Tensor


class Groups:
    """`size` completions a prompt (`rollout.num_generations`); `scale_rewards`
    (`algorithm.scale_rewards`), `mask_truncated` (`algorithm.mask_truncated_completions`),
    `aggregation` (`algorithm.multi_objective_aggregation`) and `weights` (each reward
    function's `weight`, in config order; None: 1 each) as configured."""

    def __init__(self, size: int, scale_rewards: str = "group", mask_truncated: bool = False,
                 aggregation: str = "sum_then_normalize",
                 weights: tuple[float, ...] | None = None) -> None:
        self.size, self.scale_rewards, self.mask_truncated = size, scale_rewards, mask_truncated
        self.aggregation, self.weights = aggregation, weights

    @staticmethod
    def rewards(scores: Scores) -> "Tensor":
        """(B,) float64 totals, NaN where no reward function scored the row."""
        import torch

        return torch.tensor([math.nan if s is None else s for s in scores.total],
                            dtype=torch.float64)

    def train_batch(self, scored: ScoredBatch) -> TrainBatch:
        """What the learner trains on: the completions with their group-relative advantages,
        the rollout's log-probs and the loss mask (`algo.masking.loss_mask`)."""
        import torch

        from grpo_ray.algo.advantages import MULTI_OBJECTIVE_AGGREGATIONS
        from grpo_ray.algo.masking import loss_mask

        rollout, scores = scored.rollout, scored.scores
        # (B, K): each function's scores (NaN: it did not score the row), in config order
        per_func = torch.tensor([[math.nan if s is None else s for s in values]
                                 for values in scores.per_function.values()],
                                dtype=torch.float64).reshape(-1, len(scores.total)).T
        weights = (torch.ones(per_func.shape[1], dtype=torch.float64) if self.weights is None
                   else torch.tensor(self.weights, dtype=torch.float64))
        advantages = MULTI_OBJECTIVE_AGGREGATIONS[self.aggregation](
            per_func, weights, self.size, self.scale_rewards)
        return TrainBatch(rollout.prompt_ids, rollout.completion_ids, advantages.tolist(),
                          rollout.sampling_logprobs,
                          mask=loss_mask(scores.total, rollout.finish_reasons,
                                         self.mask_truncated),
                          engine_index=rollout.engine_index, sampling_version=scored.version)

    def varied(self, scores: Scores) -> list[int]:
        """Indices of the prompts whose group carries a gradient (`zero_variance_groups`)."""
        from grpo_ray.algo.advantages import zero_variance_groups

        zero = zero_variance_groups(self.rewards(scores), self.size)
        return [p for p, z in enumerate(zero.tolist()) if not z]

    def zero_fraction(self, scores: Scores) -> float:
        """The fraction of the batch's groups that carry no gradient."""
        groups = len(scores.total) // self.size
        return 1 - len(self.varied(scores)) / groups if groups else 0.0
