"""Runs in the driver (and `grpo-ray build-tiny`): `model.path` resolved to a directory the
actors load, the tiny models built in code and the supervised warm-up of `builtin:tiny-warm`."""
