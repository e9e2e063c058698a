"""GRPO math: hand-computed cases, loop-versus-vectorized checks, edge cases and the exactness of
gradient accumulation."""
from __future__ import annotations

import math

import pytest
import torch

from grpo_ray.algo.advantages import group_advantages
from grpo_ray.algo.grpo import (LOSS_TYPES, aggregate_loss, grpo_loss, importance_weights, k3_kl,
                                probability_gap)
from grpo_ray.algo.losses import POLICY_LOSSES, PolicyInputs, clipped_ratio

NAN = float("nan")
LN = math.log


def t(*rows, dtype=torch.float64):
    return torch.tensor(rows if len(rows) > 1 else rows[0], dtype=dtype)


def close(x: torch.Tensor, expected) -> None:
    torch.testing.assert_close(x.double(), t(expected), atol=1e-12, rtol=0)


# ---------------------------------------------------------------- advantages

# TRL's nanstd computes its Bessel factor count / (count - 1) in float32 (torch's default dtype),
# so float64 advantages agree with float64 arithmetic to ~1e-8, relative.
TRL_STD_REL = 1e-7


def test_group_advantages_hand_computed():
    # group 1: mean 2, unbiased std 1 -> (r - 2) / 1.0001; group 2: all equal -> 0
    adv = group_advantages(t([1, 2, 3, 0, 0, 0]), 3)
    assert adv.tolist() == pytest.approx([-0.9999000099990001, 0, 0.9999000099990001, 0, 0, 0], abs=1e-12)
    # scale "batch": group means (1, 1), batch std sqrt(2/3) -> (r - 1) / (0.8164966 + 1e-4)
    adv = group_advantages(t([0, 2, 1, 1]), 2, scale="batch")
    assert adv.tolist() == pytest.approx([-1.2245948897605123, 1.2245948897605123, 0, 0],
                                         rel=TRL_STD_REL)
    assert group_advantages(t([0, 2, 1, 1]), 2, scale="none").tolist() == [-1, 1, 0, 0]


def test_group_advantages_nan_rows_excluded_and_zero():
    # valid (0, 2, 4): mean 2, std 2 -> +-2 / 2.0001; the NaN row gets 0
    adv = group_advantages(t([0, NAN, 2, 4]), 4)
    assert adv.tolist() == pytest.approx([-0.9999500024998749, 0, 0, 0.9999500024998749], abs=1e-12)
    # one valid row, or none, carries no signal
    adv = group_advantages(t([NAN, 3.0, NAN, NAN, NAN, NAN]), 3)
    assert adv.tolist() == [0.0] * 6
    for scale in ("group", "batch", "none"):
        assert not torch.isnan(group_advantages(t([NAN, 1, 5, NAN]), 2, scale=scale)).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_equal_group_is_exactly_zero(dtype):
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.1, 2.0, 0.5, 0.5, NAN], dtype=dtype)
    for scale in ("group", "batch", "none"):
        adv = group_advantages(rewards, 4, scale=scale)
        assert adv[:4].tolist() == [0.0] * 4
        assert not torch.isnan(adv).any()
    assert group_advantages(rewards, 4).dtype == dtype


def test_group_advantages_loop_vs_vectorized():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 4, (40,), generator=g).double() * 0.5
    rewards[torch.rand(40, generator=g) < 0.2] = NAN
    n, eps = 5, 1e-4
    valid_all = rewards[~torch.isnan(rewards)]
    batch_std = valid_all.std()
    for scale in ("group", "batch", "none"):
        expected = []
        for i in range(0, 40, n):
            grp = rewards[i:i + n]
            vals = grp[~torch.isnan(grp)]
            for r in grp.tolist():
                if math.isnan(r) or len(vals) < 2 or vals.max() == vals.min():
                    expected.append(0.0)
                    continue
                a = r - vals.mean().item()
                if scale == "group":
                    a /= vals.std().item() + eps
                elif scale == "batch":
                    a /= batch_std.item() + eps
                expected.append(a)
        assert group_advantages(rewards, n, scale=scale).tolist() == pytest.approx(
            expected, rel=TRL_STD_REL, abs=1e-12)


def test_group_advantages_bad_input():
    with pytest.raises(ValueError, match="group_size 4"):
        group_advantages(t([1, 2, 3]), 4)
    with pytest.raises(ValueError, match="'max'"):
        group_advantages(t([1, 2]), 2, scale="max")
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(t([1, 2], [3, 4]), 2)
    with pytest.raises(ValueError, match="inf"):
        group_advantages(t([1, math.inf]), 2)


# ---------------------------------------------------------------- KL, surrogate, IS

def test_k3_kl_hand_computed():
    # ref - logp = ln(1/2): exp = 0.5 -> 0.5 + ln 2 - 1
    kl = k3_kl(t([[LN(0.5), LN(0.3)]]), t([[LN(0.25), LN(0.3)]]))
    close(kl, [[0.5 + LN(2) - 1, 0.0]])
    assert (k3_kl(torch.randn(3, 4).double(), torch.randn(3, 4).double()) >= 0).all()


def policy_inputs(logp, old, advantages, mask=None):
    log_ratio = logp - old
    mask = torch.ones_like(logp) if mask is None else mask
    return PolicyInputs(logp, log_ratio, torch.exp(log_ratio), advantages[:, None], mask, None)


def test_clipped_ratio_both_sides_delta_and_gradient():
    ratios = [1.5, 0.5, 1.1, 0.9]
    logp = torch.log(t([ratios, ratios, ratios])).requires_grad_()
    old = torch.zeros(3, 4, dtype=torch.float64)
    term = clipped_ratio(policy_inputs(logp, old, t([1.0, -1.0, 0.0])), epsilon=0.2,
                         epsilon_high=0.28)
    # A = +1: -min(r, clamp(r, 0.8, 1.28)); A = -1: max(r, clamp(r, 0.8, 1.28));
    # A = 0: nothing clipped
    close(term.per_token, [[-1.28, -0.5, -1.1, -0.9], [1.5, 0.8, 1.1, 0.9], [0, 0, 0, 0]])
    assert term.clipped.tolist() == [[True, False, False, False], [False, True, False, False],
                                     [False] * 4]
    term.per_token.sum().backward()
    # d(-A r)/d logp = -A r where unclipped, 0 where the clipped constant was taken
    close(logp.grad, [[0, -0.5, -1.1, -0.9], [1.5, 0, 1.1, 0.9], [0, 0, 0, 0]])
    assert (logp.grad[term.clipped] == 0).all()
    # delta 1.2 caps the ratio where A < 0 too: max(min(r, 1.2), clamp(r, 0.8, 1.28))
    term = clipped_ratio(policy_inputs(logp, old, t([1.0, -1.0, 0.0])), epsilon=0.2,
                         epsilon_high=0.28, delta=1.2)
    close(term.per_token[1], [1.28, 0.8, 1.1, 0.9])
    assert term.stats["clip_ratio/low_mean"].value() == pytest.approx(1 / 12)


def test_the_other_terms_hand_computed():
    """At ratio 1 (on policy): CISPO -A logp with gradient -A; SAPO -4/tau sigmoid(0) A = -2A/tau
    with gradient -A (sigmoid'(0) = 1/4); VESPO phi(1) = 1: -A logp; LUSPO sums over tokens."""
    logp = torch.log(t([[0.5, 0.25], [0.5, 0.5]])).requires_grad_()
    inputs = policy_inputs(logp, logp.detach(), t([2.0, -1.0]))
    kw = {"epsilon": 0.2, "epsilon_high": 5.0, "sapo_temperature_pos": 1.0,
          "sapo_temperature_neg": 2.0, "vespo_k_pos": 2.0, "vespo_lambda_pos": 3.0,
          "vespo_k_neg": 3.0, "vespo_lambda_neg": 2.0}
    want = {"cispo": ([[-2 * LN(0.5), -2 * LN(0.25)], [LN(0.5)] * 2], [[-2, -2], [1, 1]]),
            "sapo": ([[-4.0, -4.0], [1.0, 1.0]], [[-2, -2], [1, 1]]),
            "vespo": ([[-2 * LN(0.5), -2 * LN(0.25)], [LN(0.5)] * 2], [[-2, -2], [1, 1]])}
    for name, (values, grads) in want.items():
        loss = POLICY_LOSSES[name]
        term = loss.term(inputs, **{p: kw[p] for p in loss.params})
        close(term.per_token.expand(2, 2), values)
        logp.grad = None
        term.per_token.sum().backward()
        close(logp.grad, grads)
    mask = t([[1, 1], [1, 0]])
    got = aggregate_loss(t([[1.0, 2.0], [3.0, 4.0]]), mask, "luspo", num_sequences=2,
                         num_tokens=3, max_completion_length=2)
    assert got.item() == pytest.approx((1 + 2 + 3) / 2)


def test_sequence_level_importance_weight_is_the_mean_log_ratio():
    """GSPO: one ratio per sequence, exp of the mean of its tokens' log-ratios."""
    logp = torch.log(t([[2.0, 0.5, 1.0]]))
    old = torch.zeros(1, 3, dtype=torch.float64)
    kw = dict(beta=0.0, epsilon=0.2, loss_type="grpo", num_sequences=1, num_tokens=2,
              max_completion_length=3)
    mask = t([[1, 1, 0]])
    out = grpo_loss(logp, old, None, t([1.0]), mask, importance_sampling_level="sequence", **kw)
    # (ln 2 + ln 0.5) / 2 = 0: ratio 1 for both tokens; per token 1.0 would be clipped at 1.2
    assert out.loss.item() == pytest.approx(-1.0, abs=1e-12)
    token = grpo_loss(logp, old, None, t([1.0]), mask, **kw)
    assert token.loss.item() == pytest.approx(-(1.2 + 0.5) / 2, abs=1e-12)


def test_grpo_loss_names_a_missing_or_unknown_hyperparameter():
    x = torch.zeros(1, 2)
    kw = dict(beta=0.0, num_sequences=1, num_tokens=2, max_completion_length=2)
    with pytest.raises(ValueError, match="missing sapo_temperature_pos, sapo_temperature_neg"):
        grpo_loss(x, x, None, torch.zeros(1), x + 1, loss_type="sapo", epsilon=0.2, **kw)
    with pytest.raises(ValueError, match="unknown epsilonn"):
        grpo_loss(x, x, None, torch.zeros(1), x + 1, loss_type="grpo", epsilon=0.2,
                  epsilonn=0.3, **kw)
    with pytest.raises(ValueError, match="unknown loss_type 'foo'"):
        grpo_loss(x, x, None, torch.zeros(1), x + 1, loss_type="foo", **kw)


def test_importance_weights_token_truncate():
    old = torch.log(t([[0.3, 0.9, 0.2, 0.5, 0.9]])).requires_grad_()
    sampling = torch.log(t([[0.2, 0.3, 0.4, NAN, 0.1]]))
    w = importance_weights(old, sampling, t([[1, 1, 1, 1, 0]]), "token_truncate", cap=2.0)
    # ratios 1.5, 3 -> capped at 2, 0.5, NaN sampling logprob -> 1, outside the mask -> 1
    close(w, [[1.5, 2.0, 0.5, 1.0, 1.0]])
    assert not w.requires_grad
    # the sequence modes: the product of the ratios, 1.5 * 3 * 0.5 = 2.25
    close(importance_weights(old, sampling, t([[1, 1, 1, 1, 0]]), "sequence_truncate", 3.0),
          [[2.25]])
    close(importance_weights(old, sampling, t([[1, 1, 1, 1, 0]]), "sequence_mask", 2.0), [[0.0]])


# ---------------------------------------------------------------- aggregation and loss

PER_TOKEN = [[1.0, 2, 3, 4], [5, 6, 7, 8]]
MASK = [[1, 1, 0, 0], [1, 1, 1, 0]]


@pytest.mark.parametrize("loss_type,max_len,expected", [
    ("grpo", 4, ((1 + 2) / 2 + (5 + 6 + 7) / 3) / 2),   # 3.75
    ("bnpo", 4, (3 + 18) / 5),                          # 4.2
    ("dr_grpo", 4, 21 / (2 * 4)),                       # 2.625
    ("dr_grpo", 10, 21 / (2 * 10)),                     # 1.05
])
def test_aggregate_loss_hand_computed(loss_type, max_len, expected):
    for mask in (t(MASK), t(MASK, dtype=torch.bool)):
        got = aggregate_loss(t(PER_TOKEN), mask, loss_type, num_sequences=2, num_tokens=5,
                             max_completion_length=max_len)
        assert got.item() == pytest.approx(expected, abs=1e-12)


def test_aggregate_loss_loop_vs_vectorized_and_empty_row():
    g = torch.Generator().manual_seed(1)
    per_token = torch.randn(5, 7, generator=g, dtype=torch.float64)
    mask = (torch.rand(5, 7, generator=g) < 0.6).double()
    mask[2] = 0  # a row without tokens still counts as a sequence in "grpo"
    rows = [(per_token[i] * mask[i]).sum().item() / max(1.0, mask[i].sum().item()) for i in range(5)]
    total = sum((per_token[i] * mask[i]).sum().item() for i in range(5))
    n_tok = int(mask.sum())
    expected = {"grpo": sum(rows) / 5, "sapo": sum(rows) / 5, "bnpo": total / n_tok,
                "dapo": total / n_tok, "cispo": total / n_tok, "vespo": total / n_tok,
                "dr_grpo": total / (5 * 9), "luspo": total / 5}
    assert set(expected) == set(LOSS_TYPES)
    for lt in LOSS_TYPES:
        got = aggregate_loss(per_token, mask, lt, num_sequences=5, num_tokens=n_tok, max_completion_length=9)
        assert got.item() == pytest.approx(expected[lt], abs=1e-12)


def test_aggregate_loss_unknown_type():
    with pytest.raises(ValueError, match="'foo'"):
        aggregate_loss(torch.zeros(1, 2), torch.ones(1, 2), "foo", num_sequences=1, num_tokens=2,
                       max_completion_length=2)


def test_grpo_loss_hand_computed():
    logp = torch.log(t([[0.5, 0.5]])).requires_grad_()
    ref = torch.log(t([[0.25, 0.5]]))
    kw = dict(epsilon=0.2, epsilon_high=None, loss_type="grpo", num_sequences=1, num_tokens=2,
              max_completion_length=2)
    out = grpo_loss(logp, logp.detach(), ref, t([2.0]), t([[1, 1]]), beta=0.1, **kw)
    # ratio 1: surrogate -A = -2 per token; KL (0.5 + ln 2 - 1, 0); mean over the 2 tokens
    k = 0.5 + LN(2) - 1
    assert out.loss.item() == pytest.approx((-2 + 0.1 * k - 2) / 2, abs=1e-12)
    close(out.per_token_kl, [[k, 0.0]])
    assert not out.clipped.any() and out.stats["kl"].value() == pytest.approx(k / 2)
    out.loss.backward()
    # d/dlogp: surrogate -A * r = -2; KL 1 - exp(ref - logp) = (0.5, 0); / 2 tokens
    close(logp.grad, [[(-2 + 0.1 * 0.5) / 2, -1.0]])
    # beta 0 or no reference: no KL
    for beta, r in ((0.0, ref), (0.1, None)):
        out = grpo_loss(logp, logp.detach(), r, t([2.0]), t([[1, 1]]), beta=beta, **kw)
        assert out.loss.item() == pytest.approx(-2.0) and out.per_token_kl.tolist() == [[0.0, 0.0]]


def test_grpo_loss_epsilon_high_and_is_weights():
    logp = torch.log(t([[1.25, 1.0]]))
    old = torch.zeros(1, 2, dtype=torch.float64)
    kw = dict(beta=0.0, epsilon=0.2, loss_type="bnpo", num_sequences=1, num_tokens=2, max_completion_length=2)
    # ratio 1.25 > 1 + 0.2: clipped; with epsilon_high 0.3 it is not
    assert grpo_loss(logp, old, None, t([1.0]), t([[1, 1]]), epsilon_high=None, **kw).clipped.tolist() == [[True, False]]
    out = grpo_loss(logp, old, None, t([1.0]), t([[1, 1]]), epsilon_high=0.3, **kw)
    assert out.clipped.tolist() == [[False, False]]
    assert out.loss.item() == pytest.approx((-1.25 - 1.0) / 2, abs=1e-12)
    out = grpo_loss(logp, old, None, t([1.0]), t([[1, 1]]), epsilon_high=0.3, is_weights=t([[2.0, 0.5]]), **kw)
    assert out.loss.item() == pytest.approx((-2.5 - 0.5) / 2, abs=1e-12)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_micro_batches_sum_to_whole_batch_loss_and_gradient(loss_type):
    g = torch.Generator().manual_seed(2)
    B, T = 6, 5
    base = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = base + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = base + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    sampling = old + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    lengths = torch.tensor([5, 1, 3, 0, 4, 2])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
    isw = importance_weights(old, sampling, mask, "token_truncate", cap=2.0)
    kw = dict(beta=0.04, epsilon=0.2, epsilon_high=0.28, loss_type=loss_type, num_sequences=B,
              num_tokens=int(mask.sum()), max_completion_length=7, sapo_temperature_pos=1.0,
              sapo_temperature_neg=1.05, vespo_k_pos=2.0, vespo_lambda_pos=3.0,
              vespo_k_neg=3.0, vespo_lambda_neg=2.0)

    logp = base.clone().requires_grad_()
    whole = grpo_loss(logp, old, ref, adv, mask, is_weights=isw, **kw).loss
    whole.backward()
    whole_grad = logp.grad.clone()

    logp.grad = None
    total = 0.0
    for rows in (slice(0, 2), slice(2, 5), slice(5, 6)):  # unequal micro-batches
        part = grpo_loss(logp[rows], old[rows], ref[rows], adv[rows], mask[rows], is_weights=isw[rows], **kw).loss
        part.backward()
        total += part.item()
    assert total == pytest.approx(whole.item(), abs=1e-12)
    torch.testing.assert_close(logp.grad, whole_grad, atol=1e-12, rtol=0)
    assert whole_grad.abs().sum() > 0


# ---------------------------------------------------------------- probability gap

def test_probability_gap_hand_computed():
    learner = torch.log(t([[0.5, 0.25, 1.0]]))
    sampling = torch.log(t([[0.25, 0.25, 1.0]]))
    sampling[0, 2] = NAN  # padding is ignored whatever it holds
    gap = probability_gap(learner, sampling, t([[1, 1, 0]]))
    # d = (ln 2, 0): mean |d| = ln2 / 2; k3 = (2 - ln 2 - 1 + 0) / 2
    assert gap["mean_abs_diff"] == pytest.approx(LN(2) / 2, abs=1e-12)
    assert gap["kl"] == pytest.approx((2 - LN(2) - 1) / 2, abs=1e-12)
    assert probability_gap(learner, sampling, torch.zeros(1, 3)) == {"mean_abs_diff": 0.0, "kl": 0.0}


def test_zero_variance_groups_are_the_ones_without_a_gradient():
    from grpo_ray.algo.advantages import zero_variance_groups

    nan = float("nan")
    rewards = torch.tensor([1.0, 1.0, 1.0,      # all equal
                            0.0, 2.0, 2.0,      # varies
                            nan, 3.0, nan,      # one scored row
                            nan, 1.0, 1.0,      # scored rows equal
                            nan, 0.5, 1.5,      # scored rows differ
                            nan, nan, nan], dtype=torch.float64)
    assert zero_variance_groups(rewards, 3).tolist() == [True, False, True, True, False, True]
    adv = group_advantages(rewards, 3).view(-1, 3)
    # exactly the groups it names get no advantage
    assert ((adv == 0).all(dim=1) == zero_variance_groups(rewards, 3)).all()
