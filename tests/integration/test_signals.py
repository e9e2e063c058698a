"""`grpo-ray train` as a user runs it, stopped by a signal: SIGTERM (what `ray job stop` sends)
and Ctrl-C (SIGINT to the whole process group, as a terminal sends it) each stop the run after
the step in flight with a checkpoint, one line with the resume command, the shell's exit code
(143, 130) and no traceback. In between, the newest checkpoint is damaged: `--resume` names the
file and resumes from the one before."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from grpo_ray.driver.checkpoint import check_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def start(args: list[str], log: Path) -> subprocess.Popen:
    """The CLI in its own process group (a terminal's job), output to `log`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "grpo_ray", *args], cwd=ROOT, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] \
        if path.is_file() else []


def wait_for_step(proc: subprocess.Popen, out: Path, step: int, log: Path) -> None:
    deadline = time.time() + 300
    while max(steps(out), default=0) < step:
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)


def stop(proc: subprocess.Popen, log: Path, send) -> tuple[int, str]:
    send()
    code = proc.wait(timeout=180)
    return code, log.read_text()


def test_signals_stop_after_the_step_with_a_checkpoint(tiny_model_path, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--config", "configs/tiny-cpu.yaml", f"output.dir={out}",
            f"model.path={tiny_model_path}", "algorithm.total_steps=50", "output.save_every=1",
            "logging.tensorboard=false", "logging.progress_bar=false", "eval.num_samples=2"]
    log = tmp_path / "first.log"
    proc = start(args, log)
    wait_for_step(proc, out, 2, log)
    code, text = stop(proc, log, lambda: os.kill(proc.pid, signal.SIGTERM))
    assert code == 143, text[-3000:]
    last = text.strip().splitlines()[-1]
    step = steps(out)[-1]
    checkpoint = out / "checkpoints" / f"step-{step:06d}"
    resume = shlex.join(["grpo-ray", *args, "--resume"])
    assert last == (f"interrupted at step {step}: checkpoint written to {checkpoint}; resume "
                    f"with: {resume}")
    assert "Traceback" not in text and "SIGTERM received: stopping after the step" in text
    assert steps(out) == list(range(1, step + 1))
    check_checkpoint(checkpoint)

    # damage the newest checkpoint, then resume with the printed command
    with open(checkpoint / "learner.pt", "r+b") as f:
        f.truncate(1000)
    log = tmp_path / "second.log"
    proc = start(shlex.split(last.split("resume with: ")[1])[1:], log)
    wait_for_step(proc, out, step + 1, log)
    # Ctrl-C in a terminal: SIGINT to every process of the job
    code, text = stop(proc, log, lambda: os.killpg(proc.pid, signal.SIGINT))
    assert code == 130, text[-3000:]
    assert text.startswith(f"warning: skipping a damaged checkpoint: {checkpoint}/learner.pt: "
                           "1000 bytes, the manifest says ")
    assert f"resuming from step-{step - 1:06d}" in text.splitlines()[0]
    assert f"resumed from {out / 'checkpoints' / f'step-{step - 1:06d}'}" in text
    resumed = steps(out)[-1]
    assert text.strip().splitlines()[-1] == (
        f"interrupted at step {resumed}: checkpoint written to "
        f"{out / 'checkpoints' / f'step-{resumed:06d}'}; resume with: {resume}")
    assert "Traceback" not in text and "SIGINT received" in text
    assert steps(out) == list(range(1, resumed + 1))  # the damaged step was trained again
    check_checkpoint(out / "checkpoints" / f"step-{resumed:06d}")
