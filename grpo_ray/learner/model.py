"""Loading the learner's policy: the base model (4-bit NF4 on a GPU, or full precision) with a
fresh LoRA adapter, through bitsandbytes + PEFT or through Unsloth.

The reference policy is the same model with the adapter disabled, so one copy of the base
weights serves both.
"""
from __future__ import annotations

import importlib.util
from typing import Any

import torch

from grpo_ray.config import LearnerConfig, LoraConfig, ModelConfig


def choose_backend(setting: str, device: torch.device) -> tuple[str, str]:
    """(`peft` or `unsloth`, why) for `learner.backend`: `auto` takes Unsloth where it can run
    (CUDA, the package installed: its kernels make the 4-bit update about 2x faster), else
    bitsandbytes + PEFT."""
    if setting != "auto":
        return setting, f"learner.backend={setting}"
    if device.type != "cuda":
        return "peft", "learner.backend=auto, no CUDA"
    if importlib.util.find_spec("unsloth") is None:
        return "peft", "learner.backend=auto, unsloth is not installed"
    return "unsloth", "learner.backend=auto, unsloth is installed"


def import_backend(learner: LearnerConfig, device: torch.device) -> None:
    """Import the modules `load_policy` will load with (Unsloth, or transformers + PEFT and
    bitsandbytes for 4-bit), and nothing more: no weights, no GPU memory. A setting the machine
    cannot honour fails here, as it would in the load."""
    backend, _ = choose_backend(learner.backend, device)
    if backend == "unsloth":
        _fast_language_model()
        return
    import peft  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401  (its lazy import is the slow one)

    if _use_4bit(learner.load_in_4bit, device):
        import bitsandbytes  # noqa: F401


def load_policy(model_path: str, model: ModelConfig, lora: LoraConfig, learner: LearnerConfig,
                seed: int, device: torch.device) -> tuple[Any, torch.dtype, str]:
    """(PEFT model with a trainable LoRA adapter, compute dtype, one line saying what was
    loaded and why) for `learner.backend`."""
    backend, why = choose_backend(learner.backend, device)
    if backend == "unsloth":
        policy = _load_unsloth(model_path, lora, learner, seed)
        bits = "4-bit" if learner.load_in_4bit is not False else "16-bit"
        # autocast as TRL + Unsloth run it (bf16=True)
        return policy, torch.bfloat16, f"Unsloth {bits} ({why})"
    four_bit = _use_4bit(learner.load_in_4bit, device)
    policy, dtype = _load_peft(model_path, model, lora, learner, device, four_bit)
    what = f"PEFT, base in {str(dtype)[6:]}"
    if four_bit:
        what = "bitsandbytes NF4 + PEFT" + (
            ", unquantized weights in fp32" if learner.upcast_unquantized_to_fp32 else "")
    return policy, dtype, f"{what} ({why})"


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def _use_4bit(setting: bool | None, device: torch.device) -> bool:
    if setting is False:
        return False
    usable = device.type == "cuda" and importlib.util.find_spec("bitsandbytes") is not None
    if setting and not usable:
        raise RuntimeError("learner.load_in_4bit=true needs CUDA and the bitsandbytes package")
    return usable


def _load_peft(model_path: str, model: ModelConfig, lora: LoraConfig, learner: LearnerConfig,
               device: torch.device, four_bit: bool) -> tuple[Any, torch.dtype]:
    """transformers + bitsandbytes NF4 (QLoRA) or full precision, then a fresh LoRA adapter
    (fp32, PEFT's default, so that small updates are not lost to bf16 rounding). Returns the
    PEFT model and its compute dtype."""
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    checkpointing = {"use_reentrant": False}  # needs no input grads, works with frozen embeddings
    dtype = resolve_dtype(model.dtype, device)
    if four_bit:
        dtype = torch.bfloat16
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        base = AutoModelForCausalLM.from_pretrained(
            model_path, quantization_config=quant, dtype=torch.bfloat16,
            device_map={"": torch.cuda.current_device()})
        if learner.upcast_unquantized_to_fp32:
            base = peft.prepare_model_for_kbit_training(
                base, use_gradient_checkpointing=learner.gradient_checkpointing,
                gradient_checkpointing_kwargs=checkpointing)
        elif learner.gradient_checkpointing:  # what that does besides the upcast (non-reentrant)
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    else:
        base = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device)
        if learner.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    base.config.use_cache = False
    config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    return peft.get_peft_model(base, config), dtype


def _load_unsloth(model_path: str, lora: LoraConfig, learner: LearnerConfig, seed: int) -> Any:
    """Unsloth's 4-bit loader, kernels and gradient checkpointing (CUDA only)."""
    FastLanguageModel = _fast_language_model()
    from transformers import AutoConfig

    max_len = getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", 2048)
    base, _ = FastLanguageModel.from_pretrained(
        model_name=model_path, max_seq_length=max_len, dtype=None,
        load_in_4bit=learner.load_in_4bit is not False)
    return FastLanguageModel.get_peft_model(
        base, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules), random_state=seed,
        use_gradient_checkpointing="unsloth" if learner.gradient_checkpointing else False)


def _fast_language_model() -> Any:
    try:
        from unsloth import FastLanguageModel
    except ImportError as e:
        raise ImportError(f"learner.backend=unsloth: cannot import unsloth ({e})") from None
    return FastLanguageModel
