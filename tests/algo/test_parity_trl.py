"""Parity of grpo_ray.algo (`grpo.py` and the loss registry `losses.py`) with TRL's GRPOTrainer,
in float64, to 1e-6: every `loss_type`, both importance-sampling levels, every option around the
loss (the rollout importance weights in each mode, `delta`, the entropy and off-policy masks, the
importance-weighted KL) and the advantages (scales, reward weights, both multi-objective
aggregations), on random inputs with masks, unequal lengths, empty rows and NaN rewards; and
several micro-batch splits of one batch summing to the whole.

How TRL is called: its own code, not a transcription. Importing `trl.trainer.grpo_trainer` costs
~10 s (it imports vLLM), so the test reads the installed file
(`trl/trainer/grpo_trainer.py`), takes with `ast` the source of `GRPOTrainer._compute_loss`,
`get_high_entropy_mask`, `get_off_policy_mask` and `get_gamma_weights`, of two statement blocks
of `GRPOTrainer._generate_and_score_completions` (the advantages, by `multi_objective_aggregation`,
and the vLLM importance-sampling ratio) and of `nanstd`/`nanmin`/`nanmax` from
`trl/trainer/utils.py`, and executes that code unchanged on a minimal stand-in for the trainer
(`self`) holding only the attributes the code reads. If TRL moves this code, the extraction
fails with a message naming what is missing.

grpo_ray takes TRL's `nanstd`, `selective_log_softmax`, `use_adapter`, MFU and reward functions as
they are; these tests are the check on the version pin (`trl>=1.15.0,<=1.16.0`) that the TRL
installed still computes GRPO's losses and advantages as `algo/` does around them.
"""
from __future__ import annotations

import ast
import importlib.util
import math
from collections import defaultdict
from functools import cache, partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from grpo_ray.algo.advantages import MULTI_OBJECTIVE_AGGREGATIONS, group_advantages
from grpo_ray.algo.grpo import entropy_threshold, grpo_loss, high_entropy_mask, importance_weights
from grpo_ray.algo.losses import LOSS_TYPES, Stat, policy_loss, token_mean

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
    # profiling decorators need the real trainer, staticmethod a class; no_grad is the formula's
    node.decorator_list = [d for d in node.decorator_list if ast.unparse(d) == "torch.no_grad()"]
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), namespace)
    return namespace[name]


def _if_block(func: ast.FunctionDef, test_src: str, body_contains: str,
              with_else: bool = False) -> list[ast.stmt]:
    for node in ast.walk(func):
        if isinstance(node, ast.If) and ast.unparse(node.test) == test_src:
            if body_contains in ast.unparse(ast.Module(body=node.body, type_ignores=[])):
                return [node] if with_else else node.body
    raise LookupError(f"`if {test_src}:` with `{body_contains}` not found in {func.name} of "
                      f"{GRPO_FILE}")


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


@cache
def trl_trainer_functions() -> dict:
    ns = {"torch": torch, "math": math, **trl_utils()}
    for name in ("_compute_loss", "get_high_entropy_mask", "get_off_policy_mask",
                 "get_gamma_weights"):
        _compile_function(GRPO_FILE, name, ns, cls="GRPOTrainer")
    return ns


def trl_advantages(rewards_per_func: torch.Tensor, num_generations: int, scale_rewards: str,
                   weights: torch.Tensor | None = None,
                   aggregation: str = "sum_then_normalize") -> torch.Tensor:
    """TRL's advantage block (both `multi_objective_aggregation`s), then its NaN -> 0.
    rewards_per_func: (B,) for one function of weight 1, or (B, K)."""
    gen = _function(GRPO_FILE, "_generate_and_score_completions", "GRPOTrainer")
    block = _if_block(gen, "self.multi_objective_aggregation == 'sum_then_normalize'",
                      "mean_grouped_rewards", with_else=True)
    block = block + [_statement(gen, "advantages = torch.nan_to_num(advantages, nan=0.0)")]
    if rewards_per_func.dim() == 1:
        rewards_per_func = rewards_per_func.unsqueeze(1)
    k = rewards_per_func.shape[1]
    weights = torch.ones(k, dtype=rewards_per_func.dtype) if weights is None else weights
    ns = {"torch": torch, **trl_utils(), "device": "cpu", "num_generations": num_generations,
          "rewards_per_func": rewards_per_func,
          "unscorable_mask": torch.isnan(rewards_per_func).all(dim=1),
          "self": SimpleNamespace(scale_rewards=scale_rewards, reward_weights=weights,
                                  multi_objective_aggregation=aggregation,
                                  reward_funcs=[None] * k)}
    return _run_block(block, ns)["advantages"]


def trl_is_ratio(old, sampling, completion_mask, cap, mode="token_truncate", minimum=None):
    """TRL's vLLM importance-sampling ratio block, in `mode`."""
    gen = _function(GRPO_FILE, "_generate_and_score_completions", "GRPOTrainer")
    block = _if_block(gen, "self.use_vllm and self.vllm_importance_sampling_correction",
                      "vllm_importance_sampling_ratio = torch.exp")
    ns = {"torch": torch, "math": math, "tool_mask": None, "completion_mask": completion_mask,
          "old_per_token_logps": old, "sampling_per_token_logps": sampling,
          "self": SimpleNamespace(vllm_importance_sampling_mode=mode,
                                  vllm_importance_sampling_clip_min=minimum,
                                  vllm_importance_sampling_clip_max=cap)}
    return _run_block(block, ns)["vllm_importance_sampling_ratio"]


def trainer_stand_in(logp, entropies, o: dict, *, is_correction, max_completion_length,
                     accumulation_steps=1):
    """The attributes `GRPOTrainer._compute_loss` reads, for one process, no entropy bonus and no
    auxiliary loss; `o` holds the loss's settings under `algorithm.*` names."""
    fns = trl_trainer_functions()
    eps = o["epsilon"]
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, entropies, None),
        top_entropy_quantile=o["top_entropy_quantile"],
        off_policy_mask_threshold=o["off_policy_mask_threshold"],
        importance_sampling_level=o["importance_sampling_level"], beta=o["beta"],
        loss_type=o["loss_type"], epsilon_low=eps,
        epsilon_high=eps if o["epsilon_high"] is None else o["epsilon_high"],
        args=SimpleNamespace(
            use_bias_correction_kl=o["use_bias_correction_kl"], delta=o["delta"],
            sapo_temperature_pos=o["sapo_temperature_pos"],
            sapo_temperature_neg=o["sapo_temperature_neg"], vespo_k_pos=o["vespo_k_pos"],
            vespo_lambda_pos=o["vespo_lambda_pos"], vespo_k_neg=o["vespo_k_neg"],
            vespo_lambda_neg=o["vespo_lambda_neg"], steps_per_generation=accumulation_steps),
        use_vllm=is_correction, vllm_importance_sampling_correction=is_correction,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=accumulation_steps,
        max_completion_length=max_completion_length, _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        accelerator=SimpleNamespace(gather=lambda x: x, reduce=lambda x, reduction: x,
                                    num_processes=1,
                                    pad_across_processes=lambda x, dim, pad_index: x),
        get_off_policy_mask=fns["get_off_policy_mask"],
        get_gamma_weights=fns["get_gamma_weights"],
        _metrics=defaultdict(lambda: defaultdict(list)),
    )
    trainer.get_high_entropy_mask = partial(fns["get_high_entropy_mask"], trainer)
    return trainer


def random_batch(seed=0, P=3, n=4, T=6):
    """P groups of n: log-probs whose ratios clip on both sides, rewards with NaN (an unscorable
    row), completions of 0 to T tokens, entropies, rollout log-probs with a NaN."""
    g = torch.Generator().manual_seed(seed)
    B = P * n
    f64 = dict(generator=g, dtype=torch.float64)
    base = -torch.rand(B, T, **f64) * 3
    old = base + 0.4 * torch.randn(B, T, **f64)
    ref = base + 0.3 * torch.randn(B, T, **f64)
    sampling = old + 0.5 * torch.randn(B, T, **f64)
    sampling[1, 0] = NAN  # a log-prob the engine could not give
    rewards = torch.randint(0, 5, (B,), generator=g).double() * 0.5
    rewards[2] = NAN
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0], lengths[3] = T, 0  # the longest row and an empty one
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    entropies = 4 * torch.rand(B, T, **f64)
    return dict(base=base, old=old, ref=ref, sampling=sampling, rewards=rewards, mask=mask, n=n,
                entropies=entropies, advantages=group_advantages(rewards, n))


def trl_inputs(b, rows=slice(None), is_ratio=None):
    mask = b["mask"][rows]
    inputs = {"prompt_ids": torch.zeros(mask.shape[0], 2, dtype=torch.long),
              "prompt_mask": torch.ones(mask.shape[0], 2, dtype=torch.long),
              "completion_ids": torch.zeros_like(mask), "completion_mask": mask,
              "advantages": b["advantages"][rows], "old_per_token_logps": b["old"][rows],
              "ref_per_token_logps": b["ref"][rows],
              "sampling_per_token_logps": b["sampling"][rows],
              "num_items_in_batch": b["mask"].sum()}  # the whole generation batch's tokens
    if is_ratio is not None:
        inputs["importance_sampling_ratio"] = is_ratio[rows]
    return inputs


MAX_LEN = 9  # TRL's max_completion_length exceeds the padded width, as in a real batch
DEFAULTS = dict(beta=0.04, epsilon=0.2, epsilon_high=0.28, delta=None,
                sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, vespo_k_pos=2.0,
                vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0,
                importance_sampling_level="token", use_bias_correction_kl=False,
                top_entropy_quantile=1.0, off_policy_mask_threshold=None,
                is_mode=None, is_cap=2.0, is_min=None)
HYPERPARAMETERS = ("epsilon", "epsilon_high", "delta", "sapo_temperature_pos",
                   "sapo_temperature_neg", "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg",
                   "vespo_lambda_neg")
OPTIONS = {
    "plain": {},
    "is token_truncate, kl weighted, delta": dict(is_mode="token_truncate",
                                                  use_bias_correction_kl=True, delta=1.3),
    "is token_mask, entropy and off-policy masks": dict(
        is_mode="token_mask", is_cap=1.5, is_min=0.5, top_entropy_quantile=0.4,
        off_policy_mask_threshold=0.05),
    "is sequence_truncate, beta 0, eps_max 1.5": dict(is_mode="sequence_truncate", is_cap=3.0,
                                                      beta=0.0, epsilon_high=1.5),
    "is sequence_mask, other temperatures and gammas": dict(
        is_mode="sequence_mask", is_cap=3.0, is_min=0.01, sapo_temperature_pos=0.7,
        sapo_temperature_neg=2.0, vespo_k_pos=1.5, vespo_lambda_pos=2.5, vespo_k_neg=2.0,
        vespo_lambda_neg=1.0),
}


def settings(loss_type: str, level: str, option: str) -> dict:
    return {**DEFAULTS, **OPTIONS[option], "loss_type": loss_type,
            "importance_sampling_level": level}


def ours(b, o, logp, rows=None):
    """grpo_loss on `rows` (index list; None: all) as the learner calls it: the whole batch's
    counts, the rows' padded width trimmed to their longest, the batch's entropy threshold."""
    rows = list(range(len(b["mask"]))) if rows is None else rows
    width = max(1, int(b["mask"][rows].sum(1).max()))
    cut = lambda t: t[rows][:, :width]  # noqa: E731
    mask = cut(b["mask"])
    is_weights = entropy_mask = None
    if o["is_mode"]:
        is_weights = importance_weights(cut(b["old"]), cut(b["sampling"]), mask, o["is_mode"],
                                        o["is_cap"], o["is_min"])
    if o["top_entropy_quantile"] < 1:
        threshold = entropy_threshold(b["entropies"], b["mask"], o["top_entropy_quantile"])
        entropy_mask = high_entropy_mask(cut(b["entropies"]), mask, threshold)
    return grpo_loss(
        logp[rows][:, :width], cut(b["old"]), cut(b["ref"]), b["advantages"][rows], mask,
        loss_type=o["loss_type"], beta=o["beta"], num_sequences=len(b["mask"]),
        num_tokens=int(b["mask"].sum()), max_completion_length=MAX_LEN, is_weights=is_weights,
        importance_sampling_level=o["importance_sampling_level"],
        use_bias_correction_kl=o["use_bias_correction_kl"], entropy_mask=entropy_mask,
        off_policy_threshold=o["off_policy_mask_threshold"], sampling_logp=cut(b["sampling"]),
        **{k: o[k] for k in HYPERPARAMETERS})


def theirs(b, o, logp, rows=slice(None), accumulation_steps=1):
    is_ratio = None
    if o["is_mode"]:
        is_ratio = trl_is_ratio(b["old"], b["sampling"], b["mask"], o["is_cap"], o["is_mode"],
                                o["is_min"])
    trainer = trainer_stand_in(logp[rows], b["entropies"][rows], o,
                               is_correction=o["is_mode"] is not None,
                               max_completion_length=MAX_LEN,
                               accumulation_steps=accumulation_steps)
    loss = trl_trainer_functions()["_compute_loss"](trainer, None, trl_inputs(b, rows, is_ratio))
    return loss, {k: v[0] for k, v in trainer._metrics["train"].items()}


def refused_by_trl(o) -> bool:
    """VESPO with a sequence-level rollout weight: TRL's __init__ (and our config) refuse it."""
    return o["loss_type"] == "vespo" and (o["is_mode"] or "").startswith("sequence")


CASES = [(loss, level, option) for loss in LOSS_TYPES for level in ("token", "sequence")
         for option in OPTIONS]


@pytest.mark.parametrize("loss_type, level, option", CASES)
def test_loss_gradient_and_metrics_match_trl(loss_type, level, option):
    o = settings(loss_type, level, option)
    if refused_by_trl(o):
        o["is_mode"] = "token_mask"
    b = random_batch()
    logp_trl = b["base"].clone().requires_grad_()
    loss_trl, metrics = theirs(b, o, logp_trl)
    loss_trl.backward()
    logp = b["base"].clone().requires_grad_()
    out = ours(b, o, logp)
    out.loss.backward()

    assert abs(out.loss.item() - loss_trl.item()) < 1e-6
    torch.testing.assert_close(logp.grad, logp_trl.grad, atol=1e-6, rtol=0)
    assert logp.grad.abs().sum() > 0
    # every figure TRL logs from the loss, under its name (the entropy: the learner's Stat)
    assert metrics.pop("entropy") == pytest.approx(
        Stat.mean(b["entropies"], b["mask"].double()).value(), abs=1e-9)
    figures = {k: s.value() for k, s in out.stats.items()}
    if o["beta"] == 0:
        assert figures.pop("kl") == 0.0
    clip_fraction = figures.pop("clip_fraction")
    assert figures.keys() == metrics.keys()
    for key, value in metrics.items():  # TRL counts the clipped tokens in float32
        assert figures[key] == pytest.approx(value, abs=1e-7, nan_ok=True), key
    assert clip_fraction == figures.get("clip_ratio/region_mean",
                                        figures.get("cispo_clip_ratio", 0.0))


def test_the_cases_exercise_what_they_claim():
    """Both clipping sides, the delta cap, masks that drop tokens, weights off 1, phi off 1."""
    b = random_batch()
    m = b["mask"].bool()
    out = ours(b, settings("grpo", "token", "plain"), b["base"])
    assert out.stats["clip_ratio/low_mean"].value() > 0
    assert out.stats["clip_ratio/high_mean"].value() > 0
    o = settings("dapo", "token", "is token_mask, entropy and off-policy masks")
    weights = importance_weights(b["old"], b["sampling"], b["mask"], "token_mask", 1.5, 0.5)
    assert (weights[m] == 0).any() and ((weights[m] > 0) & (weights[m] != 1)).any()
    threshold = entropy_threshold(b["entropies"], b["mask"], o["top_entropy_quantile"])
    kept = high_entropy_mask(b["entropies"], b["mask"], threshold)
    assert 0.3 < kept.sum() / m.sum() < 0.5
    from grpo_ray.algo.grpo import off_policy_mask

    dropped = off_policy_mask(b["advantages"][:, None], b["base"], b["sampling"],
                              b["mask"].double(), 0.05)
    assert (dropped == 0).any() and (dropped == 1).any()
    clamped = ours(b, {**o, "delta": 1.01, "loss_type": "grpo", "is_mode": None,
                       "top_entropy_quantile": 1.0, "off_policy_mask_threshold": None},
                   b["base"]).loss
    assert clamped != ours(b, {**o, "delta": None, "loss_type": "grpo", "is_mode": None,
                               "top_entropy_quantile": 1.0, "off_policy_mask_threshold": None},
                           b["base"]).loss
    phi = ours(b, settings("vespo", "token", "plain"), b["base"]).stats["vespo/phi_seq_mean"]
    assert 0 < phi.value() < 0.99


SPLITS = {"halves": [list(range(0, 6)), list(range(6, 12))],
          "unequal": [[0], list(range(1, 6)), list(range(6, 12))],
          # as the token budget plans them: rows by length, longest first
          "by length": None}


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("loss_type, level, option", CASES)
def test_micro_batches_sum_to_the_whole_batch(loss_type, level, option, split):
    """Every loss and option: the shares of several micro-batches (each padded to its own
    longest row) sum to the whole batch's loss, gradients and figures."""
    o = settings(loss_type, level, option)
    if refused_by_trl(o):
        o["is_mode"] = "token_mask"
    b = random_batch(seed=1)
    parts = SPLITS[split]
    if parts is None:
        order = sorted(range(12), key=lambda i: -int(b["mask"][i].sum()))
        parts = [order[:2], order[2:5], order[5:]]
    logp_whole = b["base"].clone().requires_grad_()
    whole = ours(b, o, logp_whole)
    whole.loss.backward()
    logp = b["base"].clone().requires_grad_()
    total, stats = 0.0, {}
    for rows in parts:
        out = ours(b, o, logp, rows)
        out.loss.backward()
        total += out.loss.item()
        for k, s in out.stats.items():
            stats[k] = stats[k].merge(s) if k in stats else s
    assert abs(total - whole.loss.item()) < 1e-9
    torch.testing.assert_close(logp.grad, logp_whole.grad, atol=1e-9, rtol=0)
    assert stats.keys() == whole.stats.keys()
    for k, s in whole.stats.items():
        assert stats[k].value() == pytest.approx(s.value(), abs=1e-9, nan_ok=True), k


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_trl_gradient_accumulation_matches_where_trl_is_exact(loss_type):
    """TRL's own accumulation over equal micro-batches gives the whole batch's loss too, for
    every loss but "bnpo" (each micro-batch by its own tokens, by design); the token means
    ("dapo", "cispo", "vespo") are exact for unequal ones as well. Ours, split the same, agree."""
    o = settings(loss_type, "token", "is token_truncate, kl weighted, delta")
    b = random_batch(seed=2)
    splits = [[slice(0, 6), slice(6, 12)]]
    if policy_loss(loss_type).aggregate is token_mean and loss_type != "bnpo":
        splits.append([slice(0, 1), slice(1, 12)])
    for parts in splits:
        logp_trl = b["base"].clone().requires_grad_()
        total_trl = 0.0
        for rows in parts:
            loss, _ = theirs(b, o, logp_trl, rows, accumulation_steps=len(parts))
            loss.backward()
            total_trl += loss.item()
        logp = b["base"].clone().requires_grad_()
        whole = ours(b, o, logp)
        whole.loss.backward()
        if loss_type == "bnpo":
            assert abs(whole.loss.item() - total_trl) > 1e-3  # TRL's bnpo is per micro-batch
            continue
        assert abs(whole.loss.item() - total_trl) < 1e-6
        torch.testing.assert_close(logp.grad, logp_trl.grad, atol=1e-6, rtol=0)


def test_truncated_completions_masked_as_trl_masks_them():
    """`mask_truncated_completions`: TRL zeroes a truncated row's completion mask, so it leaves
    the token count (`num_items_in_batch`) but stays in the batch size; the learner leaves the
    row out of its micro-batches and counts it in `num_sequences`, which is the same loss."""
    b = random_batch(seed=3)
    truncated = [0, 5, 7]
    b["mask"][truncated] = 0
    for loss_type in ("dapo", "grpo", "dr_grpo"):
        o = settings(loss_type, "token", "plain")
        logp_trl = b["base"].clone().requires_grad_()
        loss_trl, _ = theirs(b, o, logp_trl)
        loss_trl.backward()
        logp = b["base"].clone().requires_grad_()
        active = [i for i in range(12) if i not in truncated]
        out = ours(b, o, logp, active)  # counts of the whole batch: 12 rows, active tokens
        out.loss.backward()
        assert abs(out.loss.item() - loss_trl.item()) < 1e-6
        torch.testing.assert_close(logp.grad, logp_trl.grad, atol=1e-6, rtol=0)
        assert logp.grad[truncated].abs().sum() == 0


EDGE_REWARDS = [0.1, 0.1, 0.1, 0.1,      # all equal
                1.0, NAN, 3.0, 2.0,      # an unscorable row
                NAN, 2.5, NAN, NAN,      # one valid row
                0.0, 2.0, 2.5, 0.5]


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_match_trl(scale):
    g = torch.Generator().manual_seed(3)
    random = torch.randint(0, 6, (32,), generator=g).double() * 0.5
    for rewards in (torch.tensor(EDGE_REWARDS, dtype=torch.float64), random):
        ours_ = group_advantages(rewards, 4, scale=scale)
        theirs_ = trl_advantages(rewards, 4, scale)
        assert not torch.isnan(theirs_).any()
        torch.testing.assert_close(ours_, theirs_, atol=1e-6, rtol=0)
    edge = group_advantages(torch.tensor(EDGE_REWARDS, dtype=torch.float64), 4, scale=scale)
    assert edge[:4].tolist() == [0.0] * 4 and edge[5] == 0 and edge[8:12].tolist() == [0.0] * 4


@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_reward_weights_and_multi_objective_aggregation_match_trl(aggregation, scale):
    """Three reward functions with weights (TRL's `reward_weights`: ours are
    `reward.functions[i].weight`), functions that skip rows (NaN), a row none scored."""
    g = torch.Generator().manual_seed(4)
    per_func = torch.randint(0, 5, (24, 3), generator=g).double() * 0.5
    per_func[torch.rand(24, 3, generator=g) < 0.2] = NAN
    per_func[5] = NAN  # unscorable
    per_func[8:12, 1] = 1.0  # one function constant within a group
    weights = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    ours_ = MULTI_OBJECTIVE_AGGREGATIONS[aggregation](per_func, weights, 4, scale)
    theirs_ = trl_advantages(per_func, 4, scale, weights, aggregation)
    torch.testing.assert_close(ours_, theirs_, atol=1e-6, rtol=0)
    assert ours_[5] == 0 and ours_.abs().sum() > 1


def test_advantages_match_deepseekmath_outcome_supervision():
    """DeepSeekMath (sec. 4.1.2): A_i = (r_i - mean(r)) / std(r) within the group."""
    g = torch.Generator().manual_seed(4)
    rewards = torch.rand(24, generator=g, dtype=torch.float64)
    groups = rewards.view(-1, 6)
    std = groups.std(1, keepdim=True)
    expected = (groups - groups.mean(1, keepdim=True)) / std
    # rtol: TRL's nanstd computes its Bessel factor in float32 (torch's default dtype)
    torch.testing.assert_close(group_advantages(rewards, 6, eps=0.0), expected.view(-1),
                               atol=1e-12, rtol=1e-7)
    # the default eps = 1e-4 only shrinks them by std / (std + eps)
    shrunk = (expected * std / (std + 1e-4)).view(-1)
    torch.testing.assert_close(group_advantages(rewards, 6), shrunk, atol=1e-12, rtol=1e-7)


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate",
                                  "sequence_mask"])
@pytest.mark.parametrize("bounds", [(1.3, None), (3.0, 0.5), (None, 0.8)], ids=str)
def test_importance_weights_match_trl(mode, bounds):
    cap, minimum = bounds
    b = random_batch(seed=5)
    theirs_ = trl_is_ratio(b["old"], b["sampling"], b["mask"], cap, mode, minimum)
    ours_ = importance_weights(b["old"], b["sampling"], b["mask"], mode, cap, minimum)
    assert ours_.shape == theirs_.shape == ((12, 1) if mode.startswith("sequence") else (12, 6))
    torch.testing.assert_close(ours_, theirs_, atol=1e-12, rtol=0)
    assert not ours_.requires_grad and not torch.isnan(ours_).any()
    if mode == "token_truncate" and minimum is None:
        assert ours_[1, 0] == 1.0 and (ours_ == 1.3).any()  # a NaN log-prob; the cap
