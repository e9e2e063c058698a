"""Where the actors' output goes: the setup hook a worker process runs when it starts."""
import os
import subprocess
import sys

from grpo_ray.logs import LOG_DIR_ENV, actor_env_vars, worker_logs_in

# a worker process: the hook runs first, then Python, C-level and child-process output
WORKER = ("import os, sys\nfrom grpo_ray.logs import redirect_output\nredirect_output()\n"
          "print('from python')\nprint('to stderr', file=sys.stderr)\n"
          "os.system('echo from a child process')\n")


def run_worker(env_vars: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WORKER], env={**os.environ, **env_vars},
                          capture_output=True, text=True, timeout=60)


def test_actor_output_goes_to_its_file_in_the_log_dir(tmp_path):
    with worker_logs_in(tmp_path / "logs") as log_dir:
        env = actor_env_vars({"TOKENIZERS_PARALLELISM": "false"}, "rollout-0")
    assert LOG_DIR_ENV not in os.environ  # the driver's setting ends with the block
    assert env["TOKENIZERS_PARALLELISM"] == "false" and env[LOG_DIR_ENV] == str(log_dir)
    done = run_worker(env)
    assert done.returncode == 0 and done.stdout == done.stderr == ""
    (path,) = log_dir.iterdir()
    assert path.name.startswith("rollout-0-") and path.suffix == ".log"
    assert path.read_text().splitlines() == ["from python", "to stderr",
                                             "from a child process"]


def test_without_the_dir_on_this_node_or_a_chosen_dir_output_stays(tmp_path):
    env = actor_env_vars({}, "learner")
    assert env == {}  # no directory chosen (--verbose, or tests that place actors directly)
    with worker_logs_in(tmp_path / "logs"):
        env = actor_env_vars({}, "learner")
    env[LOG_DIR_ENV] = str(tmp_path / "elsewhere")  # another node: the driver's dir is absent
    done = run_worker(env)
    assert "from python" in done.stdout and "to stderr" in done.stderr
    assert not (tmp_path / "elsewhere").exists()
