"""One typed config tree: every default lives here, YAML files hold what differs, dotted
command-line overrides (`rollout.num_engines=2`) apply last.

The tree is pydantic models that forbid unknown keys; each field is documented once, by the
docstring under it. Unknown keys, wrong types and broken invariants raise `ConfigError` with a
one-line message that names the key, before anything starts. Values derived from several fields
(the engines' LoRA rank, the evaluation split, the colocated GPU shares, ...) are properties of
`Config`, computed here and nowhere else. Field names follow TRL's `GRPOConfig` where they mean
the same thing (`num_generations`, `beta`, `epsilon`, `loss_type`, `scale_rewards`, ...).

Longer than other modules on purpose: every default and its documentation stand in this one
file, so that a reader finds any setting, and what it does, in one place.
"""
from __future__ import annotations

import importlib.util
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo,
                      model_validator)

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class UserError(Exception):
    """Something the user can fix (a config key, a data row, a path, the cluster's size): the
    command line prints its one-line message and exits with code 2, no traceback."""

    kind = "error"
    """What the command line prints before the message (`config error: ...`)."""


class ConfigError(UserError, ValueError):
    """A config that cannot run; the message names the key."""

    kind = "config error"


class _Section(BaseModel):
    # Docstrings under the fields are their documentation (and pydantic's descriptions).
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True,
                              validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_numbers(cls, data: Any) -> Any:
        """YAML's `true` is not a number: pydantic's lax mode would take it as 1."""
        if isinstance(data, dict):
            for name, value in data.items():
                field = cls.model_fields.get(name)
                if field is not None and isinstance(value, bool) and _is_number(field.annotation):
                    raise ValueError(f"@{name}: must be a number (got {value!r})")
        return data


def _is_number(annotation: Any) -> bool:
    args = typing.get_args(annotation) or (annotation,)
    return bool({int, float} & set(args)) and bool not in args


class ModelConfig(_Section):
    path: str = "builtin:tiny"
    """Hugging Face id or local directory of the base model; `builtin:tiny` builds the tiny
    Qwen2-architecture model and tokenizer in code (no hub needed); `builtin:tiny-warm` is that
    model after a supervised warm-up on the synthetic train rows that teaches it the XML format
    with low correctness (the demo's and the learning benchmark's start; needs `data.source:
    synthetic`; about a minute on 2 cores). Both are built once per settings in a cache
    (`models.resolve.cache_dir`, `~/.cache/grpo-ray`)."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Weights dtype of the rollout engines and of the learner's unquantized parts; `auto` is
    bfloat16 on GPU and float32 on CPU."""


class LoraConfig(_Section):
    r: int = Field(64, ge=1)
    """LoRA rank."""
    alpha: int = Field(64, ge=1)
    """LoRA alpha (the update is scaled by alpha / r)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(ALL_PROJECTIONS), min_length=1)
    """Module names the adapter wraps."""


class DataConfig(_Section):
    source: Literal["hub", "local", "synthetic"] = "synthetic"
    """`hub`: `name`/`subset`/`split` through `datasets`; `local`: a JSONL, JSON, CSV or Parquet
    file at `path`; `synthetic`: arithmetic word problems generated in code, in GSM8K's shape.
    Hub and local rows are read through `question_field`, `answer_field` and `gold`. Not given,
    it follows from the keys that are: `path` means `local`, `name` or `subset` means `hub`."""
    name: str = "openai/gsm8k"
    subset: str | None = "main"
    """The dataset's configuration (`datasets.load_dataset`'s `name`); None: its only one."""
    split: str = "train"
    """Split trained on (hub data, a local directory of split files)."""
    eval_split: str | None = None
    """Split evaluation reads from hub data or a local directory of split files; None: `test`,
    else `validation`, whichever the dataset has. Synthetic data calls its held-out rows `test`
    (another seed, no question of the train rows). `eval_path` and `eval_fraction` replace it."""
    path: str | None = None
    """Local data, for `source: local`: a `.jsonl` (one JSON object a line; blank lines skipped),
    `.json` (JSON lines, or one array of objects), `.csv` (a header row; every value is text) or
    `.parquet` file, one split; or a directory whose files are named by split (`train.jsonl`
    and `test.jsonl`, `data/train-00000-of-00001.parquet`, ...), read by `datasets`."""
    eval_path: str | None = None
    """A second local file (same formats and columns as `path`) that evaluation reads instead of
    a split. Rows whose question is also a training row's are counted in a warning."""
    eval_fraction: float | None = Field(None, gt=0, lt=1)
    """Hold out this fraction of the training split's distinct questions for evaluation, chosen
    with `seed`: those rows (every row of a held-out question) leave the training rows, so the
    two share none. For a single file, or a dataset without a test split."""
    question_field: str = "question"
    """Column of the question text. A row without it that has a `prompt` column of chat
    messages (TRL's conversational format) uses those messages, with `system_prompt` put first
    only when they hold no system message; its question is then the last user message."""
    answer_field: str = "answer"
    """Column the gold answer is taken from (see `gold`)."""
    gold: Literal["after-hashes", "boxed", "field"] = "after-hashes"
    """How the gold answer comes out of `answer_field`: `after-hashes` is the text after the
    last `####` (GSM8K); `boxed` the content of the last `\\boxed{...}` (or `\\fbox{...}`) of a
    worked solution (MATH); `field` the column as it is (text or a number). Rewards receive the
    gold as the `answer` column and every other dataset column under its own name."""
    num_synthetic: int = Field(2000, ge=1)
    """Number of generated rows, for `source: synthetic`."""
    synthetic_max_value: int = Field(9, ge=1)
    """Largest operand of the generated problems."""
    max_prompt_length: int = Field(256, ge=1)
    """Prompts longer than this many tokens (with the chat template) are refused when loaded."""
    system_prompt: str | None = None
    """System prompt; None uses the reference recipe's XML format prompt."""
    seed: int = 3407
    """Seed of the shuffling order (each epoch reshuffles with seed + epoch)."""

    @model_validator(mode="before")
    @classmethod
    def _implied_source(cls, data: Any) -> Any:
        """`source` from the keys given beside it, when it is not given itself: a file says
        where the rows are as clearly as `source: local` does."""
        if not isinstance(data, dict) or "source" in data:
            return data
        local = data.get("path") is not None
        hub = [k for k in ("name", "subset") if k in data]
        if local and hub:
            raise ValueError(f"@source: data.path ({data['path']}) reads a local file, "
                             f"data.{hub[0]} ({data[hub[0]]}) a hub dataset: set data.source")
        if local or hub:
            return {**data, "source": "local" if local else "hub"}
        return data


class RolloutConfig(_Section):
    num_engines: int = Field(1, ge=1)
    """Number of vLLM rollout actors at the start; each step's prompts are split evenly between
    the engines that serve (sizes differing by at most one)."""
    min_engines: int | None = Field(None, ge=1)
    """Fewest engines the run goes on with (an elastic fleet, docs/elastic.md): an engine lost
    with no room to start it again is dropped after `cluster.replace_timeout_s` while at least
    this many serve; below it the run waits that long for room, then ends with a checkpoint
    (exit 3). None: `num_engines` (a fixed fleet)."""
    max_engines: int | None = Field(None, ge=1)
    """Most engines the run grows to: between steps, while fewer serve, one more is asked for
    (each engine has a placement of its own, started when the cluster has room: a node that
    joined, or the autoscaler's, `cluster.autoscale`) and admitted once it serves the current
    adapter (identity check and probe). None: `num_engines` (a fixed fleet)."""
    prompts_per_step: int = Field(4, ge=1)
    """Prompts per training step; each gets `num_generations` completions."""
    num_generations: int = 8
    """Group size: completions sampled per prompt."""
    max_completion_length: int = Field(200, ge=1)
    temperature: float = 1.0
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = -1
    max_model_len: int = Field(1024, ge=1)
    gpus_per_engine: int = Field(1, ge=1)
    """GPUs of one engine (its tensor parallel size); ignored on CPU."""
    cpus_per_engine: float = Field(1.0, ge=0)
    gpu_memory_utilization: float = 0.5
    """Fraction of its GPU memory one engine may take (weights + KV cache)."""
    enforce_eager: bool = False
    """Skip CUDA graphs and compilation (faster start, slower generation)."""
    max_lora_rank: int | None = None
    """Largest LoRA rank the engines accept; None means `lora.r` (`Config.engine_lora_rank`)."""
    kv_cache_space_gb: int = Field(1, ge=1)
    """KV cache size of a CPU engine in GiB (VLLM_CPU_KVCACHE_SPACE, whole GiB)."""
    kv_cache_gb: float | None = Field(None, gt=0)
    """KV cache of a GPU engine in GiB (vLLM's `kv_cache_memory_bytes`); None: vLLM sizes it
    from `gpu_memory_utilization` and the memory it finds free while it starts, so on a shared
    GPU (`cluster.colocate`) each engine must be ready before the next one starts and before the
    learner loads its weights (its imports run beside them). Given, the engine no longer
    measures free memory, and the learner loads while the engines start (shorter start-up).
    vLLM's start-up log says what `gpu_memory_utilization` gave ("Current kv cache memory in use
    is 41.63 GiB" for configs/qwen2.5-3b-gsm8k-1gpu.yaml on an H200)."""
    merge_adapter: bool = False
    """Fold each synced adapter into the engine's own weights (in memory, from a pristine copy
    of the base kept beside them) and generate without LoRA, at plain vLLM's speed; the sync
    still moves only the adapter. Costs a copy of the targeted base weights on the engine's
    device; one GPU per engine (`sync.merged`)."""


BUILTIN_REWARDS = ("correctness", "integer", "strict_format", "soft_format", "xml_count", "math",
                   "overlong")
"""Names of the built-in rewards (grpo_ray/reward/functions.py)."""
JUDGING_REWARDS = ("math", "correctness")
"""Built-ins that judge right answers when no reward is marked `correctness: true`."""
_BUILTIN_KWARGS = {"math": ("timeout_s",), "overlong": ("max_completion_len", "soft_punish_cache")}
TRL_PREFIX = "trl:"
"""`trl:NAME` names a reward function of `trl.rewards` (grpo_ray/reward/registry.py)."""
_OVERLONG = ("overlong", "trl:get_soft_overlong_punishment")
"""The same function (TRL's DAPO soft overlong punishment), so the same rules on its lengths."""


class RewardFunctionConfig(_Section):
    name: str
    """A built-in reward (`correctness`, `integer`, `strict_format`, `soft_format`, `xml_count`,
    `math`, `overlong`), one of TRL's by short name (`trl:accuracy_reward`, which reads a
    `solution` column, `trl:think_format_reward`; a `trl:get_*` factory such as
    `trl:get_cosine_scaled_reward` gets `kwargs` and makes the function) or an import path
    `package.module:function` with TRL's reward signature."""
    weight: float = 1.0
    correctness: bool = False
    """This reward judges right answers: the step `accuracy` and evaluation's accuracy, pass@k
    and maj@k count a completion right when its score is > 0. When no reward is marked, the
    built-in `math` or `correctness` judges (at most one of them may be configured then); with
    neither, GSM8K's numeric rule does. At most one reward is marked. A marked reward may have
    weight 0: it then judges without shaping the reward."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments passed to the function on every call, over the dataset columns of the
    same name: `math` takes `timeout_s`; `overlong` needs `max_completion_len` (equal to
    `rollout.max_completion_length`) and `soft_punish_cache` (DAPO's L_cache, in tokens)."""

    def __init__(self, name: str | None = None, weight: float | None = None, **data: Any):
        # positional construction in code (`RewardFunctionConfig("correctness", 2.0)`); the
        # config loader validates mappings without calling __init__
        if name is not None:
            data["name"] = name
        if weight is not None:
            data["weight"] = weight
        super().__init__(**data)


def _default_rewards() -> list[RewardFunctionConfig]:
    names = ["xml_count", "soft_format", "strict_format", "integer", "correctness"]
    return [RewardFunctionConfig(n) for n in names]


class RewardConfig(_Section):
    functions: list[RewardFunctionConfig] = Field(default_factory=_default_rewards, min_length=1)
    """Reward functions, summed with their weights."""
    mode: Literal["fixed", "seed-parity"] = "fixed"
    """`seed-parity` reproduces the reference notebook's rewards exactly, flaws included;
    `fixed` accepts multi-line reasoning and numerically equal answers ("18.0", "$18", "1,000")."""
    num_workers: int = Field(2, ge=1)
    """Reward actors in the pool."""
    cpus_per_worker: float = Field(0.25, ge=0)
    timeout_s: float = Field(60.0, gt=0)
    """A scoring call still running after this long is a hung function: its worker is killed and
    replaced, and the shard is scored again without that function (its rows unscored for it)."""
    max_unscored_fraction: float = Field(0.5, ge=0, le=1)
    """The run fails, naming the functions, when more than this fraction of a step's completions
    have no score, or when one function fails (raises, hangs, returns NaN/inf) on more than this
    fraction. 0.5: a passing failure of one of the default two reward workers' shards (half the
    step) still trains on the other half, while a function that fails everywhere, such as one
    returning NaN for every row, stops the run at its first step instead of training on nothing
    (or on the other functions alone) without a word. Raise it (up to 1) for functions that leave
    most rows unscored by design."""


class LearnerConfig(_Section):
    backend: Literal["auto", "peft", "unsloth"] = "auto"
    """`unsloth`: Unsloth's 4-bit loader and kernels (CUDA); `peft`: transformers +
    bitsandbytes + PEFT; `auto`: Unsloth where it is installed and CUDA is there, else PEFT.
    The start-up line says which runs and why."""
    load_in_4bit: bool | None = None
    """NF4 with double quantization through bitsandbytes; None: on CUDA when it is installed.
    True needs a GPU for the learner (`learner.num_gpus` > 0)."""
    gradient_checkpointing: bool = True
    upcast_unquantized_to_fp32: bool = False
    """bitsandbytes 4-bit + PEFT only. True: PEFT's `prepare_model_for_kbit_training`, which turns
    every weight bitsandbytes left unquantized (norms, embeddings, lm_head) into fp32, so the
    residual stream runs in fp32. False (default) leaves them bf16, as TRL's GRPOTrainer (which
    does not call it) and Unsloth do; the LoRA weights stay fp32 either way. On an H200 at the 3B
    shape, false took the update from 5.26 to 3.57 s and the learner's peak from 13.8 to 8.8 GiB,
    and a 120-step learn run's checks held with it (docs/benchmarks.md)."""
    learning_rate: float = Field(5e-6, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.99, ge=0, lt=1)
    weight_decay: float = Field(0.1, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    lr_scheduler_type: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    max_grad_norm: float = Field(0.1, gt=0)
    micro_batch_size: int = Field(8, ge=1)
    """Sequences per forward/backward when `max_tokens_per_micro_batch` is None; gradients
    accumulate over the whole step's batch."""
    max_tokens_per_micro_batch: int | None = Field(None, ge=1)
    """Budget of padded positions per forward/backward (rows x longest row), which bounds the
    learner's activation memory whatever the completions' lengths; replaces `micro_batch_size`.
    Rows are grouped longest first, so rows of like lengths share a micro-batch and little is
    padding (`learner/padding_fraction`). Must hold the longest row, data.max_prompt_length +
    rollout.max_completion_length."""
    logprob_chunk_size: int = Field(1024, ge=1)
    """Positions whose vocabulary logits are materialized at once when computing the chosen
    tokens' log-probabilities (the `chunked` loss kernel and every pass without gradients)."""
    cast_lm_head_to_fp32: bool | None = False
    """The log-prob matmul's dtype (hidden states x lm_head). False, TRL's default: the learner's
    compute dtype (bf16 on a GPU), the logits then taken to fp32 for the softmax. True: fp32
    (TRL's `cast_lm_head_to_fp32`). None: the lm_head weight's own dtype, what this project ran
    before: bf16 with Unsloth, fp32 after PEFT's 4-bit preparation. At the 3B shape on an H200
    (one process, docs/benchmarks.md) false took the bnb + PEFT update from 5.99 to 5.05 s and
    its reference pass from 1.44 to 1.13 s; Unsloth's lm_head is bf16 anyway. The same on a CPU
    (fp32 throughout)."""
    loss_kernel: Literal["chunked", "liger"] = "chunked"
    """How the update turns the last hidden states into the loss. `chunked`: the lm_head
    `logprob_chunk_size` positions at a time (checkpointed), then `algo.grpo.grpo_loss`.
    `liger`: Liger-Kernel's fused linear GRPO loss (`LigerFusedLinearGRPOLoss`, what TRL's
    `use_liger_kernel` runs), which streams the lm_head by 2048 positions x 4096 vocabulary
    entries, forward and backward; the same loss, gradients and metrics (fp32 on CPU: within
    2e-6; bf16 on an H200: LoRA gradients within 1.4% of their norm). Opt-in, as in TRL: at the
    3B shape on an H200 its update is 0.65 s slower than `chunked` for the same peak memory
    (docs/design.md). Needs the liger-kernel package (the `gpu` extra)."""
    num_gpus: float = Field(1.0, ge=0, le=1)
    """GPUs of the learner actor: 1, 0 on CPU, or with `cluster.colocate` the fraction of the
    shared GPU it takes (the engines split the rest). The learner computes on one device."""
    num_cpus: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _liger_installed(self) -> "LearnerConfig":
        if self.loss_kernel == "liger":
            _require(importlib.util.find_spec("liger_kernel") is not None, "loss_kernel",
                     "liger needs the liger-kernel package (pip install liger-kernel==0.8.5); "
                     "learner.loss_kernel=chunked runs without it")
        return self


LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo"]
"""`algorithm.loss_type`: the losses registered in `algo.losses` (a test keeps the two equal)."""


class AlgorithmConfig(_Section):
    total_steps: int = Field(250, ge=1)
    beta: float = Field(0.04, ge=0)
    """Weight of the per-token KL (k3 estimator) to the reference model; 0 skips the reference."""
    epsilon: float = Field(0.2, gt=0, lt=1)
    """Lower clip range of the probability ratio."""
    epsilon_high: float | None = Field(None, gt=0)
    """Upper clip range; None means `epsilon` (DAPO's clip-higher when larger). For `cispo` it is
    the cap of the importance weight itself (ScaleRL's eps_max, 5.0 there), as in TRL."""
    delta: float | None = Field(None, gt=0)
    """Two-sided clipping (INTELLECT-2): the ratio is also capped at `delta` where the advantage
    is negative, so a token far above the old policy cannot get an unbounded push down; None:
    off. Recommended above 1 + epsilon_high. The clipped losses only (grpo, bnpo, dr_grpo, dapo,
    luspo)."""
    loss_type: LossType = "grpo"
    """The policy loss (`algo.losses`, one registered function each; TRL's `loss_type`).
    `grpo`: clipped ratio, each sequence's token mean, then the mean over sequences
    (DeepSeekMath); `bnpo` and `dapo`: clipped ratio, the mean over every token of the step's
    batch (DAPO; TRL's bnpo normalizes each micro-batch by its own tokens, here both by the
    whole batch's); `dr_grpo`: clipped ratio, the sum over tokens / (sequences x
    max_completion_length) (Dr. GRPO); `luspo`: clipped ratio, each sequence's token sum, then
    the mean over sequences (LUSPO, meant with `importance_sampling_level: sequence`); `cispo`:
    the importance weight capped at `epsilon_high` and detached, times the advantage and the
    log-prob, token mean (MiniMax-M1); `sapo`: a soft sigmoid gate in place of the clip,
    sequence then batch mean (SAPO); `vespo`: a gamma weighting of the sequence's importance
    weight times the advantage and the log-prob, token mean (VESPO).

    The default stays `grpo`, where TRL's is `dapo`: this section's defaults are the reference
    recipe's, and the reference notebook ran TRL's then-default `grpo`; the CPU learning
    benchmark (configs/learn-cpu.yaml, 60 steps, seeds 3407, 1, 2; 2 CPU cores, 2026-12-07)
    does not tell the two apart: held-out sampled accuracy 0.197/0.207/0.196 -> 0.418/0.386/
    0.339 with `grpo` (after: 0.339-0.418, mean 0.381), -> 0.425/0.411/0.318 with `dapo`
    (0.318-0.425, mean 0.385), strict format after 0.92-0.96 and 0.91-0.95 (docs/learning.md).
    A TRL user's file gets `dapo` through `--trl-config` (TRL's defaults apply there)."""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """The policy loss's importance weight pi / pi_old: one per token, or one per sequence, exp
    of the mean of its tokens' log-ratios (GSPO; TRL's `importance_sampling_level`). GSPO's own
    setup is `sequence` with `loss_type: grpo`."""
    sapo_temperature_pos: float = Field(1.0, gt=0)
    """`sapo`'s gate temperature where the advantage is positive."""
    sapo_temperature_neg: float = Field(1.05, gt=0)
    """`sapo`'s gate temperature where the advantage is not positive."""
    vespo_k_pos: float = 2.0
    """`vespo`'s power k of the weight phi(w) = e^lambda w^k e^(-lambda w) for advantages >= 0:
    how hard sequences with w < 1 are damped."""
    vespo_lambda_pos: float = 3.0
    """`vespo`'s decay lambda for advantages >= 0: how hard sequences with w > 1 are damped."""
    vespo_k_neg: float = 3.0
    """`vespo`'s k for negative advantages."""
    vespo_lambda_neg: float = 2.0
    """`vespo`'s lambda for negative advantages."""
    top_entropy_quantile: float = Field(1.0, ge=0, le=1)
    """Keep only this top fraction of the batch's completion tokens, by the entropy of the
    policy's distribution there, in the policy term (Beyond the 80/20 Rule: 0.2; TRL's
    `top_entropy_quantile`); 1 keeps every token, 0 only the highest. The threshold is the
    quantile over the whole step's batch (TRL's over each micro-batch: the same with one), from
    entropies computed in the chunked log-prob pass without gradients that runs before each
    optimizer pass (the old log-probs' pass); the KL term keeps every token. The `entropy`
    metric is logged with it."""
    off_policy_mask_threshold: float | None = Field(None, ge=0)
    """DeepSeek-V3.2's off-policy sequence mask: a completion with a negative advantage whose
    mean per-token KL(rollout engine || policy) estimate exceeds this is left out of the policy
    term (0.5 in TRL's docs); None: off (TRL's `off_policy_mask_threshold`)."""
    use_bias_correction_kl: bool = False
    """Multiply the KL term by the importance weight pi / pi_old, which makes its gradient the
    unbiased reverse-KL gradient (DeepSeek-V3.2; TRL's `use_bias_correction_kl`, default true
    there). False keeps the plain k3 term, what this project always ran; the two differ in the
    gradient even on policy (the weight is 1 but differentiable)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Divide advantages by the std of the group, of the batch, or not at all (Dr. GRPO)."""
    multi_objective_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = \
        "sum_then_normalize"
    """How several reward functions become one advantage (TRL's option of the same name).
    `sum_then_normalize`: the weighted sum of the functions (`reward.functions[i].weight`),
    then group-relative advantages scaled by `scale_rewards`. `normalize_then_sum` (GDPO): each
    function normalized within its group, the weighted sum normalized over the batch;
    `scale_rewards` does not apply."""
    num_iterations: int = Field(1, ge=1)
    """Optimizer passes over each generated batch (GRPO's mu); the ratio is 1 on the first."""
    importance_sampling_correction: bool | None = None
    """Weight each token (or sequence) of the policy term by p_learner / p_rollout, p_rollout
    being the engine's probability under the adapter version it sampled with, truncated or
    masked per `importance_sampling_mode`: it corrects the rollout/learner probability gap and,
    one step off policy, the version the batch is behind (TRL's vLLM importance sampling).
    None: on when `max_staleness` > 0, off otherwise (resolved when the config loads)."""
    importance_sampling_mode: Literal["token_truncate", "token_mask", "sequence_truncate",
                                      "sequence_mask"] = "token_truncate"
    """TRL's `vllm_importance_sampling_mode`: a weight per token or one per sequence (the product
    of its token ratios), truncated to [importance_sampling_min, importance_sampling_cap] or
    masked (set to 0) outside it. `token_truncate` is the truncated importance sampling this
    project ran before the modes existed, and stays the default; TRL's is `sequence_mask`."""
    importance_sampling_cap: float | None = Field(2.0, gt=0)
    """Upper bound of the importance weight (TRL's `vllm_importance_sampling_clip_max`, 3.0
    there); None: none."""
    importance_sampling_min: float | None = Field(None, ge=0)
    """Lower bound (TRL's `vllm_importance_sampling_clip_min`); None: none."""
    max_staleness: int = Field(0, ge=0, le=1)
    """0: on policy, each step runs generate -> score -> update -> sync in turn. 1: one step off
    policy: while the learner trains on batch s, the engines generate batch s+1 with the adapter
    they hold (version s), and the new adapter reaches them between generate calls, never inside
    one; each batch is then at most one version behind the learner."""
    filter_zero_variance_groups: bool = False
    """DAPO's dynamic sampling: groups whose rewards are all equal carry no gradient; drop them
    and fill the batch with groups of extra prompts (whole batches of the next prompts, at most
    `max_refill_rounds`), so every update sees `rollout.prompts_per_step` groups that teach."""
    max_refill_rounds: int = Field(2, ge=0)
    """Extra batches generated at most per step to refill dropped groups (the bound on
    over-generation); a step that is still short trains on the groups it has."""
    mask_truncated_completions: bool = False
    """Leave completions cut at `rollout.max_completion_length` (finish reason `length`) out of
    the loss (TRL's option of the same name, from DAPO): a truncated text is no evidence of a
    good or bad answer. Their rewards still count in their group's advantages."""
    seed: int = 3407

    @model_validator(mode="after")
    def _resolve_importance_sampling(self) -> "AlgorithmConfig":
        if self.importance_sampling_correction is None:  # resolved once, here
            self.importance_sampling_correction = self.max_staleness > 0
        low, high = self.importance_sampling_min, self.importance_sampling_cap
        _require(low is None or high is None or low < high, "importance_sampling_min",
                 f"{low} must be below algorithm.importance_sampling_cap ({high})")
        if not self.importance_sampling_correction:
            return self
        _require(not (self.importance_sampling_mode.endswith("_truncate")
                      and low is None and high is None), "importance_sampling_mode",
                 f"{self.importance_sampling_mode} needs a bound: set "
                 "algorithm.importance_sampling_cap or algorithm.importance_sampling_min")
        _require(not (self.loss_type == "vespo"
                      and self.importance_sampling_mode.startswith("sequence")),
                 "importance_sampling_mode",
                 f"loss_type=vespo puts the rollout weights into its own sequence weight, token "
                 f"by token: use token_truncate or token_mask with algorithm.loss_type=vespo "
                 f"(got {self.importance_sampling_mode})")
        return self


class ClusterConfig(_Section):
    address: str | None = None
    """Ray address; None uses RAY_ADDRESS when set, else starts an embedded local Ray."""
    num_cpus: int | None = Field(None, ge=1)
    """CPUs of an embedded local Ray (None: all)."""
    num_gpus: int | None = Field(None, ge=0)
    """GPUs of an embedded local Ray (None: all that are visible)."""
    use_gpu: bool | None = None
    """Place actors on GPUs; None: when the Ray cluster has any."""
    colocate: bool = False
    """Learner and the rollout engine share one GPU through fractional resources (one-GPU
    mode): the learner takes `learner.num_gpus` of it, the engine the rest."""
    placement_strategy: Literal["PACK", "SPREAD"] = "PACK"
    """How the placement group lays the learner's and the engines' bundles over the nodes
    (Ray's strategies): PACK fills a node before the next (fewest nodes, the learner beside
    the engines); SPREAD puts them on different nodes where it can (a node lost takes fewer
    roles with it). Either way a bundle of a lost node is placed again on a survivor with room."""
    placement_timeout_s: float = Field(120.0, gt=0)
    """How long to wait for the cluster (joining it, and the placement group) before failing
    with what is missing."""
    max_restarts: int = Field(2, ge=0)
    """Rollout engines or reward workers started again within one call (a generation, an adapter
    load, a probe, one step's scoring) after their process died or their call ran past its
    deadline, before the run fails; for the learner, restarts before it completes a step again.
    Per call, not per run: a long run survives any number of separate losses, a crash loop fails
    at once."""
    restart_timeout_s: float = Field(600.0, gt=0)
    """How long an actor may take to be placed and to start, at the run's start or as a
    replacement (a vLLM engine: 56-180 s on an H200 with compilation, ~10 s on CPU; the learner:
    ~2 min for a 3B 4-bit load, ~5 s for the tiny CPU model) before the run fails."""
    replace_timeout_s: float = Field(300.0, gt=0)
    """An elastic fleet (`rollout.min_engines` below `max_engines`): how long a lost engine's
    replacement may wait for room in the cluster before the engine is dropped (its slice
    generated by the others; at least `rollout.min_engines` still serve) or, below that, the run
    ends with a checkpoint (exit 3). A fixed fleet waits `restart_timeout_s`."""
    autoscale: bool = False
    """Ask Ray's autoscaler (KubeRay, `ray up`) for the bundles of up to `rollout.max_engines`
    engines (`ray.autoscaler.sdk.request_resources`), so that it adds GPU nodes for rollout
    alone; the request is withdrawn when the run ends."""
    generate_floor_tokens_per_s: float = Field(200.0, gt=0)
    """Deadline of a generation call: the engine's share of prompts x n x max_tokens at this
    throughput, plus `deadline_slack_s`; a call past it is a hung engine (killed, replaced, its
    slice generated again). 200 tok/s is 65-125x below a 3B LoRA engine on an H200 (13-25k tok/s)
    and 4-15x below the tiny model's vLLM CPU engine on 2 shared cores (750-2900 tok/s on 8
    sequences). A hang of the reference recipe's step (16 x 8 x 200 tokens) fires after ~5 min."""
    update_floor_tokens_per_s: float = Field(200.0, gt=0)
    """Deadline of a learner update: the batch's prompt + completion tokens, times
    `algorithm.num_iterations`, at this throughput, plus `deadline_slack_s`; past it the learner
    is hung: restarted from the newest checkpoint. 200 tok/s is 30-60x below a 3B QLoRA step on an
    H200 (16 x 8 x 456 tokens in 5-10 s) and ~50x below the tiny CPU learner (~740 tokens in
    0.05-0.08 s). A hang of the reference recipe's update fires after ~8 min."""
    deadline_slack_s: float = Field(180.0, gt=0)
    """Added to every deadline that follows from the work: a first call's compilation (up to a
    minute on GPU; a recompile for a new shape took 12.7 s), scheduling, a busy machine."""
    call_timeout_s: float = Field(180.0, gt=0)
    """Deadline of the small calls: an adapter load (70-250 ms on GPU), the sync probe's scoring,
    version and device queries, the learner's adapter export, its probe log-probs (the first may
    compile: ~1 min) and its checkpoint state (~1.4 GB for a 3B rank-64 learner: seconds). Past
    it the actor is hung and is replaced."""
    sync_probe: bool = True
    """After every sync, each engine and the learner score a few fixed completions (a few
    hundred tokens, one short forward each); an engine whose log-probs did not move as the
    learner's did is reloaded, then replaced, then the run fails (`sync.probe`). The
    exact identity check (version and digest of the tensors each engine holds) runs always."""
    sync_probe_min_slope: float = 0.5
    """An engine fails the probe when the slope of its log-prob movement against the learner's
    (1: it serves the learner's adapter, 0: the base model) is below this by `sync_probe_z`
    standard errors. Measured on CPU (fp32 engine and learner, tiny-cpu, rollout.temperature
    0.7 and 1): healthy engines 0.999996-1.000003 with a standard error of 1e-6-3e-6; an engine
    serving the base model exactly 0 (its error 0), with the learner moved 0.039-0.049
    nats/token. 16-bit engines beside a 4-bit learner: see the `sync/probe/...` metrics."""
    sync_probe_max_slope: float = Field(1.5, gt=1)
    """... or above this by `sync_probe_z` standard errors (weights damaged upwards, e.g. the
    adapter applied twice)."""
    sync_probe_z: float = Field(4.0, gt=0)
    """How many standard errors of the slope (from the per-token residuals) the slope must be
    outside [min, max]: noisy engines (bf16 against a 4-bit learner, ~0.04 nats/token of kernel
    noise on the 3B shape) get a wide error and cannot fail until the learner has moved far."""
    sync_probe_min_movement: float | None = Field(None, ge=0)
    """No judgement before the learner's log-probs of the probe moved this far from its base
    model on average (nats per token). None: by the engines' dtype, 1e-3 for fp32 engines and
    0.05 for 16-bit ones, which round part of a young adapter's tiny deltas away (measured on
    an H200: slope 0.2-0.33 at movement 0.01, 0.9 at 0.04; `probe.default_min_movement`)."""

    @model_validator(mode="after")
    def _slope_range(self) -> "ClusterConfig":
        if not self.sync_probe_min_slope < 1 < self.sync_probe_max_slope:
            raise ValueError(f"cluster.sync_probe_min_slope ({self.sync_probe_min_slope:g}) must "
                             "be below 1 (a healthy engine's slope) and sync_probe_max_slope above")
        return self


class EvalConfig(_Section):
    split: str | None = None
    """Split of held-out prompts, over `data.eval_split` (`Config.eval_split`); `data.split`
    (`train`) evaluates on the training rows."""
    num_samples: int = Field(64, ge=0)
    """Held-out prompts evaluated (the first ones, in file order); 0: all of the split."""
    every_steps: int = Field(0, ge=0)
    """Also evaluate every N steps (0: only before the first step and after the last)."""
    max_tokens: int | None = None
    """Longest completion; None: `rollout.max_completion_length` (`Config.eval_max_tokens`)."""
    temperature: float = Field(0.0, ge=0)
    """0: greedy answers, stopped after `</answer>`. Above 0: `samples` completions per prompt
    sampled at this temperature with a fixed seed, as the policy samples in training: accuracy
    that moves smoothly with the policy, where greedy answers of a small model flip on small
    changes."""
    samples: int = Field(1, ge=1)
    """Completions per held-out prompt, k of pass@k (any of them right), mean@k (the accuracy)
    and maj@k (the most common answer right, answers compared by the judging reward's rule);
    1 when greedy."""
    sanity_question: str = "How many r's are in strawberry?"
    """Asked without and with the trained adapter, both answers printed (the reference notebook's
    check, answered greedily here with the XML system prompt both times)."""


class LoggingConfig(_Section):
    progress_bar: bool = True
    """A bar over steps with reward, accuracy and step time (on a terminal run)."""
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "grpo-ray"
    samples_per_step: int = Field(4, ge=0)
    """Completions written per step to `completions.jsonl` (prompt, completion, each reward)."""


class OutputConfig(_Section):
    dir: str = "outputs/run"
    save_every: int = Field(10, ge=0)
    """Checkpoint every N steps (0: only at the end). A lost or hung learner is restarted from
    the newest checkpoint (none yet: from step 0 and the base model), so this bounds the steps
    it redoes. 10: on the 2-core CPU a checkpoint of the tiny learner costs 13-28 ms against
    0.2-0.6 s steps (<1%); for the 3B rank-64 recipe (~1.9 GB written and hashed, est. 2-5 s,
    against 5-10 s steps) about 5% of the run, and at most 10 steps (~1.5 min) redone."""
    keep_checkpoints: int = Field(2, ge=1)
    """Checkpoints kept under `<dir>/checkpoints` (the newest ones); older ones are deleted once
    a newer one is complete."""


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    # ---- values derived from several fields: computed here only ------------------------------
    @property
    def engine_lora_rank(self) -> int:
        """Largest LoRA rank the engines accept (`rollout.max_lora_rank`, default `lora.r`)."""
        return self.rollout.max_lora_rank or self.lora.r

    @property
    def eval_split(self) -> str | None:
        """The split evaluation names (`eval.split`, else `data.eval_split`); None: the data's
        default held-out rows (`driver.data.dataset.load_eval_rows`)."""
        return self.eval.split or self.data.eval_split

    @property
    def correctness_index(self) -> int | None:
        """Index in `reward.functions` of the reward that judges right answers: the one marked
        `correctness: true`, else the built-in `math` or `correctness`; None: none does (GSM8K's
        numeric rule judges). The invariants make it unique."""
        functions = self.reward.functions
        marked = [i for i, f in enumerate(functions) if f.correctness]
        named = [i for i, f in enumerate(functions) if f.name in JUDGING_REWARDS]
        found = marked or named
        return found[0] if found else None

    @property
    def eval_max_tokens(self) -> int:
        return self.eval.max_tokens or self.rollout.max_completion_length

    @property
    def fleet_bounds(self) -> tuple[int, int]:
        """(min, max) rollout engines (`rollout.min_engines`, `max_engines`; `num_engines`
        where unset)."""
        r = self.rollout
        return r.min_engines or r.num_engines, r.max_engines or r.num_engines

    @property
    def elastic(self) -> bool:
        """Whether the fleet of rollout engines may grow or shrink during the run."""
        low, high = self.fleet_bounds
        return low != high

    @property
    def colocated_gpu_shares(self) -> tuple[float, float]:
        """(learner, each engine) fractions of the one GPU they share with `cluster.colocate`:
        the engines split what the learner leaves."""
        share = self.learner.num_gpus
        return share, round((1 - share) / self.rollout.num_engines, 6)

    # ---- invariants between fields -----------------------------------------------------------
    @model_validator(mode="after")
    def _given_keys_take_effect(self, info: ValidationInfo) -> "Config":
        """Each key of `TAKES_EFFECT_ONLY` that was given (in a YAML file or an override, not by
        a `--trl-config` base, which carries TRL's defaults) with a value other than its default
        must have the setting beside it that makes it count: else ConfigError naming both. Not
        where a later layer turned that setting off (`data.source=local` on the command line
        over a file written for synthetic data): the file's synthetic keys are then moot."""
        given = (info.context or {}).get("given") if info.context else None
        if given is None:  # built in code: the fields its sections were given
            given = dict.fromkeys(_fields_set(self), 1)
        for key, other, applies, needs in TAKES_EFFECT_ONLY:
            section, name = key.split(".")
            default = type(getattr(self, section)).model_fields[name].get_default(
                call_default_factory=True)
            if (given.get(key, 0) >= max(1, given.get(other, 0))
                    and getattr(getattr(self, section), name) != default and not applies(self)):
                other_section, other_name = other.split(".")
                _require(False, key, f"has no effect unless {needs}, and here {other}="
                         f"{_brief(getattr(getattr(self, other_section), other_name))}: drop "
                         f"it, or change {other}")
        return self

    @model_validator(mode="after")
    def _invariants(self) -> "Config":
        r, lr, d = self.rollout, self.learner, self.data
        _require(r.num_generations >= 2, "rollout.num_generations",
                 f"must be >= 2 (got {r.num_generations}): group-relative advantages of a "
                 "group of one are always zero")
        low, high = self.fleet_bounds
        _require(low <= r.num_engines <= high, "rollout.num_engines",
                 f"must lie between rollout.min_engines ({low}) and rollout.max_engines "
                 f"({high}) (got {r.num_engines})")
        if self.elastic:  # a changing fleet splits prompts unevenly (by at most one)
            _require(not self.cluster.colocate, "rollout.max_engines",
                     "an elastic fleet (rollout.min_engines < rollout.max_engines) needs "
                     "engines on GPUs of their own, not cluster.colocate=true")
            _require(r.prompts_per_step >= high, "rollout.prompts_per_step",
                     f"{r.prompts_per_step} prompts leave some of rollout.max_engines={high} "
                     "engines without work")
        else:
            _require(r.prompts_per_step % r.num_engines == 0, "rollout.prompts_per_step",
                     f"{r.prompts_per_step} prompts cannot be split evenly over "
                     f"rollout.num_engines={r.num_engines}")
        _require(d.max_prompt_length + r.max_completion_length <= r.max_model_len,
                 "rollout.max_model_len",
                 f"{r.max_model_len} < data.max_prompt_length + rollout.max_completion_length "
                 f"({d.max_prompt_length} + {r.max_completion_length})")
        _require(0 < r.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization",
                 f"must be in (0, 1] (got {r.gpu_memory_utilization})")
        _require(r.temperature > 0, "rollout.temperature", "must be > 0 (GRPO samples)")
        _require(self.lora.r <= self.engine_lora_rank, "rollout.max_lora_rank",
                 f"{self.engine_lora_rank} is below lora.r={self.lora.r}: the engines would "
                 "refuse the adapter")
        if r.merge_adapter:
            _require(r.gpus_per_engine == 1, "rollout.merge_adapter",
                     "merges into unsharded weights: needs rollout.gpus_per_engine=1")
        if d.source == "local":
            _require(d.path is not None, "data.path", "is required with data.source=local")
        self._data_invariants()
        self._reward_invariants()
        if self.model.path == "builtin:tiny-warm":
            _require(d.source == "synthetic", "model.path",
                     f"builtin:tiny-warm warms up on synthetic rows; it needs "
                     f"data.source=synthetic (got data.source={d.source})")
        if lr.load_in_4bit:
            _require(lr.num_gpus > 0 and self.cluster.use_gpu is not False, "learner.load_in_4bit",
                     "4-bit (bitsandbytes) needs the learner on a GPU: learner.num_gpus > 0 and "
                     "cluster.use_gpu not false")
        if lr.max_tokens_per_micro_batch is not None:
            longest = d.max_prompt_length + r.max_completion_length
            _require(lr.max_tokens_per_micro_batch >= longest, "learner.max_tokens_per_micro_batch",
                     f"{lr.max_tokens_per_micro_batch} < data.max_prompt_length + "
                     f"rollout.max_completion_length ({d.max_prompt_length} + "
                     f"{r.max_completion_length}): the longest row would not fit")
        if self.cluster.colocate:
            _require(0 < lr.num_gpus < 1, "learner.num_gpus",
                     f"must be a fraction in (0, 1) with cluster.colocate (got {lr.num_gpus:g}): "
                     "the learner's share of the GPU it shares with the engine")
        self._eval_invariants()
        self._loss_kernel_invariants()
        return self

    def _loss_kernel_invariants(self) -> None:
        """What Liger's fused GRPO loss (0.8.5) cannot compute as TRL does is refused with it."""
        if self.learner.loss_kernel != "liger":
            return
        a = self.algorithm
        refused = {
            "algorithm.loss_type=luspo": a.loss_type == "luspo",  # its token-level sum differs
            f"algorithm.importance_sampling_level=sequence with loss_type={a.loss_type}":
                a.importance_sampling_level == "sequence" and a.loss_type in (
                    "cispo", "sapo", "vespo"),
            f"algorithm.top_entropy_quantile={a.top_entropy_quantile}":
                a.top_entropy_quantile < 1,
            f"algorithm.off_policy_mask_threshold={a.off_policy_mask_threshold}":
                a.off_policy_mask_threshold is not None,
        }
        for what, bad in refused.items():
            _require(not bad, "learner.loss_kernel",
                     f"liger (Liger-Kernel's fused GRPO loss) does not compute {what} as TRL "
                     "does; use learner.loss_kernel=chunked")

    def _data_invariants(self) -> None:
        d = self.data
        _require(d.question_field != d.answer_field, "data.answer_field",
                 f"must differ from data.question_field (both {d.answer_field!r})")
        if d.source == "synthetic":  # generated rows have GSM8K's shape, nothing to map
            for key, value in (("question_field", d.question_field),
                               ("answer_field", d.answer_field), ("gold", d.gold)):
                default = DataConfig.model_fields[key].default
                _require(value == default, f"data.{key}",
                         f"applies to hub and local data; data.source=synthetic generates "
                         f"GSM8K-shaped rows (got {value!r}, the default is {default!r})")

    def _reward_invariants(self) -> None:
        functions = self.reward.functions
        for i, f in enumerate(functions):
            key, kw = f"reward.functions[{i}].kwargs", f.kwargs
            if f.name in BUILTIN_REWARDS:
                known = _BUILTIN_KWARGS.get(f.name, ())
                unknown = [k for k in kw if k not in known]
                _require(not unknown, key, f"unknown argument(s) {', '.join(unknown)} of the "
                         f"built-in {f.name!r} (it takes: {', '.join(known) or 'none'})")
            if f.name.startswith(TRL_PREFIX):
                short = f.name[len(TRL_PREFIX):]
                _require(short.isidentifier(), f"reward.functions[{i}].name",
                         f"{f.name!r}: after 'trl:' comes the name of a function of trl.rewards, "
                         "e.g. trl:accuracy_reward")
            if f.name == "math" and "timeout_s" in kw:
                t = kw["timeout_s"]
                _require(isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0, key,
                         f"math's timeout_s must be a number of seconds > 0 (got {t!r})")
            if f.name not in _OVERLONG:
                continue
            limit = self.rollout.max_completion_length
            _require(kw.get("max_completion_len") == limit, key,
                     f"{f.name} needs max_completion_len equal to rollout.max_completion_length "
                     f"({limit}; got {kw.get('max_completion_len')!r})")
            cache = kw.get("soft_punish_cache")
            _require(isinstance(cache, int) and not isinstance(cache, bool)
                     and 1 <= cache <= limit, key,
                     f"{f.name} needs soft_punish_cache, the tokens before max_completion_len "
                     f"over which the penalty grows, in [1, {limit}] (got {cache!r})")
        self._one_judge()

    def _one_judge(self) -> None:
        """At most one reward judges right answers (`correctness_index`)."""
        functions = self.reward.functions
        marked = [f"reward.functions[{i}] ({f.name})" for i, f in enumerate(functions)
                  if f.correctness]
        _require(len(marked) <= 1, "reward.functions",
                 f"{len(marked)} rewards are marked correctness: true ({', '.join(marked)}); "
                 "one judges right answers")
        named = [f"reward.functions[{i}] ({f.name})" for i, f in enumerate(functions)
                 if f.name in JUDGING_REWARDS]
        _require(bool(marked) or len(named) <= 1, "reward.functions",
                 f"{' and '.join(named)} could each judge right answers: mark the one that does "
                 "with correctness: true")

    def _eval_invariants(self) -> None:
        e, r, d = self.eval, self.rollout, self.data
        _require(e.temperature > 0 or e.samples == 1, "eval.samples",
                 f"must be 1 with eval.temperature=0 (greedy gives one answer; got {e.samples})")
        if e.max_tokens is not None:
            room = r.max_model_len - d.max_prompt_length
            _require(1 <= e.max_tokens <= room, "eval.max_tokens",
                     f"must be in [1, rollout.max_model_len - data.max_prompt_length = {room}] "
                     f"(got {e.max_tokens})")
        held_out = [f"data.{k}" for k in ("eval_path", "eval_fraction") if getattr(d, k)]
        _require(len(held_out) <= 1, "data.eval_fraction",
                 "data.eval_path and data.eval_fraction are two ways to hold rows out: set one")
        if held_out:
            _require(d.source != "synthetic", held_out[0],
                     "data.source=synthetic has its own held-out rows (another seed, no question "
                     "of the train rows); this applies to hub and local data")
            _require(self.eval_split != d.split, "eval.split",
                     f"eval.split={self.eval_split} evaluates on the training rows, "
                     f"{held_out[0]} holds rows out for evaluation: set one of them")
        elif d.source == "local" and d.path is not None and is_local_file(d.path):
            # one file is one split: evaluating on its training rows must be asked for
            _require(self.eval_split == d.split, "data.eval_fraction",
                     f"data.path={d.path} is one split: hold rows out for evaluation with "
                     f"data.eval_fraction (a seeded share of it) or data.eval_path (a second "
                     f"file), or evaluate on the training rows with eval.split={d.split}")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def resolved(self) -> dict[str, Any]:
        """`to_dict` with the keys that have no effect in this config (`TAKES_EFFECT_ONLY`:
        a file's synthetic keys once the command line chose a local file) at their defaults:
        what ran, and a file that loads back as it is."""
        out = self.to_dict()
        for key, _, applies, _ in TAKES_EFFECT_ONLY:
            section, name = key.split(".")
            if not applies(self):
                out[section][name] = type(getattr(self, section)).model_fields[name].get_default(
                    call_default_factory=True)
        return out


NOTEBOOK_REWARDS = ("correctness", "integer", "strict_format", "soft_format", "xml_count")
"""The built-ins that `reward.mode` chooses between two versions of."""

TAKES_EFFECT_ONLY: list[tuple[str, str, Any, str]] = [
    # (key, the key it depends on, whether it takes effect (Config -> bool), when it does)
    ("data.path", "data.source", lambda c: c.data.source == "local", "data.source=local"),
    ("data.name", "data.source", lambda c: c.data.source == "hub", "data.source=hub"),
    ("data.subset", "data.source", lambda c: c.data.source == "hub", "data.source=hub"),
    ("data.num_synthetic", "data.source", lambda c: c.data.source == "synthetic",
     "data.source=synthetic"),
    ("data.synthetic_max_value", "data.source", lambda c: c.data.source == "synthetic",
     "data.source=synthetic"),
    ("data.eval_split", "data.eval_path", lambda c: not c.data.eval_path,
     "data.eval_path is unset (its file replaces the split)"),
    ("data.eval_split", "data.eval_fraction", lambda c: not c.data.eval_fraction,
     "data.eval_fraction is unset (its rows replace the split)"),
    ("algorithm.importance_sampling_cap", "algorithm.importance_sampling_correction",
     lambda c: c.algorithm.importance_sampling_correction,
     "algorithm.importance_sampling_correction is on (its default with algorithm.max_staleness=1)"),
    ("algorithm.max_refill_rounds", "algorithm.filter_zero_variance_groups",
     lambda c: c.algorithm.filter_zero_variance_groups,
     "algorithm.filter_zero_variance_groups=true"),
    ("learner.micro_batch_size", "learner.max_tokens_per_micro_batch",
     lambda c: c.learner.max_tokens_per_micro_batch is None,
     "learner.max_tokens_per_micro_batch is unset (it replaces micro_batch_size)"),
    ("learner.upcast_unquantized_to_fp32", "learner.load_in_4bit",
     lambda c: c.learner.load_in_4bit is not False and c.learner.backend != "unsloth",
     "the learner is bitsandbytes 4-bit + PEFT (learner.load_in_4bit not false, "
     "learner.backend not unsloth)"),
    ("learner.warmup_ratio", "learner.lr_scheduler_type",
     lambda c: c.learner.lr_scheduler_type != "constant",
     "learner.lr_scheduler_type has a warm-up (constant has none)"),
    *((f"cluster.sync_probe_{k}", "cluster.sync_probe", lambda c: c.cluster.sync_probe,
       "cluster.sync_probe=true") for k in ("min_slope", "max_slope", "z", "min_movement")),
    ("logging.wandb_project", "logging.wandb", lambda c: c.logging.wandb, "logging.wandb=true"),
    ("reward.mode", "reward.functions",
     lambda c: any(f.name in NOTEBOOK_REWARDS for f in c.reward.functions),
     f"reward.functions has one of the notebook's rewards ({', '.join(NOTEBOOK_REWARDS)})"),
    ("eval.every_steps", "algorithm.total_steps",
     lambda c: c.eval.every_steps < c.algorithm.total_steps,
     "it is below algorithm.total_steps (the last step is evaluated anyway)"),
    *((f"rollout.{k}", "cluster.use_gpu", lambda c: c.cluster.use_gpu is not False,
       "the engines may run on GPUs (cluster.use_gpu not false)")
      for k in ("kv_cache_gb", "gpu_memory_utilization", "gpus_per_engine")),
    ("cluster.colocate", "cluster.use_gpu", lambda c: c.cluster.use_gpu is not False,
     "the actors may run on GPUs (cluster.use_gpu not false)"),
    ("rollout.kv_cache_space_gb", "cluster.use_gpu", lambda c: c.cluster.use_gpu is not True,
     "the engines may run on CPUs (cluster.use_gpu not true)"),
]
"""Keys that only count beside another: given without it, `Config` refuses them (one line
naming both) rather than run without them. Where one key implies the other, it is set instead
(`data.path` sets `data.source: local`, `DataConfig._implied_source`)."""


def _fields_set(model: BaseModel, prefix: str = "") -> set[str]:
    """Dotted keys given to `model` and its sections when they were built (not defaulted)."""
    out = set()
    for name in model.model_fields_set:
        value = getattr(model, name)
        out |= (_fields_set(value, f"{prefix}{name}.") if isinstance(value, _Section)
                else {f"{prefix}{name}"})
    return out


def given_keys(data: dict[str, Any], layer: int) -> dict[str, int]:
    """The dotted keys a YAML file (layer 1) or an override (layer 2) sets, each with its layer,
    for `build_config`'s `given`."""
    return dict.fromkeys(_given(data), layer)


def _given(data: dict[str, Any], prefix: str = "") -> set[str]:
    """Dotted keys of a nested mapping of sections (what a YAML file and overrides give)."""
    out = set()
    for key, value in data.items():
        out |= (_given(value, f"{prefix}{key}.") if isinstance(value, dict) and not prefix
                else {f"{prefix}{key}"})
    return out


def _brief(value: Any) -> str:
    """A value for a one-line message (reward functions by name)."""
    if isinstance(value, list) and value and all(hasattr(v, "name") for v in value):
        return "[" + ", ".join(v.name for v in value) + "]"
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return str(value)


LOCAL_FORMATS = (".jsonl", ".json", ".csv", ".parquet")
"""Suffixes of a single local data file; any other `data.path` is a directory of split files."""


def is_local_file(path: str) -> bool:
    """Whether `data.path` names one file (by its suffix), not a directory of split files."""
    return Path(path).suffix.lower() in LOCAL_FORMATS


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ValueError(f"@{key}: {message}")


# ---- loading -------------------------------------------------------------------------------

def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`base` with `extra` over it, section by section (lists are replaced whole)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
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


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping of sections in a YAML config file (what differs from the defaults)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: must be a mapping of sections")
    return loaded


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> Config:
    """Defaults <- `base` <- YAML file <- dotted overrides, then type checks and invariants.
    (A TRL file's layers: `grpo_ray.driver.trl_config.load_with_trl`.)"""
    own = read_yaml(path) if path is not None else {}
    data, given = merge(base or {}, own), given_keys(own, 1)
    for item in overrides or []:
        override = parse_override(item)
        data = merge(data, override)
        given.update(given_keys(override, 2))
    return build_config(data, given)


def build_config(data: dict[str, Any], given: dict[str, int] | None = None) -> Config:
    """A validated Config from a nested mapping; ConfigError names the first bad key. `given`:
    the dotted keys the user set, each with its layer (1: a YAML file, 2: an override), for
    `Config._given_keys_take_effect`; None: every key of `data`, in one layer."""
    given = given_keys(data, 1) if given is None else dict(given)
    implied = [given[k] for k in ("data.path", "data.name", "data.subset") if k in given]
    if implied and "data.source" not in given:  # `DataConfig._implied_source`: as late as them
        given["data.source"] = max(implied)
    try:
        return Config.model_validate(data, context={"given": given})
    except ValidationError as e:
        raise ConfigError(_one_line(e)) from None


def _one_line(error: ValidationError) -> str:
    """pydantic's first error as `dotted.key: what is wrong (got value)`."""
    err = error.errors(include_url=False)[0]
    loc = [p for p in err["loc"] if p not in ("function-after", "function-before")]
    msg, ctx, value = err["msg"], err.get("ctx", {}), err.get("input")
    # our own validators raise "@key: message" (the key may sit deeper than pydantic's loc)
    own = str(ctx.get("error", "")) if err["type"] == "value_error" else ""
    if own.startswith("@"):
        key, _, message = own[1:].partition(": ")
        return f"{_dotted(loc + [key])}: {message}" if "." not in key else f"{key}: {message}"
    key = _dotted(loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        known = _known_keys(loc[:-1])
        return f"{key}: unknown key (known: {', '.join(known)})"
    if kind == "missing":
        return f"{key}: is required"
    if kind == "literal_error":
        return f"{key}: must be one of {ctx.get('expected')} (got {value!r})"
    if kind.startswith("bool"):
        return f"{key}: must be true or false (got {value!r})"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=",
              "less_than": "<"}[kind]
        bound = next(iter(ctx.values()))
        return f"{key}: must be {op} {bound} (got {value!r})"
    for prefix, name in (("int", "int"), ("float", "float"), ("string", "str"),
                         ("list", "a list"), ("dict", "a mapping"), ("model", "a mapping")):
        if kind.startswith(prefix):
            return f"{key}: must be {name} (got {type(value).__name__} {value!r})"
    if kind == "too_short":
        return f"{key}: needs at least {ctx.get('min_length', 1)} item(s)"
    return f"{key}: {msg} (got {value!r})"


def _dotted(loc: list[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _known_keys(loc: list[Any]) -> list[str]:
    """Field names of the section at `loc` (list indices skipped)."""
    model: Any = Config
    for part in loc:
        if isinstance(part, int):
            continue
        annotation = model.model_fields[part].annotation
        args = typing.get_args(annotation)
        model = args[0] if args else annotation
    return sorted(model.model_fields)


def default_values() -> dict[str, Any]:
    """Every default, as a nested mapping (what a YAML file need not repeat)."""
    return Config().model_dump()
