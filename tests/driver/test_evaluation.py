"""Evaluation: hand-computed scores, pass@k / mean@k / maj@k, the judging reward a config picks,
greedy answers through a real rollout actor, the trainer's before/after evaluation and sanity
check, the saved adapter read back into an engine.

One trainer (one vLLM engine) serves the module; the tests that need its run ask for `fitted`.
`grpo-ray eval` runs in tests/driver/test_export.py, on the merged model (that file's one engine).
"""
from __future__ import annotations

import json
import math

import pytest

from grpo_ray.config import ConfigError, load_config
from grpo_ray.contracts import PromptBatch, Sampling
from grpo_ray.driver.evaluation import (STOP, evaluate, format_side_by_side, sanity_check,
                                        show_answer)
from grpo_ray.driver.judge import (judge_completions, majority_index, make_judge, pass_at_k,
                                   reasoning_words, sample_metrics, score_completions)

EVAL_RECORD_KEYS = ["time", "step", "tag", "model", "adapter", "adapter_version", "held_out",
                    "judge", "metrics", "sanity", "samples"]
"""The keys of a line of training's `eval.jsonl` and of `grpo-ray eval`'s file, in order."""

TEXTS = [
    # exact and numeric match, strict (ends right after </answer>) and soft format; 5 words
    "<reasoning>\n3 + 4 = 7\n</reasoning>\n<answer>\n7\n</answer>",
    # exact-string miss ("$18.00" vs "18"); multi-line reasoning passes the fixed strict format
    "<reasoning>\nHe pays 18 dollars\nin total\n</reasoning>\n<answer>\n$18.00\n</answer>",
    # no tags: the reference's extraction takes the whole text, which is not "5"; no reasoning
    "The answer is 5",
    # bare answer tags: exact and numeric match, neither format
    "<answer>\n12\n</answer>",
    # reasoning never closed (truncated): 0 words, nothing matches
    "<reasoning>\nunfinished thought",
]
GOLDS = ["7", "18", "5", "12", "3"]


def test_score_completions_hand_computed():
    m = score_completions(TEXTS, GOLDS, completion_lengths=[10, 20, 30, 40, 50])
    assert m["accuracy_exact"] == pytest.approx(2 / 5)      # rows 0, 3
    assert "accuracy" not in m  # the judge's (judge_completions)
    assert m["strict_format"] == pytest.approx(2 / 5)       # rows 0, 1
    assert m["soft_format"] == pytest.approx(2 / 5)         # rows 0, 1
    # words [5, 6, 0, 0, 0]: sorted [0, 0, 0, 5, 6]; p90 at position 3.6 -> 5 + 0.6 * (6 - 5)
    assert m["reasoning_words_mean"] == pytest.approx(11 / 5)
    assert (m["reasoning_words_p10"], m["reasoning_words_p50"]) == (0, 0)
    assert m["reasoning_words_p90"] == pytest.approx(5.6)
    assert m["completion_tokens_mean"] == 30
    assert "completion_tokens_mean" not in score_completions(TEXTS, GOLDS)


def test_reasoning_words_and_percentiles():
    assert [reasoning_words(t) for t in TEXTS] == [5, 6, 0, 0, 0]
    assert reasoning_words("<reasoning>a b</reasoning> <reasoning>c</reasoning>") == 2
    # numpy's linear interpolation between order statistics, on words [4, 1, 3, 2]
    texts = [f"<reasoning>{' '.join('w' * n)}</reasoning>" for n in (4, 1, 3, 2)]
    m = score_completions(texts, ["1"] * 4)
    assert m["reasoning_words_p50"] == pytest.approx(2.5)
    assert m["reasoning_words_p10"] == pytest.approx(1.3)
    assert score_completions(texts[:1], ["1"])["reasoning_words_p90"] == 4


def test_score_completions_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="2 completions but 1 gold"):
        score_completions(["a", "b"], ["1"])
    with pytest.raises(ValueError, match="1 completion lengths for 2"):
        score_completions(["a", "b"], ["1", "2"], [3])


def test_format_side_by_side():
    before = {"accuracy": 0.25, "pass@k": 0.5, "maj@k": 0.25, "unjudged_rate": 0.0,
              "samples_per_prompt": 4.0, "strict_format": 0.0}
    after = dict(before, accuracy=0.5, strict_format=0.125)
    table = format_side_by_side(before, after, judge="math-verify (reward 'math')",
                                source="2 of 6 rows held out")
    lines = table.splitlines()
    assert lines[:2] == ["held-out rows: 2 of 6 rows held out",
                         "judged by math-verify (reward 'math')"]
    assert lines[2].split() == ["metric", "before", "after", "change"]
    assert lines[3].split() == ["accuracy", "(mean@4)", "0.250", "0.500", "+0.250"]
    assert lines[4].split() == ["pass@4", "0.500", "0.500", "+0.000"]
    assert lines[5].split() == ["maj@4", "0.250", "0.250", "+0.000"]
    # "not judged" only shows when some completion was not
    assert lines[6].split() == ["strict", "format", "0.000", "0.125", "+0.125"]
    assert len(lines) == 7


# ---- pass@k, mean@k, maj@k -------------------------------------------------------------------

def test_pass_at_k_hand_computed():
    assert pass_at_k(4, 0, 4) == 0 and pass_at_k(4, 1, 4) == 1 and pass_at_k(4, 4, 1) == 1
    assert pass_at_k(4, 1, 1) == pytest.approx(1 / 4)   # pass@1 is the mean
    assert pass_at_k(4, 1, 2) == pytest.approx(1 / 2)   # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(5, 2, 2) == pytest.approx(7 / 10)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    with pytest.raises(ValueError, match="pass@k needs"):
        pass_at_k(4, 5, 2)


def test_majority_index_by_equivalence_ties_to_the_first_class():
    def same(a, b):  # numbers compared as numbers
        return float(a) == float(b)

    # "3" and "3.0" are one class of 2: it wins over "4" (1) and the unanswered ones
    assert majority_index(["4", "3", None, "3.0"], same) == 1
    assert majority_index(["4", "3"], same) == 0          # a tie: the class seen first
    assert majority_index(["5", "6", "6", "5"], same) == 0
    assert majority_index([None, None], same) is None
    compared = []
    majority_index(["1", "2", "1.0"], lambda a, b: compared.append((a, b)) or same(a, b))
    assert compared == [("1", "2"), ("1", "1.0")]  # each answer against the earlier classes


def test_sample_metrics_hand_computed():
    # 3 prompts x 4 samples; the majority's index per prompt
    right = [[True, False, False, True],    # 2 right, majority sample 1 (wrong)
             [False, False, False, False],  # none right, no answers at all
             [True, None, True, True]]      # 3 right, one not judged, majority sample 0 (right)
    m = sample_metrics(right, [1, None, 0])
    assert m["accuracy"] == m["mean@k"] == pytest.approx((2 / 4 + 0 + 3 / 4) / 3)
    assert m["pass@k"] == pytest.approx(2 / 3)
    assert m["maj@k"] == pytest.approx(1 / 3)
    assert m["unjudged_rate"] == pytest.approx(1 / 12) and m["samples_per_prompt"] == 4
    with pytest.raises(ValueError, match="different numbers of samples"):
        sample_metrics([[True], [True, False]], [0, 0])


def _answer(x: str) -> str:
    return f"<reasoning>\nr\n</reasoning>\n<answer>\n{x}\n</answer>"


# 2 prompts x 4 samples, gold 3/4 (LaTeX) and 12
JUDGED = PromptBatch([[1], [2]], [[{"role": "user", "content": "q"}]] * 2,
                     ["\\frac{3}{4}", "12"], ["q1", "q2"])
JUDGED_TEXTS = [_answer("0.75"), _answer("3/4"), _answer("1/2"), "no answer",
                _answer("11"), _answer("11.0"), _answer("12"), _answer("\\frac{22}{2}")]


def test_math_verify_judges_the_math_recipe():
    judge = make_judge(load_config("configs/qwen2.5-3b-math.yaml"))
    assert judge.label == "math-verify (reward 'math')" and judge.column == "math"
    m = judge_completions(judge, JUDGED, [0] * 4 + [1] * 4, JUDGED_TEXTS)
    # prompt 1: 0.75 and 3/4 right (and one class of the vote, 2 of 4), 1/2 wrong, no answer;
    # prompt 2: only 12 right; 11, 11.0 and 22/2 are one class of 3, the (wrong) majority
    assert m["accuracy"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert m["pass@k"] == 1.0 and m["maj@k"] == 0.5


def test_numeric_rule_judges_gsm8k():
    judge = make_judge(load_config("configs/tiny-cpu.yaml"))
    assert judge.label == "numeric equality, GSM8K's rule (reward 'correctness')"
    m = judge_completions(judge, JUDGED, [0] * 4 + [1] * 4, JUDGED_TEXTS)
    # a LaTeX gold is not one number: strings compared, none equal; "12" right on prompt 2,
    # where 11 and 11.0 are one class (2 of 4), the majority
    assert m["accuracy"] == pytest.approx(1 / 8)
    assert (m["pass@k"], m["maj@k"]) == (0.5, 0.0)


@pytest.mark.parametrize("overrides, label, column", [
    ([], "numeric equality, GSM8K's rule (reward 'correctness')", "correctness"),
    (["reward.mode=seed-parity"], "exact string, the notebook's rule (reward 'correctness')",
     "correctness"),
    (["reward.functions=[{name: strict_format}]"],
     "GSM8K's numeric rule (no reward judges correctness)", None),
    (["reward.functions=[{name: strict_format}, {name: math, weight: 2}]"],
     "math-verify (reward 'math')", "math"),
    # a user's function, marked; the built-in beside it then only shapes the reward
    (["reward.functions=[{name: correctness}, {name: 'rewards_for_tests:text_length', "
      "weight: 0, correctness: true}]"],
     "reward 'text_length' > 0 (maj@k votes on answer text)", "text_length"),
])
def test_the_judging_reward_a_config_picks(overrides, label, column):
    judge = make_judge(load_config("configs/tiny-cpu.yaml", overrides))
    assert (judge.label, judge.column) == (label, column)


@pytest.mark.parametrize("functions, message", [
    ("[{name: correctness}, {name: math}]",
     r"reward.functions: reward.functions\[0\] \(correctness\) and reward.functions\[1\] "
     r"\(math\) could each judge right answers: mark the one that does with correctness: true"),
    ("[{name: math, correctness: true}, {name: correctness, correctness: true}]",
     "reward.functions: 2 rewards are marked correctness: true"),
])
def test_at_most_one_reward_judges(functions, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/tiny-cpu.yaml", [f"reward.functions={functions}"])
    # marking one settles it
    cfg = load_config("configs/tiny-cpu.yaml", [
        "reward.functions=[{name: correctness}, {name: math, correctness: true}]"])
    assert cfg.correctness_index == 1


def test_a_users_judging_reward_votes_on_answer_text():
    cfg = load_config("configs/tiny-cpu.yaml", [
        "reward.functions=[{name: 'rewards_for_tests:text_length', correctness: true}]"])
    judge = make_judge(cfg)
    m = judge_completions(judge, JUDGED, [0] * 4 + [1] * 4, JUDGED_TEXTS)
    # every text is longer than 0 characters: all right; votes by text: "11" and "11.0" differ
    assert (m["accuracy"], m["pass@k"], m["maj@k"]) == (1.0, 1.0, 1.0)
    assert judge.same([("11", "11.0"), ("3", "3")]) == [False, True]


def test_show_answer_has_no_runs_of_blank_lines():
    """A random model's answer held dozens of newlines: 66 blank lines on the console."""
    noise = "foo\n\n\n   \n\nbar  \n" + "\n" * 30 + "baz"
    assert show_answer(noise) == "    foo\n    bar\n    baz"
    assert show_answer("\n\n") == "    (only whitespace)" and show_answer("") == "    (no text)"
    many = "\n".join(f"line {i}" for i in range(20))
    assert show_answer(many).splitlines()[-1] == "    ... (12 more lines)"


@pytest.mark.parametrize("model, can", [
    ("builtin:tiny-warm", "knows only arithmetic word problems like its training rows "
                          "(operands up to 5): the reference notebook's question"),
    ("builtin:tiny", "has random weights: it answers no question"),
])
def test_a_builtin_model_is_asked_a_held_out_problem_it_can_answer(model, can, tokenizer):
    """The reference notebook's question (how many r's in strawberry) means nothing to the tiny
    model; its base answer `3` and trained `2` read as a regression. A built-in model is asked
    the first held-out problem instead, with its gold answer, and told what it can answer."""
    from grpo_ray.driver.evaluation import held_out_batch

    overrides = ["eval.num_samples=4"] + (["data.synthetic_max_value=5"] if "warm" in model
                                          else [])
    cfg = load_config("configs/tiny-cpu.yaml", [f"model.path={model}", *overrides])
    held_out = held_out_batch(cfg, tokenizer)
    check = sanity_check(cfg, tokenizer, held_out)
    assert check.batch.questions == held_out.questions[:1]
    assert check.batch.answers == held_out.answers[:1] and check.batch.answers[0]
    first, *why = check.heading.splitlines()
    assert first == f"sanity check: {held_out.questions[0]!r}"
    assert " ".join(why).startswith(f"(the first held-out problem, gold answer "
                                    f"{held_out.answers[0]!r}; {model} {can}")
    assert "How many r's are in strawberry?" in " ".join(why)
    assert all(len(line) <= 80 for line in why)
    # a question of one's own is asked as it is, and so is the reference one of a real model
    own = load_config("configs/tiny-cpu.yaml", [f"model.path={model}",
                                                "eval.sanity_question=What is 2 + 2?"])
    assert sanity_check(own, tokenizer, held_out).heading == "sanity check: 'What is 2 + 2?'"


# ---- through Ray -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trainer(ray_local, tiny_model_path, tmp_path_factory):
    from grpo_ray.config import load_config
    from grpo_ray.driver.trainer import Trainer

    out = tmp_path_factory.mktemp("eval-run")
    cfg = load_config("configs/tiny-cpu.yaml", [
        f"output.dir={out}", f"model.path={tiny_model_path}", "algorithm.total_steps=2",
        "learner.learning_rate=5e-3", "learner.warmup_ratio=0", "logging.tensorboard=false",
        "eval.num_samples=5", "eval.max_tokens=16", "eval.every_steps=1"])
    lines: list[str] = []
    t = Trainer(cfg, print_fn=lines.append).setup()
    t.lines = lines
    yield t
    t.close()


def test_evaluate_is_greedy_and_deterministic(trainer):
    held_out, _ = trainer.eval_prompts
    assert len(held_out) == 5
    greedy = Sampling.greedy(16, stop=STOP)
    m1, texts1 = evaluate(trainer.engines, held_out, greedy)
    m2, texts2 = evaluate(trainer.engines, held_out, greedy)
    assert texts1 == texts2 and m1 == m2 and len(texts1) == 5
    assert m1["adapter_version"] == trainer.version and m1["num_samples"] == 5
    assert 0 < m1["completion_tokens_mean"] <= 16
    for key in ["accuracy", "pass@k", "maj@k", "accuracy_exact", "strict_format", "soft_format",
                "truncated_rate"]:
        assert 0 <= m1[key] <= 1, key
    # a stop string ends the completion: nothing follows a generated </answer>
    assert all(t.endswith("</answer>") for t in texts1 if "</answer>" in t)
    # uneven slices over two handles (3 + 2 prompts) still answer every prompt, in order
    from grpo_ray.cluster.engines import EngineGroup

    engine = trainer.engines.engines[0]
    _, texts3 = evaluate(EngineGroup([engine, engine]), held_out, greedy)
    assert texts3 == texts1
    # sampled: several completions per prompt, the same draws for the same seed
    sampled = Sampling(n=3, max_tokens=16, seed=5)
    m4, texts4 = evaluate(trainer.engines, held_out, sampled)
    assert m4["num_completions"] == 15 and m4["num_samples"] == 5
    assert m4["samples_per_prompt"] == 3 and m4["maj@k"] <= m4["pass@k"]
    assert m4["accuracy"] <= m4["pass@k"]
    assert evaluate(EngineGroup([engine, engine]), held_out, sampled)[1] == texts4


@pytest.fixture(scope="module")
def fitted(trainer):
    """The module's trainer after its 2-step run (evaluations before, after step 1, after)."""
    trainer.fit()
    return trainer


def test_fit_evaluates_before_every_step_and_after(fitted):
    trainer = fitted
    assert list(trainer.evals) == ["before", "step 1", "after"]
    assert [trainer.evals[t]["adapter_version"] for t in trainer.evals] == [0, 1, 2]
    rows = [json.loads(line) for line in (trainer.out / "eval.jsonl").read_text().splitlines()]
    assert [(r["step"], r["tag"]) for r in rows] == [(0, "before"), (1, "step 1"), (2, "after")]
    # one schema, the same as `grpo-ray eval`'s (tests/driver/test_export.py), with a
    # time per row
    assert all(list(r) == EVAL_RECORD_KEYS for r in rows)
    assert all(math.isfinite(r["metrics"]["accuracy"]) and r["metrics"]["num_samples"] == 5
               and len(r["samples"]) == 5 for r in rows)
    assert [r["adapter_version"] for r in rows] == [0, 1, 2] and rows[0]["adapter"] is None
    assert {r["judge"] for r in rows} == {trainer.judge.label}
    assert {r["held_out"] for r in rows} == {"synthetic held-out rows (split 'test')"}
    assert rows[-1]["sanity"] == {"question": "How many r's are in strawberry?", "gold": "",
                                  "answer": trainer.sanity_answers["after"], "right": None}
    # metrics.jsonl keeps one row per training step
    steps = [json.loads(line)["step"] for line in
             (trainer.out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]

    text = "\n".join(trainer.lines)
    # a line before each evaluation says what runs, as the result's line says what ran
    assert text.index("evaluating the base model, before training: 5 held-out prompts greedy"
                      ) < text.index("eval before (step 0")
    assert text.index("evaluating the trained adapter, after step 2: 5 held-out prompts") < \
        text.index("eval after (step 2")
    assert "metric" in text and "accuracy (mean@1)" in text and "change" in text
    assert "judged by numeric equality, GSM8K's rule (reward 'correctness')" in text
    # a model from a directory is asked the reference notebook's question
    assert "sanity check: \"How many r's are in strawberry?\"" in text
    assert "before training, adapter version 0 (base model)" in text
    assert "after training, adapter version 2 (trained adapter)" in text
    for tag in ("before", "after"):
        assert show_answer(trainer.sanity_answers[tag]) in text
    assert "\n\n" not in text


def test_saved_adapter_read_back_answers_the_same(fitted):
    """`read_adapter` (what `grpo-ray eval --adapter` loads) gives the engine the adapter the
    trainer saved: the greedy answers equal those of the adapter the engine already holds."""
    import ray

    from grpo_ray.sync.files import read_adapter

    trainer = fitted
    held_out, _ = trainer.eval_prompts
    greedy = Sampling.greedy(16, stop=STOP)
    metrics, expected = evaluate(trainer.engines, held_out, greedy)
    version = int(metrics["adapter_version"]) + 1
    payload = read_adapter(trainer.out / "adapter", version=version)
    assert payload.peft_config["r"] == 8 and len(payload.tensors) == 2 * 7 * 2
    trainer.engines.load_adapter(ray.put(payload))
    again, texts = evaluate(trainer.engines, held_out, greedy)
    assert again["adapter_version"] == version and texts == expected


def test_eval_command_refuses_a_missing_adapter(tmp_path, tiny_model_path, capsys):
    from grpo_ray.cli import main

    rc = main(["eval", "--config", "configs/tiny-cpu.yaml", "--adapter", str(tmp_path / "nope"),
               f"output.dir={tmp_path}", f"model.path={tiny_model_path}"])
    assert rc == 2 and "no adapter_config.json" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, message", [
    (["eval.num_samples=-1"], "eval.num_samples: must be >= 0"),
    (["eval.every_steps=-2"], "eval.every_steps: must be >= 0"),
    (["eval.max_tokens=200"], r"eval.max_tokens: must be in \[1, rollout.max_model_len"),
    (["data.source=local", "data.path=x.jsonl"],
     "data.eval_fraction: data.path=x.jsonl is one split: hold rows out for evaluation with "
     "data.eval_fraction"),
    (["data.source=local", "data.path=x.jsonl", "data.eval_fraction=0.1",
      "data.eval_path=y.jsonl"], "data.eval_fraction: data.eval_path and data.eval_fraction"),
    (["data.eval_fraction=0.1"], "data.eval_fraction: data.source=synthetic has its own"),
    (["data.source=local", "data.path=x.jsonl", "data.eval_fraction=0.1", "eval.split=train"],
     "eval.split: eval.split=train evaluates on the training rows, data.eval_fraction holds"),
    (["data.source=local", "data.path=x.jsonl", "data.eval_fraction=1"],
     "data.eval_fraction: must be < 1"),
])
def test_config_refuses_bad_eval_settings(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/tiny-cpu.yaml", overrides)
    local = load_config("configs/tiny-cpu.yaml", ["data.source=local", "data.path=x.jsonl",
                                                  "eval.split=train"])
    assert local.eval.split == "train"
    # a directory of split files has its own test split: nothing to set
    assert load_config("configs/tiny-cpu.yaml", ["data.source=local", "data.path=data_dir"])
