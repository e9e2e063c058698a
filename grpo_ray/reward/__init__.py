"""Rewards: the reference recipe's functions (`functions`), the `math` correctness reward (`math`;
math-verify runs in pebble's process pool), both light, TRL's reward functions by name
(`registry`: `trl:accuracy_reward`, and `overlong`, TRL's soft overlong punishment; TRL is
imported only when one is asked for) and the Ray actor pool that runs them (`pool`, imports Ray: import it where
the pool is built)."""
from grpo_ray.reward.registry import BUILTIN, MODES, get_reward_functions

__all__ = ["BUILTIN", "MODES", "get_reward_functions"]
