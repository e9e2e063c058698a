"""A real Ray head with a job server, for the tests that submit jobs (`ray job submit`)."""
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

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_job_agent(address: str, token: str, head: subprocess.Popen, bound_s: float) -> str:
    """Poll the head until its job agent accepts a (no-op) job; '' when it does, else why not.
    The dashboard answers first and the agent registers later; on a loaded machine that took
    50 s to minutes, so the bound is generous and the poll cheap (one HTTP request)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        f"{address}/api/jobs/", data=json.dumps({"entrypoint": "true"}).encode(), method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    loopback = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy
    deadline, last = time.monotonic() + bound_s, "no answer"
    while time.monotonic() < deadline:
        if head.poll() is not None:
            return f"`ray start --head` exited with code {head.returncode}"
        try:
            with loopback.open(request, timeout=30) as response:
                if response.status == 200:
                    return ""
                last = f"HTTP {response.status}"
        except (urllib.error.URLError, OSError) as e:  # not listening yet, or no agent (503)
            last = str(e)
        time.sleep(2)
    return f"the job agent did not accept a job within {bound_s:g} s (last: {last})"


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A Ray head on loopback, in its own process group (the test can kill exactly it)."""
    # Ray's token authentication, as on a real cluster: head and client share the token
    token = secrets.token_hex(32)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_ADDRESS": "",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    dash = free_port()
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=2", "--num-gpus=0",
         f"--port={free_port()}", "--node-ip-address=127.0.0.1", "--include-dashboard=true",
         # its own agent port: the suite's local Ray, alive beside it, holds Ray's default one
         f"--dashboard-agent-listen-port={free_port()}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--disable-usage-stats",
         f"--temp-dir={tmp_path_factory.mktemp('ray')}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    not_ready = wait_for_job_agent(address, token, proc, bound_s=600)
    if not_ready:
        stop_head(proc)
        pytest.fail(not_ready)
    yield address, env
    stop_head(proc)


def stop_head(head: subprocess.Popen) -> None:
    """SIGTERM to `ray start --block` alone: it drains the node through the GCS, then stops its
    processes (2 s). A signal to the whole group kills the GCS first, and the drain waits 30 s
    for it. The group is killed only if that fails."""
    head.terminate()
    try:
        head.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)
