"""Where the actors' own output goes (vLLM, transformers, Ray's worker messages).

By default the console holds only the driver's lines: the command line picks
`<output.dir>/logs/`, every actor's process writes its stdout and stderr to
`<name>-<pid>.log` there, and Ray forwards nothing to the driver. With `--verbose` the command
line picks no directory and Ray forwards worker output as usual (`(RolloutWorker pid=...) ...`).

The redirection is Ray's worker setup hook: a function Ray runs in a new worker process before
it imports the actor's class, so import-time messages land in the file too. Ray honours the
`worker_process_setup_hook` key only in a job's runtime_env (and a job started by
`ray job submit` has its own; in an actor's it is ignored), so each actor gets the environment
variable that key turns into (`internals.ray_setup_hook_env`, Ray's private name).
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

LOG_DIR_ENV = "GRPO_RAY_WORKER_LOG_DIR"
"""The directory the driver chose for worker logs; unset: Ray's own behaviour."""
LOG_NAME_ENV = "GRPO_RAY_WORKER_LOG_NAME"


@contextmanager
def worker_logs_in(log_dir: str | Path) -> Iterator[Path]:
    """Actors placed inside the block write their output under `log_dir` (created here; its
    absolute path is yielded, since workers do not share the driver's working directory)."""
    path = Path(log_dir).absolute()
    path.mkdir(parents=True, exist_ok=True)
    before = os.environ.get(LOG_DIR_ENV)
    os.environ[LOG_DIR_ENV] = str(path)
    try:
        yield path
    finally:
        if before is None:
            os.environ.pop(LOG_DIR_ENV, None)
        else:
            os.environ[LOG_DIR_ENV] = before


def worker_logs(out_dir, verbose: bool):
    """Where the actors placed inside the block send their output: `<out_dir>/logs/` (one line
    says so), or with `verbose` the console, through Ray."""
    if verbose:
        return nullcontext()
    log_dir = Path(out_dir) / "logs"
    print(f"worker logs (vLLM, transformers, Ray): {log_dir.absolute()}/ "
          "(--verbose prints them here)")
    return worker_logs_in(log_dir)


def actor_env_vars(env_vars: dict[str, str], name: str) -> dict[str, str]:
    """`env_vars` for an actor's runtime_env, plus the redirection of its output to
    `<dir>/<name>-<pid>.log` inside `worker_logs_in`."""
    log_dir = os.environ.get(LOG_DIR_ENV)
    if not log_dir:
        return dict(env_vars)
    from grpo_ray.internals import ray_setup_hook_env

    return {**env_vars, LOG_DIR_ENV: log_dir, LOG_NAME_ENV: name,
            **ray_setup_hook_env(f"{__name__}.redirect_output")}


def redirect_output() -> None:
    """Ray's setup hook in an actor's process: file descriptors 1 and 2 (so C++ and child
    process output too) to `<dir>/<name>-<pid>.log`, when `<dir>` exists on this node.

    A node that does not see the driver's output directory keeps the output in Ray's own worker
    logs of that node (`/tmp/ray/session_latest/logs`): creating the directory there would
    leave the file where nobody looks. Never raises: a failing hook stops the worker."""
    log_dir, name = os.environ.get(LOG_DIR_ENV), os.environ.get(LOG_NAME_ENV, "worker")
    if not log_dir or not os.path.isdir(log_dir):
        return
    try:
        fd = os.open(os.path.join(log_dir, f"{name}-{os.getpid()}.log"),
                     os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError:
        return
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    for stream in (sys.stdout, sys.stderr):
        # a file is block-buffered: lines would reach it late, and not at all on a crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
