"""Files and directories that readers see whole or not at all, and that survive a crash once
written (fsynced before they are renamed into place)."""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Callable


def replace_directory(directory: str | Path, fill: Callable[[Path], None]) -> Path:
    """Run `fill(tmp)` on a temporary sibling of `directory`, fsync it, then rename it into place.

    `directory` is afterwards the previous content, or the complete new one, never half written;
    a failing `fill` leaves the previous content untouched and no temporary behind."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        fill(tmp)
        _fsync_tree(tmp)
        if directory.exists():
            # rename() cannot replace a non-empty directory: move the old one aside first
            old = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(directory, old)
            os.rename(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, directory)
        fsync(directory.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def replace_file(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a fsynced temporary sibling and a rename."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_text(text)
        fsync(tmp)
        os.replace(tmp, path)
        fsync(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root`, directories after their contents."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fsync(Path(dirpath) / name)
        fsync(Path(dirpath))
