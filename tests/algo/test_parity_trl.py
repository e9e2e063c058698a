"""Parity of grpo_ray.algo.grpo with TRL's GRPOTrainer, in float64, to 1e-6.

How TRL is called: its own code, not a transcription. Importing `trl.trainer.grpo_trainer` costs
~10 s (it imports vLLM), so the test reads the installed file
(`trl/trainer/grpo_trainer.py`), takes with `ast` the source of `GRPOTrainer._compute_loss`, of
two statement blocks of `GRPOTrainer._generate_and_score_completions` (the
`sum_then_normalize` advantage block and the vLLM importance-sampling ratio block) and of
`nanstd`/`nanmin`/`nanmax` from `trl/trainer/utils.py`, and executes that code unchanged on a
minimal stand-in for the trainer (`self`) holding only the attributes the code reads. If TRL
moves this code, the extraction fails with a message naming what is missing.

grpo_ray takes TRL's `nanstd`, `selective_log_softmax`, `use_adapter`, MFU and reward functions as
they are; these tests are the check on the version pin (`trl>=1.15.0,<=1.16.0`) that the TRL
installed still computes GRPO's loss and advantages as `algo/grpo.py` does around them.
"""
from __future__ import annotations

import ast
import importlib.util
import math
from collections import defaultdict
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from grpo_ray.algo.grpo import group_advantages, grpo_loss, truncated_is_weights

TRL_DIR = Path(importlib.util.find_spec("trl").submodule_search_locations[0])
GRPO_FILE = TRL_DIR / "trainer" / "grpo_trainer.py"
UTILS_FILE = TRL_DIR / "trainer" / "utils.py"
NAN = float("nan")


@cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text())


def _function(path: Path, name: str, cls: str | None = None) -> ast.FunctionDef:
    scope = _tree(path).body
    if cls is not None:
        scope = next((n.body for n in scope if isinstance(n, ast.ClassDef) and n.name == cls), [])
    for node in scope:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise LookupError(f"{cls + '.' if cls else ''}{name} not found in {path}")


def _compile_function(path: Path, name: str, namespace: dict, cls: str | None = None):
    node = _function(path, name, cls)
    node.decorator_list = []  # profiling decorators need the real trainer
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), namespace)
    return namespace[name]


def _if_block(func: ast.FunctionDef, test_src: str, body_contains: str) -> list[ast.stmt]:
    for node in ast.walk(func):
        if isinstance(node, ast.If) and ast.unparse(node.test) == test_src:
            if body_contains in ast.unparse(ast.Module(body=node.body, type_ignores=[])):
                return node.body
    raise LookupError(f"`if {test_src}:` with `{body_contains}` not found in {func.name} of {GRPO_FILE}")


def _statement(func: ast.FunctionDef, src: str) -> ast.stmt:
    for node in ast.walk(func):
        if isinstance(node, ast.stmt) and ast.unparse(node) == src:
            return node
    raise LookupError(f"`{src}` not found in {func.name} of {GRPO_FILE}")


def _run_block(stmts: list[ast.stmt], namespace: dict) -> dict:
    exec(compile(ast.Module(body=stmts, type_ignores=[]), str(GRPO_FILE), "exec"), namespace)
    return namespace


@cache
def trl_utils() -> dict:
    ns = {"torch": torch}
    for name in ("nanstd", "nanmin", "nanmax"):
        _compile_function(UTILS_FILE, name, ns)
    return ns


def trl_compute_loss():
    ns = {"torch": torch, "math": math, **trl_utils()}
    return _compile_function(GRPO_FILE, "_compute_loss", ns, cls="GRPOTrainer")


def trl_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str) -> torch.Tensor:
    """TRL's `sum_then_normalize` block with one reward function of weight 1, then its NaN -> 0."""
    gen = _function(GRPO_FILE, "_generate_and_score_completions", "GRPOTrainer")
    block = _if_block(gen, "self.multi_objective_aggregation == 'sum_then_normalize'", "mean_grouped_rewards")
    block = block + [_statement(gen, "advantages = torch.nan_to_num(advantages, nan=0.0)")]
    rewards_per_func = rewards.unsqueeze(1)
    ns = {"torch": torch, **trl_utils(), "device": "cpu", "num_generations": num_generations,
          "rewards_per_func": rewards_per_func,
          "unscorable_mask": torch.isnan(rewards_per_func).all(dim=1),
          "self": SimpleNamespace(scale_rewards=scale_rewards,
                                  reward_weights=torch.ones(1, dtype=rewards.dtype))}
    return _run_block(block, ns)["advantages"]


def trl_is_ratio(old, sampling, completion_mask, cap):
    """TRL's vLLM importance-sampling ratio block, mode token_truncate."""
    gen = _function(GRPO_FILE, "_generate_and_score_completions", "GRPOTrainer")
    block = _if_block(gen, "self.use_vllm and self.vllm_importance_sampling_correction",
                      "vllm_importance_sampling_ratio = torch.exp")
    ns = {"torch": torch, "math": math, "tool_mask": None, "completion_mask": completion_mask,
          "old_per_token_logps": old, "sampling_per_token_logps": sampling,
          "self": SimpleNamespace(vllm_importance_sampling_mode="token_truncate",
                                  vllm_importance_sampling_clip_min=None,
                                  vllm_importance_sampling_clip_max=cap)}
    return _run_block(block, ns)["vllm_importance_sampling_ratio"]


def trainer_stand_in(logp, *, loss_type, beta, epsilon, epsilon_high, max_completion_length,
                     is_correction, accumulation_steps=1):
    """The attributes `GRPOTrainer._compute_loss` reads, for one process, no entropy/aux terms."""
    return SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=beta, loss_type=loss_type, epsilon_low=epsilon, epsilon_high=epsilon_high,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None),
        use_vllm=is_correction, vllm_importance_sampling_correction=is_correction,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=accumulation_steps,
        max_completion_length=max_completion_length, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        accelerator=SimpleNamespace(gather=lambda x: x, reduce=lambda x, reduction: x, num_processes=1),
        _metrics=defaultdict(lambda: defaultdict(list)),
    )


def random_batch(seed=0, P=3, n=4, T=6):
    g = torch.Generator().manual_seed(seed)
    B = P * n
    base = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = base + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)  # ratios clip on both sides
    ref = base + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    sampling = old + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    rewards = torch.randint(0, 5, (B,), generator=g).double() * 0.5
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    return dict(base=base, old=old, ref=ref, sampling=sampling, rewards=rewards, mask=mask, n=n)


def trl_inputs(b, advantages, rows=slice(None), is_ratio=None):
    mask = b["mask"][rows]
    inputs = {"prompt_ids": torch.zeros(mask.shape[0], 2, dtype=torch.long),
              "prompt_mask": torch.ones(mask.shape[0], 2, dtype=torch.long),
              "completion_ids": torch.zeros_like(mask), "completion_mask": mask,
              "advantages": advantages[rows], "old_per_token_logps": b["old"][rows],
              "ref_per_token_logps": b["ref"][rows]}
    if is_ratio is not None:
        inputs["importance_sampling_ratio"] = is_ratio[rows]
    return inputs


HP = dict(beta=0.04, epsilon=0.2, epsilon_high=0.28)
MAX_LEN = 9  # TRL's max_completion_length exceeds the padded width, as in a real batch


@pytest.mark.parametrize("is_correction", [False, True])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
def test_loss_and_gradient_match_trl(loss_type, is_correction):
    b = random_batch()
    adv = group_advantages(b["rewards"], b["n"])
    is_ratio = trl_is_ratio(b["old"], b["sampling"], b["mask"], cap=2.0) if is_correction else None

    logp_trl = b["base"].clone().requires_grad_()
    trainer = trainer_stand_in(logp_trl, loss_type=loss_type, max_completion_length=MAX_LEN,
                               is_correction=is_correction, **HP)
    loss_trl = trl_compute_loss()(trainer, None, trl_inputs(b, adv, is_ratio=is_ratio))
    loss_trl.backward()

    logp = b["base"].clone().requires_grad_()
    isw = truncated_is_weights(b["old"], b["sampling"], cap=2.0) if is_correction else None
    out = grpo_loss(logp, b["old"], b["ref"], adv, b["mask"], loss_type=loss_type, num_sequences=len(adv),
                    num_tokens=int(b["mask"].sum()), max_completion_length=MAX_LEN, is_weights=isw, **HP)
    out.loss.backward()

    assert abs(out.loss.item() - loss_trl.item()) < 1e-6
    torch.testing.assert_close(logp.grad, logp_trl.grad, atol=1e-6, rtol=0)
    assert logp.grad.abs().sum() > 0
    # the metrics TRL logs from the same tensors
    m = b["mask"].double()
    metrics = trainer._metrics["train"]
    assert metrics["kl"][0] == pytest.approx(((out.per_token_kl * m).sum() / m.sum()).item(), abs=1e-9)
    assert metrics["clip_ratio/region_mean"][0] == pytest.approx(((out.clipped * m).sum() / m.sum()).item(), abs=1e-9)
    low = out.clipped & (adv[:, None] < 0) & (m > 0)
    high = out.clipped & (adv[:, None] > 0) & (m > 0)
    assert low.any() and high.any()  # both clipping sides are exercised


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo"])
def test_equal_micro_batches_match_trl_gradient_accumulation(loss_type):
    """With equal micro-batches TRL's per-micro-batch normalization / accumulation steps is exact
    for these two types, and so is ours; "bnpo" differs there by design (see aggregate_loss)."""
    b = random_batch(seed=1)
    adv = group_advantages(b["rewards"], b["n"])
    B = len(adv)
    parts = [slice(0, B // 2), slice(B // 2, B)]
    logp_trl, logp = b["base"].clone().requires_grad_(), b["base"].clone().requires_grad_()
    compute_loss = trl_compute_loss()
    total_trl = total = 0.0
    for rows in parts:
        trainer = trainer_stand_in(logp_trl[rows], loss_type=loss_type, max_completion_length=MAX_LEN,
                                   is_correction=False, accumulation_steps=len(parts), **HP)
        part_trl = compute_loss(trainer, None, trl_inputs(b, adv, rows))
        part_trl.backward()
        part = grpo_loss(logp[rows], b["old"][rows], b["ref"][rows], adv[rows], b["mask"][rows],
                         loss_type=loss_type, num_sequences=B, num_tokens=int(b["mask"].sum()),
                         max_completion_length=MAX_LEN, **HP).loss
        part.backward()
        total_trl, total = total_trl + part_trl.item(), total + part.item()
    assert abs(total - total_trl) < 1e-6
    torch.testing.assert_close(logp.grad, logp_trl.grad, atol=1e-6, rtol=0)


EDGE_REWARDS = [0.1, 0.1, 0.1, 0.1,      # all equal
                1.0, NAN, 3.0, 2.0,      # an unscorable row
                NAN, 2.5, NAN, NAN,      # one valid row
                0.0, 2.0, 2.5, 0.5]


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_match_trl(scale):
    g = torch.Generator().manual_seed(3)
    random = torch.randint(0, 6, (32,), generator=g).double() * 0.5
    for rewards in (torch.tensor(EDGE_REWARDS, dtype=torch.float64), random):
        ours = group_advantages(rewards, 4, scale=scale)
        theirs = trl_advantages(rewards, 4, scale)
        assert not torch.isnan(theirs).any()
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    edge = group_advantages(torch.tensor(EDGE_REWARDS, dtype=torch.float64), 4, scale=scale)
    assert edge[:4].tolist() == [0.0] * 4 and edge[5] == 0 and edge[8:12].tolist() == [0.0] * 4


def test_advantages_match_deepseekmath_outcome_supervision():
    """DeepSeekMath (sec. 4.1.2): A_i = (r_i - mean(r)) / std(r) within the group."""
    g = torch.Generator().manual_seed(4)
    rewards = torch.rand(24, generator=g, dtype=torch.float64)
    groups = rewards.view(-1, 6)
    std = groups.std(1, keepdim=True)
    expected = (groups - groups.mean(1, keepdim=True)) / std
    # rtol: TRL's nanstd computes its Bessel factor in float32 (torch's default dtype)
    torch.testing.assert_close(group_advantages(rewards, 6, eps=0.0), expected.view(-1), atol=1e-12, rtol=1e-7)
    # the default eps = 1e-4 only shrinks them by std / (std + eps)
    shrunk = (expected * std / (std + 1e-4)).view(-1)
    torch.testing.assert_close(group_advantages(rewards, 6), shrunk, atol=1e-12, rtol=1e-7)


def test_is_weights_match_trl_token_truncate():
    b = random_batch(seed=5)
    sampling = b["sampling"].clone()
    sampling[0, 0] = NAN  # logprob missing from the engine
    theirs = trl_is_ratio(b["old"], sampling, b["mask"], cap=2.0)
    ours = truncated_is_weights(b["old"], sampling, cap=2.0)
    # TRL zeroes the log-ratio outside the mask (weight 1); only masked positions reach the loss
    m = b["mask"].bool()
    torch.testing.assert_close(ours[m], theirs[m], atol=1e-12, rtol=0)
    assert ours[0, 0] == 1.0 and (ours <= 2.0).all() and (ours == 2.0).any()
