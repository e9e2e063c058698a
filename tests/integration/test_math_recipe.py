"""The MATH-style recipe (configs/qwen2.5-3b-math.yaml) through the whole pipeline: a local JSONL
of problems with `\\boxed{}` solutions, read with its column mapping, the `math` reward on the
reward actors (math-verify in its child processes), two of TRL's reward functions by short name
(`trl:accuracy_reward` on the raw `solution` column, `trl:think_format_reward`), a vLLM CPU engine
and the PEFT learner, on the tiny model, for two steps; evaluated before and after on rows held
out of the file (`data.eval_fraction`), judged by math-verify: accuracy, pass@4 and maj@4."""
import json
import math

import pytest
from safetensors.torch import load_file

from grpo_ray.config import build_config, read_yaml
from grpo_ray.driver.trainer import Trainer

ROWS = [
    {"problem": "What is 1/2 + 1/4?", "solution": "1/2 + 1/4 = \\boxed{\\frac{3}{4}}", "level": 1},
    {"problem": "What is 3 * 4?", "solution": "3 * 4 = \\boxed{12}", "level": 1},
    {"problem": "Solve x + 2 = 5.", "solution": "x = 5 - 2 = \\boxed{3}", "level": 2},
    {"problem": "What is 2^3?", "solution": "$2^3 = \\boxed{8}$", "level": 1},
    {"problem": "What is 0.5 + 0.25?", "solution": "\\boxed{0.75}", "level": 2},
    {"problem": "What is 6/8 reduced?", "solution": "6/8 = \\boxed{\\frac{3}{4}}", "level": 3},
]


def recipe_on_the_tiny_model(tmp_path, tiny_model_path) -> dict:
    """The recipe's data, reward and algorithm sections with tiny-cpu.yaml's sizes."""
    data = read_yaml("configs/qwen2.5-3b-math.yaml")
    for section, values in read_yaml("configs/tiny-cpu.yaml").items():
        data[section] = {**data.get(section, {}), **values}
    path = tmp_path / "math_train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    limit = data["rollout"]["max_completion_length"]
    for f in data["reward"]["functions"]:
        if f["name"] == "overlong":
            f["kwargs"] = {"max_completion_len": limit, "soft_punish_cache": limit // 2}
    # TRL's own, by short name, as a TRL user would add them
    data["reward"]["functions"] += [{"name": "trl:accuracy_reward", "weight": 0.5},
                                    {"name": "trl:think_format_reward"}]
    # a random model's samples all score 0 on the recipe's rewards: add one they differ in
    data["reward"]["functions"].append({"name": "rewards_for_tests:text_length"})
    data["model"]["path"] = tiny_model_path
    data["data"]["path"] = str(path)
    del data["data"]["num_synthetic"]  # tiny-cpu's, for synthetic rows: refused beside a file
    data["learner"].update(load_in_4bit=None, learning_rate=5e-3, warmup_ratio=0.0)
    data["reward"].update(num_workers=2, cpus_per_worker=0.25)
    # it rarely samples EOS within 32 tokens: with truncated completions masked, nothing would
    # be left to learn from (the masking itself is tested in tests/algo/test_masking.py)
    data["algorithm"].update(total_steps=2, mask_truncated_completions=False)
    # 2 of the 6 problems held out (the recipe's 5% would hold out one); 4 samples each
    data["data"]["eval_fraction"] = 0.34
    data["eval"].update(num_samples=2)
    data["output"] = {"dir": str(tmp_path / "out")}
    return data


@pytest.fixture(scope="module")
def run(ray_local, tiny_model_path, tmp_path_factory):
    cfg = build_config(recipe_on_the_tiny_model(tmp_path_factory.mktemp("math"),
                                                tiny_model_path))
    lines: list[str] = []
    trainer = Trainer(cfg, print_fn=lines.append).setup()
    trainer.lines = lines
    try:
        history = trainer.fit()
    finally:
        trainer.close()
    return trainer, history


def test_the_golds_come_out_of_the_boxes(run):
    trainer, _ = run
    held_out, _ = trainer.eval_prompts
    assert sorted([r["gold"] for r in trainer.prompts.rows] + held_out.answers) == \
        sorted(["\\frac{3}{4}", "12", "3", "8", "0.75", "\\frac{3}{4}"])
    assert trainer.prompts.column_names == ["problem", "solution", "level"]


def test_evaluation_on_held_out_rows_by_math_verify(run):
    trainer, history = run
    held_out, _ = trainer.eval_prompts
    train = {r["question"] for r in trainer.prompts.rows}
    # 2 of the 6 problems held out; training never saw them (nor sampled them)
    assert len(held_out) == 2 and len(train) == 4 and not set(held_out.questions) & train
    samples = [json.loads(line) for line in
               (trainer.out / "completions.jsonl").read_text().splitlines()]
    assert {s["question"] for s in samples} <= train
    assert held_out.source.startswith("2 of 6 rows of data.path=")

    assert trainer.judge.label == "math-verify (reward 'math')"
    rows = [json.loads(line) for line in (trainer.out / "eval.jsonl").read_text().splitlines()]
    assert [r["tag"] for r in rows] == ["before", "after"]
    for row in rows:
        assert row["judge"] == trainer.judge.label and row["held_out"] == held_out.source
        r = row["metrics"]
        assert r["num_samples"] == 2 and r["num_completions"] == 8 and r["samples_per_prompt"] == 4
        assert 0 <= r["maj@k"] <= r["pass@k"] <= 1 and r["accuracy"] <= r["pass@k"]
        assert r["accuracy"] == r["mean@k"]
        assert [s["question"] for s in row["samples"][::4]] == held_out.questions
    text = "\n".join(trainer.lines)
    assert "judged by math-verify (reward 'math')" in text
    assert "accuracy (mean@4)" in text and "pass@4" in text and "maj@4" in text

    # the run's judge is math-verify: the gold written another way (in $...$) is right, twice
    # of three samples of each held-out problem (the numeric rule misses LaTeX golds so written)
    texts = [f"<answer>\n${g}$\n</answer>" for g in held_out.answers for _ in range(3)]
    texts[1] = texts[4] = "<answer>\n-1\n</answer>"
    from grpo_ray.driver.judge import judge_completions

    judged = judge_completions(trainer.judge, held_out, [0, 0, 0, 1, 1, 1], texts)
    assert (judged["accuracy"], judged["pass@k"], judged["maj@k"]) == \
        (pytest.approx(2 / 3), 1.0, 1.0)
    # the step accuracy is the math reward's share of right answers (2.0 each, none unscored)
    for m in history:
        assert m["accuracy"] == pytest.approx(m["reward/math/mean"] / 2)


def test_two_steps_with_the_math_reward(run):
    trainer, history = run
    assert [int(m["adapter_version"]) for m in history] == [1, 2]
    for m in history:
        # math-verify scored the completions (the mean of none would be NaN); none left out
        assert m["unscored_rate"] == 0.0
        for key in ("reward/math/mean", "reward/overlong/mean", "reward/accuracy_reward/mean",
                    "reward/think_format_reward/mean", "learner/loss", "learner/grad_norm",
                    "learner/kl"):
            assert math.isfinite(m[key]), key
    samples = [json.loads(line) for line in
               (trainer.out / "completions.jsonl").read_text().splitlines()]
    assert samples and all(s["rewards"]["math"] in (0.0, 2.0) for s in samples)
    # TRL's functions scored every sample (every gold parses): 0 or 1 each, none left unscored
    assert all(s["rewards"]["accuracy_reward"] in (0.0, 1.0) and
               s["rewards"]["think_format_reward"] in (0.0, 1.0) for s in samples)
    assert {s["gold"] for s in samples} <= {"\\frac{3}{4}", "12", "3", "8", "0.75"}


def test_the_adapter_learned(run):
    trainer, history = run
    assert history[1]["learner/kl"] > 0  # the policy left the reference after one update
    tensors = load_file(str(trainer.out / "adapter" / "adapter_model.safetensors"))
    lora_b = [t for name, t in tensors.items() if "lora_B" in name]
    assert lora_b and any(t.abs().sum() > 0 for t in lora_b)  # PEFT starts B at zero
