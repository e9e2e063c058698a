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
    from grpo_ray.cluster.connect import head_endpoint

    assert head_endpoint("10.0.0.1:6379") == ("10.0.0.1", 6379)
    assert head_endpoint("ray://head.example:10001") == ("head.example", 10001)
    assert head_endpoint("[::1]:6379") == ("::1", 6379)
    assert head_endpoint("auto") is None and head_endpoint("local") is None


# ---- the same command run again: resume, refuse or say it is done ------------------------------
def checkpoint_of(out, step: int, argv: list[str]):
    """A checkpoint of step `step` under `out` recording the config `argv` (train's) runs with."""
    import torch

    from grpo_ray.cli import parser
    from grpo_ray.config import load_config
    from grpo_ray.contracts import AdapterPayload
    from grpo_ray.driver.checkpoint import save_checkpoint

    args = parser().parse_args(argv)
    config = load_config(args.config, args.overrides).resolved()  # as the trainer records it
    lora = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 3)}
    return save_checkpoint(out / "checkpoints", step, {"lora": lora},
                           {"adapter_version": step, "data": {}, "config": config},
                           AdapterPayload(step, lora, {"r": 2}))


def run_cli(argv: list[str]) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "grpo_ray", *argv], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "RAY_ADDRESS": ""})


class Connected(BaseException):  # a sentinel: the command stops where it would connect
    """What `connect_ray` raises here: the command got past its checks and went on to run."""


def test_the_same_command_resumes_its_checkpoint_without_resume(tmp_path, tiny_model_path,
                                                                capsys, monkeypatch):
    import grpo_ray.cli

    def connect(*args, **kwargs):
        raise Connected

    monkeypatch.setattr(grpo_ray.cli, "connect_ray", connect)
    out = tmp_path / "run"
    argv = ["train", "--config", "configs/tiny-cpu.yaml", f"output.dir={out}",
            f"model.path={tiny_model_path}", "algorithm.total_steps=4"]
    checkpoint_of(out, 2, argv)
    damaged = checkpoint_of(out, 3, argv)
    with open(damaged / "learner.pt", "r+b") as f:
        f.truncate(10)
    # only where it runs differs (RESUME_IGNORED_KEYS): the same run
    with pytest.raises(Connected):
        main(argv + ["cluster.max_restarts=5", "cluster.address=10.0.0.1:6379"])
    captured = capsys.readouterr()
    assert captured.err.startswith(f"warning: skipping a damaged checkpoint: {damaged}/learner.pt")
    assert (f"resuming from {out / 'checkpoints' / 'step-000002'} (step 2 of 4): "
            f"{out / 'checkpoints'} holds a checkpoint of this config") in captured.out


def test_another_config_is_refused_in_one_line_and_a_complete_run_exits_0(tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--config", "configs/tiny-cpu.yaml", f"output.dir={out}",
            "algorithm.total_steps=2"]
    checkpoint_of(out, 2, argv)
    done = run_cli(argv + ["learner.learning_rate=0.001", "rollout.num_generations=2"])
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        f"error: {out / 'checkpoints'} holds checkpoints of another config (step-000002; "
        "learner.learning_rate: 0.0005 -> 0.001; rollout.num_generations: 4 -> 2): set another "
        "output.dir for a new run, or pass --resume to continue that one with this run's "
        "settings")
    # many differences, one of them a list of reward functions: a few keys, then how many more
    done = run_cli(argv + ["data.source=local", "data.path=math.jsonl", "data.gold=boxed",
                           "data.question_field=problem", "data.eval_fraction=0.25",
                           "reward.functions=[{name: strict_format}, {name: math}]"])
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        f"error: {out / 'checkpoints'} holds checkpoints of another config (step-000002; "
        "data.eval_fraction: None -> 0.25; data.gold: 'after-hashes' -> 'boxed'; "
        "data.num_synthetic: 500 -> 2000; and 4 more): set another output.dir for a new run, or "
        "pass --resume to continue that one with this run's settings")
    # the final checkpoint, the adapter and the final evaluation are written: nothing left to
    # do, nothing started
    (out / "adapter").mkdir()
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"x")
    (out / "eval.jsonl").write_text(json.dumps({"step": 0, "tag": "before"}) + "\n"
                                    + json.dumps({"step": 2, "tag": "after"}) + "\n")
    done = run_cli(argv)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        f"this run is complete: {out / 'checkpoints' / 'step-000002'} is step 2 of 2 and its "
        f"adapter is in {out / 'adapter'}; nothing to do (another output.dir starts a new run)")
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "checkpoints", "eval.jsonl"]


def test_the_runs_own_config_yaml_continues_that_run(tmp_path, monkeypatch, capsys):
    """`<output.dir>/config.yaml` (the config as resolved) given back as `--config` is the same
    run: it resumes, where a file written for synthetic rows ran on a local file (its synthetic
    keys, moot, are at their defaults in config.yaml)."""
    import yaml

    import grpo_ray.cli
    from grpo_ray.config import load_config

    def connect(*args, **kwargs):
        raise Connected

    monkeypatch.setattr(grpo_ray.cli, "connect_ray", connect)
    out, rows = tmp_path / "run", tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"question": f"What is {a} + 2?", "answer": f"#### {a + 2}"})
                            + "\n" for a in (1, 2)))
    argv = ["train", "--config", "configs/tiny-cpu.yaml", f"output.dir={out}",
            f"data.path={rows}", "eval.split=train", "algorithm.total_steps=4"]
    checkpoint_of(out, 2, argv)
    resolved = tmp_path / "config.yaml"
    resolved.write_text(yaml.safe_dump(load_config("configs/tiny-cpu.yaml", argv[3:]).resolved()))
    with pytest.raises(Connected):
        main(["train", "--config", str(resolved)])
    assert "holds a checkpoint of this config" in capsys.readouterr().out


def test_a_run_stopped_in_its_final_evaluation_resumes_to_run_it(tmp_path, monkeypatch,
                                                                  capsys):
    """The adapter was written, then the driver died in the final evaluation: the same command
    is not "complete"; it resumes the last checkpoint (no step left) to evaluate."""
    import grpo_ray.cli

    class Connected(BaseException):  # a sentinel: the command stops where it would connect
        pass

    def connect(*args, **kwargs):
        raise Connected

    monkeypatch.setattr(grpo_ray.cli, "connect_ray", connect)
    out = tmp_path / "run"
    argv = ["train", "--config", "configs/tiny-cpu.yaml", f"output.dir={out}",
            "algorithm.total_steps=2"]
    checkpoint_of(out, 2, argv)
    (out / "adapter").mkdir()
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"x")
    (out / "eval.jsonl").write_text(json.dumps({"step": 0, "tag": "before"}) + "\n"
                                    + '{"step": 2, "tag": "aft')  # cut by the stop
    with pytest.raises(Connected):
        main(argv)
    assert capsys.readouterr().out.strip() == (
        f"resuming from {out / 'checkpoints' / 'step-000002'} (step 2 of 2): the final "
        "evaluation is missing: it runs now")


def test_unreachable_cluster_says_at_once_that_it_retries(monkeypatch, capsys):
    """The first refused connection is said before the first retry (not after the timeout);
    the timeout still ends in the one-line ClusterError."""
    import socket
    import time

    from grpo_ray.cluster.connect import wait_for_cluster
    from grpo_ray.cluster.plan import ClusterError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    said_before_first_retry = []
    real_sleep = time.sleep

    def sleep(seconds):
        if not said_before_first_retry:
            said_before_first_retry.append(capsys.readouterr().err)
        real_sleep(min(seconds, 0.2))

    monkeypatch.setattr(time, "sleep", sleep)
    with pytest.raises(ClusterError, match="no answer within 1.5 s"):
        wait_for_cluster(address, 1.5, f"RAY_ADDRESS={address}")
    first = said_before_first_retry[0]
    assert f"cannot reach the Ray cluster at RAY_ADDRESS={address} yet" in first
    assert "retrying for up to 1.5 s" in first and "refused" in first.lower(), first


@pytest.mark.parametrize("kind, message", [
    ("missing", "no such directory"),
    ("file", "is a file; a model is a directory"),
    ("no config", "has no config.json"),
])
def test_wrong_model_path_fails_at_once_naming_it(kind, message, tmp_path, monkeypatch, capsys):
    import time

    import grpo_ray.cli

    monkeypatch.setattr(grpo_ray.cli, "connect_ray", never_connect)
    path = tmp_path / "model"
    if kind == "file":
        path.write_text("not a model")
    elif kind == "no config":
        path.mkdir()
    start = time.monotonic()
    code = main(["train", "--config", "configs/tiny-cpu.yaml", f"output.dir={tmp_path / 'out'}",
                 f"model.path={path}"])
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert err.startswith(f"error: model.path={path}: ") and message in err, err
    assert "OSError" not in err
    assert elapsed < 3.0, elapsed  # was 7-10 s: transformers' lookups, then the Hub's


def test_eval_writes_beside_what_it_judged(tmp_path):
    from grpo_ray.driver.commands import eval_record_path

    adapter = tmp_path / "run" / "adapter"
    assert eval_record_path(None, str(adapter), "o") == tmp_path / "run" / "eval-adapter.jsonl"
    assert eval_record_path(None, f"{adapter}/", "o") == tmp_path / "run" / "eval-adapter.jsonl"
    assert eval_record_path(None, None, str(tmp_path / "run")) == tmp_path / "run" / "eval-base.jsonl"
    assert eval_record_path(str(tmp_path / "x" / "r.jsonl"), str(adapter), "o") == \
        tmp_path / "x" / "r.jsonl"
    assert (tmp_path / "x").is_dir()


def test_an_address_that_refuses_fails_in_seconds_one_that_is_slow_is_waited_for(monkeypatch):
    """"Connection refused" is an answer at once: nothing listens there, and waiting the whole
    cluster.placement_timeout_s (120 s by default) would only delay the same error. A timeout
    may be a slow network or a head still booting: that is waited for."""
    import socket
    import time

    from grpo_ray.cluster.connect import wait_for_cluster
    from grpo_ray.cluster.plan import ClusterError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    start = time.monotonic()
    with pytest.raises(ClusterError) as e:
        wait_for_cluster(address, 120, f"RAY_ADDRESS={address}", refused_for_s=2)
    assert time.monotonic() - start < 10
    assert str(e.value) == (
        f"cannot reach the Ray cluster at RAY_ADDRESS={address}: Connection refused for 2 s, "
        "answered at once each time: nothing listens there; start its head (ray start --head), "
        "correct the address, or unset it to start a local Ray")

    def slow(*args, **kwargs):
        time.sleep(0.2)
        raise TimeoutError("timed out")

    monkeypatch.setattr(socket, "create_connection", slow)
    start = time.monotonic()
    with pytest.raises(ClusterError, match=r"no answer within 4 s \(cluster.placement_timeout_s=4; "
                       "last error: timed out\\)"):
        wait_for_cluster(address, 4, f"RAY_ADDRESS={address}", refused_for_s=1)
    assert time.monotonic() - start > 2.5  # past refused_for_s: still waiting


# ---- defaults that fit the machine they start on ----------------------------------------------
def test_default_cpu_shares_are_fitted_to_a_2_core_machine_before_ray_starts(monkeypatch):
    """A bare `grpo-ray train` asks 1 CPU for the learner, 1 per engine and 0.25 per reward
    worker: 2.5 CPUs. On 2 cores the shares left at their defaults shrink to fit, and a line
    says so; shares a user set are kept, and where they cannot fit, the error names what is
    missing before Ray starts."""
    from grpo_ray.cluster.plan import PlacementError, fit_to_machine, plan_placement
    from grpo_ray.config import load_config

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = load_config(None, ["cluster.num_cpus=2", "cluster.num_gpus=0"])
    line = fit_to_machine(cfg)
    assert line == ("this machine has 2 CPUs and the default CPU shares of the actors need 2.5: "
                    "rollout.cpus_per_engine=0.8, learner.num_cpus=0.8, "
                    "reward.cpus_per_worker=0.2 here (set them, or cluster.num_cpus, to choose)")
    assert plan_placement(cfg, use_gpu=False).total()["CPU"] <= 2
    assert fit_to_machine(load_config("configs/tiny-cpu.yaml")) is None  # fits as written
    mine = load_config(None, ["cluster.num_cpus=2", "cluster.num_gpus=0", "learner.num_cpus=1.5"])
    assert "learner.num_cpus" not in fit_to_machine(mine) and mine.learner.num_cpus == 1.5
    too_big = load_config(None, ["cluster.num_cpus=2", "cluster.num_gpus=0",
                                 "learner.num_cpus=2", "rollout.cpus_per_engine=1"])
    with pytest.raises(PlacementError, match=r"cannot place .* needs 3.5 CPU in all, the cluster "
                       r"has 2 CPU, 0 GPU"):
        fit_to_machine(too_big)
    # on a cluster (an address), the cluster's own resources are checked once joined
    joined = load_config(None, ["cluster.address=10.0.0.1:6379"])
    assert fit_to_machine(joined) is None and joined.learner.num_cpus == 1


@pytest.mark.parametrize("argv", [["train"], ["train", "--trl-config", "TRL"]],
                         ids=["bare", "trl-config alone"])
def test_bare_train_and_a_trl_config_alone_fit_2_cores(argv, tmp_path, monkeypatch, capsys):
    """`grpo-ray train` with no config, and with only a TRL GRPOConfig file, on 2 cores: the
    CPU shares are fitted before Ray starts (they failed placement, or pointed at the reward
    workers once Ray had started), and the run goes on to start Ray."""
    import os

    import grpo_ray.cli
    from grpo_ray.cluster import plan

    def connect(*args, **kwargs):
        raise Connected

    trl = tmp_path / "grpo.yaml"
    trl.write_text("max_steps: 2\nnum_generations: 4\n")
    monkeypatch.setattr(grpo_ray.cli, "connect_ray", connect)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(plan, "_visible_gpus", lambda: 0)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.chdir(tmp_path)
    argv = [str(trl) if a == "TRL" else a for a in argv]
    with pytest.raises(Connected):
        main(argv)
    assert ("this machine has 2 CPUs and the default CPU shares of the actors need 2.5"
            in capsys.readouterr().out)


def test_a_data_path_alone_reads_that_file(tmp_path, tiny_model_path, capsys, monkeypatch):
    """`data.path=FILE` without `data.source`: the file is read (here its bad row stops the run
    before Ray starts), not the built-in synthetic rows."""
    import grpo_ray.cli

    monkeypatch.setattr(grpo_ray.cli, "connect_ray", never_connect)
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"question": "What is 3 + 3?", "answer": "six"}) + "\n")
    code = main(["train", "--config", "configs/tiny-cpu.yaml", f"data.path={path}",
                 "eval.split=train", f"model.path={tiny_model_path}",
                 f"output.dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err == (f"data error: data.path={path} line 1: column 'answer' has no "
                                 "'####' marker")
