"""A TRL user's YAML file as our config (`grpo-ray train --trl-config grpo.yaml`): a
`GRPOConfig`, or a file written for TRL's `trl grpo` command, which also holds the script's
`ModelConfig` and `ScriptArguments` fields (`model_name_or_path`, `dataset_name`, `lora_r`,
`reward_funcs`, ...).

Every field both configs have is carried over (`trl_fields.FIELDS`, `SCRIPT_FIELDS`: the tables
of docs/trl.md). Order, the last winning: our defaults <- TRL's defaults for the fields the file
does not set (a TRL user's run relies on them: `beta` 0.0, `learning_rate` 1e-6, `loss_type`
dapo, ...) <- `--config` <- the fields the file sets <- dotted overrides. Where two of them set a
key differently, one console line says which value won and where the other came from. The
fields we do not support are named in one line, each once, with what to use instead where there
is something.

Imports only TRL's and transformers' config dataclasses (no trainer, no torch work): the file is
read as data; `GRPOConfig(...)` itself is not built, since its checks need the training device
(bf16 on a GPU, accelerate's process count).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from grpo_ray.config import (ALL_PROJECTIONS, TAKES_EFFECT_ONLY, Config, ConfigError, build_config,
                             default_values, given_keys, merge, parse_override, read_yaml)
from grpo_ray.driver.trl_fields import (FIELDS, INSTEAD, LORA_DEFAULTS, SCRIPT_FIELDS,
                                        SCRIPT_REWARDS, SILENT, enum_value, script_defaults,
                                        trl_defaults)


@dataclass
class CarriedOver:
    """A TRL file as our config's layers."""

    explicit: dict[str, Any]
    """Our nested mapping from the fields the file sets (over `--config`)."""
    defaults: dict[str, Any]
    """Our nested mapping from TRL's defaults of the fields it does not set (under it)."""
    ignored: list[str]
    """The fields set in it that we do not carry over, each once, with what to use instead."""
    reward_weights: list[float] | None = None
    """TRL's `reward_weights`: the weights of the reward functions, wherever they come from."""
    sources: dict[str, str] = field(default_factory=dict)
    """Our dotted key -> the file's field(s) it came from (for messages)."""


def from_trl(path: str | Path) -> CarriedOver:
    """Our config's layers from a TRL YAML file. A key that is no field of TRL's GRPOConfig or
    of the `trl grpo` script, or a value we cannot run, is a ConfigError naming it."""
    given = read_yaml(path)
    defaults, script = trl_defaults(), script_defaults()
    unknown = sorted(set(given) - set(defaults) - set(script))
    if unknown:
        raise ConfigError(f"--trl-config {path}: not GRPOConfig (or trl grpo script) fields "
                          f"(trl {_trl_version()}): {', '.join(unknown)}")
    trl = {**defaults, **given}
    ignored: dict[str, str] = {}  # field -> note ("" for none), each field once
    layers: dict[bool, dict[str, Any]] = {True: {}, False: {}}  # explicit or not -> mapping
    sources: dict[str, str] = {}

    def put(key: str, value: Any, *fields: str) -> None:
        explicit = any(f in given for f in fields)
        _put(layers[explicit], key, value)
        if explicit:
            sources[key] = ", ".join(f for f in fields if f in given)

    if trl["max_steps"] is None or trl["max_steps"] <= 0:
        trl["max_steps"] = None  # epochs (num_train_epochs): not a unit we train in
        ignored["num_train_epochs"] = INSTEAD["num_train_epochs"]
    if enum_value(trl.get("save_strategy")) not in ("steps", None) or "save_steps" not in given:
        trl["save_steps"] = None
    elif not isinstance(trl["save_steps"], int):
        ignored["save_steps"] = (f"{trl['save_steps']} is a fraction of the run; ours: "
                                 "output.save_every, in steps")
        trl["save_steps"] = None
    if enum_value(trl.get("eval_strategy")) != "steps" or "eval_steps" not in given:
        trl["eval_steps"] = None
    if trl.get("vllm_importance_sampling_cap") is not None:  # TRL's deprecated name
        trl["vllm_importance_sampling_clip_max"] = trl["vllm_importance_sampling_cap"]
        given.setdefault("vllm_importance_sampling_clip_max", trl["vllm_importance_sampling_cap"])

    for name, (key, convert) in FIELDS.items():
        value = trl.get(name)
        if convert is None or (value is None and not getattr(convert, "takes_none", False)):
            continue  # None there is TRL's "not set" (ours applies), or converted below
        put(key, convert(value), name)
    report = trl["report_to"] if isinstance(trl["report_to"], list) else [trl["report_to"]]
    if "report_to" in given:
        put("logging.tensorboard", "tensorboard" in report or "all" in report, "report_to")
        put("logging.wandb", "wandb" in report or "all" in report, "report_to")
    warmup = trl.get("warmup_steps") or 0
    if warmup and (warmup < 1 or trl["max_steps"]):
        put("learner.warmup_ratio", warmup if warmup < 1 else warmup / trl["max_steps"],
            "warmup_steps", "max_steps")
    elif "warmup_steps" in given:
        put("learner.warmup_ratio", 0.0, "warmup_steps")
    steps = trl["steps_per_generation"] or trl["gradient_accumulation_steps"]
    batch = trl["generation_batch_size"] or trl["per_device_train_batch_size"] * steps
    if batch % trl["num_generations"]:
        raise ConfigError(f"--trl-config {path}: generation_batch_size {batch} is not a "
                          f"multiple of num_generations {trl['num_generations']}")
    put("rollout.prompts_per_step", batch // trl["num_generations"], "generation_batch_size",
        "steps_per_generation", "gradient_accumulation_steps", "per_device_train_batch_size",
        "num_generations")
    _script_fields(path, given, {**script, **given}, put, ignored)

    silent = SILENT | ({"num_train_epochs"} if trl["max_steps"] else set())
    for name in given:
        if name not in FIELDS and name not in SCRIPT_FIELDS and name not in silent:
            ignored.setdefault(name, INSTEAD.get(name, ""))
    return CarriedOver(layers[True], layers[False],
                       [f"{name} ({note})" if note else name
                        for name, note in sorted(ignored.items())],
                       trl.get("reward_weights"), sources)


def _script_fields(path: str | Path, given: dict[str, Any], script: dict[str, Any],
                   put: Callable[..., None], ignored: dict[str, str]) -> None:
    """ModelConfig's and ScriptArguments' fields (`trl grpo`'s), where the file sets them."""
    from trl import ModelConfig

    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    if "use_peft" in given and not given["use_peft"]:
        raise ConfigError(f"--trl-config {path}: use_peft=false (training every weight) is not "
                          "supported: grpo-ray trains a LoRA adapter; set use_peft: true "
                          "(lora_r, lora_alpha, ... or lora.*)")
    if model_fields & set(given) and "use_peft" not in given:
        ignored["use_peft"] = "TRL's default false trains every weight; here a LoRA adapter"
    if "use_peft" in given or any(name.startswith("lora_") for name in given):
        for name in LORA_DEFAULTS:  # TRL's LoRA defaults where the file uses LoRA
            key, convert = SCRIPT_FIELDS[name]
            put(key, convert(script[name]), name)
        if "lora_target_modules" not in given:
            ignored["lora_target_modules"] = (
                "TRL's default lets PEFT choose by architecture (q_proj, v_proj on Qwen2); "
                "ours: lora.target_modules, all seven projections")
    if model_fields & set(given):
        put("learner.load_in_4bit", bool(script["load_in_4bit"]), "load_in_4bit")
    for name, (key, convert) in SCRIPT_FIELDS.items():
        if name in given and convert is not None:
            put(key, convert(given[name]), name)
    if "lora_target_modules" in given:
        modules = given["lora_target_modules"]
        modules = [modules] if isinstance(modules, str) else modules
        put("lora.target_modules", ALL_PROJECTIONS if modules == ["all-linear"] else modules,
            "lora_target_modules")
    if "dataset_name" in given:
        name = str(given["dataset_name"])
        local = Path(name).expanduser().exists()  # load_dataset reads a local path too
        put("data.source", "local" if local else "hub", "dataset_name")
        put("data.path" if local else "data.name", name, "dataset_name")
        if not local and "dataset_config" not in given:
            put("data.subset", None, "dataset_name")  # TRL's load_dataset(name, name=None)
    if given.get("reward_funcs"):
        put("reward.functions", [_script_reward(path, r) for r in given["reward_funcs"]],
            "reward_funcs")
    for name in ("datasets", "streaming", "test_split_size", "dataset_streaming",
                 "ignore_bias_buffers", "reward_model_name_or_path"):
        if given.get(name):
            ignored[name] = INSTEAD.get(name, "")


def _script_reward(path: str | Path, name: str) -> dict[str, Any]:
    """One of `trl grpo`'s `reward_funcs`: its own names, or a dotted import path."""
    if name in SCRIPT_REWARDS:
        return dict(SCRIPT_REWARDS[name])
    if "." in name:
        module, _, function = name.rpartition(".")
        return {"name": f"{module}:{function}"}
    raise ConfigError(f"--trl-config {path}: reward_funcs: {name!r} is none of trl grpo's "
                      f"({', '.join(SCRIPT_REWARDS)}) nor an import path (module.function)")


@dataclass
class Layer:
    label: str
    """Where the values come from, for the console (`--config configs/tiny-cpu.yaml`)."""
    values: dict[str, Any]


def load_with_trl(trl_path: str, config_path: str | None,
                  overrides: list[str]) -> tuple[Config, list[str], list[str]]:
    """The config of `train --trl-config`: our defaults <- TRL's defaults of the fields the file
    does not set <- `--config` <- the file's fields <- overrides. Returns it, the fields ignored,
    and one line per key two of these (ours included) set differently: which value won, where it
    came from, and the others'."""
    carried = from_trl(trl_path)
    command_line: dict[str, Any] = {}
    for item in overrides:
        command_line = merge(command_line, parse_override(item))
    layers = [Layer("grpo-ray's default", default_values()),
              Layer("TRL's default", carried.defaults),
              Layer(f"--config {config_path}", read_yaml(config_path) if config_path else {}),
              Layer(str(trl_path), carried.explicit), Layer("the command line", command_line)]
    data: dict[str, Any] = {}
    for layer in layers:
        data = merge(data, layer.values)
    lines = provenance(layers, {"TRL's default", str(trl_path)})
    if carried.reward_weights is not None:
        data = _with_reward_weights(data, carried.reward_weights, trl_path)
        lines.append(f"reward.functions[*].weight={carried.reward_weights} ({trl_path}'s "
                     "reward_weights)")
    # the layers of what the user set, for the keys that count only beside another
    # (`TAKES_EFFECT_ONLY`): --config's keys are refused where a later layer makes them moot
    # no more than a file's are, but the TRL file's own keys run as they do in TRL, where such a
    # key is inert (vllm_importance_sampling_cap with the correction off); TRL's defaults are no
    # one's setting
    given = {**given_keys(layers[2].values, 1), **given_keys(carried.explicit, 2),
             **given_keys(command_line, 3)}
    checked = {key for key, *_ in TAKES_EFFECT_ONLY}
    given = {k: layer for k, layer in given.items() if not (layer == 2 and k in checked)}
    try:
        return build_config(data, given), carried.ignored, lines
    except ConfigError as e:  # name the TRL field behind our key
        key = str(e).split(":", 1)[0]
        if key in carried.sources and _winner(layers, key) == str(trl_path):
            raise ConfigError(f"{e} (from {trl_path}: {carried.sources[key]})") from None
        raise


def _with_reward_weights(data: dict[str, Any], weights: list[float],
                         trl_path: str) -> dict[str, Any]:
    """The reward functions (from any layer, else ours) with TRL's `reward_weights`."""
    functions = data.get("reward", {}).get("functions") or default_values()["reward"]["functions"]
    if len(weights) != len(functions):
        raise ConfigError(f"--trl-config {trl_path}: reward_weights has {len(weights)} weights "
                          f"for the {len(functions)} reward.functions "
                          f"({', '.join(f['name'] for f in functions)})")
    weighted = [{**f, "weight": float(w)} for f, w in zip(functions, weights)]
    return merge(data, {"reward": {"functions": weighted}})


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in values.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _winner(layers: list[Layer], key: str) -> str | None:
    found = [layer.label for layer in layers if key in _flat(layer.values)]
    return found[-1] if found else None


def provenance(layers: list[Layer], about: set[str]) -> list[str]:
    """One line per dotted key that two layers set to different values, one of them a layer in
    `about` (the TRL file's two): the value that wins (the last layer's), its source, then what
    the others set."""
    flat = [(layer.label, _flat(layer.values)) for layer in layers]
    keys = sorted({k for _, values in flat for k in values})
    lines = []
    for key in keys:
        settings = [(label, values[key]) for label, values in flat if key in values]
        (label, value), others = settings[-1], settings[:-1]
        others = [(lbl, v) for lbl, v in others if v != value]
        if others and about & {label, *(lbl for lbl, _ in others)}:
            lines.append(f"{key}={value} ({label}) over " + ", ".join(
                f"{v} ({lbl})" for lbl, v in reversed(others)))
    return lines


def _put(out: dict[str, Any], dotted: str, value: Any) -> None:
    *sections, key = dotted.split(".")
    node = out
    for s in sections:
        node = node.setdefault(s, {})
    node[key] = value


def _trl_version() -> str:
    import trl

    return trl.__version__
