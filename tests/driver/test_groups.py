"""The driver's train batch: every reward function's scores, the config's weights and
`algorithm.multi_objective_aggregation` become the advantages (`driver.groups.Groups`)."""
import math

import pytest
import torch

from grpo_ray.algo.advantages import MULTI_OBJECTIVE_AGGREGATIONS
from grpo_ray.config import load_config
from grpo_ray.contracts import PromptBatch, Rollout, ScoredBatch, Scores
from grpo_ray.driver.trainer import Trainer

# two prompts of four completions; the first function skips a row, a row neither scored
FIRST = [1.0, 0.0, None, 1.0, 0.0, 0.0, 1.0, None]
SECOND = [0.5, 0.5, 1.0, 0.0, 1.0, 0.0, 0.0, None]
WEIGHTS = (1.0, 2.0)


def scored() -> ScoredBatch:
    total = [None if a is None and b is None else (a or 0) * WEIGHTS[0] + (b or 0) * WEIGHTS[1]
             for a, b in zip(FIRST, SECOND)]
    rollout = Rollout(prompt_index=[0] * 4 + [1] * 4, prompt_ids=[[1]] * 8,
                      completion_ids=[[2, 3]] * 8, completion_texts=["x"] * 8,
                      sampling_logprobs=[[-1.0, -1.0]] * 8, finish_reasons=["stop"] * 8,
                      adapter_version=0)
    return ScoredBatch(PromptBatch([[1], [1]], [[], []], ["1", "2"], ["q", "r"]), rollout,
                       Scores({"first": FIRST, "second": SECOND}, total))


@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
def test_the_train_batch_aggregates_each_functions_scores_as_configured(aggregation):
    functions = "[{name: accuracy, weight: 1.0}, {name: format_reward, weight: 2.0}]"
    cfg = load_config("configs/tiny-cpu.yaml",
                      [f"algorithm.multi_objective_aggregation={aggregation}",
                       f"reward.functions={functions}", "rollout.num_generations=4"])
    got = Trainer(cfg).groups.train_batch(scored()).advantages
    per_func = torch.tensor([[math.nan if s is None else s for s in col]
                             for col in (FIRST, SECOND)], dtype=torch.float64).T
    expected = MULTI_OBJECTIVE_AGGREGATIONS[aggregation](
        per_func, torch.tensor(WEIGHTS, dtype=torch.float64), 4, cfg.algorithm.scale_rewards)
    assert got == pytest.approx(expected.tolist(), abs=1e-12)
    assert got[7] == 0 and any(a != 0 for a in got)  # the row neither function scored


def test_the_two_aggregations_differ_on_these_scores():
    def advantages(aggregation: str) -> list[float]:
        from grpo_ray.driver.groups import Groups

        return Groups(4, "group", False, aggregation, WEIGHTS).train_batch(scored()).advantages

    assert advantages("sum_then_normalize") != pytest.approx(advantages("normalize_then_sum"))
