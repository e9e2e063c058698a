"""token_logprobs against the naive full log_softmax + gather, values and gradients."""
from __future__ import annotations

import pytest
import torch

from grpo_ray.learner.logprobs import token_logprobs


def _naive(hidden, weight, targets, temperature=1.0):
    logits = (hidden @ weight.T) / temperature
    return logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _inputs(B=3, T=7, H=16, V=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=g)
    return hidden, weight, targets


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 21, 1000])  # 4 and 5 do not divide T=7 nor B*T=21
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_equals_naive_values_and_gradients(chunk_size, temperature):
    hidden, weight, targets = _inputs()
    upstream = torch.randn(3, 7, dtype=torch.float64)  # a generic loss, not just a sum

    got = token_logprobs(hidden, weight, targets, chunk_size, temperature)
    (got * upstream).sum().backward()
    got_dh, got_dw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    want = _naive(hidden, weight, targets, temperature)
    (want * upstream).sum().backward()

    assert got.dtype == torch.float64 and got.shape == (3, 7)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(got_dh, hidden.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(got_dw, weight.grad, rtol=0, atol=1e-12)


def test_matches_trl_on_the_full_logits():
    """TRL's per-token log-probs: `selective_log_softmax` of the whole batch's logits."""
    from trl.trainer.utils import selective_log_softmax

    hidden, weight, targets = (x.detach().float() if x.is_floating_point() else x
                               for x in _inputs())
    want = selective_log_softmax(hidden @ weight.T, targets, temperature=0.7)
    got = token_logprobs(hidden, weight, targets, chunk_size=4, temperature=0.7)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_hand_computed_and_low_precision_inputs():
    # One position, logits [0, ln 3] -> p(target=1) = 3/4.
    hidden = torch.tensor([[[1.0]]])
    weight = torch.tensor([[0.0], [torch.log(torch.tensor(3.0)).item()]])
    got = token_logprobs(hidden, weight, torch.tensor([[1]]), chunk_size=1)
    assert got.item() == pytest.approx(torch.log(torch.tensor(0.75)).item(), abs=1e-6)
    # bf16 inputs give fp32 log-probs.
    h, w, t = _inputs()
    out = token_logprobs(h.detach().bfloat16(), w.detach().bfloat16(), t, chunk_size=4)
    assert out.dtype == torch.float32


def test_no_grad_and_bad_shapes():
    hidden, weight, targets = _inputs()
    with torch.no_grad():
        out = token_logprobs(hidden, weight, targets, chunk_size=4)
    assert not out.requires_grad
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(hidden, weight, targets[:, :3], chunk_size=4)
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs(hidden, weight, targets, chunk_size=0)


def test_autograd_saves_no_logits():
    """What autograd keeps for backward is the inputs, never a chunk's (chunk, V) logits."""
    hidden, weight, targets = _inputs(B=2, T=64, H=8, V=512)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = token_logprobs(hidden, weight, targets, chunk_size=16)
    out.sum().backward()
    assert saved and max(saved) <= weight.numel()  # weight (V*H=4096) < one chunk's logits (16*512)


def test_the_matmul_runs_in_the_dtype_asked_for():
    """`dtype`: bf16 (the learner's compute dtype on a GPU) or fp32 (cast_lm_head_to_fp32), for
    bf16 hidden states and an fp32 lm_head weight (PEFT's 4-bit setup). The softmax is fp32
    either way; the two differ by the bf16 rounding of the weight."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 5, 64, generator=g).to(torch.bfloat16)
    weight = torch.randn(300, 64, generator=g) / 8
    targets = torch.randint(0, 300, (2, 5), generator=g)
    fp32 = token_logprobs(hidden, weight, targets, 4, dtype=torch.float32)
    bf16 = token_logprobs(hidden, weight, targets, 4, dtype=torch.bfloat16)
    assert fp32.dtype == bf16.dtype == torch.float32
    torch.testing.assert_close(fp32, _naive(hidden.float(), weight, targets), rtol=0, atol=1e-5)
    want_bf16 = (hidden @ weight.to(torch.bfloat16).T).float().log_softmax(-1)
    torch.testing.assert_close(bf16, want_bf16.gather(-1, targets.unsqueeze(-1)).squeeze(-1),
                               rtol=0, atol=1e-5)
    assert 1e-4 < (fp32 - bf16).abs().max() < 0.1
    torch.testing.assert_close(token_logprobs(hidden, weight, targets, 4), fp32)  # the weight's


@pytest.mark.parametrize("chunk_size", [1, 5, 1000])
def test_entropies_from_the_same_chunks(chunk_size):
    """`with_entropy`: the entropy of each position's tempered distribution, -sum p log p (TRL's
    `entropy_from_logits`), chunk by chunk, beside the same log-probs; without gradients only."""
    hidden, weight, targets = (x.detach() if x.is_floating_point() else x for x in _inputs())
    with torch.no_grad():
        logp, entropy = token_logprobs(hidden, weight, targets, chunk_size, 0.7,
                                       with_entropy=True)
    logits = (hidden @ weight.T) / 0.7
    want = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    torch.testing.assert_close(entropy, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(logp, _naive(hidden, weight, targets, 0.7), rtol=0, atol=1e-12)
    assert (entropy > 0).all() and entropy.shape == (3, 7)
    with pytest.raises(ValueError, match="with_entropy is for passes without gradients"):
        token_logprobs(hidden.requires_grad_(), weight, targets, chunk_size, with_entropy=True)
