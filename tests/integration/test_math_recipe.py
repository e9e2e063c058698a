"""The MATH-style recipe (configs/qwen2.5-3b-math.yaml) through the whole pipeline: a local JSONL
of problems with `\\boxed{}` solutions, read with its column mapping, the `math` reward on the
reward actors (math-verify in its child processes), two of TRL's reward functions by short name
(`trl:accuracy_reward` on the raw `solution` column, `trl:think_format_reward`), a vLLM CPU engine
and the PEFT learner, on the tiny model, for two steps."""
import json
import math

import pytest
from safetensors.torch import load_file

from grpo_ray.config import build_config, read_yaml
from grpo_ray.trainer import Trainer

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
    data["learner"].update(load_in_4bit=None, learning_rate=5e-3, warmup_ratio=0.0)
    data["reward"].update(num_workers=2, cpus_per_worker=0.25)
    # it rarely samples EOS within 32 tokens: with truncated completions masked, nothing would
    # be left to learn from (the masking itself is tested in tests/algo/test_masking.py)
    data["algorithm"].update(total_steps=2, mask_truncated_completions=False)
    data["eval"].update(num_samples=2)
    data["output"] = {"dir": str(tmp_path / "out")}
    return data


@pytest.fixture(scope="module")
def run(ray_local, tiny_model_path, tmp_path_factory):
    cfg = build_config(recipe_on_the_tiny_model(tmp_path_factory.mktemp("math"),
                                                tiny_model_path))
    lines: list[str] = []
    trainer = Trainer(cfg, print_fn=lines.append).setup()
    try:
        history = trainer.fit()
    finally:
        trainer.close()
    return trainer, history


def test_the_golds_come_out_of_the_boxes(run):
    trainer, _ = run
    assert sorted(r["gold"] for r in trainer.prompts.rows) == \
        sorted(["\\frac{3}{4}", "12", "3", "8", "0.75", "\\frac{3}{4}"])
    assert trainer.prompts.column_names == ["problem", "solution", "level"]


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
