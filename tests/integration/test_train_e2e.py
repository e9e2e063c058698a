"""The whole loop through a real local Ray: vLLM CPU engine, reward actors, PEFT learner.

The proof that training reaches the rollout side: after every step the engine's log-probability
of a fixed completion moves, and equals the learner's own (the engine holds the learner's adapter).
"""
import json
import math

import pytest
import ray

from grpo_ray.config import load_config
from grpo_ray.driver.trainer import Trainer


@pytest.fixture(scope="module")
def trainer(ray_local, tiny_model_path, tmp_path_factory):
    """Two steps of the loop, run once for the module; each test reads what they left
    (`t.history`, `t.follow`: the engine's and the learner's log-probs of a fixed completion
    before and after each step), so that any test runs alone."""
    out = tmp_path_factory.mktemp("run")
    cfg = load_config("configs/tiny-cpu.yaml", [f"output.dir={out}", f"model.path={tiny_model_path}",
                                                "algorithm.total_steps=2",
                                                "learner.learning_rate=5e-3",
                                                "learner.warmup_ratio=0",
                                                # a random model's samples all score 0 on the
                                                # recipe's rewards: add one they differ in
                                                "reward.functions=[{name: correctness}, "
                                                "{name: 'rewards_for_tests:text_length'}]"])
    lines: list[str] = []
    t = Trainer(cfg, print_fn=lines.append).setup()
    t.lines = lines
    try:
        engine, learner = t.engines.engines[0], t.learner.actor
        prompt, completion = fixed_sequence(t)
        t.follow = [(0, ray.get(engine.score.remote([prompt], [completion]))[0], None)]
        t.history = []
        for _ in (1, 2):
            t.history.append(t.run_step())
            t.follow.append((ray.get(engine.adapter_version.remote()),
                             ray.get(engine.score.remote([prompt], [completion]))[0],
                             ray.get(learner.sequence_logprobs.remote([prompt], [completion]))[0]))
        yield t
    finally:
        t.close()


def fixed_sequence(trainer):
    from grpo_ray.answer_format import chat_messages
    from grpo_ray.driver.data.prompts import load_tokenizer

    tok = load_tokenizer(trainer.model_path)
    prompt = tok.apply_chat_template(chat_messages("Tom has 3 apples and gets 4 more."),
                                     add_generation_prompt=True, tokenize=True)["input_ids"]
    completion = tok.encode("<reasoning>\n3 + 4 = 7\n</reasoning>\n<answer>\n7\n</answer>\n")
    return prompt, completion


def test_steps_move_the_engines_adapter(trainer):
    for step in (1, 2):
        version, after, mine = trainer.follow[step]
        before = trainer.follow[step - 1][1]
        assert version == step
        assert max(abs(a - b) for a, b in zip(after, before)) > 1e-4, "engine adapter unchanged"
        assert max(abs(a - b) for a, b in zip(after, mine)) < 2e-3, "engine != learner"

    history = trainer.history
    for m in history:
        for key in ["reward/mean", "reward/std", "reward/correctness/mean",
                    "reward/text_length/mean", "accuracy",
                    "format_rate", "completion_length", "learner/kl", "learner/clip_fraction",
                    "learner/loss", "learner/grad_norm", "learner/learning_rate",
                    "learner/gap_mean_abs_diff", "learner/gap_kl", "time/generate_s",
                    "time/reward_s", "time/update_s", "time/sync_s", "sync/total_s"]:
            assert key in m and math.isfinite(m[key]), key
    assert history[1]["learner/kl"] > 0  # the policy left the reference after one update
    assert history[0]["adapter_version"] == 1 and history[1]["adapter_version"] == 2


def test_logs_and_saved_adapter(trainer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = trainer.out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    samples = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert samples and {"question", "gold", "completion", "rewards", "total"} <= set(samples[0])
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert any("reward" in line and "acc" in line for line in trainer.lines)  # table header

    path = trainer.save_adapter(out / "adapter")
    base = AutoModelForCausalLM.from_pretrained(trainer.model_path)
    model = PeftModel.from_pretrained(base, str(path))
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())


def test_start_up_is_timed_by_part_and_said(trainer):
    parts = trainer.startup
    # the engine and the learner load models: each takes real time, both inside the whole
    assert parts["engines_s"] > 0.1 and parts["learner_s"] > 0.1, parts
    assert parts["probe_base_s"] > 0 and parts["placement_s"] >= 0, parts
    inside = parts["placement_s"] + max(parts["engines_s"], parts["learner_s"])
    assert inside + parts["probe_base_s"] <= parts["total_s"], parts
    assert parts["learner_after_engines"] == 0.0  # the cpu layout starts them together
    placed = next(line for line in trainer.lines if line.startswith("placed:"))
    assert placed.endswith(f"; up in {parts['total_s']:.0f} s: engines {parts['engines_s']:.0f} s "
                           f"beside the learner {parts['learner_s']:.0f} s; the sync probe's "
                           f"first scores {parts['probe_base_s']:.0f} s"), placed
