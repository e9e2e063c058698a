"""The reward pool on a real local Ray: sharding, per-completion columns, totals, timeouts."""
from __future__ import annotations

import sys

import pytest

from grpo_ray.config import RewardFunctionConfig as R
from grpo_ray.contracts import PromptBatch, Rollout
from grpo_ray.data.prompts import chat_messages
from grpo_ray.reward.functions import get_reward_functions
from grpo_ray.reward.pool import RewardPool, RewardWorker, _shards, build_reward_workers

MODULE = "grpo_ray_pool_test_rewards"
CUSTOM = '''
import time

def columns_check(prompts, completions, answer, question, completion_ids, **kwargs):
    """Proves each row got its own prompt's columns: 10 x matching question + answer + ids."""
    return [10.0 * (p[-1]["content"] == q) + float(a) + len(ids)
            for p, q, a, ids in zip(prompts, question, answer, completion_ids)]

def level_check(prompts, completions, level, source=None, **kwargs):
    """A TRL-style function reading extra dataset columns as keyword arguments."""
    return [float(lv) + (0.5 if s == "book" else 0.0) for lv, s in zip(level, source)]

def unsure(prompts, completions, **kwargs):
    return [None if "?" in c[0]["content"] else 0.25 for c in completions]

def slow(prompts, completions, **kwargs):
    if any("sleep" in c[0]["content"] for c in completions):
        time.sleep(3)
    return [0.0] * len(completions)

def broken(prompts, completions, **kwargs):
    if any("boom" in c[0]["content"] for c in completions):
        raise ZeroDivisionError("division by zero")
    if any("short" in c[0]["content"] for c in completions):
        return []
    if any("nan" in c[0]["content"] for c in completions):
        return [float("nan")] * len(completions)
    if any("text" in c[0]["content"] for c in completions):
        return ["x"] * len(completions)
    return [0.0] * len(completions)
'''

PERFECT = "<reasoning>\n{r}\n</reasoning>\n<answer>\n{a}\n</answer>\n"
TEXTS = [PERFECT.format(r="9 + 9 = 18", a=18),
         "<reasoning>\nstep\nstep\n</reasoning>\n<answer>\n$18\n</answer>",
         "18?",
         PERFECT.format(r="2 * 3 = 6", a=6),
         "<answer>\n7\n</answer>",
         PERFECT.format(r="r", a="6.0") + "tail"]
BUILTINS = [R("xml_count"), R("soft_format"), R("strict_format"), R("integer"),
            R("correctness", 2.0)]


@pytest.fixture(scope="module")
def custom_path(tmp_path_factory):
    """A module of custom rewards, importable by the driver and (through PYTHONPATH) workers."""
    path = tmp_path_factory.mktemp("custom-rewards")
    (path / f"{MODULE}.py").write_text(CUSTOM)
    sys.path.insert(0, str(path))
    yield str(path)
    sys.path.remove(str(path))
    sys.modules.pop(MODULE, None)


def make_step(texts: list[str]) -> tuple[PromptBatch, Rollout]:
    """P=2 prompts, n=3 completions each."""
    questions = ["What is 9 + 9?", "What is 2 * 3?"]
    batch = PromptBatch(prompt_ids=[[1, 2], [3]], prompts=[chat_messages(q) for q in questions],
                        answers=["18", "6"], questions=questions,
                        columns={"level": [3, 5], "source": ["book", None]})
    n = len(texts)
    rollout = Rollout(prompt_index=[0, 0, 0, 1, 1, 1], prompt_ids=[[1, 2]] * 3 + [[3]] * 3,
                      completion_ids=[[7] * (k + 1) for k in range(n)], completion_texts=texts,
                      sampling_logprobs=[[-0.5] * (k + 1) for k in range(n)],
                      finish_reasons=["stop"] * n, adapter_version=0)
    return batch, rollout


def direct_scores(functions: list[R], mode: str, batch: PromptBatch,
                  rollout: Rollout) -> dict[str, list]:
    """The functions called in this process on all rows at once."""
    rows = rollout.prompt_index
    completions = [[{"role": "assistant", "content": t}] for t in rollout.completion_texts]
    return {name: fn([batch.prompts[i] for i in rows], completions,
                     **{k: [v[i] for i in rows] for k, v in batch.columns.items()},
                     answer=[batch.answers[i] for i in rows],
                     question=[batch.questions[i] for i in rows],
                     completion_ids=rollout.completion_ids)
            for name, fn, _ in get_reward_functions(functions, mode)}


def test_shards_are_contiguous_and_balanced():
    assert _shards(6, 2) == [(0, 3), (3, 6)]
    assert _shards(5, 2) == [(0, 3), (3, 5)]
    assert _shards(1, 2) == [(0, 1)]
    assert _shards(0, 2) == []


def test_worker_is_a_plain_class(custom_path):
    worker = RewardWorker([R(f"{MODULE}:broken"), R(f"{MODULE}:broken")], "fixed")
    assert worker.names() == ["broken", "broken_2"]
    assert worker.score([[]], ["fine"], {}) == {"broken": [0.0], "broken_2": [0.0]}
    with pytest.raises(RuntimeError, match="reward function 'broken' failed: "
                                           "ZeroDivisionError: division by zero"):
        worker.score([[]], ["boom"], {})
    with pytest.raises(ValueError, match="reward function 'broken' returned 0 scores for 1"):
        worker.score([[]], ["short"], {})
    assert worker.score([[]], ["nan"], {}) == {"broken": [None], "broken_2": [None]}
    with pytest.raises(TypeError, match="reward function 'broken' returned 'x', not a number"):
        worker.score([[]], ["text"], {})
    with pytest.raises(ValueError, match="column 'answer' has 2 rows for 1 completions"):
        worker.score([[]], ["fine"], {"answer": ["1", "2"]})
    assert worker.running() == []


def test_pool_scores_equal_direct_calls(ray_local, custom_path):
    functions = BUILTINS + [R(f"{MODULE}:columns_check", 0.5), R(f"{MODULE}:unsure"),
                            R(f"{MODULE}:level_check", 0.0)]
    workers = build_reward_workers(functions, "fixed", num_workers=2, num_cpus=0.5,
                                   runtime_env={"env_vars": {"PYTHONPATH": custom_path}})
    batch, rollout = make_step(TEXTS)
    scores = RewardPool(workers, functions, timeout_s=60).score(batch, rollout)

    pool = RewardPool(workers, functions, timeout_s=60)
    with pytest.raises(ValueError, match="rollout of 6 completions .* a batch of 1 prompts"):
        pool.score(PromptBatch(batch.prompt_ids[:1], batch.prompts[:1], batch.answers[:1],
                               batch.questions[:1]), rollout)
    assert scores.per_function == direct_scores(functions, "fixed", batch, rollout)
    by_name = scores.per_function
    assert by_name["correctness"] == [2.0, 2.0, 0.0, 2.0, 0.0, 2.0]
    assert by_name["strict_format"] == [0.5, 0.5, 0.0, 0.5, 0.0, 0.0]
    # 10 (own question) + gold answer + number of completion ids (row k has k + 1)
    assert by_name["columns_check"] == [29.0, 30.0, 31.0, 20.0, 21.0, 22.0]
    assert by_name["unsure"] == [0.25, 0.25, None, 0.25, 0.25, 0.25]
    # each completion got its own prompt's extra dataset columns
    assert by_name["level_check"] == [3.5, 3.5, 3.5, 5.0, 5.0, 5.0]
    # Row 0: xml 0.5 + soft 0.5 + strict 0.5 + int 0.5 + 2 x 2.0 + 0.5 x 29 + 0.25
    assert scores.total[0] == pytest.approx(2.0 + 4.0 + 14.5 + 0.25)
    weights = [f.weight for f in functions]
    for i in range(6):  # as TRL: a None is left out of the sum (row 2 has no `unsure` term)
        expected = sum(w * col[i] for w, col in zip(weights, by_name.values()) if col[i] is not None)
        assert scores.total[i] == pytest.approx(expected)
    assert scores.total[2] is not None
    only_unsure = [R(f"{MODULE}:unsure")]
    solo = build_reward_workers(only_unsure, "fixed", num_workers=1, num_cpus=0.5,
                                runtime_env={"env_vars": {"PYTHONPATH": custom_path}})
    alone = RewardPool(solo, only_unsure, timeout_s=60)
    assert alone.score(batch, rollout).total[2] is None  # no function scored row 2
    ray_local.kill(solo[0])
    for w in workers:
        ray_local.kill(w)


def test_pool_timeout_and_failures_name_the_function(ray_local, custom_path):
    functions = [R("xml_count"), R(f"{MODULE}:slow"), R(f"{MODULE}:broken")]
    workers = build_reward_workers(functions, "seed-parity", num_workers=2, num_cpus=0.5,
                                   runtime_env={"env_vars": {"PYTHONPATH": custom_path}})
    pool = RewardPool(workers, functions, timeout_s=1.0)
    batch, rollout = make_step(["sleep"] + ["x"] * 5)
    with pytest.raises(TimeoutError, match=r"reward pool: scoring 6 completions took longer than "
                                           r"reward.timeout_s=1 s \(still running: slow\)"):
        pool.score(batch, rollout)
    batch, rollout = make_step(["x"] * 5 + ["boom"])
    with pytest.raises(RuntimeError, match="reward function 'broken' failed: ZeroDivisionError"):
        pool.score(batch, rollout)
    for w in workers:
        ray_local.kill(w)


def test_bad_import_fails_before_any_actor_starts(ray_local):
    with pytest.raises(ValueError, match=r"reward.functions\[1\]: cannot import 'x.y:z'"):
        build_reward_workers([R("xml_count"), R("x.y:z")], "fixed", 2, 0.5)


def test_trl_reward_functions_run_unchanged_in_the_pool(ray_local, custom_path):
    """TRL's own functions by import path, on the reward actors (called from their threads),
    with the dataset's `solution` column, beside a user's function reading extra columns."""
    from trl.rewards import accuracy_reward, think_format_reward

    functions = [R("trl.rewards:accuracy_reward"), R("trl.rewards:think_format_reward"),
                 R(f"{MODULE}:level_check"), R("math")]
    workers = build_reward_workers(functions, "fixed", num_workers=2, num_cpus=0.5,
                                   runtime_env={"env_vars": {"PYTHONPATH": custom_path}})
    batch, rollout = make_step([
        "<think>\nhalf of 3/2\n</think>\nSo \\boxed{\\frac{3}{4}}.",
        "<think>\nguess\n</think>\n\\boxed{0.75}",
        "\\boxed{\\frac{1}{2}}",
        "<think>\n2 * 3\n</think>\n<answer>\n6\n</answer>",
        "<think>\nno</think> \\boxed{5}",
        "<think><think></think>\\boxed{6}"])
    batch.columns["solution"] = ["$\\frac{3}{4}$", "$6$"]
    scores = RewardPool(workers, functions, timeout_s=60).score(batch, rollout)
    by_name = scores.per_function
    assert by_name["accuracy_reward"] == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert by_name["think_format_reward"] == [1.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    assert by_name["level_check"] == [3.5, 3.5, 3.5, 5.0, 5.0, 5.0]
    # the built-in reads the gold ("18", "6") and the <answer> block before any box
    assert by_name["math"] == [0.0, 0.0, 0.0, 2.0, 0.0, 2.0]
    # the same functions called here, unchanged, give the same scores
    completions = [[{"role": "assistant", "content": t}] for t in rollout.completion_texts]
    solutions = [batch.columns["solution"][i] for i in rollout.prompt_index]
    assert accuracy_reward(completions, solutions) == by_name["accuracy_reward"]
    assert think_format_reward(completions) == by_name["think_format_reward"]
    for w in workers:
        ray_local.kill(w)
