"""The adapter on disk, in PEFT's format (`adapter_model.safetensors` + `adapter_config.json`):
what training saves, checkpoints hold, `grpo-ray eval --adapter` reads and vLLM loads.

Names: vLLM reads PEFT's format as-is (`base_model.model.<module>.lora_A.weight`; it strips the
`base_model.model.` prefix and packs q/k/v and gate/up itself), so `vllm_lora_name` is the
identity on PEFT's names plus a check of their format.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from grpo_ray.atomic import replace_directory
from grpo_ray.contracts import AdapterPayload

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
_LORA_NAME = re.compile(r"^base_model\.model\.(?P<module>[\w.]+?)\.lora_(?P<ab>[AB])\.weight$")


def vllm_lora_name(peft_name: str) -> str:
    """PEFT's state-dict name of a LoRA tensor -> the name vLLM's loader expects (the same).

    Raises ValueError for anything that is not `base_model.model.<module>.lora_{A,B}.weight`
    (a `modules_to_save` copy, a bias, DoRA's magnitude, an unstripped adapter name such as
    `.lora_A.default.weight`): vLLM would reject or silently ignore it.
    """
    if not _LORA_NAME.match(peft_name):
        raise ValueError(f"{peft_name}: not a LoRA tensor name "
                         "(expected base_model.model.<module>.lora_A.weight / .lora_B.weight)")
    return peft_name


def write_adapter(payload: AdapterPayload, directory: str | Path, weights: bool = True) -> Path:
    """Write `adapter_model.safetensors` + `adapter_config.json` (PEFT format) into `directory`
    (only the config with `weights=False`: an engine that takes the tensors from memory).

    Atomic for readers (`atomic.replace_directory`): `directory` is either absent, the previous
    complete adapter, or the new complete one.
    """
    from safetensors.torch import save_file

    def fill(tmp: Path) -> None:
        if weights:
            save_file({vllm_lora_name(k): v for k, v in payload.tensors.items()},
                      str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(payload.peft_config, indent=2, sort_keys=True))

    return replace_directory(directory, fill)


def read_adapter(directory: str | Path, version: int = 1) -> AdapterPayload:
    """The inverse of `write_adapter`: a PEFT-format adapter directory (ours, or any PEFT
    `save_pretrained` of a LoRA adapter) as a payload of the given version, CPU tensors."""
    from safetensors.torch import load_file

    directory = Path(directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory}: no {name} (not a PEFT adapter directory)")
    config = json.loads((directory / CONFIG_NAME).read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{directory / CONFIG_NAME}: peft_type {config.get('peft_type')!r}, "
                         "only LoRA adapters can be loaded")
    tensors = {vllm_lora_name(k): v for k, v in load_file(str(directory / WEIGHTS_NAME)).items()}
    return AdapterPayload(version=version, tensors=tensors, peft_config=config)


def tmpfs_root() -> Path:
    """`/dev/shm` where it is a writable directory (memory-backed), else the temp dir."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm
    return Path(tempfile.gettempdir())
