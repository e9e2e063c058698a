"""`ray job submit` against a real local Ray head: the trainer joins the cluster through
RAY_ADDRESS, runs its steps there and writes its adapter."""
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A Ray head on loopback, in its own process group so the test can stop exactly it."""
    # Ray's token authentication, as on a real cluster: head and client share the token
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_ADDRESS": "",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    dash = free_port()
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=2", "--num-gpus=0",
         f"--port={free_port()}", "--node-ip-address=127.0.0.1", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--disable-usage-stats",
         f"--temp-dir={tmp_path_factory.mktemp('ray')}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while time.time() < deadline:
        # ready when a trivial job runs: the job agent starts after the dashboard answers
        ok = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", address, "--",
                             "python", "-c", "pass"], env=env, capture_output=True).returncode == 0
        if ok:
            break
        time.sleep(2)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
        pytest.fail("the local Ray head did not start within 120 s")
    yield address, env
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)


def test_ray_job_submit_runs_training(head, tiny_model_path, tmp_path):
    address, env = head
    out = tmp_path / "job-run"
    runtime_env = {"excludes": [".venv", ".git", "outputs", ".gpu", ".whl", "*.egg-info"]}
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT),
           "--runtime-env-json", json.dumps(runtime_env), "--",
           "grpo-ray", "train", "--config", "configs/tiny-cpu.yaml", f"output.dir={out}",
           f"model.path={tiny_model_path}", "algorithm.total_steps=1", "logging.tensorboard=false",
           "rollout.num_generations=2", "rollout.max_completion_length=8"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]
