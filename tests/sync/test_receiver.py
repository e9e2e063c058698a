"""The engines' half of the sync: tmpfs adapter directories of dead engine processes are
cleaned by the next engine on the node (an engine killed with `kill -9` cannot clean its own)."""
import os
import subprocess
import sys

from grpo_ray.sync.receiver import _DIR_PREFIX, _remove_dead_workers_dirs


def test_adapter_dirs_of_dead_workers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (tmp_path / f"{_DIR_PREFIX}{dead}-engine0-x" / "v3").mkdir(parents=True)
    (tmp_path / f"{_DIR_PREFIX}{os.getpid()}-engine1-y" / "v3").mkdir(parents=True)
    (tmp_path / "unrelated").mkdir()
    _remove_dead_workers_dirs(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [f"{_DIR_PREFIX}{os.getpid()}-engine1-y", "unrelated"]
