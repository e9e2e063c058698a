"""`ray job submit` against a real local Ray head (the `head` fixture, tests/integration/
conftest.py): the trainer joins the cluster through RAY_ADDRESS, runs its steps there and writes
its adapter."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


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
    # the job's log is the driver's own lines; the actors' output is under output.dir/logs
    assert "worker logs" in done.stdout and "step reward r_std" in done.stdout
    # joined through RAY_ADDRESS: tiny-cpu.yaml's cluster.num_cpus sizes only a local Ray
    assert ("joining the Ray cluster at RAY_ADDRESS=" in done.stdout
            and "(cluster.num_cpus=2: for a local Ray only" in done.stdout)
    assert "pid=" not in done.stdout and list((out / "logs").glob("rollout-0-*.log"))
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]
