"""The `math` reward (math-verify in a child process): crafted equivalent and non-equivalent
pairs, answer extraction, unreadable golds, a pathological answer cut off inside a thread, and no
model text run as Python."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from grpo_ray.reward.functions import correctness_reward
from grpo_ray.reward.math import as_latex, math_answer, math_reward


def answered(text: str) -> str:
    return f"<reasoning>\nwork\n</reasoning>\n<answer>\n{text}\n</answer>\n"


def score(predicted: str, gold: str, **kwargs) -> float | None:
    return math_reward(None, [[{"role": "assistant", "content": answered(predicted)}]],
                       answer=[gold], **kwargs)[0]


@pytest.mark.parametrize("predicted, gold", [
    ("0.75", "\\frac{3}{4}"),
    ("3/4", "\\frac{3}{4}"),
    ("\\dfrac{3}{4}", "0.75"),
    ("\\frac12", "0.5"),
    ("1e3", "1000"),
    ("2.5E-3", "0.0025"),
    ("10^3", "1000"),
    ("1 \\times 10^{3}", "1000"),
    ("[1, 2)", "[1,2)"),
    ("(x+1)^2", "x^2+2x+1"),
    ("\\frac{1}{\\sqrt{2}}", "\\sqrt{2}/2"),
    ("\\{2, 1\\}", "\\{1,2\\}"),
    ("18.0", "18"),
    ("1,000", "1000"),
    ("$\\frac{1}{2}$", "0.5"),
    ("\\boxed{7}", "7"),
    ("x = 2", "2"),
    ("50\\%", "50"),
])
def test_equivalent_answers_score(predicted, gold):
    assert score(predicted, gold) == 2.0


@pytest.mark.parametrize("predicted, gold", [
    ("0.76", "\\frac{3}{4}"),
    ("4/3", "\\frac{3}{4}"),
    ("1e3", "100"),
    ("(1, 2]", "[1,2)"),
    ("x^2+1", "(x+1)^2"),
    ("\\pi", "3.14159"),
    ("0.333", "\\frac{1}{3}"),
    ("\\{1, 3\\}", "\\{1,2\\}"),
    ("2", "3"),
    ("", "3"),
])
def test_non_equivalent_answers_do_not(predicted, gold):
    assert score(predicted, gold) == 0.0


def test_the_gsm8k_rule_calls_these_wrong_and_math_right():
    pairs = [("3/4", "0.75"), ("\\frac{1}{2}", "0.5"), ("1e3", "1000")]
    completions = [answered(p) for p, _ in pairs]
    golds = [g for _, g in pairs]
    assert correctness_reward(None, completions, answer=golds) == [0.0, 0.0, 0.0]
    assert math_reward(None, completions, answer=golds) == [2.0, 2.0, 2.0]


def test_answer_extraction():
    # the <answer> block wins; without one, the last box; neither: no answer
    assert math_answer("\\boxed{1} <answer>\n2\n</answer>") == "2"
    assert math_answer("first \\boxed{1}, then \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert math_answer("it is 5") is None
    assert math_answer("<answer>\n5") is None  # cut before </answer>
    assert as_latex(" $\\frac{1}{2}$ ") == "\\boxed{\\frac{1}{2}}"
    assert as_latex("\\(x\\)") == "\\boxed{x}"
    assert as_latex("6.02e23 and e3 and 2e") == "\\boxed{6.02\\times 10^{23} and e3 and 2e}"
    texts = ["The sum is \\boxed{\\frac{3}{4}}.", "The sum is \\boxed{3}.", "it is 3/4"]
    assert math_reward(None, texts, answer=["0.75"] * 3) == [2.0, 0.0, 0.0]


def test_unreadable_or_missing_gold_is_not_scored():
    texts = [answered("1")] * 4
    assert math_reward(None, texts, answer=["", None, "\\text{}", "1"]) == [None, None, None, 2.0]
    with pytest.raises(ValueError, match="math: needs the gold answers"):
        math_reward(None, texts)
    with pytest.raises(ValueError, match=r"math: timeout_s must be > 0 \(got 0\)"):
        math_reward(None, texts, answer=["1"] * 4, timeout_s=0)


def test_a_pathological_answer_is_cut_off_in_a_thread():
    # verifying 9^(9^(9^9)) against 1 computes a power of ~370 million digits: minutes, holding
    # the GIL. Reward actors call functions from threads, where math-verify's signal timeout
    # cannot work; the child process is killed and a fresh one scores the next row.
    completions = [answered("9^{9^{9^{9}}}"), answered("1"), answered("2")]
    start = time.perf_counter()
    pool = ThreadPoolExecutor(1)
    scores = pool.submit(math_reward, None, completions, answer=["1", "1", "1"],
                         timeout_s=1.0).result(timeout=60)
    elapsed = time.perf_counter() - start
    pool.shutdown(wait=False)
    assert scores == [0.0, 2.0, 0.0]
    assert 1.0 <= elapsed < 30


def test_model_text_is_never_run_as_python(tmp_path):
    marker = tmp_path / "ran"
    code = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    # sympy.sympify(code) would create the file: answers are read as LaTeX only
    assert math_reward(None, [answered(code), f"\\boxed{{{code}}}"], answer=["1", "1"]) == \
        [0.0, 0.0]
    assert not marker.exists()


def test_an_error_inside_math_verify_is_a_failed_row_not_a_zero():
    import math

    from grpo_ray.config import RewardFunctionConfig
    from grpo_ray.reward.functions import FailedScore
    from grpo_ray.reward.worker import RewardWorker

    # sympy cannot evaluate the gold 1/0 (zoo) while comparing: math-verify used to log it and
    # answer False, a silent 0.0
    texts = [answered("3"), answered("2")]
    scores = math_reward(None, texts, answer=["\\frac{1}{0}", "2"])
    failed = scores[0]
    assert isinstance(failed, FailedScore) and math.isnan(failed)
    assert failed.error == "math-verify: ValueError: Can't evaluate nan or zoo"
    assert scores[1] == 2.0
    # the reward worker makes it an unscored row, counted for `math` with the error
    worker = RewardWorker([RewardFunctionConfig(name="math")], "fixed")
    shard = worker.score([[]] * 2, texts, {"answer": ["\\frac{1}{0}", "2"]})
    assert shard.per_function["math"] == [None, 2.0]
    assert shard.failed == {"math": 1}
    assert shard.errors["math"] == ("could not score a row: math-verify: ValueError: Can't "
                                    "evaluate nan or zoo")
