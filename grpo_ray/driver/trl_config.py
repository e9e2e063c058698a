"""A TRL `GRPOConfig` YAML file as our config (`grpo-ray train --trl-config grpo.yaml`).

Every field both configs have is carried over, with GRPOConfig's default where the file does not
set it (a TRL user's run relies on TRL's defaults: `beta` 0.0, `learning_rate` 1e-6, ...); the
fields we do not support are named in one line. The table of docs/trl.md is `FIELDS`.

Imports only TRL's and transformers' config dataclasses (no trainer, no torch work): the file is
read as data; `GRPOConfig(...)` itself is not built, since its checks need the training device
(bf16 on a GPU, accelerate's process count).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from grpo_ray.config import ConfigError, read_yaml


def _top_k(v: int) -> int:
    return -1 if v == 0 else v  # TRL's "no top-k" is 0, vLLM's (ours) -1


def _enum(v: Any) -> Any:
    return getattr(v, "value", v)


# GRPOConfig field -> (our dotted key, conversion). Sizes assume TRL on one process, the way our
# one learner takes the whole batch.
FIELDS: dict[str, tuple[str, Callable[[Any], Any]]] = {
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
    "lr_scheduler_type": ("learner.lr_scheduler_type", _enum),
    "max_grad_norm": ("learner.max_grad_norm", float),
    "gradient_checkpointing": ("learner.gradient_checkpointing", bool),
    "cast_lm_head_to_fp32": ("learner.cast_lm_head_to_fp32", bool),
    "beta": ("algorithm.beta", float),
    "epsilon": ("algorithm.epsilon", float),
    "epsilon_high": ("algorithm.epsilon_high", lambda v: v if v is None else float(v)),
    "loss_type": ("algorithm.loss_type", str),
    "scale_rewards": ("algorithm.scale_rewards",
                      lambda v: {True: "group", False: "none"}.get(v, v)),
    "num_iterations": ("algorithm.num_iterations", int),
    "mask_truncated_completions": ("algorithm.mask_truncated_completions", bool),
    "vllm_importance_sampling_correction": ("algorithm.importance_sampling_correction", bool),
    "vllm_importance_sampling_clip_max": ("algorithm.importance_sampling_cap", float),
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

# Fields that change nothing we run (how TRL logs or places itself), not worth a warning.
_SILENT = {"logging_steps", "logging_dir", "logging_strategy", "run_name", "save_strategy",
           "eval_strategy", "bf16", "fp16", "use_cpu", "use_vllm", "vllm_mode", "push_to_hub",
           "hub_model_id", "log_completions", "num_completions_to_print", "do_train", "do_eval",
           "overwrite_output_dir", "vllm_server_host", "vllm_server_port", "vllm_server_base_url",
           "vllm_server_timeout", "vllm_group_port", "ddp_find_unused_parameters"}
_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo")


def trl_defaults() -> dict[str, Any]:
    """GRPOConfig's fields and their defaults (TrainingArguments' included)."""
    from trl import GRPOConfig

    out = {}
    for f in dataclasses.fields(GRPOConfig):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
        else:
            out[f.name] = None
    return out


def from_trl(path: str | Path) -> tuple[dict[str, Any], list[str]]:
    """Our config (a nested mapping for `load_config`'s base) from a GRPOConfig YAML file, and
    the fields set in it that we do not support. A key that is no GRPOConfig field, or a value
    we cannot run (`loss_type: dapo`), is a ConfigError naming it."""
    given = read_yaml(path)
    defaults = trl_defaults()
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ConfigError(f"--trl-config {path}: not GRPOConfig fields (trl "
                          f"{_trl_version()}): {', '.join(unknown)}")
    trl = {**defaults, **given}
    loss = _enum(trl["loss_type"])
    if loss not in _LOSS_TYPES:
        if "loss_type" in given:
            raise ConfigError(f"--trl-config {path}: loss_type={loss!r} is not supported here "
                              f"(supported: {', '.join(_LOSS_TYPES)})")
        trl["loss_type"] = None  # TRL's default (dapo): ours applies, said as unsupported
    if trl["max_steps"] is None or trl["max_steps"] <= 0:
        trl["max_steps"] = None  # epochs (num_train_epochs): not a unit we train in
    if _enum(trl.get("save_strategy")) not in ("steps", None) or "save_steps" not in given:
        trl["save_steps"] = None
    if _enum(trl.get("eval_strategy")) != "steps" or "eval_steps" not in given:
        trl["eval_steps"] = None
    if not isinstance(trl["save_steps"], int) and trl["save_steps"] is not None:
        trl["save_steps"] = None  # a fraction of the run: not supported

    out: dict[str, Any] = {}
    for name, (key, convert) in FIELDS.items():
        value = trl.get(name)
        if convert is None or value is None:
            continue
        _put(out, key, convert(value))
    report = trl["report_to"] if isinstance(trl["report_to"], list) else [trl["report_to"]]
    if "report_to" in given:
        _put(out, "logging.tensorboard", "tensorboard" in report or "all" in report)
        _put(out, "logging.wandb", "wandb" in report or "all" in report)
    warmup = trl.get("warmup_steps") or 0
    if warmup and (warmup < 1 or trl["max_steps"]):
        _put(out, "learner.warmup_ratio", warmup if warmup < 1 else warmup / trl["max_steps"])
    elif "warmup_steps" in given:
        _put(out, "learner.warmup_ratio", 0.0)
    steps = trl["steps_per_generation"] or trl["gradient_accumulation_steps"]
    batch = trl["generation_batch_size"] or trl["per_device_train_batch_size"] * steps
    if batch % trl["num_generations"]:
        raise ConfigError(f"--trl-config {path}: generation_batch_size {batch} is not a "
                          f"multiple of num_generations {trl['num_generations']}")
    _put(out, "rollout.prompts_per_step", batch // trl["num_generations"])

    silent = _SILENT | ({"num_train_epochs"} if trl["max_steps"] else set())
    unsupported = sorted(name for name in given if name not in FIELDS and name not in silent)
    if trl["loss_type"] is None:
        unsupported.append(f"loss_type={loss} (TRL's default; ours: algorithm.loss_type)")
    if trl["max_steps"] is None:
        unsupported.append("num_train_epochs (set max_steps)")
    return out, unsupported


def _put(out: dict[str, Any], dotted: str, value: Any) -> None:
    *sections, key = dotted.split(".")
    node = out
    for s in sections:
        node = node.setdefault(s, {})
    node[key] = value


def _trl_version() -> str:
    import trl

    return trl.__version__
