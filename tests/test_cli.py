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
