"""Checkpoints that a crash cannot half-write, and the run state a resume needs.

    <root>/step-000010/learner.pt          LoRA tensors, optimizer, scheduler, learner RNGs
                      /trainer_state.json  step, adapter version, data iterator position, config
                      /adapter/            the adapter in PEFT format, usable on its own
    <root>/latest                          name of the newest complete checkpoint

A checkpoint is built in a temporary sibling directory, its files fsynced, then renamed into
place (`atomic.replace_directory`); `latest` is replaced the same way. A crash at any point leaves
the previous checkpoint complete and named by `latest` (or, between the two renames, the new
complete one unnamed, which `latest_checkpoint` still finds). Older checkpoints are pruned only
after the new one is in place.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from grpo_ray.atomic import replace_directory, replace_file
from grpo_ray.contracts import AdapterPayload

LEARNER_FILE = "learner.pt"
STATE_FILE = "trainer_state.json"
ADAPTER_DIR = "adapter"
LATEST_FILE = "latest"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def _complete_steps(root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every complete checkpoint under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in root.iterdir()
             if (m := _STEP_DIR.match(d.name)) and (d / STATE_FILE).is_file()]
    return sorted(found)


def save_checkpoint(root: str | Path, step: int, learner_state: dict[str, Any],
                    trainer_state: dict[str, Any], adapter: AdapterPayload, keep: int = 2) -> Path:
    """Write checkpoint `step` atomically under `root`, point `latest` at it, then keep only the
    newest `keep` checkpoints. Returns the checkpoint's directory."""
    import torch

    from grpo_ray.weight_sync.files import write_adapter

    if keep < 1:
        raise ValueError(f"keep={keep}: at least the new checkpoint must be kept")
    root = Path(root)

    def fill(tmp: Path) -> None:
        torch.save(learner_state, tmp / LEARNER_FILE)
        write_adapter(adapter, tmp / ADAPTER_DIR)
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **trainer_state}, indent=2))

    # A checkpoint of this step left by a run that crashed before naming it `latest` is
    # replaced whole.
    final = replace_directory(root / step_dir_name(step), fill)
    replace_file(root / LATEST_FILE, final.name + "\n")
    _prune(root, keep, final)
    return final


def _prune(root: Path, keep: int, newest: Path) -> None:
    """Remove all but the newest `keep` checkpoints (never `newest`), and temporaries left by
    writes that crashed (`atomic`'s hidden `.<name>.tmp-*` / `.old-*` siblings)."""
    steps = _complete_steps(root)
    for _, d in steps[:max(0, len(steps) - keep)]:
        if d != newest:
            shutil.rmtree(d, ignore_errors=True)
    for d in root.glob(".*"):
        if d.is_dir():
            shutil.rmtree(d, ignore_errors=True)
        else:
            d.unlink(missing_ok=True)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint `latest` names; when it is missing or names an incomplete or removed
    directory, the newest complete `step-*` directory; None when there is none."""
    root = Path(root)
    pointer = root / LATEST_FILE
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if _STEP_DIR.match(named.name) and (named / STATE_FILE).is_file():
            return named
    steps = _complete_steps(root)
    return steps[-1][1] if steps else None


def load_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(learner_state, trainer_state) of the checkpoint directory `path`, tensors on the CPU."""
    import torch

    path = Path(path)
    for name in (LEARNER_FILE, STATE_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path}: not a complete checkpoint (no {name})")
    # weights_only: the learner state is tensors and plain values, nothing to unpickle as code
    learner_state = torch.load(path / LEARNER_FILE, map_location="cpu", weights_only=True)
    return learner_state, json.loads((path / STATE_FILE).read_text())


def truncate_jsonl(path: str | Path, after_step: int) -> int:
    """Cut a per-step JSONL log (rows `{"step": ...}` in step order) before its first row whose
    step is above `after_step`: a resumed run logs the steps after its checkpoint again.
    In place, so a writer that holds the file open in append mode goes on at the new end.
    Returns the number of rows dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    offset, lines = 0, path.read_bytes().splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.strip() and json.loads(line)["step"] > after_step:
            os.truncate(path, offset)
            return len(lines) - i
        offset += len(line)
    return 0
