"""Runs in the driver: the rule of a right answer and the metrics of an evaluation, pure (no Ray,
no model): `evaluation` hands them the engines' completions.

- **The judge** (`make_judge`) is the reward marked as correctness (`Config.correctness_index`:
  `correctness: true`, else the built-in `math` or `correctness`; with none, GSM8K's numeric
  rule): a completion is right when that reward's score is > 0. So a `math` run is judged by
  math-verify, a GSM8K run by numeric equality, and the table says which.
- **Over k samples per prompt**: mean@k (the accuracy: the mean over the k of each prompt, then
  over prompts), pass@k (any of the k right; `pass_at_k` is the unbiased estimator of Chen et
  al. 2021, which at k = n is just that) and maj@k (the most common answer right). The vote
  compares answers with the judge's equivalence: two answers are one when the judging reward,
  given one as the gold, scores the other right (numeric equality for `correctness`,
  math-verify for `math`); a user's reward's answers (the `<answer>` block, else the last
  `\\boxed{}`) are compared as text.
- **Whatever the judge** (`score_completions`): the reference's exact string match, format
  adherence (strict and soft) and reasoning length.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from grpo_ray.config import Config, UserError
from grpo_ray.contracts import PromptBatch

_REASONING = re.compile(r"<reasoning>(.*?)</reasoning>", re.DOTALL)


# ---- the judge -------------------------------------------------------------------------------

@dataclass
class Judge:
    """The run's rule of a right answer (`make_judge`)."""

    label: str
    """Which rule judges, for the table: `math-verify (reward 'math')`."""
    column: str | None
    """The judging reward's score column in a step's `Scores` (None: no reward judges)."""
    reward: Callable[..., list]
    """The judging reward function (TRL's signature); a completion is right when it scores > 0."""
    answer: Callable[[str], str | None]
    """The answer a completion gives, for the majority vote (None: it gives none)."""
    compare_by_reward: bool
    """Answers are one when `reward`, given one as the gold, scores the other right; else when
    their texts are equal."""

    def right(self, batch: PromptBatch, prompt_index: list[int], texts: list[str],
              completion_ids: list[list[int]] | None = None) -> list[bool | None]:
        """Each completion right or not; None where the reward cannot score it (no gold). The
        reward gets the columns the reward pool gives it in training."""
        rows = prompt_index
        columns = {name: [values[i] for i in rows] for name, values in batch.columns.items()}
        columns.update(answer=[batch.answers[i] for i in rows],
                       question=[batch.questions[i] for i in rows])
        if completion_ids is not None:
            columns["completion_ids"] = completion_ids
        scores = self._score([batch.prompts[i] for i in rows], texts, columns)
        return [None if s is None else s > 0 for s in scores]

    def same(self, pairs: list[tuple[str, str]]) -> list[bool]:
        """Whether the two answers of each pair are one answer."""
        if not self.compare_by_reward:
            return [a == b for a, b in pairs]
        tagged = [f"<answer>\n{b}\n</answer>" for _, b in pairs]
        scores = self._score([[] for _ in pairs], tagged, {"answer": [a for a, _ in pairs]})
        return [s is not None and s > 0 for s in scores]

    def _score(self, prompts: list, texts: list[str], columns: dict[str, list]) -> list:
        if not texts:
            return []
        wrapped = [[{"role": "assistant", "content": t}] for t in texts]
        try:
            scores = list(self.reward(prompts=prompts, completions=wrapped, **columns))
        except Exception as e:  # noqa: BLE001 - the user's function
            raise UserError(f"evaluation: the judging reward ({self.label}) raised "
                            f"{type(e).__name__}: {e}") from None
        if len(scores) != len(texts):
            raise UserError(f"evaluation: the judging reward ({self.label}) returned "
                            f"{len(scores)} scores for {len(texts)} completions")
        return [None if s is None or not math.isfinite(float(s)) else float(s) for s in scores]


def make_judge(cfg: Config) -> Judge:
    """The judge of `cfg`'s run. Resolves every configured reward function (a bad name is the
    config's one-line error here, before anything starts)."""
    from grpo_ray.answer_format import extract_xml_answer
    from grpo_ray.reward.functions import extract_answer
    from grpo_ray.reward.math import math_answer
    from grpo_ray.reward.registry import get_reward_functions

    functions = get_reward_functions(cfg.reward.functions, cfg.reward.mode)
    index = cfg.correctness_index
    if index is None:
        return numeric_judge()
    column, fn, _ = functions[index]
    name = cfg.reward.functions[index].name
    if name == "math":
        return Judge(f"math-verify (reward {column!r})", column, fn, math_answer, True)
    if name == "correctness" and cfg.reward.mode == "seed-parity":
        return Judge(f"exact string, the notebook's rule (reward {column!r})", column, fn,
                     extract_xml_answer, True)
    if name == "correctness":
        return Judge(f"numeric equality, GSM8K's rule (reward {column!r})", column, fn,
                     extract_answer, True)
    return Judge(f"reward {column!r} > 0 (maj@k votes on answer text)", column, fn,
                 math_answer, False)


def numeric_judge() -> Judge:
    from grpo_ray.reward.functions import correctness_reward, extract_answer

    return Judge("GSM8K's numeric rule (no reward judges correctness)", None,
                 correctness_reward, extract_answer, compare_by_reward=True)


# ---- pass@k, mean@k, maj@k -------------------------------------------------------------------

def pass_at_k(n: int, c: int, k: int) -> float:
    """The chance that at least one of k samples drawn without replacement from n, c of them
    right, is right: 1 - C(n - c, k) / C(n, k) (Chen et al. 2021's unbiased estimator)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_index(answers: list[str | None], same: Callable[[str, str], bool]) -> int | None:
    """The completion that stands for the most common answer: answers fall into classes by
    `same` (each compared with the first member of the classes before it), the largest class
    wins, a tie goes to the class seen first, and its first member is returned. None when no
    completion gives an answer."""
    firsts: list[int] = []
    counts: list[int] = []
    for i, a in enumerate(answers):
        if a is None:
            continue
        for c, first in enumerate(firsts):
            if a == answers[first] or same(answers[first], a):
                counts[c] += 1
                break
        else:
            firsts.append(i)
            counts.append(1)
    if not firsts:
        return None
    return firsts[max(range(len(firsts)), key=lambda c: (counts[c], -c))]


def sample_metrics(right: list[list[bool | None]], majority: list[int | None]) -> dict[str, float]:
    """Over prompts, each with its k completions judged (`right[p]`, None: not judged, counted
    as not right) and the index of its majority answer among them (`majority[p]`):
    `mean@k` (also `accuracy`), `pass@k`, `maj@k`, `unjudged_rate` and `samples_per_prompt`."""
    if not right or len(right) != len(majority):
        raise ValueError(f"{len(right)} prompts judged but {len(majority)} majority answers")
    k = len(right[0])
    if any(len(r) != k for r in right):
        raise ValueError(f"prompts have different numbers of samples "
                         f"({sorted({len(r) for r in right})})")
    counts = [sum(bool(x) for x in r) for r in right]
    mean_at_k = sum(c / k for c in counts) / len(right)
    return {"accuracy": mean_at_k, "mean@k": mean_at_k,
            "pass@k": sum(pass_at_k(k, c, k) for c in counts) / len(right),
            "maj@k": sum(m is not None and bool(r[m]) for r, m in zip(right, majority))
            / len(right),
            "unjudged_rate": sum(x is None for r in right for x in r) / (k * len(right)),
            "samples_per_prompt": float(k)}


def judge_completions(judge: Judge, batch: PromptBatch, prompt_index: list[int],
                      texts: list[str],
                      completion_ids: list[list[int]] | None = None) -> dict[str, float]:
    """`sample_metrics` of prompt-major completions (`prompt_index[i]`: the prompt of text i):
    each judged by `judge`, the majority vote with its equivalence (one batched call for every
    pair of distinct answers of a prompt)."""
    right = judge.right(batch, prompt_index, texts, completion_ids)
    groups: dict[int, list[int]] = {}
    for row, p in enumerate(prompt_index):
        groups.setdefault(p, []).append(row)
    answers = {p: [judge.answer(texts[r]) for r in rows] for p, rows in groups.items()}
    pairs = list(dict.fromkeys(pair for given in answers.values()
                               for pair in _earlier_later(given)))
    same = dict(zip(pairs, judge.same(pairs)))
    majority = [majority_index(answers[p], lambda a, b: same[(a, b)]) for p in groups]
    return sample_metrics([[right[r] for r in rows] for rows in groups.values()], majority)


def _earlier_later(answers: list[str | None]) -> list[tuple[str, str]]:
    """Each pair of distinct answers, the one given first on the left (what `majority_index`
    compares)."""
    distinct = list(dict.fromkeys(a for a in answers if a is not None))
    return [(a, b) for i, a in enumerate(distinct) for b in distinct[i + 1:]]


def reasoning_words(text: str) -> int:
    """Words (whitespace-separated) inside the first `<reasoning>...</reasoning>`; 0 when there
    is no closed reasoning block, so a model that skips or never ends its reasoning counts as
    reasoning for zero words."""
    match = _REASONING.search(text)
    return len(match.group(1).split()) if match else 0


def score_completions(texts: list[str], golds: list[str],
                      completion_lengths: list[int] | None = None) -> dict[str, float]:
    """Rates over the completions (each in [0, 1]) and reasoning-length statistics, whatever the
    judge (`judge_completions` gives the accuracy):

    - `accuracy_exact`: the reference's rule, the text between the last `<answer>` and the next
      `</answer>` equals the gold string (a completion without tags is its own answer);
    - `strict_format` / `soft_format`: the fixed-mode format rewards are positive;
    - `reasoning_words_{mean,p10,p50,p90}`: see `reasoning_words`;
    - `completion_tokens_mean`, when `completion_lengths` (tokens per completion) is given.
    """
    from grpo_ray.answer_format import extract_xml_answer
    from grpo_ray.reward.functions import soft_format_reward, strict_format_reward

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
        "strict_format": rate([s > 0 for s in strict_format_reward([], texts)]),
        "soft_format": rate([s > 0 for s in soft_format_reward([], texts)]),
        "reasoning_words_mean": sum(words) / len(words),
        # linear interpolation between order statistics: for [1, 2, 3, 4], p10 = 1.3, p50 = 2.5
        **{f"reasoning_words_p{q}": float(np.percentile(words, q)) for q in (10, 50, 90)},
    }
    if completion_lengths is not None:
        out["completion_tokens_mean"] = sum(completion_lengths) / len(completion_lengths)
    return out
