"""The command line: instant help, and one line naming the culprit for what a user can fix."""
import json
import subprocess
import sys

import pytest

from grpo_ray.cli import main


def test_help_imports_nothing_heavy():
    code = ("import sys, grpo_ray.cli as t\n"
            "try:\n    t.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'vllm', 'ray', 'peft', 'transformers', 'bitsandbytes')"
            " if m in sys.modules]\nprint('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "usage: grpo-ray" in out.stdout and "HEAVY []" in out.stdout


def test_bad_config_is_one_line(capsys):
    assert main(["train", "--config", "configs/tiny-cpu.yaml", "rollout.num_generations=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("config error: rollout.num_generations: must be >= 2")
    assert "\n" not in err


def never_connect(*args, **kwargs):
    raise AssertionError("the command joined or started a Ray cluster")


def test_bad_data_row_is_one_line_before_ray_starts(tmp_path, tiny_model_path, capsys,
                                                     monkeypatch):
    import grpo_ray.cli

    monkeypatch.setattr(grpo_ray.cli, "connect_ray", never_connect)
    rows = [{"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"},
            {"question": "What is 3 + 3?", "answer": "six"}]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    code = main(["train", "--config", "configs/tiny-cpu.yaml", "data.source=local",
                 f"data.path={path}", "eval.split=train", f"model.path={tiny_model_path}",
                 f"output.dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after datasets' progress bars
    assert code == 2
    assert err == f"data error: data.path={path} line 2: column 'answer' has no '####' marker"
    assert not (tmp_path / "out").exists()  # bad input writes nothing


@pytest.mark.parametrize("overrides, message", [
    (["model.path=/nonexistent/model"], "model.path=/nonexistent/model: no such directory"),
    (["model.path=not a/valid repo id!"], "model.path=not a/valid repo id!: not a local directory"),
    (["model.path=builtin:giant"], "model.path=builtin:giant: unknown built-in model"),
    (["reward.functions=[{name: nopkg.nomodule:fn}]"], "reward.functions[0]: cannot import"),
])
def test_bad_paths_and_names_are_one_line_before_ray_starts(overrides, message, tmp_path, capsys,
                                                            monkeypatch):
    import grpo_ray.cli

    monkeypatch.setattr(grpo_ray.cli, "connect_ray", never_connect)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["train", "--config", "configs/tiny-cpu.yaml", f"output.dir={tmp_path / 'out'}",
                 *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and message in err, err
    assert not (tmp_path / "out").exists()



def test_unreachable_ray_address_fails_in_time_with_one_line(tmp_path, tiny_model_path):
    """RAY_ADDRESS naming a loopback port nobody listens on: exit 2 within
    cluster.placement_timeout_s, one line naming the address as given, nothing written."""
    import os
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"  # free once the socket closes
    out = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": address}
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "grpo_ray", "train", "--config", "configs/tiny-cpu.yaml",
         f"model.path={tiny_model_path}", f"output.dir={out}", "cluster.placement_timeout_s=3"],
        env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - start
    err = done.stderr.strip().splitlines()[-1]  # after datasets' progress bars, if any
    assert done.returncode == 2, done.stderr[-2000:]
    assert err.startswith(f"cluster error: cannot reach the Ray cluster at RAY_ADDRESS={address}")
    assert "cluster.placement_timeout_s=3" in err
    assert "Ray" not in done.stdout and "\n" not in done.stdout.strip()
    assert not out.exists()
    # 3 s of probing after the config, data and tokenizer load (seconds on a busy machine);
    # Ray's own retries took over 10 minutes
    assert elapsed < 3 + 90, elapsed


def test_head_endpoint_of_ray_addresses():
    from grpo_ray.cli import head_endpoint

    assert head_endpoint("10.0.0.1:6379") == ("10.0.0.1", 6379)
    assert head_endpoint("ray://head.example:10001") == ("head.example", 10001)
    assert head_endpoint("[::1]:6379") == ("::1", 6379)
    assert head_endpoint("auto") is None and head_endpoint("local") is None
