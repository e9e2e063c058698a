"""What one training step logs besides the learner's own figures: reward (total and per
function), accuracy, format rate, lengths, and a sample of completions; and the stage timer."""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from typing import Any, Iterator

from grpo_ray.contracts import PromptBatch, Rollout, Scores


class StageTimer:
    """Wall time of each named stage of one step, as `time/<name>_s`."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.times[f"time/{name}_s"] = time.perf_counter() - start


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _std(xs: list[float]) -> float:
    m = _mean(xs)
    return math.sqrt(_mean([(x - m) ** 2 for x in xs])) if xs else float("nan")


def step_metrics(batch: PromptBatch, rollout: Rollout, scores: Scores,
                 correctness: str | None = None) -> dict[str, float]:
    """Reward (total and per function), accuracy, format rate and completion length.

    `accuracy` is the share of completions the judging reward (`correctness`, its score column;
    `judge.make_judge`) scored above 0, over those it scored; with no judging reward
    (None), GSM8K's numeric rule judges the texts."""
    from grpo_ray.reward.functions import answers_match, extract_answer, strict_format_reward

    out: dict[str, float] = {}
    for name, values in [("total", scores.total), *scores.per_function.items()]:
        valid = [v for v in values if v is not None]
        key = "reward" if name == "total" else f"reward/{name}"
        out[f"{key}/mean"], out[f"{key}/std"] = _mean(valid), _std(valid)
        if name != "total":  # rows it raised, hung or returned NaN/inf on (0 on a good step)
            out[f"{key}/failed"] = float(scores.failed.get(name, 0))
    if correctness is not None:
        out["accuracy"] = _mean([float(v > 0) for v in scores.per_function[correctness]
                                 if v is not None])
    else:
        golds = [batch.answers[i] for i in rollout.prompt_index]
        out["accuracy"] = _mean([float(answers_match(extract_answer(t), g))
                                 for t, g in zip(rollout.completion_texts, golds)])
    # the format rate is the fixed strict format whatever rewards are configured
    out["format_rate"] = _mean([float(s > 0) for s in
                                strict_format_reward([], rollout.completion_texts)])
    out["completion_length"] = _mean([len(c) for c in rollout.completion_ids])
    out["truncated_rate"] = _mean([float(r == "length") for r in rollout.finish_reasons])
    out["unscored_rate"] = _mean([float(v is None) for v in scores.total])
    return out


def sample_rows(batch: PromptBatch, rollout: Rollout, scores: Scores, k: int) -> list[dict[str, Any]]:
    """The first `k` completions of the step, with their prompt, gold answer and each reward."""
    rows = []
    for row in range(min(k, len(rollout))):
        p = rollout.prompt_index[row]
        rows.append({"question": batch.questions[p], "gold": batch.answers[p],
                     "completion": rollout.completion_texts[row],
                     "rewards": {n: v[row] for n, v in scores.per_function.items()},
                     "total": scores.total[row]})
    return rows
