"""Which completions take part in the loss: unscorable rows, and truncated ones on request."""
import pytest

from grpo_ray.algo.masking import loss_mask


def test_unscored_rows_are_always_masked():
    totals = [1.0, None, 0.5, 0.0]
    reasons = ["stop", "stop", "length", "length"]
    assert loss_mask(totals, reasons, False) == [True, False, True, True]


def test_truncated_rows_are_masked_on_request():
    totals = [1.0, None, 0.5, 0.0]
    reasons = ["stop", "length", "length", "stop"]
    assert loss_mask(totals, reasons, True) == [True, False, False, True]
    assert loss_mask([], [], True) == []


def test_lengths_must_agree():
    with pytest.raises(ValueError, match="loss_mask: 2 totals but 1 finish reasons"):
        loss_mask([1.0, 2.0], ["stop"], True)


def test_the_driver_masks_what_the_config_asks():
    from grpo_ray.config import load_config
    from grpo_ray.contracts import PromptBatch, Rollout, Scores
    from grpo_ray.contracts import ScoredBatch
    from grpo_ray.driver.trainer import Trainer

    rollout = Rollout(prompt_index=[0] * 4, prompt_ids=[[1]] * 4, completion_ids=[[2, 3]] * 4,
                      completion_texts=["x"] * 4, sampling_logprobs=[[-1.0, -1.0]] * 4,
                      finish_reasons=["stop", "length", "stop", "length"], adapter_version=0)
    total = [1.0, 0.0, None, 0.5]
    for masked, expected in ((False, [True, True, False, True]),
                             (True, [True, False, False, False])):
        cfg = load_config("configs/tiny-cpu.yaml",
                          [f"algorithm.mask_truncated_completions={str(masked).lower()}"])
        # the first function scored what it could, the others nothing
        names = [f.name for f in cfg.reward.functions]
        scores = Scores({n: total if i == 0 else [None] * 4 for i, n in enumerate(names)}, total)
        scored = ScoredBatch(PromptBatch([[1]], [[]], ["1"], ["q"]), rollout, scores)
        assert Trainer(cfg).groups.train_batch(scored).mask == expected
