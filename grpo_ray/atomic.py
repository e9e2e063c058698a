"""Directories that readers see whole or not at all."""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Callable


def replace_directory(directory: str | Path, fill: Callable[[Path], None]) -> Path:
    """Run `fill(tmp)` on a temporary sibling of `directory`, then rename it into place.

    `directory` is afterwards the previous content, or the complete new one, never half written;
    a failing `fill` leaves the previous content untouched and no temporary behind."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        fill(tmp)
        if directory.exists():
            # rename() cannot replace a non-empty directory: move the old one aside first
            old = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(directory, old)
            os.rename(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory
