"""The reference recipe's five rewards, in two modes (`reward.registry` resolves config names).

Every function has TRL's reward signature `fn(prompts, completions, **columns) -> list[float |
None]`; completions come in TRL's conversational form `[{"role": "assistant", "content": text}]`
(plain strings are accepted too) and the gold answers as the `answer` column.

`seed-parity` reproduces the reference notebook's functions exactly, flaws included. Source:
unslothai/notebooks, python_scripts/Qwen2.5_(3B)-GRPO.py (commit 03b0cdad; the functions come
from willccbb's GRPO gist): `correctness_reward_func` (`2.0 if r == a`), `int_reward_func`
(`r.isdigit()`), `strict_format_reward_func` and `soft_format_reward_func` (`re.match`, no
DOTALL) and `count_xml`.

`fixed` (the default) repairs what makes the reference reward the wrong things:
- correctness compares numbers, not strings: "18" == "18.0" == "$18" == "18 dollars", "1,000" ==
  "1000", "-3", "50%" == "50"; units and symbols are tolerated only when the answer holds exactly
  one number. A gold answer that is not one number falls back to an exact string comparison;
- integer: any integer-valued number ("18.0", "1,000", "-3"), not only bare digits;
- strict/soft format accept multi-line reasoning (DOTALL); strict also accepts the completion
  ending right after `</answer>` (the engine drops the EOS, so the notebook's required final
  newline rarely exists) and requires each tag exactly once;
- xml_count subtracts 0.001 once per non-blank character after the last `</answer>`, instead of
  the notebook's double count (and its penalty of the whole text when `\\n</answer>\\n` is absent);
- an answer needs both `<answer>` and `</answer>`: the notebook scores a completion without tags
  as if its whole text were the answer.

`None` ("cannot be scored", the row gets no advantage) is returned in one case only: fixed
correctness for a row whose gold answer is None or empty. A row a function could not score
because its own machinery failed (not the completion) is a `FailedScore`: the reward worker
counts it as failed, with the error.

Two more built-ins, the same in both modes: `math` (correctness by mathematical equivalence
through math-verify, for LaTeX answers; grpo_ray/reward/math.py) and `overlong` (DAPO's soft
overlong penalty: TRL's `get_soft_overlong_punishment`, made in `reward.registry`).

TRL components: none here. These functions have no twin in `trl.rewards`: TRL's
`accuracy_reward` judges `\boxed{}` answers against a `solution` column with math-verify, and
`think_format_reward` checks `<think>` tags, where the recipe's answers are in `<answer>` tags
(both are available as `trl:accuracy_reward` and `trl:think_format_reward`).
"""
from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation
from typing import Any, Callable

from grpo_ray.answer_format import extract_xml_answer

RewardFn = Callable[..., list]


class FailedScore(float):
    """The score of a row that a function could not compute because something of its own broke
    (math-verify raising, say), as opposed to an answer that is simply wrong. A NaN, so that
    TRL's NaN-aware sums skip it as they skip None, carrying `error` (one line): the reward
    worker makes it None and counts it in `reward/<name>/failed` with that error."""

    error: str

    def __new__(cls, error: str) -> "FailedScore":
        score = super().__new__(cls, math.nan)
        score.error = error
        return score

    def __reduce__(self) -> tuple:  # pickled (Ray) as itself, error included
        return FailedScore, (self.error,)


def completion_texts(completions: list[Any]) -> list[str]:
    """Texts of TRL conversational completions (`[{"role": ..., "content": text}]`) or strings."""
    texts = []
    for i, c in enumerate(completions):
        if isinstance(c, str):
            texts.append(c)
        elif isinstance(c, list) and c and isinstance(c[0], dict) and "content" in c[0]:
            texts.append(c[0]["content"])
        else:
            raise TypeError(f"completions[{i}]: expected a string or [{{'role': 'assistant', "
                            f"'content': text}}], got {type(c).__name__} {str(c)[:60]!r}")
    return texts


def _gold(answer: list[Any] | None, n: int, fn: str) -> list[Any]:
    if answer is None:
        raise ValueError(f"{fn}: needs the gold answers as the 'answer' column")
    if len(answer) != n:
        raise ValueError(f"{fn}: {len(answer)} answers for {n} completions")
    return list(answer)


# ---- seed-parity: the notebook's functions, behaviour for behaviour ---------------------------

_PARITY_STRICT = re.compile(r"^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n$")
_PARITY_SOFT = re.compile(r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>")


def parity_correctness_reward(prompts: list, completions: list, answer: list | None = None,
                              **kwargs: Any) -> list[float]:
    """2.0 when the extracted answer equals the gold string exactly."""
    gold = _gold(answer, len(completions), "correctness")
    return [2.0 if extract_xml_answer(t) == a else 0.0
            for t, a in zip(completion_texts(completions), gold)]


def parity_integer_reward(prompts: list, completions: list, **kwargs: Any) -> list[float]:
    """0.5 when the extracted answer is all digits (`str.isdigit`)."""
    return [0.5 if extract_xml_answer(t).isdigit() else 0.0 for t in completion_texts(completions)]


def parity_strict_format_reward(prompts: list, completions: list, **kwargs: Any) -> list[float]:
    """0.5 when the whole text is the one-line-reasoning schema (no DOTALL)."""
    return [0.5 if _PARITY_STRICT.match(t) else 0.0 for t in completion_texts(completions)]


def parity_soft_format_reward(prompts: list, completions: list, **kwargs: Any) -> list[float]:
    """0.5 when reasoning then answer tags open the text, each on one line (no DOTALL)."""
    return [0.5 if _PARITY_SOFT.match(t) else 0.0 for t in completion_texts(completions)]


def parity_count_xml(text: str) -> float:
    """The notebook's `count_xml`, including its penalties of text after the closing tag."""
    count = 0.0
    if text.count("<reasoning>\n") == 1:
        count += 0.125
    if text.count("\n</reasoning>\n") == 1:
        count += 0.125
    if text.count("\n<answer>\n") == 1:
        count += 0.125
        count -= len(text.split("\n</answer>\n")[-1]) * 0.001
    if text.count("\n</answer>") == 1:
        count += 0.125
        count -= (len(text.split("\n</answer>")[-1]) - 1) * 0.001
    return count


def parity_xml_count_reward(prompts: list, completions: list, **kwargs: Any) -> list[float]:
    return [parity_count_xml(t) for t in completion_texts(completions)]


# ---- fixed ------------------------------------------------------------------------------------

# One number: an optional sign and dollar sign, digits with or without thousands separators,
# an optional decimal part. "1,00" is two numbers (ambiguous), not 100.
_NUMBER = re.compile(r"-?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\$?\.\d+")
_STRICT = re.compile(r"<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n?", re.DOTALL)
_SOFT = re.compile(r"\s*<reasoning>.*?</reasoning>\s*<answer>.*?</answer>", re.DOTALL)
_TAGS = ("<reasoning>", "</reasoning>", "<answer>", "</answer>")


def parse_number(text: str) -> Decimal | None:
    """The one number in `text` ("$1,000.50" -> 1000.50, "18 dollars" -> 18, "-3." -> -3);
    None when it holds no number or more than one ("3/4", "5 - 3")."""
    found = _NUMBER.findall(text.replace("\u2212", "-"))
    if len(found) != 1:
        return None
    try:
        return Decimal(found[0].replace(",", "").replace("$", ""))
    except InvalidOperation:
        return None


def extract_answer(text: str) -> str | None:
    """The text between the last `<answer>` and the following `</answer>`, stripped; None when
    either tag is missing (a truncated completion has no answer, rather than all its text)."""
    if "<answer>" not in text:
        return None
    tail = text.split("<answer>")[-1]
    if "</answer>" not in tail:
        return None
    return tail.split("</answer>")[0].strip()


def answers_match(predicted: str | None, gold: str) -> bool:
    """Numeric equality when the gold answer is one number, else exact (stripped) strings."""
    if predicted is None:
        return False
    gold_number = parse_number(gold)
    if gold_number is None:
        return predicted.strip() == gold.strip()
    return parse_number(predicted) == gold_number


def correctness_reward(prompts: list, completions: list, answer: list | None = None,
                       **kwargs: Any) -> list[float | None]:
    """2.0 when the answer equals the gold answer as a number; None when there is no gold."""
    gold = _gold(answer, len(completions), "correctness")
    return [None if a is None or str(a).strip() == "" else
            2.0 if answers_match(extract_answer(t), str(a)) else 0.0
            for t, a in zip(completion_texts(completions), gold)]


def integer_reward(prompts: list, completions: list, **kwargs: Any) -> list[float]:
    """0.5 when the answer is one integer-valued number ("18", "18.0", "1,000", "-3")."""
    out = []
    for t in completion_texts(completions):
        predicted = extract_answer(t)
        number = parse_number(predicted) if predicted is not None else None
        out.append(0.5 if number is not None and number == number.to_integral_value() else 0.0)
    return out


def strict_format_reward(prompts: list, completions: list, **kwargs: Any) -> list[float]:
    """0.5 when the whole text is the schema, multi-line reasoning allowed, each tag once."""
    return [0.5 if _STRICT.fullmatch(t) and all(t.count(tag) == 1 for tag in _TAGS) else 0.0
            for t in completion_texts(completions)]


def soft_format_reward(prompts: list, completions: list, **kwargs: Any) -> list[float]:
    """0.5 when reasoning then answer tags open the text (after blanks), any number of lines."""
    return [0.5 if _SOFT.match(t) else 0.0 for t in completion_texts(completions)]


def count_xml(text: str) -> float:
    """0.125 per tag with its newlines present exactly once, minus 0.001 per non-blank
    character after the last `</answer>`."""
    count = 0.125 * sum(text.count(tag) == 1 for tag in
                        ("<reasoning>\n", "\n</reasoning>\n", "\n<answer>\n", "\n</answer>"))
    if "</answer>" in text:
        count -= len(text.split("</answer>")[-1].strip()) * 0.001
    return count


def xml_count_reward(prompts: list, completions: list, **kwargs: Any) -> list[float]:
    return [count_xml(t) for t in completion_texts(completions)]
