"""The five rewards in both modes, on crafted completions with hand-computed values; the
registry's names, TRL's reward functions (`trl:NAME`) and bound kwargs."""
from __future__ import annotations

import pytest

from grpo_ray.config import RewardFunctionConfig
from grpo_ray.reward import functions as F
from grpo_ray.reward.functions import parse_number
from grpo_ray.reward.registry import MODES, get_reward_functions

PERFECT = "<reasoning>\n9 + 9 = 18\n</reasoning>\n<answer>\n18\n</answer>\n"
MULTILINE = "<reasoning>\nstep one\nstep two\n</reasoning>\n<answer>\n18\n</answer>\n"
ONE_LINE = "<reasoning>9 + 9 = 18</reasoning> <answer>18</answer>"


def conv(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


RECIPE = ["correctness", "integer", "soft_format", "strict_format", "xml_count"]


def scores(mode: str, text: str, gold: str | None = "18") -> dict[str, float | None]:
    """The recipe's five rewards of one completion (in TRL's conversational form)."""
    prompt = [[{"role": "user", "content": "What is 9 + 9?"}]]
    return {name: fn(prompt, [conv(text)], answer=[gold])[0]
            for name, fn, _ in get_reward_functions(
                [RewardFunctionConfig(n) for n in RECIPE], mode)}


def test_perfect_completion_scores_in_both_modes():
    # The notebook's soft pattern has no DOTALL, so `<reasoning>.*?` cannot cross the newline
    # after the tag: its soft reward is 0 for the very schema its system prompt asks for.
    assert scores("seed-parity", PERFECT) == pytest.approx(
        {"correctness": 2.0, "integer": 0.5, "strict_format": 0.5, "soft_format": 0.0,
         "xml_count": 0.5})
    assert scores("fixed", PERFECT) == pytest.approx(
        {"correctness": 2.0, "integer": 0.5, "strict_format": 0.5, "soft_format": 0.5,
         "xml_count": 0.5})


def test_single_line_completion_passes_parity_soft_format_only():
    expected = {"correctness": 2.0, "integer": 0.5, "strict_format": 0.0, "soft_format": 0.5,
                "xml_count": 0.0}
    assert scores("seed-parity", ONE_LINE) == pytest.approx(expected)
    assert scores("fixed", ONE_LINE) == pytest.approx(expected)


def test_multiline_reasoning_is_strict_only_in_fixed_mode():
    assert scores("seed-parity", MULTILINE)["strict_format"] == 0.0
    assert scores("fixed", MULTILINE)["strict_format"] == 0.5
    assert scores("fixed", MULTILINE)["soft_format"] == 0.5
    assert scores("seed-parity", MULTILINE)["xml_count"] == pytest.approx(0.5)


def test_text_after_the_answer_is_penalized():
    text = PERFECT + "extra"
    # Parity counts the 5 trailing characters twice: after "\n</answer>\n" (5) and after
    # "\n</answer>" minus one (6 - 1).
    assert scores("seed-parity", text)["xml_count"] == pytest.approx(0.5 - 0.005 - 0.005)
    assert scores("fixed", text)["xml_count"] == pytest.approx(0.5 - 0.005)
    assert scores("seed-parity", text)["strict_format"] == 0.0
    assert scores("fixed", text)["strict_format"] == 0.0


def test_completion_ending_at_the_closing_tag():
    text = PERFECT[:-1]  # the engine stops at EOS right after </answer>
    # Parity: no "\n</answer>\n", so the third term subtracts the whole text's length; the
    # fourth adds 0.001 (nothing after "\n</answer>", minus one).
    assert scores("seed-parity", text)["xml_count"] == pytest.approx(
        0.5 - len(text) * 0.001 + 0.001)
    assert scores("fixed", text)["xml_count"] == pytest.approx(0.5)
    assert scores("seed-parity", text)["strict_format"] == 0.0
    assert scores("fixed", text)["strict_format"] == 0.5


@pytest.mark.parametrize("predicted, gold, parity, fixed", [
    ("$18", "18", 0.0, 2.0),
    ("1,000", "1000", 0.0, 2.0),
    ("1000", "1,000", 0.0, 2.0),
    ("18.0", "18", 0.0, 2.0),
    ("18.00", "18", 0.0, 2.0),
    ("18 dollars", "18", 0.0, 2.0),
    ("18%", "18", 0.0, 2.0),
    ("18.", "18", 0.0, 2.0),
    ("-3", "-3", 2.0, 2.0),
    ("18.5", "18", 0.0, 0.0),
    ("17 or 18", "18", 0.0, 0.0),   # two numbers: no unit tolerance
    ("1,00", "100", 0.0, 0.0),      # a misplaced separator is not a thousands separator
    ("Tuesday", "Tuesday", 2.0, 2.0),  # gold is no number: exact strings
    ("tuesday", "Tuesday", 0.0, 0.0),
])
def test_correctness(predicted, gold, parity, fixed):
    text = f"<reasoning>\nr\n</reasoning>\n<answer>\n{predicted}\n</answer>\n"
    assert scores("seed-parity", text, gold)["correctness"] == parity
    assert scores("fixed", text, gold)["correctness"] == fixed


@pytest.mark.parametrize("predicted, parity, fixed", [
    ("18", 0.5, 0.5), ("18.0", 0.0, 0.5), ("1,000", 0.0, 0.5), ("-3", 0.0, 0.5),
    ("$18", 0.0, 0.5), ("18.5", 0.0, 0.0), ("eighteen", 0.0, 0.0),
])
def test_integer(predicted, parity, fixed):
    text = f"<reasoning>\nr\n</reasoning>\n<answer>\n{predicted}\n</answer>\n"
    assert scores("seed-parity", text)["integer"] == parity
    assert scores("fixed", text)["integer"] == fixed


def test_missing_answer_tags():
    # Parity treats the whole text as the answer when <answer> is missing.
    assert scores("seed-parity", "18")["correctness"] == 2.0
    assert scores("seed-parity", "18")["integer"] == 0.5
    assert scores("fixed", "18")["correctness"] == 0.0
    assert scores("fixed", "18")["integer"] == 0.0
    truncated = "<reasoning>\nr\n</reasoning>\n<answer>\n18"
    assert scores("seed-parity", truncated)["correctness"] == 2.0
    assert scores("fixed", truncated)["correctness"] == 0.0
    # The last <answer> block counts, in both modes.
    twice = "<answer>\n17\n</answer>\n<answer>\n18\n</answer>"
    assert scores("seed-parity", twice)["correctness"] == 2.0
    assert scores("fixed", twice)["correctness"] == 2.0
    assert scores("fixed", "<reasoning>\nr\n</reasoning>\n" + twice)["strict_format"] == 0.0


def test_missing_gold_is_unscorable_in_fixed_mode_only():
    assert scores("fixed", PERFECT, gold=None)["correctness"] is None
    assert scores("fixed", PERFECT, gold="")["correctness"] is None
    assert scores("seed-parity", PERFECT, gold=None)["correctness"] == 0.0


def test_plain_strings_and_bad_inputs():
    assert F.correctness_reward(None, [PERFECT, "x"], answer=["18", "18"]) == [2.0, 0.0]
    with pytest.raises(ValueError, match="correctness: needs the gold answers"):
        F.correctness_reward(None, [PERFECT])
    with pytest.raises(ValueError, match="correctness: 1 answers for 2 completions"):
        F.parity_correctness_reward(None, [PERFECT, PERFECT], answer=["18"])
    with pytest.raises(TypeError, match=r"completions\[1\]: expected a string"):
        F.xml_count_reward(None, [PERFECT, 42])


def test_parse_number():
    assert parse_number("$1,000.50") == parse_number("1000.5")
    assert parse_number("-$3") == -3 and parse_number("$-3") == -3
    assert parse_number("\u22123") == -3  # unicode minus
    assert parse_number("-.5") == parse_number("-0.5")
    assert parse_number("3/4") is None and parse_number("no number") is None


# ---- registry ---------------------------------------------------------------------------------

@pytest.fixture
def custom_module(tmp_path, monkeypatch):
    (tmp_path / "grpo_ray_test_rewards.py").write_text(
        "def length_reward(prompts, completions, **kwargs):\n"
        "    return [float(len(c[0]['content'])) for c in completions]\n"
        "NOT_A_FUNCTION = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "grpo_ray_test_rewards"


def test_registry_resolves_builtins_per_mode_and_import_paths(custom_module):
    cfgs = [RewardFunctionConfig("correctness", 2.0), RewardFunctionConfig("xml_count"),
            RewardFunctionConfig(f"{custom_module}:length_reward", 0.5),
            RewardFunctionConfig(f"{custom_module}:length_reward"),
            RewardFunctionConfig("correctness")]
    parity = get_reward_functions(cfgs, "seed-parity")
    assert [(n, w) for n, _, w in parity] == [
        ("correctness", 2.0), ("xml_count", 1.0), ("length_reward", 0.5),
        ("length_reward_2", 1.0), ("correctness_2", 1.0)]
    assert parity[0][1] is F.parity_correctness_reward
    assert parity[2][1](None, [conv("abc")]) == [3.0]
    fixed = get_reward_functions(cfgs, "fixed")
    assert fixed[0][1] is F.correctness_reward and fixed[1][1] is F.xml_count_reward


def test_registry_errors(custom_module):
    ok = [RewardFunctionConfig("correctness"), RewardFunctionConfig("integer")]
    with pytest.raises(ValueError) as e:
        get_reward_functions(ok + [RewardFunctionConfig("x.y:z")], "fixed")
    assert str(e.value) == "reward.functions[2]: cannot import 'x.y:z' (No module named 'x')"
    with pytest.raises(ValueError, match=r"reward.functions\[0\]: cannot import "
                                         r"'grpo_ray_test_rewards:nope' \(module"):
        get_reward_functions([RewardFunctionConfig(f"{custom_module}:nope")], "fixed")
    with pytest.raises(ValueError, match=r"reward.functions\[0\]: 'grpo_ray_test_rewards:"
                                         r"NOT_A_FUNCTION' is not callable \(got int\)"):
        get_reward_functions([RewardFunctionConfig(f"{custom_module}:NOT_A_FUNCTION")], "fixed")
    with pytest.raises(ValueError, match=r"reward.functions\[0\]: 'correct' is neither a "
                                         r"built-in reward \(correctness, integer"):
        get_reward_functions([RewardFunctionConfig("correct")], "fixed")
    with pytest.raises(ValueError, match=r"reward.mode: must be one of \['fixed', "
                                         r"'seed-parity'\] \(got 'parity'\)"):
        get_reward_functions(ok, "parity")


# ---- overlong penalty, bound kwargs -------------------------------------------------------------

def test_overlong_is_trls_soft_punishment():
    cfg = RewardFunctionConfig("overlong", kwargs={"max_completion_len": 10,
                                                   "soft_punish_cache": 4})
    [(name, fn, _)] = get_reward_functions([cfg], "fixed")
    ids = [[1] * n for n in (3, 6, 7, 8, 10, 12)]
    # L_max 10, L_cache 4: nothing up to 6 tokens, then -(L - 6) / 4, -1 at 10 and beyond;
    # called as the reward worker calls every function, by keyword
    got = fn(prompts=[None] * 6, completions=[conv("x")] * 6, completion_ids=ids, answer=["1"] * 6)
    assert name == "overlong" and got == pytest.approx([0.0, 0.0, -0.25, -0.5, -1.0, -1.0])
    with pytest.raises(ValueError, match=r"reward.functions\[0\].kwargs: 'overlong' missing a "
                                         r"required argument: 'soft_punish_cache' \(its "
                                         r"arguments: max_completion_len, soft_punish_cache\)"):
        get_reward_functions([RewardFunctionConfig("overlong", kwargs={"max_completion_len": 4})],
                             "fixed")


def test_trl_reward_functions_by_short_name():
    cfgs = [RewardFunctionConfig("trl:accuracy_reward", 2.0),
            RewardFunctionConfig("trl:think_format_reward"),
            RewardFunctionConfig("trl:get_cosine_scaled_reward", kwargs={"max_len": 100})]
    (acc_name, acc, acc_w), (think_name, think, _), (cos_name, cos, _) = \
        get_reward_functions(cfgs, "seed-parity")
    assert (acc_name, acc_w, think_name, cos_name) == (
        "accuracy_reward", 2.0, "think_format_reward", "cosine_scaled_reward")
    completions = [conv(r"<think>\nhalf of 6</think> \boxed{\frac{1}{2}}"),
                   conv(r"The answer is \boxed{3}")]
    # TRL's accuracy reads the raw `solution` column; an unparseable gold is None (not scored)
    columns = dict(solution=[r"\boxed{0.5}", "no number here"], answer=["0.5", "?"],
                   completion_ids=[[1] * 50, [1] * 50])
    assert acc(prompts=[None] * 2, completions=completions, **columns) == [1.0, None]
    assert think(prompts=[None] * 2, completions=completions, **columns) == [1.0, 0.0]
    assert cos(prompts=[None] * 2, completions=completions[:1],
               **{k: v[:1] for k, v in columns.items()}) == pytest.approx([0.75])


def test_trl_reward_errors():
    with pytest.raises(ValueError, match=r"reward.functions\[0\]: trl.rewards has no reward "
                                         r"function 'accuracy' \(it has: accuracy_reward, "):
        get_reward_functions([RewardFunctionConfig("trl:accuracy")], "fixed")
    with pytest.raises(ValueError, match=r"reward.functions\[0\].kwargs: "
                                         r"'trl:get_cosine_scaled_reward' missing a required "
                                         r"argument: 'max_len' \(its arguments: max_len, "):
        get_reward_functions([RewardFunctionConfig("trl:get_cosine_scaled_reward",
                                                   kwargs={"max_length": 10})], "fixed")


def test_config_kwargs_are_bound_over_columns(custom_module, tmp_path):
    (tmp_path / "grpo_ray_test_kwargs.py").write_text(
        "def scaled(prompts, completions, scale=1.0, level=None, **kwargs):\n"
        "    return [scale * lv for lv in level]\n"
        "def strict(prompts, completions, level):\n"
        "    return list(level)\n")
    cfgs = [RewardFunctionConfig("grpo_ray_test_kwargs:scaled", kwargs={"scale": 2.0}),
            RewardFunctionConfig("overlong", kwargs={"max_completion_len": 4,
                                                     "soft_punish_cache": 2})]
    (scaled_name, scaled, _), (overlong_name, overlong, _) = get_reward_functions(cfgs, "fixed")
    assert (scaled_name, overlong_name) == ("scaled", "overlong")
    assert scaled(None, ["a", "b"], level=[1, 3]) == [2.0, 6.0]
    # the config's value wins over a dataset column of the same name
    assert scaled(None, ["a"], level=[1], scale=100.0) == [2.0]
    assert overlong(prompts=None, completions=["a", "b"],
                    completion_ids=[[1, 2], [1, 2, 3]]) == [0.0, -0.5]
    with pytest.raises(ValueError, match=r"reward.functions\[0\].kwargs: "
                                         r"'grpo_ray_test_kwargs:strict' has no argument\(s\) "
                                         r"scale \(its arguments: prompts, completions, level\)"):
        get_reward_functions([RewardFunctionConfig("grpo_ray_test_kwargs:strict",
                                                   kwargs={"scale": 2.0})], "fixed")


def test_math_and_overlong_are_builtins_of_both_modes():
    from grpo_ray.reward.math import math_reward

    cfgs = [RewardFunctionConfig("math"),
            RewardFunctionConfig("overlong", kwargs={"max_completion_len": 8,
                                                     "soft_punish_cache": 2})]
    for mode in MODES:
        fns = [fn for _, fn, _ in get_reward_functions(cfgs, mode)]
        assert fns[0] is math_reward and type(fns[1]).__name__ == "_SoftOverlongPunishment"
