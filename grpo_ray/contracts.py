"""What crosses between the driver, the rollout engines, the reward pool and the learner.

Everything is flat and prompt-major: with P prompts and a group size of n, completion row
`i * n + j` is the j-th sample of prompt i. A worked example, P=2, n=2:

    prompt_index    = [0, 0, 1, 1]
    prompt_ids      = [[5, 6], [5, 6], [7], [7]]        # repeated per completion
    completion_ids  = [[9, 2], [3], [4, 4, 2], [8, 2]]  # ragged; EOS kept when it was sampled
    sampling_logprobs has the same ragged shape as completion_ids

The learner pads these itself; nothing padded crosses an actor boundary.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class PromptBatch:
    """Prompts of one step, as the data iterator yields them."""

    prompt_ids: list[list[int]]
    """Token ids of each prompt with the chat template applied (generation prompt added)."""
    prompts: list[list[dict[str, str]]]
    """Chat messages of each prompt (TRL's conversational `prompts` for reward functions)."""
    answers: list[str]
    """Gold answer of each prompt (GSM8K: the text after `####`; see `data.gold`)."""
    questions: list[str]
    columns: dict[str, list[Any]] = field(default_factory=dict)
    """The dataset's other columns, by name, each a list with one value per prompt (None where
    a row lacks the column). Reward functions receive them as keyword arguments, as TRL passes
    dataset columns: e.g. `{"solution": [...], "level": [...]}`. Never holds the names the
    rewards get otherwise (`prompt`, `prompts`, `completions`, `completion_ids`, `answer` = the
    gold, `question`)."""

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def select(self, indices: list[int]) -> "PromptBatch":
        """The prompts at `indices`, in that order."""
        return PromptBatch([self.prompt_ids[i] for i in indices],
                           [self.prompts[i] for i in indices],
                           [self.answers[i] for i in indices],
                           [self.questions[i] for i in indices],
                           {k: [v[i] for i in indices] for k, v in self.columns.items()})

    @staticmethod
    def concat(parts: list["PromptBatch"]) -> "PromptBatch":
        names = list(dict.fromkeys(k for p in parts for k in p.columns))
        return PromptBatch([x for p in parts for x in p.prompt_ids],
                           [x for p in parts for x in p.prompts],
                           [x for p in parts for x in p.answers],
                           [x for p in parts for x in p.questions],
                           {k: [x for p in parts for x in p.columns.get(k, [None] * len(p))]
                            for k in names})


@dataclass
class Sampling:
    """How the engines sample one call: what differs between a training step and an evaluation.

    `temperature=0` is greedy decoding (one completion per prompt, no top-p/top-k). With a
    `seed`, prompt i of the batch samples with seed `seed + i` (its index in the whole batch,
    whichever engine gets it): the same seed gives the same completions whatever the number of
    engines, and equal prompts still get different groups.
    """

    n: int
    """Completions per prompt (the group size in training)."""
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: list[str] | None = None
    """Stop strings, kept in the completion (evaluation stops after `</answer>`)."""
    seed: int | None = None

    @classmethod
    def training(cls, rollout: Any, seed: int | None) -> "Sampling":
        """What a training step samples with, from a `RolloutConfig`."""
        return cls(n=rollout.num_generations, max_tokens=rollout.max_completion_length,
                   temperature=rollout.temperature, top_p=rollout.top_p, top_k=rollout.top_k,
                   seed=seed)

    @classmethod
    def greedy(cls, max_tokens: int, stop: list[str] | None = None) -> "Sampling":
        return cls(n=1, max_tokens=max_tokens, temperature=0.0, stop=stop)

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.n < 1 or self.max_tokens < 1:
            raise ValueError(f"Sampling needs n >= 1, max_tokens >= 1 and temperature >= 0 "
                             f"(got n={self.n}, max_tokens={self.max_tokens}, "
                             f"temperature={self.temperature})")
        if self.temperature == 0 and self.n != 1:
            raise ValueError(f"n={self.n}: greedy decoding (temperature=0) gives one completion")


@dataclass
class Rollout:
    """Completions of a PromptBatch from one or more engines, prompt-major."""

    prompt_index: list[int]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    completion_texts: list[str]
    sampling_logprobs: list[list[float]]
    """The engine's log-probability of each sampled token, under the adapter it sampled with."""
    finish_reasons: list[str]
    """`stop` (EOS or stop string) or `length` (hit max_completion_length)."""
    adapter_version: int
    """Adapter version every completion was sampled with (0 = base model)."""
    engine_index: list[int] = field(default_factory=list)
    """Which engine of the group sampled each completion (set by `EngineGroup.generate`; empty
    when unknown): the per-engine rollout/learner probability gap is computed from it."""

    def __len__(self) -> int:
        return len(self.completion_ids)

    @staticmethod
    def concat(parts: list["Rollout"]) -> "Rollout":
        """Join the rollouts of consecutive prompt slices, renumbering prompt_index."""
        out = Rollout([], [], [], [], [], [], parts[0].adapter_version if parts else 0)
        offset = 0
        for p in parts:
            if p.adapter_version != out.adapter_version:
                raise ValueError(f"engines sampled with adapter versions {out.adapter_version} "
                                 f"and {p.adapter_version} in one step")
            out.prompt_index += [offset + i for i in p.prompt_index]
            out.prompt_ids += p.prompt_ids
            out.completion_ids += p.completion_ids
            out.completion_texts += p.completion_texts
            out.sampling_logprobs += p.sampling_logprobs
            out.finish_reasons += p.finish_reasons
            out.engine_index += p.engine_index
            offset += (max(p.prompt_index) + 1) if p.prompt_index else 0
        return out

    def rows_of(self, prompts: list[int]) -> list[int]:
        """Rows (completions) of the prompts at `prompts`, group by group in that order."""
        by_prompt: dict[int, list[int]] = {}
        for row, p in enumerate(self.prompt_index):
            by_prompt.setdefault(p, []).append(row)
        return [row for p in prompts for row in by_prompt.get(p, [])]

    def select_prompts(self, prompts: list[int]) -> "Rollout":
        """The groups of the prompts at `prompts`, in that order, renumbered 0, 1, ..."""
        rows = self.rows_of(prompts)
        new_index = {p: k for k, p in enumerate(prompts)}
        pick = lambda values: [values[r] for r in rows] if values else []  # noqa: E731
        return Rollout([new_index[self.prompt_index[r]] for r in rows], pick(self.prompt_ids),
                       pick(self.completion_ids), pick(self.completion_texts),
                       pick(self.sampling_logprobs), pick(self.finish_reasons),
                       self.adapter_version, pick(self.engine_index))


@dataclass
class Scores:
    """Rewards of every completion, prompt-major."""

    per_function: dict[str, list[float | None]]
    """Each reward function's raw score (None: that function could not score the row)."""
    total: list[float | None]
    """Weighted sum of the functions that scored the row (TRL's rule); None when none did:
    such a row gets no advantage and no part in the loss."""
    failed: dict[str, int] = field(default_factory=dict)
    """Rows each function failed on (it raised, hung past `reward.timeout_s`, returned NaN/inf
    or None instead of a list): their scores are None, as if the function did not apply."""
    errors: dict[str, str] = field(default_factory=dict)
    """The first error of each function that failed, one line."""

    def select(self, rows: list[int]) -> "Scores":
        """The scores of `rows`, in that order (failure counts and errors kept as they were)."""
        return Scores({k: [v[r] for r in rows] for k, v in self.per_function.items()},
                      [self.total[r] for r in rows], dict(self.failed), dict(self.errors))

    @staticmethod
    def concat(parts: list["Scores"]) -> "Scores":
        """The scores of consecutive parts of one batch, joined in order."""
        names = list(parts[0].per_function) if parts else []
        failed: dict[str, int] = {}
        errors: dict[str, str] = {}
        for p in parts:
            for k, c in p.failed.items():
                failed[k] = failed.get(k, 0) + c
            for k, e in p.errors.items():
                errors.setdefault(k, e)
        return Scores({k: [x for p in parts for x in p.per_function[k]] for k in names},
                      [x for p in parts for x in p.total], failed, errors)


@dataclass
class TrainBatch:
    """What the learner needs for one GRPO update, prompt-major, ragged."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    advantages: list[float]
    """One advantage per completion, shared by all its tokens."""
    sampling_logprobs: list[list[float]]
    """The rollout engine's log-probabilities (for the probability-gap metrics and truncated
    importance sampling)."""
    mask: list[bool] = field(default_factory=list)
    """False for completions that take no part in the loss (reward could not be computed);
    empty means all take part."""
    engine_index: list[int] = field(default_factory=list)
    """The engine that sampled each completion (`Rollout.engine_index`); when given, the learner
    reports the probability gap of each engine's rows too."""
    sampling_version: int | None = None
    """Adapter version the completions were sampled with (`Rollout.adapter_version`): one
    step older than the learner's in one-step-off mode. `sampling_logprobs` are that version's,
    which the truncated importance weights correct for."""

    def __len__(self) -> int:
        return len(self.completion_ids)


@dataclass
class AdapterPayload:
    """The LoRA adapter that travels from the learner to every engine: nothing else does."""

    version: int
    tensors: dict[str, Any]
    """PEFT-format state dict (`base_model.model....lora_A.weight`), CPU tensors."""
    peft_config: dict[str, Any]
    """The adapter's `adapter_config.json` content."""
    digest: str | None = None
    """`sync.digest.tensor_digest` of `tensors` as the learner exported them (None: not
    computed, e.g. read from files): what each engine must report after loading them."""

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def materialize(self, device: str = "cpu") -> dict[str, Any]:
        """name -> tensor on `device` (the other payload forms in `sync.sender` have the
        same method)."""
        return {k: v.to(device) for k, v in self.tensors.items()}


@dataclass
class ScoredBatch:
    """One step's prompts, their groups of completions and rewards, and what it cost."""

    batch: PromptBatch
    rollout: Rollout
    scores: Scores
    metrics: dict[str, float] = field(default_factory=dict)
    """`time/generate_s`, `time/reward_s`, `dynamic/...` of producing it."""

    @property
    def version(self) -> int:
        """The adapter version every completion was sampled with."""
        return self.rollout.adapter_version
