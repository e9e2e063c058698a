"""A TRL GRPOConfig YAML carried over (`grpo-ray train --trl-config`): every shared field, TRL's
defaults where the file is silent, one line naming what we do not support, and a CPU run."""
import json

import pytest

from grpo_ray.config import ConfigError, load_config
from grpo_ray.driver.trl_config import FIELDS, from_trl, trl_defaults

TRL_YAML = """\
output_dir: {out}
max_steps: 2
warmup_steps: 1
learning_rate: 1.0e-4
per_device_train_batch_size: 8
num_generations: 4
max_completion_length: 16
top_k: 0
beta: 0.02
epsilon_high: 0.28
loss_type: dr_grpo
scale_rewards: batch
report_to: [tensorboard]
logging_steps: 1
bf16: true
use_liger_kernel: true
torch_compile: true
"""


@pytest.fixture
def trl_file(tmp_path):
    path = tmp_path / "grpo.yaml"
    path.write_text(TRL_YAML.format(out=tmp_path / "out"))
    return path


def test_every_mapped_field_is_a_grpo_config_field():
    assert set(FIELDS) <= set(trl_defaults())


def test_shared_fields_carry_over_with_trl_defaults(trl_file, tmp_path):
    base, unsupported = from_trl(trl_file)
    cfg = load_config(None, [], base)
    assert cfg.algorithm.total_steps == 2 and cfg.learner.learning_rate == 1e-4
    assert cfg.learner.warmup_ratio == 0.5  # warmup_steps 1 of max_steps 2
    assert cfg.rollout.num_generations == 4 and cfg.rollout.max_completion_length == 16
    assert cfg.rollout.prompts_per_step == 2  # 8 completions a step / 4 per prompt
    assert cfg.rollout.top_k == -1  # TRL's 0, vLLM's -1: no top-k
    assert (cfg.algorithm.beta, cfg.algorithm.epsilon_high) == (0.02, 0.28)
    assert (cfg.algorithm.loss_type, cfg.algorithm.scale_rewards) == ("dr_grpo", "batch")
    assert cfg.logging.tensorboard and not cfg.logging.wandb
    assert cfg.output.dir == str(tmp_path / "out")
    assert cfg.algorithm.seed == 42 and cfg.learner.adam_beta2 == 0.999  # TRL's defaults
    # named in one line by the command; logging_steps and bf16 change nothing we run
    assert unsupported == ["torch_compile", "use_liger_kernel"]
    # --config and overrides win over the TRL file
    assert load_config(None, ["algorithm.beta=0.1"], base).algorithm.beta == 0.1


def test_what_we_cannot_run_is_one_line(tmp_path):
    path = tmp_path / "grpo.yaml"
    path.write_text("loss_type: dapo\n")
    with pytest.raises(ConfigError, match="loss_type='dapo' is not supported here"):
        from_trl(path)
    path.write_text("num_generation: 4\n")  # a typo
    with pytest.raises(ConfigError, match="not GRPOConfig fields .*: num_generation$"):
        from_trl(path)
    path.write_text("max_steps: 3\n")  # TRL's default loss (dapo) is said, ours kept
    base, unsupported = from_trl(path)
    assert "algorithm" in base and "loss_type" not in base["algorithm"]
    assert unsupported == ["loss_type=dapo (TRL's default; ours: algorithm.loss_type)"]


def test_a_converted_trl_config_trains_on_cpu(ray_local, tiny_model_path, trl_file, tmp_path,
                                              capsys):
    from grpo_ray.cli import main

    out = tmp_path / "out"
    rc = main(["train", "--trl-config", str(trl_file), f"model.path={tiny_model_path}",
               "lora.r=8", "lora.alpha=16", "rollout.max_model_len=256",
               "rollout.cpus_per_engine=0.5", "rollout.enforce_eager=true",
               "learner.gradient_checkpointing=false", "learner.num_gpus=0",
               "learner.num_cpus=0.5", "cluster.num_cpus=2", "eval.num_samples=2",
               "data.num_synthetic=50", "data.max_prompt_length=128"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert (f"--trl-config {trl_file}: GRPOConfig carried over; not supported here (ignored): "
            "torch_compile, use_liger_kernel") in printed
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2]  # max_steps
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert list((out / "tensorboard").iterdir())  # report_to: [tensorboard]


def test_the_docs_table_lists_every_carried_field():
    from pathlib import Path

    doc = (Path(__file__).parents[2] / "docs" / "trl.md").read_text()
    assert [name for name in FIELDS if f"| `{name}` |" not in doc] == []
