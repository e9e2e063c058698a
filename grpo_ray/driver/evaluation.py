"""Held-out evaluation through the rollout engines: answers to the first prompts of the held-out
rows (greedy, or `eval.samples` samples each), judged by the run's rule of a right answer, plus
format adherence (strict and soft), the reference's exact string match and reasoning length.

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

`score_completions`, `pass_at_k`, `majority_index` and `sample_metrics` are pure (no Ray, no
model); `evaluate` only moves prompts to the engines and texts back. The engines generate with
whatever adapter they hold, so the same call measures the base model (adapter version 0) before
training and the trained adapter after it. The trainer, `grpo-ray eval` and the learning
benchmark all evaluate through `evaluate`.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from grpo_ray.cluster.engines import EngineGroup
from grpo_ray.config import Config, UserError
from grpo_ray.contracts import PromptBatch, Sampling

STOP = ["</answer>"]
"""Greedy answers stop right after the answer closes, as the XML schema ends there."""

_REASONING = re.compile(r"<reasoning>(.*?)</reasoning>", re.DOTALL)

# (metric key, label) of the side-by-side table, in display order; {k}: samples per prompt
TABLE = [
    ("accuracy", "accuracy (mean@{k})"),
    ("pass@k", "pass@{k}"),
    ("maj@k", "maj@{k}"),
    ("unjudged_rate", "not judged (no score)"),
    ("accuracy_exact", "accuracy (exact string)"),
    ("strict_format", "strict format"),
    ("soft_format", "soft format"),
    ("reasoning_words_mean", "reasoning words, mean"),
    ("reasoning_words_p10", "reasoning words, p10"),
    ("reasoning_words_p50", "reasoning words, p50"),
    ("reasoning_words_p90", "reasoning words, p90"),
    ("completion_tokens_mean", "completion tokens, mean"),
    ("truncated_rate", "truncated"),
]
_SHOWN_WHEN_NONZERO = {"unjudged_rate"}


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
        return _numeric_judge()
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


def evaluate(engines: EngineGroup, batch: PromptBatch, sampling: Sampling,
             judge: Judge | None = None) -> tuple[dict[str, float], list[str]]:
    """Completions of every prompt of `batch` from the engines (`eval_sampling`), judged
    against `batch.answers` by `judge` (None: GSM8K's numeric rule). Returns
    `judge_completions`' and `score_completions`' metrics plus `truncated_rate`, `num_samples`
    (prompts), `num_completions` and `adapter_version`, and the completion texts, prompt-major."""
    judge = judge or _numeric_judge()
    rollout = engines.generate(batch, sampling)
    texts = rollout.completion_texts
    metrics = judge_completions(judge, batch, rollout.prompt_index, texts,
                                rollout.completion_ids)
    metrics.update(score_completions(texts, [batch.answers[i] for i in rollout.prompt_index],
                                     [len(c) for c in rollout.completion_ids]))
    metrics["truncated_rate"] = (sum(r == "length" for r in rollout.finish_reasons)
                                 / len(rollout.finish_reasons))
    metrics["num_samples"] = float(len(batch))
    metrics["num_completions"] = float(len(rollout))
    metrics["adapter_version"] = float(rollout.adapter_version)
    return metrics, texts


def _numeric_judge() -> Judge:
    from grpo_ray.reward.functions import correctness_reward, extract_answer

    return Judge("GSM8K's numeric rule (no reward judges correctness)", None,
                 correctness_reward, extract_answer, compare_by_reward=True)


@dataclass
class HeldOutBatch(PromptBatch):
    """The held-out prompts, and where their rows come from (`driver.data.dataset.load_eval_rows`)."""

    source: str = ""


def prompt_batch(rows: list[dict[str, Any]], tokenizer: Any, max_prompt_length: int,
                 system_prompt: str | None = None) -> PromptBatch:
    """Rows (`driver.data.dataset.load_rows`) as one PromptBatch, in their order, tokenized as training
    prompts are (chat template, system prompt, length check), with their other columns (the
    judging reward may read them)."""
    from grpo_ray.driver.data.prompts import PromptIterator

    prompts = PromptIterator(rows, tokenizer, len(rows), max_prompt_length, system_prompt)
    return PromptBatch([list(ids) for ids in prompts.prompt_ids], prompts.messages,
                       [r["gold"] for r in rows], [r["question"] for r in rows],
                       {name: [r.get("columns", {}).get(name) for r in rows]
                        for name in prompts.column_names})


def held_out_batch(cfg: Config, tokenizer: Any) -> HeldOutBatch:
    """The first `eval.num_samples` rows (all when 0) of the held-out rows
    (`driver.data.dataset.load_eval_rows`: `data.eval_path`, `data.eval_fraction`, a test split, or
    the training rows when `eval.split` names them), in file order: the same prompts before
    and after training."""
    from grpo_ray.driver.data.dataset import load_eval_rows

    rows, source = load_eval_rows(cfg.data, cfg.eval_split)
    if cfg.eval.num_samples:
        rows = rows[:cfg.eval.num_samples]
    batch = prompt_batch(rows, tokenizer, cfg.data.max_prompt_length, cfg.data.system_prompt)
    return HeldOutBatch(batch.prompt_ids, batch.prompts, batch.answers, batch.questions,
                        batch.columns, source=source)


@dataclass
class SanityCheck:
    """The question answered without and with the adapter (`sanity_check`)."""

    batch: PromptBatch
    """One prompt; its gold answer is "" for the reference question, which has none."""
    heading: str
    """What is asked and why, for the console."""


def sanity_check(cfg: Config, tokenizer: Any, held_out: PromptBatch) -> SanityCheck:
    """`eval.sanity_question` (the reference notebook's, by default), except where it means
    nothing: a built-in tiny model knows only the synthetic arithmetic problems, so with the
    default question it is asked the first held-out problem instead, whose gold answer says
    whether it got it right, and the heading says what the model can and cannot answer."""
    from grpo_ray.config import EvalConfig

    question = cfg.eval.sanity_question
    builtin = cfg.model.path.startswith("builtin:")
    if not builtin or question != EvalConfig.model_fields["sanity_question"].default:
        rows = [{"question": question, "gold": ""}]
        batch = prompt_batch(rows, tokenizer, cfg.data.max_prompt_length, cfg.data.system_prompt)
        return SanityCheck(batch, f"sanity check: {question!r}")
    import textwrap

    if cfg.model.path == "builtin:tiny-warm":
        can = (f"{cfg.model.path} knows only arithmetic word problems like its training rows "
               f"(operands up to {cfg.data.synthetic_max_value}): the reference notebook's "
               f"question, {question!r}, means nothing to it")
    else:
        can = (f"{cfg.model.path} has random weights: it answers no question, the reference "
               f"notebook's {question!r} included, and writes noise until it has trained for "
               "a while")
    batch = PromptBatch(held_out.prompt_ids[:1], held_out.prompts[:1], held_out.answers[:1],
                        held_out.questions[:1], {k: v[:1] for k, v in held_out.columns.items()})
    why = textwrap.fill(f"(the first held-out problem, gold answer {batch.answers[0]!r}; {can})",
                        80)
    return SanityCheck(batch, f"sanity check: {batch.questions[0]!r}\n{why}")


def show_answer(text: str, max_lines: int = 8) -> str:
    """A completion for the console: indented, without blank lines (a random model's text can
    hold dozens), at most `max_lines` lines."""
    lines = [f"    {line.rstrip()}" for line in text.splitlines() if line.strip()]
    if len(lines) > max_lines:
        lines = lines[:max_lines] + [f"    ... ({len(lines) - max_lines} more lines)"]
    return "\n".join(lines) or ("    (only whitespace)" if text else "    (no text)")


def eval_record(tag: str, step: int | None, model: str, adapter: str | None,
                held_out: HeldOutBatch, judge: Judge, metrics: dict[str, float],
                texts: list[str], sanity: SanityCheck, answer: str,
                right: bool | None) -> dict[str, Any]:
    """One line of an evaluation file, the same for training's `eval.jsonl` and `grpo-ray
    eval`'s: `step` and `tag` (training's; `grpo-ray eval` writes null and `eval`), `model`,
    `adapter` (the directory read; null for the base model or the run's own learner),
    `adapter_version` (0: the base model), `held_out` and `judge` (words), `metrics`
    (`evaluate`'s), `sanity` (question, gold, answer, right: null without a gold) and
    `samples` (every completion with its question and gold, prompt-major). The writer adds
    `time`."""
    per_prompt = max(1, len(texts) // len(held_out))
    return {"step": step, "tag": tag, "model": model, "adapter": adapter,
            "adapter_version": int(metrics["adapter_version"]), "held_out": held_out.source,
            "judge": judge.label, "metrics": metrics,
            "sanity": {"question": sanity.batch.questions[0], "gold": sanity.batch.answers[0],
                       "answer": answer, "right": right},
            "samples": [{"question": held_out.questions[k // per_prompt],
                         "gold": held_out.answers[k // per_prompt], "completion": t}
                        for k, t in enumerate(texts)]}


def answer_sanity(engines: EngineGroup, sanity: SanityCheck, cfg: Config,
                  judge: Judge) -> tuple[str, bool | None]:
    """The engines' greedy answer to the sanity question, and whether the judge counts it right
    (None for a question without a gold answer)."""
    gold = sanity.batch.answers[0]
    metrics, (answer,) = evaluate(engines, sanity.batch, sanity_sampling(cfg),
                                  judge if gold else None)
    return answer, (metrics["accuracy"] > 0 if gold else None)


def _how(cfg: Config) -> str:
    e = cfg.eval
    return "greedy" if e.temperature == 0 else f"x {e.samples} at T={e.temperature:g}"


def eval_start_line(what: str, prompts: int, cfg: Config) -> str:
    """The line said before an evaluation runs (on a CPU it can take a while)."""
    return f"evaluating {what}: {prompts} held-out prompts {_how(cfg)} ..."


def eval_line(tag: str, step: int, metrics: dict[str, float], cfg: Config) -> str:
    """The one line training prints for an evaluation."""
    how = _how(cfg)
    k = f"{metrics['samples_per_prompt']:.0f}"
    votes = (f" (pass@{k} {metrics['pass@k']:.3f}, maj@{k} {metrics['maj@k']:.3f})"
             if metrics["samples_per_prompt"] > 1 else "")
    return (f"eval {tag} (step {step}, adapter version {metrics['adapter_version']:.0f}, "
            f"{metrics['num_samples']:.0f} prompts {how}): accuracy "
            f"{metrics['accuracy']:.3f}{votes}, exact {metrics['accuracy_exact']:.3f}, format "
            f"strict {metrics['strict_format']:.3f} soft {metrics['soft_format']:.3f}, reasoning "
            f"{metrics['reasoning_words_mean']:.1f} words, {metrics['time_s']:.1f} s")


def _rows(*metrics: dict[str, float]) -> list[tuple[str, str]]:
    """(key, label) of the table's rows present in any of `metrics`, with k filled in."""
    k = next((f"{m['samples_per_prompt']:.0f}" for m in metrics if "samples_per_prompt" in m),
             "k")
    return [(key, label.format(k=k)) for key, label in TABLE
            if any(key in m for m in metrics)
            and (key not in _SHOWN_WHEN_NONZERO or any(m.get(key) for m in metrics))]


def format_metrics(metrics: dict[str, float], judge: str | None = None) -> str:
    """One aligned line per evaluation metric present, under a line naming the judge."""
    rows = [(label, metrics[key]) for key, label in _rows(metrics)]
    width = max(len(label) for label, _ in rows) if rows else 0
    lines = [f"judged by {judge}"] if judge else []
    return "\n".join(lines + [f"{label:<{width}}  {value:>8.3f}" for label, value in rows])


def format_side_by_side(before: dict[str, float], after: dict[str, float],
                        labels: tuple[str, str] = ("before", "after"),
                        judge: str | None = None, source: str | None = None) -> str:
    """An aligned text table of the evaluation metrics: one row per metric present in either,
    columns before, after and their difference; above it, when given, which rule judged and
    where the held-out rows come from."""
    def cell(v: float | None) -> str:
        return "" if v is None else f"{v:.3f}"

    rows = [(label, before.get(key), after.get(key)) for key, label in _rows(before, after)]
    width = max(len(r[0]) for r in rows) if rows else 6
    lines = [line for line in (source and f"held-out rows: {source}",
                               judge and f"judged by {judge}") if line]
    lines.append(f"{'metric':<{width}}  {labels[0]:>8}  {labels[1]:>8}  {'change':>8}")
    for label, b, a in rows:
        change = f"{a - b:+.3f}" if a is not None and b is not None else ""
        lines.append(f"{label:<{width}}  {cell(b):>8}  {cell(a):>8}  {change:>8}")
    return "\n".join(lines)
