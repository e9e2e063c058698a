"""Runs in the driver: held-out evaluation through the rollout engines. Answers to the first
prompts of the held-out rows (greedy, or `eval.samples` samples each), judged by the run's rule
of a right answer (`judge`: the judge, mean@k, pass@k, maj@k, format adherence, the reference's
exact string match and reasoning length), then the record of it and the lines and tables that
show it.

`evaluate` only moves prompts to the engines and texts back; the judging is `judge`'s, pure. The
engines generate with whatever adapter they hold, so the same call measures the base model
(adapter version 0) before training and the trained adapter after it. The trainer, `grpo-ray
eval` and the learning benchmark all evaluate through `evaluate`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from grpo_ray.cluster.engines import EngineGroup
from grpo_ray.config import Config
from grpo_ray.contracts import PromptBatch, Sampling
from grpo_ray.driver.judge import Judge, judge_completions, numeric_judge, score_completions

STOP = ["</answer>"]
"""Greedy answers stop right after the answer closes, as the XML schema ends there."""

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
    judge = judge or numeric_judge()
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
