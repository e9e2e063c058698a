"""Runs in the driver (read by `trl_config`): the tables of a TRL YAML file's fields and the keys
of ours they become (docs/trl.md is these tables): `FIELDS` for TRL's `GRPOConfig`,
`SCRIPT_FIELDS` for the fields a `trl grpo` file holds besides (`ModelConfig`,
`ScriptArguments`), with their conversions; the fields that change nothing we run (`SILENT`) and
what to use instead of those we cannot carry over (`INSTEAD`); and TRL's fields with their
defaults, read from TRL's own config dataclasses.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable


def _top_k(v: int) -> int:
    return -1 if v == 0 else v  # TRL's "no top-k" is 0, vLLM's (ours) -1


def enum_value(v: Any) -> Any:
    return getattr(v, "value", v)


def _optional(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A conversion for a field whose None is a value of ours too (off, or "as epsilon")."""
    def optional(v: Any) -> Any:
        return None if v is None else convert(v)
    optional.takes_none = True  # type: ignore[attr-defined]
    return optional


# GRPOConfig field -> (our dotted key, conversion; None: converted below from several fields).
# Sizes assume TRL on one process, the way our one learner takes the whole batch.
FIELDS: dict[str, tuple[str, Callable[[Any], Any] | None]] = {
    "num_generations": ("rollout.num_generations", int),
    "max_completion_length": ("rollout.max_completion_length", int),
    "temperature": ("rollout.temperature", float),
    "top_p": ("rollout.top_p", float),
    "top_k": ("rollout.top_k", _top_k),
    "vllm_gpu_memory_utilization": ("rollout.gpu_memory_utilization", float),
    "vllm_max_model_length": ("rollout.max_model_len", int),
    "vllm_tensor_parallel_size": ("rollout.gpus_per_engine", int),
    "per_device_train_batch_size": ("learner.micro_batch_size", int),
    "learning_rate": ("learner.learning_rate", float),
    "adam_beta1": ("learner.adam_beta1", float),
    "adam_beta2": ("learner.adam_beta2", float),
    "weight_decay": ("learner.weight_decay", float),
    "warmup_steps": ("learner.warmup_ratio", None),  # a fraction, or steps / max_steps
    "lr_scheduler_type": ("learner.lr_scheduler_type", enum_value),
    "max_grad_norm": ("learner.max_grad_norm", float),
    "gradient_checkpointing": ("learner.gradient_checkpointing", bool),
    "cast_lm_head_to_fp32": ("learner.cast_lm_head_to_fp32", bool),
    "beta": ("algorithm.beta", float),
    "epsilon": ("algorithm.epsilon", float),
    "epsilon_high": ("algorithm.epsilon_high", _optional(float)),
    "delta": ("algorithm.delta", _optional(float)),
    "loss_type": ("algorithm.loss_type", enum_value),
    "importance_sampling_level": ("algorithm.importance_sampling_level", enum_value),
    "sapo_temperature_pos": ("algorithm.sapo_temperature_pos", float),
    "sapo_temperature_neg": ("algorithm.sapo_temperature_neg", float),
    "vespo_k_pos": ("algorithm.vespo_k_pos", float),
    "vespo_lambda_pos": ("algorithm.vespo_lambda_pos", float),
    "vespo_k_neg": ("algorithm.vespo_k_neg", float),
    "vespo_lambda_neg": ("algorithm.vespo_lambda_neg", float),
    "top_entropy_quantile": ("algorithm.top_entropy_quantile", float),
    "off_policy_mask_threshold": ("algorithm.off_policy_mask_threshold", _optional(float)),
    "use_bias_correction_kl": ("algorithm.use_bias_correction_kl", bool),
    "scale_rewards": ("algorithm.scale_rewards",
                      lambda v: {True: "group", False: "none"}.get(v, v)),
    "multi_objective_aggregation": ("algorithm.multi_objective_aggregation", enum_value),
    "reward_weights": ("reward.functions", None),  # weights of the functions, after merging
    "num_iterations": ("algorithm.num_iterations", int),
    "mask_truncated_completions": ("algorithm.mask_truncated_completions", bool),
    "vllm_importance_sampling_correction": ("algorithm.importance_sampling_correction", bool),
    "vllm_importance_sampling_mode": ("algorithm.importance_sampling_mode", enum_value),
    "vllm_importance_sampling_clip_max": ("algorithm.importance_sampling_cap", _optional(float)),
    "vllm_importance_sampling_cap": ("algorithm.importance_sampling_cap", None),  # deprecated
    "vllm_importance_sampling_clip_min": ("algorithm.importance_sampling_min", _optional(float)),
    "max_steps": ("algorithm.total_steps", int),
    "seed": ("algorithm.seed", int),
    "output_dir": ("output.dir", str),
    "save_steps": ("output.save_every", int),
    "save_total_limit": ("output.keep_checkpoints", int),
    "eval_steps": ("eval.every_steps", int),
    "disable_tqdm": ("logging.progress_bar", lambda v: not v),
    "report_to": ("logging", None),  # tensorboard / wandb, below
    "generation_batch_size": ("rollout.prompts_per_step", None),  # / num_generations, below
    "steps_per_generation": ("rollout.prompts_per_step", None),
    "gradient_accumulation_steps": ("rollout.prompts_per_step", None),
}
"""GRPOConfig fields we carry over (docs/trl.md is this table)."""

SCRIPT_FIELDS: dict[str, tuple[str, Callable[[Any], Any] | None]] = {
    "model_name_or_path": ("model.path", str),
    "dtype": ("model.dtype", str),
    "use_peft": ("lora", None),  # true: what we always train; false is refused
    "lora_r": ("lora.r", int),
    "lora_alpha": ("lora.alpha", int),
    "lora_dropout": ("lora.dropout", float),
    "lora_target_modules": ("lora.target_modules", None),  # a list, or "all-linear"
    "load_in_4bit": ("learner.load_in_4bit", bool),
    "dataset_name": ("data.name", None),  # and data.source: hub, or local for a path
    "dataset_config": ("data.subset", str),
    "dataset_train_split": ("data.split", str),
    "dataset_test_split": ("data.eval_split", str),
    "reward_funcs": ("reward.functions", None),  # TRL's names and import paths, below
}
"""Fields of a `trl grpo` file outside GRPOConfig (TRL's `ModelConfig`, `ScriptArguments`,
`GRPOScriptArguments`) we carry over, only where the file sets them, except ModelConfig's LoRA
defaults (`LORA_DEFAULTS`)."""

LORA_DEFAULTS = ("lora_r", "lora_alpha", "lora_dropout")
"""ModelConfig's LoRA fields whose TRL defaults (16, 32, 0.05) apply where the file sets
`use_peft` or any `lora_*` field, and `load_in_4bit` (false) where it sets any ModelConfig
field, as in `trl grpo`."""

# Fields that change nothing we run (how TRL logs or places itself), not worth a warning.
SILENT = {"logging_steps", "logging_dir", "logging_strategy", "run_name", "save_strategy",
           "eval_strategy", "bf16", "fp16", "use_cpu", "use_vllm", "vllm_mode", "push_to_hub",
           "hub_model_id", "log_completions", "num_completions_to_print", "do_train", "do_eval",
           "overwrite_output_dir", "vllm_server_host", "vllm_server_port", "vllm_server_base_url",
           "vllm_server_timeout", "vllm_group_port", "ddp_find_unused_parameters"}
# What to use instead, for fields we cannot carry over.
INSTEAD = {
    "num_train_epochs": "set max_steps",
    "reward_model_name_or_path": "reward models are not supported: reward functions "
                                 "(reward_funcs, reward.functions)",
    "entropy_coef": "no entropy bonus here",
    "use_adaptive_entropy": "no entropy bonus here",
    "use_liger_kernel": "ours: learner.loss_kernel=liger",
    "dataset_streaming": "datasets are read whole",
}
# `trl grpo`'s own reward names (trl/scripts/grpo.py) -> our reward.functions entries
SCRIPT_REWARDS = {
    "accuracy_reward": {"name": "trl:accuracy_reward"},
    "reasoning_accuracy_reward": {"name": "trl:reasoning_accuracy_reward"},
    "think_format_reward": {"name": "trl:think_format_reward"},
    "get_soft_overlong_punishment": {"name": "trl:get_soft_overlong_punishment",
                                     "kwargs": {"max_completion_len": 1280,
                                                "soft_punish_cache": 256}},
}


def _dataclass_defaults(cls: type) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
        else:
            out[f.name] = None
    return out


def trl_defaults() -> dict[str, Any]:
    """GRPOConfig's fields and their defaults (TrainingArguments' included)."""
    from trl import GRPOConfig

    return _dataclass_defaults(GRPOConfig)


def script_defaults() -> dict[str, Any]:
    """The other fields a `trl grpo` file may hold (ModelConfig, GRPOScriptArguments,
    DatasetMixtureConfig) and their defaults."""
    from trl import ModelConfig
    from trl.scripts.grpo import GRPOScriptArguments
    from trl.scripts.utils import DatasetMixtureConfig

    return {**_dataclass_defaults(DatasetMixtureConfig),
            **_dataclass_defaults(GRPOScriptArguments), **_dataclass_defaults(ModelConfig)}
