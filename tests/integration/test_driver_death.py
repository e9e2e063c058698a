"""The same `grpo-ray train` command run again after its run ended badly, on real processes:

- an error in an actor's own code (here a user reward that returns one score too few from step
  3 on) is a bug, not the user's input nor the machines: the last completed step is
  checkpointed, one line names the error and where its traceback was written, exit 1;
- an engine lost for good (`cluster.max_restarts=0`, its process SIGKILLed mid-run) is an
  infrastructure failure: exit 3, a checkpoint of the last completed step, and a line saying how
  many steps were lost (0); the same command then resumes from that checkpoint and finishes;
- (slow) the driver of a `ray job submit` job is SIGKILLed mid-step, without a checkpoint of the
  step in flight; the same job submitted again resumes from the newest checkpoint and ends with
  the adapter of an uninterrupted run.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from grpo_ray.driver.checkpoint import check_checkpoint, latest_checkpoint

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# a reward that differs within every group, so that every step moves the adapter (the tiny
# model's answers score 0 on the recipe's rewards); tests/ is on the workers' PYTHONPATH
REWARDS = "reward.functions=[{name: correctness}, {name: 'rewards_for_tests:text_length'}]"


def steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] \
        if path.is_file() else []


def wait_until(ready, what: str, log, bound_s: float = 300) -> None:
    deadline = time.monotonic() + bound_s
    while not ready():
        assert time.monotonic() < deadline, f"no {what} within {bound_s:g} s:\n{log()[-3000:]}"
        time.sleep(0.1)


def train_args(out: Path, model: str, total: int, *more: str) -> list[str]:
    return ["train", "--config", "configs/tiny-cpu.yaml", f"output.dir={out}",
            f"model.path={model}", f"algorithm.total_steps={total}", "output.save_every=1",
            "logging.tensorboard=false", "logging.progress_bar=false", "eval.num_samples=2",
            *more]


def start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
           "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "grpo_ray", *args], cwd=ROOT, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def adapter(out: Path) -> dict:
    return load_file(out / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def lost_engine_run(tiny_model_path, tmp_path_factory):
    """A 6-step run whose engine is SIGKILLed after step 2 with `cluster.max_restarts=0`, and
    no checkpoints on the way (save_every=0): the one it leaves is the failure's own."""
    tmp = tmp_path_factory.mktemp("lost-engine")
    out = tmp / "run"
    args = train_args(out, tiny_model_path, 6, "output.save_every=0", "cluster.max_restarts=0")
    log = tmp / "first.log"
    proc = start(args, log)
    wait_until(lambda: max(steps(out), default=0) >= 2 or proc.poll() is not None,
               "step 2", log.read_text)
    engine_log = next((out / "logs").glob("rollout-0-*.log"))  # <name>-<pid>.log
    os.kill(int(engine_log.stem.rsplit("-", 1)[1]), signal.SIGKILL)
    code = proc.wait(timeout=180)
    return out, args, code, log.read_text()


def test_an_engine_lost_for_good_exits_3_with_a_checkpoint(lost_engine_run):
    out, _, code, text = lost_engine_run
    assert code == 3, text[-3000:]
    checkpoint = latest_checkpoint(out / "checkpoints")
    check_checkpoint(checkpoint)
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["step"]
    # the step the kill interrupted is not complete; the ones before it are all in the checkpoint
    # (a step whose sync failed is complete but unlogged, hence the + 1)
    assert saved in (steps(out)[-1], steps(out)[-1] + 1) and saved < 6
    last = text.strip().splitlines()[-1]
    assert re.fullmatch(
        r"actor lost: rollout engine 0 lost during .*\(cluster\.max_restarts\); see the Ray "
        rf"logs of its node; 0 step\(s\) since the last checkpoint lost \(checkpoint of step "
        rf"{saved} in {re.escape(str(out / 'checkpoints'))}; the same command resumes from it\)",
        last), last
    assert "Traceback" not in text and f"checkpoint of step {saved} written to" in text


def test_an_error_in_an_actors_code_checkpoints_then_exits_1_with_its_traceback_in_a_file(
        tiny_model_path, tmp_path):
    out = tmp_path / "run"
    args = train_args(out, tiny_model_path, 4, "output.save_every=0",
                      "reward.functions=[{name: 'rewards_for_tests:wrong_count_from_third_call'}]")
    log = tmp_path / "run.log"
    code = start(args, log).wait(timeout=300)
    text = log.read_text()
    assert code == 1, text[-3000:]
    assert steps(out) == [1, 2]
    checkpoint = latest_checkpoint(out / "checkpoints")
    check_checkpoint(checkpoint)
    assert checkpoint.name == "step-000002"
    assert f"checkpoint of step 2 written to {checkpoint}" in text
    error_log = out / "logs" / "error.log"
    assert text.strip().splitlines()[-1] == (
        "error: ValueError: reward function 'wrong_count_from_third_call' returned 3 scores for "
        f"4 completions (an unexpected error: the traceback is in {error_log})")
    assert "Traceback" not in text and "Traceback" in error_log.read_text()


@pytest.mark.slow
def test_after_an_infrastructure_failure_the_same_command_resumes(lost_engine_run, tmp_path):
    out, args, code, _ = lost_engine_run
    assert code == 3
    checkpoint = latest_checkpoint(out / "checkpoints")
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["step"]
    log = tmp_path / "second.log"
    proc = start(args, log)  # the same command, unedited
    code = proc.wait(timeout=300)
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert (f"resuming from {checkpoint} (step {saved} of 6): {out / 'checkpoints'} holds a "
            "checkpoint of this config") in text
    assert steps(out) == list(range(1, 7))
    assert latest_checkpoint(out / "checkpoints").name == "step-000006"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    # stopped again in its final evaluation (after the adapter was written): the same command
    # runs that evaluation, trains nothing, and leaves the adapter as it was
    trained = adapter(out)
    rows = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert rows[-1]["tag"] == "after" and rows[-1]["step"] == 6
    (out / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]))
    log = tmp_path / "third.log"
    code = start(args, log).wait(timeout=300)
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert (f"resuming from {out / 'checkpoints' / 'step-000006'} (step 6 of 6): the final "
            "evaluation is missing: it runs now") in text
    again = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [(r["tag"], r["step"]) for r in again] == [(r["tag"], r["step"]) for r in rows]
    assert steps(out) == list(range(1, 7))
    for name, tensor in adapter(out).items():
        assert torch.equal(tensor, trained[name]), name


# ---- the driver of a Ray job killed, the job submitted again -----------------------------------
def submit(address: str, env: dict, out: Path, model: str, log: Path) -> subprocess.Popen:
    """`ray job submit` (it follows the job's log until the job ends) of a 6-step run."""
    runtime_env = {"excludes": [".venv", ".git", "outputs", ".gpu", ".whl", "*.egg-info"]}
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT),
           "--runtime-env-json", json.dumps(runtime_env), "--", "grpo-ray",
           *train_args(out, model, 6, "learner.learning_rate=5e-3", "learner.warmup_ratio=0",
                       REWARDS)]
    return subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def drivers_of(out: Path, client: subprocess.Popen) -> list:
    """The job's driver processes: the entrypoint (and the shell Ray may run it in), not the
    `ray job submit` client that follows its log."""
    import psutil

    return [p for p in psutil.process_iter(["cmdline"])
            if f"output.dir={out}" in (p.info["cmdline"] or []) and p.pid != client.pid]


@pytest.mark.slow
def test_a_killed_job_driver_resumes_when_the_same_job_is_submitted_again(
        head, tiny_model_path, tmp_path):
    address, env = head
    # the run to match: the same job, uninterrupted
    log = tmp_path / "a.log"
    a = submit(address, env, tmp_path / "a", tiny_model_path, log)
    assert a.wait(timeout=600) == 0, log.read_text()[-3000:]

    out, log = tmp_path / "b", tmp_path / "b1.log"
    job = submit(address, env, out, tiny_model_path, log)
    wait_until(lambda: max(steps(out), default=0) >= 3 or job.poll() is not None, "step 3",
               log.read_text, bound_s=600)
    drivers = drivers_of(out, job)
    assert drivers, "no driver process found"
    killed_at = time.monotonic()
    for p in drivers:  # the step in flight is never checkpointed
        p.send_signal(signal.SIGKILL)
    assert job.wait(timeout=300) != 0
    text = log.read_text()
    assert re.search(r"Job '\S+' failed", text), text[-3000:]
    before = steps(out)
    assert 3 <= before[-1] < 6, before
    checkpoint = latest_checkpoint(out / "checkpoints")
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["step"]
    assert saved <= before[-1]

    # the same job again, unedited
    log = tmp_path / "b2.log"
    job = submit(address, env, out, tiny_model_path, log)
    assert job.wait(timeout=600) == 0, log.read_text()[-3000:]
    recovered_s = time.monotonic() - killed_at
    text = log.read_text()
    assert f"resuming from {checkpoint} (step {saved} of 6)" in text, text[-3000:]
    assert "succeeded" in text
    assert steps(out) == list(range(1, 7))  # the rows after the checkpoint were logged again
    a_adapter, b_adapter = adapter(tmp_path / "a"), adapter(out)
    assert sorted(a_adapter) == sorted(b_adapter)
    assert any(t.abs().max() > 0 for n, t in a_adapter.items() if "lora_B" in n)
    for name, t in a_adapter.items():  # as `tests/driver/test_checkpoint.py` finds for a resume
        torch.testing.assert_close(b_adapter[name], t, rtol=0, atol=1e-6, msg=name)
    print(f"driver killed after step {before[-1]}, resumed from step {saved}; the resubmitted "
          f"job finished {recovered_s:.1f} s after the kill")
