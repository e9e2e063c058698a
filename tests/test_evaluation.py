"""Evaluation: hand-computed scores, greedy answers through a real rollout actor, the trainer's
before/after evaluation and sanity check, the saved adapter read back into an engine.

One trainer (one vLLM engine) serves the module; the tests that need its run ask for `fitted`.
`grpo-ray eval` runs in tests/test_export.py, on the merged model (that file's one engine).
"""
from __future__ import annotations

import json
import math

import pytest

from grpo_ray.contracts import Sampling
from grpo_ray.evaluation import (STOP, evaluate, format_side_by_side, reasoning_words,
                                 score_completions)

TEXTS = [
    # exact and numeric match, strict (ends right after </answer>) and soft format; 5 words
    "<reasoning>\n3 + 4 = 7\n</reasoning>\n<answer>\n7\n</answer>",
    # numeric match only ("$18.00" vs "18"); multi-line reasoning passes the fixed strict format
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
    assert m["accuracy_numeric"] == pytest.approx(3 / 5)    # rows 0, 1, 3
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
    table = format_side_by_side({"accuracy_numeric": 0.25, "strict_format": 0.0},
                                {"accuracy_numeric": 0.5, "strict_format": 0.125})
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "before", "after", "change"]
    assert lines[1].split() == ["accuracy", "(numeric)", "0.250", "0.500", "+0.250"]
    assert lines[2].split() == ["strict", "format", "0.000", "0.125", "+0.125"]
    assert len(lines) == 3


# ---- through Ray -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trainer(ray_local, tiny_model_path, tmp_path_factory):
    from grpo_ray.config import load_config
    from grpo_ray.trainer import Trainer

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
    for key in ["accuracy_exact", "accuracy_numeric", "strict_format", "soft_format",
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
    assert all(math.isfinite(r["accuracy_numeric"]) and r["num_samples"] == 5 for r in rows)
    # metrics.jsonl keeps one row per training step
    steps = [json.loads(line)["step"] for line in
             (trainer.out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]

    text = "\n".join(trainer.lines)
    assert "metric" in text and "accuracy (numeric)" in text and "change" in text
    assert "sanity check: \"How many r's are in strawberry?\"" in text
    assert "before training, adapter version 0 (base model)" in text
    assert "after training, adapter version 2 (trained adapter)" in text
    for tag in ("before", "after"):
        assert trainer.sanity_answers[tag] in text


def test_saved_adapter_read_back_answers_the_same(fitted):
    """`read_adapter` (what `grpo-ray eval --adapter` loads) gives the engine the adapter the
    trainer saved: the greedy answers equal those of the adapter the engine already holds."""
    import ray

    from grpo_ray.weight_sync.files import read_adapter

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
    (["data.source=local", "data.path=x.jsonl"], "eval.split: data.source=local has one split"),
])
def test_config_refuses_bad_eval_settings(overrides, message):
    from grpo_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config("configs/tiny-cpu.yaml", overrides)
    local = load_config("configs/tiny-cpu.yaml", ["data.source=local", "data.path=x.jsonl",
                                                  "eval.split=train"])
    assert local.eval.split == "train"
