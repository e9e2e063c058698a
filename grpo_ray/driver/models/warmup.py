"""Supervised warm-up that gives a tiny random model the XML answer format before GRPO.

GRPO can only improve correctness the policy sometimes reaches: a random model never writes the
schema, so the learning benchmark starts from a model fine-tuned on demonstrations
(`demonstration`) of the reference recipe's strict format. Stopping a clean warm-up early is not
a stable start: the tiny model learns the arithmetic in a jump (greedy held-out accuracy 9% at
step 400, 66% at 600, 100% at 800) while its sampled format is still below 90%. Instead the
warm-up runs to convergence on demonstrations of which a share `1 - correct_prob` compute a
nearby wrong result (consistently, in the reasoning and in the answer): the format converges,
and correctness settles at a level set by `correct_prob` rather than by where training stopped.
`BENCHMARK_WARMUP` holds the settings chosen for the learning benchmark.

Tiny models on CPU only: float32, full fine-tuning, torch and transformers imported inside.
"""
from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

from grpo_ray.answer_format import SYSTEM_PROMPT, chat_ids, chat_messages, gold_answer

BENCHMARK_WARMUP = dict(steps=1200, batch_size=16, lr=1e-3, correct_prob=0.3)
"""Warm-up of the learning benchmark, for `save_tiny`'s default shape on synthetic_rows(2000,
seed 3407, max_value 9). Measured for seeds 0/1/2 (model init and warm-up), 200 held-out rows:
sampled (T=1, 8 per row) accuracy 0.18/0.19/0.17 with strict format 0.97/0.97/0.97; greedy
accuracy 0.44/0.43/0.37 with format 1.0; ~70 s of one CPU core."""


def _reasoning_and_gold(row: dict[str, str]) -> tuple[str, str]:
    if "answer" not in row or "question" not in row:
        raise ValueError(f"row needs 'question' and 'answer' (GSM8K's columns), got {sorted(row)}")
    return row["answer"].split("####")[0].strip(), gold_answer(row["answer"])


def demonstration(row: dict[str, str], result: str | None = None) -> str:
    """The ideal completion of a synthetic row, in the strict XML format (EOS not included).

    `result` replaces the gold number, in the answer and after the reasoning's last `=`
    (a synthetic reasoning is `a op b = n`), to demonstrate a consistent arithmetic mistake.
    """
    reasoning, gold = _reasoning_and_gold(row)
    if result is not None:
        if "=" not in reasoning:
            raise ValueError(f"reasoning {reasoning!r} has no '=' to put result {result!r} after")
        reasoning = f"{reasoning.rsplit('=', 1)[0]}= {result}"
        gold = result
    return f"<reasoning>\n{reasoning}\n</reasoning>\n<answer>\n{gold}\n</answer>\n"


def wrong_result(gold: str, rng: random.Random, spread: int = 3) -> str:
    """A nearby wrong integer: gold + d with d uniform in [-spread, spread] \\ {0}; a negative
    result is mirrored to gold + |d|, so the integer reward still sees only digits."""
    if not gold.isdigit():
        raise ValueError(f"wrong_result: gold {gold!r} is not a non-negative integer")
    value, d = int(gold), rng.choice([d for d in range(-spread, spread + 1) if d != 0])
    return str(value + d if value + d >= 0 else value + abs(d))


def completion_loss(model: Any, tokenizer: Any, rows: list[dict[str, str]],
                    system_prompt: str | None = None, rng: random.Random | None = None,
                    correct_prob: float = 1.0) -> Any:
    """Mean cross-entropy over the completion tokens (demonstration + EOS) of `rows`; the prompt
    tokens carry no loss. `rng` draws the wrong results when `correct_prob` < 1. Returns a
    scalar tensor with the graph attached."""
    import torch

    if correct_prob < 1.0 and rng is None:
        raise ValueError("completion_loss: correct_prob < 1 needs an rng to draw wrong results")
    system = SYSTEM_PROMPT if system_prompt is None else system_prompt
    seqs = []
    for row in rows:
        result = None
        if correct_prob < 1.0 and rng.random() >= correct_prob:
            result = wrong_result(_reasoning_and_gold(row)[1], rng)
        prompt = chat_ids(tokenizer, chat_messages(row["question"], system))
        completion = tokenizer(demonstration(row, result), add_special_tokens=False)["input_ids"]
        seqs.append((prompt + completion + [tokenizer.eos_token_id], len(prompt)))
    width = max(len(ids) for ids, _ in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (ids, start) in enumerate(seqs):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, start:len(ids)] = torch.tensor(ids[start:])
        mask[i, :len(ids)] = 1
    # transformers shifts labels inside and averages over the non-ignored (completion) tokens.
    return model(input_ids=input_ids, attention_mask=mask, labels=labels).loss


def sft_warmup(model_path: str, out_dir: str, rows: list[dict[str, str]], steps: int,
               batch_size: int = 16, lr: float = 1e-3, seed: int = 0,
               system_prompt: str | None = None, correct_prob: float = 1.0,
               progress: bool = False) -> Path:
    """Fine-tune every weight of the causal LM at `model_path` on the chat-templated prompt of
    each row followed by its `demonstration` and EOS, with loss on the completion only; save
    model + tokenizer to `out_dir` and return it.

    AdamW with a linear warm-up over the first 10% of `steps`, then cosine decay to 0; batches
    walk through `rows` in a shuffled order, reshuffled each epoch. With `correct_prob` < 1 each
    demonstration, drawn afresh every time its row is visited, shows a `wrong_result` with
    probability 1 - `correct_prob`. Deterministic for a seed (and a thread count). With
    `progress`, a tqdm bar over the steps on a terminal.
    """
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if steps < 1 or batch_size < 1:
        raise ValueError(f"sft_warmup: steps and batch_size must be >= 1 "
                         f"(got {steps}, {batch_size})")
    if not 0.0 <= correct_prob <= 1.0:
        raise ValueError(f"sft_warmup: correct_prob must be in [0, 1] (got {correct_prob})")
    if not rows:
        raise ValueError("sft_warmup: no rows")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(
        (s + 1) / warm, 0.5 * (1 + math.cos(math.pi * max(0, s - warm) / max(1, steps - warm)))))
    order: list[int] = []
    from tqdm import tqdm

    from grpo_ray.driver.tracking import bar_size

    # on a terminal only (disable=None): a bar in a log file is one copy per refresh
    for _ in tqdm(range(steps), desc="warm-up", unit="step", disable=None if progress else True,
                  leave=False, file=sys.stderr, **bar_size(sys.stderr)):
        if len(order) < batch_size:
            epoch = list(range(len(rows)))
            rng.shuffle(epoch)
            order += epoch
        batch, order = [rows[i] for i in order[:batch_size]], order[batch_size:]
        loss = completion_loss(model, tokenizer, batch, system_prompt, rng, correct_prob)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def warm_up(model_path: str, out_dir: str, rows: list[dict[str, str]], seed: int,
            system_prompt: str | None, threads: int) -> Path:
    """`sft_warmup` with `BENCHMARK_WARMUP` on `threads` torch threads (the thread count changes
    float sums, hence the model), restoring the caller's thread count after."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return sft_warmup(model_path, out_dir, rows, seed=seed, system_prompt=system_prompt,
                          progress=True, **BENCHMARK_WARMUP)
    finally:
        torch.set_num_threads(previous)
