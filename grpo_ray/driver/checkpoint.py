"""Checkpoints that a crash cannot half-write, and the run state a resume needs.

    <root>/step-000010/learner.pt          LoRA tensors, optimizer, scheduler, learner RNGs
                      /trainer_state.json  step, adapter version, data iterator position, config
                      /adapter/            the adapter in PEFT format, usable on its own
                      /manifest.json       size and SHA-256 of every other file, written last
    <root>/latest                          name of the newest complete checkpoint

A checkpoint is built in a temporary sibling directory, its files fsynced, then renamed into
place (`atomic.replace_directory`); `latest` is replaced the same way. A crash at any point leaves
the previous checkpoint complete and named by `latest` (or, between the two renames, the new
complete one unnamed, which `latest_checkpoint` still finds). Older checkpoints are pruned only
after the new one is in place.

What the rename cannot prevent (a disk that loses or truncates a file later, a copy between
machines cut short) the manifest reveals: `resumable_checkpoint` checks the newest checkpoint
against it, without loading anything, and falls back to the newest one that passes.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from grpo_ray.atomic import replace_directory, replace_file
from grpo_ray.config import UserError
from grpo_ray.contracts import AdapterPayload

LEARNER_FILE = "learner.pt"
STATE_FILE = "trainer_state.json"
ADAPTER_DIR = "adapter"
LATEST_FILE = "latest"
MANIFEST_FILE = "manifest.json"
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

    from grpo_ray.sync.files import write_adapter

    if keep < 1:
        raise ValueError(f"keep={keep}: at least the new checkpoint must be kept")
    root = Path(root)

    def fill(tmp: Path) -> None:
        torch.save(learner_state, tmp / LEARNER_FILE)
        write_adapter(adapter, tmp / ADAPTER_DIR)
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **trainer_state}, indent=2))
        write_manifest(tmp)

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


class CheckpointError(UserError, ValueError):
    """No checkpoint to resume from passes its checks; the message names the bad files."""

    kind = "checkpoint error"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    """`manifest.json`: the size and SHA-256 of every file under `directory`, last of all."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    manifest = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                for p in files}
    (directory / MANIFEST_FILE).write_text(json.dumps({"files": manifest}, indent=2))


def check_checkpoint(path: str | Path) -> None:
    """Raise CheckpointError naming the first file of checkpoint `path` that is missing,
    truncated or changed (by its manifest). A checkpoint written before manifests existed is
    checked by reading its state file and loading its learner state."""
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        try:
            load_checkpoint(path)
        except Exception as e:  # noqa: BLE001 - any failure to read it: not resumable
            raise CheckpointError(f"{path}: {str(e).splitlines()[0] if str(e) else e!r} "
                                  "(a checkpoint without a manifest)") from None
        return
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{manifest_path}: not a valid manifest") from None
    for name in (LEARNER_FILE, STATE_FILE):
        if name not in files:
            raise CheckpointError(f"{manifest_path}: lists no {name}")
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (the manifest lists it)")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"{file}: {size} bytes, the manifest says "
                                  f"{expected['bytes']} (truncated or overwritten)")
        if _sha256(file) != expected["sha256"]:
            raise CheckpointError(f"{file}: its SHA-256 differs from the manifest's (the "
                                  "file changed after the checkpoint was written)")


def resumable_checkpoint(root: str | Path) -> tuple[Path, list[str]]:
    """The newest checkpoint under `root` that passes `check_checkpoint` (the one `latest`
    names first, then the others newest first), and one line for each newer one skipped.
    CheckpointError when none passes, naming each one's bad file."""
    root = Path(root)
    steps = sorted((int(m.group(1)), d) for d in (root.iterdir() if root.is_dir() else [])
                   if (m := _STEP_DIR.match(d.name)) and d.is_dir())
    candidates = [d for _, d in reversed(steps)]
    pointer = root / LATEST_FILE
    named = root / pointer.read_text().strip() if pointer.is_file() else None
    if named in candidates:
        candidates.remove(named)
        candidates.insert(0, named)
    problems: list[str] = []
    for path in candidates:
        try:
            check_checkpoint(path)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        return path, [f"skipping a damaged checkpoint: {p}; resuming from {path.name}"
                      for p in problems]
    raise CheckpointError(f"no checkpoint in {root} can be resumed: " + "; ".join(problems)
                          if problems else f"no checkpoint in {root}")


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
    step is above `after_step`: a resumed run logs the steps after its checkpoint again. A last
    row that does not parse (its write cut by the run's stop) is dropped too.
    In place, so a writer that holds the file open in append mode goes on at the new end.
    Returns the number of rows dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    offset, lines = 0, path.read_bytes().splitlines(keepends=True)
    for i, line in enumerate(lines):
        cut = i == len(lines) - 1 and not _parses(line)
        if line.strip() and (cut or json.loads(line)["step"] > after_step):
            os.truncate(path, offset)
            return len(lines) - i
        offset += len(line)
    return 0


def _parses(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


def changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts, as `key: old -> new`."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


RESUME_IGNORED_KEYS = ("output.dir", "cluster.address", "cluster.num_cpus", "cluster.num_gpus",
                       "cluster.placement_timeout_s", "cluster.restart_timeout_s",
                       "cluster.max_restarts", "logging.progress_bar")
"""Keys that cannot change what a run computes, only where it runs, how long it waits for
machines or how its console looks: they may differ when the same run is started again (a
resubmitted job joins another head; `output.dir` is where the checkpoint was found, however it
is spelled). Everything else, `cluster.placement_strategy` and the logging backends included, must
match for a run to resume without `--resume`."""


def resume_differences(saved: dict[str, Any] | None, config: dict[str, Any],
                       defaults: dict[str, Any]) -> list[str]:
    """`changed_keys` between the config a checkpoint recorded and this run's, leaving out
    `RESUME_IGNORED_KEYS` and keys the checkpoint does not record that are at their `defaults`
    here (settings added to grpo-ray after it was written)."""
    def fill(old: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
        out = dict(base)
        for k, v in old.items():
            out[k] = fill(v, base[k]) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
        return out

    if saved is None:
        return ["(the checkpoint records no config)"]
    changed = changed_keys(fill(saved, defaults), config)
    return [c for c in changed if c.split(":", 1)[0] not in RESUME_IGNORED_KEYS]


def summarize_differences(differences: list[str], shown: int = 3, width: int = 60) -> str:
    """A few of `resume_differences`' lines for a one-line message: each whole where it is
    short (`key: old -> new`), else its key alone (a list of reward functions is hundreds of
    characters), then "and N more"."""
    parts = [d if len(d) <= width else d.split(":", 1)[0] for d in differences[:shown]]
    more = len(differences) - shown
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")
