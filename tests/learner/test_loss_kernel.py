"""`learner.loss_kernel=liger` against the chunked path, on the tiny model in float32 on CPU: the
same loss, metrics and LoRA gradients from `_accumulate_gradients`, for each loss type Liger
computes as TRL does, at token and sequence level, with and without the reference, with each
importance-sampling mode, `delta` and the importance-weighted KL, a masked row, micro-batches of
unequal sizes (exact accumulation), a sampling temperature != 1, and (several iterations) old
log-probs that clip; what it does not compute as TRL does is refused by the config in one line.
One worker; each case runs both kernels on the same prepared rows."""
from __future__ import annotations

import math

import pytest
import torch
from helpers import make_worker

from grpo_ray.config import AlgorithmConfig
from grpo_ray.contracts import TrainBatch

pytest.importorskip("liger_kernel")


@pytest.fixture(scope="module")
def worker(tiny_model_path):
    """float32, lr 0, noise in lora_B (PEFT starts it at zero); 3 rows per micro-batch, so the
    7 active rows below make micro-batches of 3, 3 and 1."""
    return make_worker(tiny_model_path, temperature=0.7, max_completion_length=16,
                       dtype="float32", learning_rate=0.0, logprob_chunk_size=5,
                       micro_batch_size=3)


@pytest.fixture(scope="module")
def batch() -> TrainBatch:
    """8 rows of unequal lengths, one masked out (NaN advantage); sampling log-probs around the
    tiny model's, so the importance weights fall on both sides of 1 and some hit the cap."""
    g = torch.Generator().manual_seed(0)
    prompts = [[1, 87, 85, 266, 201, 57, 74, 390, 223], [1, 260, 85, 33]]
    lengths = [16, 3, 9, 1, 12, 5, 14, 7]
    completions = [torch.randint(3, 400, (n,), generator=g).tolist() for n in lengths]
    sampling = [(-7.0 + 2 * torch.rand(n, generator=g)).tolist() for n in lengths]
    return TrainBatch([prompts[i % 2] for i in range(8)], completions,
                      [1.2, -0.3, -0.9, 0.5, math.nan, 0.6, -1.1, 0.8], sampling,
                      mask=[True] * 4 + [False] + [True] * 3)


def run(w, batch, kernel: str, shift_old: bool = False):
    """Stats and LoRA gradients of one `_accumulate_gradients` with `kernel`."""
    w.set_loss_kernel(kernel)
    prepared = w._prepare(batch)
    if shift_old:  # old log-probs off the current ones, so that the ratio clips both ways
        g = torch.Generator().manual_seed(2)
        for mb in prepared.micro_batches:
            mb.old_logp = mb.old_logp + 0.4 * torch.randn(mb.old_logp.shape, generator=g)
    stats = w._accumulate_gradients(prepared)
    old = torch.cat([mb.old_logp[mb.mask] for mb in prepared.micro_batches])
    grads = {n: p.grad.clone() for n, p in w.model.named_parameters() if p.requires_grad}
    return stats, old, grads


CASES = {
    "grpo, kl, importance sampling": dict(loss_type="grpo", beta=0.04,
                                          importance_sampling_correction=True,
                                          importance_sampling_cap=1.5),
    "grpo, beta 0": dict(loss_type="grpo", beta=0.0),
    "bnpo, kl, importance sampling": dict(loss_type="bnpo", beta=0.04,
                                          importance_sampling_correction=True),
    "bnpo, beta 0": dict(loss_type="bnpo", beta=0.0),
    "dr_grpo, kl, importance sampling": dict(loss_type="dr_grpo", beta=0.04,
                                             importance_sampling_correction=True,
                                             importance_sampling_cap=1.5),
    "dr_grpo, beta 0, clip higher": dict(loss_type="dr_grpo", beta=0.0, epsilon_high=0.28),
    "two iterations, clipped ratios": dict(loss_type="bnpo", beta=0.04, num_iterations=2,
                                           importance_sampling_correction=True),
    "dapo, kl weighted, sequence_mask": dict(loss_type="dapo", beta=0.04,
                                             use_bias_correction_kl=True,
                                             importance_sampling_correction=True,
                                             importance_sampling_mode="sequence_mask",
                                             importance_sampling_cap=1e6),
    "dapo, two iterations, delta": dict(loss_type="dapo", beta=0.0, num_iterations=2,
                                        delta=1.1),
    "gspo (grpo, sequence level), two iterations": dict(
        loss_type="grpo", beta=0.04, importance_sampling_level="sequence", num_iterations=2,
        importance_sampling_correction=True, importance_sampling_mode="sequence_truncate"),
    "dapo, sequence level, token_mask": dict(
        loss_type="dapo", beta=0.04, importance_sampling_level="sequence",
        importance_sampling_correction=True, importance_sampling_mode="token_mask",
        importance_sampling_cap=50.0),
    "cispo, two iterations": dict(loss_type="cispo", beta=0.04, epsilon_high=1.1,
                                  num_iterations=2, importance_sampling_correction=True),
    "sapo, two iterations": dict(loss_type="sapo", beta=0.04, num_iterations=2,
                                 sapo_temperature_neg=2.0),
    "vespo, two iterations, token_mask": dict(
        loss_type="vespo", beta=0.04, num_iterations=2, importance_sampling_correction=True,
        importance_sampling_mode="token_mask", importance_sampling_cap=50.0),
}


@pytest.mark.parametrize("algorithm", CASES.values(), ids=CASES.keys())
def test_liger_loss_equals_the_chunked_path(worker, batch, algorithm):
    worker.algorithm = AlgorithmConfig(total_steps=10, **algorithm)
    shift = algorithm.get("num_iterations", 1) > 1
    want, want_old, want_grads = run(worker, batch, "chunked", shift)
    got, got_old, got_grads = run(worker, batch, "liger", shift)

    assert [len(mb.advantages) for mb in worker._prepare(batch).micro_batches] == [3, 3, 1]
    assert abs(want["loss"]) > 1e-3
    assert (want["kl"] > 0) == (algorithm["beta"] > 0)
    clips = algorithm["loss_type"] not in ("sapo", "vespo")
    assert (want["clip_fraction"] > 0) == (shift and clips)
    assert got.keys() == want.keys()
    for key in want:  # the loss and every figure (kl, clip_fraction, TRL's own)
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
    # the old log-probs the gap metrics and the importance weights are made of
    torch.testing.assert_close(got_old, want_old, rtol=0, atol=1e-6)
    assert got_grads.keys() == want_grads.keys()
    for n, g in got_grads.items():
        torch.testing.assert_close(g, want_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    assert max(g.abs().max() for g in got_grads.values()) > 1e-3


def test_a_whole_step_reports_the_same_metrics(worker, batch):
    worker.algorithm = AlgorithmConfig(total_steps=10, beta=0.04,
                                       importance_sampling_correction=True)
    steps = {}
    for kernel in ["chunked", "liger"]:
        worker.set_loss_kernel(kernel)
        steps[kernel] = worker.train_step(batch)
    for key in ["loss", "kl", "clip_fraction", "grad_norm", "gap_mean_abs_diff", "gap_kl"]:
        assert steps["liger"][key] == pytest.approx(steps["chunked"][key], rel=1e-5, abs=1e-7), key


def test_a_bad_kernel_is_named(worker):
    from grpo_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"^learner.loss_kernel: must be one of 'chunked' or "
                                          r"'liger' \(got 'fused'\)$"):
        load_config(None, ["learner.loss_kernel=fused"])
    with pytest.raises(ValueError, match="loss_kernel"):
        worker.set_loss_kernel("fused")


REFUSED = {
    "luspo": (["algorithm.loss_type=luspo"], "algorithm.loss_type=luspo"),
    "sequence-level sapo": (["algorithm.loss_type=sapo",
                             "algorithm.importance_sampling_level=sequence"],
                            "algorithm.importance_sampling_level=sequence with loss_type=sapo"),
    "entropy mask": (["algorithm.top_entropy_quantile=0.2"],
                     "algorithm.top_entropy_quantile=0.2"),
    "off-policy mask": (["algorithm.off_policy_mask_threshold=0.5"],
                        "algorithm.off_policy_mask_threshold=0.5"),
}


@pytest.mark.parametrize("overrides, named", REFUSED.values(), ids=REFUSED.keys())
def test_what_liger_cannot_compute_is_refused_in_one_line(overrides, named):
    from grpo_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(None, ["learner.loss_kernel=liger", *overrides])
    assert str(e.value) == (f"learner.loss_kernel: liger (Liger-Kernel's fused GRPO loss) does "
                            f"not compute {named} as TRL does; use learner.loss_kernel=chunked")
    load_config(None, overrides)  # the chunked kernel runs them


def test_liger_luspo_is_not_trls_at_token_level():
    """Why luspo is refused: Liger 0.8.5 weights each token's loss by its sequence's length and
    divides by rows x padded width, where TRL sums each sequence's masked tokens (the two agree
    only when the loss is one value per sequence). If a Liger release fixes it, this fails: let
    the config accept luspo with liger then."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    from grpo_ray.algo.grpo import grpo_loss
    from grpo_ray.learner.logprobs import token_logprobs

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 5, 8, generator=g)
    weight = torch.randn(11, 8, generator=g)
    targets = torch.randint(0, 11, (3, 5), generator=g)
    mask = torch.tensor([[1.0] * 5, [1.0] * 3 + [0.0] * 2, [1.0] + [0.0] * 4])
    advantages = torch.tensor([1.0, -0.5, 0.3])
    logp = token_logprobs(hidden, weight, targets, chunk_size=4)
    old = logp.detach() + 0.1 * torch.randn(3, 5, generator=g)  # ratios that vary by token
    liger, _ = LigerFusedLinearGRPOLoss(beta=0.0, compiled=False, use_ref_model=False,
                                        chunk_size=3, loss_type="luspo")(
        hidden, weight, targets, mask, advantages, old_per_token_logps=old)
    ours = grpo_loss(logp, old, None, advantages, mask, loss_type="luspo", beta=0.0,
                     num_sequences=3, num_tokens=9, max_completion_length=5, epsilon=0.2).loss
    assert abs(liger.item() - ours.item()) > 1e-3
    # at sequence level, one value per sequence, they agree
    liger, _ = LigerFusedLinearGRPOLoss(beta=0.0, compiled=False, use_ref_model=False,
                                        chunk_size=3, loss_type="luspo",
                                        importance_sampling_level="sequence")(
        hidden, weight, targets, mask, advantages, old_per_token_logps=old)
    ours = grpo_loss(logp, old, None, advantages, mask, loss_type="luspo", beta=0.0,
                     num_sequences=3, num_tokens=9, max_completion_length=5, epsilon=0.2,
                     importance_sampling_level="sequence").loss
    assert liger.item() == pytest.approx(ours.item(), rel=1e-5)


def test_liger_without_the_package_is_a_config_error(monkeypatch):
    import importlib.util

    from grpo_ray.config import ConfigError, load_config

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(ConfigError, match=r"^learner.loss_kernel: liger needs the liger-kernel "
                                          r"package"):
        load_config(None, ["learner.loss_kernel=liger"])
    assert load_config(None, []).learner.loss_kernel == "chunked"
