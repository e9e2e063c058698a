"""A TRL user's YAML carried over (`grpo-ray train --trl-config`): every shared field (every loss
field included), TRL's defaults where the file is silent, the file over a `--config` preset and
the overrides over both, a console line for every value two sources set differently, the
`trl grpo` script's fields (model, dataset, LoRA, reward functions), one line naming what we do
not support, and a CPU run of a `trl grpo` file."""
import json
from operator import attrgetter

import pytest

from grpo_ray.config import ConfigError
from grpo_ray.driver.trl_config import from_trl, load_with_trl
from grpo_ray.driver.trl_fields import FIELDS, SCRIPT_FIELDS, script_defaults, trl_defaults

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

LOSS_FIELDS = {  # the loss fields of GRPOConfig (TRL 1.16), each away from its TRL default
    "loss_type": "cispo", "importance_sampling_level": "sequence", "epsilon": 0.1,
    "epsilon_high": 4.0, "delta": 1.5, "beta": 0.01, "sapo_temperature_pos": 0.5,
    "sapo_temperature_neg": 0.7, "vespo_k_pos": 1.0, "vespo_lambda_pos": 2.0, "vespo_k_neg": 4.0,
    "vespo_lambda_neg": 3.0, "top_entropy_quantile": 0.2, "off_policy_mask_threshold": 0.5,
    "use_bias_correction_kl": False, "mask_truncated_completions": True,
    "vllm_importance_sampling_correction": False, "vllm_importance_sampling_mode": "token_mask",
    "vllm_importance_sampling_clip_min": 0.5, "vllm_importance_sampling_clip_max": 2.5,
    "scale_rewards": "none", "multi_objective_aggregation": "normalize_then_sum",
    "reward_weights": [1.0, 0.5, 0.5, 0.25, 2.0], "num_iterations": 2,
}
OURS = {  # what each becomes here
    "algorithm.loss_type": "cispo", "algorithm.importance_sampling_level": "sequence",
    "algorithm.epsilon": 0.1, "algorithm.epsilon_high": 4.0, "algorithm.delta": 1.5,
    "algorithm.beta": 0.01, "algorithm.sapo_temperature_pos": 0.5,
    "algorithm.sapo_temperature_neg": 0.7, "algorithm.vespo_k_pos": 1.0,
    "algorithm.vespo_lambda_pos": 2.0, "algorithm.vespo_k_neg": 4.0,
    "algorithm.vespo_lambda_neg": 3.0, "algorithm.top_entropy_quantile": 0.2,
    "algorithm.off_policy_mask_threshold": 0.5, "algorithm.use_bias_correction_kl": False,
    "algorithm.mask_truncated_completions": True,
    "algorithm.importance_sampling_correction": False,
    "algorithm.importance_sampling_mode": "token_mask", "algorithm.importance_sampling_min": 0.5,
    "algorithm.importance_sampling_cap": 2.5, "algorithm.scale_rewards": "none",
    "algorithm.multi_objective_aggregation": "normalize_then_sum", "algorithm.num_iterations": 2,
}


def write(tmp_path, text: str, name: str = "grpo.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.fixture
def trl_file(tmp_path):
    return write(tmp_path, TRL_YAML.format(out=tmp_path / "out"))


def test_every_mapped_field_is_a_trl_field():
    assert set(FIELDS) <= set(trl_defaults())
    assert set(SCRIPT_FIELDS) <= set(script_defaults())
    assert set(LOSS_FIELDS) <= set(FIELDS)


def test_shared_fields_carry_over_with_trl_defaults(trl_file, tmp_path):
    cfg, ignored, _ = load_with_trl(trl_file, None, [])
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
    assert (cfg.algorithm.importance_sampling_mode, cfg.algorithm.importance_sampling_cap,
            cfg.algorithm.use_bias_correction_kl) == ("sequence_mask", 3.0, True)
    # named in one line by the command; logging_steps and bf16 change nothing we run
    assert ignored == ["torch_compile", "use_liger_kernel (ours: learner.loss_kernel=liger)"]
    assert load_with_trl(trl_file, None, ["algorithm.beta=0.1"])[0].algorithm.beta == 0.1


def test_every_loss_field_maps(tmp_path):
    path = write(tmp_path, "max_steps: 3\n" + "".join(f"{k}: {json.dumps(v)}\n"
                                                      for k, v in LOSS_FIELDS.items()))
    cfg, ignored, _ = load_with_trl(path, None, [])
    assert ignored == []
    assert {key: attrgetter(key)(cfg) for key in OURS} == OURS
    # reward_weights: the weights of the reward functions, ours (the recipe's five) here
    assert [f.weight for f in cfg.reward.functions] == LOSS_FIELDS["reward_weights"]
    old_name = write(tmp_path, "max_steps: 3\nvllm_importance_sampling_cap: 2.0\n", "old.yaml")
    assert load_with_trl(old_name, None, [])[0].algorithm.importance_sampling_cap == 2.0


def test_trl_defaults_need_no_unsupported_line(tmp_path):
    """A file of nothing but TRL's defaults for every loss field (and max_steps) runs TRL's
    losses: dapo, token level, sequence_mask importance sampling capped at 3, the weighted KL."""
    defaults = trl_defaults()
    path = write(tmp_path, "max_steps: 3\n" + "".join(
        f"{k}: {json.dumps(defaults[k])}\n" for k in LOSS_FIELDS if k != "reward_weights"))
    cfg, ignored, _ = load_with_trl(path, None, [])
    assert ignored == []
    a = cfg.algorithm
    assert (a.loss_type, a.importance_sampling_level, a.importance_sampling_mode,
            a.importance_sampling_cap, a.use_bias_correction_kl, a.beta) == (
        "dapo", "token", "sequence_mask", 3.0, True, 0.0)
    silent = write(tmp_path, "max_steps: 3\n", "silent.yaml")  # the same, left to the defaults
    assert load_with_trl(silent, None, [])[:2] == (cfg, [])


def test_the_trl_file_wins_over_a_config_preset_and_the_console_says_so(tmp_path):
    """docs/trl.md's own line: `--trl-config grpo.yaml --config configs/tiny-cpu.yaml`. The
    file's learning_rate and output_dir win over the preset's; the preset's sizes win over TRL's
    defaults; overrides win over both. Every key the TRL file or TRL's defaults set differently
    from another source gets one line; the preset over ours alone gets none."""
    path = write(tmp_path, f"learning_rate: 1.0e-5\noutput_dir: {tmp_path / 'out'}\n"
                           "max_steps: 2\nbeta: 0.02\n")
    cfg, _, lines = load_with_trl(path, "configs/tiny-cpu.yaml", ["algorithm.beta=0.1"])
    assert cfg.learner.learning_rate == 1e-5 and cfg.output.dir == str(tmp_path / "out")
    assert cfg.rollout.max_completion_length == 32 and cfg.algorithm.beta == 0.1
    assert (f"learner.learning_rate=1e-05 ({path}) over 0.0005 (--config configs/tiny-cpu.yaml), "
            "5e-06 (grpo-ray's default)") in lines
    assert (f"output.dir={tmp_path / 'out'} ({path}) over outputs/tiny-cpu "
            "(--config configs/tiny-cpu.yaml), outputs/run (grpo-ray's default)") in lines
    assert ("rollout.max_completion_length=32 (--config configs/tiny-cpu.yaml) over 512 "
            "(TRL's default), 200 (grpo-ray's default)") in lines
    assert (f"algorithm.beta=0.1 (the command line) over 0.02 ({path}), 0.04 (grpo-ray's "
            "default)") in lines
    assert "algorithm.seed=42 (TRL's default) over 3407 (grpo-ray's default)" in lines
    assert not [line for line in lines if line.startswith(("cluster.", "data.num_synthetic"))]
    assert not [line for line in lines if line.startswith("algorithm.total_steps")
                and "(--config" in line.split(" over ")[0]]


def test_what_we_cannot_run_is_one_line_naming_the_trl_field(tmp_path):
    path = write(tmp_path, "loss_type: gspo\nmax_steps: 3\n")
    with pytest.raises(ConfigError, match=r"^algorithm.loss_type: must be one of .* \(got "
                                          rf"'gspo'\) \(from {path}: loss_type\)$"):
        load_with_trl(path, None, [])
    path = write(tmp_path, "num_generation: 4\n")  # a typo
    with pytest.raises(ConfigError, match="not GRPOConfig .*fields .*: num_generation$"):
        from_trl(path)
    path = write(tmp_path, "max_steps: 3\nloss_type: vespo\n"
                           "vllm_importance_sampling_mode: sequence_truncate\n")
    with pytest.raises(ConfigError, match="^algorithm.importance_sampling_mode: .*vespo"):
        load_with_trl(path, None, [])  # TRL refuses it too
    path = write(tmp_path, "max_steps: 3\nreward_weights: [1.0, 2.0]\n")
    with pytest.raises(ConfigError, match="reward_weights has 2 weights for the 5 "
                                          "reward.functions"):
        load_with_trl(path, None, [])
    path = write(tmp_path, "max_steps: 3\nuse_peft: false\n")
    with pytest.raises(ConfigError, match="use_peft=false .* set use_peft: true"):
        from_trl(path)


def test_ignored_fields_are_named_once_with_what_to_use(tmp_path):
    path = write(tmp_path, "num_train_epochs: 2\nentropy_coef: 0.01\nsave_strategy: steps\n"
                           "save_steps: 0.1\ntorch_compile: true\n")
    assert from_trl(path).ignored == [
        "entropy_coef (no entropy bonus here)", "num_train_epochs (set max_steps)",
        "save_steps (0.1 is a fraction of the run; ours: output.save_every, in steps)",
        "torch_compile"]


def test_a_trl_grpo_script_file_maps_model_dataset_lora_and_rewards(tmp_path):
    """A file for TRL's `trl grpo` command: ModelConfig's and ScriptArguments' fields map to
    ours (a Hub dataset is only mapped here: no Hub in the tests)."""
    path = write(tmp_path, "model_name_or_path: Qwen/Qwen2.5-0.5B-Instruct\n"
                           "dataset_name: trl-lib/DeepMath-103K\nlora_r: 8\nmax_steps: 3\n"
                           "reward_funcs: [accuracy_reward, my_rewards.length_reward]\n"
                           "reward_weights: [1.0, 0.1]\n")
    carried = from_trl(path)
    assert carried.explicit["model"] == {"path": "Qwen/Qwen2.5-0.5B-Instruct"}
    assert carried.explicit["data"] == {"source": "hub", "name": "trl-lib/DeepMath-103K",
                                        "subset": None}
    assert carried.explicit["lora"] == {"r": 8}
    assert carried.defaults["lora"] == {"alpha": 32, "dropout": 0.05}  # TRL's LoRA defaults
    assert carried.defaults["learner"]["load_in_4bit"] is False  # TRL's: a 16-bit model
    assert carried.explicit["reward"]["functions"] == [{"name": "trl:accuracy_reward"},
                                                        {"name": "my_rewards:length_reward"}]
    assert carried.ignored == [
        "lora_target_modules (TRL's default lets PEFT choose by architecture (q_proj, v_proj on "
        "Qwen2); ours: lora.target_modules, all seven projections)",
        "use_peft (TRL's default false trains every weight; here a LoRA adapter)"]
    other = write(tmp_path, "dataset_name: openai/gsm8k\ndataset_config: main\nuse_peft: true\n"
                            "lora_target_modules: all-linear\nload_in_4bit: true\n"
                            "dataset_test_split: validation\n", "other.yaml")
    carried = from_trl(other)
    assert carried.explicit["data"] == {"source": "hub", "name": "openai/gsm8k",
                                        "subset": "main", "eval_split": "validation"}
    assert carried.explicit["lora"]["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj",
                                                          "gate_proj", "up_proj", "down_proj"]
    assert carried.defaults["lora"] == {"r": 16, "alpha": 32, "dropout": 0.05}
    with pytest.raises(ConfigError, match=r"^learner.load_in_4bit: .* \(from .*: load_in_4bit\)"):
        load_with_trl(other, None, ["learner.num_gpus=0"])  # 4-bit needs a GPU


def test_the_docs_table_lists_every_carried_field():
    from pathlib import Path

    doc = (Path(__file__).parents[2] / "docs" / "trl.md").read_text()
    assert [name for name in {**FIELDS, **SCRIPT_FIELDS} if f"| `{name}` |" not in doc] == []


def test_a_trl_grpo_file_trains_on_cpu(ray_local, tiny_model_path, tmp_path, capsys):
    """A file written for `trl grpo` (model, local dataset, LoRA rank, TRL's loss defaults
    spelled out) runs with the values it names; the console says where each came from, and
    names no loss field as unsupported."""
    from grpo_ray.cli import main

    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 40), ("test", 4)):
        rows = [{"question": f"What is {i} + {i % 5}?", "answer": f"#### {i + i % 5}"}
                for i in range(n)]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    path = write(tmp_path, f"model_name_or_path: {tiny_model_path}\ndataset_name: {data}\n"
                           f"lora_r: 8\nlora_alpha: 16\noutput_dir: {out}\nmax_steps: 2\n"
                           "num_generations: 4\nper_device_train_batch_size: 8\n"
                           "max_completion_length: 16\nloss_type: dapo\nlearning_rate: 1.0e-4\n"
                           "beta: 0.02\nreport_to: [tensorboard]\nlogging_steps: 1\n")
    rc = main(["train", "--trl-config", path, "--config", "configs/tiny-cpu.yaml",
               "eval.num_samples=2", "data.max_prompt_length=128", "rollout.max_model_len=256"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert (f"--trl-config {path}: carried over; not supported here (ignored): "
            "lora_target_modules (TRL's default lets PEFT choose by architecture (q_proj, v_proj "
            "on Qwen2); ours: lora.target_modules, all seven projections), use_peft (TRL's "
            "default false trains every weight; here a LoRA adapter)\n") in printed
    assert "loss" not in printed.splitlines()[0]  # no loss field unsupported
    for line in (f"model.path={tiny_model_path} ({path}) over builtin:tiny (grpo-ray's default)",
                 f"data.source=local ({path}) over synthetic (grpo-ray's default)",
                 f"data.path={data} ({path}) over None (grpo-ray's default)",
                 f"lora.r=8 ({path}) over 64 (grpo-ray's default)",  # tiny-cpu's is 8 too
                 f"learner.learning_rate=0.0001 ({path}) over 0.0005 "
                 "(--config configs/tiny-cpu.yaml), 5e-06 (grpo-ray's default)",
                 f"output.dir={out} ({path}) over outputs/tiny-cpu "
                 "(--config configs/tiny-cpu.yaml), outputs/run (grpo-ray's default)",
                 f"algorithm.loss_type=dapo ({path}) over grpo (grpo-ray's default)"):
        assert f"\n  {line}\n" in printed, line
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2]  # max_steps
    # the clipped loss ran (TRL's figures of it are logged) on the step's completion tokens
    assert "learner/clip_ratio/region_mean" in steps[1] and steps[1]["learner/num_tokens"] > 0
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"]) == (8, 16)
    assert list((out / "tensorboard").iterdir())  # report_to: [tensorboard]
