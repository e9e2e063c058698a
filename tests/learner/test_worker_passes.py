"""The learner's passes over a batch: with num_iterations 1 the update's micro-batch loop computes
the reference too and takes its own log-probs, detached, as the old ones, saving a forward per
micro-batch. Loss, metrics and every LoRA gradient must equal the two-pass computation (old and
reference log-probs first, then the update), written out here independently of the worker:
unpadded rows through the PEFT model's own forward and lm_head, the whole batch's loss at once.
Float64 on the tiny model, LoRA dropout 0 (with dropout the folded old log-probs carry the
update's dropout, as TRL's do)."""
from __future__ import annotations

import math

import pytest
import torch

from grpo_ray.algo.grpo import (HYPERPARAMETERS, entropy_threshold, grpo_loss,
                                high_entropy_mask, importance_weights, probability_gap)
from grpo_ray.config import AlgorithmConfig, LearnerConfig, LoraConfig, ModelConfig
from grpo_ray.contracts import TrainBatch

MAX_COMPLETION = 16


def float64_worker(path: str, algorithm: dict, **learner):
    """A learner in float64 with noise in lora_B (PEFT starts it at zero) and lr 0, so a
    train_step leaves the weights as they were and its accumulated gradients in `.grad`."""
    from grpo_ray.learner.worker import LearnerWorker

    learner = {"learning_rate": 0.0, "max_grad_norm": 1e6, "warmup_ratio": 0.0,
               "lr_scheduler_type": "constant", "logprob_chunk_size": 5, **learner}
    w = LearnerWorker(path, ModelConfig(dtype="float32"), LoraConfig(r=4, alpha=8),
                      LearnerConfig(**learner), AlgorithmConfig(total_steps=10, **algorithm),
                      max_completion_length=MAX_COMPLETION, temperature=0.9)
    w.model.double()  # in place: the optimizer still holds the same parameters
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in w.model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return w


@pytest.fixture(scope="module")
def batch() -> TrainBatch:
    """8 rows of unequal lengths (prompts of 9 and 4 tokens, completions of 1 to 16), one of them
    masked out (NaN advantage)."""
    g = torch.Generator().manual_seed(0)
    prompts = [[1, 87, 85, 266, 201, 57, 74, 390, 223], [1, 260, 85, 33]]
    lengths = [16, 3, 9, 1, 12, 5, 14, 7]
    completions = [torch.randint(3, 400, (n,), generator=g).tolist() for n in lengths]
    # around the tiny model's log-probs (about -6): importance weights on both sides of 1
    sampling = [(-7.0 + 2 * torch.rand(n, generator=g, dtype=torch.float64)).tolist()
                for n in lengths]
    return TrainBatch([prompts[i % 2] for i in range(8)], completions,
                      [1.2, -0.3, -0.9, 0.5, math.nan, 0.6, -1.1, 0.8], sampling,
                      mask=[True] * 4 + [False] + [True] * 3)


def two_pass_reference(w, batch: TrainBatch) -> dict:
    """Old log-probs (eval mode, no gradient) and the reference's (adapter disabled) of every
    row first; then the whole batch's loss at once and its backward."""
    a, model, dev = w.algorithm, w.model, w.device
    rows = [i for i in range(len(batch)) if batch.mask[i]]

    def row_logp(i: int, entropy: bool = False) -> torch.Tensor:
        p, c = batch.prompt_ids[i], batch.completion_ids[i]
        ids = torch.tensor([p + c], device=dev)
        logits = model(input_ids=ids).logits[0, len(p) - 1:len(p) + len(c) - 1]
        logp = torch.log_softmax(logits.double() / w.temperature, dim=-1)
        if entropy:
            return -(logp.exp() * logp).sum(-1)
        return logp.gather(-1, torch.tensor(c, device=dev)[:, None])[:, 0]

    def padded(xs):
        return torch.nn.utils.rnn.pad_sequence(xs, batch_first=True)

    model.eval()
    with torch.no_grad():
        old = padded([row_logp(i) for i in rows])
        entropies = padded([row_logp(i, entropy=True) for i in rows])
        with model.disable_adapter():
            ref = padded([row_logp(i) for i in rows])
    model.train()
    w.optimizer.zero_grad(set_to_none=True)
    logp = padded([row_logp(i) for i in rows])
    mask = padded([torch.ones(len(batch.completion_ids[i]), dtype=torch.bool, device=dev)
                   for i in rows])
    # float32, as the learner keeps the engine's log-probs (vLLM's are float32)
    sampling = padded([torch.tensor(batch.sampling_logprobs[i], dtype=torch.float32,
                                    device=dev).double() for i in rows])
    advantages = torch.tensor([batch.advantages[i] for i in rows], dtype=torch.float64,
                              device=dev)
    is_weights = (importance_weights(old, sampling, mask, a.importance_sampling_mode,
                                     a.importance_sampling_cap, a.importance_sampling_min)
                  if a.importance_sampling_correction else None)
    entropy_mask = None
    if a.top_entropy_quantile < 1:
        threshold = entropy_threshold(entropies, mask, a.top_entropy_quantile)
        entropy_mask = high_entropy_mask(entropies, mask, threshold)
    num_tokens = int(mask.sum())
    out = grpo_loss(logp, old, ref, advantages, mask, beta=a.beta, loss_type=a.loss_type,
                    num_sequences=len(batch),  # the masked row too: TRL's batch size
                    num_tokens=num_tokens, max_completion_length=MAX_COMPLETION,
                    is_weights=is_weights, importance_sampling_level=a.importance_sampling_level,
                    use_bias_correction_kl=a.use_bias_correction_kl, entropy_mask=entropy_mask,
                    off_policy_threshold=a.off_policy_mask_threshold, sampling_logp=sampling,
                    **{k: getattr(a, k) for k in HYPERPARAMETERS})
    out.loss.backward()
    gap = probability_gap(old, sampling, mask)
    return {"loss": out.loss.item(), "kl": float((out.per_token_kl * mask).sum() / num_tokens),
            "gap_mean_abs_diff": gap["mean_abs_diff"], "gap_kl": gap["kl"],
            "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}}


CASES = {
    "kl, grpo": ({"beta": 0.04}, {"micro_batch_size": 3}),
    "no reference (beta 0)": ({"beta": 0.0}, {"micro_batch_size": 3}),
    "importance sampling, bnpo": ({"beta": 0.04, "importance_sampling_correction": True,
                                   "importance_sampling_cap": 1.5, "loss_type": "bnpo"},
                                  {"micro_batch_size": 2}),
    "token budget, dr_grpo": ({"beta": 0.04, "importance_sampling_correction": True,
                               "loss_type": "dr_grpo"}, {"max_tokens_per_micro_batch": 40}),
    "two iterations (a separate pass)": ({"beta": 0.04, "num_iterations": 2},
                                         {"max_tokens_per_micro_batch": 40}),
    # the lm_head in float64 (its weight's dtype): the products of sequence_mask's and vespo's
    # ratios would carry float32's rounding past 1e-6
    "entropy and off-policy masks, sequence_mask weights, weighted kl, dapo": (
        {"beta": 0.04, "loss_type": "dapo", "top_entropy_quantile": 0.2,
         "off_policy_mask_threshold": 0.0, "importance_sampling_correction": True,
         "importance_sampling_mode": "sequence_mask", "importance_sampling_cap": 1e6,
         "use_bias_correction_kl": True},
        {"max_tokens_per_micro_batch": 40, "cast_lm_head_to_fp32": None}),
    "vespo, token_mask weights": ({"beta": 0.04, "loss_type": "vespo",
                                   "importance_sampling_correction": True,
                                   "importance_sampling_mode": "token_mask",
                                   "importance_sampling_cap": 1e3},
                                  {"micro_batch_size": 3, "cast_lm_head_to_fp32": None}),
    "gspo": ({"beta": 0.04, "loss_type": "grpo", "importance_sampling_level": "sequence",
              "delta": 1.5}, {"micro_batch_size": 3}),
}


@pytest.mark.parametrize("algorithm, learner", CASES.values(), ids=CASES.keys())
def test_one_pass_update_equals_the_two_pass_computation(tiny_model_path, batch, algorithm,
                                                         learner):
    w = float64_worker(tiny_model_path, algorithm, **learner)
    want = two_pass_reference(w, batch)
    forwards = []
    w._decoder.register_forward_hook(lambda module, args, kwargs, out: forwards.append(
        torch.is_grad_enabled()), with_kwargs=True)
    stats = w.train_step(batch)

    for key in ["loss", "kl", "gap_mean_abs_diff", "gap_kl"]:
        assert stats[key] == pytest.approx(want[key], abs=1e-6, rel=0), key
    assert abs(want["loss"]) > 1e-3 and want["gap_mean_abs_diff"] > 0.1
    assert (stats["kl"] > 0) == (algorithm["beta"] > 0)
    assert stats["clip_fraction"] == 0.0  # lr 0: the ratio stays 1 on every iteration
    grads = {n: p.grad for n, p in w.model.named_parameters() if p.requires_grad}
    assert grads.keys() == want["grads"].keys() and len(grads) == 2 * 2 * 7
    for n, g in grads.items():
        torch.testing.assert_close(g, want["grads"][n], rtol=0, atol=1e-6, msg=n)
    assert max(g.abs().max() for g in grads.values()) > 1e-3

    # Forwards: one with gradients per micro-batch and iteration, one without for the
    # reference, plus (several iterations only) one without for the old log-probs.
    plan = w._plan([len(batch.prompt_ids[i]) + len(batch.completion_ids[i])
                    for i in range(len(batch)) if batch.mask[i]])
    iterations = algorithm.get("num_iterations", 1)
    separate = iterations > 1 or algorithm.get("top_entropy_quantile", 1) < 1
    no_grad = len(plan) * ((algorithm["beta"] > 0) + separate)
    assert forwards.count(True) == len(plan) * iterations and forwards.count(False) == no_grad
    if "max_tokens_per_micro_batch" in learner:
        sizes = sorted(len(mb) for mb in plan)
        assert sizes[0] < sizes[-1] and sum(sizes) == 7  # unequal micro-batches, every row once
