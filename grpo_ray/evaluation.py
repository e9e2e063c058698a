"""Held-out evaluation through the rollout engines: answers to the first prompts of a split (greedy,
or several samples each), scored for accuracy (the reference's exact string match and our numeric
match), format adherence (strict and soft) and reasoning length.

`score_completions` is pure (no Ray, no model); `evaluate` only moves prompts to the engines and
texts back. The engines generate with whatever adapter they hold, so the same call measures the
base model (adapter version 0) before training and the trained adapter after it. The trainer,
`grpo-ray eval` and the learning benchmark all evaluate through `evaluate`.
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np

from grpo_ray.cluster.engines import EngineGroup
from grpo_ray.config import Config
from grpo_ray.contracts import PromptBatch, Sampling

STOP = ["</answer>"]
"""Greedy answers stop right after the answer closes, as the XML schema ends there."""

_REASONING = re.compile(r"<reasoning>(.*?)</reasoning>", re.DOTALL)

# (metric key, label) of the side-by-side table, in display order
TABLE = [
    ("accuracy_exact", "accuracy (exact string)"),
    ("accuracy_numeric", "accuracy (numeric)"),
    ("strict_format", "strict format"),
    ("soft_format", "soft format"),
    ("reasoning_words_mean", "reasoning words, mean"),
    ("reasoning_words_p10", "reasoning words, p10"),
    ("reasoning_words_p50", "reasoning words, p50"),
    ("reasoning_words_p90", "reasoning words, p90"),
    ("completion_tokens_mean", "completion tokens, mean"),
    ("truncated_rate", "truncated"),
]


def reasoning_words(text: str) -> int:
    """Words (whitespace-separated) inside the first `<reasoning>...</reasoning>`; 0 when there
    is no closed reasoning block, so a model that skips or never ends its reasoning counts as
    reasoning for zero words."""
    match = _REASONING.search(text)
    return len(match.group(1).split()) if match else 0


def score_completions(texts: list[str], golds: list[str],
                      completion_lengths: list[int] | None = None) -> dict[str, float]:
    """Rates over the completions (each in [0, 1]) and reasoning-length statistics.

    - `accuracy_exact`: the reference's rule, the text between the last `<answer>` and the next
      `</answer>` equals the gold string (a completion without tags is its own answer);
    - `accuracy_numeric`: both tags present and the answer equals the gold as a number
      ("18.0", "$18", "1,000" match "18", "18", "1000");
    - `strict_format` / `soft_format`: the fixed-mode format rewards are positive;
    - `reasoning_words_{mean,p10,p50,p90}`: see `reasoning_words`;
    - `completion_tokens_mean`, when `completion_lengths` (tokens per completion) is given.
    """
    from grpo_ray.data.prompts import extract_xml_answer
    from grpo_ray.reward.functions import (answers_match, extract_answer, soft_format_reward,
                                           strict_format_reward)

    if len(texts) != len(golds):
        raise ValueError(f"{len(texts)} completions but {len(golds)} gold answers")
    if completion_lengths is not None and len(completion_lengths) != len(texts):
        raise ValueError(f"{len(completion_lengths)} completion lengths for {len(texts)} "
                         "completions")
    if not texts:
        raise ValueError("no completions to score")

    def rate(flags: list[bool]) -> float:
        return sum(flags) / len(flags)

    words = [float(reasoning_words(t)) for t in texts]
    out = {
        "accuracy_exact": rate([extract_xml_answer(t) == g.strip() for t, g in zip(texts, golds)]),
        "accuracy_numeric": rate([answers_match(extract_answer(t), g)
                                  for t, g in zip(texts, golds)]),
        "strict_format": rate([s > 0 for s in strict_format_reward([], texts)]),
        "soft_format": rate([s > 0 for s in soft_format_reward([], texts)]),
        "reasoning_words_mean": sum(words) / len(words),
        # linear interpolation between order statistics: for [1, 2, 3, 4], p10 = 1.3, p50 = 2.5
        **{f"reasoning_words_p{q}": float(np.percentile(words, q)) for q in (10, 50, 90)},
    }
    if completion_lengths is not None:
        out["completion_tokens_mean"] = sum(completion_lengths) / len(completion_lengths)
    return out


def eval_sampling(cfg: Config) -> Sampling:
    """How held-out prompts are answered (`eval.temperature`, `eval.samples`): greedy, stopped
    right after `</answer>`; or sampled as the policy samples in training (not stopped), with a
    fixed seed, so the same adapter gets the same draws at every evaluation."""
    e = cfg.eval
    if e.temperature == 0:
        return Sampling.greedy(cfg.eval_max_tokens, stop=STOP)
    return Sampling(n=e.samples, max_tokens=cfg.eval_max_tokens, temperature=e.temperature,
                    seed=cfg.algorithm.seed)


def sanity_sampling(cfg: Config) -> Sampling:
    """The sanity question is always answered greedily, as the reference notebook does."""
    return Sampling.greedy(cfg.eval_max_tokens, stop=STOP)


def evaluate(engines: EngineGroup, batch: PromptBatch,
             sampling: Sampling) -> tuple[dict[str, float], list[str]]:
    """Completions of every prompt of `batch` from the engines (`eval_sampling`), scored
    against `batch.answers`. Returns `score_completions`' metrics plus `truncated_rate`,
    `num_samples` (prompts), `num_completions` and `adapter_version`, and the completion texts,
    prompt-major."""
    rollout = engines.generate(batch, sampling)
    golds = [batch.answers[i] for i in rollout.prompt_index]
    metrics = score_completions(rollout.completion_texts, golds,
                                [len(c) for c in rollout.completion_ids])
    metrics["truncated_rate"] = (sum(r == "length" for r in rollout.finish_reasons)
                                 / len(rollout.finish_reasons))
    metrics["num_samples"] = float(len(batch))
    metrics["num_completions"] = float(len(rollout))
    metrics["adapter_version"] = float(rollout.adapter_version)
    return metrics, rollout.completion_texts


def prompt_batch(rows: list[dict[str, str]], tokenizer: Any, max_prompt_length: int,
                 system_prompt: str | None = None) -> PromptBatch:
    """Rows `{"question", "gold"}` as one PromptBatch, in their order, tokenized as training
    prompts are (chat template, system prompt, length check)."""
    from grpo_ray.data.dataset import PromptIterator

    prompts = PromptIterator(rows, tokenizer, len(rows), max_prompt_length, system_prompt)
    return PromptBatch([list(ids) for ids in prompts.prompt_ids], prompts.messages,
                       [r["gold"] for r in rows], [r["question"] for r in rows])


def held_out_batch(cfg: Config, tokenizer: Any) -> PromptBatch:
    """The first `eval.num_samples` rows (all when 0) of the evaluation split (`eval.split`,
    default `data.eval_split`), in file order: the same prompts before and after training."""
    from grpo_ray.data.dataset import load_rows

    rows = load_rows(cfg.data, cfg.eval_split)
    if cfg.eval.num_samples:
        rows = rows[:cfg.eval.num_samples]
    return prompt_batch(rows, tokenizer, cfg.data.max_prompt_length, cfg.data.system_prompt)


def sanity_batch(cfg: Config, tokenizer: Any) -> PromptBatch:
    """The fixed sanity question (no gold answer) as a one-prompt batch."""
    rows = [{"question": cfg.eval.sanity_question, "gold": ""}]
    return prompt_batch(rows, tokenizer, cfg.data.max_prompt_length, cfg.data.system_prompt)


def eval_line(tag: str, step: int, metrics: dict[str, float], cfg: Config) -> str:
    """The one line training prints for an evaluation."""
    e = cfg.eval
    how = "greedy" if e.temperature == 0 else f"x {e.samples} at T={e.temperature:g}"
    return (f"eval {tag} (step {step}, adapter version {metrics['adapter_version']:.0f}, "
            f"{metrics['num_samples']:.0f} prompts {how}): accuracy "
            f"{metrics['accuracy_numeric']:.3f} (exact {metrics['accuracy_exact']:.3f}), format "
            f"strict {metrics['strict_format']:.3f} soft {metrics['soft_format']:.3f}, reasoning "
            f"{metrics['reasoning_words_mean']:.1f} words, {metrics['time_s']:.1f} s")


def format_metrics(metrics: dict[str, float]) -> str:
    """One aligned line per evaluation metric present."""
    rows = [(label, metrics[key]) for key, label in TABLE if key in metrics]
    width = max(len(label) for label, _ in rows) if rows else 0
    return "\n".join(f"{label:<{width}}  {value:>8.3f}" for label, value in rows)


def format_side_by_side(before: dict[str, float], after: dict[str, float],
                        labels: tuple[str, str] = ("before", "after")) -> str:
    """An aligned text table of the evaluation metrics: one row per metric present in either,
    columns before, after and their difference."""
    def cell(v: float | None) -> str:
        return "" if v is None else f"{v:.3f}"

    rows = [(label, before.get(key), after.get(key)) for key, label in TABLE
            if key in before or key in after]
    width = max(len(r[0]) for r in rows) if rows else 6
    lines = [f"{'metric':<{width}}  {labels[0]:>8}  {labels[1]:>8}  {'change':>8}"]
    for label, b, a in rows:
        change = f"{a - b:+.3f}" if a is not None and b is not None else ""
        lines.append(f"{label:<{width}}  {cell(b):>8}  {cell(a):>8}  {change:>8}")
    return "\n".join(lines)
