"""The sync probe: after every adapter sync, each engine proves that it serves the learner's
adapter by scoring one fixed short completion that the learner scores too.

Engine and learner never agree exactly: a bf16 engine and a 4-bit learner differ by the
quantization error, which dwarfs one step's change. That error is the same whatever the adapter,
so the probe compares how far each side has moved from its own base model (both score the probe
once before training): with e, l the log-probs of the probe's tokens now and e0, l0 before any
training,

    gap = mean over tokens of |(e - e0) - (l - l0)|

An engine that serves the learner's adapter has a gap near zero (fp32 CPU: ~1e-6); one that
serves no adapter, a stale one or damaged weights has a gap of the adapter's own effect on the
probe once training has moved it. `cluster.sync_probe_tolerance` is the largest gap accepted
(`probe_tolerance` when it is not set).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

PROBE_QUESTION = "What is 3 + 4?"
PROBE_COMPLETION = "<reasoning>\n3 + 4 = 7\n</reasoning>\n<answer>\n7\n</answer>\n"
"""A short answer in the recipe's format: every token is one the policy is trained on."""


@dataclass
class SyncProbe:
    """The fixed completion and the learner's log-probs of it before training."""

    prompt_ids: list[int]
    completion_ids: list[int]
    learner_base: list[float]
    """The learner's log-probs of `completion_ids` at adapter version 0 (its base model)."""
    tolerance: float
    """Largest accepted `probe_gap`, in nats per token."""


def probe_tolerance(configured: float | None, engine_dtype: str) -> float:
    """`cluster.sync_probe_tolerance`, or its default for engines computing in `engine_dtype`:
    1e-3 in float32 (CPU engines agree with the learner to ~1e-6), 0.1 in 16 bits."""
    if configured is not None:
        return configured
    return 1e-3 if engine_dtype == "float32" else 0.1


def probe_gap(engine: list[float], engine_base: list[float], learner: list[float],
              learner_base: list[float]) -> float:
    """Mean over the probe's tokens of |(engine - engine_base) - (learner - learner_base)|: how
    far the engine's move from its base model is from the learner's (module docstring). Four
    lists of one log-prob per completion token."""
    n = len(engine)
    if not n or not len(engine_base) == len(learner) == len(learner_base) == n:
        raise ValueError(f"probe_gap: log-prob lists of lengths {len(engine)}, "
                         f"{len(engine_base)}, {len(learner)}, {len(learner_base)}")
    return sum(abs((e - e0) - (x - x0)) for e, e0, x, x0
               in zip(engine, engine_base, learner, learner_base)) / n


def probe_sequence(tokenizer) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of the probe, with the recipe's chat template and system
    prompt (any fixed sequence would do: it only has to be the same for engine and learner)."""
    from grpo_ray.data.dataset import chat_ids
    from grpo_ray.data.prompts import chat_messages

    prompt = chat_ids(tokenizer, chat_messages(PROBE_QUESTION))
    completion = tokenizer.encode(PROBE_COMPLETION, add_special_tokens=False)
    return list(prompt), list(completion)


def attach_probe(learner: Any, engines: Any, probe_ids: tuple[list[int], list[int]],
                 tolerance: float | None) -> None:
    """Before training: the learner (an actor handle) and every engine of `engines` (an
    EngineGroup) score the probe with their base models; the group keeps both for `verify`."""
    import ray

    prompt, completion = probe_ids
    base = ray.get(learner.sequence_logprobs.remote([prompt], [completion]))[0]
    engines.set_probe(SyncProbe(prompt, completion, base,
                                probe_tolerance(tolerance, engines.lora_dtype())))


def verify_sync(learner: Any, engines: Any, probe_ids: tuple[list[int], list[int]]
                ) -> dict[str, float]:
    """After a sync: the learner scores the probe, every engine proves it moved the same way
    (`EngineGroup.verify`, which repairs or fails). `sync/probe_s` and each engine's gap."""
    import ray

    start = time.perf_counter()
    prompt, completion = probe_ids
    gaps = engines.verify(ray.get(learner.sequence_logprobs.remote([prompt], [completion]))[0])
    return {"sync/probe_s": time.perf_counter() - start,
            **{f"sync/probe_gap/engine_{i}": g for i, g in enumerate(gaps)}}
