"""The config tree: every file in configs/ loads, overrides apply, bad input names the key."""
from pathlib import Path

import pytest

from grpo_ray.config import Config, ConfigError, load_config, parse_override

CONFIGS = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"tiny-cpu.yaml", "qwen2.5-3b-gsm8k.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_reference_recipe_hyperparameters():
    cfg = load_config(Path("configs/qwen2.5-3b-gsm8k.yaml"))
    assert (cfg.lora.r, cfg.lora.alpha) == (64, 64)
    assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                       "up_proj", "down_proj"]
    assert cfg.learner.learning_rate == 5e-6
    assert (cfg.learner.adam_beta1, cfg.learner.adam_beta2) == (0.9, 0.99)
    assert cfg.learner.weight_decay == 0.1 and cfg.learner.warmup_ratio == 0.1
    assert cfg.learner.lr_scheduler_type == "cosine" and cfg.learner.max_grad_norm == 0.1
    assert cfg.rollout.num_generations == 8 and cfg.data.max_prompt_length == 256
    assert cfg.rollout.max_completion_length == 200 and cfg.algorithm.total_steps == 250
    assert cfg.algorithm.seed == 3407 and cfg.learner.load_in_4bit is True


def test_overrides_apply_last_and_parse_yaml_values():
    cfg = load_config(Path("configs/tiny-cpu.yaml"),
                      ["rollout.num_generations=6", "learner.learning_rate=1e-3",
                       "cluster.address=null", "lora.target_modules=[q_proj, v_proj]"])
    assert cfg.rollout.num_generations == 6
    assert cfg.learner.learning_rate == 1e-3
    assert cfg.cluster.address is None
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert parse_override("a.b.c=3") == {"a": {"b": {"c": 3}}}


@pytest.mark.parametrize("overrides, message", [
    (["rollout.nmu_engines=2"], "rollout.nmu_engines: unknown key"),
    (["modle.path=x"], "modle: unknown key"),
    (["rollout.num_engines=two"], "rollout.num_engines: must be int"),
    (["learner.gradient_checkpointing=3"], "learner.gradient_checkpointing: must be true or false"),
    (["algorithm.loss_type=ppo"], "algorithm.loss_type: must be one of"),
    (["rollout.num_generations=1"], "rollout.num_generations: must be >= 2"),
    (["rollout.prompts_per_step=3", "rollout.num_engines=2"], "rollout.prompts_per_step: 3 prompts"),
    (["rollout.max_model_len=100"], "rollout.max_model_len: 100 <"),
    (["rollout.max_lora_rank=4"], "rollout.max_lora_rank: 4 is below lora.r=8"),
    (["data.source=local"], "data.path: is required"),
    (["reward.functions=[{weight: 2}]"], "reward.functions[0]"),
    (["rollout"], "an override must look like"),
])
def test_bad_config_names_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(Path("configs/tiny-cpu.yaml"), overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize("overrides, message", [
    (["learner.num_gpus=2"], "learner.num_gpus: must be <= 1"),
    (["learner.num_gpus=true"], "learner.num_gpus: must be a number"),
    (["rollout.cpus_per_engine=-1"], "rollout.cpus_per_engine: must be >= 0"),
    (["cluster.colocate=true", "learner.num_gpus=1"],
     "learner.num_gpus: must be a fraction in (0, 1) with cluster.colocate"),
    (["learner.load_in_4bit=true"], "learner.load_in_4bit: 4-bit (bitsandbytes) needs the learner"),
    (["learner.load_in_4bit=true", "learner.num_gpus=1", "cluster.use_gpu=false"],
     "learner.load_in_4bit: 4-bit"),
    (["model.path=builtin:tiny-warm", "data.source=local", "data.path=x.jsonl", "eval.split=train"],
     "model.path: builtin:tiny-warm warms up on synthetic rows"),
    (["reward.functions=[{name: correctness, wieght: 2}]"],
     "reward.functions[0].wieght: unknown key (known: correctness, kwargs, name, weight)"),
    (["reward.functions=[]"], "reward.functions: needs at least 1"),
    (["data.answer_field=question"],
     "data.answer_field: must differ from data.question_field (both 'question')"),
    (["data.gold=boxed"], "data.gold: applies to hub and local data; data.source=synthetic"),
    (["data.question_field=problem"], "data.question_field: applies to hub and local data"),
    (["reward.functions=[{name: overlong, kwargs: {soft_punish_cache: 8}}]"],
     "reward.functions[0].kwargs: overlong needs max_completion_len equal to "
     "rollout.max_completion_length (32; got None)"),
    (["reward.functions=[{name: overlong, kwargs: {max_completion_len: 32}}]"],
     "reward.functions[0].kwargs: overlong needs soft_punish_cache"),
    (["reward.functions=[{name: overlong, kwargs: {max_completion_len: 32, "
      "soft_punish_cache: 33}}]"], "reward.functions[0].kwargs: overlong needs soft_punish_cache"),
    (["reward.functions=[{name: 'trl:get_soft_overlong_punishment', kwargs: "
      "{max_completion_len: 64, soft_punish_cache: 8}}]"],
     "reward.functions[0].kwargs: trl:get_soft_overlong_punishment needs max_completion_len "
     "equal to rollout.max_completion_length (32; got 64)"),
    (["reward.functions=[{name: 'trl:accuracy reward'}]"],
     "reward.functions[0].name: 'trl:accuracy reward': after 'trl:' comes the name of a "
     "function of trl.rewards"),
    (["reward.functions=[{name: math, kwargs: {timeout_s: 0}}]"],
     "reward.functions[0].kwargs: math's timeout_s must be a number of seconds > 0 (got 0)"),
    (["reward.functions=[{name: correctness}, {name: math, kwargs: {timeot_s: 1}}]"],
     "reward.functions[1].kwargs: unknown argument(s) timeot_s of the built-in 'math' "
     "(it takes: timeout_s)"),
    (["reward.functions=[{name: correctness, kwargs: {scale: 2}}]"],
     "reward.functions[0].kwargs: unknown argument(s) scale of the built-in 'correctness' "
     "(it takes: none)"),
    (["learner.max_tokens_per_micro_batch=0"], "learner.max_tokens_per_micro_batch: must be >= 1"),
    (["learner.max_tokens_per_micro_batch=159"],
     "learner.max_tokens_per_micro_batch: 159 < data.max_prompt_length + "
     "rollout.max_completion_length (128 + 32): the longest row would not fit"),
    # the combinations of the loss's options TRL refuses, naming both keys
    (["algorithm.importance_sampling_min=2", "algorithm.importance_sampling_cap=2"],
     "algorithm.importance_sampling_min: 2.0 must be below algorithm.importance_sampling_cap"),
    (["algorithm.importance_sampling_correction=true", "algorithm.importance_sampling_cap=null"],
     "algorithm.importance_sampling_mode: token_truncate needs a bound: set "
     "algorithm.importance_sampling_cap or algorithm.importance_sampling_min"),
    (["algorithm.importance_sampling_correction=true", "algorithm.loss_type=vespo",
      "algorithm.importance_sampling_mode=sequence_mask"],
     "algorithm.importance_sampling_mode: loss_type=vespo puts the rollout weights into its own "
     "sequence weight, token by token: use token_truncate or token_mask with "
     "algorithm.loss_type=vespo (got sequence_mask)"),
    (["algorithm.loss_type=gspo"], "algorithm.loss_type: must be one of 'grpo', 'bnpo', "
     "'dr_grpo', 'dapo', 'luspo', 'cispo', 'sapo' or 'vespo' (got 'gspo')"),
    (["algorithm.top_entropy_quantile=1.5"], "algorithm.top_entropy_quantile: must be <= 1"),
])
def test_invariants_name_the_key_they_are_about(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(Path("configs/tiny-cpu.yaml"), overrides)
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_files_hold_only_what_differs_from_the_defaults(path):
    from grpo_ray.config import default_values, read_yaml

    defaults = default_values()
    same = [f"{section}.{key}" for section, values in read_yaml(path).items()
            for key, value in values.items() if defaults[section][key] == value]
    assert not same, f"{path.name} restates defaults: {same}"


def test_derived_values_are_computed_once_in_the_config():
    cfg = load_config(Path("configs/tiny-cpu.yaml"))
    assert cfg.engine_lora_rank == cfg.lora.r == 8
    assert load_config(Path("configs/tiny-cpu.yaml"),
                       ["rollout.max_lora_rank=16"]).engine_lora_rank == 16
    assert cfg.eval_split == cfg.data.eval_split and cfg.eval_max_tokens == 32
    one_gpu = load_config(Path("configs/qwen2.5-3b-gsm8k-1gpu.yaml"))
    assert one_gpu.colocated_gpu_shares == (0.5, 0.5)
    two_engines = load_config(Path("configs/qwen2.5-3b-gsm8k-1gpu.yaml"),
                              ["rollout.num_engines=2", "learner.num_gpus=0.4"])
    assert two_engines.colocated_gpu_shares == (0.4, 0.3)


def test_fields_are_documented_once_beside_them():
    from grpo_ray.config import RolloutConfig

    assert "Group size" in RolloutConfig.model_fields["num_generations"].description


def test_evaluation_is_greedy_or_sampled():
    from grpo_ray.driver.evaluation import STOP, eval_sampling

    greedy = eval_sampling(load_config(Path("configs/tiny-cpu.yaml")))
    assert (greedy.temperature, greedy.n, greedy.stop, greedy.max_tokens) == (0, 1, STOP, 32)
    sampled = eval_sampling(load_config(Path("configs/learn-cpu.yaml")))
    assert (sampled.temperature, sampled.n, sampled.stop) == (1.0, 4, None)
    assert sampled.seed == 3407  # the same draws at every evaluation
    with pytest.raises(ConfigError, match="eval.samples: must be 1 with eval.temperature=0"):
        load_config(Path("configs/tiny-cpu.yaml"), ["eval.samples=4"])


# ---- no setting silently ignored ---------------------------------------------------------------
def test_a_data_path_means_local_data_and_a_hub_name_hub_data():
    """`data.path` alone reads that file (it used to train on synthetic rows, exit 0); a hub
    name or subset alone reads the hub; both without `data.source` say which to choose."""
    assert load_config(Path("configs/tiny-cpu.yaml"),
                       ["data.path=rows.jsonl", "eval.split=train"]).data.source == "local"
    assert load_config(None, ["data.name=openai/gsm8k"]).data.source == "hub"
    assert load_config(None, ["data.subset=socratic"]).data.source == "hub"
    with pytest.raises(ConfigError, match=r"^data.source: data.path \(rows.jsonl\) reads a local "
                       r"file, data.name \(x/y\) a hub dataset: set data.source$"):
        load_config(None, ["data.path=rows.jsonl", "data.name=x/y"])
    # a file written for synthetic rows (tiny-cpu sets data.num_synthetic) runs on a local file
    # once the command line says so: its synthetic keys are moot, not an error
    for switch in (["data.source=local"], []):
        cfg = load_config(Path("configs/tiny-cpu.yaml"),
                          switch + ["data.path=rows.jsonl", "eval.split=train"])
        assert cfg.data.source == "local"


MOOT_KEYS = [  # (overrides of tiny-cpu.yaml, the key without effect, the key it needs)
    (["data.source=synthetic", "data.path=rows.jsonl"], "data.path", "data.source"),
    (["data.source=hub", "data.path=rows.jsonl"], "data.path", "data.source"),
    (["data.source=local", "data.path=rows.jsonl", "eval.split=train", "data.name=x/y"],
     "data.name", "data.source"),
    (["data.subset=socratic", "data.source=synthetic"], "data.subset", "data.source"),
    (["data.source=hub", "data.num_synthetic=10"], "data.num_synthetic", "data.source"),
    (["data.source=hub", "data.synthetic_max_value=5"], "data.synthetic_max_value", "data.source"),
    (["data.path=a.jsonl", "data.eval_path=b.jsonl", "data.eval_split=dev"], "data.eval_split",
     "data.eval_path"),
    (["data.path=a.jsonl", "data.eval_fraction=0.1", "data.eval_split=dev"], "data.eval_split",
     "data.eval_fraction"),
    (["algorithm.importance_sampling_cap=3"], "algorithm.importance_sampling_cap",
     "algorithm.importance_sampling_correction"),
    (["algorithm.max_refill_rounds=4"], "algorithm.max_refill_rounds",
     "algorithm.filter_zero_variance_groups"),
    (["learner.max_tokens_per_micro_batch=4096", "learner.micro_batch_size=4"],
     "learner.micro_batch_size", "learner.max_tokens_per_micro_batch"),
    (["learner.load_in_4bit=false", "learner.upcast_unquantized_to_fp32=true"],
     "learner.upcast_unquantized_to_fp32", "learner.load_in_4bit"),
    (["learner.lr_scheduler_type=constant", "learner.warmup_ratio=0.2"], "learner.warmup_ratio",
     "learner.lr_scheduler_type"),
    (["cluster.sync_probe=false", "cluster.sync_probe_min_slope=0.3"],
     "cluster.sync_probe_min_slope", "cluster.sync_probe"),
    (["cluster.sync_probe=false", "cluster.sync_probe_max_slope=2"],
     "cluster.sync_probe_max_slope", "cluster.sync_probe"),
    (["cluster.sync_probe=false", "cluster.sync_probe_z=2"], "cluster.sync_probe_z",
     "cluster.sync_probe"),
    (["cluster.sync_probe=false", "cluster.sync_probe_min_movement=0.1"],
     "cluster.sync_probe_min_movement", "cluster.sync_probe"),
    (["logging.wandb_project=mine"], "logging.wandb_project", "logging.wandb"),
    (["reward.mode=seed-parity", "reward.functions=[{name: math}]"], "reward.mode",
     "reward.functions"),
    (["eval.every_steps=5"], "eval.every_steps", "algorithm.total_steps"),
    (["cluster.use_gpu=false", "rollout.kv_cache_gb=4"], "rollout.kv_cache_gb", "cluster.use_gpu"),
    (["cluster.use_gpu=false", "rollout.gpu_memory_utilization=0.8"],
     "rollout.gpu_memory_utilization", "cluster.use_gpu"),
    (["cluster.use_gpu=false", "rollout.gpus_per_engine=2"], "rollout.gpus_per_engine",
     "cluster.use_gpu"),
    (["cluster.use_gpu=false", "cluster.colocate=true", "learner.num_gpus=0.5"],
     "cluster.colocate", "cluster.use_gpu"),
    (["cluster.use_gpu=true", "rollout.kv_cache_space_gb=4"], "rollout.kv_cache_space_gb",
     "cluster.use_gpu"),
]


@pytest.mark.parametrize("overrides, key, other", MOOT_KEYS)
def test_a_key_without_what_makes_it_count_is_refused_naming_both(overrides, key, other):
    with pytest.raises(ConfigError) as e:
        load_config(Path("configs/tiny-cpu.yaml"), overrides)
    message = str(e.value)
    assert message.startswith(f"{key}: has no effect unless ") and "\n" not in message, message
    assert f"and here {other}=" in message and message.endswith(f"drop it, or change {other}")


def test_every_key_that_counts_only_beside_another_has_a_case_above():
    from grpo_ray.config import TAKES_EFFECT_ONLY

    assert {key for key, _, _, _ in TAKES_EFFECT_ONLY} == {key for _, key, _ in MOOT_KEYS}


def test_the_same_keys_with_what_makes_them_count_load():
    load_config(Path("configs/tiny-cpu.yaml"), [
        "algorithm.filter_zero_variance_groups=true", "algorithm.max_refill_rounds=4",
        "algorithm.importance_sampling_correction=true", "algorithm.importance_sampling_cap=3",
        "learner.max_tokens_per_micro_batch=4096", "logging.wandb=true",
        "logging.wandb_project=mine", "reward.mode=seed-parity", "eval.every_steps=2",
        "cluster.sync_probe_z=2", "learner.lr_scheduler_type=cosine", "learner.warmup_ratio=0.2"])


def test_a_trl_config_base_is_not_a_setting_the_user_gave(tmp_path):
    """`--trl-config` carries TRL's defaults (its importance-sampling cap among them): with the
    correction off in the TRL file, the cap it never set is not refused."""
    from grpo_ray.driver.trl_config import load_with_trl

    trl = tmp_path / "grpo.yaml"
    trl.write_text("vllm_importance_sampling_correction: false\nmax_steps: 3\n")
    cfg = load_with_trl(str(trl), None, [])[0]
    assert cfg.algorithm.importance_sampling_cap != 2.0  # TRL's default, not ours
    assert not cfg.algorithm.importance_sampling_correction
    with pytest.raises(ConfigError, match=r"^algorithm.importance_sampling_cap: has no effect "):
        load_with_trl(str(trl), None, ["algorithm.importance_sampling_cap=5"])  # ours: refused


def test_the_resolved_config_loads_back_as_it_is(tmp_path):
    """What a run writes to `<output.dir>/config.yaml` (`Config.resolved`): every key, those
    without effect at their defaults, so that `--config` takes the file back (the README's
    math example runs tiny-cpu.yaml, whose data.num_synthetic a local file makes moot)."""
    import yaml

    cfg = load_config(Path("configs/tiny-cpu.yaml"), [
        "data.source=local", "data.path=math.jsonl", "data.question_field=problem",
        "data.answer_field=solution", "data.gold=boxed", "data.eval_fraction=0.25"])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.resolved(), sort_keys=False))
    again = load_config(path)
    assert again.data.num_synthetic == 2000 and cfg.data.num_synthetic == 500  # moot: default
    assert again.resolved() == cfg.resolved() and again.data.path == "math.jsonl"


def test_every_registered_loss_is_a_loss_type_and_its_hyperparameters_are_fields():
    """`algorithm.loss_type` is the registry of `algo.losses`, and every keyword a registered
    loss takes is an `algorithm.*` field (the learner passes them by name)."""
    import typing

    from grpo_ray.algo.losses import POLICY_LOSSES
    from grpo_ray.config import AlgorithmConfig, LossType

    assert typing.get_args(LossType) == tuple(POLICY_LOSSES)
    for loss in POLICY_LOSSES.values():
        assert set(loss.params) <= set(AlgorithmConfig.model_fields), loss.name
