"""One typed config tree: every default lives here, YAML files hold what differs, dotted
command-line overrides (`rollout.num_engines=2`) apply last.

Unknown keys, wrong types and broken invariants raise `ConfigError` with a one-line message that
names the key, before anything starts. Field names follow TRL's `GRPOConfig` where they mean the
same thing (`num_generations`, `beta`, `epsilon`, `loss_type`, `scale_rewards`, ...).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ConfigError(ValueError):
    """A config that cannot run; the message names the key."""


@dataclass
class ModelConfig:
    path: str = "builtin:tiny"
    """Hugging Face id or local directory of the base model; `builtin:tiny` builds the tiny
    Qwen2-architecture model and tokenizer in code (no hub needed) under `output.dir`;
    `builtin:tiny-warm` is that model after a supervised warm-up on the synthetic train rows
    that teaches it the XML format with low correctness (the learning benchmark's start; needs
    `data.source: synthetic`; built once per settings under `output.dir`, ~45 s on 2 cores)."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Weights dtype of the rollout engines and of the learner's unquantized parts; `auto` is
    bfloat16 on GPU and float32 on CPU."""


@dataclass
class LoraConfig:
    r: int = 64
    """LoRA rank."""
    alpha: int = 64
    """LoRA alpha (the update is scaled by alpha / r)."""
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(ALL_PROJECTIONS))
    """Module names the adapter wraps."""


@dataclass
class DataConfig:
    source: Literal["hub", "local", "synthetic"] = "synthetic"
    """`hub`: `name`/`subset`/`split` through `datasets`; `local`: a JSONL or Parquet file at
    `path` with GSM8K's columns (`question`, `answer` ending in `#### <gold>`); `synthetic`:
    arithmetic word problems generated in code."""
    name: str = "openai/gsm8k"
    subset: str = "main"
    split: str = "train"
    eval_split: str = "test"
    """Split used by evaluation (hub), or held-out rows (synthetic uses another seed)."""
    path: str | None = None
    """Local JSONL/Parquet file, for `source: local`."""
    num_synthetic: int = 2000
    """Number of generated rows, for `source: synthetic`."""
    synthetic_max_value: int = 9
    """Largest operand of the generated problems."""
    max_prompt_length: int = 256
    """Prompts longer than this many tokens (with the chat template) are refused when loaded."""
    system_prompt: str | None = None
    """System prompt; None uses the reference recipe's XML format prompt."""
    seed: int = 3407
    """Seed of the shuffling order (each epoch reshuffles with seed + epoch)."""


@dataclass
class RolloutConfig:
    num_engines: int = 1
    """Number of vLLM rollout actors; prompts are split evenly between them."""
    prompts_per_step: int = 4
    """Prompts per training step; each gets `num_generations` completions."""
    num_generations: int = 8
    """Group size: completions sampled per prompt."""
    max_completion_length: int = 200
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_model_len: int = 1024
    gpus_per_engine: int = 1
    """GPUs of one engine (its tensor parallel size); ignored on CPU."""
    cpus_per_engine: float = 1.0
    gpu_memory_utilization: float = 0.5
    """Fraction of its GPU memory one engine may take (weights + KV cache)."""
    enforce_eager: bool = False
    """Skip CUDA graphs and compilation (faster start, slower generation)."""
    max_lora_rank: int | None = None
    """Largest LoRA rank the engines accept; None means `lora.r`."""
    kv_cache_space_gb: int = 1
    """KV cache size of a CPU engine in GiB (VLLM_CPU_KVCACHE_SPACE, whole GiB)."""


@dataclass
class RewardFunctionConfig:
    name: str
    """A built-in reward (`correctness`, `integer`, `strict_format`, `soft_format`, `xml_count`)
    or an import path `package.module:function` with TRL's reward signature."""
    weight: float = 1.0


def _default_rewards() -> list[RewardFunctionConfig]:
    names = ["xml_count", "soft_format", "strict_format", "integer", "correctness"]
    return [RewardFunctionConfig(n) for n in names]


@dataclass
class RewardConfig:
    functions: list[RewardFunctionConfig] = field(default_factory=_default_rewards)
    """Reward functions, summed with their weights."""
    mode: Literal["fixed", "seed-parity"] = "fixed"
    """`seed-parity` reproduces the reference notebook's rewards exactly, flaws included;
    `fixed` accepts multi-line reasoning and numerically equal answers ("18.0", "$18", "1,000")."""
    num_workers: int = 2
    """Reward actors in the pool."""
    cpus_per_worker: float = 0.25
    timeout_s: float = 60.0
    """A scoring call that takes longer fails the step with the function's name."""


@dataclass
class LearnerConfig:
    backend: Literal["peft", "unsloth"] = "peft"
    """`unsloth` uses Unsloth's 4-bit loader and kernels where it is installed and on CUDA."""
    load_in_4bit: bool | None = None
    """NF4 with double quantization through bitsandbytes; None: on CUDA when it is installed."""
    gradient_checkpointing: bool = True
    learning_rate: float = 5e-6
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    weight_decay: float = 0.1
    warmup_ratio: float = 0.1
    lr_scheduler_type: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    max_grad_norm: float = 0.1
    micro_batch_size: int = 8
    """Sequences per forward/backward; gradients accumulate over the whole step's batch."""
    logprob_chunk_size: int = 1024
    """Positions whose vocabulary logits are materialized at once when computing the chosen
    tokens' log-probabilities."""
    num_gpus: float = 1.0
    """GPUs of the learner actor (0 on CPU; a fraction to share one GPU with an engine)."""
    num_cpus: float = 1.0


@dataclass
class AlgorithmConfig:
    total_steps: int = 250
    beta: float = 0.04
    """Weight of the per-token KL (k3 estimator) to the reference model; 0 skips the reference."""
    epsilon: float = 0.2
    """Lower clip range of the probability ratio."""
    epsilon_high: float | None = None
    """Upper clip range; None means `epsilon` (DAPO's clip-higher when larger)."""
    loss_type: Literal["grpo", "bnpo", "dr_grpo"] = "grpo"
    """`grpo`: mean over each sequence's tokens, then over sequences (DeepSeekMath); `bnpo`:
    mean over all tokens of the batch; `dr_grpo`: sum over tokens / (sequences x
    max_completion_length) (Dr. GRPO)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Divide advantages by the std of the group, of the batch, or not at all (Dr. GRPO)."""
    num_iterations: int = 1
    """Optimizer passes over each generated batch (GRPO's mu); the ratio is 1 on the first."""
    importance_sampling_correction: bool = False
    """Weight each token by min(p_learner_old / p_rollout, cap): truncated importance sampling
    that corrects the rollout/learner probability gap."""
    importance_sampling_cap: float = 2.0
    seed: int = 3407


@dataclass
class ClusterConfig:
    address: str | None = None
    """Ray address; None uses RAY_ADDRESS when set, else starts an embedded local Ray."""
    num_cpus: int | None = None
    """CPUs of an embedded local Ray (None: all)."""
    num_gpus: int | None = None
    """GPUs of an embedded local Ray (None: all that are visible)."""
    use_gpu: bool | None = None
    """Place actors on GPUs; None: when the Ray cluster has any."""
    colocate: bool = False
    """Learner and the rollout engines share GPUs through fractional resources (one-GPU mode)."""
    placement_timeout_s: float = 120.0
    """How long to wait for the placement group before failing with what is missing."""


@dataclass
class EvalConfig:
    split: str | None = None
    """Split of held-out prompts; None: `data.eval_split`."""
    num_samples: int = 64
    """Held-out prompts evaluated (the first ones, in file order); 0: all of the split."""
    every_steps: int = 0
    """Also evaluate every N steps (0: only before the first step and after the last)."""
    max_tokens: int | None = None
    """Longest greedy completion; None: `rollout.max_completion_length`."""
    sanity_question: str = "How many r's are in strawberry?"
    """Asked without and with the trained adapter, both answers printed (the reference notebook's
    check, answered greedily here with the XML system prompt both times)."""


@dataclass
class LoggingConfig:
    progress_bar: bool = True
    """A bar over steps with reward, accuracy and step time (on a terminal run)."""
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "grpo-ray"
    samples_per_step: int = 4
    """Completions written per step to `completions.jsonl` (prompt, completion, each reward)."""


@dataclass
class OutputConfig:
    dir: str = "outputs/run"
    save_every: int = 0
    """Checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept under `<dir>/checkpoints` (the newest ones); older ones are deleted once
    a newer one is complete."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> "Config":
        """Check the invariants that no single field's type can; returns self."""
        r, a, lr = self.rollout, self.algorithm, self.learner
        _require(r.num_generations >= 2, "rollout.num_generations",
                 f"must be >= 2 (got {r.num_generations}): group-relative advantages of a "
                 "group of one are always zero")
        for key in ["rollout.num_engines", "rollout.prompts_per_step", "rollout.max_completion_length",
                    "rollout.gpus_per_engine", "learner.micro_batch_size", "algorithm.total_steps",
                    "algorithm.num_iterations", "reward.num_workers", "lora.r", "lora.alpha",
                    "data.max_prompt_length", "learner.logprob_chunk_size"]:
            _require(self.get(key) >= 1, key, f"must be >= 1 (got {self.get(key)})")
        _require(r.prompts_per_step % r.num_engines == 0, "rollout.prompts_per_step",
                 f"{r.prompts_per_step} prompts cannot be split evenly over "
                 f"rollout.num_engines={r.num_engines}")
        _require(self.data.max_prompt_length + r.max_completion_length <= r.max_model_len,
                 "rollout.max_model_len",
                 f"{r.max_model_len} < data.max_prompt_length + rollout.max_completion_length "
                 f"({self.data.max_prompt_length} + {r.max_completion_length})")
        _require(0 < r.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization",
                 f"must be in (0, 1] (got {r.gpu_memory_utilization})")
        _require(r.temperature > 0, "rollout.temperature", "must be > 0 (GRPO samples)")
        _require(0 <= a.beta, "algorithm.beta", f"must be >= 0 (got {a.beta})")
        _require(0 < a.epsilon < 1, "algorithm.epsilon", f"must be in (0, 1) (got {a.epsilon})")
        _require(a.importance_sampling_cap >= 1, "algorithm.importance_sampling_cap",
                 f"must be >= 1 (got {a.importance_sampling_cap})")
        max_rank = r.max_lora_rank or self.lora.r
        _require(self.lora.r <= max_rank, "rollout.max_lora_rank",
                 f"{max_rank} is below lora.r={self.lora.r}: the engines would refuse the adapter")
        _require(lr.num_gpus >= 0 and r.cpus_per_engine >= 0, "learner.num_gpus", "must be >= 0")
        _require(0 <= lr.warmup_ratio < 1, "learner.warmup_ratio", "must be in [0, 1)")
        _require(bool(self.reward.functions), "reward.functions", "needs at least one function")
        _require(self.output.save_every >= 0, "output.save_every",
                 f"must be >= 0 (got {self.output.save_every})")
        _require(self.output.keep_checkpoints >= 1, "output.keep_checkpoints",
                 f"must be >= 1 (got {self.output.keep_checkpoints})")
        if self.data.source == "local":
            _require(self.data.path is not None, "data.path", "is required with data.source=local")
        if self.cluster.colocate:
            _require(r.num_engines == 1, "rollout.num_engines",
                     "must be 1 with cluster.colocate (one engine shares the learner's GPU)")
        self._validate_eval()
        return self

    def _validate_eval(self) -> None:
        e, r = self.eval, self.rollout
        _require(e.num_samples >= 0, "eval.num_samples", f"must be >= 0 (got {e.num_samples})")
        _require(e.every_steps >= 0, "eval.every_steps", f"must be >= 0 (got {e.every_steps})")
        if e.max_tokens is not None:
            _require(1 <= e.max_tokens <= r.max_model_len - self.data.max_prompt_length,
                     "eval.max_tokens", f"must be in [1, rollout.max_model_len - "
                     f"data.max_prompt_length = {r.max_model_len - self.data.max_prompt_length}] "
                     f"(got {e.max_tokens})")
        split = e.split or self.data.eval_split
        if self.data.source == "local":
            # a local file is one split: evaluating on it must be asked for, never a default
            _require(split == self.data.split, "eval.split",
                     f"data.source=local has one split ({self.data.split!r}, the file "
                     f"data.path); set eval.split={self.data.split} to evaluate on its rows")

    def get(self, dotted: str) -> Any:
        node: Any = self
        for part in dotted.split("."):
            node = getattr(node, part)
        return node

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


# ---- loading -------------------------------------------------------------------------------

def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against the type hint `hint` (converting int -> float, dict -> dataclass)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {list(args)} (got {value!r})")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: must be a list (got {type(value).__name__} {value!r})")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: must be a mapping (got {value!r})")
        return _build(hint, value, key)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # YAML 1.1 reads `5e-6` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: must be true or false (got {value!r})")
    if hint in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{key}: must be a number (got {value!r})")
    if not isinstance(value, hint):
        raise ConfigError(f"{key}: must be {hint.__name__} (got {type(value).__name__} {value!r})")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"{where}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field (e.g. a reward's name) is missing
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(item: str) -> dict[str, Any]:
    """`a.b.c=value` -> {"a": {"b": {"c": value}}}, the value parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"{item}: an override must look like section.key=value")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    node: dict[str, Any] = {}
    out = node
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- dotted overrides, then type checks and invariants."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: must be a mapping of sections")
        data = loaded
    for item in overrides or []:
        data = _merge(data, parse_override(item))
    return _build(Config, data).validate()
