"""Step metrics: the step `accuracy` is the judging reward's share of right answers."""
import pytest

from grpo_ray.contracts import PromptBatch, Rollout, Scores
from grpo_ray.driver.metrics import step_metrics

TEXTS = ["<answer>\n0.75\n</answer>", "<answer>\n3/4\n</answer>", "<answer>\n1\n</answer>",
         "no answer"]


def _step(math_scores: list[float | None]) -> tuple[PromptBatch, Rollout, Scores]:
    batch = PromptBatch([[1]], [[{"role": "user", "content": "q"}]], ["\\frac{3}{4}"], ["q"])
    rollout = Rollout([0] * 4, [[1]] * 4, [[2]] * 4, TEXTS, [[0.0]] * 4, ["stop"] * 4, 1)
    scores = Scores({"math": math_scores, "strict_format": [0.0] * 4},
                    [s if s is not None else 0.0 for s in math_scores])
    return batch, rollout, scores


def test_accuracy_is_the_judging_rewards_share_of_right_answers():
    # math-verify scored 0.75 and 3/4 right (2.0); one row unscored is left out of the share
    m = step_metrics(*_step([2.0, 2.0, 0.0, None]), correctness="math")
    assert m["accuracy"] == pytest.approx(2 / 3)
    # without a judging reward, GSM8K's numeric rule reads the texts: a LaTeX gold is compared
    # as a string, so nothing is right
    assert step_metrics(*_step([2.0, 2.0, 0.0, None]))["accuracy"] == 0.0
