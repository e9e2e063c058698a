"""`python -m grpo_ray ...` is the `grpo-ray` command (where the entry point is not installed)."""
import sys

from grpo_ray.cli import main

sys.exit(main())
