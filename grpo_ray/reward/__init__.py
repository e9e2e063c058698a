"""Rewards: the reference recipe's functions and the `overlong` penalty (`functions`), the
`math` correctness reward (`math`; math-verify runs in a child process), both light, and the Ray
actor pool that runs them (`pool`, imports Ray: import it where the pool is built)."""
from grpo_ray.reward.registry import BUILTIN, MODES, get_reward_functions

__all__ = ["BUILTIN", "MODES", "get_reward_functions"]
