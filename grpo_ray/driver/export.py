"""What a run leaves for others: the LoRA adapter (PEFT format), the adapter merged into a 16-bit
copy of the base model (plain transformers and vLLM load it, no PEFT needed), and an upload of
either to the Hugging Face Hub.

The merge always loads the base in 16 bits (or 32), never in 4: the merged weight W + s * B @ A
would be rounded back to NF4, whose step is far larger than a LoRA update, and most of what
training learned would be lost. A QLoRA adapter was trained against the dequantized NF4 weights,
so its merge into the 16-bit base differs from the training-time model by that quantization error
(the usual practice, and what the reference notebook's `merged_16bit` does).

The Hub token comes from the environment only and never appears in output, logs or errors.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from grpo_ray.atomic import replace_directory
from grpo_ray.config import UserError

DTYPES = ("bfloat16", "float16", "float32")
TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


class ExportError(UserError, RuntimeError):
    """An export that cannot be done; the message names the culprit (never the token)."""

    kind = "export error"


def check_adapter(adapter_path: str | Path) -> Path:
    from grpo_ray.sync.files import CONFIG_NAME, WEIGHTS_NAME

    path = Path(adapter_path)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (path / name).is_file():
            raise ExportError(f"{path}: no {name} (not a PEFT adapter directory; training "
                              "saves one under <output.dir>/adapter)")
    return path


def write_directory(directory: str | Path, fill: Callable[[Path], None]) -> Path:
    """Run `fill(tmp)` on a temporary sibling of `directory`, then rename it into place: the
    directory is either the previous export, the complete new one, or absent, never half
    written. A directory that is not an export (no config file) is never replaced."""
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()) and not any(
            (directory / n).is_file() for n in ("config.json", "adapter_config.json")):
        raise ExportError(f"{directory}: exists and is not a model or adapter directory; "
                          "choose another output directory")
    return replace_directory(directory, fill)


def merge_adapter(base_path: str, adapter_path: str, out_dir: str,
                  dtype: str = "bfloat16") -> Path:
    """Load the base model in `dtype` (16-bit by default, never quantized), apply the adapter,
    fold it into the weights (`merge_and_unload`) and save model (safetensors) and tokenizer
    to `out_dir`, atomically. Returns `out_dir`."""
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r}: must be one of {', '.join(DTYPES)}")
    adapter = check_adapter(adapter_path)
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=getattr(torch, dtype))
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(base_path)

    def fill(tmp: Path) -> None:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return write_directory(out_dir, fill)


def save_adapter_dir(adapter_path: str, base_path: str, out_dir: str) -> Path:
    """Copy the adapter (PEFT format) and the base model's tokenizer to `out_dir`, atomically:
    what `PeftModel.from_pretrained(base, out_dir)` and a chat client need."""
    from transformers import AutoTokenizer

    from grpo_ray.sync.files import CONFIG_NAME, WEIGHTS_NAME

    adapter = check_adapter(adapter_path)
    tokenizer = AutoTokenizer.from_pretrained(base_path)

    def fill(tmp: Path) -> None:
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            shutil.copy2(adapter / name, tmp / name)
        tokenizer.save_pretrained(tmp)

    return write_directory(out_dir, fill)


def hub_token() -> str:
    for name in TOKEN_VARIABLES:
        if os.environ.get(name):
            return os.environ[name]
    raise ExportError(f"--push-to-hub needs a Hugging Face write token in {TOKEN_VARIABLES[0]} "
                      f"(or {TOKEN_VARIABLES[1]})")


def _mask(text: str, secret: str) -> str:
    return text.replace(secret, "***") if secret else text


def push_to_hub(path: str, repo_id: str, private: bool = True) -> str:
    """Upload the directory `path` (a merged model or an adapter) to the Hub model repo
    `repo_id`, created private if it does not exist. Returns the repo's URL."""
    token = hub_token()
    if not Path(path).is_dir():
        raise ExportError(f"{path}: no such directory to upload")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(path), repo_id=repo_id, repo_type="model",
                          commit_message=f"grpo-ray export: {Path(path).name}")
    except Exception as e:  # hub errors may quote request details: never let the token out
        raise ExportError(f"push to {repo_id} failed: "
                          f"{_mask(f'{type(e).__name__}: {e}', token)}") from None
    return str(url)
