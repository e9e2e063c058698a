"""The reward pool on a real local Ray: sharding, per-completion columns, totals, and faults:
functions that raise, hang or return NaN leave their rows unscored and counted; a worker killed
with SIGKILL (from outside, or in the middle of a call) is replaced and its shard scored again."""
from __future__ import annotations

import os
import signal
import sys

import pytest

from grpo_ray.answer_format import chat_messages
from grpo_ray.cluster.rewards import (RewardError, RewardPool, RewardWorker, build_reward_workers,
                                      reward_worker_starter, unscored_error)
from grpo_ray.config import RewardFunctionConfig as R
from grpo_ray.contracts import PromptBatch, Rollout, Scores
from grpo_ray.faults import ActorLostError
from grpo_ray.reward.registry import get_reward_functions

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
    if any("none" in c[0]["content"] for c in completions):
        return None
    return [0.0] * len(completions)

def hang(prompts, completions, **kwargs):
    if any("hang" in c[0]["content"] for c in completions):
        time.sleep(600)
    return [1.0] * len(completions)

def die(prompts, completions, **kwargs):
    """SIGKILLs its own worker process, once, when the test leaves the marker file."""
    import os, signal
    try:
        os.remove(os.environ["GRPO_RAY_TEST_DIE_MARKER"])
    except (KeyError, FileNotFoundError):
        return [float(len(c[0]["content"])) for c in completions]
    os.kill(os.getpid(), signal.SIGKILL)
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
    from grpo_ray.cluster.engines import even_slices  # engines and reward workers split alike

    assert even_slices(6, 2) == [(0, 3), (3, 6)]
    assert even_slices(5, 2) == [(0, 3), (3, 5)]
    assert even_slices(1, 2) == [(0, 1)]
    assert even_slices(0, 2) == []


def test_worker_is_a_plain_class(custom_path):
    worker = RewardWorker([R(f"{MODULE}:broken"), R(f"{MODULE}:broken")], "fixed")
    assert worker.names() == ["broken", "broken_2"]
    fine = worker.score([[]], ["fine"], {})
    assert (fine.per_function, fine.failed, fine.errors) == (
        {"broken": [0.0], "broken_2": [0.0]}, {}, {})
    # a function's failure is its rows' failure, counted, with the error and where it was raised
    boom = worker.score([[]] * 2, ["boom", "x"], {})
    assert boom.per_function == {"broken": [None, None], "broken_2": [None, None]}
    assert boom.failed == {"broken": 2, "broken_2": 2}
    line = CUSTOM.splitlines().index('        raise ZeroDivisionError("division by zero")') + 1
    assert boom.errors["broken"] == (f"raised ZeroDivisionError: division by zero at {MODULE}.py:"
                                     f"{line}")
    nan = worker.score([[]], ["nan"], {})
    assert nan.per_function["broken"] == [None] and nan.failed["broken"] == 1
    assert nan.errors["broken"] == "returned a non-finite score (nan)"
    nothing = worker.score([[]], ["none"], {})
    assert nothing.failed["broken"] == 1
    assert nothing.errors["broken"] == "returned None instead of a list of scores"
    skipped = worker.score([[]], ["fine"], {}, skip={"broken": "timed out"})
    assert skipped.per_function == {"broken": [None], "broken_2": [0.0]}
    assert skipped.errors == {"broken": "timed out"}
    # a wrong count or a value that is no number is a bug in the function: at once
    with pytest.raises(ValueError, match="reward function 'broken' returned 0 scores for 1"):
        worker.score([[]], ["short"], {})
    with pytest.raises(TypeError, match="reward function 'broken' returned 'x', not a number"):
        worker.score([[]], ["text"], {})
    with pytest.raises(ValueError, match="column 'answer' has 2 rows for 1 completions"):
        worker.score([[]], ["fine"], {"answer": ["1", "2"]})
    assert worker.running() == []


def test_unscored_error_names_the_functions():
    def scores(total, failed=None, errors=None):
        return Scores({"a": [1.0] * len(total), "b": list(total)}, total, failed or {},
                      errors or {})

    assert unscored_error(scores([1.0] * 4), 0.5) is None
    assert unscored_error(scores([None, None, 1.0, 1.0]), 0.5) is None  # at the limit
    assert unscored_error(scores([None] * 3 + [1.0]), 0.5) == (
        "3 of 4 completions unscored, more than reward.max_unscored_fraction=0.5: a, b returned "
        "None for them; raise the fraction if your functions leave rows unscored by design")
    # a function failing everywhere is named even when another one scored every row
    nan = "returned a non-finite score (nan)"
    assert unscored_error(scores([1.0] * 4, {"b": 4}, {"b": nan}), 0.5) == (
        "b failed on 4 of 4 completions (returned a non-finite score (nan)), more than "
        "reward.max_unscored_fraction=0.5")
    assert unscored_error(scores([1.0] * 4, {"b": 4}, {"b": "x"}), 1.0) is None


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


def test_hung_and_raising_functions_leave_their_rows_unscored(ray_local, custom_path):
    """A function hung past the timeout: its worker is killed and replaced, and its shard scored
    again without it. A raising function: its shard's rows unscored. Both counted."""
    functions = [R("xml_count"), R(f"{MODULE}:hang"), R(f"{MODULE}:broken")]
    env = {"env_vars": {"PYTHONPATH": custom_path}}
    workers = build_reward_workers(functions, "seed-parity", num_workers=2, num_cpus=0.5,
                                   runtime_env=env)
    lines: list[str] = []
    pool = RewardPool(workers, functions, timeout_s=2.0, notify=lines.append,
                      start=reward_worker_starter(functions, "seed-parity", 0.5, env))
    batch, rollout = make_step(["hang"] + ["x"] * 4 + ["boom"])
    first = workers[0]
    scores = pool.score(batch, rollout)
    assert scores.per_function["hang"] == [None] * 3 + [1.0] * 3
    assert scores.per_function["broken"] == [0.0] * 3 + [None] * 3
    assert scores.per_function["xml_count"] == direct_scores(
        [R("xml_count")], "seed-parity", batch, rollout)["xml_count"]  # the rescored shard too
    assert scores.failed == {"hang": 3, "broken": 3}
    assert scores.errors["hang"] == "timed out after 2 s (reward.timeout_s)"
    assert scores.errors["broken"].startswith("raised ZeroDivisionError: division by zero at ")
    assert pool.restarts == 1 and workers[0] is not first  # replaced in the placement's list
    assert lines[0].startswith(
        "reward worker 0 ran hang past reward.timeout_s=2 s; scoring its 3 completions again "
        "without hang: started again in ")
    assert lines[1:] == [
        "reward function 'hang' failed on 3 of 6 completions: timed out after 2 s "
        "(reward.timeout_s) (its rows are unscored; counted in reward/hang/failed, told once)",
        f"reward function 'broken' failed on 3 of 6 completions: {scores.errors['broken']} (its "
        "rows are unscored; counted in reward/broken/failed, told once)"]
    # told once; a step where half the rows fail one function is at the default limit, more
    # is an error that names the function
    pool.max_unscored_fraction = 0.5
    batch, rollout = make_step(["x"] * 5 + ["boom"])
    assert pool.score(batch, rollout).failed == {"broken": 3} and len(lines) == 3
    pool.max_unscored_fraction = 0.4
    with pytest.raises(RewardError, match=r"^broken failed on 3 of 6 completions \(raised "
                                          r"ZeroDivisionError.*more than "
                                          r"reward.max_unscored_fraction=0.4$"):
        pool.score(batch, rollout)
    with pytest.raises(ray_local.exceptions.RayActorError):  # the hung worker is gone
        ray_local.get(first.names.remote())
    for w in workers:
        ray_local.kill(w)


def test_killed_worker_is_replaced_and_its_shard_scored_again(ray_local, custom_path, tmp_path):
    """kill -9 of a worker's process between two steps, and in the middle of a call: both
    shards come back with the scores an undisturbed pool gives."""
    marker = tmp_path / "die"
    functions = [R("correctness"), R(f"{MODULE}:die")]
    env = {"env_vars": {"PYTHONPATH": custom_path, "GRPO_RAY_TEST_DIE_MARKER": str(marker)}}
    workers = build_reward_workers(functions, "fixed", num_workers=2, num_cpus=0.5,
                                   runtime_env=env)
    lines: list[str] = []
    pool = RewardPool(workers, functions, timeout_s=60, max_restarts=1, notify=lines.append,
                      start=reward_worker_starter(functions, "fixed", 0.5, env))
    batch, rollout = make_step(TEXTS)
    expected = pool.score(batch, rollout)
    assert expected.per_function["die"] == [float(len(t)) for t in TEXTS] and not expected.failed

    pid = ray_local.get(workers[1].__ray_call__.remote(lambda self: os.getpid()))
    os.kill(pid, signal.SIGKILL)  # between steps
    assert pool.score(batch, rollout) == expected
    marker.touch()  # the next call of `die` kills its own process, mid-call
    assert pool.score(batch, rollout) == expected and not marker.exists()
    assert pool.restarts == 2 and len(lines) == 2
    assert all(line.startswith("reward worker ") and " lost during scoring (ActorDiedError" in line
               and ": started again in " in line for line in lines)
    # a crash loop is bounded: the one restart of a call is spent, the next loss fails the step
    marker.touch()
    pool.max_restarts = 0
    with pytest.raises(ActorLostError, match=r"reward worker \d lost during scoring "
                                             r"\(ActorDiedError.*after 0 restart\(s\) in the "
                                             r"same call \(cluster.max_restarts\)"):
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
