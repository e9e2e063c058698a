"""Shared pieces of the GPU benchmarks: the 3B-shape model with random weights, prompts in the
recipe's chat format, a random LoRA adapter of the recipe's rank, and what to print beside every
figure (GPU, versions, date), and a timer that waits for the GPU. Imports nothing heavy at module
level."""
from __future__ import annotations

import datetime
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from grpo_ray.config import ALL_PROJECTIONS


def environment() -> dict[str, str]:
    """GPU name (nvidia-smi), library versions and the date, printed beside the figures."""
    import importlib.metadata as md

    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=30).stdout.strip() or "none"
    except (OSError, subprocess.TimeoutExpired):
        gpu = "none (no nvidia-smi)"
    out = {"gpu": gpu, "date": datetime.date.today().isoformat(),
           "python": platform.python_version()}
    for name in ["torch", "vllm", "ray", "transformers", "peft", "bitsandbytes", "trl"]:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "-"
    return out


def print_environment() -> dict[str, str]:
    env = environment()
    print("environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    return env


def ensure_model(path: str, shape: str = "qwen2.5-3b") -> str:
    """The random-weight model at `path`, built (bf16, initialized on the GPU when there is one)
    unless it is already there."""
    import torch

    from grpo_ray.driver.models.tiny import QWEN25_3B_SHAPE, QWEN25_VOCAB, save_tiny

    if not (Path(path) / "config.json").exists():
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if shape == "qwen2.5-3b":
            save_tiny(path, shape=QWEN25_3B_SHAPE, dtype="bfloat16", vocab_size=QWEN25_VOCAB,
                      device=device, seed=0)
        else:
            save_tiny(path, dtype="bfloat16", device=device, seed=0)
    return path


def prompt_ids(model_path: str, n: int, seed: int = 0) -> list[list[int]]:
    """`n` synthetic GSM8K-style questions with the recipe's system prompt and chat template."""
    from grpo_ray.answer_format import chat_ids, chat_messages
    from grpo_ray.driver.data.prompts import load_tokenizer
    from grpo_ray.driver.data.synthetic import synthetic_rows

    tokenizer = load_tokenizer(model_path)
    return [chat_ids(tokenizer, chat_messages(row["question"]))
            for row in synthetic_rows(n, seed=seed)]


def random_lora(model_path: str, r: int, alpha: int, seed: int = 0,
                dtype: str = "bfloat16") -> tuple[dict[str, Any], dict[str, Any]]:
    """(PEFT-format tensors, adapter_config) of a random LoRA adapter on all seven projections of
    the model at `model_path`, without building the model: shapes come from its config."""
    import torch
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_path)
    head_dim = c.hidden_size // c.num_attention_heads
    kv = c.num_key_value_heads * head_dim
    shapes = {"q_proj": (c.hidden_size, c.hidden_size), "k_proj": (c.hidden_size, kv),
              "v_proj": (c.hidden_size, kv), "o_proj": (c.hidden_size, c.hidden_size),
              "gate_proj": (c.hidden_size, c.intermediate_size),
              "up_proj": (c.hidden_size, c.intermediate_size),
              "down_proj": (c.intermediate_size, c.hidden_size)}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(c.num_hidden_layers):
        for module, (fan_in, fan_out) in shapes.items():
            part = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            name = f"base_model.model.model.layers.{layer}.{part}.{module}"
            a = (torch.rand(r, fan_in, generator=g) * 2 - 1) / fan_in ** 0.5
            tensors[f"{name}.lora_A.weight"] = a.to(getattr(torch, dtype))
            tensors[f"{name}.lora_B.weight"] = (0.01 * torch.randn(fan_out, r, generator=g)
                                                ).to(getattr(torch, dtype))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
              "lora_dropout": 0.0, "target_modules": list(ALL_PROJECTIONS), "bias": "none",
              "base_model_name_or_path": model_path, "inference_mode": True}
    return tensors, config


def timed(fn) -> tuple[object, float]:
    """(fn(), its seconds), the GPU (where there is one) synchronized before the clock stops, so
    that the seconds include the GPU work `fn` queued."""
    import torch

    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start
